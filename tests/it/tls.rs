//! TLS and mutual TLS on the gRPC port, with certificates made at test time
//! (rcgen): a CA, a server certificate for 127.0.0.1, and client
//! certificates from that CA and from another one.

use crate::harness::{clock_held, closed_by_broker, still_open};
use quota_broker::hash_token;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{AcquireRequest, AcquireResponse};
use quota_broker::Settings;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

/// Bound on anything that must fail fast rather than hang (real time).
const PROMPTLY: Duration = Duration::from_secs(10);

/// A certificate and its key, as PEM.
struct Pem {
    cert: String,
    key: String,
}

/// A CA with a server certificate (127.0.0.1, localhost) and a client
/// certificate, written to a directory of their own.
struct Pki {
    dir: PathBuf,
    ca: String,
    server: Pem,
    client: Pem,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir =
            std::env::temp_dir().join(format!("quota-broker-it-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, server, client) = issue("quota-broker test CA");
        let pki = Pki {
            dir,
            ca,
            server,
            client,
        };
        for (file, pem) in [
            ("ca.pem", &pki.ca),
            ("server.pem", &pki.server.cert),
            ("server.key", &pki.server.key),
            ("client.pem", &pki.client.cert),
            ("client.key", &pki.client.key),
        ] {
            std::fs::write(pki.path(file), pem).unwrap();
        }
        pki
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// `[server.tls]` for these files; mutual with `client_ca`.
    fn server_tls(&self, mutual: bool) -> String {
        let mut s = format!(
            "[server.tls]\ncert = {:?}\nkey = {:?}\n",
            self.path("server.pem"),
            self.path("server.key")
        );
        if mutual {
            s.push_str(&format!("client_ca = {:?}\n", self.path("ca.pem")));
        }
        s
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA named `cn`, and a server and a client certificate it signed.
fn issue(cn: &str) -> (String, Pem, Pem) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |sans: &[&str], usage| {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &*ca).unwrap();
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    };
    let server = leaf(
        &["127.0.0.1", "localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let client = leaf(&["ingest-1"], ExtendedKeyUsagePurpose::ClientAuth);
    (ca.pem(), server, client)
}

/// A tenant "t" with one catch-all bucket; `extra` goes right after the
/// `[server]` keys (more keys, then tables).
pub(crate) fn config(extra: &str) -> String {
    format!(
        "[server]\nshutdown_grace_ms = 2000\nstate_dir = \"\"\n{extra}\n[[tenants]]\nid = \"t\"\n\
         [[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 100\n"
    )
}

/// A broker serving `toml` on 127.0.0.1:0, started.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    broker: quota_broker::Embedded,
}

impl Server {
    pub(crate) async fn start(toml: &str) -> Server {
        let settings = Settings::from_toml(toml).expect("test config is valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let broker = quota_broker::Embedded::spawn(listener, settings).unwrap();
        assert!(broker.started().await, "the broker started");
        Server {
            addr: broker.addr(),
            broker,
        }
    }

    pub(crate) async fn stop(self) {
        self.broker.stop().await.unwrap();
    }
}

/// An https endpoint trusting `ca`, with a client identity if given.
fn https(addr: SocketAddr, ca: &str, identity: Option<&Pem>) -> Endpoint {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(PROMPTLY)
        .tls_config(tls)
        .unwrap()
}

fn acquire_req() -> AcquireRequest {
    AcquireRequest {
        tenant: "t".into(),
        client_id: "tls-test".into(),
        method: "GET".into(),
        path: "/x".into(),
        max_wait_ms: Some(0),
        ..Default::default()
    }
}

/// One Acquire on `channel` (with `token` if given), bounded by [`PROMPTLY`].
async fn acquire(channel: Channel, token: Option<&str>) -> Result<AcquireResponse, tonic::Status> {
    let mut req = tonic::Request::new(acquire_req());
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let call = async move { QuotaBrokerClient::new(channel).acquire(req).await };
    tokio::time::timeout(PROMPTLY, call)
        .await
        .expect("answered or failed promptly, not hung")
        .map(tonic::Response::into_inner)
}

fn assert_transport_failure(r: Result<AcquireResponse, tonic::Status>, what: &str) {
    let err = r.expect_err(what);
    assert!(
        matches!(
            err.code(),
            Code::Unavailable | Code::Unknown | Code::Internal
        ),
        "{what}: {err:?}"
    );
}

#[tokio::test]
async fn tls_round_trip_with_a_token() {
    let pki = Pki::new("round-trip");
    let toml = config(&format!(
        "{}\n[[auth.tokens]]\nname = \"ingest\"\nsha256 = \"{}\"\nrole = \"client\"\ntenants = [\"t\"]\n",
        pki.server_tls(false),
        hash_token("s3cret")
    ));
    let server = Server::start(&toml).await;
    let channel = https(server.addr, &pki.ca, None).connect().await.unwrap();
    let granted = acquire(channel.clone(), Some("s3cret")).await.unwrap();
    assert!(granted.granted, "{granted:?}");
    let err = acquire(channel, Some("wrong")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // A client that does not trust the broker's CA refuses it.
    let (other_ca, _, _) = issue("some other CA");
    let untrusted = https(server.addr, &other_ca, None).connect_lazy();
    assert_transport_failure(
        acquire(untrusted, Some("s3cret")).await,
        "a client that does not trust the server's CA",
    );
    server.stop().await;
}

#[tokio::test]
async fn mutual_tls_serves_only_clients_with_a_certificate_from_its_ca() {
    let pki = Pki::new("mutual");
    let server = Server::start(&config(&pki.server_tls(true))).await;
    let with_cert = https(server.addr, &pki.ca, Some(&pki.client)).connect_lazy();
    assert!(acquire(with_cert, None).await.unwrap().granted);

    let without = https(server.addr, &pki.ca, None).connect_lazy();
    assert_transport_failure(
        acquire(without, None).await,
        "a client without a certificate",
    );
    let (_, _, stranger) = issue("a CA the broker does not know");
    let foreign = https(server.addr, &pki.ca, Some(&stranger)).connect_lazy();
    assert_transport_failure(
        acquire(foreign, None).await,
        "a client certificate from another CA",
    );
    // The refusals cost the broker nothing lasting.
    let again = https(server.addr, &pki.ca, Some(&pki.client)).connect_lazy();
    assert!(acquire(again, None).await.unwrap().granted);
    server.stop().await;
}

#[tokio::test]
async fn a_plaintext_client_on_the_tls_port_fails_at_once() {
    let pki = Pki::new("plaintext-client");
    // A long handshake timeout: the failure must not wait for it.
    let server = Server::start(&config(&format!(
        "{}\n",
        pki.server_tls(false)
            .replace("[server.tls]", "handshake_timeout_ms = 60000\n[server.tls]")
    )))
    .await;
    let plaintext = Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_lazy();
    assert_transport_failure(
        acquire(plaintext, None).await,
        "plaintext gRPC to the TLS port",
    );
    // TLS clients are still served.
    let tls = https(server.addr, &pki.ca, None).connect_lazy();
    assert!(acquire(tls, None).await.unwrap().granted);
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_never_starts_tls_is_closed_at_the_handshake_timeout() {
    let pki = Pki::new("silent");
    let server = Server::start(&config(
        &pki.server_tls(false)
            .replace("[server.tls]", "handshake_timeout_ms = 3000\n[server.tls]"),
    ))
    .await;
    let tls = https(server.addr, &pki.ca, None).connect_lazy();
    let mut silent = clock_held("a silent connection, then a TLS client", async {
        let silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        // Accepted in order: once the client is served, the broker has
        // the silent connection's handshake under way.
        assert!(acquire(tls.clone(), None).await.unwrap().granted);
        silent
    })
    .await;
    tokio::time::advance(Duration::from_millis(2999)).await;
    // A call's round trip gives every woken task its turn first.
    let served = clock_held("a call before the timeout", acquire(tls, None)).await;
    assert!(served.unwrap().granted);
    assert!(still_open(&silent), "closed before the handshake timeout");
    tokio::time::advance(Duration::from_millis(1)).await;
    // EOF (or a reset) at the timeout.
    assert!(clock_held("closed at the timeout", closed_by_broker(&mut silent)).await);
    server.stop().await;
}

#[test]
fn tls_files_are_checked_at_load_and_every_problem_is_listed() {
    let pki = Pki::new("bad-files");
    std::fs::write(pki.path("garbage.pem"), "not a certificate\n").unwrap();
    let missing = Path::new("/nonexistent/quota-broker/server.pem");
    let err = Settings::from_toml(&config(&format!(
        "[server.tls]\ncert = {missing:?}\nkey = {:?}\nclient_ca = {:?}\n",
        pki.path("garbage.pem"),
        pki.path("garbage.pem"),
    )))
    .unwrap_err();
    let all = err.to_string();
    assert!(
        all.contains("server.tls.cert: cannot read /nonexistent/quota-broker/server.pem"),
        "{all}"
    );
    assert!(
        all.contains("server.tls.key") && all.contains("no PEM private key"),
        "{all}"
    );
    assert!(
        all.contains("server.tls.client_ca") && all.contains("no PEM certificate"),
        "{all}"
    );
    assert_eq!(err.problems.len(), 3, "{all}");

    // A key that is not the certificate's.
    let err = Settings::from_toml(&config(&format!(
        "[server.tls]\ncert = {:?}\nkey = {:?}\n",
        pki.path("server.pem"),
        pki.path("client.key"),
    )))
    .unwrap_err();
    assert!(
        err.to_string().contains("does not fit the certificate"),
        "{err}"
    );
}

/// A self-signed certificate for 127.0.0.1 valid from `not_before` to
/// `not_after` (unix seconds), as PEM.
fn dated(not_before: i64, not_after: i64) -> Pem {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params.not_before = time::OffsetDateTime::from_unix_timestamp(not_before).unwrap();
    params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
    let cert = params.self_signed(&key).unwrap();
    Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

#[test]
fn an_expired_certificate_is_a_config_problem_and_a_valid_ones_expiry_is_known() {
    let pki = Pki::new("dated");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let day = 86_400;
    let expired = dated(now - 400 * day, now - day);
    let soon = dated(now - day, now + 3 * day);
    for (name, pem) in [("expired", &expired), ("soon", &soon)] {
        std::fs::write(pki.path(&format!("{name}.pem")), &pem.cert).unwrap();
        std::fs::write(pki.path(&format!("{name}.key")), &pem.key).unwrap();
    }
    let tls = |cert: &str, ca: &str| {
        config(&format!(
            "[server.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            pki.path(&format!("{cert}.pem")),
            pki.path(&format!("{cert}.key")),
            pki.path(ca),
        ))
    };
    let err = Settings::from_toml(&tls("expired", "ca.pem")).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(
        err.problems[0].starts_with("server.tls.cert ")
            && err.problems[0].contains("the certificate expired at")
            && err.problems[0].contains("renew it"),
        "{err}"
    );
    // A client CA bundle of nothing but expired certificates: no client
    // certificate can be checked.
    let err = Settings::from_toml(&tls("soon", "expired.pem")).unwrap_err();
    assert!(
        err.problems
            .iter()
            .any(|p| p.starts_with("server.tls.client_ca ")
                && p.contains("every certificate in it has expired")),
        "{err}"
    );
    // One kept through a rotation beside the new CA: served, and counted
    // (a warning at start).
    let bundle = format!("{}{}", expired.cert, soon.cert);
    std::fs::write(pki.path("bundle.pem"), bundle).unwrap();
    let settings = Settings::from_toml(&tls("soon", "bundle.pem")).unwrap();
    let served = settings.server.tls.as_ref().unwrap();
    assert_eq!(served.expired_client_cas, 1);
    assert_eq!(served.client_ca_not_after, Some(now + 3 * day));
    // An expired intermediate in the broker's chain.
    std::fs::write(
        pki.path("chain.pem"),
        format!("{}{}", soon.cert, expired.cert),
    )
    .unwrap();
    std::fs::write(pki.path("chain.key"), &soon.key).unwrap();
    let err = Settings::from_toml(&tls("chain", "ca.pem")).unwrap_err();
    assert!(
        err.problems[0].contains("an intermediate certificate of its chain expired at"),
        "{err}"
    );
    // Expiring in three days: served (with a warning at start), and when
    // is known (the metric's value).
    let settings = Settings::from_toml(&tls("soon", "soon.pem")).unwrap();
    let tls = settings.server.tls.as_ref().unwrap();
    assert_eq!(tls.cert_not_after, now + 3 * day);
    assert_eq!(tls.client_ca_not_after, Some(now + 3 * day));
}

#[test]
fn tokens_off_loopback_need_tls() {
    let pki = Pki::new("off-loopback");
    let rest = format!(
        "[[auth.tokens]]\nname = \"ingest\"\nsha256 = \"{}\"\nrole = \"client\"\ntenants = [\"t\"]\n\
         [[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n",
        hash_token("s3cret")
    );
    let listen = "[server]\nlisten = \"0.0.0.0:50051\"\n";
    let err = Settings::from_toml(&format!("{listen}{rest}")).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    let problem = &err.problems[0];
    for needle in ["0.0.0.0:50051", "plaintext", "replay", "server.tls.cert"] {
        assert!(problem.contains(needle), "{needle:?} missing in {problem}");
    }
    let s = Settings::from_toml(&format!("{listen}{}{rest}", pki.server_tls(false))).unwrap();
    assert!(s.server.tls.is_some_and(|t| !t.is_mutual()));
}
