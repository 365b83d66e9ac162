//! Client for quota-broker: wrap each upstream HTTP call in a lease.
//!
//! - [`BrokerClient::acquire`] asks the broker for a [`Lease`] for one
//!   [`Call`]; the lease renews its concurrency slot in the background while
//!   held and releases it when dropped.
//! - [`Lease::report`] tells the broker how the call went (status,
//!   Retry-After and the rate-limit headers), which is how the whole fleet
//!   learns from one integration's 429.
//! - [`LeaseLayer`] is a `tower::Layer` that does both around every request
//!   of an HTTP client service, with no code at the call site.
//! - When the broker cannot be reached, the client falls back to a local
//!   limiter (governor) at a conservative rate — a fraction of the rate it was
//!   recently granted, never less than a configured floor and never
//!   unlimited — logs that once, and goes back to the broker when it answers.
//! - `https://` URLs speak TLS: the platform's trusted roots by default, or
//!   a private CA and a client certificate (mutual TLS) with [`ClientTls`]
//!   and [`BrokerClient::connect_with`].
//! - A broker that is overloaded answers [`ClientError::Overloaded`] with the
//!   time to wait before retrying.
//! - A cluster of brokers: give several URLs, comma-separated; calls go to
//!   the tenant's leader, following a broker's redirect, and to the next
//!   broker when one is down.
//! - A broker address that can never work is an error, not an outage run
//!   on the fallback rate for good: a URL that does not parse is
//!   [`ClientError::Url`] when the client is built; a server that answers
//!   but is not a quota-broker's gRPC port (another gRPC service, an HTTP/1
//!   server such as the broker's own HTTP port, a TLS port addressed with
//!   `http://`) is [`ClientError::NotABroker`] on every call, logged once
//!   per address at ERROR (in a list of brokers it is passed over for
//!   [`RECHECK_NOT_A_BROKER`], then tried again).
//!
//! ```no_run
//! use quota_broker_client::{BrokerClient, Call};
//! # async fn run() -> Result<(), quota_broker_client::ClientError> {
//! let broker = BrokerClient::connect("http://127.0.0.1:50051", None)?;
//! let call = Call::new("demo", "POST", "/api/v2/analytics/conversations/details/query")
//!     .client_id("ingest-1")
//!     .oauth_client("my-oauth-client")
//!     .class("batch");
//! let lease = broker.acquire(&call).await?;
//! // ... make the upstream call, then:
//! let headers = http::HeaderMap::new();
//! lease.report(200, &headers).await?;
//! drop(lease); // releases the slot
//! # Ok(()) }
//! ```
//!
//! Over TLS, with a private CA and a client certificate:
//!
//! ```no_run
//! use quota_broker_client::{BrokerClient, ClientTls, ConnectOptions};
//! # fn run() -> Result<(), quota_broker_client::ClientError> {
//! let tls = ClientTls::from_files(
//!     Some("ca.pem".as_ref()),
//!     Some(("client.pem".as_ref(), "client.key".as_ref())),
//! )?;
//! let broker = BrokerClient::connect_with(
//!     "https://broker.internal:50051",
//!     ConnectOptions::new().token("my-token").tls(tls),
//! )?;
//! # Ok(()) }
//! ```

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod address;
mod fallback;
mod kept;
mod layer;
mod pem;

pub use fallback::FallbackSettings;
/// The tonic this crate is built on, for matching [`ClientError::Refused`]'s
/// status code without a tonic dependency of your own at the same version.
pub use tonic;

/// The URL a client dials for the broker address `given` (`host:port`,
/// `http://…`, `https://…`), or why it can never be dialled: a port that is
/// not a number from 1 to 65535, two `:` outside an IPv6 address's
/// brackets, a host name with characters no host has, another scheme. The
/// check [`BrokerClient`] makes when it is built, for tools that take broker
/// addresses of their own (quotactl's usage errors).
pub fn check_broker_address(given: &str) -> Result<String, String> {
    address::broker_url(given).map_err(|e| match e {
        ClientError::Url { message, .. } => message,
        other => other.to_string(),
    })
}

/// What a plaintext server that is not a quota-broker's gRPC port said
/// first to a gRPC client (see [`not_a_grpc_port`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotAGrpcPort {
    /// An HTTP/1 server, such as a broker's HTTP port; its status line.
    Http1(String),
    /// A TLS port (addressed with `http://` or as `host:port`).
    Tls,
}

impl std::fmt::Display for NotAGrpcPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let first = match self {
            NotAGrpcPort::Http1(line) => address::FirstAnswer::Http1(line.clone()),
            NotAGrpcPort::Tls => address::FirstAnswer::Tls,
        };
        // (Never Http2: that is a gRPC port.)
        let why = address::not_a_broker(&tonic::Status::unavailable(""), Some(first));
        f.write_str(why.as_deref().unwrap_or_default())
    }
}

/// What the plaintext server at `url` (`http://host:port` or `host:port`)
/// is, when it is not a quota-broker's gRPC port, from what it says first
/// to a gRPC client; `None` when it answers HTTP/2, says nothing, or
/// cannot be reached within `connect_within`. For tools that call the
/// broker through their own channel and get only "connection closed" from
/// such a server: the [`BrokerClient`] asks this itself
/// ([`ClientError::NotABroker`]).
pub async fn not_a_grpc_port(url: &str, connect_within: Duration) -> Option<NotAGrpcPort> {
    let uri: http::Uri = address::broker_url(url).ok()?.parse().ok()?;
    if uri.scheme_str() != Some("http") {
        return None;
    }
    match address::first_answer(&uri, connect_within).await? {
        address::FirstAnswer::Http1(line) => Some(NotAGrpcPort::Http1(line)),
        address::FirstAnswer::Tls => Some(NotAGrpcPort::Tls),
        address::FirstAnswer::Http2 => None,
    }
}
pub use layer::{LeaseLayer, LeaseService, LeaseServiceError, LeasedBody};

use fallback::{Fallback, Route, Take};
use kept::Kept;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{
    AcquireRequest, ReleaseRequest, ReleaseResponse, RenewRequest, ReportRequest, WatchRequest,
};
use quota_broker::REPORTED_HEADERS;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker URL is not usable.
    #[error("invalid broker URL {url:?}: {message}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The token cannot be sent as a header.
    #[error("the token contains characters that cannot be sent in a header")]
    Token,
    /// The TLS settings are not usable (a file, a certificate, a key).
    #[error("TLS: {0}")]
    Tls(String),
    /// The broker answered "not now".
    #[error("not granted: {reason} (retry in {retry_after:?})")]
    NotGranted {
        /// The broker's reason.
        reason: String,
        /// When to retry at the earliest.
        retry_after: Duration,
    },
    /// The broker is overloaded for this caller (request rate, Watch
    /// streams): try again after `retry_after`.
    #[error("broker overloaded: {message} (retry in {retry_after:?})")]
    Overloaded {
        /// The broker's message.
        message: String,
        /// When to retry at the earliest.
        retry_after: Duration,
    },
    /// The client was made outside a Tokio runtime (its connections'
    /// tasks need one).
    #[error(
        "BrokerClient must be created inside a Tokio runtime (its connections run as tasks of it)"
    )]
    NoRuntime,
    /// The broker refused the request (bad field, unknown tenant, auth...).
    #[error("broker refused: {}: {}", quota_broker::code_name(.0.code()), .0.message())]
    Refused(tonic::Status),
    /// The server at `url` answers, but not as a quota-broker's gRPC port:
    /// another gRPC service, an HTTP/1 server (such as a broker's HTTP
    /// port, `server.http_listen`), a TLS port addressed with `http://`.
    /// Never answered from the fallback (that is for a broker that is
    /// down, and this address never serves): fix the URL.
    #[error(
        "the server at {url} is not a quota-broker's gRPC port: {reason}; give the broker's gRPC \
         address (its server.listen, default 127.0.0.1:50051) [{}: {detail}]",
        quota_broker::code_name(*.code)
    )]
    NotABroker {
        /// The URL called.
        url: String,
        /// What the server is, as far as its answer tells.
        reason: String,
        /// The gRPC status the call got.
        code: tonic::Code,
        /// The status's message.
        detail: String,
    },
}

