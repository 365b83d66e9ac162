//! Dead letters on both back ends: counted with their age and the records
//! they hold back, and pruned once old unless they still hold some back;
//! the records behind one (or behind a record put off) put off with it, so
//! a claim never reads past them.
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

/// Held: never due until the dead letter ahead of it is settled.
const HELD: i64 = i64::MAX;

/// Each pending record's idempotency key and due time, read straight from
/// the queue's database at `url`.
async fn due_times(url: &str) -> Vec<(String, i64)> {
    let sql =
        "SELECT idem_key, not_before_ms FROM relay_records WHERE state = 'pending' ORDER BY id";
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        let rows: Vec<(String, i64)> = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let rows: Vec<(String, i64)> = sqlx::query_as(sql).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows
    }
}

fn due_of(times: &[(String, i64)], key: &str) -> i64 {
    times
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("{key} is not pending: {times:?}"))
        .1
}

/// The records behind a dead letter are held (due never) from its death,
/// those stored after it too, and due again at once when it is replayed;
/// the records behind one put off for a retry are put off with it. Only
/// the claim's reading changes: what it returns, and in what order, is as
/// before.
async fn records_behind_a_blocked_head_are_put_off_with_it(q: Queue, url: &str) {
    let (_, head, behind) = two_dead_letters_one_holding_a_record_back(&q).await;
    let after = stored(&q, record("after-death", "agent-7")).await;
    stored(&q, record("free", "agent-9")).await;
    let times = due_times(url).await;
    assert_eq!(due_of(&times, "behind"), HELD, "{times:?}");
    assert_eq!(due_of(&times, "after-death"), HELD, "{times:?}");
    assert!(due_of(&times, "free") < HELD, "{times:?}");
    // Replayed, the dead letter goes first, and what it held follows.
    assert_eq!(q.replay(Some(&[head])).await.unwrap(), 1);
    let times = due_times(url).await;
    let now = gc_relay::now_ms();
    for key in ["head", "behind", "after-death"] {
        assert!(due_of(&times, key) <= now, "{key}: {times:?}");
    }
    let claimed = q.claim("t", 10, Duration::from_secs(60)).await.unwrap();
    let mut ids: Vec<i64> = claimed.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    assert!(ids.contains(&head) && !ids.contains(&behind), "{ids:?}");
    // Put off for an hour, the head puts off what is behind it, and what
    // comes after.
    let hour = now + 3_600_000;
    let r = claimed.iter().find(|r| r.id == head).unwrap();
    q.finish(r.id, r.attempts, "t", Outcome::Retry { at_ms: hour })
        .await
        .unwrap();
    let later = stored(&q, record("later", "agent-7")).await;
    let times = due_times(url).await;
    for key in ["head", "behind", "after-death", "later"] {
        assert!(due_of(&times, key) >= hour, "{key}: {times:?}");
    }
    assert!(q
        .claim("t", 10, Duration::from_secs(60))
        .await
        .unwrap()
        .iter()
        .all(|r| ![head, behind, after, later].contains(&r.id)));
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

#[tokio::test]
async fn records_behind_a_blocked_head_are_put_off_with_it_sqlite() {
    let dir = crate::common::TempDir::new("dead-held");
    let url = dir.sqlite();
    records_behind_a_blocked_head_are_put_off_with_it(sqlite(&dir).await, &url).await;
}

#[tokio::test]
async fn records_behind_a_blocked_head_are_put_off_with_it_postgres() {
    let pg = testsvc::Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    let url = pg
        .create_database("dead_held")
        .unwrap_or_else(|e| panic!("{e}"));
    let q = Queue::open(&url, Limits::default()).await.unwrap();
    records_behind_a_blocked_head_are_put_off_with_it(q, &url).await;
}

/// A SQLite queue written before records were held (the records behind a
/// dead letter due as stored), or left with a held record whose key has no
/// dead letter, is set right when a relay opens it.
#[tokio::test]
async fn a_sqlite_queue_is_held_and_released_as_it_should_be_when_opened() {
    let dir = crate::common::TempDir::new("dead-reopen");
    let url = dir.sqlite();
    let q = sqlite(&dir).await;
    two_dead_letters_one_holding_a_record_back(&q).await;
    stored(&q, record("free", "agent-9")).await;
    drop(q);
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query("UPDATE relay_records SET not_before_ms = 0 WHERE idem_key = 'behind'")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE relay_records SET not_before_ms = ? WHERE idem_key = 'free'")
        .bind(HELD)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let q = sqlite(&dir).await;
    let times = due_times(&url).await;
    assert_eq!(due_of(&times, "behind"), HELD, "{times:?}");
    assert!(due_of(&times, "free") <= gc_relay::now_ms(), "{times:?}");
    let claimed = q.claim("t", 10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(claimed.len(), 1, "{claimed:?}");
}
