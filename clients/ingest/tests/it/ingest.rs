//! Whole runs in process: both sources store exactly gcsim's set with few
//! 429s (and the jobs API moves ≥ 10× the records per request), the
//! watermark, two workers on one range, a broker restart mid-run, jobs
//! that never end or whose results cursor repeats or pages on under new
//! cursors, refused credentials counted as blocks given back.

use std::time::Duration;

use gc_ingest::{parse_time, run, run_reporting, BlockSize, JobOptions, SourceKind, JOBS_PATH};
use tokio_util::sync::CancellationToken;

use crate::common::{open, plan, sqlite, until_done, Bed, Broker, DAY1, END};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sources_store_exactly_gcsims_conversations() {
    // 48,000 conversations: ~580 query requests, enough for the 429 ratio
    // to be measured past the first learning (one 429 is 0.17 %).
    let bed = Bed::with_per_day(16_000).await;
    let expected = bed.conversation_ids().await;
    assert_eq!(expected.len(), 48_000);
    let mut per_request = Vec::new();
    for (kind, block, client) in [
        (SourceKind::Query, BlockSize::Hour, "query"),
        (SourceKind::Jobs, BlockSize::Day, "jobs"),
    ] {
        let path = sqlite(client);
        let sink = open(&path).await;
        let summary = run(&plan(DAY1, END, block), &bed.source(kind, client), &sink)
            .await
            .unwrap();
        assert_eq!(sink.conversation_ids().await.unwrap(), expected, "{client}");
        assert_eq!(summary.records, 48_000, "{summary:?}");
        assert_eq!(summary.blocks_final, summary.blocks_total, "{summary:?}");
        assert_eq!((summary.blocks_failed, summary.mismatches), (0, 0));
        let checkpoints = sink.checkpoints().await.unwrap();
        assert!(checkpoints
            .iter()
            .all(|c| c.total_hits == Some(c.records) && c.fetches == 1));
        let (served, throttled) = bed.served(client).await;
        eprintln!("{client}: {} 429s in {served} requests", throttled.len());
        assert_eq!(served, summary.upstream_requests, "gcsim saw every request");
        assert!(
            throttled.len() as u64 * 100 <= served,
            "{client}: {} 429s in {served} requests: {throttled:?}",
            throttled.len()
        );
        per_request.push(summary.records_per_request);
        sink.close().await;
    }
    assert!(
        per_request[1] >= 10.0 * per_request[0],
        "records per request: query {:.1}, jobs {:.1}",
        per_request[0],
        per_request[1]
    );
    bed.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_newer_than_the_watermark_are_fetched_again_next_run() {
    let bed = Bed::start().await;
    let path = sqlite("watermark");
    let sink = open(&path).await;
    let mut plan = plan("2026-11-03", END, BlockSize::Hour);
    plan.now_ms = parse_time("2026-11-03T20:00:00Z").unwrap();
    plan.watermark = Duration::from_secs(4 * 3600);
    let source = bed.source(SourceKind::Query, "wm");
    let first = run(&plan, &source, &sink).await.unwrap();
    // Blocks ending by 16:00 are final; the 8 after are provisional.
    assert_eq!((first.blocks_final, first.blocks_provisional), (16, 8));
    let second = run(&plan, &source, &sink).await.unwrap();
    assert_eq!(
        (second.blocks_skipped, second.blocks_provisional),
        (16, 8),
        "{second:?}"
    );
    let fetches: Vec<i64> = sink
        .checkpoints()
        .await
        .unwrap()
        .iter()
        .map(|c| c.fetches)
        .collect();
    assert_eq!(fetches, [[1; 16].as_slice(), &[2; 8]].concat());
    // Fetched twice, stored once.
    assert_eq!(sink.count().await.unwrap() as u64, first.records);
    sink.close().await;
    bed.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_split_one_range_and_never_fetch_a_block_twice() {
    let bed = Bed::start().await;
    let path = sqlite("split");
    let (a, b) = (open(&path).await, open(&path).await);
    let mut plan_a = plan(DAY1, "2026-11-02", BlockSize::Hour);
    plan_a.owner = "w1".into();
    plan_a.parallel = 2;
    let mut plan_b = plan_a.clone();
    plan_b.owner = "w2".into();
    let (source_a, source_b) = (
        bed.source(SourceKind::Query, "w1"),
        bed.source(SourceKind::Query, "w2"),
    );
    let (ra, rb) = tokio::join!(run(&plan_a, &source_a, &a), run(&plan_b, &source_b, &b));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.blocks_final + rb.blocks_final, 24, "{ra:?} {rb:?}");
    assert!(ra.blocks_final > 0 && rb.blocks_final > 0, "{ra:?} {rb:?}");
    assert!(a
        .checkpoints()
        .await
        .unwrap()
        .iter()
        .all(|c| c.fetches == 1));
    let ids = a.conversation_ids().await.unwrap();
    let expected: Vec<String> = bed.conversation_ids().await[..]
        .iter()
        .filter(|id| ids.binary_search(id).is_ok())
        .cloned()
        .collect();
    assert_eq!(ids.len() as u64, ra.records + rb.records);
    assert_eq!(ids, expected);
    a.close().await;
    b.close().await;
    bed.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_run_loses_nothing() {
    let mut bed = Bed::start().await;
    let path = sqlite("restart");
    let sink = open(&path).await;
    let mut plan = plan(DAY1, END, BlockSize::Hour);
    plan.parallel = 2;
    let source = bed.source(SourceKind::Query, "restart");
    let task = {
        let (sink, source) = (sink.clone(), source.clone());
        tokio::spawn(async move { run(&plan, &source, &sink).await })
    };
    until_done(&sink, 10).await;
    // Down: the client falls back to its local limiter and the run goes on
    // (a block finished on a fallback lease; counting blocks alone could
    // pass on blocks whose leases came before the stop).
    let addr = bed.broker.addr.to_string();
    let done_before = done(&sink).await;
    bed.broker.stop().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        if source.upstream().stats().fallback_leases > 0 && done(&sink).await > done_before + 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no block done on fallback leases within 60 s of the broker's stop"
        );
    }
    // Back on the same port: leases come from it again.
    bed.broker = Broker::start(&addr).await;
    let summary = tokio::time::timeout(Duration::from_secs(120), task)
        .await
        .expect("the run ends")
        .unwrap()
        .unwrap();
    assert_eq!(summary.blocks_final, 72, "{summary:?}");
    assert!(summary.fallback_leases > 0, "{summary:?}");
    assert_eq!(
        sink.conversation_ids().await.unwrap(),
        bed.conversation_ids().await
    );
    sink.close().await;
    bed.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_short_of_its_total_hits_is_fetched_again_and_reported() {
    let bed = Bed::start().await;
    bed.short_pages(1).await;
    let (summary, sink) = one_worker(&bed, "short", "2026-11-02").await;
    assert_eq!(
        (summary.mismatches, summary.blocks_final),
        (1, 24),
        "{summary:?}"
    );
    let checkpoints = sink.checkpoints().await.unwrap();
    assert_eq!(checkpoints[0].mismatches, 1, "the first block's first page");
    assert!(checkpoints.iter().all(|c| c.total_hits == Some(c.records)));
    assert_eq!(sink.count().await.unwrap() as u64, summary.records);
    sink.close().await;
    bed.sim.shutdown().await;
}

/// A block that never agrees with its totalHits fails after its attempts,
/// and each of them is counted as a fetch thrown away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fetches_of_a_block_that_never_agrees_are_counted() {
    let bed = Bed::start().await;
    bed.short_pages(1_000_000).await;
    let (summary, sink) = one_worker(&bed, "never-agrees", "2026-11-01T03:00:00Z").await;
    assert_eq!(
        (summary.blocks_failed, summary.mismatches, summary.records),
        (3, 9, 0),
        "{summary:?}"
    );
    sink.close().await;
    bed.sim.shutdown().await;
}

