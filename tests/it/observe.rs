//! Observability: the HTTP port (/metrics, the event feed, probes),
//! reflection v1alpha, per-service health, request ids and JSON logs.

use super::harness::req;
use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{AcquireResponse, ListBucketsRequest, ReportRequest};
use quota_broker::{Listeners, Settings};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

/// Bound on every wait of these tests.
const LIMIT: Duration = Duration::from_secs(20);

pub struct Observed {
    pub channel: Channel,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), quota_broker::ServerError>>,
}

impl Observed {
    pub fn client(&self) -> QuotaBrokerClient<Channel> {
        QuotaBrokerClient::new(self.channel.clone())
    }

    pub fn admin(&self) -> QuotaAdminClient<Channel> {
        QuotaAdminClient::new(self.channel.clone())
    }

    /// Asks the broker to shut down, without waiting for it.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub async fn stop(mut self) {
        self.signal_stop();
        tokio::time::timeout(LIMIT, &mut self.server)
            .await
            .expect("the broker stops within the limit")
            .unwrap()
            .unwrap();
    }
}

/// A broker with its HTTP port, both on ephemeral loopback ports.
pub async fn start(toml: &str) -> Observed {
    let settings = Settings::from_toml(toml).expect("test config is valid");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let listeners = Listeners {
        grpc,
        http: Some(http),
    };
    let server = tokio::spawn(async move {
        quota_broker::serve(listeners, &settings, async {
            let _ = stopped.await;
        })
        .await
    });
    let channel = Endpoint::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Health says SERVING once both ports serve the broker's routes.
    super::harness::serving(&channel).await;
    Observed {
        channel,
        grpc: grpc_addr,
        http: http_addr,
        stop: Some(stop),
        server,
    }
}

const BUCKETS: &str =
    "[[tenants.buckets]]\nname = \"users\"\nroutes = [\"GET /api/v2/users/**\"]\n\
                       permits = 2\nwindow_ms = 60000\nmax_in_flight = 5\n";

pub fn config(extra: &str) -> String {
    format!(
        "[server]\nshutdown_grace_ms = 2000\nstate_dir = \"\"\n{extra}\n[[tenants]]\nid = \"t\"\n{BUCKETS}\
         [[tenants]]\nid = \"u\"\n{BUCKETS}"
    )
}

