//! The binary killed with SIGKILL mid-run and run again: it resumes where
//! it stopped, never fetches a finished block again, and the database ends
//! with exactly gcsim's conversations.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

use crate::common::{open, sqlite, until_done, Bed, DAY1, END};

fn gc_ingest(bed: &Bed, sink: &str) -> Command {
    gc_ingest_from(
        bed,
        sink,
        &["--source", "query", "--parallel", "1", "--quiet"],
    )
}

/// gc-ingest over the bed's range into `sink`, reading as `source` says.
fn gc_ingest_from(bed: &Bed, sink: &str, source: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gc-ingest"));
    cmd.args(["--region", &bed.region()])
        .args([
            "--client-id",
            "resume@org-a",
            "--client-secret",
            "gcsim-secret",
        ])
        .args(["--broker", &bed.broker.url(), "--tenant", "org-a"])
        .args(source)
        .args(["--from", DAY1, "--to", END])
        .args(["--sink", sink, "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_run_it_resumes_without_fetching_finished_blocks_again() {
    let bed = Bed::start().await;
    let path = sqlite("resume");
    let sink_arg = path.to_str().unwrap().to_owned();
    let watcher = open(&path).await;
    let mut first = gc_ingest(&bed, &sink_arg).spawn().unwrap();
    until_done(&watcher, 8).await;
    first.start_kill().unwrap();
    let killed = first.wait().await.unwrap();
    assert!(!killed.success(), "it was still running when killed");
    let before = watcher.checkpoints().await.unwrap();
    let done_before = before.iter().filter(|c| c.status == "done").count() as u64;
    assert!(done_before < 72, "the kill came too late to test anything");

    let second = tokio::time::timeout(
        Duration::from_secs(120),
        gc_ingest(&bed, &sink_arg).output(),
    )
    .await
    .expect("the second run ends")
    .unwrap();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let summary: Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(summary["blocks_skipped"], done_before, "{summary}");
    assert_eq!(summary["blocks_final"], 72 - done_before, "{summary}");
    let after = watcher.checkpoints().await.unwrap();
    assert_eq!(after.len(), 72);
    assert!(
        after.iter().all(|c| c.status == "done" && c.fetches == 1),
        "a finished block was fetched again: {after:?}"
    );
    assert_eq!(
        watcher.conversation_ids().await.unwrap(),
        bed.conversation_ids().await
    );
    watcher.close().await;
    bed.sim.shutdown().await;
}

/// Arguments it cannot use exit 2 with one line saying why, before any
/// request: a reversed or absurd range, an absurd duration.
#[test]
fn bad_arguments_exit_2_before_any_request() {
    for (extra, says) in [
        (
            &["--from", "2026-11-02", "--to", "2026-11-01"][..],
            "the range is empty",
        ),
        (
            &["--from", "0001-01-01", "--to", "9999-12-31"][..],
            "at most 1000000 a run",
        ),
        (
            &[
                "--from",
                "2026-11-01",
                "--to",
                "2026-11-02",
                "--watermark",
                "9223372036854775808ms",
            ][..],
            "at most 36500d",
        ),
        (
            &["--from", "2026-11-01", "--to", "2026-11-02", "--poll", "0s"][..],
            "the first poll pause is 100ms to 30s",
        ),
        (
            &[
                "--from",
                "2026-11-01",
                "--to",
                "2026-11-02",
                "--poll",
                "31s",
            ][..],
            "the first poll pause is 100ms to 30s",
        ),
        (
            &[
                "--from",
                "2026-11-01",
                "--to",
                "2026-11-02",
                "--parallel",
                "0",
            ][..],
            "0 is not in 1..=256",
        ),
        (
            &[
                "--from",
                "2026-11-01",
                "--to",
                "2026-11-02",
                "--job-wait",
                "30s",
            ][..],
            "a job's wait is 1m to 7d",
        ),
        (
            &[
                "--from",
                "2026-11-01",
                "--to",
                "2026-11-02",
                "--job-wait",
                "8d",
            ][..],
            "a job's wait is 1m to 7d",
        ),
        (
            &[
                "--from",
                "2026-11-01",
                "--to",
                "2026-11-02",
                "--max-jobs",
                "0",
            ][..],
            "0 is not in 1..=256",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gc-ingest"))
            .args(["--region", "http://127.0.0.1:9", "--tenant", "t"])
            .args(["--client-id", "a", "--client-secret", "b"])
            .args(["--sink", "/nonexistent/never-opened.db"])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(says), "{extra:?}: {err}");
    }
    // A worker name the broker would refuse on every call (after the
    // blocks were claimed), and times: each names its flag, quoting
    // nothing long.
    let long = "w".repeat(300);
    let (from, to) = (["--from", "2026-11-01"], ["--to", "2026-11-02"]);
    for (extra, says) in [
        (
            [&from[..], &to, &["--worker", long.as_str()]].concat(),
            "gc-ingest: --worker: 300 bytes long; the broker takes a client id of at most 256 bytes",
        ),
        (
            [&to[..], &["--from", "yesterday"]].concat(),
            "gc-ingest: --from: \"yesterday\" is not a date",
        ),
        (
            [&from[..], &to, &["--now", "soon"]].concat(),
            "gc-ingest: --now: \"soon\" is not a date",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gc-ingest"))
            .args(["--region", "http://127.0.0.1:9", "--tenant", "t"])
            .args(["--client-id", "a", "--client-secret", "b"])
            .args(["--sink", "/nonexistent/never-opened.db"])
            .args(&extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.starts_with(says), "{err}");
        assert!(err.len() < 300, "{err}");
    }
    // Another database's URL is not a file name.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gc-ingest"))
        .args(["--region", "http://127.0.0.1:9", "--tenant", "t"])
        .args(["--client-id", "a", "--client-secret", "b"])
        .args(["--sink", "mysql://u:p@db/ingest"])
        .args(["--from", "2026-11-01", "--to", "2026-11-02"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--sink \"mysql\"://…: not a database gc-ingest writes to"),
        "{err}"
    );
}

/// A login host that refuses connections (a wrong --region) exits 2 at
/// start, before the sink is opened: it only warned, and every block then
/// failed after its retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_host_that_refuses_connections_exits_2_at_start() {
    let bed = Bed::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let sink = std::env::temp_dir().join(format!("gc-ingest-refused-{}.db", std::process::id()));
    let region = format!("http://{closed}");
    let out = start_check(&region, "gcsim-secret", &bed.broker.url(), "org-a", &sink).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "the login host http://{closed} refuses connections ("
        )) && err.to_lowercase().contains("connection refused"),
        "{err}"
    );
    assert!(!sink.exists(), "the sink was opened: {err}");
    // A region 20,000 characters long is quoted clipped, whatever the
    // resolver makes of it.
    let long = format!("http://{}.invalid", "x".repeat(20_000));
    let never = std::path::Path::new("/nonexistent/dir/ingest.db");
    let out = start_check(&long, "gcsim-secret", &bed.broker.url(), "org-a", never).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.len() < 1_000, "{} bytes: {err}", err.len());
    bed.sim.shutdown().await;
}

