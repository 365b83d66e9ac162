//! The check of `cluster.advertise`: a URL where nothing answers is said
//! at ERROR and on `/readyz` until it reaches the broker, one where another
//! member answers is said by both, and an `https://` one is checked over
//! TLS as far as mutual TLS lets it.

use super::{config, leader, Cluster};
use crate::child::{temp_config, Broker};

/// Node `node`'s config as [`config`] writes it, with its HTTP port on
/// `http` and `advertise` as its advertised URL.
fn config_advertising(
    node: &str,
    port: u16,
    http: u16,
    advertise: &str,
    cluster: &Cluster,
    tenants: &[String],
) -> String {
    config(node, port, &cluster.etcd_url, &cluster.prefix, tenants)
        .replacen(
            "http_listen = \"\"",
            &format!("http_listen = \"127.0.0.1:{http}\""),
            1,
        )
        .replacen(
            &format!("advertise = \"http://127.0.0.1:{port}\""),
            &format!("advertise = \"{advertise}\""),
            1,
        )
}

/// A broker whose `cluster.advertise` names a port where nothing answers
/// (the user trial: 40099 advertised, 40052 listened on) says so at ERROR,
/// naming the setting, the URL and what the dial got, once, and its
/// /readyz says it after "ready"; when the port comes up (a proxy started
/// late, forwarding to it) it says it reaches it and is ready. A broker
/// advertising its own port says it reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_advertise_is_said_until_it_reaches_the_broker() {
    let etcd = testsvc::Etcd::start().unwrap();
    let cluster = Cluster::start(etcd, "advertise", &["b1"], 2).await;
    cluster.brokers["b1"]
        .until_logged("cluster.advertise reaches a broker")
        .await;
    let port = testsvc::free_port().unwrap();
    let http = testsvc::free_port().unwrap();
    let nowhere = testsvc::free_port().unwrap();
    let wrong = format!("http://127.0.0.1:{nowhere}");
    let toml = config_advertising("b2", port, http, &wrong, &cluster, &cluster.tenants);
    let b2 = Broker::start(&temp_config(&format!("cluster-b2-{port}"), &toml)).await;
    b2.until_logged("does not reach this broker").await;
    let log = b2.logged();
    let line = log
        .lines()
        .find(|l| l.contains("does not reach this broker"))
        .unwrap();
    for said in [
        "ERROR",
        "cluster.advertise",
        wrong.as_str(),
        "callers redirected here cannot reach it",
    ] {
        assert!(line.contains(said), "{said:?} not in: {line}");
    }
    assert!(line.to_lowercase().contains("connection refused"), "{line}");
    // Set before it is logged: /readyz says it already, still ready (gRPC
    // health follows /readyz, and clients that reach b2 by their own list
    // of URLs are served).
    let http_addr = std::net::SocketAddr::from(([127, 0, 0, 1], http));
    let ready = crate::observe::get(http_addr, "/readyz", &[]).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert!(
        ready.body.starts_with("ready, but cluster.advertise")
            && ready.body.contains(&wrong)
            && ready
                .body
                .contains("callers redirected here cannot reach it"),
        "{}",
        ready.body
    );
    assert!(
        ready.body.to_lowercase().contains("connection refused"),
        "{}",
        ready.body
    );

    // The port comes up: a proxy to b2's gRPC port.
    let proxy = tokio::net::TcpListener::bind(("127.0.0.1", nowhere))
        .await
        .unwrap();
    let target = b2.addr.clone();
    let forward = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = proxy.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    b2.until_logged("cluster.advertise reaches this broker now")
        .await;
    let ready = crate::observe::get(http_addr, "/readyz", &[]).await;
    assert_eq!((ready.status, &ready.body[..]), (200, "ready\n"));
    // Leading was never held up: b2 leads what it is preferred for (b1
    // sends its callers to the advertised URL, the proxy).
    let urls = vec![cluster.brokers["b1"].url(), wrong.clone()];
    for t in &cluster.tenants {
        leader(&cluster.feed_with(&[&b2]), &urls, t).await;
    }
    forward.abort();
    let (_, log) = b2.terminate().await;
    // Checked every 2 s; said once (at most once a minute).
    assert_eq!(
        log.matches("does not reach this broker").count(),
        1,
        "{log}"
    );

    // A member advertising b1's URL: b1 answers b3's check, but not for
    // b3's own health name, so b3 says another quota-broker is there; and
    // the members' keys say it, on both.
    let port = testsvc::free_port().unwrap();
    let http = testsvc::free_port().unwrap();
    let b1 = cluster.brokers["b1"].url();
    let toml = config_advertising("b3", port, http, &b1, &cluster, &cluster.tenants);
    let b3 = Broker::start(&temp_config(&format!("cluster-b3-{port}"), &toml)).await;
    b3.until_logged("another quota-broker answers there, not this one")
        .await;
    let line = b3
        .logged()
        .lines()
        .find(|l| l.contains("another quota-broker answers there"))
        .unwrap()
        .to_owned();
    assert!(line.contains("ERROR") && line.contains(&b1), "{line}");
    let shared = |of: &str| format!("member {of} advertises this broker's cluster.advertise");
    cluster.brokers["b1"].until_logged(&shared("b3")).await;
    b3.until_logged(&shared("b1")).await;
}

/// Over TLS the check dials the `https://` URL (the certificate is not
/// verified: what the clients trust is not in the broker's config) and
/// reaches the broker; under mutual TLS a port that asks for a client
/// certificate is as far as it can check, and it says so rather than
/// calling the URL wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_advertise_is_checked_over_tls_as_far_as_mutual_tls_lets_it() {
    let pki = testpki::Pki::new("cluster-advertise-tls");
    let etcd = testsvc::Etcd::start().unwrap();
    let tenants = vec!["t0".to_owned()];
    let mut brokers = Vec::new();
    for (node, mutual) in [("b1", false), ("b2", true)] {
        let port = testsvc::free_port().unwrap();
        let client_ca = if mutual {
            format!("client_ca = {:?}\n", pki.arg("ca.pem"))
        } else {
            String::new()
        };
        let toml = config(node, port, &etcd.url(), "/qb-test-advertise-tls", &tenants)
            .replacen("advertise = \"http://", "advertise = \"https://", 1)
            .replacen(
                "[cluster]",
                &format!(
                    "[server.tls]\ncert = {:?}\nkey = {:?}\n{client_ca}[cluster]",
                    pki.arg("server.pem"),
                    pki.arg("server.key")
                ),
                1,
            );
        let path = temp_config(&format!("cluster-advertise-tls-{port}"), &toml);
        brokers.push(Broker::start(&path).await);
    }
    brokers[0]
        .until_logged(
            "cluster.advertise reaches a broker: a health check of quota.v1.QuotaBroker there \
             answers SERVING",
        )
        .await;
    brokers[1]
        .until_logged(
            "cluster.advertise reaches a broker: its TLS port asks for a client certificate",
        )
        .await;
    for b in brokers {
        let (_, log) = b.terminate().await;
        assert!(!log.contains("does not reach this broker"), "{log}");
    }
}
