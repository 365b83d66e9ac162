//! etcd over TLS that asks for client certificates: a broker that trusts
//! etcd's CA and presents a certificate etcd trusts leads; one that trusts
//! another CA leads nothing and names the cause in its log.

use super::{client, config, leads, rate_call, settled_leader, Feed, TTL_MS};
use crate::child::{temp_config, Broker};
use std::path::PathBuf;
use std::time::Duration;
use tokio::time::Instant;

/// A single node of tenant `t0` on `etcd` under `prefix`, with `tls`
/// (lines of `[cluster]`: `etcd_ca = …`).
fn tls_node(etcd: &str, prefix: &str, tls: &str) -> PathBuf {
    let port = testsvc::free_port().unwrap();
    let toml = config("b1", port, etcd, prefix, &["t0".to_owned()]).replacen(
        "[[tenants]]",
        &format!("{tls}\n[[tenants]]"),
        1,
    );
    temp_config(&format!("cluster-tls-{port}"), &toml)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_leads_over_etcd_with_tls_and_client_certificates_and_refuses_an_unknown_etcd() {
    let pki = testpki::Pki::new("etcd-tls");
    let etcd = testsvc::Etcd::start_tls(testsvc::EtcdTls {
        cert: pki.path("server.pem"),
        key: pki.path("server.key"),
        client_ca: Some(pki.path("ca.pem")),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(etcd.url().starts_with("https://"), "{}", etcd.url());
    let files = |ca: &testpki::Pki| {
        format!(
            "etcd_ca = {:?}\netcd_cert = {:?}\netcd_key = {:?}",
            ca.arg("ca.pem"),
            pki.arg("client.pem"),
            pki.arg("client.key")
        )
    };
    // It trusts etcd's CA and presents a certificate etcd trusts: it leads
    // (etcd refuses a client without one, so leading shows it was sent).
    let good = Broker::start(&tls_node(&etcd.url(), "/qb-test-tls", &files(&pki))).await;
    // (No etcd watch over TLS: the one broker's log is what changes.)
    let feed = Feed::of([&good], None);
    assert_eq!(settled_leader(&feed, &[good.url()], "t0").await, good.url());
    let granted = client(&good.url())
        .acquire(rate_call("t0", "c", 0))
        .await
        .unwrap()
        .into_inner();
    assert!(granted.granted, "{granted:?}");
    // The same, but trusting another CA than the one that signed etcd's
    // certificate: it must not take that etcd's word for anything.
    let other = testpki::Pki::new("etcd-tls-other");
    let doubting =
        Broker::start(&tls_node(&etcd.url(), "/qb-test-tls-other", &files(&other))).await;
    // For two lease TTLs: at every line it logs, and at their end.
    let mut events = Feed::of([&doubting], None);
    let watch_until = Instant::now() + Duration::from_millis(2 * TTL_MS);
    loop {
        assert!(
            leads(&doubting.url(), "t0").await.is_err(),
            "a broker that does not trust etcd's certificate leads"
        );
        if !events.next_before(watch_until).await {
            break;
        }
    }
    let (_, log) = doubting.terminate().await;
    // The cause is named, not only "transport error".
    assert!(
        log.contains("cluster session failed") && log.contains("UnknownIssuer"),
        "{log}"
    );
    let (_, log) = good.terminate().await;
    assert!(!log.contains("cluster session failed"), "{log}");
}
