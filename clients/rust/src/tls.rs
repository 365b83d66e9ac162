//! TLS for an `https://` broker URL ([`ClientTls`]): the CA and client
//! certificate files read and checked before any handshake, so a file that
//! can never work is an error naming it, and the handshake failures that do
//! not mend by themselves said with what to do.

use crate::error::{error_chain, ClientError};
use crate::pem;
use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// TLS for an `https://` broker URL: which CA to trust and, for mutual TLS,
/// the client's certificate and key. The default trusts the platform's
/// roots and presents no certificate.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    ca: Option<Certificate>,
    identity: Option<Identity>,
    domain: Option<String>,
    /// As given, to check when connecting (tonic takes any bytes and
    /// fails only at the handshake, in words that name no file).
    ca_pem: Option<Vec<u8>>,
    cert_pem: Option<Vec<u8>>,
    /// What is wrong with the key given, if anything (the key itself is
    /// not kept twice).
    key_problem: Option<String>,
    /// The files they were read from ([`ClientTls::from_files`]), for
    /// the check's messages.
    ca_file: Option<PathBuf>,
    identity_files: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    /// The platform's trusted roots, no client certificate.
    pub fn new() -> ClientTls {
        ClientTls::default()
    }

    /// Trusts only the CA certificate(s) in `pem` instead of the platform's
    /// roots (a private CA).
    pub fn ca_pem(mut self, pem: impl AsRef<[u8]>) -> ClientTls {
        self.ca_pem = Some(pem.as_ref().to_vec());
        self.ca = Some(Certificate::from_pem(pem));
        self
    }

    /// Presents this certificate chain and key (PEM) to the broker, for
    /// mutual TLS.
    pub fn identity_pem(mut self, cert: impl AsRef<[u8]>, key: impl AsRef<[u8]>) -> ClientTls {
        self.cert_pem = Some(cert.as_ref().to_vec());
        self.key_problem = private_key_problem(key.as_ref());
        self.identity = Some(Identity::from_pem(cert, key));
        self
    }

    /// Checks the broker's certificate for this name instead of the URL's
    /// host.
    pub fn domain_name(mut self, name: impl Into<String>) -> ClientTls {
        self.domain = Some(name.into());
        self
    }

    /// Reads the CA file (if any) and the client certificate and key files
    /// (if any, as `(cert, key)`), all PEM.
    pub fn from_files(
        ca: Option<&Path>,
        identity: Option<(&Path, &Path)>,
    ) -> Result<ClientTls, ClientError> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|e| {
                ClientError::Tls(format!("cannot read {what} {}: {e}", path.display()))
            })
        };
        let mut tls = ClientTls::new();
        if let Some(ca) = ca {
            tls = tls.ca_pem(read("the CA certificate", ca)?);
            tls.ca_file = Some(ca.to_owned());
        }
        if let Some((cert, key)) = identity {
            tls = tls.identity_pem(
                read("the client certificate", cert)?,
                read("the client key", key)?,
            );
            tls.identity_files = Some((cert.to_owned(), key.to_owned()));
        }
        Ok(tls)
    }

    /// What is wrong with the certificates, found before any handshake:
    /// a CA or client certificate file with no certificate in it or one
    /// that does not parse, or a client certificate out of its validity
    /// (the broker would drop every connection, which a client cannot
    /// tell from a broker that is down).
    pub(crate) fn check(&self) -> Result<(), ClientError> {
        // "the CA certificate /etc/ca.pem", the file named when known.
        let named = |what: &str, file: Option<&Path>| match file {
            Some(path) => format!("{what} {}", path.display()),
            None => what.to_owned(),
        };
        let (cert_file, key_file) = match &self.identity_files {
            Some((cert, key)) => (Some(cert.as_path()), Some(key.as_path())),
            None => (None, None),
        };
        if let Some(pem) = &self.ca_pem {
            certificates(&named("the CA certificate", self.ca_file.as_deref()), pem)?;
        }
        if let Some(pem) = &self.cert_pem {
            let certs = certificates(&named("the client certificate", cert_file), pem)?;
            if let Some(own) = certs.first() {
                within_validity(own)?;
            }
        }
        if let Some(problem) = &self.key_problem {
            return Err(ClientError::Tls(format!(
                "{}: {problem}",
                named("the client key", key_file)
            )));
        }
        Ok(())
    }

    pub(crate) fn into_tonic(self) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new();
        c = match self.ca {
            Some(ca) => c.ca_certificate(ca),
            None => c.with_native_roots(),
        };
        if let Some(id) = self.identity {
            c = c.identity(id);
        }
        if let Some(d) = self.domain {
            c = c.domain_name(d);
        }
        c
    }
}

