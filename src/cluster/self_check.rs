//! Whether `cluster.advertise` reaches this broker: every member sends the
//! callers of the tenants this broker leads to that URL, so a wrong one (a
//! port typed wrong, the HTTP port, a host callers cannot reach) leaves
//! those tenants unserved while every probe says ready.
//!
//! Once the broker has joined, it dials its own advertised URL as a client
//! would and asks grpc.health.v1 for `quota.v1.QuotaBroker`, all within
//! [`BOUND`], again every [`EVERY`] until an answer is SERVING once (a
//! port behind a proxy may come up late). A failure is logged at ERROR,
//! naming `cluster.advertise`, the URL and what the dial got, then again
//! at most once a minute, and `/readyz` says it after "ready" until a
//! check passes. Still 200, not 503: gRPC health says what `/readyz`
//! says, and NOT_SERVING would turn away every client that reaches this
//! broker by its own list of URLs (it serves them well; only callers
//! redirected here miss it), and would keep the check itself from ever
//! passing: a port that comes up late would then answer with this
//! broker's NOT_SERVING, which cannot be told from another broker's (nor
//! could a load balancer or a Kubernetes Service that routes only to
//! ready brokers ever route to it). Leading is not affected, and the
//! broker never exits over it.
//!
//! Each broker's server answers SERVING for a health name of its own,
//! drawn at start (`quota-broker.instance.` and 16 hex digits, see
//! `Broker::instance_name`), whatever its readiness: the check asks for
//! that name, so a *different* quota-broker at the URL (a port of another
//! broker typed, a proxy sending the calls elsewhere) is told apart and
//! said ("another quota-broker answers there"). Two members advertising one
//! URL are also named by [`Node::warn_of_shared_urls`](super::Node).

use crate::broker::Broker;
use crate::clock::millis;
use crate::error::clip;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_rustls::rustls;
use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::connect::{ConnectFailed, Connector};

/// Bound on one check: the connection (TCP, TLS, HTTP/2's start) and the
/// health call together.
pub(super) const BOUND: Duration = Duration::from_secs(2);
/// A check that failed is made again this long after the last one began.
const EVERY: Duration = Duration::from_secs(2);
/// A failure is logged again at most this often (with how many since).
const LOG_EVERY: Duration = Duration::from_secs(60);
/// A broker at the URL that answers NOT_SERVING may be this one (health
/// says NOT_SERVING until it is in the cluster): said only once it lasts
/// this long while this broker serves.
const NOT_SERVING_GRACE: Duration = Duration::from_secs(30);

/// What one check found.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// A quota-broker answered SERVING.
    Serving,
    /// A TLS port that asks for a client certificate, which this broker
    /// has none of to present: as far as it can be checked.
    WantsClientCertificate,
    /// A broker answered NOT_SERVING: starting or stopping (perhaps this
    /// one, before its start is done).
    NotServing,
    /// Nothing that serves the broker's calls answered; what the dial got.
    Unreachable(String),
}

