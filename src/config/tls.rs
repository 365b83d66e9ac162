//! TLS files named in the config, read and checked at load (PEM that
//! parses, a key that matches the certificate, a certificate that has not
//! expired), so a bad path or PEM is a listed config problem before
//! anything binds: `[server.tls]`, built into
//! the rustls server configuration of the gRPC port, and the `cluster.etcd_*`
//! files of cluster mode's connection to an etcd served over TLS.

use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The `[server.tls]` table as written: file paths, "" for unset.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTls {
    cert: String,
    key: String,
    client_ca: String,
}

/// TLS on the gRPC port: the files it came from and the rustls
/// configuration built from them.
#[derive(Clone)]
pub struct TlsSettings {
    /// PEM certificate chain the broker presents (leaf first).
    pub cert: PathBuf,
    /// PEM private key of the leaf certificate.
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to; when set,
    /// every client must present one (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// When the broker's certificate (the chain's first) expires, in unix
    /// seconds.
    pub cert_not_after: i64,
    /// When the first of the client CA certificates expires, in unix
    /// seconds.
    pub client_ca_not_after: Option<i64>,
    /// Client CA certificates that have expired (left in a bundle; of no use).
    pub expired_client_cas: usize,
    config: Arc<ServerConfig>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("client_ca", &self.client_ca)
            .finish_non_exhaustive()
    }
}

impl TlsSettings {
    /// Whether clients must present a certificate (mutual TLS).
    pub fn is_mutual(&self) -> bool {
        self.client_ca.is_some()
    }

    /// The rustls configuration (ALPN `h2`).
    pub(crate) fn server_config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// Logs a warning for each certificate that expires within
    /// [`EXPIRY_WARNING`] (clients will refuse it then, and fall back).
    pub(crate) fn warn_if_expiring(&self) {
        let now = unix_now();
        let soon = |at: i64| at - now < EXPIRY_WARNING.as_secs() as i64;
        if soon(self.cert_not_after) {
            tracing::warn!(
                cert = %self.cert.display(),
                expires = %utc(self.cert_not_after),
                "server.tls.cert expires soon: renew it and restart before then, or every \
                 client's handshake fails"
            );
        }
        if let (Some(ca), n @ 1..) = (&self.client_ca, self.expired_client_cas) {
            tracing::warn!(
                client_ca = %ca.display(),
                expired = n,
                "server.tls.client_ca holds expired certificates; they are of no use (client \
                 certificates signed by them are refused): remove them"
            );
        }
        if let (Some(ca), Some(at)) = (&self.client_ca, self.client_ca_not_after) {
            if soon(at) {
                tracing::warn!(
                    client_ca = %ca.display(),
                    expires = %utc(at),
                    "server.tls.client_ca expires soon: client certificates it signed are \
                     refused from then"
                );
            }
        }
    }
}

/// A certificate expiring this soon is warned about at start.
pub(crate) const EXPIRY_WARNING: std::time::Duration =
    std::time::Duration::from_secs(14 * 24 * 3600);

fn unix_now() -> i64 {
    i64::try_from(crate::clock::unix_secs()).unwrap_or(i64::MAX)
}

/// `at` (unix seconds) as an RFC 2822 time, for messages.
fn utc(at: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(at)
        .ok()
        .and_then(|t| t.to_rfc2822().ok())
        .unwrap_or_else(|| format!("{at} (unix seconds)"))
}

/// When the certificate expires (unix seconds), or a problem when it
/// cannot be read.
fn expiry(
    key: &str,
    path: &Path,
    cert: &CertificateDer<'_>,
    problems: &mut Vec<String>,
) -> Option<i64> {
    match x509_parser::parse_x509_certificate(cert.as_ref()) {
        Ok((_, c)) => Some(c.validity().not_after.timestamp()),
        Err(e) => {
            problems.push(format!(
                "{key} {}: not a readable X.509 certificate: {e}",
                super::shown(path)
            ));
            None
        }
    }
}

/// [`expiry`], and a problem when it has expired (`which` names the
/// certificate in the message).
fn not_after(
    key: &str,
    path: &Path,
    cert: &CertificateDer<'_>,
    which: &str,
    problems: &mut Vec<String>,
) -> Option<i64> {
    let at = expiry(key, path, cert, problems)?;
    if at <= unix_now() {
        problems.push(format!(
            "{key} {}: {which} expired at {}; clients refuse it: renew it",
            super::shown(path),
            utc(at)
        ));
        return None;
    }
    Some(at)
}

