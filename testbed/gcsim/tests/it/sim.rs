//! The simulator over real sockets: a `Sim` on 127.0.0.1:0 and an HTTP
//! client, with tokio's clock paused (windows, latencies and blocks pass by
//! `advance`, never by sleeping); and the `gcsim` binary's start-up line
//! and exit on stdin EOF.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use gcsim::{FamilyConfig, Sim, SimConfig, SimHandle, UnmanagedStep};
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

const DETAILS: &str = "/api/v2/analytics/conversations/details/query";
const HOUR: &str = r#""interval":"2026-11-01T10:00:00.000Z/2026-11-01T11:00:00.000Z""#;

struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

struct Reply {
    status: u16,
    headers: HeaderMap,
    json: Value,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }
}

impl Http {
    fn new(addr: SocketAddr) -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            base: format!("http://{addr}"),
        }
    }

    async fn send(&self, method: Method, path: &str, auth: Option<&str>, body: &str) -> Reply {
        let bearer = auth.map(|auth| format!("Bearer {auth}"));
        let headers: Vec<(&str, &str)> = bearer.iter().map(|b| ("authorization", &b[..])).collect();
        self.send_with(method, path, &headers, body).await
    }

    async fn send_with(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = self
            .client
            .request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {bytes:?}"))
        };
        Reply {
            status,
            headers: parts.headers,
            json,
        }
    }

    async fn query(&self, client: &str, body: &str) -> Reply {
        self.send(Method::POST, DETAILS, Some(client), body).await
    }

    async fn get(&self, path: &str) -> Value {
        let r = self.send(Method::GET, path, None, "").await;
        assert_eq!(r.status, 200, "{path}: {}", r.json);
        r.json
    }
}

async fn start(config: SimConfig) -> (SimHandle, Http) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = Sim::start(config, listener).unwrap();
    let http = Http::new(sim.addr());
    (sim, http)
}

/// The default org with the analytics family's hidden limit, concurrency
/// and unmanaged consumer replaced.
fn config(hidden: u64, max_concurrent: Option<u64>, unmanaged: u64) -> SimConfig {
    let mut c = SimConfig::default();
    let f: &mut FamilyConfig = &mut c.orgs[0].families[0];
    f.hidden_permits = Some(hidden);
    f.max_concurrent = max_concurrent;
    f.unmanaged = vec![UnmanagedStep {
        at_ms: 0,
        per_window: unmanaged,
    }];
    c
}