/// Response metadata in which the broker says how long to wait after an
/// overload refusal, in milliseconds.
const RETRY_AFTER_MS: &str = "retry-after-ms";

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> ClientError {
        let retry_after = s
            .metadata()
            .get(RETRY_AFTER_MS)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        match retry_after {
            Some(ms) if s.code() == tonic::Code::ResourceExhausted => ClientError::Overloaded {
                message: s.message().to_owned(),
                retry_after: Duration::from_millis(ms),
            },
            _ => ClientError::Refused(s),
        }
    }
}

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
    fn check(&self) -> Result<(), ClientError> {
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

    fn into_tonic(self) -> ClientTlsConfig {
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

/// How [`BrokerClient::connect_with`] connects.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    token: Option<String>,
    tls: Option<ClientTls>,
    fallback: FallbackSettings,
}

impl ConnectOptions {
    /// No token, TLS as the URL says (platform roots for `https://`),
    /// default fallback.
    pub fn new() -> ConnectOptions {
        ConnectOptions::default()
    }

    /// Sends `token` as a bearer token on every call.
    pub fn token(mut self, token: impl Into<String>) -> ConnectOptions {
        self.token = Some(token.into());
        self
    }

    /// TLS settings; the URL must then be `https://`.
    pub fn tls(mut self, tls: ClientTls) -> ConnectOptions {
        self.tls = Some(tls);
        self
    }

    /// The local limiter used while the broker is unreachable.
    pub fn fallback(mut self, fallback: FallbackSettings) -> ConnectOptions {
        self.fallback = fallback;
        self
    }
}

/// One upstream call to lease.
#[derive(Debug, Clone)]
pub struct Call {
    tenant: String,
    method: String,
    path: String,
    client_id: String,
    oauth_client: String,
    class: String,
    permits: u32,
    max_wait: Option<Duration>,
}

impl Call {
    /// A call of `method` to `path` on `tenant`.
    pub fn new(
        tenant: impl Into<String>,
        method: impl Into<String>,
        path: impl Into<String>,
    ) -> Call {
        Call {
            tenant: tenant.into(),
            method: method.into(),
            path: path.into(),
            client_id: "quota-broker-client".into(),
            oauth_client: String::new(),
            class: String::new(),
            permits: 1,
            max_wait: None,
        }
    }

    /// The tenant the call is for.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The calling integration instance (for fair sharing and logs).
    pub fn client_id(mut self, id: impl Into<String>) -> Call {
        self.client_id = id.into();
        self
    }

    /// The OAuth client the call is made with.
    pub fn oauth_client(mut self, id: impl Into<String>) -> Call {
        self.oauth_client = id.into();
        self
    }

    /// The priority class ("" for the broker's default).
    pub fn class(mut self, class: impl Into<String>) -> Call {
        self.class = class.into();
        self
    }

    /// Permits to take (default 1; 0 is taken as 1, as the broker reads
    /// it).
    pub fn permits(mut self, permits: u32) -> Call {
        self.permits = permits.max(1);
        self
    }

    /// Longest server-side wait (default: the class's default). While the
    /// broker is unreachable the client does not know the class's default:
    /// without `max_wait` a call waits for the local fallback limiter at
    /// most [`FALLBACK_MAX_WAIT`], the broker's own cap by default, and is
    /// told "not now" beyond it, so a call waits no longer with the broker
    /// down than with it up.
    pub fn max_wait(mut self, wait: Duration) -> Call {
        self.max_wait = Some(wait);
        self
    }

    /// The Acquire for this call, as sent (and sent again with each Renew,
    /// so a broker that restarted can adopt the lease).
    fn acquire_request(&self) -> AcquireRequest {
        AcquireRequest {
            tenant: self.tenant.clone(),
            client_id: self.client_id.clone(),
            priority_class: self.class.clone(),
            method: self.method.clone(),
            path: self.path.clone(),
            oauth_client: self.oauth_client.clone(),
            permits: self.permits,
            max_wait_ms: self.max_wait.map(|d| d.as_millis() as u64),
            idempotency_key: new_key(),
        }
    }

    /// The same call to another method and path.
    pub fn to(&self, method: &str, path: &str) -> Call {
        Call {
            method: method.to_owned(),
            path: path.to_owned(),
            ..self.clone()
        }
    }
}

struct Inner {
    /// The broker calls go to now (std `Mutex`: never held across `.await`).
    conn: Mutex<Conn>,
    /// The configured broker URLs, tried in turn when one does not answer.
    urls: Vec<String>,
    /// TLS for every broker URL (`None`: the platform's roots for https).
    tls: Option<ClientTls>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    /// std `Mutex`: held for a check of the local limiter, never across `.await`.
    fallback: Mutex<Fallback>,
    /// Outcomes the broker could not be told yet (std `Mutex`: never held
    /// across `.await`).
    kept: Mutex<Kept>,
    /// A probe of the broker runs in the background (while falling back).
    probing: AtomicBool,
    /// Releases of dropped leases still on their way to the broker.
    releasing: std::sync::atomic::AtomicUsize,
    /// Told when the last of them is done.
    released: tokio::sync::Notify,
    /// Leases held that count against the fallback's cap on calls in
    /// flight: the broker's that hold slots, and the fallback's own.
    in_flight: std::sync::atomic::AtomicUsize,
    /// Told each time one of them ends.
    freed: tokio::sync::Notify,
    /// The URLs found not to be a quota-broker's gRPC port, with what they
    /// are and when that was found: passed over for [`RECHECK_NOT_A_BROKER`]
    /// after it, then tried again (a load balancer that misrouted during a
    /// deploy); each logged once while it stays what it was (std `Mutex`:
    /// never held across `.await`).
    said_not_a_broker: Mutex<std::collections::HashMap<String, (String, tokio::time::Instant)>>,
    /// Whether a URL was asked what it speaks ([`address::first_answer`]),
    /// and when: a URL that answered in gRPC once is never asked again,
    /// another at most once per [`ASK_EVERY`], so a broker under load or
    /// going down is not sent a probe connection per failed call (std
    /// `Mutex`: never held across `.await`).
    asked: Mutex<std::collections::HashMap<String, Asked>>,
}

/// What is known of what a URL speaks (see `Inner::asked`).
#[derive(Debug, Clone, Copy)]
enum Asked {
    /// It answered a call in gRPC: a broker, whatever fails there later.
    Grpc,
    /// Asked at that instant.
    At(std::time::Instant),
}

/// How often a URL that has not answered in gRPC is asked what it speaks.
const ASK_EVERY: Duration = Duration::from_secs(30);

/// The longest a call that gives no `max_wait` waits for the local
/// fallback (the broker's default `server.max_wait_ms`).
pub const FALLBACK_MAX_WAIT: Duration = Duration::from_secs(60);

/// How long a URL found not to be a broker is passed over before calls
/// try it again.
pub const RECHECK_NOT_A_BROKER: Duration = Duration::from_secs(30);

/// The broker calls go to, and its URL.
struct Conn {
    url: String,
    client: QuotaBrokerClient<Channel>,
}

/// A connection to the broker (cheap to clone).
#[derive(Clone)]
pub struct BrokerClient {
    inner: Arc<Inner>,
}

/// The brokers it was given and whether it is falling back; never the
/// token.
impl std::fmt::Debug for BrokerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerClient")
            .field("urls", &self.inner.urls)
            .field("tls", &self.inner.tls.is_some())
            .field("token", &self.inner.token.is_some())
            .finish_non_exhaustive()
    }
}

