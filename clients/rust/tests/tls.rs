//! The client over TLS and mutual TLS against a real broker on 127.0.0.1,
//! with certificates made at test time (rcgen).

use quota_broker::Settings;
use quota_broker_client::{
    BrokerClient, Call, ClientError, ClientTls, ConnectOptions, FallbackSettings,
};
use std::net::SocketAddr;
use std::path::Path;
use testpki::Pki;

/// A broker with mutual TLS on 127.0.0.1:0, started; stops when dropped.
async fn mtls_broker(pki: &Pki) -> (SocketAddr, quota_broker::Embedded) {
    let toml = format!(
        "[server]\nstate_dir = \"\"\n[server.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\
         [[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 10\n",
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    );
    let settings = Settings::from_toml(&toml).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broker = quota_broker::Embedded::spawn(listener, settings).unwrap();
    assert!(broker.started().await, "the broker started");
    (broker.addr(), broker)
}

fn call() -> Call {
    Call::new("t", "GET", "/x").max_wait(std::time::Duration::ZERO)
}

#[tokio::test]
async fn leases_over_mutual_tls_with_a_private_ca() {
    let pki = Pki::new("mtls");
    let (addr, _stop) = mtls_broker(&pki).await;
    let tls = ClientTls::from_files(
        Some(&pki.path("ca.pem")),
        Some((&pki.path("client.pem"), &pki.path("client.key"))),
    )
    .unwrap();
    let url = format!("https://{addr}");
    let client = BrokerClient::connect_with(&url, ConnectOptions::new().tls(tls)).unwrap();
    let lease = client.acquire(&call()).await.unwrap();
    assert!(!lease.is_fallback(), "leased from the broker over TLS");
    lease.release().await;

    // Without a client certificate the broker turns the connection away.
    // With the broker's alert read first that is an error saying so; when
    // the connection's close overtakes the alert, it cannot be told from a
    // broker going down: the local limiter. Never a lease of the broker's.
    let no_cert = ClientTls::new().ca_pem(std::fs::read(pki.path("ca.pem")).unwrap());
    let client = BrokerClient::connect_with(&url, ConnectOptions::new().tls(no_cert)).unwrap();
    match client.acquire(&call()).await {
        Err(ClientError::Tls(why)) => assert!(why.contains("identity_pem"), "{why}"),
        Ok(lease) => assert!(lease.is_fallback()),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn tls_settings_are_checked_when_connecting() {
    let err = BrokerClient::connect_with(
        "http://127.0.0.1:50051",
        ConnectOptions::new().tls(ClientTls::new()),
    )
    .err()
    .unwrap();
    assert!(matches!(err, ClientError::Url { .. }), "{err}");
    assert!(err.to_string().contains("https://"), "{err}");

    let missing = Path::new("/nonexistent/ca.pem");
    let err = ClientTls::from_files(Some(missing), None).unwrap_err();
    assert!(matches!(err, ClientError::Tls(_)), "{err}");
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");

    let pki = Pki::new("bad-key");
    std::fs::write(pki.path("junk.key"), "not a key").unwrap();
    let tls = ClientTls::from_files(
        Some(&pki.path("ca.pem")),
        Some((&pki.path("client.pem"), &pki.path("junk.key"))),
    )
    .unwrap();
    let err = BrokerClient::connect_with("https://127.0.0.1:50051", ConnectOptions::new().tls(tls))
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::Tls(_)), "{err}");

    // A CA file without a certificate (a key given by mistake), and a
    // client certificate that has expired: refused here, not at every
    // handshake as a broker that looks down.
    let connect = |tls: Result<ClientTls, ClientError>| {
        tls.and_then(|tls| {
            BrokerClient::connect_with("https://127.0.0.1:50051", ConnectOptions::new().tls(tls))
        })
        .expect_err("refused when connecting")
    };
    let err = connect(ClientTls::from_files(Some(&pki.path("client.key")), None));
    assert!(
        err.to_string().contains(&format!(
            "the CA certificate {}: no PEM certificate",
            pki.path("client.key").display()
        )),
        "{err}"
    );
    // The key that is not one is named too.
    let err = connect(ClientTls::from_files(
        Some(&pki.path("ca.pem")),
        Some((&pki.path("client.pem"), &pki.path("junk.key"))),
    ));
    assert!(
        err.to_string().contains(&format!(
            "the client key {}: no PEM private key in it",
            pki.path("junk.key").display()
        )),
        "{err}"
    );
    let err = connect(ClientTls::from_files(
        Some(&pki.path("ca.pem")),
        Some((
            &pki.path("expired-client.pem"),
            &pki.path("expired-client.key"),
        )),
    ));
    assert!(
        err.to_string()
            .contains("the client certificate expired on"),
        "{err}"
    );
    assert!(err.to_string().contains("2021"), "{err}");
}