fn page_body(size: u64, number: u64) -> String {
    format!(r#"{{{HOUR},"paging":{{"pageSize":{size},"pageNumber":{number}}}}}"#)
}

#[tokio::test(start_paused = true)]
async fn hidden_limit_429_headers_block_and_escalation() {
    let (sim, http) = start(config(3, None, 0)).await;
    for n in 1..=3 {
        let r = http.query("org-a:ingest", &page_body(1, 1)).await;
        assert_eq!(r.status, 200, "{}", r.json);
        assert_eq!(r.header("inin-ratelimit-allowed"), "300");
        assert_eq!(r.header("inin-ratelimit-count"), n.to_string());
    }
    // The fourth is over the hidden 3 (documented 60): 429 until the window
    // ends, with the Genesys body; the headers still describe the token.
    tokio::time::advance(Duration::from_secs(10)).await;
    let r = http.query("org-a:ingest", &page_body(1, 1)).await;
    assert_eq!(r.status, 429);
    let ra: f64 = r.header("retry-after").parse().unwrap();
    // Three queries of 402 ms latency each, then 10 s: 48.8 s left.
    assert_eq!(ra, 49.0);
    assert_eq!(r.header("inin-ratelimit-count"), "3");
    assert_eq!(r.json["code"], "too.many.requests");
    assert_eq!(r.json["messageParams"]["limit"], "60");
    assert_eq!(r.json["messageParams"]["reason"], "family:analytics-query");

    // Another client hammering just before the window ends is refused and
    // pushes the block past it: 1 s, then 2 s.
    tokio::time::advance(Duration::from_secs(48)).await;
    let r = http.query("org-a:wallboard", &page_body(1, 1)).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), "1");
    assert_eq!(r.json["messageParams"]["reason"], "blocked:analytics-query");
    let r = http.query("org-a:wallboard", &page_body(1, 1)).await;
    assert_eq!(r.header("retry-after"), "2");
    tokio::time::advance(Duration::from_millis(2_100)).await;
    let r = http.query("org-a:wallboard", &page_body(1, 1)).await;
    assert_eq!(r.status, 200, "{}", r.json);

    let stats = http.get("/_sim/stats").await;
    let windows = &stats["orgs"][0]["families"][0]["windows"];
    assert_eq!(windows[0]["served_fleet"], 3);
    assert_eq!(windows[0]["refused_fleet"], 3);
    assert_eq!(windows[1]["served_fleet"], 1);
    let reasons = &stats["orgs"][0]["refused_by_reason"];
    assert_eq!(reasons["family:analytics-query"], 1);
    assert_eq!(reasons["blocked:analytics-query"], 2);
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn details_pages_are_deterministic_complete_and_validated() {
    let (sim, http) = start(config(1_000, None, 0)).await;
    let (sim2, http2) = start(config(1_000, None, 0)).await;
    let mut ids = Vec::new();
    let mut total = None;
    for page in 1.. {
        let r = http.query("org-a:ingest", &page_body(100, page)).await;
        assert_eq!(r.status, 200, "{}", r.json);
        let hits = r.json["totalHits"].as_u64().unwrap();
        assert_eq!(*total.get_or_insert(hits), hits);
        let Some(rows) = r.json["conversations"].as_array() else {
            break;
        };
        for c in rows {
            let start = c["conversationStart"].as_str().unwrap();
            assert!(start.starts_with("2026-11-01T10:"), "{start}");
            ids.push(c["conversationId"].as_str().unwrap().to_owned());
        }
    }
    // 20,000 a day: about 833 in an hour, every one once.
    let total = total.unwrap() as usize;
    assert!((600..1100).contains(&total), "{total}");
    assert_eq!(ids.len(), total);
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), total);
    // The same seed serves the same conversations.
    let again = http2.query("org-a:ingest", &page_body(100, 1)).await;
    assert_eq!(again.json["conversations"][0]["conversationId"], ids[0]);

    for (body, what) in [
        ("{", "not a details query"),
        (r#"{"interval":"yesterday"}"#, "interval"),
        (
            r#"{"interval":"2026-11-01T11:00:00Z/2026-11-01T10:00:00Z"}"#,
            "interval",
        ),
        (&page_body(101, 1), "pageSize"),
        (&page_body(10, 0), "pageNumber"),
    ] {
        let r = http.query("org-a:ingest", body).await;
        assert_eq!(r.status, 400, "{body}");
        let message = r.json["message"].as_str().unwrap();
        assert!(message.contains(what), "{message}");
    }
    sim.shutdown().await;
    sim2.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn concurrency_slot_is_held_through_the_latency() {
    let (sim, http) = start(config(1_000, Some(1), 0)).await;
    let body = page_body(100, 1);
    let (a, b) = tokio::join!(http.query("org-a:a", &body), http.query("org-a:b", &body));
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(statuses, [200, 429]);
    let refused = if a.status == 429 { &a } else { &b };
    assert_eq!(
        refused.json["messageParams"]["reason"],
        "concurrency:analytics-query"
    );
    // The hidden concurrency limit is in no answer.
    assert_eq!(
        refused.json["messageParams"]
            .as_object()
            .map(|p| p.keys().collect::<Vec<_>>()),
        Some(vec![&"reason".to_owned()]),
        "{}",
        refused.json
    );
    assert_eq!(refused.header("retry-after"), "1");
    // Released once answered.
    let stats = http.get("/_sim/stats").await;
    assert_eq!(stats["orgs"][0]["families"][0]["in_flight"], 0);
    assert_eq!(http.query("org-a:a", &body).await.status, 200);
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn writes_log_limits_auth_and_control_plane() {
    let (sim, http) = start(config(45, Some(10), 6)).await;
    let wrapup =
        |c: &str| format!("/api/v2/conversations/calls/{c}/participants/p/communications/m/wrapup");
    for c in ["c1", "c1", "c2"] {
        let r = http
            .send(
                Method::POST,
                &wrapup(c),
                Some("org-a:trunks"),
                r#"{"code":"sale"}"#,
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.json);
    }
    let r = http
        .send(Method::POST, &wrapup("c3"), Some("org-a:trunks"), "{}")
        .await;
    assert_eq!(r.status, 400);
    let writes = http.get("/_sim/orgs/org-a/writes").await;
    assert_eq!(writes, serde_json::json!({"c1": 2, "c2": 1}));

    let r = http
        .send(
            Method::GET,
            "/api/v2/organizations/limits/namespaces/analytics",
            Some("org-a:x"),
            "",
        )
        .await;
    assert_eq!(r.json["entities"][0]["key"], "analytics-query");
    assert_eq!(r.json["entities"][0]["value"], 60);
    let r = http
        .send(
            Method::GET,
            "/api/v2/organizations/limits/namespaces/nope",
            Some("org-a:x"),
            "",
        )
        .await;
    assert_eq!(r.status, 404);

    assert_eq!(http.query("", &page_body(1, 1)).await.status, 401);
    assert_eq!(http.query("nobody:x", &page_body(1, 1)).await.status, 404);
    let r = http.send(Method::POST, DETAILS, None, "{}").await;
    assert_eq!(
        (r.status, r.json["code"].as_str()),
        (401, Some("authentication.required"))
    );

    // The unmanaged consumer's 6 a window: 3 due by 30 s; then the hidden
    // limit drops to what is served, and the next query is refused.
    tokio::time::advance(Duration::from_secs(30)).await;
    let stats = http.get("/_sim/stats").await;
    assert_eq!(
        stats["orgs"][0]["families"][0]["windows"][0]["served_unmanaged"],
        3
    );
    let r = http
        .send(
            Method::POST,
            "/_sim/orgs/org-a/families/analytics-query",
            None,
            r#"{"hidden_permits":3}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(http.query("org-a:x", &page_body(1, 1)).await.status, 429);
    let r = http
        .send(
            Method::POST,
            "/_sim/orgs/org-a/families/nope",
            None,
            r#"{"hidden_permits":3}"#,
        )
        .await;
    assert_eq!(r.status, 404);
    let r = http
        .send(
            Method::POST,
            "/_sim/orgs/org-a/families/analytics-query",
            None,
            r#"{"hidden":3}"#,
        )
        .await;
    assert_eq!(r.status, 400);
    // A limit of 0 (every request refused) is refused, as in the config.
    let r = http
        .send(
            Method::POST,
            "/_sim/orgs/org-a/families/analytics-query",
            None,
            r#"{"hidden_permits":0}"#,
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.json);

    let log = http.get("/_sim/log?since=0").await;
    let entries = log["entries"].as_array().unwrap();
    let statuses: Vec<u64> = entries
        .iter()
        .map(|e| e["status"].as_u64().unwrap())
        .collect();
    // Three writes, the bad one, two namespace lookups, the refused query;
    // unauthenticated requests and the control plane are not traffic.
    assert_eq!(statuses, [202, 202, 202, 400, 200, 404, 429]);
    assert_eq!(entries[6]["reason"], "family:analytics-query");
    assert_eq!(entries[0]["client"], "trunks");
    let rest = http.get(&format!("/_sim/log?since={}", log["next"])).await;
    assert!(rest["entries"].as_array().unwrap().is_empty());
    sim.shutdown().await;
}

#[test]
fn binary_prints_its_address_and_exits_when_stdin_closes() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gcsim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--time-scale",
            "10",
            "--log",
            "warn",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("gcsim listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /_sim/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut stream, &mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"org-a\""), "{reply}");
    drop(child.stdin.take());
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(status) => assert!(status.unwrap().success()),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("gcsim did not exit within 10 s of its stdin closing");
        }
    }
}

