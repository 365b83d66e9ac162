//! The ports while the broker starts: they answer from the moment they are
//! bound. The HTTP port: `/healthz` 200, `/readyz` and every other path
//! 503 "starting", then the broker's routes once the start is done. The
//! gRPC port: grpc.health.v1 NOT_SERVING and the broker's calls
//! UNAVAILABLE "starting", then SERVING and the real answers.

use super::child::{temp_config, Broker};
use super::harness::{fresh_dir, req};
use super::observe::get;
use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{ListBucketsRequest, ReleaseRequest};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Bound on every wait of these tests.
const LIMIT: Duration = Duration::from_secs(20);

/// A broker whose start is held up by its state directory,
/// deterministically: its `admin.toml` is a named pipe, which the start
/// reads and which gives nothing until the test writes to it (a state
/// directory on a disk that answers late). Its state directory, the pipe
/// and the config file.
async fn held_start(name: &str) -> (Broker, PathBuf, PathBuf, PathBuf) {
    let dir = fresh_dir(name);
    std::fs::create_dir_all(&dir).unwrap();
    let pipe = dir.join("admin.toml");
    assert!(Command::new("mkfifo")
        .arg(&pipe)
        .status()
        .unwrap()
        .success());
    let config = temp_config(
        name,
        &format!(
            r#"[server]
listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
state_dir = "{}"
shutdown_grace_ms = 1000
[[tenants]]
id = "t"
[[tenants.buckets]]
name = "b"
routes = ["* /**"]
permits = 60
window_ms = 60000
"#,
            dir.display()
        ),
    );
    let broker = Broker::start_unready(&config).await;
    (broker, dir, pipe, config)
}

/// The broker's HTTP port, from its startup line.
fn http_of(broker: &Broker) -> SocketAddr {
    broker
        .http
        .as_deref()
        .expect("the broker logs its HTTP address")
        .parse()
        .unwrap()
}

/// Waits until the held start opens its `admin.toml` (the pipe) and holds
/// the pipe's writing end: from then on the start reads the state directory
/// and waits for what [`release_start`] writes. Woken by the broker's open,
/// not by a clock.
async fn wait_for_the_pipe(pipe: &Path) -> std::fs::File {
    let path = pipe.to_owned();
    let opening =
        tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(path));
    match tokio::time::timeout(LIMIT, opening).await {
        Ok(opened) => opened.unwrap().unwrap(),
        Err(_) => {
            // A reader of our own ends the open left waiting, so that its
            // thread does not outlive the test.
            let _ = tokio::net::unix::pipe::OpenOptions::new().open_receiver(pipe);
            panic!("the broker did not open its admin.toml within {LIMIT:?}");
        }
    }
}

/// Lets the held start go on: the state directory answers (an admin file
/// with no changes).
fn release_start(mut pipe: std::fs::File) {
    pipe.write_all(b"version = 1\n").unwrap();
}

/// `/readyz` while the start reads the pipe: 503, saying so.
async fn says_it_reads_the_state_directory(http: SocketAddr) {
    let ready = get(http, "/readyz", &[]).await;
    assert_eq!(ready.status, 503, "/readyz while starting: {}", ready.body);
    assert!(
        ready.body.starts_with("starting: ") && ready.body.contains("reading the state directory"),
        "/readyz while the start reads the state directory: {}",
        ready.body
    );
}

/// Stops the broker and removes what [`held_start`] made.
async fn finish(broker: Broker, dir: &Path, config: &Path) {
    let (status, log) = broker.terminate().await;
    assert!(status.success(), "{log}");
    assert!(log.contains("operators' changes restored"), "{log}");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(config);
}

/// A start held up by its state directory ([`held_start`]): meanwhile an
/// orchestrator's probes get answers: alive, not ready, and why; then
/// ready once the start is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_port_answers_probes_while_the_broker_starts() {
    let (broker, dir, pipe, config) = held_start("slow-start").await;
    let http = http_of(&broker);

    // The start reaches the pipe and waits there: alive, not ready, and
    // /readyz says what it is doing.
    let held = wait_for_the_pipe(&pipe).await;
    let alive = get(http, "/healthz", &[]).await;
    assert_eq!(alive.status, 200, "/healthz while starting: {}", alive.body);
    says_it_reads_the_state_directory(http).await;
    // The rest of the port: not there yet, come back.
    for path in ["/metrics", "/", "/events?tenant=t"] {
        let r = get(http, path, &[]).await;
        assert_eq!(r.status, 503, "{path} while starting: {}", r.body);
        assert!(r.body.starts_with("starting: "), "{path}: {}", r.body);
        assert_eq!(r.header("retry-after"), Some("1"), "{path}");
    }

    // The state directory answers (an admin file with no changes): the
    // start goes on, and the port turns ready; alive throughout.
    release_start(held);
    broker.until_logged("broker started").await;
    let ready = get(http, "/readyz", &[]).await;
    assert_eq!((ready.status, &ready.body[..]), (200, "ready\n"));
    let metrics = get(http, "/metrics", &[]).await;
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    assert_eq!(get(http, "/healthz", &[]).await.status, 200);

    finish(broker, &dir, &config).await;
}