impl BrokerClient {
    /// A client for the broker at `url` (`http://` or `https://`, the
    /// latter trusting the platform's roots), sending `token` as a bearer
    /// token. Connects lazily, so a broker that is down at start means
    /// fallback, not failure. For a cluster, `url` lists several brokers,
    /// comma-separated: calls follow the tenant's leader (the
    /// `x-quota-broker-leader` answer) and move to the next broker when
    /// one does not answer.
    pub fn connect(url: &str, token: Option<&str>) -> Result<BrokerClient, ClientError> {
        Self::with_fallback(url, token, FallbackSettings::default())
    }

    /// Like [`BrokerClient::connect`], with explicit fallback settings.
    pub fn with_fallback(
        url: &str,
        token: Option<&str>,
        fallback: FallbackSettings,
    ) -> Result<BrokerClient, ClientError> {
        let mut options = ConnectOptions::new().fallback(fallback);
        options.token = token.map(str::to_owned);
        Self::connect_with(url, options)
    }

    /// A client for the broker at `url` with explicit `options` (token,
    /// TLS, fallback). TLS settings need an `https://` URL; a bad CA,
    /// certificate or key is an error here, not at the first call.
    pub fn connect_with(url: &str, options: ConnectOptions) -> Result<BrokerClient, ClientError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ClientError::NoRuntime);
        }
        if let Some(tls) = &options.tls {
            tls.check()?;
        }
        // Checked here: a URL that can never be dialled would otherwise
        // read as a broker that is down, and every call would quietly run
        // on the fallback rate.
        let urls: Vec<String> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(address::broker_url)
            .collect::<Result<_, _>>()?;
        let first = urls.first().ok_or_else(|| ClientError::Url {
            url: address::shown(url),
            message: "no broker URL given".into(),
        })?;
        let mut clients = Vec::new();
        for u in &urls {
            clients.push(channel(u, options.tls.as_ref())?);
        }
        let token = options
            .token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ClientError::Token)
            })
            .transpose()?;
        Ok(BrokerClient {
            inner: Arc::new(Inner {
                conn: Mutex::new(Conn {
                    url: first.clone(),
                    client: clients.swap_remove(0),
                }),
                urls,
                tls: options.tls,
                token,
                fallback: Mutex::new(Fallback::new(options.fallback)),
                kept: Mutex::new(Kept::default()),
                probing: AtomicBool::new(false),
                releasing: std::sync::atomic::AtomicUsize::new(0),
                released: tokio::sync::Notify::new(),
                in_flight: std::sync::atomic::AtomicUsize::new(0),
                freed: tokio::sync::Notify::new(),
                said_not_a_broker: Mutex::default(),
                asked: Mutex::default(),
            }),
        })
    }

    /// The broker URL calls go to now (the leader of a cluster, once one
    /// answered that it is not).
    pub fn current_url(&self) -> String {
        self.conn().url.clone()
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.inner
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one RPC on the current broker. A broker of a cluster that does
    /// not lead the tenant answers UNAVAILABLE with the leader's URL: the
    /// call goes there. UNAVAILABLE without one (the broker is down, or no
    /// leader is elected yet), or a server that is not a quota-broker's
    /// gRPC port (logged once): the next configured URL. The last answer
    /// when every hop is used.
    async fn rpc<T, F, Fut>(&self, call: F) -> Result<T, RpcError>
    where
        F: FnMut(QuotaBrokerClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.rpc_noting(&AtomicBool::new(false), call).await
    }

    /// [`BrokerClient::rpc`], setting `reached` when a hop failed in a way
    /// that may have come after a broker processed the call (its answer
    /// lost), before the call went on to the next broker. A URL found not
    /// to be a broker is passed over; the call fails with that
    /// ([`RpcError::NotABroker`]) only when no URL of the list is a broker
    /// that is away: with one down it is an outage (the fallback), not a
    /// mistake, whichever URL the call started at.
    async fn rpc_noting<T, F, Fut>(&self, reached: &AtomicBool, mut call: F) -> Result<T, RpcError>
    where
        F: FnMut(QuotaBrokerClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let hops = self.inner.urls.len() + 2;
        let mut hop = 0;
        // A broker found away on the way.
        let mut away: Option<tonic::Status> = None;
        loop {
            let (url, client) = {
                let c = self.conn();
                (c.url.clone(), c.client.clone())
            };
            let status = match call(client).await {
                Ok(r) => {
                    self.answered_in_grpc(&url);
                    return Ok(r.into_inner());
                }
                Err(s) => s,
            };
            if std::error::Error::source(&status).is_none() {
                self.answered_in_grpc(&url);
            }
            if let Some(mistake) = self.mistaken(&url, &status).await {
                let next = if hop < hops {
                    self.next_url(&url)
                } else {
                    None
                };
                let client =
                    next.and_then(|n| Some((channel(&n, self.inner.tls.as_ref()).ok()?, n)));
                let Some((client, next)) = client else {
                    return Err(away.map_or(RpcError::NotABroker(mistake), RpcError::Status));
                };
                hop += 1;
                *self.conn() = Conn { url: next, client };
                continue;
            }
            // Also a connection that failed locally (a connect timeout is
            // not UNAVAILABLE): the next broker may answer.
            if !(is_unreachable(&status) && tls_refusal(&status).is_none() && hop < hops) {
                return Err(RpcError::Status(status));
            }
            if may_have_reached_a_broker(&status) {
                reached.store(true, Ordering::Release);
            }
            hop += 1;
            let leader = status
                .metadata()
                .get(quota_broker::LEADER_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let next = match leader {
                Some(l) if l != url => l,
                // "I lead it" cannot come with UNAVAILABLE; do not loop.
                Some(_) => return Err(RpcError::Status(status)),
                None => match self.next_url(&url) {
                    Some(next) => next,
                    None => return Err(RpcError::Status(status)),
                },
            };
            if !may_follow(&url, &next) {
                tracing::warn!(from = %url, to = %next,
                    "not following a broker's leader hint from https to plaintext (the token would cross in the clear)");
                return Err(RpcError::Status(status));
            }
            let Ok(client) = channel(&next, self.inner.tls.as_ref()) else {
                return Err(RpcError::Status(status));
            };
            tracing::debug!(from = %url, to = %next, "following the cluster to another broker");
            away = Some(status);
            *self.conn() = Conn { url: next, client };
        }
    }

    /// The configured URL after `from`, passing over those found not to be
    /// a broker; `None` when there is no other.
    fn next_url(&self, from: &str) -> Option<String> {
        let urls = &self.inner.urls;
        let wrong = self
            .inner
            .said_not_a_broker
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = tokio::time::Instant::now();
        let at = urls.iter().position(|u| u == from).map_or(0, |i| i + 1);
        (0..urls.len())
            .map(|k| &urls[(at + k) % urls.len()])
            .find(|u| {
                *u != from
                    && wrong
                        .get(*u)
                        .is_none_or(|(_, found)| now >= *found + RECHECK_NOT_A_BROKER)
            })
            .cloned()
    }

    /// Notes that `url` answered a call in gRPC: never asked again what it
    /// speaks.
    fn answered_in_grpc(&self, url: &str) {
        let mut asked = self
            .inner
            .asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !matches!(asked.get(url), Some(Asked::Grpc)) {
            asked.insert(url.to_owned(), Asked::Grpc);
        }
    }

    /// Whether `url` may be asked what it speaks now (and if so, notes it).
    fn may_ask(&self, url: &str) -> bool {
        let now = std::time::Instant::now();
        let mut asked = self
            .inner
            .asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match asked.get(url) {
            Some(Asked::Grpc) => false,
            Some(Asked::At(at)) if now.saturating_duration_since(*at) < ASK_EVERY => false,
            _ => {
                asked.insert(url.to_owned(), Asked::At(now));
                true
            }
        }
    }

    /// Whether the call that got `status` at `url` found a server that is
    /// not a quota-broker's gRPC port (see `address`): its error, logged
    /// the first time for the URL.
    async fn mistaken(&self, url: &str, status: &tonic::Status) -> Option<ClientError> {
        let now = tokio::time::Instant::now();
        let known = || {
            self.inner
                .said_not_a_broker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(url)
                .filter(|(_, found)| now < *found + RECHECK_NOT_A_BROKER)
                .map(|(reason, _)| reason.clone())
        };
        let mut first = None;
        let mut plaintext = None;
        if address::worth_asking(status) {
            // Found wrong lately: what it was then (not asked again yet).
            if let Some(reason) = known() {
                return Some(address::not_a_broker_error(url, reason, status));
            }
            if let Ok(uri) = url.parse::<http::Uri>() {
                match uri.scheme_str() {
                    Some("http") if self.may_ask(url) => {
                        first = address::first_answer(&uri, CONNECT_TIMEOUT).await;
                    }
                    Some("https") if self.may_ask(url) => {
                        plaintext = address::plaintext_at_tls_url(url, CONNECT_TIMEOUT).await;
                    }
                    _ => {}
                }
            }
        }
        let reason = match plaintext {
            Some(reason) => reason,
            None => address::not_a_broker(status, first)?,
        };
        let error = address::not_a_broker_error(url, reason.clone(), status);
        let before = self
            .inner
            .said_not_a_broker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(url.to_owned(), (reason.clone(), now));
        if before.is_none_or(|(was, _)| was != reason) {
            tracing::error!(
                "{error} (calls there fail, never fall back; fix the URL; tried again every {} s)",
                RECHECK_NOT_A_BROKER.as_secs()
            );
        }
        Some(error)
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.inner.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        r
    }

    fn fallback(&self) -> std::sync::MutexGuard<'_, Fallback> {
        self.inner
            .fallback
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks for a lease for `call`. Not granted within the wait is
    /// [`ClientError::NotGranted`]. If the broker is unreachable, the lease
    /// comes from the local fallback limiter instead
    /// ([`Lease::is_fallback`]).
    pub async fn acquire(&self, call: &Call) -> Result<Lease, ClientError> {
        let started = tokio::time::Instant::now();
        loop {
            let route = self.fallback().route();
            if route == (Route::Local { probe: true }) {
                self.probe_in_background();
            }
            if route == Route::Broker {
                let req = call.acquire_request();
                let unanswered = Unanswered::of(self, &req);
                let answer = self
                    .rpc(|mut c| {
                        let req = self.request(req.clone());
                        async move { c.acquire(req).await }
                    })
                    .await;
                unanswered.answered();
                // Not a broker: the caller's error, never a fallback lease.
                let answer = match answer {
                    Ok(r) => Ok(r),
                    Err(e) => Err(e.status()?),
                };
                match answer {
                    Ok(r) => {
                        self.fallback().broker_answered();
                        self.send_kept_in_background();
                        if !r.granted {
                            return Err(ClientError::NotGranted {
                                reason: r.reason,
                                retry_after: Duration::from_millis(r.retry_after_ms),
                            });
                        }
                        let lease =
                            Lease::new(self.clone(), call.clone(), r.lease_id, r.lease_ttl_ms)
                                .with_buckets(r.buckets);
                        let slots = lease
                            .counted
                            .is_some()
                            .then(|| self.inner.in_flight.load(Ordering::Acquire));
                        self.fallback().granted(call.permits, slots);
                        return Ok(lease);
                    }
                    Err(s) if tls_refusal(&s).is_some() => {
                        return Err(ClientError::Tls(tls_refusal(&s).unwrap_or_default()))
                    }
                    Err(s) if is_unreachable(&s) => {
                        // The broker may have read it before it stopped
                        // answering: once it is back, a lease it granted
                        // nobody holds is released by the Acquire's key.
                        if may_have_reached_a_broker(&s) && !req.idempotency_key.is_empty() {
                            self.kept().keep_release(ReleaseRequest {
                                tenant: req.tenant,
                                acquire_key: req.idempotency_key,
                                ..Default::default()
                            });
                        }
                        self.fallback().broker_unreachable(&s)
                    }
                    Err(s) => return Err(s.into()),
                }
            }
            // Armed before the count is read, so a lease ending in between
            // is not missed.
            let freed = self.inner.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let cap = self.fallback().max_in_flight();
            let counted = match cap {
                None => None,
                Some(cap) => match Counted::take(&self.inner, cap) {
                    Some(c) => Some(c),
                    None => {
                        let probe_every = self.fallback().probe_every();
                        let most = call.max_wait.unwrap_or(FALLBACK_MAX_WAIT);
                        let left = most.saturating_sub(started.elapsed());
                        if left.is_zero() {
                            return Err(ClientError::NotGranted {
                                reason: format!(
                                    "quota broker unreachable: local fallback limit of {cap} \
                                     at once (half the slots this client held)"
                                ),
                                retry_after: probe_every,
                            });
                        }
                        let nap = probe_every.min(left);
                        // Until a lease ends, or the next probe is due.
                        let _ = tokio::time::timeout(nap, freed).await;
                        continue;
                    }
                },
            };
            let take = self.fallback().try_take();
            match take {
                Take::Taken => return Ok(Lease::local(self.clone(), call.clone(), counted)),
                // Waiting for the local limiter, the broker is probed again
                // meanwhile; once it answers, waiting calls ask it instead
                // of going out unleased all at once.
                Take::Wait {
                    permit_in,
                    nap,
                    retry_after,
                } => {
                    // Told "not now" at once, as the broker would, not held
                    // past the wait.
                    let most = call.max_wait.unwrap_or(FALLBACK_MAX_WAIT);
                    if started.elapsed() + permit_in > most {
                        return Err(ClientError::NotGranted {
                            reason: format!(
                                "quota broker unreachable: local fallback limit of {}/min",
                                self.fallback().per_min()
                            ),
                            // The broker may answer at the next probe (a
                            // hand-over takes well under a second): not the
                            // local permit's 10 s at 6 a minute.
                            retry_after,
                        });
                    }
                    tokio::time::sleep(nap).await
                }
                Take::BrokerBack => {}
            }
        }
    }

    /// Checks that the broker serves `tenant` to this client, as a service
    /// does at start so that a wrong token or tenant stops it there rather
    /// than failing every call later: `Ok(true)` it does; `Ok(false)` not
    /// checked: no broker answered within `within`, asked every 250 ms
    /// meanwhile (calls would use the fallback rate until one does), or,
    /// at once, one answered that this caller is over its limits
    /// (RESOURCE_EXHAUSTED: its request rate or Watch cap; calls are
    /// answered `Overloaded`, not sent to the fallback); an error is the
    /// broker's refusal (an unknown tenant, a token it does not know or
    /// not scoped to the tenant).
    /// Reads the snapshot of a Watch of the tenant (following a cluster to
    /// its leader): nothing is granted, reported or counted.
    pub async fn check(&self, tenant: &str, within: Duration) -> Result<bool, ClientError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let watch = self.rpc(|mut c| {
                let req = self.request(WatchRequest {
                    tenant: tenant.to_owned(),
                });
                async move {
                    let mut stream = c.watch(req).await?.into_inner();
                    stream.message().await.map(tonic::Response::new)
                }
            });
            let s = match tokio::time::timeout_at(deadline, watch).await {
                Ok(Ok(_)) => return Ok(true),
                Ok(Err(e)) => e.status()?,
                Err(_) => return Ok(false),
            };
            if let Some(why) = tls_refusal(&s) {
                return Err(ClientError::Tls(why));
            }
            // Over its limits: a broker that answers, and would be asked
            // again against its retry-after-ms (the Watch cap's is a
            // second). Not a refusal of the token or tenant either (an
            // unknown token is limited by its address before it is
            // refused): not checked.
            if s.code() == tonic::Code::ResourceExhausted {
                return Ok(false);
            }
            if !is_unreachable(&s) {
                return Err(s.into());
            }
            // Not answering yet (a broker starting beside this service, a
            // cluster electing a leader): asked again until `within` ends,
            // not taken for a broker that is away after one try.
            let pause = CHECK_AGAIN_AFTER
                .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            if pause.is_zero() {
                return Ok(false);
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Reports an upstream outcome for `call` (outside any lease).
    pub async fn report(
        &self,
        call: &Call,
        lease_id: &str,
        status: u16,
        headers: &http::HeaderMap,
    ) -> Result<(), ClientError> {
        self.report_outcome(call, lease_id, status, headers, false)
            .await
    }

    /// [`BrokerClient::report`], saying whether a 429 was about requests
    /// in flight rather than rate (see [`says_concurrency`]): the broker
    /// then lowers the call's learned concurrency limit instead of its rate.
    pub async fn report_outcome(
        &self,
        call: &Call,
        lease_id: &str,
        status: u16,
        headers: &http::HeaderMap,
        concurrency_limited: bool,
    ) -> Result<(), ClientError> {
        let held = if status == 429 {
            headers.get(http::header::RETRY_AFTER).and_then(retry_after)
        } else {
            None
        };
        let headers = headers
            .iter()
            .filter(|(k, _)| REPORTED_HEADERS.contains(&k.as_str()))
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let req = ReportRequest {
            tenant: call.tenant.clone(),
            lease_id: lease_id.to_owned(),
            method: call.method.clone(),
            path: call.path.clone(),
            oauth_client: call.oauth_client.clone(),
            http_status: u32::from(status),
            retry_after_ms: 0,
            headers,
            concurrency_limited: concurrency_limited && status == 429,
            // Kept with the report: sent again after no answer, it counts
            // once even if the broker received the first.
            idempotency_key: new_key(),
        };
        // Falling back: kept for when the broker is back, without waiting
        // on it (it is probed in the background); the upstream's
        // Retry-After holds the local limiter too.
        // (The route read first: the fallback's lock is not held below.)
        let route = self.fallback().route();
        if let Route::Local { probe } = route {
            if probe {
                self.probe_in_background();
            }
            if let Some(wait) = held {
                self.fallback().throttled(wait);
            }
            self.kept().keep(req);
            return Ok(());
        }
        let answer = self
            .rpc(|mut c| {
                let req = self.request(req.clone());
                async move { c.report(req).await }
            })
            .await;
        // Not a broker: an error, the report not kept for it.
        let answer = match answer {
            Ok(r) => Ok(r),
            Err(e) => Err(e.status()?),
        };
        match answer {
            Ok(_) => Ok(()),
            Err(s) if tls_refusal(&s).is_some() => {
                Err(ClientError::Tls(tls_refusal(&s).unwrap_or_default()))
            }
            // The broker is away: it hears of this once it is back, and
            // the fallback the next call enters keeps to the Retry-After.
            Err(s) if is_unreachable(&s) => {
                if let Some(wait) = held {
                    self.fallback().throttled(wait);
                }
                self.kept().keep(req);
                Ok(())
            }
            Err(s) => Err(s.into()),
        }
    }

    /// Waits until the releases of dropped leases have reached the broker
    /// (or failed), at most `within`; returns how many are still on their
    /// way. A process about to exit calls it so that the slots its leases
    /// held come back now, not at their expiry.
    pub async fn settle(&self, within: Duration) -> usize {
        use std::sync::atomic::Ordering::Acquire;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let released = self.inner.released.notified();
            tokio::pin!(released);
            // Registered before the count is read: a release ending in
            // between still wakes it.
            released.as_mut().enable();
            let left = self.inner.releasing.load(Acquire);
            if left == 0 || tokio::time::Instant::now() >= deadline {
                return left;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return self.inner.releasing.load(Acquire);
            }
        }
    }

    /// Sends the outcomes kept while the broker was unreachable, oldest
    /// first; returns how many were sent. Stops (keeping the rest) when the
    /// broker is unreachable again. The client also does this by itself,
    /// in the background, when the broker answers again.
    pub async fn flush_reports(&self) -> usize {
        loop {
            let next = self.kept().next_release();
            let Some(req) = next else {
                break;
            };
            let reached = AtomicBool::new(false);
            match self.send_release_adopting(&req, &reached).await {
                // Away again, or over this caller's request rate: later.
                Err(RpcError::Status(s))
                    if is_unreachable(&s) || s.code() == tonic::Code::ResourceExhausted =>
                {
                    if may_have_reached_a_broker(&s) {
                        reached.store(true, Ordering::Release);
                    }
                    self.kept()
                        .put_back_release(without_adoption(req, &reached));
                    return 0;
                }
                Err(s) => tracing::debug!(error = %s, "a kept release was refused"),
                Ok(_) => {}
            }
        }
        let mut sent = 0;
        loop {
            let Some(report) = self.kept().next() else {
                return sent;
            };
            let answer = self
                .rpc(|mut c| {
                    let req = self.request(report.clone());
                    async move { c.report(req).await }
                })
                .await;
            match answer {
                Ok(_) => sent += 1,
                Err(RpcError::Status(s)) if is_unreachable(&s) => {
                    self.kept().put_back(report);
                    return sent;
                }
                // Refused for good (e.g. a bucket no longer configured).
                Err(s) => tracing::debug!(error = %s, "a kept report was refused; dropped"),
            }
        }
    }

    /// Probes the broker (one probe at a time) while falling back; when a
    /// broker answers, calls go to it again and what was kept is sent. The
    /// probe is a Release of no lease: any answer but "unreachable" says a
    /// broker is back, and it changes nothing there.
    fn probe_in_background(&self) {
        if self.inner.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let client = self.clone();
        tokio::spawn(async move {
            let answer = client.send_release(&ReleaseRequest::default()).await;
            client.inner.probing.store(false, Ordering::Release);
            // A handshake that cannot succeed (a certificate rotated to one
            // this client does not trust), or a server that is not a
            // broker, counts as an answer: the next call says so instead of
            // running on the fallback rate for good.
            let away = matches!(&answer,
                Err(RpcError::Status(s)) if is_unreachable(s) && tls_refusal(s).is_none());
            if !away {
                client.fallback().broker_answered();
                client.send_kept_in_background();
            }
        });
    }

    fn send_kept_in_background(&self) {
        if self.kept().is_empty() {
            return;
        }
        let client = self.clone();
        // Ends by itself once the kept reports are sent or the broker is
        // away again.
        tokio::spawn(async move {
            let sent = client.flush_reports().await;
            if sent > 0 {
                tracing::info!(sent, "outcomes kept during the broker's absence reported");
            }
        });
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.inner
            .kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `req`. One carrying the Acquire that granted its lease goes
    /// without it first, and with it only if a broker answered that it
    /// does not know the lease (it restarted after a crash, or leads since
    /// a failover) and no attempt may have been processed before: adopted
    /// and released on a release some broker already processed (its answer
    /// lost), it would free a slot since granted to someone else.
    async fn send_release_adopting(
        &self,
        req: &ReleaseRequest,
        reached: &AtomicBool,
    ) -> Result<ReleaseResponse, RpcError> {
        let bare = ReleaseRequest {
            acquired_with: None,
            ..req.clone()
        };
        let answer = self
            .rpc_noting(reached, |mut c| {
                let req = self.request(bare.clone());
                async move { c.release(req).await }
            })
            .await?;
        if answer.released || req.acquired_with.is_none() || reached.load(Ordering::Acquire) {
            return Ok(answer);
        }
        self.rpc_noting(reached, |mut c| {
            let req = self.request(req.clone());
            async move { c.release(req).await }
        })
        .await
    }

    async fn send_release(&self, req: &ReleaseRequest) -> Result<ReleaseResponse, RpcError> {
        self.rpc(|mut c| {
            let req = self.request(req.clone());
            async move { c.release(req).await }
        })
        .await
    }

    /// Sends `req` in a task of its own, counted for [`BrokerClient::settle`].
    /// Outside a runtime nothing is sent: the slot comes back at its expiry.
    fn release_in_background(&self, req: ReleaseRequest) {
        use std::sync::atomic::Ordering::AcqRel;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.inner.releasing.fetch_add(1, AcqRel);
            let counted = Releasing(self.inner.clone());
            let client = self.clone();
            rt.spawn(async move {
                let _counted = counted;
                client.release_or_keep(req).await;
            });
        } else {
            static SAID: AtomicBool = AtomicBool::new(false);
            if !SAID.swap(true, Ordering::Relaxed) {
                tracing::warn!(lease = %req.lease_id,
                    "a lease dropped outside a Tokio runtime cannot be released: its slot comes \
                     back at the lease's expiry (release leases before the runtime ends; said once)");
            }
        }
    }

    async fn release_or_keep(&self, req: ReleaseRequest) {
        let reached = AtomicBool::new(false);
        match self.send_release_adopting(&req, &reached).await {
            // Away (restarting, a cluster between leaders): sent once a
            // broker answers again, so a next leader that took the lease
            // over frees its slot then rather than at its expiry.
            Err(RpcError::Status(e)) if is_unreachable(&e) => {
                tracing::debug!(error = %e, "release failed; kept for when the broker answers");
                if may_have_reached_a_broker(&e) {
                    reached.store(true, Ordering::Release);
                }
                self.kept().keep_release(without_adoption(req, &reached));
            }
            Err(e) => {
                tracing::debug!(error = %e, "release refused; the slot comes back at its expiry")
            }
            Ok(_) => {}
        }
    }

    async fn renew(
        &self,
        lease_id: String,
        acquired_with: AcquireRequest,
    ) -> Result<Duration, RpcError> {
        let req = RenewRequest {
            lease_id,
            extend_ms: 0,
            acquired_with: Some(acquired_with),
        };
        self.rpc(|mut c| {
            let req = self.request(req.clone());
            async move { c.renew(req).await }
        })
        .await
        .map(|r| Duration::from_millis(r.lease_ttl_ms))
    }
}

/// `req` as kept for later: without the Acquire that granted its lease if
/// an attempt may have been processed already (see
/// [`BrokerClient::send_release_adopting`]).
fn without_adoption(mut req: ReleaseRequest, reached: &AtomicBool) -> ReleaseRequest {
    if reached.load(Ordering::Acquire) {
        req.acquired_with = None;
    }
    req
}

/// Whether the client may go from broker `from` to `to` (a leader hint or
/// the next configured URL): never from TLS to plaintext.
fn may_follow(from: &str, to: &str) -> bool {
    let https = |u: &str| {
        u.get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
    };
    !https(from) || https(to)
}

/// A random idempotency key for an Acquire or a Report: 128 bits from the
/// OS (unguessable: it names a lease to release). Should the OS refuse,
/// none: the broker then counts a Report sent again twice, and a lease
/// granted to an unanswered Acquire holds its slots until its expiry.
fn new_key() -> String {
    let mut bytes = [0u8; 16];
    match getrandom::fill(&mut bytes) {
        Ok(()) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        Err(_) => String::new(),
    }
}

/// Quiet time on a connection with calls open before the client pings
/// the broker.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// How long a ping may go unanswered before the connection (and its open
/// calls) is given up: a hung broker is noticed within about 5 s.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// A lazily connected client for the broker at `url`.
fn channel(url: &str, tls: Option<&ClientTls>) -> Result<QuotaBrokerClient<Channel>, ClientError> {
    let bad_url = |message: String| ClientError::Url {
        url: address::shown(url),
        message,
    };
    // The keep-alive is what notices a broker whose host hangs or was cut
    // off (connections open, nothing answered): without it a call on an
    // established connection waits forever, neither moving to the next
    // broker nor falling back. Pings only while calls are open.
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| bad_url(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    // Checked here, not at the first call: a URL that cannot be dialled
    // would otherwise read as a broker that is down, and every call would
    // quietly run on the fallback rate.
    let dialable = matches!(endpoint.uri().scheme_str(), Some("http" | "https"))
        && endpoint.uri().host().is_some_and(|h| !h.is_empty());
    if !dialable {
        return Err(bad_url(
            "expected http://host:port or https://host:port".into(),
        ));
    }
    let https = endpoint.uri().scheme_str() == Some("https");
    let endpoint = match (https, tls) {
        (true, tls) => endpoint
            .tls_config(tls.cloned().unwrap_or_default().into_tonic())
            .map_err(|e| ClientError::Tls(error_chain(&e)))?,
        (false, Some(_)) => {
            return Err(bad_url(
                "TLS settings were given for a plaintext URL; use https://".into(),
            ))
        }
        (false, None) => endpoint,
    };
    // Through a connector of our own: tonic's `connect_lazy` bounds only
    // the TCP connect by `connect_timeout`, so a broker whose host hangs
    // (its kernel still completes TCP handshakes) held every new TLS
    // connection in its handshake for ever, before any keep-alive could
    // start: calls never moved to the next broker nor fell back. With a
    // connector given, tonic bounds the whole connect, TLS included.
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
    Ok(QuotaBrokerClient::new(
        endpoint.connect_with_connector_lazy(tcp),
    ))
}

/// The pause between two tries of [`BrokerClient::check`].
const CHECK_AGAIN_AFTER: Duration = Duration::from_millis(250);

/// How long connecting to a broker (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How an RPC failed.
#[derive(Debug)]
enum RpcError {
    /// The broker's answer, or a transport failure, as tonic gives it.
    Status(tonic::Status),
    /// The server at the URL is not a quota-broker's gRPC port
    /// ([`ClientError::NotABroker`]).
    NotABroker(ClientError),
}

impl RpcError {
    /// The status, for the caller to read; a server that is not a broker
    /// as the caller's error.
    fn status(self) -> Result<tonic::Status, ClientError> {
        match self {
            RpcError::Status(s) => Ok(s),
            RpcError::NotABroker(e) => Err(e),
        }
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RpcError::Status(s) => write!(f, "{s}"),
            RpcError::NotABroker(e) => write!(f, "{e}"),
        }
    }
}

/// The broker did not answer (down, restarting, network, or it closed the
/// connection before serving it): fall back. A status made locally from a
/// transport failure carries its source; the broker's own answers do not.
fn is_unreachable(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable
        || std::error::Error::source(s).is_some()
        || address::from_a_proxy_404(s)
}

/// A TLS handshake that failed in a way that does not mend by itself,
/// said with what to do: a broker certificate this client does not trust,
/// a certificate of its own the broker refused, or no TLS on the port.
/// Not a broker that is away: calls fail with it instead of falling back,
/// as they do on a token the broker refuses. (A refusal of the client's
/// certificate under TLS 1.3 can also arrive as a bare closed connection,
/// which cannot be told from a broker going down: that one falls back.)
fn tls_refusal(s: &tonic::Status) -> Option<String> {
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

/// A Retry-After value (delta seconds or an HTTP-date) as a wait from now,
/// at most 15 minutes (as the broker caps a freeze).
fn retry_after(value: &http::HeaderValue) -> Option<Duration> {
    const MOST: Duration = Duration::from_secs(15 * 60);
    let text = value.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<f64>() {
        return (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs.min(900.0)));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    let wait = at.duration_since(std::time::SystemTime::now()).ok()?;
    Some(wait.min(MOST))
}

/// Whether a call that failed on the transport may have been read by a
/// broker (the connection broke or went unanswered), rather than failing to
/// connect at all.
fn may_have_reached_a_broker(s: &tonic::Status) -> bool {
    let Some(source) = std::error::Error::source(s) else {
        return false;
    };
    let chain = error_chain(source);
    !(chain.contains("tcp connect error") || chain.contains("Connection refused"))
}

/// An error and its causes on one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// Whether a renewal refused with `code` may pass if tried again: the
/// broker was unreachable, overloaded or busy, not "no such lease" or a
/// refusal of the caller.
fn renewal_may_pass_later(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unavailable
            | ResourceExhausted
            | DeadlineExceeded
            | Aborted
            | Internal
            | Unknown
            | Cancelled
    )
}

/// Whether a 429's body says the refusal is about concurrent requests
/// (Genesys Cloud and most APIs word it "concurrent" / "concurrency"), so
/// it can be reported with [`Lease::report_concurrency_429`].
pub fn says_concurrency(body: &[u8]) -> bool {
    const WORD: &[u8] = b"concurren";
    body.windows(WORD.len())
        .any(|w| w.eq_ignore_ascii_case(WORD))
}

/// Renews lease `id` at half its TTL for as long as it is held. A renewal
/// that fails for a while (broker restarting, overloaded, leader moving) is
/// tried again every eighth of the TTL, also past the lease's expiry: the
/// call still runs, so its slot is still in use upstream, and a restarted
/// broker or a cluster's next leader adopts a lease renewed within one TTL
/// of its start (`RenewRequest.acquired_with`), which an election longer
/// than a short TTL would otherwise miss. It stops when the broker says the
/// lease holds no slot or the caller may not renew it.
async fn renew_while_held(client: BrokerClient, id: String, acquired: AcquireRequest, ttl_ms: u64) {
    let mut ttl = Duration::from_millis(ttl_ms);
    let mut expires = tokio::time::Instant::now() + ttl;
    let mut wait = ttl / 2;
    let mut failing = false;
    let mut past_expiry = false;
    loop {
        tokio::time::sleep(wait).await;
        match client.renew(id.clone(), acquired.clone()).await {
            Ok(t) if !t.is_zero() => {
                if past_expiry {
                    tracing::info!(lease = %id, "lease renewed again after its expiry: the broker kept or adopted it");
                }
                (ttl, wait, failing, past_expiry) = (t, t / 2, false, false);
                expires = tokio::time::Instant::now() + t;
            }
            // The lease holds no slot any more.
            Ok(_) => return,
            Err(RpcError::Status(s)) if !renewal_may_pass_later(s.code()) => {
                tracing::warn!(lease = %id, error = %s, "lease can no longer be renewed");
                return;
            }
            Err(e @ RpcError::NotABroker(_)) => {
                tracing::warn!(lease = %id, error = %e, "lease can no longer be renewed");
                return;
            }
            Err(s) => {
                let left = expires.saturating_duration_since(tokio::time::Instant::now());
                if !failing {
                    tracing::warn!(lease = %id, error = %s, "lease renewal failed; trying again");
                } else if left.is_zero() && !past_expiry {
                    tracing::warn!(lease = %id, error = %s,
                        "lease passed its expiry while renewals failed; renewing on while it is held");
                } else {
                    tracing::debug!(lease = %id, error = %s, "lease renewal failed");
                }
                failing = true;
                past_expiry |= left.is_zero();
                wait = (ttl / 8).max(Duration::from_millis(100));
                if !left.is_zero() {
                    wait = wait.min(left);
                }
            }
        }
    }
}

/// Permission for one upstream call. Holds its concurrency slot, renewing it
/// in the background, until dropped. Dropped, it releases the slot in a task
/// of the Tokio runtime it is dropped in; dropped outside one (after the
/// runtime shut down, e.g. held past the end of `#[tokio::main]`), nothing
/// can be sent and the slot comes back only at its lease's expiry (logged
/// once): release leases before the runtime ends, or call
/// [`Lease::release`].
pub struct Lease {
    client: BrokerClient,
    call: Call,
    id: String,
    renewer: Option<tokio::task::JoinHandle<()>>,
    holds_slot: bool,
    /// The buckets the broker granted it on (none for a fallback lease).
    buckets: Vec<String>,
    /// Its slots' time to live as granted (zero: it holds none).
    ttl: Duration,
    /// Counted against the fallback's cap on calls in flight while held.
    counted: Option<Counted>,
}

/// One lease counted in `Inner::in_flight` until dropped.
struct Counted(Arc<Inner>);

impl Counted {
    /// Counts one more, unless `cap` are counted already.
    fn take(inner: &Arc<Inner>, cap: usize) -> Option<Counted> {
        inner
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| Counted(inner.clone()))
    }

    /// Counts one more.
    fn add(inner: &Arc<Inner>) -> Counted {
        inner.in_flight.fetch_add(1, Ordering::AcqRel);
        Counted(inner.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_waiters();
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.id)
            .field("fallback", &self.is_fallback())
            .field("holds_slot", &self.holds_slot)
            .field("call", &self.call)
            .finish_non_exhaustive()
    }
}

