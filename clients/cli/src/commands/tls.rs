//! TLS for an `https://` broker from `--ca-cert`, `--client-cert` and
//! `--client-key`: each file is checked (readable, the PEM kind expected,
//! whole, a client certificate valid now) so that a bad one is named before
//! any handshake.

use crate::cli::TlsArgs;
use crate::error::Error;
use std::path::Path;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// Why the first certificate in `pem` (the client's own) is not valid now,
/// if it is not: the broker would drop the connection without a word.
fn out_of_validity(pem: &[u8]) -> Option<String> {
    let block = x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .find(|b| b.label == "CERTIFICATE")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&block.contents).ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())?;
    let validity = cert.validity();
    if validity.not_after.timestamp() < now {
        Some(format!(
            "the certificate expired on {}: renew it",
            validity.not_after
        ))
    } else if validity.not_before.timestamp() > now {
        Some(format!(
            "the certificate is not valid before {}: check this host's clock",
            validity.not_before
        ))
    } else {
        None
    }
}

/// TLS for an `https://` URL from the `--ca-cert`, `--client-cert` and
/// `--client-key` options (the system's roots without `--ca-cert`); `None`
/// for `http://` (TLS options with one were refused at start:
/// [`crate::cli::Cli::usage_problem`]).
pub(super) fn tls_config(url: &str, tls: &TlsArgs) -> Result<Option<ClientTlsConfig>, Error> {
    if !url.starts_with("https://") {
        return Ok(None);
    }
    // tonic takes any bytes here and fails only at the handshake, with an
    // error that does not name the file: check the PEM's kind first.
    let read = |flag: &str, path: &Path, kind: &str| {
        let pem = std::fs::read(path)
            .map_err(|e| Error::Tls(format!("cannot read {flag} {}: {e}", path.display())))?;
        let text = String::from_utf8_lossy(&pem);
        // The block's exact kind ("CERTIFICATE REQUEST" is not one, nor is
        // an "ENCRYPTED PRIVATE KEY", which tonic cannot use).
        let found = text.lines().any(|l| {
            l.strip_prefix("-----BEGIN ")
                .and_then(|l| l.strip_suffix("-----"))
                .is_some_and(|k| {
                    k == kind
                        || (kind == "PRIVATE KEY"
                            && matches!(k, "RSA PRIVATE KEY" | "EC PRIVATE KEY"))
                })
        });
        if !found {
            return Err(Error::Tls(format!(
                "{flag} {}: no PEM {} in it (expected a -----BEGIN ...{kind}----- block)",
                path.display(),
                kind.to_ascii_lowercase()
            )));
        }
        // Whole (not cut short: tonic's "Error parsing TLS certificate."
        // named no file), and a certificate that parses.
        let whole = if kind == "CERTIFICATE" {
            quota_broker_client::check_pem_certificates(&pem)
        } else {
            quota_broker_client::check_pem_private_key(&pem)
        };
        whole.map_err(|problem| Error::Tls(format!("{flag} {}: {problem}", path.display())))?;
        Ok(pem)
    };
    let mut config = match &tls.ca_cert {
        Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(
            "--ca-cert",
            ca,
            "CERTIFICATE",
        )?)),
        None => ClientTlsConfig::new().with_native_roots(),
    };
    // One without the other was refused at start (`Cli::usage_problem`).
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        let pem = read("--client-cert", cert, "CERTIFICATE")?;
        if let Some(problem) = out_of_validity(&pem) {
            return Err(Error::Tls(format!(
                "--client-cert {}: {problem}",
                cert.display()
            )));
        }
        config = config.identity(Identity::from_pem(
            pem,
            read("--client-key", key, "PRIVATE KEY")?,
        ));
    }
    if let Some(name) = &tls.tls_server_name {
        config = config.domain_name(name.clone());
    }
    Ok(Some(config))
}