/// The same held start on the gRPC port: a gRPC health check (what
/// grpc_health_probe and Kubernetes' gRPC probe send) is answered
/// NOT_SERVING at once rather than hanging until its deadline, a health
/// Watch opened meanwhile turns SERVING when the start is done, and the
/// broker's calls are answered UNAVAILABLE saying it is starting (which
/// clients treat as an outage: retry, or their fallback rate). The same
/// connection then gets the real answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_port_answers_while_the_broker_starts() {
    let (broker, dir, pipe, config) = held_start("slow-start-grpc").await;
    let http = http_of(&broker);
    let held = wait_for_the_pipe(&pipe).await;
    says_it_reads_the_state_directory(http).await;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", broker.addr))
        .unwrap()
        .timeout(LIMIT)
        .connect_timeout(LIMIT)
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let names = [
        "",
        "quota.v1.QuotaBroker",
        "quota.v1.QuotaAdmin",
        "grpc.health.v1.Health",
    ];
    for service in names {
        let s = tokio::time::timeout(LIMIT, health.check(check(service)))
            .await
            .expect("a health check is answered while the broker starts")
            .unwrap()
            .into_inner();
        assert_eq!(s.status(), ServingStatus::NotServing, "{service:?}");
    }
    let mut watch = health.watch(check("")).await.unwrap().into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );

    // The broker's calls: UNAVAILABLE, saying why (the fast Acquire path,
    // a call through the generated service, an admin call).
    let mut client = QuotaBrokerClient::new(channel.clone());
    let mut admin = QuotaAdminClient::new(channel.clone());
    let starting = |what: &str, s: tonic::Status| {
        assert_eq!(s.code(), tonic::Code::Unavailable, "{what}: {s:?}");
        assert!(
            s.message()
                .starts_with("the broker is starting (reading the state directory"),
            "{what}: {}",
            s.message()
        );
    };
    starting(
        "Acquire",
        client.acquire(req("GET", "/x", 0)).await.unwrap_err(),
    );
    starting(
        "Release",
        client
            .release(ReleaseRequest {
                tenant: "t".into(),
                lease_id: "l".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    );
    starting(
        "ListBuckets",
        admin
            .list_buckets(ListBucketsRequest::default())
            .await
            .unwrap_err(),
    );

    // The start goes on: the open Watch says SERVING, and the same
    // connection gets the broker's answers.
    release_start(held);
    let serving = tokio::time::timeout(LIMIT, watch.message())
        .await
        .expect("the health Watch turns SERVING once the broker has started")
        .unwrap()
        .unwrap();
    assert_eq!(serving.status(), ServingStatus::Serving);
    for service in names {
        let s = health.check(check(service)).await.unwrap().into_inner();
        assert_eq!(s.status(), ServingStatus::Serving, "{service:?}");
    }
    // The broker's decision (a bucket restarted on a state directory
    // starts empty, so it may be a refusal), not a start-up answer.
    let answer = client
        .acquire(req("GET", "/x", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.buckets, ["b"], "{answer:?}");
    let buckets = admin
        .list_buckets(ListBucketsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!buckets.buckets.is_empty());
    // A connection opened now.
    let mut fresh = QuotaBrokerClient::connect(format!("http://{}", broker.addr))
        .await
        .unwrap();
    let answer = fresh
        .acquire(req("GET", "/x", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.buckets, ["b"], "{answer:?}");
    drop(fresh);

    finish(broker, &dir, &config).await;
}

/// A stop asked for while the start is held: the start goes on to its end
/// (its work cannot be cut short), then the broker stops at once, and
/// health never says SERVING in between (it did, for a moment, before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_asked_for_during_the_start_never_says_serving() {
    let (broker, dir, pipe, config) = held_start("stop-during-start").await;
    let http = http_of(&broker);
    let held = wait_for_the_pipe(&pipe).await;
    says_it_reads_the_state_directory(http).await;
    broker.signal("-TERM");
    broker
        .until_logged("shutdown requested during the start")
        .await;
    release_start(held);
    let (status, log) = broker.exited().await;
    assert!(status.success(), "{log}");
    assert!(
        log.contains("broker started, and stops at once") && !log.contains("health SERVING"),
        "{log}"
    );
    assert!(log.contains("broker stopped"), "{log}");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(config);
}
