//! The client against a real broker on 127.0.0.1 (in-process, paused clock).

use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::{ListBucketsRequest, QuotaStatus};
use quota_broker::{Embedded, Settings};
use quota_broker_client::{BrokerClient, Call, ClientError, FallbackSettings, LeaseLayer};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

const CONFIG: &str = r#"
[server]
state_dir = ""
[[tenants]]
id = "t"
[[tenants.buckets]]
name = "slots"
routes = ["POST /q"]
max_in_flight = 1
lease_ttl_ms = 5000
[[tenants.buckets]]
name = "org"
routes = ["* /**"]
permits = 600
window_ms = 60000
"#;

struct Broker {
    addr: SocketAddr,
    server: Embedded,
}

async fn broker_on(addr: &str) -> Broker {
    let settings = Settings::from_toml(CONFIG).unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let server = Embedded::spawn(listener, settings).unwrap();
    assert!(server.started().await, "the broker started");
    Broker {
        addr: server.addr(),
        server,
    }
}

impl Broker {
    fn url(&self) -> String {
        self.server.url()
    }

    async fn stop(self) {
        self.server.stop().await.unwrap();
    }

    async fn bucket(&self, name: &str) -> QuotaStatus {
        let mut admin = QuotaAdminClient::connect(self.url()).await.unwrap();
        let list = admin
            .list_buckets(ListBucketsRequest::default())
            .await
            .unwrap()
            .into_inner();
        list.buckets.into_iter().find(|b| b.bucket == name).unwrap()
    }
}

fn q() -> Call {
    Call::new("t", "POST", "/q")
        .client_id("test")
        .class("critical")
}

#[tokio::test(start_paused = true)]
async fn dropping_a_lease_releases_its_slot() {
    let b = broker_on("127.0.0.1:0").await;
    let client = BrokerClient::connect(&b.url(), None).unwrap();
    let lease = client.acquire(&q()).await.unwrap();
    assert!(!lease.is_fallback());
    // What the broker granted it on, and for how long.
    let mut on = lease.buckets().to_vec();
    on.sort();
    assert_eq!(on, ["org", "slots"]);
    assert_eq!(lease.ttl(), Duration::from_secs(5));
    assert!(format!("{lease:?}").contains(lease.id()));
    assert_eq!(b.bucket("slots").await.in_flight, 1);
    let busy = client.acquire(&q().max_wait(Duration::ZERO)).await;
    assert!(
        matches!(busy, Err(ClientError::NotGranted { .. })),
        "{:?}",
        busy.err()
    );
    drop(lease);
    // The release is sent in the background; a waiting Acquire gets the slot.
    let again = client
        .acquire(&q().max_wait(Duration::from_secs(1)))
        .await
        .unwrap();
    assert!(!again.is_fallback());
    drop(again);
    b.stop().await;
}

/// Real time: a paused clock would jump while the release is on the wire
/// (to the 10 s bound, or past the lease's 5 s expiry).
#[tokio::test]
async fn settle_waits_until_dropped_leases_are_released_at_the_broker() {
    let b = broker_on("127.0.0.1:0").await;
    let client = BrokerClient::connect(&b.url(), None).unwrap();
    assert_eq!(client.settle(Duration::ZERO).await, 0, "nothing to settle");
    let lease = client.acquire(&q()).await.unwrap();
    let dropped = std::time::Instant::now();
    drop(lease);
    assert_eq!(client.settle(Duration::ZERO).await, 1, "on its way");
    assert_eq!(client.settle(Duration::from_secs(10)).await, 0);
    // Waited for, not only counted: nothing is on its way once it returns.
    assert_eq!(client.settle(Duration::ZERO).await, 0);
    // Released, not expired: the broker has the slot free before its 5 s.
    assert_eq!(b.bucket("slots").await.in_flight, 0);
    assert!(
        dropped.elapsed() < Duration::from_secs(5),
        "took {:?}: a release cannot be told from an expiry",
        dropped.elapsed()
    );
    // A broker that is gone: the release fails and is not waited for
    // beyond `within`.
    let lease = client.acquire(&q()).await.unwrap();
    b.stop().await;
    drop(lease);
    let left = client.settle(Duration::from_secs(60)).await;
    assert_eq!(left, 0, "a failed release is over too");
}