/// Runs gc-ingest over day 1 with these login and broker settings into
/// `sink`, as a run whose start-up check is under test; its output.
async fn start_check(
    region: &str,
    secret: &str,
    broker: &str,
    tenant: &str,
    sink: &std::path::Path,
) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_gc-ingest"))
        .args(["--region", region])
        .args(["--client-id", "check@org-a", "--client-secret", secret])
        .args(["--broker", broker, "--tenant", tenant])
        .args(["--source", "query", "--from", DAY1, "--to", END])
        .arg("--sink")
        .arg(sink)
        .args(["--json", "--quiet"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("it exits")
        .unwrap()
}

/// A sink that cannot be reached now (a database down or restarting) is
/// exit 1, which an orchestrator retries; one that can never be opened
/// (a directory that does not exist) stays 2, a bad argument.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_down_exits_1_and_a_sink_that_cannot_be_exits_2() {
    let bed = Bed::start().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let down = format!("postgres://postgres@{closed}/ingest");
    let out = start_check(
        &bed.region(),
        "gcsim-secret",
        &bed.broker.url(),
        "org-a",
        std::path::Path::new(&down),
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot reach the sink"), "{err}");
    let never = std::path::Path::new("/nonexistent/dir/ingest.db");
    let out = start_check(
        &bed.region(),
        "gcsim-secret",
        &bed.broker.url(),
        "org-a",
        never,
    )
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot open the sink"), "{err}");
    bed.sim.shutdown().await;
}

/// A wrong client secret or tenant exits 2 with one line saying which,
/// before the sink is opened or any block planned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_or_tenant_exits_2_before_the_sink_is_opened() {
    let bed = Bed::start().await;
    let sink = std::env::temp_dir().join(format!("gc-ingest-never-{}.db", std::process::id()));
    for (secret, tenant, says) in [
        (
            "wrong-secret",
            "org-a",
            "start-up check: login refused (401)",
        ),
        (
            "gcsim-secret",
            "org-unknown",
            "start-up check: lease refused: broker refused: NOT_FOUND: tenant \"org-unknown\"",
        ),
    ] {
        let out = start_check(&bed.region(), secret, &bed.broker.url(), tenant, &sink).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.starts_with(&format!("gc-ingest: {says}")), "{err}");
        assert!(!sink.exists(), "the sink was opened: {err}");
    }
    bed.sim.shutdown().await;
}

