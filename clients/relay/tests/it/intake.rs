//! Intake: credentials, checks, duplicates, a full queue, metrics.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

/// An upstream that takes connections and closes them unanswered:
/// records stay queued (transport errors are retried), so the queue
/// fills. (One that refuses connections is a wrong region: the relay
/// does not start.)
async fn unreachable_upstream(settings: &mut gc_relay::Settings) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    settings.upstream.region = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((connection, _)) = listener.accept().await {
            drop(connection);
        }
    });
}

#[tokio::test]
async fn intake_refuses_strangers_and_bad_records_and_a_full_queue_says_when() {
    let dir = TempDir::new("intake");
    let sim = gcsim(sim_config(1.0, 300, 0)).await;
    let broker = broker(60_000).await;
    let mut settings = settings(&dir.sqlite(), &sim, &broker.url);
    unreachable_upstream(&mut settings).await;
    settings.limits.max_records = 2;
    let relay = relay(settings).await;
    let base = format!("http://{}", relay.addr());
    let http = reqwest::Client::new();
    let url = format!("{base}/records");

    // No credentials, wrong ones: 401 with a Basic challenge.
    let r = http.post(&url).json(&wrapup("a")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    let r = http
        .post(&url)
        .basic_auth(USER, Some("wrong"))
        .json(&wrapup("a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Refused before its body is read: a body over the limit is still 401.
    let r = http
        .post(&url)
        .header("content-type", "application/json")
        .body(vec![b' '; 8 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The scheme's name in any case (RFC 9110).
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let r = http
        .post(&url)
        .header("authorization", format!("basic {basic}"))
        .json(&wrapup("a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // The shared secret works as well as Basic.
    let r = http
        .post(&url)
        .header(gc_relay::SECRET_HEADER, "shared-secret")
        .json(&wrapup("a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    let flow = Flow::new(&base);
    // A record that is not one: 400, and the message does not echo it.
    let (status, body) = flow
        .post(&json!({"idempotencyKey": "k", "method": "GET", "path": "/api/v2/x"}))
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, body) = flow.post(&json!({"nonsense-field-xyz": 1})).await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(!body.to_string().contains("nonsense-field-xyz"), "{body}");
    // A body past the relay's buffer: 413, in the same JSON as every
    // other refusal.
    let huge = json!({"idempotencyKey": "h", "method": "POST", "path": "/api/v2/x",
        "orderKey": "h", "body": "x".repeat(5 << 20)});
    let (status, body) = flow.post(&huge).await.unwrap();
    assert_eq!(status, 413, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("larger than the relay's limit")),
        "{body}"
    );

    // The repeat of a stored key is the same record, even when full.
    let (status, first) = flow.post(&wrapup("b")).await.unwrap();
    assert_eq!((status, first["duplicate"].as_bool()), (202, Some(false)));
    let (status, again) = flow.post(&wrapup("b")).await.unwrap();
    assert_eq!(status, 202);
    assert_eq!(again["recordId"], first["recordId"]);
    assert_eq!(again["duplicate"], true);
    // The same key on another write is not that record: 409, not stored.
    let mut other = wrapup("b");
    other["body"] = json!({"code": "other"});
    let (status, conflict) = flow.post(&other).await.unwrap();
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["recordId"], first["recordId"]);
    assert_eq!(conflict["status"], 409, "{conflict}");
    assert!(
        conflict["message"]
            .as_str()
            .is_some_and(|m| m.contains("its own key")),
        "{conflict}"
    );
    // Two records queued: the third is refused with a Retry-After.
    let r = http
        .post(&url)
        .basic_auth(USER, Some(PASSWORD))
        .json(&wrapup("c"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    let (status, _) = flow.post(&wrapup("b")).await.unwrap();
    assert_eq!(status, 202);

    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "gc_relay_queue_depth 2",
        "gc_relay_intake_requests_total{outcome=\"accepted\"} 2",
        "gc_relay_intake_requests_total{outcome=\"duplicate\"} 3",
        "gc_relay_intake_requests_total{outcome=\"full\"} 1",
        "gc_relay_intake_requests_total{outcome=\"conflict\"} 1",
        "gc_relay_intake_requests_total{outcome=\"unauthorized\"} 3",
        "gc_relay_intake_requests_total{outcome=\"invalid\"} 3",
        "gc_relay_ack_seconds_count 5",
        "gc_relay_dead_letters 0",
    ] {
        assert!(metrics.contains(line), "{line:?} not in\n{metrics}");
    }
    assert!(
        metrics.contains("gc_relay_oldest_record_age_seconds"),
        "{metrics}"
    );
    relay.shutdown().await;
    broker.stop().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_relay_without_credentials_does_not_start() {
    let dir = TempDir::new("open");
    let sim = gcsim(sim_config(1.0, 300, 0)).await;
    let mut settings = settings(&dir.sqlite(), &sim, "http://127.0.0.1:1");
    settings.auth = gc_relay::Auth::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = match gc_relay::start(settings, listener).await {
        Ok(_) => panic!("an open relay started"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("credentials"), "{err}");
    sim.shutdown().await;
}

/// The shipped Data Action's request template, filled in as Architect
/// fills it (`${input.X}` replaced, `$esc.jsonString(...)` quoted), is a
/// record the relay takes.
#[tokio::test]
async fn the_shipped_data_action_makes_records_the_relay_takes() {
    let action: serde_json::Value = serde_json::from_str(include_str!(
        "../../architect/queue-wrapup-data-action.json"
    ))
    .unwrap();
    let template = action["config"]["request"]["requestTemplate"]
        .as_str()
        .unwrap();
    let inputs = [
        ("conversationId", "conv-1"),
        ("participantId", "part-1"),
        ("communicationId", "comm-1"),
        ("wrapupCode", "code-1"),
        ("notes", "said \"thanks\""),
    ];
    let mut filled = template.replace(
        "$esc.jsonString(${input.notes})",
        &serde_json::to_string(inputs[4].1).unwrap(),
    );
    for (name, value) in inputs {
        filled = filled.replace(&format!("${{input.{name}}}"), value);
    }
    let record: serde_json::Value = serde_json::from_str(&filled).unwrap();
    for required in action["contract"]["input"]["inputSchema"]["required"]
        .as_array()
        .unwrap()
    {
        let name = required.as_str().unwrap();
        assert!(template.contains(&format!("${{input.{name}}}")), "{name}");
    }

    let dir = TempDir::new("action");
    let sim = gcsim(sim_config(60.0, 300, 0)).await;
    let broker = broker(1_000).await;
    let relay = relay(settings(&dir.sqlite(), &sim, &broker.url)).await;
    let flow = Flow::new(&format!("http://{}", relay.addr()));
    let (status, answer) = flow.post(&record).await.unwrap();
    assert_eq!(status, 202, "{answer}");
    // The action's translation map reads these.
    assert!(
        answer["recordId"].is_i64() && answer["duplicate"] == false,
        "{answer}"
    );
    wait_until(
        "the write upstream",
        std::time::Duration::from_secs(30),
        || async { writes(&sim).await.get("conv-1") == Some(&1) },
    )
    .await;
    relay.shutdown().await;
    broker.stop().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_second_relay_on_the_same_sqlite_file_is_refused() {
    let dir = TempDir::new("one-relay");
    let sim = gcsim(sim_config(1.0, 300, 0)).await;
    let broker = broker(60_000).await;
    let first = relay(settings(&dir.sqlite(), &sim, &broker.url)).await;
    // The second would release the first one's claims and send their
    // records upstream again.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second = gc_relay::start(settings(&dir.sqlite(), &sim, &broker.url), listener).await;
    let err = second.err().expect("a second relay on the file started");
    assert!(
        err.to_string().contains("another relay uses the queue"),
        "{err}"
    );
    // Once the first is gone, the file is free again.
    first.shutdown().await;
    let again = relay(settings(&dir.sqlite(), &sim, &broker.url)).await;
    again.shutdown().await;
    broker.stop().await;
    sim.shutdown().await;
}

/// A relay whose tenant, broker token or client secret is wrong does not
/// start: the error says which, before it takes a single record it could
/// never deliver. One whose broker does not answer starts (its calls wait
/// or fall back, as they would later).
#[tokio::test]
async fn a_wrong_tenant_token_or_secret_stops_the_relay_at_start() {
    let dir = TempDir::new("preflight");
    let sim = gcsim(sim_config(1.0, 300, 0)).await;
    // A broker that takes only its tokens: the relay's, and one scoped to
    // another org.
    let config = format!(
        r#"
[server]
state_dir = ""
[[auth.tokens]]
name = "relay"
sha256 = "{}"
role = "client"
tenants = ["*"]
[[auth.tokens]]
name = "another-team"
sha256 = "{}"
role = "client"
tenants = ["org-closed"]
[[tenants]]
id = "{ORG}"
[[tenants.buckets]]
name = "writes"
routes = ["POST /api/v2/conversations/**"]
permits = 300
window_ms = 60000
[[tenants]]
id = "org-closed"
[[tenants.buckets]]
name = "writes"
routes = ["POST /api/v2/conversations/**"]
permits = 300
window_ms = 60000
"#,
        quota_broker::hash_token("relay-token"),
        quota_broker::hash_token("another-teams-token"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broker = quota_broker::Embedded::spawn(
        listener,
        quota_broker::Settings::from_toml(&config).unwrap(),
    )
    .unwrap();
    assert!(broker.started().await, "the broker started");
    let broker_url = broker.url();
    let start = |settings: gc_relay::Settings| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        gc_relay::start(settings, listener).await
    };
    let with = |edit: fn(&mut gc_relay::Settings)| {
        let mut s = settings(&dir.sqlite(), &sim, &broker_url);
        s.upstream.broker_token = Some("relay-token".into());
        edit(&mut s);
        s
    };
    type Edit = fn(&mut gc_relay::Settings);
    let cases: [(Edit, &str); 4] = [
        (|s| s.upstream.tenant = "org-unknown".into(), "NOT_FOUND"),
        (
            |s| s.upstream.broker_token = Some("another-teams-token".into()),
            "PERMISSION_DENIED",
        ),
        (
            |s| s.upstream.broker_token = Some("no-such-token".into()),
            "UNAUTHENTICATED",
        ),
        (
            |s| s.upstream.client_secret = "wrong-secret".into(),
            "login refused (401)",
        ),
    ];
    for (edit, says) in cases {
        let Err(e) = start(with(edit)).await else {
            panic!("the relay started; it should have said {says}")
        };
        let e = e.to_string();
        assert!(e.starts_with("upstream: start-up check: "), "{e}");
        assert!(e.contains(says), "{e}");
    }
    // A login host that refuses connections: a wrong region, which no
    // record would get past; said with the system's reason.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let mut wrong_region = with(|_| {});
    wrong_region.upstream.region = format!("http://{closed}");
    let Err(e) = start(wrong_region).await else {
        panic!("the relay started with a login host that refuses connections")
    };
    assert_eq!(e.exit_code(), 2, "{e}");
    let e = e.to_string();
    assert!(
        e.starts_with(&format!(
            "upstream: start-up check: the login host http://{closed} refuses connections ("
        )) && e.to_lowercase().contains("connection refused")
            && e.ends_with(": check --region"),
        "{e}"
    );
    // All right: it starts. The broker away: it starts too (its calls wait
    // or fall back), and its log says so.
    start(with(|_| {})).await.unwrap().shutdown().await;
    let away = start(with(|s| s.upstream.broker = "http://127.0.0.1:1".into()))
        .await
        .expect("a relay whose broker is away starts");
    away.shutdown().await;
    broker.stop().await.unwrap();
}

/// A broker started together with the relay, a moment from serving when
/// the relay first checks it, is waited for: not logged as one that "did
/// not answer the start-up check" (its first connection failed at once).
#[tokio::test]
async fn a_broker_that_serves_a_moment_after_the_relay_starts_is_waited_for() {
    let dir = TempDir::new("late-broker");
    let sim = gcsim(sim_config(1.0, 300, 0)).await;
    let early = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = early.local_addr().unwrap();
    let args = serve_args(&dir.sqlite(), &sim, &format!("http://{addr}"));
    let relay = tokio::spawn(async move { Child::start_logged(&args).await });
    // The relay's first connection finds no broker behind the port yet.
    let (first, _) = tokio::time::timeout(Duration::from_secs(30), early.accept())
        .await
        .expect("the relay did not check the broker")
        .unwrap();
    drop((first, early));
    let late = tokio::net::TcpListener::bind(addr).await.unwrap();
    let broker = broker_on(late, 60_000).await;
    // Listening: its start-up check is over, and anything it said of it is
    // in its log, read to the end once it is gone.
    let (relay, mut log) = relay.await.unwrap();
    relay.kill9().await;
    let mut said = Vec::new();
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(10), log.next_line())
        .await
        .expect("the log of a killed relay did not end")
    {
        said.push(line);
    }
    assert!(
        !said
            .iter()
            .any(|l| l.contains("did not answer the start-up check of tenant")),
        "{said:#?}"
    );
    broker.stop().await;
    sim.shutdown().await;
}