/// The DER certificates in `pem`, each checked to parse as X.509; an
/// error naming `what` if there is none or one does not parse.
fn certificates(what: &str, pem: &[u8]) -> Result<Vec<Vec<u8>>, ClientError> {
    certificates_in(pem).map_err(|problem| ClientError::Tls(format!("{what}: {problem}")))
}

/// The DER certificates in `pem`, or what is wrong with it in words.
fn certificates_in(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    // As tonic will read it: a truncated file is said to be one, not "not
    // PEM" (x509-parser's words) nor, at the handshake, "Error parsing TLS
    // certificate."
    pem::blocks(pem)?;
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| format!("not PEM: {e}"))?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        if let Err(e) = x509_parser::parse_x509_certificate(&block.contents) {
            return Err(format!("a certificate in it does not parse: {e}"));
        }
        out.push(block.contents);
    }
    if out.is_empty() {
        return Err(
            "no PEM certificate in it (expected a -----BEGIN CERTIFICATE----- block)".to_owned(),
        );
    }
    Ok(out)
}

/// What is wrong with `pem` as a file of CA or client certificates, in
/// words (a truncated file, no certificate, one that does not parse): the
/// check [`ClientTls`] makes when connecting, for tools that build TLS
/// settings of their own (quotactl's `--ca-cert` and `--client-cert`).
pub fn check_pem_certificates(pem: &[u8]) -> Result<(), String> {
    certificates_in(pem).map(drop)
}

/// What is wrong with `pem` as a client's private key file, in words (a
/// truncated file, no key tonic can use): the check [`ClientTls`] makes
/// when connecting, for tools that build TLS settings of their own
/// (quotactl's `--client-key`).
pub fn check_pem_private_key(pem: &[u8]) -> Result<(), String> {
    private_key_problem(pem).map_or(Ok(()), Err)
}

/// What is wrong with `pem` as a private key tonic can use (a PKCS#8, RSA
/// or EC one): none in it, or a block cut off. `None` if nothing.
fn private_key_problem(pem: &[u8]) -> Option<String> {
    let blocks = match pem::blocks(pem) {
        Ok(blocks) => blocks,
        Err(problem) => return Some(problem),
    };
    let usable = ["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"];
    (!blocks.iter().any(|b| usable.contains(&b.label.as_str()))).then(|| {
        "no PEM private key in it (expected a -----BEGIN PRIVATE KEY----- block, or an RSA or \
         EC one; an ENCRYPTED PRIVATE KEY must be decrypted first)"
            .to_owned()
    })
}

/// An error if the client's own certificate (DER) has expired or is not
/// valid yet.
fn within_validity(der: &[u8]) -> Result<(), ClientError> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Ok(());
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let validity = cert.validity();
    if validity.not_after.timestamp() < now {
        return Err(ClientError::Tls(format!(
            "the client certificate expired on {}: the broker refuses it; renew it",
            validity.not_after
        )));
    }
    if validity.not_before.timestamp() > now {
        return Err(ClientError::Tls(format!(
            "the client certificate is not valid before {}: check this host's clock",
            validity.not_before
        )));
    }
    Ok(())
}

/// A TLS handshake that failed in a way that does not mend by itself,
/// said with what to do: a broker certificate this client does not trust,
/// a certificate of its own the broker refused, or no TLS on the port.
/// Not a broker that is away: calls fail with it instead of falling back,
/// as they do on a token the broker refuses. (A refusal of the client's
/// certificate under TLS 1.3 can also arrive as a bare closed connection,
/// which cannot be told from a broker going down: that one falls back.)
pub(crate) fn tls_refusal(s: &tonic::Status) -> Option<String> {
    let chain = error_chain(std::error::Error::source(s)?);
    let hint = if chain.contains("not valid for name") {
        "the broker's certificate does not name the host in the URL: connect by a name it \
         has, or give one with ClientTls::domain_name"
    } else if chain.contains("UnknownIssuer") {
        "no CA this client trusts signed the broker's certificate: give the CA that did \
         with ClientTls::ca_pem"
    } else if chain.contains("invalid peer certificate") && chain.contains("xpired") {
        "the broker's certificate has expired: renew it on the broker"
    } else if chain.contains("invalid peer certificate") {
        "this client does not accept the broker's certificate"
    } else if chain.contains("received fatal alert") {
        "the broker refused this client's TLS handshake: under mutual TLS it takes only an \
         unexpired certificate its client CA signed (ClientTls::identity_pem)"
    } else if chain.contains("InvalidContentType") || chain.contains("corrupt message") {
        "the port does not speak TLS: use an http:// URL for a broker without [server.tls]"
    } else {
        return None;
    };
    let detail: String = chain.chars().take(300).collect();
    Some(format!("{hint} ({detail})"))
}