/// SIGTERM while two jobs run: the run stops at once without waiting for
/// them, deletes both jobs upstream, releases their two slots at the
/// broker (not at their lease's expiry), unclaims the two blocks and
/// gives its worker name back, says so and exits 143. The signal comes
/// twice at once, as GNU `timeout` sends it (to the process, then to its
/// process group): still one stop, not the "second signal" that exits at
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_gives_back_the_jobs_slots_and_blocks_in_progress() {
    let bed = Bed::with_slow_jobs().await;
    let path = sqlite("sigterm");
    let sink_arg = path.to_str().unwrap().to_owned();
    let watcher = open(&path).await;
    let jobs = [
        "--source",
        "jobs",
        "--parallel",
        "2",
        "--max-jobs",
        "2",
        "--poll",
        "100ms",
    ];
    let run = gc_ingest_from(&bed, &sink_arg, &jobs).spawn().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    // Both submitted and polled (so each said it was submitted) under
    // their two slots.
    let jobs_polled = |answers: Vec<(String, u64)>| {
        let jobs: std::collections::HashSet<String> =
            answers.into_iter().map(|(path, _)| path).collect();
        jobs.len()
    };
    let job_paths = format!("{}/", gc_ingest::JOBS_PATH);
    while jobs_polled(bed.answered("GET", &job_paths).await) < 2
        || bed.in_flight("jobs-running").await < 2
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "two jobs not running within 60 s"
        );
        tick.tick().await;
    }
    let claimed = |checkpoints: Vec<gc_ingest::Checkpoint>| {
        checkpoints.iter().filter(|c| c.status == "claimed").count()
    };
    assert_eq!(claimed(watcher.checkpoints().await.unwrap()), 2);
    let signalled = tokio::time::Instant::now();
    for _ in 0..2 {
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &run.id().unwrap().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
    }
    let out = tokio::time::timeout(Duration::from_secs(30), run.wait_with_output())
        .await
        .expect("it stops within 30 s of SIGTERM")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    // Not a terminal: a line as each job was submitted, then one saying
    // what a stop does.
    assert_eq!(stderr.matches(": job submitted\n").count(), 2, "{stderr}");
    assert!(
        stderr.contains("stopping: the blocks in progress are given back"),
        "{stderr}"
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["stopped"], true, "{summary}");
    assert_eq!(summary["blocks_stopped"], 2, "{summary}");
    // Released, not expired: the slots' lease TTL is 60 s.
    assert_eq!(bed.in_flight("jobs-running").await, 0);
    assert!(
        signalled.elapsed() < Duration::from_secs(60),
        "took {:?}: a release cannot be told from an expiry",
        signalled.elapsed()
    );
    let deleted: Vec<u64> = bed
        .answered("DELETE", gc_ingest::JOBS_PATH)
        .await
        .into_iter()
        .map(|(_, status)| status)
        .collect();
    assert_eq!(deleted, [204, 204], "both jobs deleted");
    // Their claims are given up: another worker takes them at once.
    let left: Vec<gc_ingest::Block> = watcher
        .checkpoints()
        .await
        .unwrap()
        .iter()
        .filter(|c| c.status == "claimed")
        .map(|c| c.block)
        .collect();
    assert_eq!(left.len(), 2);
    for block in left {
        let now = gc_ingest::now_ms();
        let taken = watcher.claim(block, "another", now, Duration::from_secs(60));
        assert!(taken.await.unwrap(), "{block} still claimed");
    }
    assert_eq!(watcher.worker_name_holder("gc-ingest").await.unwrap(), None);
    watcher.close().await;
    bed.sim.shutdown().await;
}