/// Runs the binary with `args` and stdin closed; its exit code and stderr.
fn run_binary(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gcsim"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn binary_refuses_a_non_loopback_address() {
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let (code, stderr) = run_binary(&["--listen", addr]);
        assert_eq!(code, Some(2), "{addr}: {stderr}");
        assert!(stderr.contains("only a loopback address"), "{stderr}");
    }
}

#[test]
fn binary_names_the_config_file_of_a_bad_config() {
    let path = std::env::temp_dir().join(format!("gcsim-zero-window-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "[[orgs]]\n[[orgs.families]]\nname = \"f\"\nroutes = [\"GET /x\"]\n\
         documented_permits = 5\nwindow_ms = 0",
    )
    .unwrap();
    let (code, stderr) = run_binary(&["--config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}: bad simulator config", path.display())),
        "{stderr}"
    );
    assert!(stderr.contains("window_ms must be > 0"), "{stderr}");
}

#[test]
fn binary_blames_a_bad_time_scale_on_the_flag_not_the_config() {
    let path = std::env::temp_dir().join(format!("gcsim-scale-{}.toml", std::process::id()));
    std::fs::write(&path, "time_scale = 1.0").unwrap();
    let file = path.to_str().unwrap();
    for args in [
        &["--config", file, "--time-scale", "0"][..],
        &["--time-scale", "0"],
        &["--time-scale", "-2"],
        // Past what a simulated instant can hold: a panic on every request,
        // or a spin that no signal stopped, before they were refused.
        &["--time-scale", "1e-300"],
        &["--time-scale", "1e308"],
    ] {
        let (code, stderr) = run_binary(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("--time-scale"), "{args:?}: {stderr}");
        assert!(
            stderr.contains("must be a number from 0.001 to 10000"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains(file), "{args:?}: {stderr}");
        assert!(!stderr.contains("built-in config"), "{args:?}: {stderr}");
    }
    // A bad value in the file is still the file's.
    std::fs::write(&path, "time_scale = 0.0").unwrap();
    let (code, stderr) = run_binary(&["--config", file]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{file}: bad simulator config")),
        "{stderr}"
    );
}

#[test]
fn binary_names_the_file_family_and_key_of_two_schedule_steps_at_once() {
    let path = std::env::temp_dir().join(format!("gcsim-twice-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "[[orgs]]\n[[orgs.families]]\nname = \"analytics-query\"\n\
         routes = [\"POST /api/v2/analytics/**/query\"]\ndocumented_permits = 60\n\
         schedule = [{at_ms=60000,hidden_permits=20},{at_ms=60000,hidden_permits=35}]",
    )
    .unwrap();
    let (code, stderr) = run_binary(&["--config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: bad simulator config:\n  org org-a families[0]: analytics-query: schedule has \
             two steps at at_ms = 60000",
            path.display()
        )),
        "{stderr}"
    );
}

#[test]
fn binary_logs_without_colour_codes_when_stderr_is_not_a_terminal() {
    // Stdin at EOF: it starts, logs at info that it stops, and exits.
    let (code, stderr) = run_binary(&["--log", "info"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("stopping"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "ANSI codes in {stderr:?}");
}

/// A silent token bucket over HTTP: no `inin-ratelimit-*` headers at all,
/// a whole-second Retry-After (in real seconds at the time scale), and the
/// stats name the kind and the capacity.
#[tokio::test(start_paused = true)]
async fn silent_token_bucket_sends_only_429_and_whole_second_retry_after() {
    let mut c = config(45, None, 0);
    c.time_scale = 10.0;
    c.orgs[0].token_tell = false;
    let f = &mut c.orgs[0].families[0];
    f.kind = gcsim::LimitKind::TokenBucket;
    f.burst = Some(2);
    f.retry_after = gcsim::RetryAfter::WholeSeconds;
    let (sim, http) = start(c).await;
    for _ in 0..2 {
        let r = http.query("org-a:ingest", &page_body(1, 1)).await;
        assert_eq!(r.status, 200, "{}", r.json);
        assert!(r.headers.get("inin-ratelimit-allowed").is_none());
    }
    let r = http.query("org-a:ingest", &page_body(1, 1)).await;
    assert_eq!(r.status, 429, "{}", r.json);
    assert!(r.headers.get("inin-ratelimit-count").is_none());
    // The next token is 1.33 simulated s away (less the 0.8 s the two
    // queries took): rounded up to 1 simulated s = 0.1 real s at ×10.
    assert_eq!(r.header("retry-after"), "0.100");
    let stats = http.get("/_sim/stats").await;
    let family = &stats["orgs"][0]["families"][0];
    assert_eq!(family["kind"], "token_bucket");
    assert_eq!(family["burst"], 2);
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn oauth_client_credentials_issue_tokens_the_api_accepts_until_they_expire() {
    let mut c = config(45, None, 0);
    c.orgs[0].token_ttl_s = 600;
    let (sim, http) = start(c).await;
    let login = |user: &str, secret: &str, form: &str| {
        use base64::Engine;
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"))
        );
        let form = form.to_owned();
        let http = &http;
        async move {
            http.send_with(
                Method::POST,
                "/oauth/token",
                &[
                    ("authorization", &basic),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                &form,
            )
            .await
        }
    };
    let grant = "grant_type=client_credentials";
    let r = login("relay@org-a", "gcsim-secret", grant).await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["token_type"], "bearer");
    assert_eq!(r.json["expires_in"], 600);
    let token = r.json["access_token"].as_str().unwrap().to_owned();

    for (user, secret, form, status, error) in [
        ("relay@org-a", "wrong", grant, 401, "invalid_client"),
        ("relay@nobody", "gcsim-secret", grant, 401, "invalid_client"),
        ("relay", "gcsim-secret", grant, 401, "invalid_client"),
        (
            "relay@org-a",
            "gcsim-secret",
            "grant_type=password",
            400,
            "unsupported_grant_type",
        ),
    ] {
        let r = login(user, secret, form).await;
        assert_eq!(
            (r.status, r.json["error"].as_str()),
            (status, Some(error)),
            "{user} {form}"
        );
    }

    let wrapup = "/api/v2/conversations/calls/c9/participants/p/communications/m/wrapup";
    let r = http
        .send(Method::POST, wrapup, Some(&token), r#"{"code":"sale"}"#)
        .await;
    assert_eq!(r.status, 202, "{}", r.json);
    assert_eq!(http.get("/_sim/orgs/org-a/writes").await["c9"], 1);
    let r = http
        .send(
            Method::POST,
            wrapup,
            Some("gcsim-not-issued"),
            r#"{"code":"x"}"#,
        )
        .await;
    assert_eq!(r.status, 401);

    tokio::time::advance(Duration::from_secs(601)).await;
    let r = http
        .send(Method::POST, wrapup, Some(&token), r#"{"code":"sale"}"#)
        .await;
    assert_eq!(r.status, 401);
    assert!(
        r.json["message"].as_str().unwrap().contains("expired"),
        "{}",
        r.json
    );
    sim.shutdown().await;
}

const JOBS: &str = "/api/v2/analytics/conversations/details/jobs";

#[tokio::test(start_paused = true)]
async fn jobs_are_fulfilled_after_their_latency_and_refused_over_their_limits() {
    let mut c = config(1_000, None, 0);
    c.orgs[0].jobs.max_running = 1;
    let (sim, http) = start(c).await;
    let body = format!("{{{HOUR}}}");
    let r = http
        .send(Method::POST, JOBS, Some("org-a:ingest"), &body)
        .await;
    assert_eq!(r.status, 202, "{}", r.json);
    let id = r.json["jobId"].as_str().unwrap().to_owned();
    // A second while the first runs: 429 with a Retry-After, like Genesys.
    let busy = http
        .send(Method::POST, JOBS, Some("org-a:ingest"), &body)
        .await;
    assert_eq!(busy.status, 429);
    assert_eq!(busy.json["messageParams"]["reason"], "jobs:running");
    assert!(busy.header("retry-after").parse::<f64>().unwrap() > 0.0);
    let status = format!("{JOBS}/{id}");
    let r = http
        .send(Method::GET, &status, Some("org-a:ingest"), "")
        .await;
    assert_eq!(r.json["state"], "PENDING");
    // 5 s + 1 s per 1,000 rows (about 833 in the hour).
    tokio::time::advance(Duration::from_secs(6)).await;
    let r = http
        .send(Method::GET, &status, Some("org-a:ingest"), "")
        .await;
    assert_eq!(r.json["state"], "FULFILLED", "{}", r.json);
    let total = r.json["totalHits"].as_u64().unwrap();
    let mut ids = Vec::new();
    let mut path = format!("{status}/results?pageSize=500");
    loop {
        let r = http
            .send(Method::GET, &path, Some("org-a:ingest"), "")
            .await;
        assert_eq!(r.status, 200, "{}", r.json);
        for c in r.json["conversations"].as_array().unwrap() {
            ids.push(c["conversationId"].as_str().unwrap().to_owned());
        }
        match r.json["cursor"].as_str() {
            Some(cursor) => path = format!("{status}/results?pageSize=500&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(ids.len() as u64, total);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len() as u64, total, "pages overlap");
    let r = http
        .send(
            Method::GET,
            &format!("{JOBS}/nope"),
            Some("org-a:ingest"),
            "",
        )
        .await;
    assert_eq!(r.status, 404);
    sim.shutdown().await;
}

/// A submission refused by the jobs limits is a refusal like any other: in
/// the stats (by client and by reason) and in the log with its reason.
#[tokio::test(start_paused = true)]
async fn a_jobs_refusal_is_counted_and_logged_as_refused() {
    let (sim, http) = start(SimConfig::default()).await;
    let body = format!("{{{HOUR}}}");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = http.send(Method::POST, JOBS, Some("org-a:j1"), &body).await;
        statuses.push(r.status);
        if r.status == 429 {
            assert_eq!(r.json["messageParams"]["reason"], "jobs:running");
            assert!(r.header("retry-after").parse::<f64>().unwrap() > 0.0);
            // The refusal used no token permit.
            assert_eq!(r.header("inin-ratelimit-count"), "2");
        }
    }
    assert_eq!(statuses, [202, 202, 429, 429]);
    let stats = http.get("/_sim/stats").await;
    let org = &stats["orgs"][0];
    assert_eq!(
        org["tokens"],
        serde_json::json!([{ "client": "j1", "served": 2, "refused": 2 }])
    );
    assert_eq!(
        org["refused_by_reason"],
        serde_json::json!({ "jobs:running": 2 })
    );
    let log = http.get("/_sim/log").await;
    let reasons: Vec<Value> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].clone())
        .collect();
    assert_eq!(
        Value::from(reasons),
        serde_json::json!([null, null, "jobs:running", "jobs:running"])
    );
    sim.shutdown().await;
}
