//! The probes: `/readyz` (and gRPC health) following the etcd lease in a
//! cluster, and saying 503 while open calls drain at shutdown; `/healthz`,
//! `/readyz`, `/metrics` and the dashboard's files served without a token.

use super::{config, get, grpc_frame, open_acquire, start, tokens_config, BUCKETS, LIMIT};
use crate::harness::req;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// In cluster mode `/readyz` says whether the broker is in the cluster: a
/// broker without a valid etcd lease leads nothing and knows no leader to
/// send callers to, so a load balancer must not route to it; gRPC health
/// says the same (before, it said SERVING throughout, and clients probing
/// it left their fallback for a broker that refused their calls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_in_a_cluster_follows_the_etcd_lease() {
    let mut etcd = testsvc::Etcd::start().unwrap();
    let b = start(&format!(
        r#"[server]
state_dir = ""
shutdown_grace_ms = 1000
[cluster]
etcd = ["{}"]
node = "ready-1"
advertise = "http://127.0.0.1:1"
prefix = "/qb-test-readyz"
lease_ttl_ms = 2000
safety_margin_ms = 500
[[tenants]]
id = "t"
[[tenants.buckets]]
name = "b"
routes = ["* /**"]
permits = 60
window_ms = 60000
"#,
        etcd.url()
    ))
    .await;
    let until = |want: u16| {
        let http = b.http;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let r = get(http, "/readyz", &[]).await;
                if r.status == want {
                    return r;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "/readyz stayed {} ({}) instead of {want}",
                    r.status,
                    r.body.trim()
                );
                tokio::task::yield_now().await;
            }
        }
    };
    until(200).await;
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut health = tonic_health::pb::health_client::HealthClient::new(b.channel.clone())
        .watch(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    async fn next(
        health: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    ) -> ServingStatus {
        tokio::time::timeout(LIMIT, health.message())
            .await
            .expect("health changes within the limit")
            .unwrap()
            .expect("the health Watch goes on")
            .status()
    }
    // `start` waited for SERVING: the Watch's first answer.
    assert_eq!(next(&mut health).await, ServingStatus::Serving);
    // A page's feed of the tenant, open once the broker leads it.
    let deadline = std::time::Instant::now() + LIMIT;
    let (mut feed, mut seen) = loop {
        let mut feed = TcpStream::connect(b.http).await.unwrap();
        feed.write_all(b"GET /events?tenant=t HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        read_until(&mut feed, &mut seen, b"\r\n\r\n").await;
        if seen.starts_with(b"HTTP/1.1 200") {
            break (feed, seen);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the feed answered {}",
            String::from_utf8_lossy(&seen)
        );
        tokio::task::yield_now().await;
    };
    let sent =
        tokio::time::timeout(LIMIT, read_until(&mut feed, &mut seen, b"event: bucket")).await;
    assert!(
        sent.is_ok(),
        "the feed sent {}",
        String::from_utf8_lossy(&seen)
    );
    etcd.stop();
    let r = until(503).await;
    assert!(r.body.contains("not in the cluster"), "{}", r.body);
    assert_eq!(next(&mut health).await, ServingStatus::NotServing);
    // The feed ends (its last chunk) rather than going on silent, so the
    // page reconnects and is told no broker leads the tenant.
    tokio::time::timeout(LIMIT, read_until(&mut feed, &mut seen, b"\r\n0\r\n\r\n"))
        .await
        .expect("the feed of a tenant no longer led ends");
    // Alive all the same: a restart would not bring etcd back.
    assert_eq!(get(b.http, "/healthz", &[]).await.status, 200);
    // A dashboard feed of a tenant it no longer leads: unavailable (try
    // again, or where the message says), not "not found".
    let r = get(b.http, "/events?tenant=t", &[]).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("no broker leads tenant"), "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("5"));
    // etcd back: in the cluster, ready and SERVING again.
    etcd.resume().unwrap();
    assert_eq!(next(&mut health).await, ServingStatus::Serving);
    assert_eq!(get(b.http, "/readyz", &[]).await.status, 200);
    b.stop().await;
}

/// Reads `feed` into `seen` until it holds `want`.
async fn read_until(feed: &mut TcpStream, seen: &mut Vec<u8>, want: &[u8]) {
    let mut buf = [0u8; 4096];
    while !seen.windows(want.len()).any(|w| w == want) {
        let n = feed.read(&mut buf).await.unwrap();
        assert!(n > 0, "the feed closed without {want:?}");
        seen.extend_from_slice(&buf[..n]);
    }
}

/// Sends an Acquire as the request body of an opened call, ending it.
fn send_acquire(body: &mut h2::SendStream<bytes::Bytes>) {
    body.send_data(grpc_frame(&req("GET", "/api/v2/users/1", 0)), true)
        .unwrap();
}

/// The HTTP status of an answer, within the limit.
async fn status_of(response: h2::client::ResponseFuture) -> u16 {
    tokio::time::timeout(LIMIT, response)
        .await
        .expect("answered within the limit")
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn readyz_says_503_while_open_calls_drain() {
    let toml = format!(
        "[server]\nshutdown_grace_ms = 60000\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n{BUCKETS}"
    );
    let mut b = start(&toml).await;
    assert_eq!(get(b.http, "/readyz", &[]).await.status, 200);
    let tcp = TcpStream::connect(b.grpc).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    // A call left open: the broker is reading its request body.
    let (open_response, mut open_body) = open_acquire(&mut h2, b.grpc);
    // A whole call after it on the same connection: once it is answered,
    // the broker has taken the open one (streams arrive in order).
    let mut h2 = h2.ready().await.unwrap();
    let (response, mut body) = open_acquire(&mut h2, b.grpc);
    send_acquire(&mut body);
    assert_eq!(status_of(response).await, 200);

    b.signal_stop();
    let drained = tokio::time::timeout(LIMIT, async {
        loop {
            let r = get(b.http, "/readyz", &[]).await;
            if r.status == 503 {
                return r;
            }
            // Each poll is a whole HTTP round trip; the flip follows the
            // signal within a few scheduler passes.
            assert_eq!(r.status, 200, "{}", r.body);
        }
    })
    .await
    .expect("/readyz turned 503 after the shutdown signal");
    assert!(drained.body.contains("shutting down"), "{}", drained.body);
    // Still draining: the open call holds the broker, the process answers.
    assert!(
        !b.server.is_finished(),
        "the broker waits for the open call"
    );
    assert_eq!(get(b.http, "/healthz", &[]).await.status, 200);
    // A dashboard that opens its feed now is told to come back (and is
    // served by whichever broker is up then), not that nothing is there.
    let feed = get(b.http, "/events", &[]).await;
    assert_eq!(feed.status, 503, "{}", feed.body);
    assert!(feed.body.contains("shutting down"), "{}", feed.body);
    assert_eq!(feed.header("retry-after"), Some("5"));

    // The open call finishes, and with it the drain.
    send_acquire(&mut open_body);
    assert_eq!(status_of(open_response).await, 200);
    let http = b.http;
    b.stop().await;
    assert!(
        TcpStream::connect(http).await.is_err(),
        "the HTTP port closes once the drain is over"
    );
}

#[tokio::test]
async fn probes_answer_without_a_token() {
    let b = start(&config(&tokens_config())).await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = get(b.http, path, &[]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    let page = get(b.http, "/", &[]).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("dashboard.js"));
    assert!(page.body.contains("dashboard-feed.js"));
    let script = get(b.http, "/dashboard.js", &[]).await;
    assert_eq!(script.status, 200);
    let feed = get(b.http, "/dashboard-feed.js", &[]).await;
    assert_eq!(feed.status, 200);
    assert!(feed.body.contains("new EventSource("));
    assert!(
        !page.body.contains("http://") && !page.body.contains("https://"),
        "the page loads nothing from elsewhere"
    );
    b.stop().await;
}