#[tokio::test(start_paused = true)]
async fn a_held_lease_is_renewed_in_the_background() {
    let b = broker_on("127.0.0.1:0").await;
    let client = BrokerClient::connect(&b.url(), None).unwrap();
    let lease = client.acquire(&q()).await.unwrap();
    // Another client waits 20 s (four TTLs) for the slot: renewal keeps it.
    let other = BrokerClient::connect(&b.url(), None).unwrap();
    let t0 = Instant::now();
    let waited = other.acquire(&q().max_wait(Duration::from_secs(20))).await;
    assert!(t0.elapsed() >= Duration::from_secs(20));
    assert!(matches!(waited, Err(ClientError::NotGranted { .. })));
    assert_eq!(b.bucket("slots").await.in_flight, 1);
    drop(lease);
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_renewal_refused_for_a_while_is_tried_again() {
    let config = format!(
        "{CONFIG}[[auth.tokens]]\nname = \"c\"\nsha256 = \"{}\"\nrole = \"client\"\n\
         tenants = [\"t\"]\nmax_requests_per_sec = 5\n\
         [[auth.tokens]]\nname = \"w\"\nsha256 = \"{}\"\nrole = \"client\"\n\
         tenants = [\"t\"]\nmax_requests_per_sec = 0\n",
        quota_broker::hash_token("c-secret"),
        quota_broker::hash_token("w-secret"),
    );
    let settings = Settings::from_toml(&config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Embedded::spawn(listener, settings).unwrap();
    assert!(server.started().await, "the broker started");
    let client = BrokerClient::connect(&server.url(), Some("c-secret")).unwrap();
    let lease = client.acquire(&q()).await.unwrap();
    assert!(!lease.is_fallback());
    // Just before the renewal (at half the 5 s TTL) the token spends its 5
    // requests a second, so the broker refuses the renewal as overloaded.
    tokio::time::sleep(Duration::from_millis(2_400)).await;
    let busy = BrokerClient::connect(&server.url(), Some("c-secret")).unwrap();
    let mut refused = false;
    for _ in 0..10 {
        let r = busy
            .acquire(&Call::new("t", "GET", "/x").max_wait(Duration::ZERO))
            .await;
        refused |= matches!(r, Err(ClientError::Overloaded { .. }));
    }
    assert!(refused, "the token's request rate was not spent");
    // The renewal is tried again before the lease expires: another caller
    // waiting 20 s (four TTLs) does not get the slot.
    let other = BrokerClient::connect(&server.url(), Some("w-secret")).unwrap();
    let t0 = Instant::now();
    let waited = other.acquire(&q().max_wait(Duration::from_secs(20))).await;
    let waited = waited.map(|l| l.is_fallback());
    assert!(t0.elapsed() >= Duration::from_secs(20), "{waited:?}");
    assert!(
        matches!(waited, Err(ClientError::NotGranted { .. })),
        "the slot was free: {waited:?}"
    );
    drop(lease);
    server.stop().await.unwrap();
}

/// A broker on 127.0.0.1:0 keeping its state in `dir`, the "slots"
/// bucket's lease TTL `ttl_ms`: its settings (to start it again on the same
/// address), address and server.
async fn with_state(dir: &std::path::Path, ttl_ms: u64) -> (Settings, SocketAddr, Embedded) {
    let config = CONFIG
        .replace(
            "state_dir = \"\"",
            &format!("state_dir = {:?}", dir.display().to_string()),
        )
        .replace("lease_ttl_ms = 5000", &format!("lease_ttl_ms = {ttl_ms}"));
    let settings = Settings::from_toml(&config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Embedded::spawn(listener, settings.clone()).unwrap();
    assert!(server.started().await, "the broker started");
    (settings, addr, server)
}

/// A broker killed while a lease is held and back only after the lease's
/// 1 s TTL (as a cluster's election outlasts a short TTL): the holder goes
/// on renewing past the expiry, the restarted broker adopts the lease, and
/// nobody else gets its slot while the call runs.
#[tokio::test(start_paused = true)]
async fn a_lease_whose_broker_is_back_only_after_its_ttl_is_renewed_and_adopted() {
    let dir = testsvc::scratch_dir("renew-past-expiry").unwrap();
    let (settings, addr, server) = with_state(&dir, 1000).await;
    let client = BrokerClient::connect(&server.url(), None).unwrap();
    let lease = client.acquire(&q()).await.unwrap();
    assert!(!lease.is_fallback());
    // Killed: no stop record, so the next run starts in the restart
    // learning mode. Back 3 s later, two TTLs after the lease expired.
    drop(server);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let server = Embedded::spawn(listener, settings).unwrap();
    assert!(server.started().await, "the broker started");
    // Another client waits 10 s (ten TTLs) for the slot: the holder's
    // renewals got it adopted and keep it.
    let other = BrokerClient::connect(&server.url(), None).unwrap();
    let t0 = Instant::now();
    let waited = other.acquire(&q().max_wait(Duration::from_secs(10))).await;
    assert!(t0.elapsed() >= Duration::from_secs(10));
    assert!(
        matches!(waited, Err(ClientError::NotGranted { .. })),
        "the held slot was granted again: {:?}",
        waited.map(|l| l.id().to_owned())
    );
    // Released, it is free at once.
    lease.release().await;
    let again = other.acquire(&q().max_wait(Duration::ZERO)).await.unwrap();
    assert!(!again.is_fallback());
    drop(again);
    server.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// A broker killed while a lease is held, back before the holder renewed
/// it: the holder's release says which Acquire granted the lease, so the
/// new run, which never knew it, frees its slot at once instead of
/// counting it as held by an unknown lease for the whole TTL (ten minutes
/// here).
#[tokio::test(start_paused = true)]
async fn a_lease_released_after_its_broker_crashed_frees_its_slot_at_once() {
    let dir = testsvc::scratch_dir("release-after-crash").unwrap();
    let (settings, addr, server) = with_state(&dir, 600_000).await;
    let client = BrokerClient::connect(&server.url(), None).unwrap();
    let lease = client.acquire(&q()).await.unwrap();
    assert!(!lease.is_fallback());
    // Killed: no stop record, the next run starts in the learning mode,
    // as soon as the port is free again (well within a renewal's 75 s).
    drop(server);
    let mut listener = tokio::net::TcpListener::bind(addr).await;
    for _ in 0..50 {
        if listener.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        listener = tokio::net::TcpListener::bind(addr).await;
    }
    let server = Embedded::spawn(listener.unwrap(), settings).unwrap();
    assert!(server.started().await, "the broker started");
    lease.release().await;
    // A few seconds' wait: the restarted token bucket starts empty.
    let again = client.acquire(&q().max_wait(Duration::from_secs(5))).await;
    assert!(
        matches!(&again, Ok(l) if !l.is_fallback()),
        "the released slot is still counted as held: {:?}",
        again.map(|l| l.is_fallback())
    );
    drop(again);
    server.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// A lease released while the broker is away (a restart, a cluster between
/// leaders) is released once it answers again, not held to its expiry by
/// the broker that took it over.
#[tokio::test(start_paused = true)]
async fn a_release_that_finds_the_broker_away_is_sent_when_it_is_back() {
    let dir = testsvc::scratch_dir("release-kept").unwrap();
    // A TTL no reconnect backoff of the paused clock comes near.
    let (settings, addr, server) = with_state(&dir, 600_000).await;
    let client = BrokerClient::connect(&server.url(), None).unwrap();
    let lease = client.acquire(&q()).await.unwrap();
    // A graceful stop records the lease; the next run holds its slot.
    server.stop().await.unwrap();
    lease.release().await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let server = Embedded::spawn(listener, settings).unwrap();
    assert!(server.started().await, "the broker started");
    // The next call reaches the broker, and the kept release goes with it.
    let other = client.acquire(&Call::new("t", "GET", "/x")).await.unwrap();
    assert!(!other.is_fallback());
    client.flush_reports().await;
    // Free long before the lease's expiry.
    let again = client.acquire(&q().max_wait(Duration::ZERO)).await;
    assert!(
        matches!(&again, Ok(l) if !l.is_fallback()),
        "the released slot is still held: {:?}",
        again.map(|l| l.is_fallback())
    );
    drop((other, again));
    server.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(start_paused = true)]
async fn report_and_the_tower_layer_tell_the_broker_about_429s() {
    let b = broker_on("127.0.0.1:0").await;
    let client = BrokerClient::connect(&b.url(), None).unwrap();
    let lease = client
        .acquire(&Call::new("t", "GET", "/api/v2/users"))
        .await
        .unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("Retry-After", "3".parse().unwrap());
    headers.insert("inin-ratelimit-allowed", "600".parse().unwrap());
    headers.insert("content-type", "application/json".parse().unwrap());
    lease.report(429, &headers).await.unwrap();
    let org = b.bucket("org").await;
    assert_eq!(org.throttled_total, 1);
    assert!(org.frozen_until_ms > org.at_ms);

    // An HTTP client service that answers 429: the layer leases and reports.
    let upstream = tower::service_fn(|req: http::Request<()>| async move {
        assert_eq!(req.uri().path(), "/api/v2/analytics/users/summary");
        Ok::<_, std::convert::Infallible>(
            http::Response::builder()
                .status(429)
                .header("Retry-After", "1")
                .body(())
                .unwrap(),
        )
    });
    let template = Call::new("t", "", "")
        .client_id("wallboard")
        .class("critical")
        .max_wait(Duration::from_secs(10));
    let mut svc = LeaseLayer::new(client.clone(), template).layer(upstream);
    let req = http::Request::get("https://api.mypurecloud.com/api/v2/analytics/users/summary")
        .body(())
        .unwrap();
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(b.bucket("org").await.throttled_total, 2);
    b.stop().await;
}

/// The tower layer's lease lasts until the response's body ends, not its
/// head: a page still streaming holds its concurrency slot.
#[tokio::test(start_paused = true)]
async fn the_tower_layer_holds_the_slot_until_the_body_ends() {
    use http_body_util::{BodyExt, Channel};
    let b = broker_on("127.0.0.1:0").await;
    let client = BrokerClient::connect(&b.url(), None).unwrap();
    let (mut tx, body) = Channel::<bytes::Bytes>::new(1);
    let body = std::sync::Arc::new(std::sync::Mutex::new(Some(body)));
    let upstream = tower::service_fn(move |_: http::Request<()>| {
        let body = body.lock().unwrap().take().expect("one call");
        async move { Ok::<_, std::convert::Infallible>(http::Response::new(body)) }
    });
    let template = Call::new("t", "", "").client_id("pager");
    let mut svc = LeaseLayer::new(client.clone(), template).layer(upstream);
    let req = http::Request::post("https://api.mypurecloud.com/q")
        .body(())
        .unwrap();
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert!(resp.body().holds_lease());
    // Any release under way has reached the broker: none is, the slot is held.
    assert_eq!(client.settle(Duration::from_secs(1)).await, 0);
    assert_eq!(
        b.bucket("slots").await.in_flight,
        1,
        "the head released the slot"
    );
    let busy = client.acquire(&q().max_wait(Duration::ZERO)).await;
    assert!(
        matches!(busy, Err(ClientError::NotGranted { .. })),
        "{:?}",
        busy.err()
    );

    let reader = tokio::spawn(async move { resp.into_body().collect().await });
    tx.send_data(bytes::Bytes::from_static(b"page"))
        .await
        .unwrap();
    drop(tx);
    let read = reader.await.unwrap().unwrap().to_bytes();
    assert_eq!(&read[..], b"page");
    assert_eq!(client.settle(Duration::from_secs(1)).await, 0);
    assert_eq!(
        b.bucket("slots").await.in_flight,
        0,
        "the body's end kept the slot"
    );
    b.stop().await;
}

/// A client of `b` that falls back to `floor_per_min` (half its recent
/// grants) and probes every `probe_s` seconds, and a critical call.
fn fallback_client(b: &Broker, floor_per_min: u32, probe_s: u64) -> (BrokerClient, Call) {
    let settings = FallbackSettings {
        fraction: 0.5,
        floor_per_min,
        probe_every: Duration::from_secs(probe_s),
    };
    let client = BrokerClient::with_fallback(&b.url(), None, settings).unwrap();
    (client, Call::new("t", "GET", "/x").class("critical"))
}

#[tokio::test(start_paused = true)]
async fn falls_back_to_a_paced_local_limiter_and_returns_to_the_broker() {
    let b = broker_on("127.0.0.1:0").await;
    let addr = b.addr;
    let (client, call) = fallback_client(&b, 60, 5);
    for _ in 0..4 {
        assert!(!client.acquire(&call).await.unwrap().is_fallback());
    }
    b.stop().await;

    // Broker gone: leases come from the local limiter at the floor (60/min:
    // 4 recent grants × 0.5 is below it), one a second, never unlimited.
    let t0 = Instant::now();
    for _ in 0..4 {
        assert!(client.acquire(&call).await.unwrap().is_fallback());
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "4 fallback calls in {took:?}"
    );

    // Broker back on the same address: after the probe interval the client uses it again.
    let b = broker_on(&addr.to_string()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lease = client.acquire(&call).await.unwrap();
        if !lease.is_fallback() {
            break;
        }
        assert!(Instant::now() < deadline, "never went back to the broker");
    }
    b.stop().await;
}

/// Falling back, a client whose leases held concurrency slots in the last
/// minute runs at most half as many calls at once as it held (at least
/// one), counting a broker lease still held: an upstream's concurrency
/// limit holds through an outage. A client that held none is not capped.
#[tokio::test(start_paused = true)]
async fn the_fallback_runs_at_most_half_the_slots_held_at_once() {
    let b = broker_on("127.0.0.1:0").await;
    let (client, _) = fallback_client(&b, 6000, 5);
    let (rate_only, _) = fallback_client(&b, 6000, 5);
    let x = || Call::new("t", "GET", "/x").max_wait(Duration::from_secs(1));
    let held = client.acquire(&q()).await.unwrap();
    assert!(!held.is_fallback());
    assert!(!rate_only.acquire(&x()).await.unwrap().is_fallback());
    b.stop().await;

    let busy = client.acquire(&q().max_wait(Duration::ZERO)).await;
    assert!(
        matches!(&busy, Err(ClientError::NotGranted { reason, .. }) if reason.contains("limit of 1 at once")),
        "{:?}",
        busy.map(|l| l.is_fallback())
    );
    let waiting = {
        let client = client.clone();
        tokio::spawn(async move { client.acquire(&q().max_wait(Duration::from_secs(30))).await })
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    let t0 = Instant::now();
    drop(held);
    let first = waiting.await.unwrap().unwrap();
    assert!(first.is_fallback());
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "woken by the next probe, not the lease's end: {:?}",
        t0.elapsed()
    );
    // The one place is taken, whatever the route.
    let other = client.acquire(&x().max_wait(Duration::ZERO)).await;
    assert!(
        matches!(&other, Err(ClientError::NotGranted { .. })),
        "{:?}",
        other.map(|l| l.is_fallback())
    );
    drop(first);
    assert!(client.acquire(&x()).await.unwrap().is_fallback());

    // Rate only: three at once.
    let mut leases = Vec::new();
    for _ in 0..3 {
        let lease = rate_only.acquire(&x()).await.unwrap();
        assert!(lease.is_fallback());
        leases.push(lease);
    }
}

/// Falling back, a caller that said how long it waits is answered "not
/// now" at once when the local limiter has nothing for it within that
/// time, and a 429's Retry-After holds the local limiter.
#[tokio::test(start_paused = true)]
async fn the_fallback_keeps_to_the_callers_wait_and_to_the_upstreams_retry_after() {
    let b = broker_on("127.0.0.1:0").await;
    let (client, call) = fallback_client(&b, 6, 5);
    b.stop().await;
    // 6 a minute: the first call at once, the next 10 s later.
    let first = client.acquire(&call).await.unwrap();
    assert!(first.is_fallback());
    let t0 = Instant::now();
    let quick = client
        .acquire(&call.clone().max_wait(Duration::from_millis(100)))
        .await;
    assert!(
        t0.elapsed() < Duration::from_millis(100),
        "held {:?}",
        t0.elapsed()
    );
    match quick {
        Err(ClientError::NotGranted {
            reason,
            retry_after,
        }) => {
            assert!(reason.contains("local fallback limit of 6/min"), "{reason}");
            // The next probe (every 5 s here), when the broker may be
            // back, not the local permit in 10 s.
            assert_eq!(retry_after, Duration::from_secs(5));
        }
        other => panic!("{:?}", other.map(|l| l.is_fallback())),
    }
    // The upstream says wait a minute: nothing locally before then.
    let mut headers = http::HeaderMap::new();
    headers.insert("Retry-After", "60".parse().unwrap());
    first.report(429, &headers).await.unwrap();
    let held = client
        .acquire(&call.clone().max_wait(Duration::from_secs(30)))
        .await;
    match held {
        Err(ClientError::NotGranted { retry_after, .. }) => assert!(
            retry_after > Duration::from_secs(59) && retry_after <= Duration::from_secs(60),
            "{retry_after:?}"
        ),
        other => panic!("{:?}", other.map(|l| l.is_fallback())),
    }
    let t0 = Instant::now();
    assert!(client.acquire(&call).await.unwrap().is_fallback());
    assert!(
        t0.elapsed() >= Duration::from_secs(59),
        "went ahead after {:?} of a 60 s Retry-After",
        t0.elapsed()
    );
    // A call that gives no wait waits at most the broker's own cap: past
    // it, "not now" at once.
    headers.insert("Retry-After", "90".parse().unwrap());
    first.report(429, &headers).await.unwrap();
    let t0 = Instant::now();
    match client.acquire(&call).await {
        Err(ClientError::NotGranted { retry_after, .. }) => assert!(
            retry_after > Duration::from_secs(89) && retry_after <= Duration::from_secs(90),
            "{retry_after:?}"
        ),
        other => panic!("{:?}", other.map(|l| l.is_fallback())),
    }
    assert_eq!(t0.elapsed(), Duration::ZERO);
    tokio::time::advance(Duration::from_secs(31)).await;
    assert!(
        client.acquire(&call).await.unwrap().is_fallback(),
        "59 s left of the Retry-After: within the cap"
    );
}

/// A TCP proxy in front of a broker that can stop passing bytes, as a
/// host that hangs or is cut off does: connections stay open, nothing is
/// answered.
struct Hangable {
    addr: SocketAddr,
    hung: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Only the broker's answers stop: what the client sends still reaches
    /// it (a broker frozen after reading, as its host's kernel buffers it).
    answers_hung: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Hangable {
    async fn before(to: SocketAddr) -> Hangable {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hung = std::sync::Arc::new(AtomicBool::new(false));
        let answers_hung = std::sync::Arc::new(AtomicBool::new(false));
        let pass = hung.clone();
        let pass_answers = answers_hung.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                for (answers, (mut from, mut to)) in
                    [(false, (ri, wo)), (true, (ro, wi))].map(|(answers, (r, w))| {
                        (
                            answers,
                            (
                                Box::new(r) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                                Box::new(w) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                            ),
                        )
                    })
                {
                    let hung = pass.clone();
                    let answers_hung = pass_answers.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf).await {
                            if n == 0 {
                                return;
                            }
                            if hung.load(Ordering::Relaxed)
                                || (answers && answers_hung.load(Ordering::Relaxed))
                            {
                                std::future::pending::<()>().await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Hangable {
            addr,
            hung,
            answers_hung,
        }
    }

    fn hang(&self) {
        self.hung.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The broker's answers stop (on every connection, open or new).
    fn hang_answers(&self, hung: bool) {
        self.answers_hung
            .store(hung, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A broker whose "slots" leases last ten minutes (only a release frees
/// them within a test), behind a [`Hangable`] proxy.
async fn behind_a_proxy_with_long_leases() -> (Broker, Hangable) {
    let settings =
        Settings::from_toml(&CONFIG.replace("lease_ttl_ms = 5000", "lease_ttl_ms = 600000"))
            .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Embedded::spawn(listener, settings).unwrap();
    assert!(server.started().await, "the broker started");
    let b = Broker {
        addr: server.addr(),
        server,
    };
    let proxy = Hangable::before(b.addr).await;
    (b, proxy)
}

/// The broker reads an Acquire and grants it, but its answer never comes
/// back (a broker frozen after reading it): the client falls back, and
/// once the broker answers again releases the lease by the Acquire's key,
/// so its slot is free long before the lease's expiry. On the real clock:
/// a paused one jumps past the keep-alive while bytes cross the proxy.
#[tokio::test]
async fn a_lease_granted_after_the_client_gave_up_is_released_by_its_key() {
    let (b, proxy) = behind_a_proxy_with_long_leases().await;
    let settings = FallbackSettings {
        fraction: 0.5,
        floor_per_min: 60,
        probe_every: Duration::from_secs(1),
    };
    let client =
        BrokerClient::with_fallback(&format!("http://{}", proxy.addr), None, settings).unwrap();
    client.acquire(&q()).await.unwrap().release().await;
    assert_eq!(b.bucket("slots").await.in_flight, 0);

    proxy.hang_answers(true);
    let lease = tokio::time::timeout(Duration::from_secs(60), client.acquire(&q()))
        .await
        .expect("the call waited on the broker for a minute")
        .unwrap();
    assert!(lease.is_fallback());
    assert_eq!(
        b.bucket("slots").await.in_flight,
        1,
        "the broker granted the Acquire it read"
    );

    proxy.hang_answers(false);
    client.flush_reports().await;
    assert_eq!(
        b.bucket("slots").await.in_flight,
        0,
        "the slot was not released by the Acquire's key"
    );
    b.stop().await;
}

/// The broker grants an Acquire, but the caller gives up on it before the
/// answer arrives (its own timeout, a task aborted at a signal): the lease
/// nobody holds is released by the Acquire's key, not held to its expiry
/// (ten minutes here). On the real clock, as the test above.
#[tokio::test]
async fn a_lease_granted_to_an_acquire_its_caller_dropped_is_released_by_its_key() {
    let (b, proxy) = behind_a_proxy_with_long_leases().await;
    let client = BrokerClient::connect(&format!("http://{}", proxy.addr), None).unwrap();
    client.acquire(&q()).await.unwrap().release().await;

    proxy.hang_answers(true);
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.acquire(&q()).await.map(|l| l.id().to_owned()) }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.bucket("slots").await.in_flight == 0 {
        assert!(
            Instant::now() < deadline,
            "the broker never granted the Acquire"
        );
        tokio::task::yield_now().await;
    }
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());

    proxy.hang_answers(false);
    // The release went out on the hung connection: kept when the
    // keep-alive gives up on it, then sent.
    assert_eq!(client.settle(Duration::from_secs(30)).await, 0);
    client.flush_reports().await;
    assert_eq!(
        b.bucket("slots").await.in_flight,
        0,
        "the slot of the dropped Acquire is still held"
    );
    b.stop().await;
}

/// A broker behind a [`Hangable`] proxy, a client of it falling back at
/// 60 a minute (probing every `probe_every`), and a call it was granted
/// once by the broker.
async fn behind_a_hangable_proxy(probe_every: Duration) -> (Broker, Hangable, BrokerClient, Call) {
    let b = broker_on("127.0.0.1:0").await;
    let proxy = Hangable::before(b.addr).await;
    let settings = FallbackSettings {
        fraction: 0.5,
        floor_per_min: 60,
        probe_every,
    };
    let client =
        BrokerClient::with_fallback(&format!("http://{}", proxy.addr), None, settings).unwrap();
    let call = Call::new("t", "GET", "/x").class("critical");
    assert!(!client.acquire(&call).await.unwrap().is_fallback());
    (b, proxy, client, call)
}

/// The broker's host hangs with a call open: the client's keep-alive
/// notices and the call falls back instead of waiting for ever.
#[tokio::test(start_paused = true)]
async fn a_broker_that_hangs_is_noticed_and_calls_fall_back() {
    let (b, proxy, client, call) = behind_a_hangable_proxy(Duration::from_secs(5)).await;
    proxy.hang();
    let lease = tokio::time::timeout(Duration::from_secs(60), client.acquire(&call))
        .await
        .expect("the call waited on the hung broker for a minute")
        .unwrap();
    assert!(lease.is_fallback());
    b.stop().await;
}

/// Falling back from a hung broker, calls go at the local limiter's rate:
/// neither a probe of the broker nor a report waits for the keep-alive to
/// give up on it (each did: one call in about 10 s at a rate of 60 a
/// minute).
#[tokio::test(start_paused = true)]
async fn falling_back_from_a_hung_broker_calls_go_at_the_fallback_rate() {
    let (b, proxy, client, call) = behind_a_hangable_proxy(Duration::from_secs(1)).await;
    proxy.hang();
    assert!(client.acquire(&call).await.unwrap().is_fallback());
    let started = Instant::now();
    for _ in 0..10 {
        let lease = client.acquire(&call).await.unwrap();
        assert!(lease.is_fallback());
        lease.report(200, &http::HeaderMap::new()).await.unwrap();
    }
    // At one a second, ten calls take about ten seconds of the (paused)
    // clock; a probe or a report waiting on the hung broker took about 5 s
    // each.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "ten calls took {took:?}");
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn calls_waiting_on_the_fallback_take_leases_once_the_broker_is_back() {
    let b = broker_on("127.0.0.1:0").await;
    let addr = b.addr;
    let (client, call) = fallback_client(&b, 6, 1);
    assert!(!client.acquire(&call).await.unwrap().is_fallback());
    b.stop().await;
    // The first call takes the local limiter's one permit; five more wait
    // (one every ten seconds at the floor).
    assert!(client.acquire(&call).await.unwrap().is_fallback());
    let waiting: Vec<_> = (0..5)
        .map(|_| {
            let (client, call) = (client.clone(), call.clone());
            tokio::spawn(async move {
                let lease = client.acquire(&call).await.unwrap();
                (lease.is_fallback(), Instant::now())
            })
        })
        .collect();
    tokio::time::advance(Duration::from_secs(2)).await;
    let back = Instant::now();
    let b = broker_on(&addr.to_string()).await;
    for w in waiting {
        let (fallback, at) = w.await.unwrap();
        assert!(!fallback, "went out unleased after the broker was back");
        assert!(at - back <= Duration::from_secs(3), "{:?} late", at - back);
    }
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn outcomes_from_the_outage_are_reported_once_the_broker_is_back() {
    let b = broker_on("127.0.0.1:0").await;
    let addr = b.addr;
    let (client, call) = fallback_client(&b, 600, 1);
    b.stop().await;
    let mut throttled = http::HeaderMap::new();
    throttled.insert("retry-after", "600".parse().unwrap());
    for status in [200, 429] {
        let lease = client.acquire(&call).await.unwrap();
        assert!(lease.is_fallback());
        lease.report(status, &throttled).await.unwrap();
    }
    let b = broker_on(&addr.to_string()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = 0;
    while sent < 2 {
        sent += client.flush_reports().await;
        assert!(Instant::now() < deadline, "kept outcomes never sent");
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    let org = b.bucket("org").await;
    assert_eq!((org.reports_total, org.throttled_total), (2, 1));
    assert!(
        org.frozen_until_ms > 0,
        "the 429 from the outage froze the bucket"
    );
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_overloaded_broker_says_when_to_retry() {
    let toml = format!(
        "{CONFIG}\n[[auth.tokens]]\nname = \"busy\"\nsha256 = \"{}\"\nrole = \"client\"\n\
         tenants = [\"t\"]\nmax_requests_per_sec = 1\n",
        quota_broker::hash_token("busy-token")
    );
    let settings = Settings::from_toml(&toml).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Embedded::spawn(listener, settings).unwrap();
    assert!(server.started().await, "the broker started");
    let client = BrokerClient::connect(&server.url(), Some("busy-token")).unwrap();
    let call = Call::new("t", "GET", "/x");
    let lease = client.acquire(&call).await.unwrap();
    assert!(!lease.is_fallback());
    drop(lease); // GET /x takes no slot: nothing to release
    match client.acquire(&call).await {
        Err(ClientError::Overloaded {
            message,
            retry_after,
        }) => {
            assert!(message.contains("\"busy\""), "{message}");
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1));
            tokio::time::sleep(retry_after).await;
        }
        other => panic!("expected Overloaded, got {:?}", other.err()),
    }
    assert!(!client.acquire(&call).await.unwrap().is_fallback());
    server.stop().await.unwrap();
}

/// A URL no call could dial is refused when connecting, not read as a
/// broker that is down (every call would quietly run on the fallback); a
/// bare `host:port` is plaintext.
#[tokio::test]
async fn urls_that_cannot_be_dialled_are_refused_and_a_bare_host_port_is_http() {
    for bad in [
        "ftp://127.0.0.1:50051",
        "http://",
        "http:///x",
        "https://:50051",
        "http:/127.0.0.1:50051",
        "htp:/x",
    ] {
        let err = BrokerClient::connect(bad, None).err();
        assert!(
            matches!(err, Some(ClientError::Url { .. })),
            "{bad}: {err:?}"
        );
    }
    let client = BrokerClient::connect("127.0.0.1:50051", None).unwrap();
    assert_eq!(client.current_url(), "http://127.0.0.1:50051");
}

/// `check` at start asks again until its time is up: a broker that starts
/// a moment after the service (both started together) is found, not taken
/// for one that is away after a single try; with none, `Ok(false)` at the
/// end of the time given.
#[tokio::test(start_paused = true)]
async fn check_waits_for_a_broker_that_starts_a_moment_later() {
    let free = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let client = BrokerClient::connect(&format!("http://{addr}"), None).unwrap();
    let started = Instant::now();
    assert!(!client.check("t", Duration::from_secs(2)).await.unwrap());
    assert!(started.elapsed() >= Duration::from_secs(2));
    let later = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        broker_on(&addr.to_string()).await
    });
    assert!(
        client.check("t", Duration::from_secs(5)).await.unwrap(),
        "the broker that started a second later was not found"
    );
    later.await.unwrap().stop().await;
}

/// A broker that answers `check` RESOURCE_EXHAUSTED (the token over its
/// Watch cap) is answering: `Ok(false)` (not checked) at once, not asked
/// again every 250 ms until the time given is spent.
#[tokio::test(start_paused = true)]
async fn check_answers_at_once_when_the_broker_says_the_caller_is_over_its_limits() {
    let toml = format!(
        "{CONFIG}\n[[auth.tokens]]\nname = \"capped\"\nsha256 = \"{}\"\nrole = \"client\"\n\
         tenants = [\"t\"]\nmax_watch_streams = 1\n",
        quota_broker::hash_token("capped-token")
    );
    let settings = Settings::from_toml(&toml).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Embedded::spawn(listener, settings).unwrap();
    assert!(server.started().await, "the broker started");
    // The token's one Watch stream, held open.
    let mut watcher =
        quota_broker::pb::quota_broker_client::QuotaBrokerClient::connect(server.url())
            .await
            .unwrap();
    let mut held = tonic::Request::new(quota_broker::pb::WatchRequest { tenant: "t".into() });
    held.metadata_mut()
        .insert("authorization", "Bearer capped-token".parse().unwrap());
    let mut held = watcher.watch(held).await.unwrap().into_inner();
    held.message().await.unwrap();
    let client = BrokerClient::connect(&server.url(), Some("capped-token")).unwrap();
    let started = Instant::now();
    assert!(!client.check("t", Duration::from_secs(5)).await.unwrap());
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "asked again for {:?}",
        started.elapsed()
    );
    drop(held);
    server.stop().await.unwrap();
}