/// A truncated PEM file (a copy cut short) is said to be one, naming the
/// file, when connecting; before, tonic took it and every handshake failed
/// with "Error parsing TLS certificate.", naming nothing.
#[tokio::test]
async fn a_truncated_pem_file_is_said_to_be_one_naming_it() {
    let pki = Pki::new("truncated");
    let cut = |file: &str| {
        let whole = std::fs::read(pki.path(file)).unwrap();
        let path = pki.path(&format!("cut-{file}"));
        std::fs::write(&path, &whole[..whole.len() / 2]).unwrap();
        path
    };
    let (ca, cert, key) = (cut("ca.pem"), cut("client.pem"), cut("client.key"));
    let connect = |tls: ClientTls| {
        BrokerClient::connect_with("https://127.0.0.1:50051", ConnectOptions::new().tls(tls))
            .expect_err("refused when connecting")
            .to_string()
    };
    let missing =
        |label: &str| format!("missing the \"-----END {label}-----\" line (a truncated file?)");
    let whole = |file: &str| pki.path(file);
    for (tls, says) in [
        (
            ClientTls::from_files(Some(&ca), None).unwrap(),
            format!(
                "TLS: the CA certificate {}: {}",
                ca.display(),
                missing("CERTIFICATE")
            ),
        ),
        (
            ClientTls::from_files(Some(&whole("ca.pem")), Some((&cert, &whole("client.key"))))
                .unwrap(),
            format!(
                "TLS: the client certificate {}: {}",
                cert.display(),
                missing("CERTIFICATE")
            ),
        ),
        (
            ClientTls::from_files(Some(&whole("ca.pem")), Some((&whole("client.pem"), &key)))
                .unwrap(),
            format!(
                "TLS: the client key {}: {}",
                key.display(),
                missing("PRIVATE KEY")
            ),
        ),
        (
            // Given as bytes: no file to name.
            ClientTls::new().ca_pem(std::fs::read(&ca).unwrap()),
            format!("TLS: the CA certificate: {}", missing("CERTIFICATE")),
        ),
    ] {
        assert_eq!(connect(tls), says);
    }
}

#[test]
fn a_client_made_outside_a_runtime_is_an_error_not_a_panic() {
    let err = BrokerClient::connect("http://127.0.0.1:50051", None)
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::NoRuntime), "{err}");
}

/// A broker certificate this client does not trust, and `https://` to a
/// port without TLS, are errors that say what to do, from the start-up
/// check and from every call: not an unreachable broker run on the
/// fallback rate.
#[tokio::test]
async fn a_handshake_that_cannot_succeed_is_an_error_not_a_fallback() {
    let pki = Pki::new("trusted");
    let (addr, _stop) = mtls_broker(&pki).await;
    let other = Pki::new("other");
    let tls = ClientTls::from_files(
        Some(&other.path("ca.pem")),
        Some((&other.path("client.pem"), &other.path("client.key"))),
    )
    .unwrap();
    let client =
        BrokerClient::connect_with(&format!("https://{addr}"), ConnectOptions::new().tls(tls))
            .unwrap();
    let err = client
        .check("t", std::time::Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("no CA this client trusts"),
        "{err}"
    );
    match client.acquire(&call()).await {
        Err(ClientError::Tls(why)) => assert!(why.contains("ClientTls::ca_pem"), "{why}"),
        other => panic!("{:?}", other.map(|l| l.is_fallback())),
    }

    // Trusted, but for other names than the one asked for.
    let tls = ClientTls::new()
        .ca_pem(std::fs::read(pki.path("ca.pem")).unwrap())
        .identity_pem(
            std::fs::read(pki.path("client.pem")).unwrap(),
            std::fs::read(pki.path("client.key")).unwrap(),
        )
        .domain_name("elsewhere.test");
    let client =
        BrokerClient::connect_with(&format!("https://{addr}"), ConnectOptions::new().tls(tls))
            .unwrap();
    match client.acquire(&call()).await {
        Err(ClientError::Tls(why)) => assert!(why.contains("ClientTls::domain_name"), "{why}"),
        other => panic!("{:?}", other.map(|l| l.is_fallback())),
    }
}

