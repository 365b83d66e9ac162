//! The PostgreSQL sink against a real server the set-up installs and
//! starts on loopback: the same exact set as SQLite, idempotent again; a
//! write that fails mid-run ends it at once, with its summary, the stores
//! under way stored and counted; a sink that stops answering does not keep
//! the summary back; a record with a NUL in a queried field is stored,
//! and one the database refuses fails only its block.

use std::process::Stdio;
use std::time::Duration;

use gc_ingest::{run, run_reporting, BlockSize, IngestError, Sink, SourceKind};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::common::{plan, until_done, Bed, DAY1, END};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stores_exactly_gcsims_day_and_a_second_run_changes_nothing() {
    let pg = testsvc::Postgres::start()
        .unwrap_or_else(|e| panic!("PostgreSQL is needed for this test and could not start: {e}"));
    let url = pg.create_database("ingest").unwrap();
    let bed = Bed::start().await;
    let sink = Sink::open(&url).await.unwrap();
    let plan = plan(DAY1, "2026-11-02", BlockSize::Day);
    let source = bed.source(SourceKind::Jobs, "pg");
    let summary = run(&plan, &source, &sink).await.unwrap();
    assert_eq!((summary.records, summary.blocks_final), (8_000, 1));
    let first_day: Vec<String> = {
        let mut all = bed.conversation_ids().await;
        let stored = sink.conversation_ids().await.unwrap();
        all.retain(|id| stored.binary_search(id).is_ok());
        all
    };
    assert_eq!(first_day.len(), 8_000, "every stored id is one of gcsim's");
    let again = run(&plan, &source, &sink).await.unwrap();
    assert_eq!((again.blocks_skipped, again.upstream_requests), (1, 0));
    assert_eq!(sink.count().await.unwrap(), 8_000);
    sink.close().await;
    bed.sim.shutdown().await;
}

/// Workers started at once on a new database both open it (one creates
/// the tables, the other waits for it), on every try: the loser of the
/// race on PostgreSQL's catalog exited 2, which orchestrators do not retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_opening_a_new_postgres_sink_at_once_both_open_it() {
    let pg = testsvc::Postgres::start()
        .unwrap_or_else(|e| panic!("PostgreSQL is needed for this test and could not start: {e}"));
    for n in 0..5 {
        let url = pg.create_database(&format!("ingest_new_{n}")).unwrap();
        let opens: Vec<_> = (0..3)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { Sink::open(&url).await })
            })
            .collect();
        for open in opens {
            match open.await.unwrap() {
                Ok(sink) => sink.close().await,
                Err(e) => panic!("database {n}: {e}"),
            }
        }
    }
}

/// Makes one store on `url`'s database fail as a write does when its
/// connection is cut (SQLSTATE 57P01, as when the server shuts down):
/// holds `conversations` locked until `stores` workers' stores wait for
/// it, terminates one of those connections and, once the run has heard of
/// it (the failed block given back), lets the other stores on. Returns the
/// blocks done while they waited.
async fn fail_one_of_stores(url: &str, stores: usize) -> usize {
    use sqlx::Connection;
    let (mut admin, pid, done_then) = lock_until_stores_wait(url, stores).await;
    terminate(&mut admin, pid).await;
    until_given_back(&mut admin).await;
    sqlx::query("ROLLBACK").execute(&mut admin).await.unwrap();
    admin.close().await.unwrap();
    done_then
}

/// A connection whose transaction holds `conversations` locked once
/// `stores` stores wait for it, the backend of one of them, and the blocks
/// done then.
async fn lock_until_stores_wait(url: &str, stores: usize) -> (sqlx::PgConnection, i32, usize) {
    use sqlx::{Connection, Row};
    let mut admin = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut admin).await.unwrap();
    sqlx::query("LOCK TABLE conversations IN SHARE MODE")
        .execute(&mut admin)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        tick.tick().await;
        let waiting: Vec<i32> = sqlx::query(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_all(&mut admin)
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
        if waiting.len() >= stores {
            let done: i64 = sqlx::query("SELECT COUNT(*) FROM ingest_blocks WHERE status = 'done'")
                .fetch_one(&mut admin)
                .await
                .unwrap()
                .get(0);
            return (admin, waiting[0], done as usize);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {stores} stores waited for the lock within 60 s",
            waiting.len()
        );
    }
}