impl RawTls {
    /// Whether any of the files is named (TLS is asked for, even if a file
    /// turns out bad).
    pub(super) fn is_set(&self) -> bool {
        [&self.cert, &self.key, &self.client_ca]
            .iter()
            .any(|s| !s.trim().is_empty())
    }

    /// Validates into settings, pushing one line per problem. `None` when
    /// nothing is set (plaintext) or when a problem was found.
    pub(super) fn validate(self, problems: &mut Vec<String>) -> Option<TlsSettings> {
        let set = |s: String| (!s.trim().is_empty()).then(|| PathBuf::from(s));
        let (cert, key, client_ca) = (set(self.cert), set(self.key), set(self.client_ca));
        let (cert, key) = match (cert, key) {
            (None, None) => {
                if client_ca.is_some() {
                    problems.push(
                        "server.tls.client_ca is set without server.tls.cert and server.tls.key; \
                         mutual TLS needs the broker's own certificate too"
                            .into(),
                    );
                }
                return None;
            }
            (Some(_), None) => {
                problems.push(
                    "server.tls.cert is set without server.tls.key (the PEM private key of the certificate)"
                        .into(),
                );
                return None;
            }
            (None, Some(_)) => {
                problems.push(
                    "server.tls.key is set without server.tls.cert (the PEM certificate chain)"
                        .into(),
                );
                return None;
            }
            (Some(cert), Some(key)) => (cert, key),
        };
        let before = problems.len();
        let chain = read_certs("server.tls.cert", &cert, problems);
        // The chain expires with the first of its certificates to expire.
        let cert_not_after = chain.as_ref().and_then(|c| {
            let mut first: Option<i64> = None;
            for (k, der) in c.iter().enumerate() {
                let which = if k == 0 {
                    "the certificate"
                } else {
                    "an intermediate certificate of its chain"
                };
                let at = not_after("server.tls.cert", &cert, der, which, problems)?;
                first = Some(first.map_or(at, |m| m.min(at)));
            }
            first
        });
        let private_key = read("server.tls.key", &key, problems)
            .and_then(|pem| private_key("server.tls.key", &key, &pem, problems));
        let (mut client_ca_not_after, mut expired_client_cas) = (None, 0);
        let roots = client_ca.as_ref().and_then(|ca| {
            let certs = read_certs("server.tls.client_ca", ca, problems)?;
            // A bundle kept through a rotation may still hold the old, expired
            // CA: it is of no use, but only a bundle of nothing else is wrong.
            let mut expired = Vec::new();
            for c in &certs {
                let at = expiry("server.tls.client_ca", ca, c, problems)?;
                if at <= unix_now() {
                    expired.push(at);
                } else {
                    client_ca_not_after = Some(client_ca_not_after.map_or(at, |m: i64| m.min(at)));
                }
            }
            expired_client_cas = expired.len();
            if client_ca_not_after.is_none() {
                problems.push(format!(
                    "server.tls.client_ca {}: every certificate in it has expired (the last at \
                     {}); clients' certificates cannot be checked: renew it",
                    super::shown(ca),
                    utc(expired.iter().copied().max().unwrap_or_default())
                ));
                return None;
            }
            let mut roots = RootCertStore::empty();
            let (_added, ignored) = roots.add_parsable_certificates(certs);
            if roots.is_empty() {
                problems.push(format!(
                    "server.tls.client_ca {}: none of its certificates is a usable CA certificate",
                    super::shown(ca)
                ));
                return None;
            }
            if ignored > 0 {
                tracing::warn!(
                    client_ca = %ca.display(),
                    ignored,
                    "server.tls.client_ca: some certificates could not be parsed and are ignored"
                );
            }
            Some(roots)
        });
        let (Some(chain), Some(private_key), Some(cert_not_after)) =
            (chain, private_key, cert_not_after)
        else {
            return None;
        };
        if problems.len() > before {
            return None;
        }
        let provider = Arc::new(default_provider());
        let builder = match ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
        {
            Ok(b) => b,
            Err(e) => {
                problems.push(format!("server.tls: cannot set up TLS: {e}"));
                return None;
            }
        };
        let builder = match roots {
            None => builder.with_no_client_auth(),
            Some(roots) => {
                match WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()
                {
                    Ok(verifier) => builder.with_client_cert_verifier(verifier),
                    Err(e) => {
                        problems.push(format!(
                            "server.tls.client_ca {}: cannot verify clients with it: {e}",
                            super::shown(client_ca.as_deref().unwrap_or(Path::new("")))
                        ));
                        return None;
                    }
                }
            }
        };
        let mut config = match builder.with_single_cert(chain, private_key) {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!(
                    "server.tls: the key {} does not fit the certificate {}: {e}",
                    super::shown(&key),
                    super::shown(&cert)
                ));
                return None;
            }
        };
        // gRPC is HTTP/2 only; clients (tonic among them) insist on h2.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Some(TlsSettings {
            cert,
            key,
            client_ca,
            cert_not_after,
            client_ca_not_after,
            expired_client_cas,
            config: Arc::new(config),
        })
    }
}