/// A broker with TLS (the server certificate of `pki`, no client CA) on
/// `addr`.
async fn tls_broker_on(pki: &Pki, addr: &str) -> quota_broker::Embedded {
    let toml = format!(
        "[server]\nstate_dir = \"\"\n[server.tls]\ncert = {:?}\nkey = {:?}\n\
         [[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 10\n",
        pki.path("server.pem"),
        pki.path("server.key"),
    );
    let settings = Settings::from_toml(&toml).unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let broker = quota_broker::Embedded::spawn(listener, settings).unwrap();
    assert!(broker.started().await, "the broker started");
    broker
}

/// A client falling back from a broker that went away, which comes back
/// with a certificate the client does not trust (rotated to another CA):
/// the probe's handshake ends the fallback and calls say what is wrong,
/// instead of running on the fallback rate for good.
#[tokio::test]
async fn a_fallback_probe_that_meets_a_certificate_it_does_not_trust_ends_the_fallback() {
    let (before, after) = (Pki::new("rotated-from"), Pki::new("rotated-to"));
    let server = tls_broker_on(&before, "127.0.0.1:0").await;
    let addr = server.addr();
    let tls = ClientTls::new().ca_pem(std::fs::read(before.path("ca.pem")).unwrap());
    let fallback = FallbackSettings {
        floor_per_min: 600,
        probe_every: std::time::Duration::from_millis(100),
        ..FallbackSettings::default()
    };
    let client = BrokerClient::connect_with(
        &format!("https://{addr}"),
        ConnectOptions::new().tls(tls).fallback(fallback),
    )
    .unwrap();
    let call = Call::new("t", "GET", "/x").max_wait(std::time::Duration::from_secs(1));
    assert!(!client.acquire(&call).await.unwrap().is_fallback());
    server.stop().await.unwrap();
    assert!(client.acquire(&call).await.unwrap().is_fallback());
    let server = tls_broker_on(&after, &addr.to_string()).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match client.acquire(&call).await {
            Err(ClientError::Tls(why)) => {
                assert!(why.contains("ClientTls::ca_pem"), "{why}");
                break;
            }
            Ok(lease) => assert!(lease.is_fallback()),
            Err(e) => panic!("{e}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still on the fallback rate 10 s after the broker came back"
        );
    }
    server.stop().await.unwrap();
}

/// A broker whose host hangs (a frozen process: its kernel still completes
/// TCP handshakes, nothing answers): a new TLS connection to it gives up
/// after the connect timeout and the call moves to the next broker of the
/// cluster. Before, the TLS handshake was not bounded and every call to
/// the hung leader waited for ever, neither moving on nor falling back.
#[tokio::test]
async fn a_tls_handshake_with_a_hung_host_gives_up_and_moves_to_the_next_broker() {
    let pki = Pki::new("hung-host");
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap();
    // Accepts and holds every connection, never reading or answering.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hung.accept().await {
            held.push(socket);
        }
    });
    let server = tls_broker_on(&pki, "127.0.0.1:0").await;
    let tls = ClientTls::new().ca_pem(std::fs::read(pki.path("ca.pem")).unwrap());
    let urls = format!("https://{hung_addr},https://{}", server.addr());
    let client = BrokerClient::connect_with(&urls, ConnectOptions::new().tls(tls)).unwrap();
    let started = std::time::Instant::now();
    let lease = tokio::time::timeout(std::time::Duration::from_secs(20), client.acquire(&call()))
        .await
        .expect("the call waited 20 s on a host that never answers the TLS handshake")
        .unwrap();
    assert!(!lease.is_fallback(), "not moved to the next broker");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(client.current_url(), format!("https://{}", server.addr()));
    drop(lease);
    holder.abort();
    server.stop().await.unwrap();
}
