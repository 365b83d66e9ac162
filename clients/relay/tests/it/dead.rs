//! Dead letters on both back ends: counted with their age and the records
//! they hold back, and pruned once old unless they still hold some back.
//! Times are passed explicitly (the queue's `depth_at` and
//! `prune_dead_letters` take "now"), so nothing waits for time to pass.

use std::time::Duration;

use gc_relay::{Limits, NewRecord, Outcome, Queue, Stored};

fn record(key: &str, order_key: &str) -> NewRecord {
    NewRecord {
        key: key.into(),
        order_key: order_key.into(),
        method: "POST".into(),
        path: "/api/v2/x".into(),
        body: None,
    }
}

async fn stored(q: &Queue, r: NewRecord) -> i64 {
    match q.enqueue(r).await.unwrap() {
        Stored::New(id) => id,
        other => panic!("{other:?}"),
    }
}

/// `alone` (its order key's only record) and `head` (ahead of `behind` in
/// order key `agent-7`) refused for good: (alone, head, behind).
async fn two_dead_letters_one_holding_a_record_back(q: &Queue) -> (i64, i64, i64) {
    let alone = stored(q, record("alone", "agent-1")).await;
    let head = stored(q, record("head", "agent-7")).await;
    let behind = stored(q, record("behind", "agent-7")).await;
    let claimed = q.claim("t", 10, Duration::from_secs(60)).await.unwrap();
    let ids: Vec<i64> = claimed.iter().map(|r| r.id).collect();
    assert_eq!(ids, [alone, head], "claimed past the order key's head");
    for r in claimed {
        let dead = Outcome::Dead {
            status: 400,
            answer: "refused".into(),
        };
        q.finish(r.id, r.attempts, "t", dead).await.unwrap();
    }
    (alone, head, behind)
}

async fn dead_letters_are_counted(q: Queue) {
    let (_, _, behind) = two_dead_letters_one_holding_a_record_back(&q).await;
    // A second record behind the same dead letter; and one of another key.
    let also = stored(&q, record("also-behind", "agent-7")).await;
    stored(&q, record("free", "agent-9")).await;
    let depth = q.depth().await.unwrap();
    assert_eq!(
        (depth.records, depth.dead, depth.blocked),
        (3, 2, 2),
        "{depth:?}"
    );
    let oldest = q
        .dead_letters(10)
        .await
        .unwrap()
        .iter()
        .map(|d| d.dead_ms)
        .min()
        .unwrap();
    let later = q.depth_at(oldest + 5_000).await.unwrap();
    assert_eq!(later.oldest_dead_age_s, 5.0, "{later:?}");
    // Once the free record is delivered, only the two held back are left.
    let claimed = q.claim("t", 10, Duration::from_secs(60)).await.unwrap();
    assert!(claimed.iter().all(|r| r.id != behind && r.id != also));
    for r in claimed {
        q.finish(r.id, r.attempts, "t", Outcome::Done)
            .await
            .unwrap();
    }
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.records, depth.blocked), (2, 2), "{depth:?}");
    // Dropped, the dead letters hold nothing back.
    assert_eq!(q.drop_dead(None).await.unwrap(), 2);
    let depth = q.depth().await.unwrap();
    assert_eq!(
        (depth.dead, depth.oldest_dead_age_s, depth.blocked),
        (0, 0.0, 0),
        "{depth:?}"
    );
}

async fn old_dead_letters_are_pruned_unless_they_hold_records_back(q: Queue) {
    let (alone, head, behind) = two_dead_letters_one_holding_a_record_back(&q).await;
    let keep = Duration::from_secs(14 * 24 * 3600);
    let letters = q.dead_letters(10).await.unwrap();
    let died = |id: i64| letters.iter().find(|d| d.id == id).unwrap().dead_ms;
    let kept_ms = keep.as_millis() as i64;
    assert_eq!(
        q.prune_dead_letters(keep, died(alone) + kept_ms)
            .await
            .unwrap(),
        0,
        "pruned before its time"
    );
    // Long after both died: only the one holding nothing back goes.
    let later = died(alone).max(died(head)) + 10 * kept_ms;
    assert_eq!(q.prune_dead_letters(keep, later).await.unwrap(), 1);
    let left: Vec<i64> = q
        .dead_letters(10)
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(left, [head], "the dead letter holding a record back went");
    let depth = q.depth().await.unwrap();
    assert_eq!(
        (depth.records, depth.dead, depth.blocked),
        (1, 1, 1),
        "{depth:?}"
    );
    // The pruned record's key is still known: a repeat is the same record.
    assert_eq!(
        q.enqueue(record("alone", "agent-1")).await.unwrap(),
        Stored::Duplicate(alone)
    );
    assert!(q
        .claim("t", 10, Duration::from_secs(60))
        .await
        .unwrap()
        .is_empty());
    // Its record waits until someone decides: dropped, the head lets it go.
    assert_eq!(q.drop_dead(Some(&[head])).await.unwrap(), 1);
    let claimed = q.claim("t", 10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(claimed.iter().map(|r| r.id).collect::<Vec<_>>(), [behind]);
}

async fn sqlite(dir: &crate::common::TempDir) -> Queue {
    Queue::open(&dir.sqlite(), Limits::default()).await.unwrap()
}

async fn postgres(pg: &testsvc::Postgres, name: &str) -> Queue {
    let url = pg.create_database(name).unwrap_or_else(|e| panic!("{e}"));
    Queue::open(&url, Limits::default()).await.unwrap()
}

#[tokio::test]
async fn dead_letters_and_the_records_behind_them_are_counted_sqlite() {
    let dir = crate::common::TempDir::new("dead-count");
    dead_letters_are_counted(sqlite(&dir).await).await;
}

#[tokio::test]
async fn dead_letters_and_the_records_behind_them_are_counted_postgres() {
    let pg = testsvc::Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    dead_letters_are_counted(postgres(&pg, "dead_count").await).await;
}

#[tokio::test]
async fn old_dead_letters_are_pruned_unless_they_hold_records_back_sqlite() {
    let dir = crate::common::TempDir::new("dead-prune");
    old_dead_letters_are_pruned_unless_they_hold_records_back(sqlite(&dir).await).await;
}

#[tokio::test]
async fn old_dead_letters_are_pruned_unless_they_hold_records_back_postgres() {
    let pg = testsvc::Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    old_dead_letters_are_pruned_unless_they_hold_records_back(postgres(&pg, "dead_prune").await)
        .await;
}