/// TLS to etcd: the PEM files of `cluster.etcd_ca` and, for an etcd that
/// asks for client certificates, `cluster.etcd_cert` + `cluster.etcd_key`,
/// read at load.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM CA certificates the etcd servers' certificates must chain to.
    pub ca: Vec<u8>,
    /// PEM certificate chain and private key the broker presents, if set.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl EtcdTls {
    /// Checks the `[ca, cert, key]` paths ("" for unset) against the
    /// endpoints' schemes: `https://` endpoints need the CA (there are no
    /// system roots to fall back on, and an etcd's certificate is almost
    /// always from a private CA), the files are of no use to `http://` ones,
    /// and one list is all one or the other.
    pub(super) fn validate(
        endpoints: &[String],
        [ca, cert, key]: [String; 3],
        problems: &mut Vec<String>,
    ) -> Option<EtcdTls> {
        let set = |s: String| (!s.trim().is_empty()).then(|| PathBuf::from(s));
        let (ca, cert, key) = (set(ca), set(cert), set(key));
        let https = endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        if https > 0 && https < endpoints.len() {
            problems.push(
                "cluster.etcd mixes http:// and https:// endpoints; one etcd cluster is \
                 served one way"
                    .into(),
            );
            return None;
        }
        if https == 0 {
            if ca.is_some() || cert.is_some() || key.is_some() {
                problems.push(
                    "cluster.etcd_ca, etcd_cert and etcd_key are for https:// etcd endpoints; \
                     the endpoints are http://"
                        .into(),
                );
            }
            return None;
        }
        let Some(ca) = ca else {
            problems.push(
                "cluster.etcd has https:// endpoints: set cluster.etcd_ca to the PEM file of \
                 the CA that signed the etcd servers' certificates"
                    .into(),
            );
            return None;
        };
        let before = problems.len();
        let ca_pem = read_certs("cluster.etcd_ca", &ca, problems)
            .and_then(|_| read("cluster.etcd_ca", &ca, problems));
        let identity = match (cert, key) {
            (None, None) => None,
            (Some(_), None) => {
                problems.push(
                    "cluster.etcd_cert is set without cluster.etcd_key (the PEM private key of \
                     the certificate)"
                        .into(),
                );
                None
            }
            (None, Some(_)) => {
                problems.push(
                    "cluster.etcd_key is set without cluster.etcd_cert (the PEM certificate \
                     chain)"
                        .into(),
                );
                None
            }
            (Some(cert), Some(key)) => {
                let cert_pem = read_certs("cluster.etcd_cert", &cert, problems)
                    .and_then(|_| read("cluster.etcd_cert", &cert, problems));
                let key_pem = read("cluster.etcd_key", &key, problems)
                    .filter(|pem| private_key("cluster.etcd_key", &key, pem, problems).is_some());
                cert_pem.zip(key_pem)
            }
        };
        if problems.len() > before {
            return None;
        }
        let ca_pem = ca_pem?;
        // What the connection will do with them, done now: a CA with no
        // usable certificate, or a key that does not fit its certificate,
        // is a config problem, not a broker that runs and never leads.
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(
            CertificateDer::pem_slice_iter(&ca_pem).filter_map(Result::ok),
        );
        if roots.is_empty() {
            problems.push(format!(
                "cluster.etcd_ca {}: none of its certificates is a usable CA certificate",
                super::shown(&ca)
            ));
            return None;
        }
        if let Some((cert_pem, key_pem)) = &identity {
            let chain = CertificateDer::pem_slice_iter(cert_pem)
                .filter_map(Result::ok)
                .collect();
            let fits = PrivateKeyDer::from_pem_slice(key_pem)
                .map_err(|e| e.to_string())
                .and_then(|key| {
                    ClientConfig::builder_with_provider(Arc::new(default_provider()))
                        .with_safe_default_protocol_versions()
                        .map_err(|e| e.to_string())?
                        .with_root_certificates(roots)
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = fits {
                problems.push(format!(
                    "cluster.etcd_key does not fit cluster.etcd_cert: {e}"
                ));
                return None;
            }
        }
        Some(EtcdTls {
            ca: ca_pem,
            identity,
        })
    }
}

impl EtcdTls {
    /// The TLS configuration of connections to etcd: its CA the only one
    /// trusted, the client certificate if set, HTTP/2 by ALPN.
    pub(crate) fn client_config(&self) -> Result<Arc<ClientConfig>, String> {
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(
            CertificateDer::pem_slice_iter(&self.ca).filter_map(Result::ok),
        );
        let builder = ClientConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .filter_map(Result::ok)
                    .collect();
                let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| e.to_string())?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| e.to_string())?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A warning when the private key file `path` (named by the config key
/// `key`) may be read by every user of this host (unix): whoever reads it
/// can pose as the broker. Not an error: a host of one user, or a key
/// readable by its group (`ssl-cert`) only, is a choice to make.
pub(super) fn key_readable_by_all(key: &str, path: &Path) -> Option<String> {
    let mode = super::load::mode(path).filter(|m| m & 0o004 != 0)?;
    let whom = if key.starts_with("cluster.") {
        "to etcd"
    } else {
        "to its clients"
    };
    Some(format!(
        "{key} {} is readable by every user of this host (mode {mode:04o}): whoever reads \
         it can pose as the broker {whom}; let only the broker's user read it (chmod o-r, or \
         600; a Kubernetes secret volume: defaultMode 0400)",
        super::shown(path)
    ))
}

/// The bytes of `path`, or a problem naming `key`.
fn read(key: &str, path: &Path, problems: &mut Vec<String>) -> Option<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| problems.push(format!("{key}: cannot read {}: {e}", super::shown(path))))
        .ok()
}