/// Checks `cluster.advertise` (`advertise`) until it answers once; ends at
/// the broker's shutdown.
pub(super) async fn run(broker: Broker, advertise: String) {
    let shutdown = broker.shutdown_token().clone();
    // TLS by the URL's scheme, not by `[server.tls]`: an `https://` URL
    // may be a proxy's that ends TLS in front of a plaintext broker.
    let https = advertise
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    let connector = match https.then(client_config).transpose() {
        Ok(config) => Connector::new(config, BOUND),
        Err(e) => {
            tracing::warn!(error = %e, "cannot check cluster.advertise: no TLS client to dial it with");
            return;
        }
    };
    let url = clip(&advertise);
    let mut failing: Option<Failing> = None;
    loop {
        let began = Instant::now();
        let found = tokio::select! {
            found = check(&advertise, connector.clone(), broker.instance_name()) => found,
            () = shutdown.cancelled() => return,
        };
        match found {
            Found::Serving | Found::WantsClientCertificate => {
                broker.set_advertise_trouble(None);
                let how = if found == Found::Serving {
                    "a health check of quota.v1.QuotaBroker there answers SERVING"
                } else {
                    // Mutual TLS: the port asks for a client certificate
                    // (server.tls.client_ca), which this broker has none of
                    // to present; a TLS port that asks for one is as far as
                    // it can check.
                    "its TLS port asks for a client certificate (server.tls.client_ca): \
                     checked that far"
                };
                match failing {
                    Some(f) if f.said.is_some() => tracing::info!(
                        advertise = %url, failed_checks = f.count,
                        "cluster.advertise reaches this broker now: {how}"
                    ),
                    _ => {
                        tracing::info!(advertise = %url, "cluster.advertise reaches a broker: {how}")
                    }
                }
                return;
            }
            Found::NotServing => {
                let f = failing.get_or_insert_with(Failing::new);
                f.count += 1;
                if broker.not_ready().is_some() {
                    // This broker says NOT_SERVING itself (not in the
                    // cluster): the answer may well be its own.
                    f.since = Instant::now();
                }
                if f.since.elapsed() >= NOT_SERVING_GRACE && f.due() {
                    tracing::warn!(advertise = %url, failed_checks = f.count,
                        "cluster.advertise answers NOT_SERVING (a broker starting or stopping, \
                         and not this one, which serves): callers redirected here may reach \
                         another broker; set cluster.advertise to the URL clients reach this \
                         broker at (checked every 2 s; said again at most once a minute)");
                }
            }
            Found::Unreachable(what) => {
                let f = failing.get_or_insert_with(Failing::new);
                f.count += 1;
                let why = format!(
                    "cluster.advertise {url} does not reach this broker ({what}): callers \
                     redirected here cannot reach it"
                );
                broker.set_advertise_trouble(Some(why.clone()));
                if f.due() {
                    tracing::error!(advertise = %url, got = %what, failed_checks = f.count,
                        "{why}: every member sends the callers of the tenants this broker leads \
                         there; set cluster.advertise to the URL clients reach this broker at \
                         (checked every 2 s until it answers; said again at most once a minute)");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep_until(began + EVERY) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Checks that keep failing: since when, how many, when last said.
struct Failing {
    since: Instant,
    count: u32,
    said: Option<Instant>,
}

impl Failing {
    fn new() -> Failing {
        Failing {
            since: Instant::now(),
            count: 0,
            said: None,
        }
    }

    /// Whether to say it now (then not again for [`LOG_EVERY`]).
    fn due(&mut self) -> bool {
        let due = self.said.is_none_or(|at| at.elapsed() >= LOG_EVERY);
        if due {
            self.said = Some(Instant::now());
        }
        due
    }
}

/// One check of `advertise`, within [`BOUND`]; `instance`: the health
/// name only this broker answers for (`None`: not registered yet, then any
/// quota-broker's SERVING counts).
async fn check(advertise: &str, connector: Connector, instance: Option<&str>) -> Found {
    match tokio::time::timeout(BOUND, ask(advertise, connector, instance)).await {
        Ok(found) => found,
        Err(_) => Found::Unreachable(format!("no answer within {} ms", millis(BOUND))),
    }
}

async fn ask(advertise: &str, connector: Connector, instance: Option<&str>) -> Found {
    let endpoint = match Endpoint::from_shared(advertise.to_owned()) {
        Ok(e) => e,
        Err(e) => return Found::Unreachable(format!("not a URL: {e}")),
    };
    // TLS is the connector's: tonic is given the URL as `http://` and the
    // real one as the requests' origin (as for etcd, `Etcd::connect`).
    let endpoint = match endpoint.uri().scheme_str() {
        Some("https") => {
            let authority = endpoint.uri().authority().map(|a| a.as_str());
            match Endpoint::from_shared(format!("http://{}", authority.unwrap_or_default())) {
                Ok(plain) => plain.origin(endpoint.uri().clone()),
                Err(e) => return Found::Unreachable(format!("not a URL: {e}")),
            }
        }
        _ => endpoint,
    };
    let channel = match endpoint.connect_with_connector(connector).await {
        Ok(c) => c,
        Err(e) => return failed(&e),
    };
    let mut health = HealthClient::new(channel);
    if let Some(instance) = instance {
        let mine = health
            .check(HealthCheckRequest {
                service: instance.to_owned(),
            })
            .await;
        match mine {
            Ok(answer) if answer.get_ref().status() == ServingStatus::Serving => {
                return Found::Serving
            }
            // Not this broker: which server it is, below.
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return answered(s),
        }
    }
    let asked = health
        .check(HealthCheckRequest {
            service: crate::pb::quota_broker_server::SERVICE_NAME.to_owned(),
        })
        .await;
    match asked {
        // Another quota-broker (its health does not know this broker's
        // name): callers redirected here reach it, not this one.
        Ok(_) if instance.is_some() => Found::Unreachable(
            "another quota-broker answers there, not this one (another process, or this \
             one behind a proxy that sends the call elsewhere)"
                .to_owned(),
        ),
        Ok(answer) => match answer.into_inner().status() {
            ServingStatus::Serving => Found::Serving,
            ServingStatus::NotServing => Found::NotServing,
            other => Found::Unreachable(format!(
                "its health check of quota.v1.QuotaBroker answers {}",
                other.as_str_name()
            )),
        },
        Err(s) => answered(s),
    }
}

/// What a health check that failed with `s` says of the server.
fn answered(s: tonic::Status) -> Found {
    match s.code() {
        tonic::Code::NotFound => Found::Unreachable(
            "a gRPC server that serves no quota.v1.QuotaBroker: not a quota-broker".to_owned(),
        ),
        tonic::Code::Unimplemented => Found::Unreachable(
            "a gRPC server without grpc.health.v1: not a quota-broker's gRPC port".to_owned(),
        ),
        _ if std::error::Error::source(&s).is_some() => failed(&s),
        code => Found::Unreachable(format!(
            "its health check answers {code:?}: {}",
            crate::error::cut(s.message(), 200)
        )),
    }
}

/// What a dial that failed with `e` got: its causes, or that the TLS port
/// asks for a client certificate.
fn failed(e: &(dyn std::error::Error + 'static)) -> Found {
    let mut text = String::new();
    let mut say = |said: String| {
        // tonic's own wrappers ("transport error") say nothing the causes
        // do not.
        if !text.contains(&said) && said != "transport error" {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&said);
        }
    };
    let mut cause = Some(e);
    while let Some(e) = cause {
        if wants_client_certificate(e) {
            return Found::WantsClientCertificate;
        }
        match e.downcast_ref::<ConnectFailed>() {
            // Said without the connector's hint, which names etcd's
            // settings (it connects to etcd too).
            Some(ConnectFailed::Io { stage, source, .. }) => {
                if wants_client_certificate(source) {
                    return Found::WantsClientCertificate;
                }
                say(format!("{stage}: {source}"));
                cause = std::error::Error::source(source);
            }
            _ => {
                say(e.to_string());
                cause = e.source();
            }
        }
    }
    Found::Unreachable(crate::error::cut(&text, 300))
}

/// Whether `e` is a TLS alert by which a server refuses a client without a
/// certificate (its io::Error holds the rustls error, which `source` skips):
/// this check presents none, so any refusal of a client certificate is one.
fn wants_client_certificate(e: &(dyn std::error::Error + 'static)) -> bool {
    let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
        e.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    });
    matches!(
        tls,
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired
                | rustls::AlertDescription::BadCertificate
                | rustls::AlertDescription::UnknownCA
                | rustls::AlertDescription::CertificateUnknown
                | rustls::AlertDescription::CertificateExpired
                | rustls::AlertDescription::UnsupportedCertificate
        ))
    )
}

/// TLS for dialing this broker's own `https://` URL. The certificate is
/// not verified: what the broker's clients are told to trust (their CA
/// bundle) is not in its config, and the check is whether the URL reaches
/// a quota-broker, not whether its certificate is trusted (a client that
/// does not trust it says so itself). The handshake's signatures are still
/// checked, so it is a real TLS handshake with the holder of the key.
fn client_config() -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts any server certificate (see [`client_config`]).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_port_where_nothing_listens_is_said_to_refuse() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", free.local_addr().unwrap());
        drop(free);
        let found = check(&url, Connector::new(None, BOUND), None).await;
        match found {
            Found::Unreachable(what) => {
                assert!(what.to_lowercase().contains("connection refused"), "{what}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// A health server on an ephemeral port answering SERVING for the
    /// broker's service and `own` (a broker whose instance name is `own`).
    async fn a_broker_named(own: &str) -> (String, tokio::task::JoinHandle<()>) {
        let (reporter, service) = tonic_health::server::health_reporter();
        for name in [crate::pb::quota_broker_server::SERVICE_NAME, own] {
            reporter
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
        });
        (url, server)
    }

    #[tokio::test]
    async fn another_quota_broker_at_the_url_is_told_from_this_one() {
        let (url, server) = a_broker_named("quota-broker.instance.00000000000000aa").await;
        let this = |name: &'static str| check(&url, Connector::new(None, BOUND), Some(name));
        assert_eq!(
            this("quota-broker.instance.00000000000000aa").await,
            Found::Serving
        );
        match this("quota-broker.instance.00000000000000bb").await {
            Found::Unreachable(what) => {
                assert!(
                    what.contains("another quota-broker answers there"),
                    "{what}"
                )
            }
            other => panic!("{other:?}"),
        }
        // Before its server named it, any quota-broker's SERVING counts.
        let any = check(&url, Connector::new(None, BOUND), None).await;
        assert_eq!(any, Found::Serving);
        server.abort();
    }

    #[tokio::test]
    async fn a_port_that_is_not_http2_is_not_a_broker() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
        });
        let found = check(&url, Connector::new(None, BOUND), None).await;
        server.abort();
        match found {
            Found::Unreachable(what) => assert!(what.contains("not an HTTP/2 server"), "{what}"),
            other => panic!("{other:?}"),
        }
    }
}
