//! The figures of gc-ingest against gcsim (the test bed of the
//! integration tests: three days of 8,000 conversations, a hidden limit of
//! 45 of a documented 60 per minute, an unmanaged consumer, at 100× speed),
//! the broker in process, SQLite files: per source, records/s, records per
//! upstream request and 429s; then a run aborted mid-way and resumed.
//!
//! `cargo run --release -p gc-ingest --example figures`

#[path = "../tests/it/common.rs"]
#[allow(dead_code, unreachable_pub)]
mod common;

use gc_ingest::{run, BlockSize, SourceKind};

use common::{open, plan, sqlite, until_done, Bed, DAY1, END};

#[tokio::main]
async fn main() {
    let bed = Bed::start().await;
    let expected = bed.conversation_ids().await;
    println!(
        "gcsim: {} conversations over 3 days; hour blocks for query, day blocks for jobs",
        expected.len()
    );
    println!(
        "| source | records | exact set | seconds | records/s | upstream requests | records/request | 429s (gcsim) |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|");
    for (kind, block, client) in [
        (SourceKind::Query, BlockSize::Hour, "fig-query"),
        (SourceKind::Jobs, BlockSize::Day, "fig-jobs"),
    ] {
        let path = sqlite(client);
        let sink = open(&path).await;
        let summary = run(&plan(DAY1, END, block), &bed.source(kind, client), &sink)
            .await
            .expect("the run completes");
        let exact = sink.conversation_ids().await.expect("ids") == expected;
        let (served, throttled) = bed.served(client).await;
        println!(
            "| {} | {} | {} | {:.1} | {:.0} | {} | {:.1} | {} ({:.2}%) |",
            kind.as_str(),
            summary.records,
            if exact { "yes" } else { "NO" },
            summary.elapsed_s,
            summary.records_per_s,
            served,
            summary.records_per_request,
            throttled.len(),
            throttled.len() as f64 * 100.0 / served.max(1) as f64,
        );
        sink.close().await;
    }

    // Aborted mid-run (the task dropped as a kill would), then resumed.
    let path = sqlite("fig-resume");
    let sink = open(&path).await;
    let plan = plan(DAY1, END, BlockSize::Hour);
    let source = bed.source(SourceKind::Query, "fig-resume");
    let first = {
        let (plan, source, sink) = (plan.clone(), source.clone(), sink.clone());
        tokio::spawn(async move { run(&plan, &source, &sink).await })
    };
    until_done(&sink, 30).await;
    first.abort();
    let _ = first.await;
    let resumed = run(&plan, &source, &sink)
        .await
        .expect("the resumed run completes");
    let checkpoints = sink.checkpoints().await.expect("checkpoints");
    let refetched = checkpoints.iter().filter(|c| c.fetches > 1).count();
    let exact = sink.conversation_ids().await.expect("ids") == expected;
    println!(
        "\nkill/resume (query): aborted with {} of 72 blocks done; the resumed run skipped {}, fetched {}, \
         re-fetched {refetched} finished blocks; exact set: {}",
        resumed.blocks_skipped,
        resumed.blocks_skipped,
        resumed.blocks_final,
        if exact { "yes" } else { "NO" },
    );
    sink.close().await;
    bed.sim.shutdown().await;
}