/// Ends backend `pid` as a server shutting down does.
async fn terminate(admin: &mut sqlx::PgConnection, pid: i32) {
    use sqlx::Row;
    let ended: bool = sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&mut *admin)
        .await
        .unwrap()
        .get(0);
    assert!(ended, "backend {pid} terminated");
}

/// Waits (bounded) until a block's claim was given back (a run that
/// failed dropping it, once it has halted).
async fn until_given_back(admin: &mut sqlx::PgConnection) {
    use sqlx::Row;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        tick.tick().await;
        let given_back: i64 = sqlx::query(
            "SELECT COUNT(*) FROM ingest_blocks WHERE status = 'claimed' AND claim_expires_ms = 0",
        )
        .fetch_one(&mut *admin)
        .await
        .unwrap()
        .get(0);
        if given_back > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no claim given back within 60 s"
        );
    }
}

/// The gc-ingest binary set to run `--source query` over DAY1..END into
/// `url` as `client_id`, with `extra` arguments, its output piped.
fn query_run(bed: &Bed, client_id: &str, url: &str, extra: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_gc-ingest"));
    cmd.args(["--region", &bed.region()])
        .args(["--client-id", client_id, "--client-secret", "gcsim-secret"])
        .args(["--broker", &bed.broker.url(), "--tenant", "org-a"])
        .args(["--source", "query"])
        .args(extra)
        .args(["--from", DAY1, "--to", END, "--sink", url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Blocks with status `done`.
async fn done(sink: &Sink) -> usize {
    let checkpoints = sink.checkpoints().await.unwrap();
    checkpoints.iter().filter(|c| c.status == "done").count()
}

/// A write that fails in one of four workers ends the run at once: the
/// others take no new block (none fetched for a run that fails at its
/// end, spending the org's quota); the stores already under way run to
/// their end and are counted as stored (a store dropped after its commit
/// reached the server would be stored yet counted as dropped). The
/// summary comes with the error, and the next run stores every block
/// left, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_error_in_one_worker_halts_the_others_and_the_next_run_finishes() {
    let pg = testsvc::Postgres::start()
        .unwrap_or_else(|e| panic!("PostgreSQL is needed for this test and could not start: {e}"));
    let url = pg.create_database("ingest_halt").unwrap();
    let bed = Bed::start().await;
    let sink = Sink::open(&url).await.unwrap();
    let mut plan = plan(DAY1, END, BlockSize::Hour);
    plan.parallel = 4;
    let source = bed.source(SourceKind::Query, "halt");
    let task = {
        let (plan, source, sink) = (plan.clone(), source.clone(), sink.clone());
        tokio::spawn(async move {
            run_reporting(&plan, &source, &sink, &CancellationToken::new()).await
        })
    };
    until_done(&sink, 8).await;
    // Every worker's store waits; one fails, the other three go on.
    let done_before = fail_one_of_stores(&url, plan.parallel).await;
    let failed = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the run ends")
        .unwrap()
        .expect_err("a write failed");
    assert!(
        matches!(&failed.error, IngestError::Sink(_)) && failed.error.may_pass_later(),
        "{}",
        failed.error
    );
    let summary = failed.summary.expect("a summary");
    assert_eq!(summary.error, Some(failed.error.to_string()));
    let checkpoints = sink.checkpoints().await.unwrap();
    let done_now: Vec<_> = checkpoints.iter().filter(|c| c.status == "done").collect();
    assert_eq!(done_now.len(), done_before + plan.parallel - 1);
    // No block claimed after the failure: only the failed one is not done.
    assert_eq!(checkpoints.len(), done_now.len() + 1, "{checkpoints:?}");
    assert_eq!(
        (
            summary.blocks_final,
            summary.blocks_stopped,
            summary.blocks_failed,
            summary.blocks_busy
        ),
        (done_now.len() as u64, 1, 0, 0),
        "{summary:?}"
    );
    // Nothing stored in part: the rows are those of the blocks done.
    let records: i64 = done_now.iter().map(|c| c.records).sum();
    assert_eq!(sink.count().await.unwrap(), records);
    assert_eq!(summary.records, records as u64, "{summary:?}");
    let again = run(&plan, &source, &sink).await.unwrap();
    assert_eq!(
        (
            again.blocks_skipped + again.blocks_final,
            again.blocks_busy,
            again.blocks_failed
        ),
        (72, 0, 0),
        "{again:?}"
    );
    let checkpoints = sink.checkpoints().await.unwrap();
    assert!(
        checkpoints
            .iter()
            .all(|c| c.status == "done" && c.fetches == 1),
        "{checkpoints:?}"
    );
    assert_eq!(
        sink.conversation_ids().await.unwrap(),
        bed.conversation_ids().await
    );
    sink.close().await;
    bed.sim.shutdown().await;
}

/// The binary, its run ended by a failed write, still says what it did: the
/// `--json` object with the error in it, or the closing line; one message
/// for the error, and exit 1 (run again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_ended_by_its_sink_prints_its_summary_and_exits_1() {
    let pg = testsvc::Postgres::start()
        .unwrap_or_else(|e| panic!("PostgreSQL is needed for this test and could not start: {e}"));
    let bed = Bed::start().await;
    for json in [true, false] {
        let url = pg.create_database(&format!("ingest_exit_{json}")).unwrap();
        let watcher = Sink::open(&url).await.unwrap();
        let mut cmd = query_run(&bed, "exit@org-a", &url, &["--parallel", "4"]);
        cmd.args(if json { &["--json"][..] } else { &[] });
        let child = cmd.spawn().unwrap();
        until_done(&watcher, 8).await;
        let done_before = fail_one_of_stores(&url, 4).await as u64;
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("it exits")
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(
            stderr.matches("gc-ingest: the sink ").count(),
            1,
            "{stderr}"
        );
        assert!(stderr.contains("terminating connection"), "{stderr}");
        // The three stores under way when one failed were stored.
        let done = done(&watcher).await as u64;
        assert_eq!(done, done_before + 3);
        if json {
            let summary: Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
            assert_eq!(summary["blocks_total"], 72, "{summary}");
            assert_eq!(summary["blocks_final"], done, "{summary}");
            assert_eq!(summary["blocks_stopped"], 1, "{summary}");
            let error = summary["error"].as_str().unwrap_or_default();
            assert!(error.contains("terminating connection"), "{summary}");
        } else {
            assert!(out.stdout.is_empty());
            let closing = " from 72 blocks (0 already done, 0 provisional, 0 failed";
            assert!(stderr.contains(closing), "{stderr}");
            let dropped = format!(
                "  1 block in progress dropped and {} not started",
                72 - done - 1
            );
            assert!(stderr.contains(&dropped), "{stderr}");
        }
        watcher.close().await;
    }
    bed.sim.shutdown().await;
}

/// A sink that stops answering without refusing (its tables locked: the
/// failed block's claim cannot be given back, nor the worker name, and the
/// connections left waiting keep the pool from closing) does not keep the
/// binary from printing its summary, and it exits 1 in bounded time
/// instead of waiting for the sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_stops_answering_does_not_keep_the_summary_back() {
    use sqlx::Connection;
    let pg = testsvc::Postgres::start()
        .unwrap_or_else(|e| panic!("PostgreSQL is needed for this test and could not start: {e}"));
    let bed = Bed::start().await;
    let url = pg.create_database("ingest_unanswering").unwrap();
    let watcher = Sink::open(&url).await.unwrap();
    let mut cmd = query_run(
        &bed,
        "unanswering@org-a",
        &url,
        &["--parallel", "1", "--json"],
    );
    let child = cmd.spawn().unwrap();
    until_done(&watcher, 2).await;
    let (mut admin, pid, done_before) = lock_until_stores_wait(&url, 1).await;
    sqlx::query("LOCK TABLE ingest_blocks, ingest_runs IN EXCLUSIVE MODE")
        .execute(&mut admin)
        .await
        .unwrap();
    terminate(&mut admin, pid).await;
    // Held until it exits: the old binary waited for the sink to close
    // before it printed anything.
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("it exits while the sink does not answer")
        .unwrap();
    sqlx::query("ROLLBACK").execute(&mut admin).await.unwrap();
    admin.close().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("did not close within 5 s"), "{stderr}");
    let summary: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(
        (&summary["blocks_final"], &summary["blocks_stopped"]),
        (&Value::from(done_before), &Value::from(1)),
        "{summary}"
    );
    assert!(
        summary["error"]
            .as_str()
            .is_some_and(|e| e.contains("terminating connection")),
        "{summary}"
    );
    watcher.close().await;
    bed.sim.shutdown().await;
}

