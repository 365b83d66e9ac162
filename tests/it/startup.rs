//! The HTTP port while the broker starts: it answers from the moment it is
//! bound (`/healthz` 200, `/readyz` and every other path 503 "starting"),
//! then serves the broker's routes once the start is done.

use super::child::{temp_config, Broker};
use super::harness::{fresh_dir, poll_pause};
use super::observe::get;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

/// Bound on every wait of this test.
const LIMIT: Duration = Duration::from_secs(20);

/// A start held up by its state directory, deterministically: its
/// `admin.toml` is a named pipe, which the start reads and which gives
/// nothing until the test writes to it (a state directory on a disk that
/// answers late). Meanwhile an orchestrator's probes get answers: alive,
/// not ready, and why; then ready once the start is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_port_answers_probes_while_the_broker_starts() {
    let dir = fresh_dir("slow-start");
    std::fs::create_dir_all(&dir).unwrap();
    let pipe = dir.join("admin.toml");
    assert!(Command::new("mkfifo")
        .arg(&pipe)
        .status()
        .unwrap()
        .success());
    let config = temp_config(
        "slow-start",
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
    let broker = Broker::start(&config).await;
    let http: SocketAddr = broker
        .http
        .as_deref()
        .expect("the broker logs its HTTP address")
        .parse()
        .unwrap();

    // The start reaches the pipe and waits there: alive, not ready, and
    // /readyz says what it is doing.
    let deadline = Instant::now() + LIMIT;
    loop {
        let alive = get(http, "/healthz", &[]).await;
        assert_eq!(alive.status, 200, "/healthz while starting: {}", alive.body);
        let ready = get(http, "/readyz", &[]).await;
        assert_eq!(ready.status, 503, "/readyz while starting: {}", ready.body);
        assert!(ready.body.starts_with("starting: "), "{}", ready.body);
        if ready.body.contains("reading the state directory") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the start never said it reads the state directory: {}",
            ready.body
        );
        poll_pause().await;
    }
    // The rest of the port: not there yet, come back.
    for path in ["/metrics", "/", "/events?tenant=t"] {
        let r = get(http, path, &[]).await;
        assert_eq!(r.status, 503, "{path} while starting: {}", r.body);
        assert!(r.body.starts_with("starting: "), "{path}: {}", r.body);
        assert_eq!(r.header("retry-after"), Some("1"), "{path}");
    }

    // The state directory answers (an admin file with no changes): the
    // start goes on, and the port turns ready; alive throughout.
    let writer = tokio::task::spawn_blocking(move || {
        let mut file = std::fs::OpenOptions::new().write(true).open(&pipe)?;
        file.write_all(b"version = 1\n")
    });
    tokio::time::timeout(LIMIT, writer)
        .await
        .expect("the broker opened its admin.toml")
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + LIMIT;
    loop {
        let alive = get(http, "/healthz", &[]).await;
        assert_eq!(alive.status, 200, "/healthz while starting: {}", alive.body);
        let ready = get(http, "/readyz", &[]).await;
        if ready.status == 200 {
            assert_eq!(ready.body, "ready\n");
            break;
        }
        assert_eq!(ready.status, 503, "{}", ready.body);
        assert!(ready.body.starts_with("starting: "), "{}", ready.body);
        assert!(
            Instant::now() < deadline,
            "/readyz stayed 503 once the state directory answered: {}",
            ready.body
        );
        poll_pause().await;
    }
    let metrics = get(http, "/metrics", &[]).await;
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    assert_eq!(get(http, "/healthz", &[]).await.status, 200);

    let (status, log) = broker.terminate().await;
    assert!(status.success(), "{log}");
    assert!(log.contains("operators' changes restored"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&config);
}