/// A conversation removed while a block is paged shifts the later pages
/// one row back and lowers their totalHits: the row at the page boundary
/// is read by no page, and the count the last page gives matches what was
/// read. The block is checked against the first page's count and fetched
/// again, so nothing is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_whose_pages_shift_while_it_is_read_is_fetched_again() {
    let bed = Bed::start().await;
    bed.shifted_queries(1).await;
    let (summary, sink) = one_worker(&bed, "shifted", END).await;
    let (stored, truth) = (
        sink.conversation_ids().await.unwrap(),
        bed.conversation_ids().await,
    );
    let missing: Vec<&String> = truth.iter().filter(|id| !stored.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} never stored: {missing:?}",
        missing.len(),
        truth.len()
    );
    assert_eq!(stored.len(), truth.len());
    assert_eq!(
        (summary.mismatches, summary.blocks_final),
        (1, 72),
        "{summary:?}"
    );
    sink.close().await;
    bed.sim.shutdown().await;
}

/// A query run of one worker over `[DAY1, to)` in hour blocks, into a new
/// SQLite sink `name`: its summary, and the sink.
async fn one_worker(bed: &Bed, name: &str, to: &str) -> (gc_ingest::Summary, gc_ingest::Sink) {
    let sink = open(&sqlite(name)).await;
    let mut plan = plan(DAY1, to, BlockSize::Hour);
    plan.parallel = 1;
    let summary = run(&plan, &bed.source(SourceKind::Query, name), &sink)
        .await
        .unwrap();
    (summary, sink)
}