/// A store the database holds (here a lock another session keeps, with
/// no end) fails at `--store-timeout`: the run ends with its summary and
/// exit 1, naming the block and the flag, instead of waiting for ever;
/// the block is left for the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_the_database_holds_fails_at_the_store_timeout() {
    use sqlx::Connection;
    let pg = testsvc::Postgres::start()
        .unwrap_or_else(|e| panic!("PostgreSQL is needed for this test and could not start: {e}"));
    let bed = Bed::start().await;
    let url = pg.create_database("ingest_held").unwrap();
    let watcher = Sink::open(&url).await.unwrap();
    let mut cmd = query_run(
        &bed,
        "held@org-a",
        &url,
        &["--parallel", "1", "--json", "--store-timeout", "2s"],
    );
    let child = cmd.spawn().unwrap();
    until_done(&watcher, 2).await;
    let (mut admin, _pid, done_before) = lock_until_stores_wait(&url, 1).await;
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("it exits while its store is held (the store timeout is 2 s)")
        .unwrap();
    sqlx::query("ROLLBACK").execute(&mut admin).await.unwrap();
    admin.close().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let summary: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert!(
        summary["error"].as_str().is_some_and(
            |e| e.contains("did not finish within 2 s") && e.contains("--store-timeout")
        ),
        "{summary}"
    );
    assert_eq!(
        summary["blocks_final"],
        Value::from(done_before),
        "{summary}"
    );
    // The next run stores what is left.
    let sink = Sink::open(&url).await.unwrap();
    let summary = run(
        &plan(DAY1, END, BlockSize::Hour),
        &bed.source(SourceKind::Query, "held-again"),
        &sink,
    )
    .await
    .unwrap();
    assert!(summary.blocks_final > 0, "{summary:?}");
    sink.close().await;
    watcher.close().await;
    bed.sim.shutdown().await;
}

