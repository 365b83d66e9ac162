//! The binary's mistakes and refusals: exit codes (2 for a bad argument,
//! setting or start-up check, 1 for what may pass later), messages that
//! say what is wrong without echoing long input, and `dlq` saying which
//! ids and how many more.

use std::time::{Duration, Instant};

use gc_relay::{Limits, NewRecord, Outcome, Queue, Stored};

use crate::common::*;

/// Runs the binary with `args` to its end: (exit code, stderr).
async fn gc_relay(args: &[String]) -> (Option<i32>, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gc-relay"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("gc-relay exits")
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `serve`'s arguments with `flag` set to `value` (replaced, or added).
fn serve_with(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    match args.iter().position(|a| a == flag) {
        Some(at) => args[at + 1] = value.to_owned(),
        None => args.extend([flag.to_owned(), value.to_owned()]),
    }
    args
}

/// Settings that cannot work exit 2 with one line naming what to change:
/// a login host that refuses connections (a wrong --region, with the
/// system's reason), a broker client id over the broker's limit, no
/// intake credentials, a queue URL of another database.
#[tokio::test]
async fn settings_that_cannot_work_exit_2_at_start() {
    let dir = TempDir::new("cli-settings");
    let sim = gcsim(sim_config(1.0, 300, 0)).await;
    let broker = broker(60_000).await;
    let args = serve_args(&dir.sqlite(), &sim, &broker.url);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();

    let (code, err) = gc_relay(&serve_with(
        args.clone(),
        "--region",
        &format!("http://{closed}"),
    ))
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "gc-relay: upstream: start-up check: the login host http://{closed} refuses \
             connections ("
        )) && err.to_lowercase().contains("connection refused")
            && err.contains("check --region"),
        "{err}"
    );

    let (code, err) = gc_relay(&serve_with(args.clone(), "--name", &"n".repeat(300))).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--name") && err.contains("300 bytes long") && err.contains("at most 256"),
        "{err}"
    );
    assert!(!err.contains("nnnnnnnnnn"), "the name echoed: {err}");

    let open: Vec<String> = args
        .iter()
        .take_while(|a| *a != "--basic-user")
        .cloned()
        .collect();
    let (code, err) = gc_relay(&open).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("intake needs credentials"), "{err}");

    let (code, err) = gc_relay(&serve_with(args.clone(), "--queue", "mysql://x/y")).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is not supported"), "{err}");

    // A queue path 20,000 characters long is quoted clipped.
    let long = format!("/nonexistent/{}", "x".repeat(20_000));
    let (code, err) = gc_relay(&serve_with(args, "--queue", &long)).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("lock file") && err.len() < 1_000, "{err}");
    let (code, err) = gc_relay(&strings(&["status", "--queue", &long])).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("there is no queue at /nonexistent/xxx") && err.len() < 1_000,
        "{err}"
    );
    broker.stop().await;
    sim.shutdown().await;
}

/// `status` and `dlq` against a PostgreSQL that refuses connections say
/// so at once, as `serve` does, not after the pool's wait.
#[tokio::test]
async fn status_says_at_once_that_postgres_refuses_connections() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let url = format!("postgres://relay@{closed}/queue");
    for args in [
        strings(&["status", "--queue", &url]),
        strings(&["dlq", "list", "--queue", &url]),
        strings(&["dlq", "drop", "--all", "--queue", &url]),
    ] {
        let started = Instant::now();
        let (code, err) = gc_relay(&args).await;
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains("could not connect to PostgreSQL")
                && err.to_lowercase().contains("connection refused"),
            "{args:?}: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{args:?}: took {:?}: {err}",
            started.elapsed()
        );
    }
}

/// `dlq list --limit` says how many more there are; `dlq replay` and
/// `drop` name the ids that are not dead letters.
#[tokio::test]
async fn dlq_says_how_many_more_and_which_ids_are_not_dead_letters() {
    let dir = TempDir::new("cli-dlq");
    let url = dir.sqlite();
    let q = Queue::open(&url, Limits::default()).await.unwrap();
    let mut ids = Vec::new();
    for key in ["a", "b", "c"] {
        let record = NewRecord {
            key: key.into(),
            order_key: key.into(),
            method: "POST".into(),
            path: "/api/v2/x".into(),
            body: None,
        };
        match q.enqueue(record).await.unwrap() {
            Stored::New(id) => ids.push(id),
            other => panic!("{other:?}"),
        }
    }
    for r in q.claim("t", 10, Duration::from_secs(60)).await.unwrap() {
        let dead = Outcome::Dead {
            status: 400,
            answer: "refused".into(),
        };
        q.finish(r.id, r.attempts, "t", dead).await.unwrap();
    }
    let cli = |args: &[&str]| {
        let mut args = strings(args);
        args.extend(strings(&["--queue", &url]));
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_gc-relay"))
                .args(&args)
                .output()
                .await
                .unwrap();
            (
                out.status.code(),
                String::from_utf8(out.stdout).unwrap(),
                String::from_utf8(out.stderr).unwrap(),
            )
        }
    };
    let (code, listed, err) = cli(&["dlq", "list", "--limit", "1"]).await;
    assert_eq!((code, listed.lines().count()), (Some(0), 1), "{err}");
    assert_eq!(
        err.trim(),
        "gc-relay: … and 2 more dead letters: raise --limit (now 1)"
    );
    let (code, listed, err) = cli(&["dlq", "list", "--limit", "3"]).await;
    assert_eq!((code, listed.lines().count()), (Some(0), 3), "{err}");
    assert!(err.is_empty(), "{err}");

    let (code, said, err) = cli(&["dlq", "replay", &ids[0].to_string(), "999"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(said.trim(), "1 dead letter back in the queue");
    assert_eq!(
        err.trim(),
        "gc-relay: 1 of the 2 ids named is not a dead letter: id 999; see gc-relay dlq list"
    );
    let (code, said, err) = cli(&["dlq", "drop", "--all"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(said.trim(), "2 dead letters dropped");
}