/// An HTTP/1.1 response: status, headers (lower-case names), body.
pub struct HttpResponse {
    pub status: u16,
    headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends a GET and reads the status line and headers; the body stays in the
/// reader (bodies are read by [`get`] or as an event stream). Written by
/// hand: the test needs one GET and a chunked event stream, not an HTTP
/// client's dependencies.
pub async fn open(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (HttpResponse, BufReader<TcpStream>) {
    send(addr, "GET", path, headers).await
}

/// [`open`] with any method (no body).
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (HttpResponse, BufReader<TcpStream>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The test's own Host header, if it gives one.
    let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if method != "GET" {
        request.push_str("Content-Length: 0\r\n");
    }
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await.unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP status line: {line:?}"));
    let mut response = HttpResponse {
        status,
        headers: Vec::new(),
        body: String::new(),
    };
    loop {
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            response
                .headers
                .push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    (response, reader)
}

/// Reads one chunk of a chunked body (`None` at its end).
async fn chunk(reader: &mut BufReader<TcpStream>) -> Option<String> {
    let mut size = String::new();
    reader.read_line(&mut size).await.ok()?;
    let n = usize::from_str_radix(size.trim(), 16).ok()?;
    if n == 0 {
        return None;
    }
    let mut data = vec![0; n + 2];
    reader.read_exact(&mut data).await.ok()?;
    data.truncate(n);
    String::from_utf8(data).ok()
}

pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    tokio::time::timeout(LIMIT, async {
        let (mut response, mut reader) = open(addr, path, headers).await;
        if response.header("transfer-encoding") == Some("chunked") {
            while let Some(c) = chunk(&mut reader).await {
                response.body.push_str(&c);
            }
        } else {
            reader.read_to_string(&mut response.body).await.unwrap();
        }
        response
    })
    .await
    .expect("the HTTP answer came within the limit")
}

/// The value of the sample `name{labels}` in a metrics text, if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_count_on_the_path_and_read_the_buckets_at_scrape_time() {
    let b = start(&config("")).await;
    let mut client = b.client();
    // Two permits a minute: two grants, then a denial for the rate.
    for _ in 0..2 {
        let r = client
            .acquire(req("GET", "/api/v2/users/1", 0))
            .await
            .unwrap()
            .into_inner();
        assert!(r.granted);
    }
    let r = client
        .acquire(req("GET", "/api/v2/users/1", 0))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.granted);
    client
        .report(ReportRequest {
            tenant: "t".into(),
            method: "GET".into(),
            path: "/api/v2/users/1".into(),
            http_status: 429,
            retry_after_ms: 30_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let m = get(
        b.http,
        "/metrics",
        &[(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )],
    )
    .await;
    assert_eq!(m.status, 200);
    assert!(m
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/openmetrics-text")));
    assert!(m.body.ends_with("# EOF\n"));
    let text = &m.body;
    let t = "tenant=\"t\"";
    let tb = "tenant=\"t\",bucket=\"users\"";
    let expect = [
        (
            format!("quota_broker_grants_total{{{t},class=\"batch\"}}"),
            2.0,
        ),
        (
            format!("quota_broker_denials_total{{{t},class=\"batch\",reason=\"rate\"}}"),
            1.0,
        ),
        (
            format!("quota_broker_reports_total{{{tb},status=\"429\"}}"),
            1.0,
        ),
        (format!("quota_broker_bucket_grants_total{{{tb}}}"), 2.0),
        (format!("quota_broker_throttled_total{{{tb}}}"), 1.0),
        (format!("quota_broker_freezes_total{{{tb}}}"), 1.0),
        (format!("quota_broker_frozen{{{tb}}}"), 1.0),
        (format!("quota_broker_slots_max{{{tb}}}"), 5.0),
        // Alone, a broker grants for every tenant configured.
        ("quota_broker_tenants".to_owned(), 2.0),
        ("quota_broker_tenants_led".to_owned(), 2.0),
        // Untouched tenant "u": its series exist, at zero.
        (
            "quota_broker_bucket_grants_total{tenant=\"u\",bucket=\"users\"}".to_owned(),
            0.0,
        ),
        (
            "quota_broker_rpc_duration_seconds_count{method=\"/quota.v1.QuotaBroker/Acquire\"}"
                .to_owned(),
            3.0,
        ),
    ];
    for (series, value) in expect {
        assert_eq!(sample(text, &series), Some(value), "{series} in\n{text}");
    }
    let configured = sample(
        text,
        &format!("quota_broker_configured_rate_per_second{{{tb}}}"),
    )
    .expect("configured rate exported");
    assert!((configured - 2.0 / 60.0).abs() < 1e-9, "{configured}");
    let left = sample(
        text,
        &format!("quota_broker_freeze_remaining_seconds{{{tb}}}"),
    )
    .expect("freeze countdown exported");
    assert!(left > 0.0 && left <= 31.0, "{left}");
    // No unbounded label: no lease ids, paths or client ids.
    assert!(!text.contains("/api/v2"), "a path leaked into a label");
    assert!(
        !text.contains("client_id"),
        "a client id leaked into a label"
    );
    b.stop().await;
}

#[tokio::test]
async fn a_buckets_totals_keep_what_its_dropped_instances_counted() {
    let b = start(
        "[server]\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\n\
         name = \"pc\"\nscope = \"oauth_client\"\nroutes = [\"POST /q\"]\nmax_in_flight = 1\n\
         max_clients = 1\nlease_ttl_ms = 60000\n",
    )
    .await;
    let mut client = b.client();
    // Client a's instance grants one and goes idle; client b needs its
    // place (one instance at most), so a's instance is dropped.
    for oauth in ["a", "b"] {
        let mut r = req("POST", "/q", 0);
        r.oauth_client = oauth.into();
        let g = client.acquire(r).await.unwrap().into_inner();
        assert!(g.granted, "{}", g.reason);
        client
            .release(quota_broker::pb::ReleaseRequest {
                lease_id: g.lease_id,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let m = get(b.http, "/metrics", &[]).await;
    let series = "quota_broker_bucket_grants_total{tenant=\"t\",bucket=\"pc\"}";
    assert_eq!(
        sample(&m.body, series),
        Some(2.0),
        "a counter went down:\n{}",
        m.body
    );
    b.stop().await;
}

/// A per-OAuth-client bucket's rates are its clients' summed, and the
/// most cut client is exported apart: the sum hides one client cut to a
/// fraction among many at their full rate.
#[tokio::test]
async fn a_per_client_buckets_most_cut_client_is_exported() {
    let b = start(
        "[server]\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\n\
         name = \"pc\"\nscope = \"oauth_client\"\nroutes = [\"GET /q\"]\npermits = 60\n\
         window_ms = 60000\n",
    )
    .await;
    let mut client = b.client();
    for oauth in ["a", "b", "c"] {
        let mut r = req("GET", "/q", 0);
        r.oauth_client = oauth.into();
        let g = client.acquire(r).await.unwrap().into_inner();
        assert!(g.granted, "{}", g.reason);
    }
    // Client a's 429 without a Retry-After cuts its instance alone.
    client
        .report(ReportRequest {
            tenant: "t".into(),
            method: "GET".into(),
            path: "/q".into(),
            oauth_client: "a".into(),
            http_status: 429,
            ..Default::default()
        })
        .await
        .unwrap();
    let listed = QuotaAdminClient::new(b.channel.clone())
        .list_buckets(ListBucketsRequest { tenant: "t".into() })
        .await
        .unwrap()
        .into_inner()
        .buckets;
    assert_eq!(listed.len(), 3, "{listed:?}");
    let share =
        |s: &quota_broker::pb::QuotaStatus| s.effective_rate_per_min / s.configured_rate_per_min;
    let lowest = listed.iter().map(share).fold(f64::INFINITY, f64::min);
    let summed = listed.iter().map(|s| s.effective_rate_per_min).sum::<f64>()
        / listed
            .iter()
            .map(|s| s.configured_rate_per_min)
            .sum::<f64>();
    assert!(lowest < 1.0, "the 429 cut nothing: {listed:?}");
    let m = get(b.http, "/metrics", &[]).await.body;
    let at = |name: &str| {
        sample(
            &m,
            &format!("quota_broker_{name}{{tenant=\"t\",bucket=\"pc\"}}"),
        )
        .unwrap_or_else(|| panic!("no {name} in\n{m}"))
    };
    assert!(
        (at("effective_rate_lowest_share") - lowest).abs() < 1e-9,
        "{m}"
    );
    assert!(
        (at("effective_rate_per_second") / at("configured_rate_per_second") - summed).abs() < 1e-9,
        "{m}"
    );
    assert!(summed > lowest + 0.05, "{summed} {lowest}");
    b.stop().await;
}

/// The series of tenant `tenant` in a metrics text, by name.
fn series_of<'a>(text: &'a str, tenant: &str) -> Vec<&'a str> {
    let label = format!("tenant=\"{tenant}\"");
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(&label))
        .collect()
}

/// A tenant with no traffic exports its buckets' state and its leases,
/// a bounded few series (made up front, its per-class series were some
/// 160 more, nearly all zeros: a 137 MB scrape at 10,000 tenants); its
/// counts per class, reason and status appear with their first use, of the
/// class used only.
#[tokio::test]
async fn an_idle_tenant_exports_few_series_and_a_used_one_what_it_used() {
    let b = start(&config("")).await;
    // Per bucket: 3 counters, 12 gauges of its state (rate and slots) and
    // a waiters gauge per class (4 and `other`); per tenant: leases_held.
    const IDLE: usize = 3 + 12 + 5 + 1;
    let idle = get(b.http, "/metrics", &[]).await.body;
    for tenant in ["t", "u"] {
        let series = series_of(&idle, tenant);
        assert_eq!(series.len(), IDLE, "{series:#?}");
        assert!(
            series
                .iter()
                .all(|l| !l.contains("_total{") || l.contains("bucket=")),
            "{series:#?}"
        );
        assert_eq!(
            sample(
                &idle,
                &format!("quota_broker_waiters{{tenant=\"{tenant}\",bucket=\"users\",class=\"critical\"}}")
            ),
            Some(0.0)
        );
    }
    let mut client = b.client();
    // Two permits a minute: two grants, then a denial for the rate.
    for granted in [true, true, false] {
        let r = client
            .acquire(req("GET", "/api/v2/users/1", 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.granted, granted, "{}", r.reason);
    }
    let used = get(b.http, "/metrics", &[]).await.body;
    assert_eq!(series_of(&used, "u"), series_of(&idle, "u"));
    let t = series_of(&used, "t");
    assert_eq!(t.len(), IDLE + 2, "{t:#?}");
    for line in [
        "quota_broker_grants_total{tenant=\"t\",class=\"batch\"} 2",
        "quota_broker_denials_total{tenant=\"t\",class=\"batch\",reason=\"rate\"} 1",
    ] {
        assert!(t.contains(&line), "{line} in {t:#?}");
    }
    b.stop().await;
}

/// A per-OAuth-client bucket with no instance (no client yet; all dropped
/// for idleness) exports its own state: no instances, nobody waiting, and
/// the figures of a fresh instance, what its next client gets. An
/// operator's pause of it shows at once, before any client is refused.
#[tokio::test]
async fn an_idle_per_client_bucket_shows_its_state_and_its_pause() {
    let b = start(
        "[server]\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\n\
         name = \"pc\"\nscope = \"oauth_client\"\nroutes = [\"GET /q\"]\npermits = 60\n\
         window_ms = 60000\nmax_in_flight = 2\n",
    )
    .await;
    let at = |text: &str, name: &str| {
        sample(
            text,
            &format!("quota_broker_{name}{{tenant=\"t\",bucket=\"pc\"}}"),
        )
    };
    let idle = get(b.http, "/metrics", &[]).await.body;
    for (name, value) in [
        ("instances", 0.0),
        ("paused", 0.0),
        ("frozen", 0.0),
        ("configured_rate_per_second", 1.0),
        ("effective_rate_per_second", 1.0),
        ("tokens", 60.0),
        ("slots_in_flight", 0.0),
        ("slots_max", 2.0),
        ("bucket_grants_total", 0.0),
    ] {
        assert_eq!(at(&idle, name), Some(value), "{name} in\n{idle}");
    }
    assert_eq!(
        sample(
            &idle,
            "quota_broker_waiters{tenant=\"t\",bucket=\"pc\",class=\"critical\"}"
        ),
        Some(0.0),
        "{idle}"
    );
    // No client uses it: its most cut client's share says nothing.
    assert_eq!(at(&idle, "effective_rate_lowest_share"), None, "{idle}");
    b.admin()
        .pause_bucket(quota_broker::pb::PauseBucketRequest {
            tenant: "t".into(),
            bucket: "pc".into(),
            reason: "maintenance".into(),
        })
        .await
        .unwrap();
    let paused = get(b.http, "/metrics", &[]).await.body;
    assert_eq!(at(&paused, "paused"), Some(1.0), "{paused}");
    assert_eq!(at(&paused, "instances"), Some(0.0), "{paused}");
    b.stop().await;
}

#[tokio::test]
async fn an_open_brokers_event_feed_and_metrics_answer_only_localhost_or_an_ip() {
    let b = start(&config("")).await;
    let port = b.http.port();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "[::1]".into(),
    ] {
        let (head, _feed) = open(b.http, "/events", &[("Host", &host)]).await;
        assert_eq!(head.status, 200, "{host}");
    }
    // A name that a hostile page's domain may have been rebound to.
    let r = get(b.http, "/events", &[("Host", "attacker.example:9464")]).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("DNS"), "{}", r.body);
    // The metrics show the same buckets: on a loopback port, likewise.
    let r = get(b.http, "/metrics", &[("Host", "attacker.example:9464")]).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("DNS"), "{}", r.body);
    let r = get(
        b.http,
        "/metrics",
        &[("Host", &format!("localhost:{port}"))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A query the feed cannot read says what it takes.
    let r = get(b.http, "/events?tenant=t&tenant=u", &[]).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("duplicate field") && r.body.contains("each at most once"),
        "{}",
        r.body
    );
    b.stop().await;
}

#[tokio::test]
async fn waiters_of_a_class_added_at_run_time_are_labelled_other() {
    use quota_broker::pb::{PriorityClass, SetPriorityClassRequest};
    let b = start(&config("")).await;
    QuotaAdminClient::new(b.channel.clone())
        .set_priority_class(SetPriorityClassRequest {
            reset: false,
            tenant: "t".into(),
            class: Some(PriorityClass {
                name: "reports".into(),
                order: 1,
                weight: 1,
                reserve: 0.0,
                default_max_wait_ms: 0,
            }),
        })
        .await
        .unwrap();
    // Two permits a minute: the third Acquire, of the new class, waits.
    let mut client = b.client();
    for _ in 0..2 {
        assert!(
            client
                .acquire(req("GET", "/api/v2/users/1", 0))
                .await
                .unwrap()
                .into_inner()
                .granted
        );
    }
    let waiting = tokio::spawn({
        let mut client = b.client();
        async move {
            let mut r = req("GET", "/api/v2/users/1", 50_000);
            r.priority_class = "reports".into();
            client.acquire(r).await
        }
    });
    let other = "quota_broker_waiters{tenant=\"t\",bucket=\"users\",class=\"other\"}";
    let text = tokio::time::timeout(LIMIT, async {
        loop {
            let m = get(b.http, "/metrics", &[]).await;
            if sample(&m.body, other) == Some(1.0) {
                return m.body;
            }
        }
    })
    .await
    .expect("the waiter was exported under class other");
    assert!(!text.contains("class=\"reports\""), "{text}");
    waiting.abort();
    b.stop().await;
}

/// A gRPC message frame: uncompressed, length-prefixed.
fn grpc_frame(message: &impl prost::Message) -> bytes::Bytes {
    let body = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&body);
    frame.into()
}

/// A unary Acquire on a raw HTTP/2 connection, its request body not yet
/// sent (end of stream not set).
fn open_acquire(
    h2: &mut h2::client::SendRequest<bytes::Bytes>,
    grpc: SocketAddr,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let request =
        tonic::codegen::http::Request::post(format!("http://{grpc}/quota.v1.QuotaBroker/Acquire"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
    h2.send_request(request, false).unwrap()
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

/// An answer read off a raw HTTP/2 stream: its headers, its body and its
/// trailers (none for a trailers-only answer).
async fn read_answer(
    response: h2::client::ResponseFuture,
) -> (
    tonic::codegen::http::HeaderMap,
    Vec<u8>,
    Option<tonic::codegen::http::HeaderMap>,
) {
    tokio::time::timeout(LIMIT, async {
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        let headers = response.headers().clone();
        let mut body = response.into_body();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.unwrap();
        (headers, data, trailers)
    })
    .await
    .expect("answered within the limit")
}

/// Acquire frames its own answers (src/grpc/fast.rs): seen from a client
/// other than tonic's, they are plain gRPC, and what that framing does not
/// take (compression) still gets tonic's answer.
#[tokio::test]
async fn acquire_answers_are_plain_grpc_on_the_wire() {
    let b = start(&config("")).await;
    let tcp = TcpStream::connect(b.grpc).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let frame = grpc_frame(&req("GET", "/api/v2/users/1", 0));

    // The message split over two DATA frames, the first inside the prefix.
    let mut h2 = h2.ready().await.unwrap();
    let (response, mut body) = open_acquire(&mut h2, b.grpc);
    body.send_data(frame.slice(..3), false).unwrap();
    body.send_data(frame.slice(3..), true).unwrap();
    let (headers, data, trailers) = read_answer(response).await;
    assert_eq!(headers["content-type"], "application/grpc");
    assert_eq!(headers["x-request-id"].len(), 16);
    assert!(
        !headers.contains_key("content-length"),
        "gRPC answers carry no content-length: {headers:?}"
    );
    assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
    assert_eq!(data[0], 0, "not compressed");
    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    assert_eq!(len, data.len() - 5, "one message, its length as prefixed");
    let answer = <AcquireResponse as prost::Message>::decode(&data[5..]).unwrap();
    assert!(answer.granted, "{answer:?}");
    assert_eq!(answer.buckets, ["users"]);

    // A body that ends inside its message: a trailers-only INTERNAL.
    let mut h2 = h2.ready().await.unwrap();
    let (response, mut body) = open_acquire(&mut h2, b.grpc);
    body.send_data(frame.slice(..frame.len() - 1), true)
        .unwrap();
    let (headers, data, trailers) = read_answer(response).await;
    assert_eq!(headers["grpc-status"], "13", "{headers:?}");
    assert!(data.is_empty() && trailers.is_none());

    // Compressed: tonic's answer, as for every other method (no
    // compression is enabled).
    let mut h2 = h2.ready().await.unwrap();
    let request = tonic::codegen::http::Request::post(format!(
        "http://{}/quota.v1.QuotaBroker/Acquire",
        b.grpc
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-encoding", "gzip")
    .body(())
    .unwrap();
    let (response, mut body) = h2.send_request(request, false).unwrap();
    body.send_data(frame.clone(), true).unwrap();
    let (headers, _, _) = read_answer(response).await;
    assert_eq!(headers["grpc-status"], "12", "{headers:?}");
    b.stop().await;
}

/// After a crash every free slot counts as held by an unknown lease of the
/// run before; `/metrics` says how many, so on-call does not read them as
/// load. (A graceful stop records its leases and leaves none.)
#[tokio::test]
async fn slots_held_over_from_before_a_crash_are_shown_apart() {
    let dir = crate::harness::fresh_dir("held-over");
    let config = format!(
        r#"[server]
state_dir = "{}"
shutdown_grace_ms = 1000
[[tenants]]
id = "t"
[[tenants.buckets]]
name = "jobs"
routes = ["* /**"]
max_in_flight = 5
lease_ttl_ms = 60000
"#,
        dir.display()
    );
    let held_over = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("quota_broker_slots_held_over{"))
            .map(str::to_owned)
    };
    let b = start(&config).await;
    let metrics = get(b.http, "/metrics", &[]).await.body;
    assert_eq!(
        held_over(&metrics).as_deref(),
        Some("quota_broker_slots_held_over{tenant=\"t\",bucket=\"jobs\"} 0.0"),
        "{metrics}"
    );
    // A bucket without a rate has no token gauge (0 would read as
    // exhausted), and its waiters series are there at 0, not missing.
    assert!(
        !metrics.contains("quota_broker_tokens{tenant=\"t\",bucket=\"jobs\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("quota_broker_waiters{tenant=\"t\",bucket=\"jobs\",class=\"other\"} 0\n"),
        "{metrics}"
    );
    b.stop().await;
    // What a crash leaves: the state file, no record of the leases.
    std::fs::remove_file(dir.join("stopped.json")).unwrap();
    let b = start(&config).await;
    let metrics = get(b.http, "/metrics", &[]).await.body;
    b.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        held_over(&metrics).as_deref(),
        Some("quota_broker_slots_held_over{tenant=\"t\",bucket=\"jobs\"} 5.0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("quota_broker_slots_in_flight{tenant=\"t\",bucket=\"jobs\"} 5.0"),
        "{metrics}"
    );
}

/// A state directory that breaks while the broker runs (removed, replaced,
/// its disk full) does not stop it, but `/metrics` says its learned state
/// is no longer saved.
#[tokio::test]
async fn a_state_directory_that_breaks_is_shown_in_the_metrics() {
    let dir = crate::harness::fresh_dir("state-breaks");
    let b = start(&format!(
        "[server]\nstate_dir = \"{}\"\nshutdown_grace_ms = 1000\n[[tenants]]\nid = \"t\"\n{BUCKETS}",
        dir.display()
    ))
    .await;
    let failing = |text: &str| sample(text, "quota_broker_state_save_failing");
    assert_eq!(failing(&get(b.http, "/metrics", &[]).await.body), Some(0.0));
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, "not a directory").unwrap();
    // Something learned, to be saved.
    b.client()
        .report(ReportRequest {
            tenant: "t".into(),
            method: "GET".into(),
            path: "/api/v2/users/1".into(),
            http_status: 429,
            retry_after_ms: 1_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let seen = tokio::time::timeout(LIMIT, async {
        loop {
            let text = get(b.http, "/metrics", &[]).await.body;
            if failing(&text) == Some(1.0) {
                return;
            }
        }
    })
    .await;
    b.stop().await;
    let _ = std::fs::remove_file(&dir);
    seen.expect("state_save_failing turned 1 once the state directory broke");
}

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

pub const TOKEN: &str = "t-only-token";

pub fn tokens_config() -> String {
    format!(
        "[[auth.tokens]]\nname = \"t-reader\"\nsha256 = \"{}\"\nrole = \"client\"\ntenants = [\"t\"]\n",
        quota_broker::hash_token(TOKEN)
    )
}

/// `message` as a call with `authorization: Bearer <token>`.
fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Reads server-sent events until a `bucket` event satisfies `pred`.
async fn next_event(
    reader: &mut BufReader<TcpStream>,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    next_of(reader, "bucket", pred).await
}

/// Reads server-sent events until one of `kind` satisfies `pred`.
pub async fn next_of(
    reader: &mut BufReader<TcpStream>,
    kind: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let kind = format!("event: {kind}");
    tokio::time::timeout(LIMIT, async {
        let mut pending = String::new();
        loop {
            let c = chunk(reader).await.expect("the event feed ended early");
            pending.push_str(&c);
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                let data = event
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .filter(|_| event.lines().any(|l| l == kind))
                    .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok());
                if let Some(v) = data.filter(|v| pred(v)) {
                    return v;
                }
            }
        }
    })
    .await
    .expect("the expected event came within the limit")
}

#[tokio::test]
async fn the_event_feed_needs_a_token_and_shows_only_its_tenants() {
    let b = start(&config(&tokens_config())).await;
    let none = get(b.http, "/events", &[]).await;
    assert_eq!(none.status, 401, "{}", none.body);
    assert!(none.body.contains("#token="), "{}", none.body);
    assert!(
        none.body.starts_with("no token;"),
        "HTTP words: {}",
        none.body
    );
    let wrong = get(b.http, "/events?token=nope", &[]).await;
    assert_eq!(wrong.status, 401);
    let other = get(b.http, &format!("/events?tenant=u&token={TOKEN}"), &[]).await;
    assert_eq!(other.status, 403, "{}", other.body);
    // Counted where gRPC's refusals are, with the code gRPC would say.
    let metrics = get(b.http, "/metrics", &[]).await.body;
    for line in [
        "quota_broker_rpc_refusals_total{method=\"/events\",code=\"unauthenticated\"} 2",
        "quota_broker_rpc_refusals_total{method=\"/events\",code=\"permission_denied\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in:\n{metrics}"
        );
    }

    let bearer = format!("Bearer {TOKEN}");
    let (head, mut feed) = open(b.http, "/events", &[("Authorization", &bearer)]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    let first = next_event(&mut feed, |_| true).await;
    assert_eq!(first["tenant"], "t", "only tenant t is visible: {first}");
    assert_eq!(first["bucket"], "users");
    assert_eq!(first["granted_total"], 0);

    // A grant on t arrives as a change, on the same feed Watch uses.
    let mut client = b.client();
    let mut r = req("GET", "/api/v2/users/1", 0);
    r.tenant = "t".into();
    assert!(
        client
            .acquire(with_token(r, TOKEN))
            .await
            .unwrap()
            .into_inner()
            .granted
    );
    let changed = next_event(&mut feed, |v| v["granted_total"] == 1).await;
    assert_eq!(changed["tenant"], "t");
    assert_eq!(changed["in_flight"], 1);
    assert_eq!(changed["max_in_flight"], 5);
    drop(feed);
    b.stop().await;
}

/// Reads a feed's opening `history` events (up to its first `bucket`
/// event).
async fn history_of(reader: &mut BufReader<TcpStream>) -> Vec<serde_json::Value> {
    tokio::time::timeout(LIMIT, async {
        let (mut pending, mut out) = (String::new(), Vec::new());
        loop {
            let c = chunk(reader).await.expect("the event feed ended early");
            pending.push_str(&c);
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                if event.lines().any(|l| l == "event: bucket") {
                    return out;
                }
                if event.lines().any(|l| l == "event: history") {
                    let data = event.lines().find_map(|l| l.strip_prefix("data: "));
                    out.push(serde_json::from_str(data.unwrap_or_default()).unwrap());
                }
            }
        }
    })
    .await
    .expect("the feed's history came within the limit")
}

/// Moves a paused clock on by `d` a tenth of a second at a time, letting
/// the broker's tasks run at each step, so the history's sampler takes each
/// of its ticks on the way (one `advance` of the whole would wake it once).
async fn pass_in_steps(d: Duration) {
    let step = Duration::from_millis(100);
    for _ in 0..d.as_millis() / step.as_millis() {
        tokio::time::advance(step).await;
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_page_opened_later_is_sent_the_last_minutes_of_its_tenants() {
    let b = start(&config(&tokens_config())).await;
    let bearer = format!("Bearer {TOKEN}");
    let mut client = b.client();
    let grant = || {
        let mut r = req("GET", "/api/v2/users/1", 0);
        r.tenant = "t".into();
        let mut client = client.clone();
        async move {
            client
                .acquire(with_token(r, TOKEN))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let first = grant().await;
    assert!(first.granted, "{}", first.reason);
    pass_in_steps(Duration::from_secs(4)).await;
    assert!(grant().await.granted);
    pass_in_steps(Duration::from_secs(4)).await;
    // Just before the page opens: it still sees this.
    let release = quota_broker::pb::ReleaseRequest {
        lease_id: first.lease_id,
        ..Default::default()
    };
    client.release(with_token(release, TOKEN)).await.unwrap();

    let (head, mut feed) = open(b.http, "/events", &[("Authorization", &bearer)]).await;
    assert_eq!(head.status, 200);
    let history = history_of(&mut feed).await;
    assert_eq!(history.len(), 1, "only tenant t's one bucket: {history:?}");
    let h = &history[0];
    assert_eq!((&h["tenant"], &h["bucket"]), (&"t".into(), &"users".into()));
    // [ms ago, allowed/min, configured/min, granted, 429s, in flight, max]
    let points = h["points"].as_array().unwrap();
    let at = |granted: u64| {
        points
            .iter()
            .find(|p| p[3] == granted)
            .unwrap_or_else(|| panic!("no point with {granted} granted: {points:?}"))
    };
    assert!(
        at(1)[0].as_u64() >= Some(at(2)[0].as_u64().unwrap() + 2_000),
        "one grant, then two, steps apart: {points:?}"
    );
    assert_eq!(at(1)[5], 1, "{points:?}");
    let last = points.last().unwrap();
    assert_eq!(
        (&last[3], &last[5], &last[6]),
        (&2.into(), &1.into(), &5.into())
    );
    assert_eq!(last[0], 0, "read as the page opened: {points:?}");
    assert_eq!(last[2], 2.0);
    drop(feed);
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_feed_says_which_instances_exist_and_what_dropped_ones_counted() {
    let b = start(
        "[server]\nshutdown_grace_ms = 2000\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n\
         [[tenants.buckets]]\nname = \"routing\"\nscope = \"oauth_client\"\n\
         routes = [\"GET /api/v2/routing/**\"]\npermits = 60\nwindow_ms = 60000\n",
    )
    .await;
    let client = b.client();
    let grant = |oauth_client: &str| {
        let mut r = req("GET", "/api/v2/routing/queues", 0);
        r.tenant = "t".into();
        r.oauth_client = oauth_client.into();
        let mut client = client.clone();
        async move { client.acquire(r).await.unwrap().into_inner().granted }
    };
    assert!(grant("a").await && grant("a").await && grant("b").await);
    // Idle and full again: the broker drops both instances (Watch does
    // not say so), keeping what they counted for the bucket's totals.
    // On the paused clock: it advances through every timer due meanwhile.
    tokio::time::sleep(Duration::from_secs(180)).await; // paused
    assert!(grant("c").await);
    let (head, mut feed) = open(b.http, "/events", &[]).await;
    assert_eq!(head.status, 200);
    let census = next_of(&mut feed, "instances", |_| true).await;
    assert_eq!(
        census["instances"],
        serde_json::json!(["t/routing/c"]),
        "{census}"
    );
    assert_eq!(
        census["retired"],
        serde_json::json!([{"tenant": "t", "bucket": "routing", "granted": 3, "throttled": 0}]),
        "{census}"
    );
    // Re-created at 0 on its next call.
    assert!(grant("a").await);
    let again = next_event(&mut feed, |v| v["oauth_client"] == "a").await;
    assert_eq!(again["granted_total"], 1);
    drop(feed);
    b.stop().await;
}

#[tokio::test]
async fn the_page_trades_its_token_for_a_cookie_only_the_feed_gets() {
    let b = start(&config(&tokens_config())).await;
    let post = |headers: Vec<(&'static str, String)>| async move {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (head, _) = send(b.http, "POST", "/session", &h).await;
        head
    };
    let none = post(vec![]).await;
    assert_eq!(none.status, 401);
    let wrong = post(vec![("Authorization", "Bearer nope".into())]).await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.header("set-cookie").is_none());

    // The scheme in any case, as gRPC takes it.
    let ok = post(vec![("Authorization", format!("bearer  {TOKEN}"))]).await;
    assert_eq!(ok.status, 204);
    let cookie = ok
        .header("set-cookie")
        .expect("a session cookie")
        .to_owned();
    let name = format!("qb_session_{}", b.http.port());
    assert!(cookie.starts_with(&format!("{name}=")), "{cookie}");
    for attribute in ["Path=/events", "HttpOnly", "SameSite=Strict", "Max-Age="] {
        assert!(cookie.contains(attribute), "{attribute} in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    let pair = cookie.split(';').next().unwrap();
    // Not the token: it is no gRPC credential.
    assert!(!pair.contains(TOKEN) && !pair.contains("t-only"), "{pair}");
    let mut r = req("GET", "/api/v2/users/1", 0);
    r.tenant = "t".into();
    let value = pair.split_once('=').unwrap().1;
    let err = b.client().acquire(with_token(r, value)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // The feed with the cookie alone: the token's tenants only, and the
    // session renewed.
    let (head, mut feed) = open(b.http, "/events", &[("Cookie", pair)]).await;
    assert_eq!(head.status, 200);
    assert!(
        head.header("set-cookie")
            .is_some_and(|c| c.starts_with(&format!("{name}="))),
        "renewed: {:?}",
        head.headers
    );
    let first = next_event(&mut feed, |_| true).await;
    assert_eq!(first["tenant"], "t", "{first}");
    drop(feed);
    let (head, _feed) = open(
        b.http,
        "/events?tenant=u",
        &[("Cookie", &format!("other=1; {pair}"))],
    )
    .await;
    assert_eq!(head.status, 403, "scoped to t, not u");
    // Under another port's name (another broker's dashboard on this
    // host), it is not this broker's.
    let elsewhere = pair.replacen(&name, "qb_session_1", 1);
    let refused = get(b.http, "/events", &[("Cookie", &elsewhere)]).await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    // Forged or stale: refused, saying what to do; a token in the query
    // goes before it.
    let forged = format!("{name}=0.99999999999.00");
    let refused = get(b.http, "/events", &[("Cookie", &forged)]).await;
    assert_eq!(refused.status, 401);
    assert!(refused.body.contains("#token="), "{}", refused.body);
    let (head, _feed) = open(
        b.http,
        &format!("/events?token={TOKEN}"),
        &[("Cookie", &forged)],
    )
    .await;
    assert_eq!(head.status, 200);
    // Behind a TLS-terminating proxy the cookie is Secure; DELETE ends it.
    let proxied = post(vec![
        ("Authorization", format!("Bearer {TOKEN}")),
        ("X-Forwarded-Proto", "https".into()),
    ])
    .await;
    assert!(proxied
        .header("set-cookie")
        .is_some_and(|c| c.ends_with("; Secure")));
    let (gone, _) = send(b.http, "DELETE", "/session", &[]).await;
    assert_eq!(gone.status, 204);
    assert!(gone
        .header("set-cookie")
        .is_some_and(|c| c.starts_with(&format!("{name}=;")) && c.contains("Max-Age=0")));
    b.stop().await;
}

#[tokio::test]
async fn a_client_token_lists_the_classes_of_its_tenants_only() {
    let b = start(&config(&tokens_config())).await;
    let list = |tenant: &str| {
        let request = with_token(
            quota_broker::pb::ListPriorityClassesRequest {
                tenant: tenant.into(),
            },
            TOKEN,
        );
        let mut admin = b.admin();
        async move { admin.list_priority_classes(request).await }
    };
    let mine = list("t").await.unwrap().into_inner();
    assert!(!mine.classes.is_empty());
    assert_eq!(
        list("u").await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_event_feed_sends_a_busy_bucket_at_most_twice_a_second() {
    let b = start(
        "[server]\nshutdown_grace_ms = 2000\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n\
         [[tenants.buckets]]\nname = \"users\"\nroutes = [\"GET /api/v2/users/**\"]\n\
         permits = 6000\nwindow_ms = 60000\nburst = 100\n",
    )
    .await;
    let (head, mut feed) = open(b.http, "/events", &[]).await;
    assert_eq!(head.status, 200);
    next_event(&mut feed, |v| v["granted_total"] == 0).await;
    let mut client = b.client();
    // A grant every 50 ms for two seconds.
    for _ in 0..40 {
        let mut r = req("GET", "/api/v2/users/1", 0);
        r.tenant = "t".into();
        assert!(client.acquire(r).await.unwrap().into_inner().granted);
        tokio::time::sleep(Duration::from_millis(50)).await; // paused clock
    }
    let mut seen = 0;
    loop {
        let e = next_event(&mut feed, |_| true).await;
        seen += 1;
        if e["granted_total"] == 40 {
            break;
        }
    }
    assert!((3..=6).contains(&seen), "{seen} events for 2 s of grants");
    drop(feed);
    b.stop().await;
}

#[tokio::test]
async fn a_token_holds_at_most_its_watch_streams_of_event_feeds() {
    let capped = format!("{}max_watch_streams = 2\n", tokens_config());
    let b = start(&config(&capped)).await;
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let (first, feed) = open(b.http, "/events", &auth).await;
    let (second, _kept) = open(b.http, "/events", &auth).await;
    assert_eq!((first.status, second.status), (200, 200));
    let over = get(b.http, "/events", &auth).await;
    assert_eq!(over.status, 429, "{}", over.body);
    assert!(over.body.contains("max_watch_streams"), "{}", over.body);
    assert!(
        over.body
            .contains("\"t-reader\" already has 2 Watch streams"),
        "{}",
        over.body
    );
    assert_eq!(over.header("retry-after"), Some("1"), "{:?}", over.headers);
    // A feed that ends gives its place back.
    drop(feed);
    let reopened = tokio::time::timeout(LIMIT, async {
        loop {
            let (head, feed) = open(b.http, "/events", &auth).await;
            if head.status == 200 {
                return feed;
            }
            assert_eq!(head.status, 429);
        }
    })
    .await
    .expect("the closed feed's place came back");
    drop(reopened);
    b.stop().await;
}

#[tokio::test]
async fn reflection_answers_v1alpha_and_v1() {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as V1alpha;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as AlphaResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest as AlphaMessage;

    let b = start(&config("")).await;
    let mut alpha = V1alpha::new(b.channel.clone());
    let ask = AlphaMessage {
        host: String::new(),
        message_request: Some(AlphaRequest::ListServices(String::new())),
    };
    let mut answers = alpha
        .server_reflection_info(tokio_stream::iter([ask]))
        .await
        .expect("v1alpha reflection is served")
        .into_inner();
    let answer = answers.message().await.unwrap().expect("one answer");
    let Some(AlphaResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for name in [
        "quota.v1.QuotaBroker",
        "quota.v1.QuotaAdmin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.contains(&name), "{name} not in {names:?}");
    }

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient as V1;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut v1 = V1::new(b.channel.clone());
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = v1
        .server_reflection_info(tokio_stream::iter([ask]))
        .await
        .expect("v1 reflection is still served")
        .into_inner();
    let answer = answers.message().await.unwrap().expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for name in [
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(names.contains(&name), "{name} not in {names:?}");
    }
    b.stop().await;
}

/// Calls shed under overload are counted by method and code (they are
/// logged at info only once every 10 s).
#[tokio::test]
async fn shed_calls_are_counted_by_method_and_code() {
    let capped = format!(
        "{}max_requests_per_sec = 2\n[overload]\nexempt_loopback = false\n",
        tokens_config()
    );
    let b = start(&config(&capped)).await;
    let mut admin = QuotaAdminClient::new(b.channel.clone());
    let mut shed = 0;
    for _ in 0..10 {
        let asked = ListBucketsRequest { tenant: "t".into() };
        match admin.list_buckets(with_token(asked, TOKEN)).await {
            Ok(_) => {}
            Err(e) if e.code() == tonic::Code::ResourceExhausted => shed += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        shed >= 5,
        "only {shed} of 10 calls at once over 2 a second were shed"
    );
    // A refusal of another kind, counted apart.
    let other = admin
        .list_buckets(with_token(ListBucketsRequest { tenant: "u".into() }, TOKEN))
        .await
        .unwrap_err();
    let denied = match other.code() {
        tonic::Code::PermissionDenied => "permission_denied",
        tonic::Code::ResourceExhausted => {
            shed += 1;
            ""
        }
        code => panic!("{code:?}: {other}"),
    };
    let text = get(b.http, "/metrics", &[]).await.body;
    let series = |code: &str| {
        format!(
            "quota_broker_rpc_refusals_total{{method=\"/quota.v1.QuotaAdmin/ListBuckets\",code=\"{code}\"}}"
        )
    };
    assert_eq!(
        sample(&text, &series("resource_exhausted")),
        Some(f64::from(shed)),
        "{text}"
    );
    if !denied.is_empty() {
        assert_eq!(sample(&text, &series(denied)), Some(1.0), "{text}");
    }
    b.stop().await;
}

#[tokio::test]
async fn health_is_reported_per_service() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let b = start(&config("")).await;
    let mut health = HealthClient::new(b.channel.clone());
    for service in [
        "",
        "quota.v1.QuotaBroker",
        "quota.v1.QuotaAdmin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "quota.v1.Nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    b.stop().await;
}

#[tokio::test]
async fn a_request_id_comes_back_in_the_response_metadata() {
    let b = start(&config("")).await;
    let mut client = b.client();
    let mut given = tonic::Request::new(req("GET", "/api/v2/users/1", 0));
    given
        .metadata_mut()
        .insert("x-request-id", "call-42.a_b".parse().unwrap());
    let r = client.acquire(given).await.unwrap();
    assert_eq!(
        r.metadata().get("x-request-id").unwrap().to_str().unwrap(),
        "call-42.a_b"
    );
    // None given, or one too long or with other characters: a new one.
    for given in [None, Some("x".repeat(65)), Some("has space".to_owned())] {
        let mut request = tonic::Request::new(req("GET", "/api/v2/users/1", 0));
        if let Some(id) = &given {
            request
                .metadata_mut()
                .insert("x-request-id", id.parse().unwrap());
        }
        let r = client.acquire(request).await.unwrap();
        let id = r.metadata().get("x-request-id").unwrap().to_str().unwrap();
        assert_eq!(id.len(), 16, "{id}");
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
    }
    // Errors carry it too.
    let mut bad = tonic::Request::new(req("GET", "/api/v2/users/1", 0));
    bad.get_mut().tenant = "nope".into();
    bad.metadata_mut()
        .insert("x-request-id", "failing-1".parse().unwrap());
    let e = client.acquire(bad).await.unwrap_err();
    assert_eq!(
        e.metadata().get("x-request-id").unwrap().to_str().unwrap(),
        "failing-1"
    );
    b.stop().await;
}

/// The binary with `log_format = "json"`: every line is a JSON object, and
/// a line logged inside an RPC carries that RPC's request id.
#[tokio::test]
async fn json_logs_carry_the_request_id() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let path = super::child::temp_config(
        "json-logs",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"\"\nlog_format = \"json\"\n\
             state_dir = \"\"\n[[auth.tokens]]\nname = \"wallboard-7\"\nsha256 = \"{}\"\n\
             role = \"client\"\ntenants = [\"t\"]\n[[tenants]]\nid = \"t\"\n{BUCKETS}\
             [[tenants.buckets]]\nname = \"per-client\"\nscope = \"oauth_client\"\n\
             routes = [\"GET /api/v2/analytics/**\"]\npermits = 60\nwindow_ms = 60000\n",
            quota_broker::hash_token("s3cret-wallboard")
        ),
    );
    let bearer: tonic::metadata::MetadataValue<_> = "Bearer s3cret-wallboard".parse().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_quota-broker"))
        .arg("--config")
        .arg(&path)
        // The RPC layer's own info lines off, as in a quieter production
        // set-up (its refusals kept): the request id must still reach the
        // lines logged below it.
        .env(
            "RUST_LOG",
            "info,quota_broker::grpc=warn,quota_broker::grpc::observe=info",
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let result = async {
        let mut addr = None;
        while addr.is_none() {
            let line = lines
                .recv()
                .await
                .expect("the broker logged before exiting");
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            addr = v["fields"]["listen"].as_str().map(str::to_owned);
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", addr.unwrap()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        // Its calls are answered once health says SERVING (its "broker
        // started" line is below this test's log level).
        crate::harness::serving(&channel).await;
        let mut client = QuotaBrokerClient::new(channel);
        let mut report = tonic::Request::new(ReportRequest {
            tenant: "t".into(),
            method: "GET".into(),
            path: "/api/v2/users/1".into(),
            http_status: 429,
            retry_after_ms: 5_000,
            ..Default::default()
        });
        report
            .metadata_mut()
            .insert("x-request-id", "report-7".parse().unwrap());
        report
            .metadata_mut()
            .insert("authorization", bearer.clone());
        client.report(report).await.unwrap();
        let frozen = loop {
            let line = lines.recv().await.expect("the freeze was logged");
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            let message = v["fields"]["message"].as_str().unwrap_or_default();
            if message.contains("frozen") {
                break v;
            }
        };
        // A refused call is logged under the id its caller got back.
        let mut bad = tonic::Request::new(req("GET", "/api/v2/users/1", 0));
        bad.get_mut().tenant = "nope".into();
        bad.metadata_mut()
            .insert("x-request-id", "refused-9".parse().unwrap());
        bad.metadata_mut().insert("authorization", bearer.clone());
        let e = client.acquire(bad).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        let refused = loop {
            let line = lines.recv().await.expect("the refusal was logged");
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            if v["fields"]["message"] == "refused" {
                break v;
            }
        };
        // A client repeating a mistake is not a line per call: 50 more
        // refusals in well under a second, then a longer freeze as a
        // marker, log at most a few lines between.
        for _ in 0..50 {
            let mut bad = tonic::Request::new(req("GET", "/api/v2/users/1", 0));
            bad.get_mut().tenant = "nope".into();
            bad.metadata_mut().insert("authorization", bearer.clone());
            assert!(client.acquire(bad).await.is_err());
        }
        let mut marker = tonic::Request::new(ReportRequest {
            tenant: "t".into(),
            method: "GET".into(),
            path: "/api/v2/users/1".into(),
            http_status: 429,
            retry_after_ms: 50_000,
            ..Default::default()
        });
        marker
            .metadata_mut()
            .insert("authorization", bearer.clone());
        client.report(marker).await.unwrap();
        let mut repeated = 0;
        loop {
            let line = lines.recv().await.expect("the marker was logged");
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            let message = v["fields"]["message"].as_str().unwrap_or_default();
            if message.contains("frozen") {
                break;
            }
            repeated += usize::from(message == "refused");
        }
        assert!(repeated <= 4, "{repeated} lines for 50 refusals");
        // A per-OAuth-client bucket's freeze names the OAuth client.
        let mut one_client = tonic::Request::new(ReportRequest {
            tenant: "t".into(),
            method: "GET".into(),
            path: "/api/v2/analytics/users/details/query".into(),
            oauth_client: "wfm-sync".into(),
            http_status: 429,
            retry_after_ms: 5_000,
            ..Default::default()
        });
        one_client
            .metadata_mut()
            .insert("authorization", bearer.clone());
        client.report(one_client).await.unwrap();
        let per_client = loop {
            let line = lines
                .recv()
                .await
                .expect("the per-client freeze was logged");
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            let message = v["fields"]["message"].as_str().unwrap_or_default();
            if message.contains("frozen") {
                break v;
            }
        };
        (frozen, refused, per_client)
    };
    let outcome = tokio::time::timeout(LIMIT, result).await;
    // Stopped before any assertion: a failing test leaves no broker behind.
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let _ = std::fs::remove_file(&path);
    let (v, refused, per_client) = outcome.expect("the JSON log lines came within the limit");
    assert_eq!(per_client["fields"]["bucket"], "per-client", "{per_client}");
    assert_eq!(
        per_client["fields"]["oauth_client"], "wfm-sync",
        "{per_client}"
    );
    assert!(
        per_client["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("this OAuth client")),
        "{per_client}"
    );
    assert_eq!(v["span"]["request_id"], "report-7", "{v}");
    assert_eq!(v["span"]["method"], "/quota.v1.QuotaBroker/Report", "{v}");
    // Whose token froze the bucket.
    assert_eq!(v["span"]["token"], "wallboard-7", "{v}");
    assert_eq!(refused["span"]["request_id"], "refused-9", "{refused}");
    assert_eq!(refused["fields"]["code"], "PermissionDenied", "{refused}");
    assert_eq!(refused["span"]["token"], "wallboard-7", "{refused}");
    assert!(
        refused["fields"]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "the refusal says why: {refused}"
    );
}

/// The sample alert rules pass `promtool check rules` and their unit tests
/// (`promtool test rules`), and a live `/metrics` passes
/// `promtool check metrics`. Installs Debian's `prometheus` for promtool.
#[tokio::test]
async fn alert_rules_and_live_metrics_pass_promtool() {
    use std::process::{Command, Stdio};

    testsvc::apt_install(&["prometheus"])
        .unwrap_or_else(|e| panic!("promtool (Debian package prometheus) is needed: {e}"));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/prometheus");
    let run = |args: &[&str]| {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run promtool: {e}"));
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["check", "rules", "quota-broker-alerts.yml"]);
    run(&["test", "rules", "alerts-test.yml"]);

    // A bucket of one slot (and a rate): a grant, an Acquire that queues
    // for the slot and is granted when it is released, and one denied, so
    // every series the rules watch exists (a tenant's counts appear with
    // their first use).
    let b = start(
        "[server]\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\n\
         name = \"one\"\nroutes = [\"GET /**\"]\nmax_in_flight = 1\nlease_ttl_ms = 60000\n\
         permits = 1000\nwindow_ms = 1000\n",
    )
    .await;
    let mut client = b.client();
    let critical = |max_wait_ms| {
        let mut r = req("GET", "/one", max_wait_ms);
        r.priority_class = "critical".into();
        r
    };
    let first = client.acquire(critical(0)).await.unwrap().into_inner();
    assert!(first.granted, "{}", first.reason);
    let queued = tokio::spawn({
        let mut client = b.client();
        let r = critical(20_000);
        async move { client.acquire(r).await }
    });
    let waiter = "quota_broker_waiters{tenant=\"t\",bucket=\"one\",class=\"critical\"}";
    tokio::time::timeout(LIMIT, async {
        while sample(&get(b.http, "/metrics", &[]).await.body, waiter) != Some(1.0) {}
    })
    .await
    .expect("the second Acquire queued");
    client
        .release(quota_broker::pb::ReleaseRequest {
            lease_id: first.lease_id,
            ..Default::default()
        })
        .await
        .unwrap();
    let second = queued.await.unwrap().unwrap().into_inner();
    assert!(second.granted, "{}", second.reason);
    let third = client.acquire(critical(0)).await.unwrap().into_inner();
    assert!(!third.granted);
    client
        .report(ReportRequest {
            tenant: "t".into(),
            method: "GET".into(),
            path: "/one".into(),
            http_status: 200,
            ..Default::default()
        })
        .await
        .unwrap();
    let metrics = get(b.http, "/metrics", &[]).await;
    b.stop().await;
    // Asked without an Accept header: the Prometheus text format.
    assert!(metrics
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")));
    let text = metrics.body;
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = check.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every series the rules watch is one the broker exports: a renamed
    // metric would leave an alert that can never fire.
    let rules = std::fs::read_to_string(dir.join("quota-broker-alerts.yml")).unwrap();
    let mut watched: Vec<&str> = rules
        .match_indices("quota_broker_")
        .map(|(at, _)| {
            let rest = &rules[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    watched.sort_unstable();
    watched.dedup();
    assert!(watched.len() >= 5, "{watched:?}");
    // Exported only with [server.tls] (this broker is plaintext); its name
    // is checked by `metrics::tests::tls_certificates_expiry_is_exported`.
    watched.retain(|n| *n != "quota_broker_tls_cert_expiry_timestamp_seconds");
    for name in watched {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' '])),
            "the alert rules watch {name}, which /metrics does not export:\n{text}"
        );
    }
}

/// Reads until the peer closes the connection; the bytes it sent.
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let _ = stream.read_to_end(&mut seen).await;
    seen
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_headers_never_end_is_closed_after_ten_seconds() {
    let b = start(&config("")).await;
    let mut slow = TcpStream::connect(b.http).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
    let started = tokio::time::Instant::now();
    let seen = tokio::time::timeout(Duration::from_secs(60), until_closed(&mut slow))
        .await
        .expect("closed by the broker, not held open");
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // A 408 or nothing: never a served request.
    assert!(!String::from_utf8_lossy(&seen).contains("200 OK"));
    // A connection that says nothing at all is closed too.
    let mut silent = TcpStream::connect(b.http).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), until_closed(&mut silent))
        .await
        .expect("a silent connection is closed");
    // A kept-alive connection left idle after its answer is closed too.
    let mut kept = TcpStream::connect(b.http).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(60), until_closed(&mut kept))
        .await
        .expect("an idle kept-alive connection is closed");
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    assert_eq!(get(b.http, "/healthz", &[]).await.status, 200);
    b.stop().await;
}

/// A gRPC client given the HTTP port instead of the gRPC one (a mistaken
/// url) is answered in HTTP/1.1, saying so: gRPC clients then report an
/// HTTP/1 server, a mistake to fix, where a connection closed without a
/// word reads as a broker that is down. HTTP/1 requests, also ones that
/// start like the HTTP/2 preface and come a byte at a time, are served.
#[tokio::test]
async fn a_grpc_client_on_the_http_port_is_told_it_is_not_the_grpc_port() {
    let b = start(&config("")).await;
    let mut grpc = TcpStream::connect(b.http).await.unwrap();
    grpc.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let seen = tokio::time::timeout(LIMIT, until_closed(&mut grpc))
        .await
        .expect("answered and closed");
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.starts_with("HTTP/1.1 505 "), "{seen}");
    assert!(
        seen.contains("HTTP port") && seen.contains("server.listen"),
        "{seen}"
    );
    // tonic, as any gRPC client, fails to connect there: not HTTP/2.
    let tonic = Endpoint::from_shared(format!("http://{}", b.http))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = tonic {
        let answer = QuotaBrokerClient::new(channel)
            .acquire(req("GET", "/api/v2/users/1", 0))
            .await;
        assert!(answer.is_err(), "{answer:?}");
    }
    for request in [
        "POST /session HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(b.http).await.unwrap();
        for byte in request.as_bytes() {
            s.write_all(&[*byte]).await.unwrap();
        }
        let seen = tokio::time::timeout(LIMIT, until_closed(&mut s))
            .await
            .expect("answered and closed");
        let seen = String::from_utf8_lossy(&seen);
        assert!(seen.starts_with("HTTP/1.1 2"), "{request:?}: {seen}");
    }
    b.stop().await;
}

#[tokio::test]
async fn the_http_port_holds_at_most_its_connection_cap() {
    let b = start(&config("max_connections = 4\nmax_pending_connections = 4")).await;
    let from = |ip: &'static str| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(ip.parse().unwrap(), 0))
            .unwrap();
        socket.connect(b.http).await.unwrap()
    };
    // One address holds at most a quarter of the cap: a second from it is
    // closed at once, unanswered.
    let first = from("127.0.0.2").await;
    let mut second = from("127.0.0.2").await;
    let _ = second
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let seen = tokio::time::timeout(LIMIT, until_closed(&mut second))
        .await
        .expect("a second connection from one address is closed");
    assert!(seen.is_empty(), "{}", String::from_utf8_lossy(&seen));
    drop(first);
    let mut idle = Vec::new();
    for ip in ["127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"] {
        let mut s = from(ip).await;
        // A whole request each, so each is surely accepted before the next.
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut line = String::new();
        let mut reader = BufReader::new(s);
        reader.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        idle.push(reader);
    }
    // The fifth is closed at once, unanswered.
    let mut fifth = from("127.0.0.7").await;
    let _ = fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let seen = tokio::time::timeout(LIMIT, until_closed(&mut fifth))
        .await
        .expect("the connection over the cap is closed");
    assert!(seen.is_empty(), "{}", String::from_utf8_lossy(&seen));
    // One closes: a new one is served (once the broker has seen it close).
    drop(idle.pop());
    let served = tokio::time::timeout(LIMIT, async {
        loop {
            let mut s = TcpStream::connect(b.http).await.unwrap();
            let _ = s
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await;
            let seen = until_closed(&mut s).await;
            if !seen.is_empty() {
                break String::from_utf8_lossy(&seen).into_owned();
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("a connection is served again once one closed");
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    drop(idle);
    b.stop().await;
}

#[tokio::test]
async fn a_call_whose_connection_broke_under_its_request_is_no_refusal() {
    let b = start(&config("")).await;
    let tcp = TcpStream::connect(b.grpc).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let (_response, mut body) = open_acquire(&mut h2, b.grpc);
    // Half the message, then the connection goes.
    let frame = grpc_frame(&req("GET", "/api/v2/users/1", 0));
    body.send_data(frame.slice(..frame.len() / 2), false)
        .unwrap();
    tokio::task::yield_now().await;
    body.send_reset(h2::Reason::INTERNAL_ERROR);
    drop(h2);
    connection.abort();
    let acquire = "/quota.v1.QuotaBroker/Acquire";
    let text = tokio::time::timeout(LIMIT, async {
        loop {
            let text = get(b.http, "/metrics", &[]).await.body;
            let done = sample(
                &text,
                &format!("quota_broker_rpc_duration_seconds_count{{method=\"{acquire}\"}}"),
            );
            if done.is_some_and(|n| n >= 1.0) {
                break text;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the broken call ended");
    assert!(
        !text.contains("quota_broker_rpc_refusals_total{"),
        "counted as a refusal:\n{text}"
    );
    b.stop().await;
}
