//! The client over TLS and mutual TLS against a real broker on 127.0.0.1,
//! with certificates made at test time (rcgen).

use quota_broker::Settings;
use quota_broker_client::{BrokerClient, Call, ClientError, ClientTls, ConnectOptions};
use std::net::SocketAddr;
use std::path::Path;
use testpki::Pki;
use tokio::sync::oneshot;

/// A broker with mutual TLS on 127.0.0.1:0; stops when `stop` is dropped.
async fn mtls_broker(pki: &Pki) -> (SocketAddr, oneshot::Sender<()>) {
    let toml = format!(
        "[server]\nstate_dir = \"\"\n[server.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\
         [[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 10\n",
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    );
    let settings = Settings::from_toml(&toml).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        quota_broker::run(listener, &settings, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (addr, stop)
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

    // Without a client certificate the broker turns the connection away:
    // to the client that is an unreachable broker, so its local limiter.
    let no_cert = ClientTls::new().ca_pem(std::fs::read(pki.path("ca.pem")).unwrap());
    let client = BrokerClient::connect_with(&url, ConnectOptions::new().tls(no_cert)).unwrap();
    assert!(client.acquire(&call()).await.unwrap().is_fallback());
}

#[test]
fn tls_settings_are_checked_when_connecting() {
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
}