/// A run with `--store-timeout 2s` while another session holds, with no
/// end, the lock that `lock` (a statement) takes: it must end by itself
/// (exit 1) within 60 s; its stderr.
async fn run_while_locked(client_id: &str, database: &str, lock: &str) -> String {
    use sqlx::Connection;
    let pg = testsvc::Postgres::start()
        .unwrap_or_else(|e| panic!("PostgreSQL is needed for this test and could not start: {e}"));
    let bed = Bed::start().await;
    let url = pg.create_database(database).unwrap();
    Sink::open(&url).await.unwrap().close().await;
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut admin).await.unwrap();
    sqlx::query(lock).execute(&mut admin).await.unwrap();
    let child = query_run(
        &bed,
        client_id,
        &url,
        &["--parallel", "1", "--store-timeout", "2s"],
    )
    .spawn()
    .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("it exits while the lock is held (the bound is 2 s)")
        .unwrap();
    sqlx::query("ROLLBACK").execute(&mut admin).await.unwrap();
    admin.close().await.unwrap();
    bed.sim.shutdown().await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

/// Every other database call is bounded too (by the store timeout, at
/// most a minute): a run whose worker name the database holds (a lock
/// another session keeps on the table, with no end) ends at the bound with
/// exit 1, naming the call and the flag, instead of waiting for ever before
/// its first block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_name_the_database_holds_fails_at_the_bound() {
    let stderr = run_while_locked(
        "name-held@org-a",
        "ingest_name_held",
        "LOCK TABLE ingest_runs IN EXCLUSIVE MODE",
    )
    .await;
    assert!(
        stderr.contains("taking the worker name did not finish within 2 s")
            && stderr.contains("--store-timeout"),
        "{stderr}"
    );
}