impl Lease {
    fn new(client: BrokerClient, call: Call, id: String, ttl_ms: u64) -> Lease {
        let holds_slot = ttl_ms > 0;
        let counted = holds_slot.then(|| Counted::add(&client.inner));
        let renewer = holds_slot.then(|| {
            let (client, id, acquired) = (client.clone(), id.clone(), call.acquire_request());
            tokio::spawn(renew_while_held(client, id, acquired, ttl_ms))
        });
        Lease {
            client,
            call,
            id,
            renewer,
            holds_slot,
            buckets: Vec::new(),
            ttl: Duration::from_millis(ttl_ms),
            counted,
        }
    }

    fn with_buckets(mut self, buckets: Vec<String>) -> Lease {
        self.buckets = buckets;
        self
    }

    /// The buckets the broker granted this lease on (none for a fallback
    /// lease).
    pub fn buckets(&self) -> &[String] {
        &self.buckets
    }

    /// How long its slots are held without a renewal, as granted (renewed
    /// in the background at half of it while the lease is held); zero for a
    /// lease that holds no slot.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn local(client: BrokerClient, call: Call, counted: Option<Counted>) -> Lease {
        Lease {
            client,
            call,
            id: String::new(),
            renewer: None,
            holds_slot: false,
            buckets: Vec::new(),
            ttl: Duration::ZERO,
            counted,
        }
    }

    /// This lease's release, with the Acquire that granted it: a broker
    /// that restarted after a crash (or a cluster's next leader) never
    /// knew the lease, and frees its slot at once only if told that.
    fn release_request(&mut self) -> ReleaseRequest {
        let mut acquired_with = self.call.acquire_request();
        acquired_with.idempotency_key.clear();
        ReleaseRequest {
            lease_id: std::mem::take(&mut self.id),
            acquired_with: Some(acquired_with),
            ..Default::default()
        }
    }

    fn stop_renewing(&mut self) {
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
    }

    /// The broker's lease id ("" for a fallback lease).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether this lease came from the local fallback limiter.
    pub fn is_fallback(&self) -> bool {
        self.id.is_empty()
    }

    /// Reports how the upstream call went: its status and the rate-limit
    /// headers of its response.
    pub async fn report(&self, status: u16, headers: &http::HeaderMap) -> Result<(), ClientError> {
        self.client
            .report(&self.call, &self.id, status, headers)
            .await
    }

    /// Releases the slot now and waits for the broker to confirm (dropping
    /// the lease releases in the background instead, which a process that
    /// exits right after may not get to send).
    pub async fn release(mut self) {
        self.stop_renewing();
        if std::mem::take(&mut self.holds_slot) {
            let req = self.release_request();
            self.client.release_or_keep(req).await;
        }
    }

    /// Reports a 429 whose body says it is about requests in flight (see
    /// [`says_concurrency`]), with its headers.
    pub async fn report_concurrency_429(
        &self,
        headers: &http::HeaderMap,
    ) -> Result<(), ClientError> {
        self.client
            .report_outcome(&self.call, &self.id, 429, headers, true)
            .await
    }

    /// [`Lease::report`] for an `http::Response`.
    pub async fn report_response<B>(
        &self,
        response: &http::Response<B>,
    ) -> Result<(), ClientError> {
        self.report(response.status().as_u16(), response.headers())
            .await
    }
}

