//! The binary killed with SIGKILL mid-run and run again: it resumes where
//! it stopped, never fetches a finished block again, and the database ends
//! with exactly gcsim's conversations.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

use crate::common::{open, sqlite, until_done, Bed, DAY1, END};

fn gc_ingest(bed: &Bed, sink: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gc-ingest"));
    cmd.args(["--region", &bed.region()])
        .args([
            "--client-id",
            "resume@org-a",
            "--client-secret",
            "gcsim-secret",
        ])
        .args(["--broker", &bed.broker.url(), "--tenant", "org-a"])
        .args(["--source", "query", "--from", DAY1, "--to", END])
        .args(["--sink", sink, "--parallel", "1", "--json", "--quiet"])
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
