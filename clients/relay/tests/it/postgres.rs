//! Relays on one PostgreSQL queue: they share the drain (every record
//! reaches the upstream once, and both relays deliver), their room checks
//! and the creation of its tables.

use std::time::Duration;

use gc_relay::{Limits, NewRecord, Outcome, Queue, Stored};

use crate::common::*;

#[tokio::test]
async fn two_relays_share_one_postgres_queue_and_handle_no_record_twice() {
    let pg = testsvc::Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    let url = pg
        .create_database("relay")
        .unwrap_or_else(|e| panic!("{e}"));
    let sim = gcsim(sim_config(60.0, 200, 0)).await;
    let broker = broker(1_000).await;
    let mut a = settings(&url, &sim, &broker.url);
    a.name = "relay-a".into();
    let mut b = settings(&url, &sim, &broker.url);
    b.name = "relay-b".into();
    let (a, b) = (relay(a).await, relay(b).await);
    let flows = [
        Flow::new(&format!("http://{}", a.addr())),
        Flow::new(&format!("http://{}", b.addr())),
    ];
    let n = 400;
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..n {
        let flow = flows[i % 2].clone();
        // Half the records are posted to both relays (a retry landing on
        // the other replica): still one record.
        let other = (i % 4 == 0).then(|| flows[(i + 1) % 2].clone());
        posts.spawn(async move {
            let r = wrapup(&format!("pg{i}"));
            let (s, first) = flow.post(&r).await.unwrap();
            assert_eq!(s, 202);
            if let Some(other) = other {
                let (s, again) = other.post(&r).await.unwrap();
                assert_eq!((s, &again["recordId"]), (202, &first["recordId"]));
            }
        });
    }
    while let Some(r) = posts.join_next().await {
        r.unwrap();
    }
    wait_until(
        "every record delivered",
        Duration::from_secs(60),
        || async { a.queue().depth().await.unwrap().records == 0 },
    )
    .await;
    let w = writes(&sim).await;
    assert_eq!(w.len(), n);
    let twice: Vec<_> = w.iter().filter(|(_, &c)| c > 1).collect();
    assert!(twice.is_empty(), "handled twice: {twice:?}");
    let (sa, sb) = (a.upstream().stats(), b.upstream().stats());
    assert_eq!(sa.ok_2xx + sb.ok_2xx, n as u64, "{sa:?} {sb:?}");
    assert!(
        sa.ok_2xx > 0 && sb.ok_2xx > 0,
        "one relay did all: {sa:?} {sb:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
    broker.stop().await;
    sim.shutdown().await;
}

fn record(key: &str) -> NewRecord {
    NewRecord {
        key: key.into(),
        order_key: key.into(),
        method: "POST".into(),
        path: "/api/v2/x".into(),
        body: None,
    }
}

/// A replica that delivers records another replica stored counts them off
/// its own estimate of the queue, below zero: that is an empty queue, not
/// a full one (it was read as `u64`, and every write answered 503).
#[tokio::test]
async fn a_replica_finishing_anothers_records_still_takes_records() {
    let pg = testsvc::Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    let url = pg
        .create_database("relay_room")
        .unwrap_or_else(|e| panic!("{e}"));
    let (a, b) = (
        Queue::open(&url, Limits::default()).await.unwrap(),
        Queue::open(&url, Limits::default()).await.unwrap(),
    );
    // `a` reads the queue's figures (empty) and stores one.
    let started = std::time::Instant::now();
    assert!(matches!(
        a.enqueue(record("a0")).await.unwrap(),
        Stored::New(_)
    ));
    // `b` stores three after that, and `a` delivers all four.
    for key in ["b0", "b1", "b2"] {
        assert!(matches!(
            b.enqueue(record(key)).await.unwrap(),
            Stored::New(_)
        ));
    }
    let claimed = a.claim("a", 10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(claimed.len(), 4);
    for r in &claimed {
        a.finish(r.id, r.attempts, "a", Outcome::Done)
            .await
            .unwrap();
    }
    // Before `a` reads the figures again (at most every second) it counts
    // 1 - 4 = -3 records: still room.
    let stored = a.enqueue(record("a1")).await.unwrap();
    assert!(
        matches!(stored, Stored::New(_)),
        "{stored:?} with an empty queue ({:?} since the figures were read)",
        started.elapsed()
    );
    assert_eq!(a.depth().await.unwrap().records, 1);
}

/// Relays started at once on a new database both create the queue's
/// tables (one waits for the other), on every try.
#[tokio::test]
async fn relays_opening_a_new_postgres_queue_at_once_both_start() {
    let pg = testsvc::Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    for n in 0..5 {
        let url = pg
            .create_database(&format!("relay_new_{n}"))
            .unwrap_or_else(|e| panic!("{e}"));
        let opens: Vec<_> = (0..3)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { Queue::open(&url, Limits::default()).await })
            })
            .collect();
        for open in opens {
            if let Err(e) = open.await.unwrap() {
                panic!("database {n}: {e}");
            }
        }
    }
}

/// PostgreSQL gone away: a write fails within seconds, so intake answers
/// 503 (the flow retries) rather than holding every record behind the
/// writer for the driver's 30 s default, past any Data Action's timeout.
#[tokio::test]
async fn a_write_fails_soon_once_postgres_is_gone() {
    let pg = testsvc::Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    let url = pg.create_database("gone").unwrap_or_else(|e| panic!("{e}"));
    let q = Queue::open(&url, Limits::default()).await.unwrap();
    let record = |key: &str| NewRecord {
        key: key.into(),
        order_key: key.into(),
        method: "POST".into(),
        path: "/api/v2/x".into(),
        body: None,
    };
    assert!(matches!(
        q.enqueue(record("before")).await.unwrap(),
        Stored::New(_)
    ));
    pg.stop();
    let answered = tokio::time::timeout(Duration::from_secs(10), q.enqueue(record("after")))
        .await
        .expect("the write answered within 10 s");
    assert!(answered.is_err(), "{answered:?}");
    assert!(q.is_failing());
}
