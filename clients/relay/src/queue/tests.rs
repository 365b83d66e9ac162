//! Unit tests of the queue: a write SQLite rolled back by itself, late
//! outcomes of expired claims, the room check while a recount is held, the
//! queue URL and its errors, the PostgreSQL migration from the previous
//! release and its lock wait, dead letters racing intake, and the release
//! of records held with nothing ahead.

use std::time::Instant;

use sqlx::postgres::PgConnection;
use sqlx::Connection as _;

use super::room::Recounter;
use super::schema::{INDEXES, SUPERSEDED};
use super::sql::HELD_MS;
use super::writer::{cut, has_room};
use super::*;

/// A SQLite queue in a fresh directory of its own, and the directory.
async fn sqlite_queue(name: &str) -> (Queue, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("gc-relay-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite:{}", dir.join("q.db").display());
    (Queue::open(&url, Limits::default()).await.unwrap(), dir)
}

fn record(key: &str) -> NewRecord {
    NewRecord {
        key: key.into(),
        ..one_record()
    }
}

fn one_record() -> NewRecord {
    NewRecord {
        key: "k".into(),
        order_key: "o".into(),
        method: "POST".into(),
        path: "/api/v2/x".into(),
        body: None,
    }
}

#[tokio::test]
async fn a_write_sqlite_rolled_back_by_itself_does_not_break_later_ones() {
    let (q, dir) = sqlite_queue("rollback").await;
    let Db::Sqlite(pool) = q.db.clone() else {
        panic!("not SQLite")
    };
    // What a full disk or an I/O error does: SQLite ends the transaction
    // itself, and the driver's ROLLBACK at the drop then fails.
    {
        let mut tx = pool.begin_write().await.unwrap();
        sqlx::query("ROLLBACK").execute(&mut *tx).await.unwrap();
    }
    // Every connection of the pool, in turn, still begins a write.
    for n in 0..2 * SQLITE_CONNECTIONS {
        let tx = pool
            .begin_write()
            .await
            .unwrap_or_else(|e| panic!("write {n} after a transaction SQLite rolled back: {e}"));
        tx.commit().await.unwrap();
    }
    let record = one_record();
    q.enqueue(record.clone()).await.unwrap();
    assert!(!q.is_failing());
    // A database that cannot be written: health says so.
    pool.close().await;
    assert!(q.enqueue(record).await.is_err());
    assert!(
        q.is_failing(),
        "a failed write is not reported by is_failing"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A delivery outlived its claim (a slow upstream, a VM paused), the
/// record was reclaimed, and this relay claimed it again: the first
/// delivery's late outcome is not the second claim's, which alone says
/// how the record ends.
#[tokio::test]
async fn a_late_outcome_of_an_expired_claim_leaves_the_newer_claim_alone() {
    let (q, dir) = sqlite_queue("late").await;
    let record = one_record();
    q.enqueue(record).await.unwrap();
    let first = q.claim("a", 1, Duration::ZERO).await.unwrap().remove(0);
    // The claim expires once the wall clock passes its millisecond.
    let deadline = Instant::now() + Duration::from_secs(5);
    while q.reclaim().await.unwrap() == 0 {
        assert!(Instant::now() < deadline, "the claim never expired");
        tokio::task::yield_now().await;
    }
    let second = q
        .claim("a", 1, Duration::from_secs(60))
        .await
        .unwrap()
        .remove(0);
    assert_eq!((second.id, second.attempts), (first.id, first.attempts + 1));
    // The first delivery's late "retry later", then the second's "done".
    q.finish(first.id, first.attempts, "a", Outcome::Retry { at_ms: 0 })
        .await
        .unwrap();
    assert_eq!(
        q.depth().await.unwrap().inflight,
        1,
        "the second claim was undone"
    );
    q.finish(second.id, second.attempts, "a", Outcome::Done)
        .await
        .unwrap();
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.records, depth.done), (0, 1));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A recount of a large backlog takes a while: intake is answered
/// meanwhile, and the writer's own figures still keep the limits.
#[tokio::test]
async fn records_are_stored_and_refused_at_the_limit_while_a_recount_is_held() {
    let dir = std::env::temp_dir().join(format!("gc-relay-recount-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite:{}", dir.join("q.db").display());
    let limits = Limits {
        max_records: 3,
        max_bytes: u64::MAX,
    };
    let (counted, mut recounts) = mpsc::unbounded_channel();
    let gate = Arc::new(tokio::sync::Mutex::new(()));
    let held = gate.clone().lock_owned().await;
    let internals = Internals {
        recounter: Recounter {
            every: Duration::from_secs(3600),
            hook: Some(Hook {
                reached: counted,
                gate,
            }),
        },
        ..Internals::default()
    };
    let q = Queue::open_with(&url, limits, internals).await.unwrap();
    let first = tokio::spawn({
        let q = q.clone();
        async move { q.enqueue(record("a")).await }
    });
    // A recount has counted the queue and is held before it publishes
    // what it found.
    q.recount.notify_one();
    recounts.recv().await.unwrap();
    // A hang guard, not a measure: the writer waits for no recount.
    let stored = tokio::time::timeout(Duration::from_secs(30), async {
        let mut stored = vec![first.await.unwrap().unwrap()];
        for key in ["b", "c", "d"] {
            stored.push(q.enqueue(record(key)).await.unwrap());
        }
        stored
    })
    .await
    .expect("records answered while a recount is held");
    assert!(
        matches!(
            stored[..],
            [Stored::New(_), Stored::New(_), Stored::New(_), Stored::Full]
        ),
        "{stored:?}"
    );
    // The held recount still knows every record, counted or not.
    drop(held);
    q.recount.notify_one();
    recounts.recv().await.unwrap();
    assert_eq!(q.enqueue(record("e")).await.unwrap(), Stored::Full);
    assert_eq!(q.depth().await.unwrap().records, 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn counts_below_zero_leave_room_and_the_limits_still_hold() {
    let limits = Limits {
        max_records: 3,
        max_bytes: 100,
    };
    // What a replica counts after finishing records another one stored.
    assert!(has_room(limits, -1, 0, 10));
    assert!(has_room(limits, -79, -5_000, 10));
    assert!(has_room(limits, i64::MIN, i64::MIN, 100));
    assert!(has_room(limits, 2, 90, 10));
    assert!(!has_room(limits, 3, 0, 10), "records at the limit");
    assert!(!has_room(limits, 0, 91, 10), "bytes over the limit");
    assert!(!has_room(limits, -1, 0, 101), "one record over the bytes");
    assert!(!has_room(limits, 0, i64::MAX, 1), "no overflow into room");
}

#[tokio::test]
async fn an_unreachable_postgres_queue_is_said_at_once_with_its_reason() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/relay");
    let open = Queue::open(&url, Limits::default());
    // The pool alone said "pool timed out" after 30 s.
    let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(10), open).await else {
        panic!("no error within 10 s")
    };
    assert!(e.to_string().contains("refused"), "{e}");
}

#[tokio::test]
async fn a_sqlite_queue_that_cannot_be_opened_is_named() {
    let dir = std::env::temp_dir().join(format!("relay-q-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.display().to_string();
    let Err(e) = Queue::open(&path, Limits::default()).await else {
        panic!("a directory opened as a queue")
    };
    let _ = std::fs::remove_dir(&dir);
    assert!(
        e.to_string().contains(&format!("SQLite queue {path}")),
        "{e}"
    );
    // A long path is named cut short.
    let long = format!("/nonexistent/{}", "q".repeat(5_000));
    let Err(e) = Queue::open(&long, Limits::default()).await else {
        panic!("a queue in a directory that does not exist")
    };
    assert!(e.to_string().len() < 1_000, "{e}");
}

#[tokio::test]
async fn a_queue_url_of_another_scheme_is_not_a_file_name() {
    for url in ["mysql://x", "redis://127.0.0.1/0"] {
        let Err(e) = Queue::open(url, Limits::default()).await else {
            panic!("{url}: a queue")
        };
        let e = e.to_string();
        assert!(
            e.contains("is not supported") && e.contains("postgres://"),
            "{url}: {e}"
        );
        assert!(sqlite_path(url).is_err());
    }
    assert_eq!(sqlite_path("sqlite:/a/q.db").unwrap(), Some("/a/q.db"));
    assert_eq!(sqlite_path("sqlite:///a/q.db").unwrap(), Some("/a/q.db"));
    assert_eq!(sqlite_path("q.db").unwrap(), Some("q.db"));
    assert_eq!(sqlite_path("postgresql://h/db").unwrap(), None);
}

/// A PostgreSQL queue as the release before [`INDEXES`] left it.
const PREVIOUS_RELEASE: &str = "\
    CREATE TABLE relay_records (id BIGSERIAL PRIMARY KEY, idem_key TEXT NOT NULL UNIQUE, \
      order_key TEXT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL, body TEXT, \
      bytes BIGINT NOT NULL, state TEXT NOT NULL, attempts BIGINT NOT NULL DEFAULT 0, \
      received_ms BIGINT NOT NULL, not_before_ms BIGINT NOT NULL, lease_owner TEXT, \
      lease_until_ms BIGINT, done_ms BIGINT); \
    CREATE INDEX relay_records_state ON relay_records (state, id); \
    CREATE INDEX relay_records_order ON relay_records (order_key, id); \
    CREATE TABLE relay_dead_letters (record_id BIGINT PRIMARY KEY, \
      status BIGINT NOT NULL, answer TEXT NOT NULL, dead_ms BIGINT NOT NULL);";

const INSERT: &str = "INSERT INTO relay_records (idem_key, order_key, method, path, \
    bytes, state, received_ms, not_before_ms) VALUES ($1, $2, 'POST', '/api/v2/x', 10, \
    'pending', 0, 0)";

/// A new database of a PostgreSQL of its own, with the previous
/// release's tables; and a connection to it.
async fn previous_release(pg: &testsvc::Postgres, name: &str) -> (String, PgConnection) {
    let url = pg.create_database(name).unwrap();
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(PREVIOUS_RELEASE)
        .execute(&mut conn)
        .await
        .unwrap();
    (url, conn)
}

/// The queue's indexes (not the keys'), and whether each is valid.
async fn indexes(conn: &mut PgConnection) -> Vec<(String, bool)> {
    sqlx::query_as(
        "SELECT c.relname::text, i.indisvalid FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid IN ('relay_records'::regclass, 'relay_dead_letters'::regclass) \
           AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid) \
         ORDER BY 1",
    )
    .fetch_all(conn)
    .await
    .unwrap()
}

/// Every index of this version valid, and the previous release's kept.
fn migrated() -> Vec<(String, bool)> {
    let mut all: Vec<(String, bool)> = INDEXES
        .iter()
        .map(|(name, ..)| name.to_string())
        .chain(SUPERSEDED.iter().map(|name| name.to_string()))
        .map(|name| (name, true))
        .collect();
    all.sort();
    all
}

/// A queue of the previous release, with records and an index build of
/// this version's that was interrupted (left invalid), is brought to
/// this version: its records all there and claimed in order.
#[tokio::test]
async fn a_postgres_queue_of_the_previous_release_is_migrated() {
    let pg = testsvc::Postgres::start().unwrap();
    let (url, mut conn) = previous_release(&pg, "relay_upgrade").await;
    for (key, order) in [("a", "o"), ("b", "o"), ("c", "p")] {
        sqlx::query(INSERT)
            .bind(key)
            .bind(order)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    // A build that fails half-way leaves its index behind, invalid.
    let failed = sqlx::raw_sql(
        "CREATE UNIQUE INDEX CONCURRENTLY relay_records_due ON relay_records (order_key)",
    )
    .execute(&mut conn)
    .await;
    assert!(failed.is_err());
    assert!(indexes(&mut conn)
        .await
        .contains(&("relay_records_due".into(), false)));
    let q = Queue::open(&url, Limits::default()).await.unwrap();
    assert_eq!(indexes(&mut conn).await, migrated());
    let unique: bool = sqlx::query_scalar(
        "SELECT indisunique FROM pg_index WHERE indexrelid = 'relay_records_due'::regclass",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(!unique, "the interrupted build's index kept");
    let lease = Duration::from_secs(60);
    let claimed = q.claim("r", 10, lease).await.unwrap();
    let keys: Vec<&str> = claimed.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["a", "c"]);
    q.finish(claimed[0].id, claimed[0].attempts, "r", Outcome::Done)
        .await
        .unwrap();
    let next = q.claim("r", 10, lease).await.unwrap();
    assert_eq!(
        next.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
}

/// A transaction that holds the table (a long write of another relay)
/// delays a relay's start by the lock wait at most: it serves without
/// the index it could not build, and builds it at its next start.
#[tokio::test]
async fn a_postgres_migration_waits_for_a_lock_no_longer_than_its_wait() {
    let pg = testsvc::Postgres::start().unwrap();
    let (url, mut conn) = previous_release(&pg, "relay_lock_wait").await;
    let mut other = PgConnection::connect(&url).await.unwrap();
    let mut writing = other.begin().await.unwrap();
    sqlx::query(INSERT)
        .bind("held")
        .bind("o")
        .execute(&mut *writing)
        .await
        .unwrap();
    let internals = Internals {
        lock_wait: Duration::from_millis(100),
        ..Internals::default()
    };
    // A hang guard, not a measure.
    let q = tokio::time::timeout(
        Duration::from_secs(60),
        Queue::open_with(&url, Limits::default(), internals),
    )
    .await
    .expect("the queue opened while a transaction holds the table")
    .unwrap();
    assert!(matches!(
        q.enqueue(record("new")).await.unwrap(),
        Stored::New(_)
    ));
    assert_ne!(indexes(&mut conn).await, migrated());
    writing.commit().await.unwrap();
    drop(q);
    let q = Queue::open(&url, Limits::default()).await.unwrap();
    assert_eq!(indexes(&mut conn).await, migrated());
    assert_eq!(q.depth().await.unwrap().records, 2);
}

/// A PostgreSQL queue of database `name` whose record "first" is a dead
/// letter, and an intake of "second", of the same key, paused before
/// its commit until the guard returned is dropped.
async fn a_record_stored_behind_a_dead_letter(
    pg: &testsvc::Postgres,
    name: &str,
) -> (
    Queue,
    tokio::task::JoinHandle<Result<Stored, RelayError>>,
    tokio::sync::OwnedMutexGuard<()>,
) {
    let url = pg.create_database(name).unwrap();
    let (reached, mut committing) = mpsc::unbounded_channel();
    let gate = Arc::new(tokio::sync::Mutex::new(()));
    let internals = Internals {
        commit_hook: Some(Hook {
            reached,
            gate: gate.clone(),
        }),
        ..Internals::default()
    };
    let q = Queue::open_with(&url, Limits::default(), internals)
        .await
        .unwrap();
    q.enqueue(record("first")).await.unwrap();
    committing.recv().await.unwrap();
    let first = q
        .claim("r", 1, Duration::from_secs(60))
        .await
        .unwrap()
        .remove(0);
    let dead = Outcome::Dead {
        status: 400,
        answer: String::new(),
    };
    q.finish(first.id, first.attempts, "r", dead).await.unwrap();
    let held = gate.clone().lock_owned().await;
    let second = tokio::spawn({
        let q = q.clone();
        async move { q.enqueue(record("second")).await }
    });
    committing.recv().await.unwrap();
    (q, second, held)
}

/// Another relay's intake stores a record of a dead letter's key and
/// has not committed when the dead letter is due for pruning: the
/// dead letter is kept, and holds the record back.
#[tokio::test]
async fn a_dead_letter_is_not_pruned_under_a_record_of_its_key_being_stored() {
    let pg = testsvc::Postgres::start().unwrap();
    let (q, second, held) = a_record_stored_behind_a_dead_letter(&pg, "relay_prune_race").await;
    // A hang guard, not a measure.
    let pruned = tokio::time::timeout(
        Duration::from_secs(60),
        q.prune_dead_letters(Duration::ZERO, now_ms() + 60_000),
    )
    .await
    .expect("the pruning waited for the intake")
    .unwrap();
    drop(held);
    assert!(matches!(second.await.unwrap().unwrap(), Stored::New(_)));
    let depth = q.depth().await.unwrap();
    assert_eq!((pruned, depth.dead, depth.blocked), (0, 1, 1), "{depth:?}");
    // Held back, it is kept whatever its age; dropped, it holds nothing.
    assert_eq!(
        q.prune_dead_letters(Duration::ZERO, now_ms() + 60_000)
            .await
            .unwrap(),
        0
    );
    assert_eq!(q.drop_dead(None).await.unwrap(), 1);
    let next = q.claim("r", 1, Duration::from_secs(60)).await.unwrap();
    assert_eq!(next[0].key, "second");
}

/// A replay while another relay's intake stores a record of the dead
/// letter's key (held, not yet committed): the replay waits for that
/// intake (which locks the dead letter it found), so its release sees
/// the record, and nothing is left held with no dead letter ahead.
#[tokio::test]
async fn a_replay_racing_an_intake_of_its_key_leaves_nothing_held() {
    let pg = testsvc::Postgres::start().unwrap();
    let (q, second, held) = a_record_stored_behind_a_dead_letter(&pg, "relay_replay_race").await;
    let replay = tokio::spawn({
        let q = q.clone();
        async move { q.replay(None).await }
    });
    drop(held);
    assert!(matches!(second.await.unwrap().unwrap(), Stored::New(_)));
    // A hang guard, not a measure.
    let replayed = tokio::time::timeout(Duration::from_secs(60), replay)
        .await
        .expect("the replay went on once the intake committed")
        .unwrap()
        .unwrap();
    assert_eq!(replayed, 1);
    assert_eq!(
        q.release_stranded().await.unwrap(),
        0,
        "a record was left held"
    );
    // In order: the replayed head, then what it held.
    let next = q.claim("r", 5, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        next.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["first"]
    );
    q.finish(next[0].id, next[0].attempts, "r", Outcome::Done)
        .await
        .unwrap();
    let next = q.claim("r", 5, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        next.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
        ["second"]
    );
}

/// A record held with no dead letter ahead (a settling by an earlier
/// version) is released by the net, once.
#[tokio::test]
async fn a_record_held_with_nothing_ahead_is_released() {
    let (q, dir) = sqlite_queue("stranded").await;
    q.enqueue(one_record()).await.unwrap();
    let Db::Sqlite(pool) = q.db.clone() else {
        panic!("not SQLite")
    };
    sqlx::query("UPDATE relay_records SET not_before_ms = ?")
        .bind(HELD_MS)
        .execute(&pool)
        .await
        .unwrap();
    assert!(q
        .claim("r", 1, Duration::from_secs(60))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(q.release_stranded().await.unwrap(), 1);
    assert_eq!(q.release_stranded().await.unwrap(), 0);
    assert_eq!(
        q.claim("r", 1, Duration::from_secs(60))
            .await
            .unwrap()
            .len(),
        1
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cut_keeps_characters_whole() {
    assert_eq!(cut("abc", 10), "abc");
    assert_eq!(cut("héllo", 2), "h");
    assert_eq!(cut("héllo", 3), "hé");
}