/// A release of a dropped lease on its way: uncounted when it ends, also
/// if its task is cancelled or panics (see [`BrokerClient::settle`]).
struct Releasing(Arc<Inner>);

impl Drop for Releasing {
    fn drop(&mut self) {
        if self
            .0
            .releasing
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.released.notify_waiters();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop_renewing();
        if self.holds_slot {
            let req = self.release_request();
            self.client.release_in_background(req);
        }
    }
}

/// An Acquire sent and not answered yet. Dropped so (the caller's own
/// timeout, a task aborted at a signal), a lease the broker granted it as
/// the caller went away would hold its slots to its expiry with nobody
/// holding it: it is released by the Acquire's idempotency key, as a
/// dropped lease is by its id (a waiting Acquire the broker still had
/// queued leaves the queue by itself; the release then finds nothing).
struct Unanswered<'a> {
    client: &'a BrokerClient,
    release: Option<ReleaseRequest>,
}

impl<'a> Unanswered<'a> {
    fn of(client: &'a BrokerClient, req: &AcquireRequest) -> Unanswered<'a> {
        let release = (!req.idempotency_key.is_empty()).then(|| ReleaseRequest {
            tenant: req.tenant.clone(),
            acquire_key: req.idempotency_key.clone(),
            ..Default::default()
        });
        Unanswered { client, release }
    }

    fn answered(mut self) {
        self.release = None;
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some(req) = self.release.take() {
            self.client.release_in_background(req);
        }
    }
}

#[cfg(test)]
mod body_tests {
    use super::says_concurrency;

    #[test]
    fn a_concurrency_refusal_is_recognised_by_its_wording() {
        assert!(says_concurrency(
            b"{\"message\":\"Rate limit exceeded the maximum. [concurrency:analytics]\"}"
        ));
        assert!(says_concurrency(b"Too many CONCURRENT requests"));
        assert!(!says_concurrency(
            b"Rate limit exceeded the maximum. [family:analytics]"
        ));
        assert!(!says_concurrency(b""));
    }

    #[test]
    fn a_leader_hint_never_leads_from_tls_to_plaintext() {
        use super::may_follow;
        assert!(may_follow("https://a:7443", "https://b:7443"));
        assert!(may_follow("HTTPS://a:7443", "https://b:7443"));
        assert!(may_follow("http://a:7070", "http://b:7070"));
        assert!(may_follow("http://a:7070", "https://b:7443"));
        assert!(!may_follow("https://a:7443", "http://b:7070"));
        assert!(!may_follow("https://a:7443", "b:7070"));
    }
}