/// The tables' creation at the start waits, on PostgreSQL, for another
/// worker's under a lock: a session that holds that lock with no end ends
/// the run at the bound, exit 1, naming the step and the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_lock_the_database_holds_fails_the_start_at_the_bound() {
    let stderr = run_while_locked(
        "schema-held@org-a",
        "ingest_schema_held",
        "SELECT 1 FROM pg_advisory_xact_lock(7312)",
    )
    .await;
    assert!(
        stderr.contains("creating the sink's tables did not finish within 2 s")
            && stderr.contains("--store-timeout"),
        "{stderr}"
    );
}

/// A record with a NUL character in its queue and wrap-up code (which
/// PostgreSQL's `TEXT` cannot hold) is stored all the same: the queried
/// columns say `\u0000` as JSON does, `raw` keeps the record as sent, and
/// no block fails (it would fail at every run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_a_queried_field_is_stored_written_as_json_writes_it() {
    use sqlx::{Connection, Row};
    let pg = testsvc::Postgres::start()
        .unwrap_or_else(|e| panic!("PostgreSQL is needed for this test and could not start: {e}"));
    let url = pg.create_database("ingest_nul").unwrap();
    let bed = Bed::start().await;
    bed.nul_fields(1).await;
    let sink = Sink::open(&url).await.unwrap();
    let mut plan = plan(DAY1, "2026-11-02", BlockSize::Hour);
    plan.parallel = 1;
    let source = bed.source(SourceKind::Query, "nul");
    let summary = run(&plan, &source, &sink).await.unwrap();
    assert_eq!(
        (summary.blocks_failed, summary.blocks_final, summary.records),
        (0, 24, 8_000),
        "{summary:?}"
    );
    let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
    let rows = sqlx::query(
        "SELECT queue_id, wrap_up_code, raw FROM conversations WHERE strpos(queue_id, '\\u0000') > 0",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1, "the one record with a NUL");
    let (queue, wrap_up, raw): (String, String, String) =
        (rows[0].get(0), rows[0].get(1), rows[0].get(2));
    assert!(wrap_up.ends_with("\\u0000"), "{wrap_up}");
    let raw: Value = serde_json::from_str(&raw).unwrap();
    let segment = &raw["participants"][0]["sessions"][0]["segments"][0];
    assert_eq!(
        segment["queueId"].as_str(),
        Some(queue.replace("\\u0000", "\0").as_str()),
        "raw keeps the record as sent"
    );
    db.close().await.unwrap();
    sink.close().await;
    bed.sim.shutdown().await;
}

/// A value the database refuses (SQLSTATE class 22: here a wrap-up code
/// too long for a column a DBA narrowed) fails that block, kept in the
/// summary's errors and left for the next run, and the run stores the
/// others: ending the run would stop every run at that block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_the_database_refuses_fails_only_its_block() {
    use sqlx::Connection;
    let pg = testsvc::Postgres::start()
        .unwrap_or_else(|e| panic!("PostgreSQL is needed for this test and could not start: {e}"));
    let url = pg.create_database("ingest_refused").unwrap();
    let bed = Bed::start().await;
    bed.nul_fields(1).await;
    let sink = Sink::open(&url).await.unwrap();
    // gcsim's wrap-up codes are 8 characters; the one with a NUL, stored
    // as `wrapup-N\u0000`, is 14.
    let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("ALTER TABLE conversations ALTER COLUMN wrap_up_code TYPE VARCHAR(8)")
        .execute(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
    let mut plan = plan(DAY1, "2026-11-02", BlockSize::Hour);
    plan.parallel = 1;
    let source = bed.source(SourceKind::Query, "refused");
    let summary = run(&plan, &source, &sink).await.unwrap();
    assert_eq!(
        (
            summary.blocks_failed,
            summary.blocks_final,
            summary.blocks_stopped
        ),
        (1, 23, 0),
        "{summary:?}"
    );
    assert!(
        summary.errors.len() == 1 && summary.errors[0].contains("too long"),
        "{:?}",
        summary.errors
    );
    assert_eq!(sink.count().await.unwrap() as u64, summary.records);
    // The fault is spent: the next run stores the block it left.
    let again = run(&plan, &source, &sink).await.unwrap();
    assert_eq!(
        (
            again.blocks_failed,
            again.blocks_skipped,
            again.blocks_final
        ),
        (0, 23, 1),
        "{again:?}"
    );
    assert_eq!(sink.count().await.unwrap(), 8_000);
    sink.close().await;
    bed.sim.shutdown().await;
}