/// Every PEM certificate in `path` (at least one), or a problem naming `key`.
fn read_certs(
    key: &str,
    path: &Path,
    problems: &mut Vec<String>,
) -> Option<Vec<CertificateDer<'static>>> {
    let pem = read(key, path, problems)?;
    match CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>() {
        Ok(certs) if !certs.is_empty() => Some(certs),
        Ok(_) => {
            problems.push(format!(
                "{key} {}: no PEM certificate found (expected -----BEGIN CERTIFICATE-----)",
                super::shown(path)
            ));
            None
        }
        Err(e) => {
            problems.push(format!(
                "{key} {}: not a valid PEM certificate file: {}",
                super::shown(path),
                pem_problem(&e)
            ));
            None
        }
    }
}

/// The private key in `pem` (read from `path`), or a problem naming `key`.
fn private_key(
    key: &str,
    path: &Path,
    pem: &[u8],
    problems: &mut Vec<String>,
) -> Option<PrivateKeyDer<'static>> {
    let why = match PrivateKeyDer::from_pem_slice(pem) {
        Ok(k) => return Some(k),
        Err(pem::Error::NoItemsFound) => "no PEM private key found; expected -----BEGIN \
                                          PRIVATE KEY----- (PKCS#8), RSA or EC PRIVATE KEY"
            .to_owned(),
        Err(e) => format!("not a valid PEM private key file: {}", pem_problem(&e)),
    };
    problems.push(format!("{key} {}: {why}", super::shown(path)));
    None
}

/// What is wrong with a PEM file, in words: the parser's own message
/// gives the label of a missing END line as a list of byte values
/// (`missing section end marker: [67, 69, 82, ...]`) and quotes a bad
/// line whole.
fn pem_problem(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "missing the \"-----END {}-----\" line (a truncated file?)",
            crate::error::cut(&String::from_utf8_lossy(end_marker), 64)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "a -----BEGIN line that does not end in five dashes: {}",
            crate::error::clip(String::from_utf8_lossy(line).trim_end())
        ),
        pem::Error::Base64Decode(why) => format!(
            "the lines between -----BEGIN and -----END are not base64 ({}): a damaged file?",
            crate::error::cut(why, 200)
        ),
        pem::Error::SectionTooLarge => "a PEM block over 256 MB".to_owned(),
        other => crate::error::cut(&other.to_string(), 200),
    }
}