/// Starts a run of `plan` and waits (bounded) until it holds its worker
/// name.
async fn holding_the_name(
    plan: &gc_ingest::Plan,
    source: &gc_ingest::Source,
    sink: &gc_ingest::Sink,
) -> tokio::task::JoinHandle<Result<gc_ingest::Summary, gc_ingest::IngestError>> {
    let handle = {
        let (plan, source, sink) = (plan.clone(), source.clone(), sink.clone());
        tokio::spawn(async move { run(&plan, &source, &sink).await })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sink
        .worker_name_holder(&plan.owner)
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the run never took its worker name"
        );
        tokio::task::yield_now().await;
    }
    handle
}

#[tokio::test]
async fn a_second_run_under_the_same_worker_name_does_not_fetch_the_range_again() {
    let bed = Bed::start().await;
    let path = sqlite("same-name");
    let sink = open(&path).await;
    let plan = plan(DAY1, "2026-11-02", BlockSize::Hour);
    let source = bed.source(SourceKind::Query, "same-name");
    // Once the first run holds the name (an overlapping cron run starts):
    let first = holding_the_name(&plan, &source, &sink).await;
    let second = run(&plan, &source, &sink).await;
    assert!(
        matches!(&second, Err(gc_ingest::IngestError::WorkerBusy(_))),
        "{second:?}"
    );
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.blocks_final, 24, "{first:?}");
    // The name is free again once the first run is over.
    assert_eq!(sink.worker_name_holder(&plan.owner).await.unwrap(), None);
    sink.close().await;
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn a_cancelled_run_gives_its_worker_name_back() {
    let bed = Bed::start().await;
    let path = sqlite("cancelled");
    let sink = open(&path).await;
    let plan = plan(DAY1, "2026-11-02", BlockSize::Hour);
    let source = bed.source(SourceKind::Query, "cancelled");
    let first = holding_the_name(&plan, &source, &sink).await;
    // A caller drops the run (a drain deadline, a select that took
    // another branch): the name must not stay held by a heartbeat that
    // outlives the run, or every later run under it is refused.
    // The next run under the name, in the same process, goes ahead.
    first.abort();
    let _ = first.await;
    let second = run(&plan, &source, &sink).await.unwrap();
    assert_eq!(
        second.blocks_final + second.blocks_skipped,
        24,
        "{second:?}"
    );
    assert_eq!(sink.worker_name_holder(&plan.owner).await.unwrap(), None);
    sink.close().await;
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn refused_credentials_stop_the_run_once_instead_of_failing_every_block() {
    let bed = Bed::start().await;
    let path = sqlite("refused");
    let sink = open(&path).await;
    let plan = plan(DAY1, "2026-11-02", BlockSize::Hour);
    let source = bed.source_with_secret(SourceKind::Query, "refused", "not-the-secret");
    let failed = run_reporting(&plan, &source, &sink, &CancellationToken::new())
        .await
        .unwrap_err();
    let err = failed.error;
    assert!(matches!(err, gc_ingest::IngestError::Usage(_)), "{err}");
    assert!(err.to_string().contains("login"), "{err}");
    // Every block a worker took was refused or dropped, given back: in
    // progress, not "not started". A block claimed is one taken (a claim
    // the halt cut short may not have reached the sink).
    let summary = failed.summary.expect("a summary");
    let claimed = sink.checkpoints().await.unwrap().len() as u64;
    assert!(
        (1..=summary.blocks_stopped).contains(&claimed)
            && summary.blocks_stopped <= plan.parallel as u64,
        "{claimed} claimed: {summary:?}"
    );
    assert_eq!(
        (
            summary.blocks_total,
            summary.blocks_final,
            summary.blocks_failed,
            summary.blocks_busy
        ),
        (24, 0, 0, 0),
        "{summary:?}"
    );
    // Nothing left claimed: with the right secret the next run takes every
    // block at once.
    let good = bed.source(SourceKind::Query, "refused");
    let again = run(&plan, &good, &sink).await.unwrap();
    assert_eq!(
        (again.blocks_final, again.blocks_busy, again.blocks_failed),
        (24, 0, 0),
        "{again:?}"
    );
    sink.close().await;
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn a_malformed_record_fails_its_block_and_the_run_goes_on() {
    let bed = Bed::start().await;
    bed.malformed_pages(1).await;
    let path = sqlite("malformed");
    let sink = open(&path).await;
    let mut plan = plan(DAY1, "2026-11-02", BlockSize::Hour);
    plan.parallel = 1;
    let source = bed.source(SourceKind::Query, "malformed");
    let summary = run(&plan, &source, &sink).await.unwrap();
    assert_eq!(
        (summary.blocks_failed, summary.blocks_final),
        (1, 23),
        "{summary:?}"
    );
    assert!(
        summary.errors[0].contains("no conversationStart"),
        "{:?}",
        summary.errors
    );
    // The fault is spent: the next run stores the block it left.
    let again = run(&plan, &source, &sink).await.unwrap();
    assert_eq!(
        (again.blocks_failed, again.blocks_final),
        (0, 1),
        "{again:?}"
    );
    assert_eq!(
        sink.count().await.unwrap() as u64,
        summary.records + again.records
    );
    sink.close().await;
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn job_results_over_the_body_limit_are_asked_for_in_smaller_pages() {
    let bed = Bed::start().await;
    let path = sqlite("small-pages");
    let sink = open(&path).await;
    let source = bed.source(SourceKind::Jobs, "small-pages");
    // A day's 8,000 records do not fit in 200 kB; pages of 10,000 records
    // of real size might not fit in the default 32 MiB.
    source.upstream().set_max_body(200_000);
    let plan = plan(DAY1, "2026-11-02", BlockSize::Day);
    let summary = run(&plan, &source, &sink).await.unwrap();
    assert_eq!(
        (summary.blocks_failed, summary.blocks_final),
        (0, 1),
        "{summary:?}"
    );
    assert_eq!(summary.records, 8_000, "the whole day");
    assert_eq!(sink.count().await.unwrap(), 8_000);
    assert!(
        summary.upstream_requests >= 8,
        "{} requests: the pages were not smaller",
        summary.upstream_requests
    );
    sink.close().await;
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn a_job_block_past_the_upstreams_data_is_provisional_until_the_data_is_there() {
    let bed = Bed::start().await;
    let noon = gc_ingest::parse_time("2026-11-01T12:00:00Z").unwrap();
    bed.jobs_available_until(Some(noon)).await;
    let path = sqlite("availability");
    let sink = open(&path).await;
    let source = bed.source(SourceKind::Jobs, "availability");
    let plan = plan(DAY1, "2026-11-02", BlockSize::Day);
    let first = run(&plan, &source, &sink).await.unwrap();
    assert_eq!(
        (first.blocks_final, first.blocks_provisional),
        (0, 1),
        "the day's data ended at noon: {first:?}"
    );
    assert!(first.records > 0 && first.records < 8_000, "{first:?}");
    // The data catches up: the next run fetches the block again, whole.
    bed.jobs_available_until(None).await;
    let second = run(&plan, &source, &sink).await.unwrap();
    assert_eq!(
        (second.blocks_final, second.records),
        (1, 8_000),
        "{second:?}"
    );
    assert_eq!(sink.count().await.unwrap(), 8_000);
    sink.close().await;
    bed.sim.shutdown().await;
}

/// A job that is never fulfilled (gcsim's take ten minutes here) fails its
/// block once its wait is over, naming the job, which is deleted upstream
/// and its slot given back: the run ends instead of polling on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_not_fulfilled_within_its_wait_fails_its_block_and_is_deleted() {
    let bed = Bed::with_slow_jobs().await;
    let sink = open(&sqlite("job-wait")).await;
    let jobs = JobOptions {
        max_running: 2,
        first_poll: Duration::from_millis(100),
        max_wait: Duration::from_secs(1),
    };
    let source = bed.source_with_jobs(SourceKind::Jobs, "job-wait", jobs);
    let plan = plan(DAY1, "2026-11-02", BlockSize::Day);
    let summary = run_failing_one_block(
        &plan,
        &source,
        &sink,
        "the run ends: a job's wait is bounded",
    )
    .await;
    assert_eq!(
        (summary.blocks_failed, summary.blocks_final),
        (1, 0),
        "{summary:?}"
    );
    let (job, status) = the_deleted_job(&bed, &source).await;
    assert_eq!(status, 204);
    let says = format!("job {job} for 2026-11-01T00:00:00.000Z/2026-11-02T00:00:00.000Z was not fulfilled within 1 s");
    assert!(summary.errors[0].contains(&says), "{:?}", summary.errors);
    assert_eq!(bed.in_flight("jobs-running").await, 0);
    sink.close().await;
    bed.sim.shutdown().await;
}

/// Job results whose cursor comes back again would be paged without end:
/// the block fails at the first cursor seen twice, naming the job, and the
/// run goes on; once the upstream behaves, the next run stores the block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_results_cursor_repeats_fails_its_block_instead_of_paging_forever() {
    let bed = Bed::start().await;
    bed.repeating_cursor(1_000_000).await;
    let sink = open(&sqlite("repeating-cursor")).await;
    let source = bed.source(SourceKind::Jobs, "repeating-cursor");
    // Pages small enough for the day to take several.
    source.upstream().set_max_body(200_000);
    let plan = plan(DAY1, "2026-11-02", BlockSize::Day);
    let summary = run_failing_one_block(
        &plan,
        &source,
        &sink,
        "the run ends: a repeated cursor is not followed",
    )
    .await;
    assert_eq!(
        (summary.blocks_failed, summary.blocks_final, summary.records),
        (1, 0, 0),
        "{summary:?}"
    );
    let (job, _) = the_deleted_job(&bed, &source).await;
    let says = format!("job {job} for 2026-11-01T00:00:00.000Z/2026-11-02T00:00:00.000Z: results page 2 gave a cursor an earlier page gave");
    assert!(summary.errors[0].contains(&says), "{:?}", summary.errors);
    bed.repeating_cursor(0).await;
    let again = run(&plan, &source, &sink).await.unwrap();
    assert_eq!(
        (again.blocks_failed, again.blocks_final, again.records),
        (0, 1, 8_000),
        "{again:?}"
    );
    assert_eq!(sink.count().await.unwrap(), 8_000);
    sink.close().await;
    bed.sim.shutdown().await;
}

/// Job results that give a new cursor on every page (the same page again
/// each time) escape the check for a cursor given twice: the block fails
/// once the pages go past what the job's count of records fills, naming
/// the job, and the run goes on; once the upstream behaves, the next run
/// stores the block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_results_page_on_with_new_cursors_fails_its_block() {
    let bed = Bed::start().await;
    // Ten pages are past the cap; a reader without it would read all
    // ten, each with the day's 8,000 records.
    bed.endless_cursor(10).await;
    let sink = open(&sqlite("endless-cursor")).await;
    let source = bed.source(SourceKind::Jobs, "endless-cursor");
    let plan = plan(DAY1, "2026-11-02", BlockSize::Day);
    let summary = run_failing_one_block(
        &plan,
        &source,
        &sink,
        "the run ends: a job's results are not paged without end",
    )
    .await;
    assert_eq!(
        (summary.blocks_failed, summary.blocks_final, summary.records),
        (1, 0, 0),
        "{summary:?}"
    );
    let (job, _) = the_deleted_job(&bed, &source).await;
    // 8,000 records fill one page of 10,000; two more are allowed.
    let results = bed
        .answered("GET", &format!("{JOBS_PATH}/{job}/results"))
        .await;
    assert_eq!(results.len(), 3, "{results:?}");
    let says = format!(
        "job {job} for 2026-11-01T00:00:00.000Z/2026-11-02T00:00:00.000Z: its results went on \
         past page 3, more than its 8000 records fill at 10000 a page"
    );
    assert!(summary.errors[0].contains(&says), "{:?}", summary.errors);
    bed.endless_cursor(0).await;
    let again = run(&plan, &source, &sink).await.unwrap();
    assert_eq!(
        (again.blocks_failed, again.blocks_final, again.records),
        (0, 1, 8_000),
        "{again:?}"
    );
    assert_eq!(sink.count().await.unwrap(), 8_000);
    sink.close().await;
    bed.sim.shutdown().await;
}

/// Runs `plan`, within a minute (`what` says why it must end).
async fn run_failing_one_block(
    plan: &gc_ingest::Plan,
    source: &gc_ingest::Source,
    sink: &gc_ingest::Sink,
    what: &str,
) -> gc_ingest::Summary {
    tokio::time::timeout(Duration::from_secs(60), run(plan, source, sink))
        .await
        .expect(what)
        .unwrap()
}

/// The one job deleted upstream once `source` settled: its id and the
/// answer's status.
async fn the_deleted_job(bed: &Bed, source: &gc_ingest::Source) -> (String, u64) {
    assert_eq!(source.settle(Duration::from_secs(10)).await, 0);
    let deleted = bed.answered("DELETE", JOBS_PATH).await;
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    let job = deleted[0].0.rsplit('/').next().unwrap().to_owned();
    (job, deleted[0].1)
}

#[test]
fn the_readme_broker_config_for_gcsim_is_valid() {
    let text = include_str!("../../gcsim-broker.toml");
    quota_broker::Settings::from_toml(text).unwrap();
}

/// Blocks done so far.
async fn done(sink: &gc_ingest::Sink) -> usize {
    sink.checkpoints()
        .await
        .unwrap()
        .iter()
        .filter(|c| c.status == "done")
        .count()
}
