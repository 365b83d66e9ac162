//! `quotactl watch`: `--count` prints the snapshot (JSON lines, or one
//! table merged from it) and exits; a Watch whose broker stops says so and
//! exits 1.

use super::{Broker, CLIENT, FIELDS, LIMIT};
use serde_json::Value;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_json_count_prints_the_snapshot_and_exits() {
    let b = Broker::start().await;
    let out = b
        .ok(Some(CLIENT), &["watch", "--json", "--count", "2"])
        .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    for l in lines {
        let v: Value = serde_json::from_str(l).unwrap();
        for f in FIELDS {
            assert!(v.get(f).is_some(), "no {f} in {l}");
        }
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_table_merges_the_snapshot() {
    let b = Broker::start().await;
    let n = b.buckets().await.len();
    let count = n.to_string();
    let out = b
        .ok(Some(CLIENT), &["watch", "--tenant", "t", "--count", &count])
        .await;
    // Not a terminal: no escape codes, just the table(s).
    assert!(!out.contains('\x1b'), "{out:?}");
    let last = out
        .split("\n\n")
        .filter(|t| !t.trim().is_empty())
        .last()
        .unwrap();
    let lines: Vec<&str> = last.lines().collect();
    assert!(lines[0].starts_with("TENANT"), "{out}");
    assert_eq!(lines.len(), n + 1, "one row per bucket, merged: {out}");
    assert!(last.contains("org") && last.contains("jobs"), "{out}");
    b.stop().await;
}

/// A Watch does not end by itself: when its broker stops, quotactl says
/// so and exits 1, so a script can tell it from `--count` reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_says_so_and_exits_1_when_the_broker_stops() {
    // Of one tenant too: with one broker given there is nowhere to follow
    // it to.
    for args in [
        &["watch", "--json"][..],
        &["watch", "--tenant", "t", "--json"],
    ] {
        watch_ends_when_the_broker_stops(args).await;
    }
}

async fn watch_ends_when_the_broker_stops(args: &[&str]) {
    let b = Broker::start().await;
    let mut child = b
        .cmd(Some(CLIENT), args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = timeout(LIMIT, lines.next_line())
        .await
        .expect("a snapshot line in time")
        .unwrap()
        .expect("a line");
    serde_json::from_str::<Value>(&first).unwrap();
    // Shutting the broker down ends the Watch stream.
    b.stop().await;
    while let Ok(Some(_)) = timeout(LIMIT, lines.next_line())
        .await
        .expect("stdout closes in time")
    {}
    let status = timeout(LIMIT, child.wait())
        .await
        .expect("quotactl exits in time")
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert_eq!(
        (status.code(), err.trim()),
        (
            Some(1),
            "quotactl: UNAVAILABLE: the broker is shutting down; retry once it is back"
        ),
        "{args:?}"
    );
}
