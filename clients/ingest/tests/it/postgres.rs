//! The PostgreSQL sink against a real server the set-up installs and
//! starts on loopback: the same exact set as SQLite, idempotent again.

use gc_ingest::{run, BlockSize, Sink, SourceKind};

use crate::common::{plan, Bed, DAY1};

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
