//! The durable queue: one table of records and one of dead letters, in
//! SQLite (embedded, WAL, `synchronous=FULL`) or PostgreSQL (shared by
//! several relays; claims take `FOR UPDATE SKIP LOCKED`). Owns the schema,
//! the SQL of both back ends, and the group commit: intake and drain
//! outcomes go through one writer task that commits whatever has gathered
//! in one transaction, and each caller is answered only after that commit
//! (so a 202 means the record is on disk).
//!
//! The writer's room check reads the queue's figures from [`Room`], which
//! a recounter task of its own (on its own connection) recounts every
//! second and the writer moves by its own commits in between: intake never
//! waits for a count of the queue.
//!
//! A record's states: `pending` → `inflight` (claimed by one relay, with a
//! lease that expires so a dead relay's records come back) → `done`, or
//! `dead` (with a row in the dead-letter table) → `pending` again on replay
//! or `dropped`. Done and dropped records stay (until pruned) so a repeated
//! idempotency key is still recognised.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection as _, Row};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::error::RelayError;
use crate::record::{NewRecord, Record};

/// Operations the writer gathers per transaction at most.
const BATCH_MAX: usize = 512;
/// Operations waiting for the writer at most (then callers wait).
const CHANNEL: usize = 4096;
/// SQLite connections: the writer, the drain's claims, status reads (the
/// recounter has one more of its own).
const SQLITE_CONNECTIONS: u32 = 4;
/// PostgreSQL connections per relay.
const PG_CONNECTIONS: u32 = 8;
/// How long a write waits for a PostgreSQL connection.
const PG_ACQUIRE: Duration = Duration::from_secs(2);
/// How long the first connection to PostgreSQL may take.
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long a statement waits for SQLite's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of an upstream answer kept in a dead letter.
const DEAD_ANSWER_MAX: usize = 4096;
/// Dead letters pruned per transaction at most.
const PRUNE_BATCH: i64 = 500;
/// How long a statement of the PostgreSQL migration waits for a lock
/// before it gives up (the relay then serves with the indexes there are).
const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(5);

/// How full the queue may get before intake answers 503.
///
/// A relay never stores a record beyond them by its own figures: a recount
/// adds every record this relay stored since it began, and a record it
/// removes meanwhile only comes off at the next one (so it may refuse a
/// little early, never store past them). What others add (other relays on
/// a shared queue, `dlq replay` from the CLI) it learns at its next
/// recount, every second while records come to it: the queue may exceed
/// the limits by what they stored in one second and one recount. (The
/// first records after a spell without any are checked against the
/// figures from before it, and ask for a recount at once.)
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Records pending or in flight.
    pub max_records: u64,
    /// Their bytes (method, path, body and keys).
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_records: 1_000_000,
            max_bytes: 1 << 30,
        }
    }
}

/// What intake answers for one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Stored now under this id.
    New(i64),
    /// The idempotency key was stored before, under this id.
    Duplicate(i64),
    /// The idempotency key was stored before, under this id, with another
    /// method, path or body: not this record, which is not stored.
    Conflict(i64),
    /// The queue is full.
    Full,
}

/// A record's upstream outcome, as the drain reports it.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Delivered (2xx).
    Done,
    /// Not now (429, 5xx, transport, broker): pending again from `at_ms`.
    Retry {
        /// Epoch ms before which it is not claimed again.
        at_ms: i64,
    },
    /// Refused for good (4xx other than 429): to the dead letters.
    Dead {
        /// The upstream's status.
        status: u16,
        /// The upstream's answer (cut to 4 KiB, `DEAD_ANSWER_MAX`).
        answer: String,
    },
}

/// One dead letter.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeadLetter {
    /// The record's id.
    pub id: i64,
    /// Its idempotency key.
    pub key: String,
    /// Its method and path.
    pub method: String,
    /// Its path.
    pub path: String,
    /// The upstream's status.
    pub status: i64,
    /// The upstream's answer.
    pub answer: String,
    /// When it died, epoch ms.
    pub dead_ms: i64,
}

/// The queue's figures (for `/status`, `gc-relay status` and `/metrics`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Depth {
    /// Records pending or in flight.
    pub records: i64,
    /// Of which in flight.
    pub inflight: i64,
    /// Their bytes.
    pub bytes: i64,
    /// Age of the oldest of them, seconds (0 when none).
    pub oldest_age_s: f64,
    /// Dead letters.
    pub dead: i64,
    /// Age of the oldest dead letter, seconds (0 when none).
    pub oldest_dead_age_s: f64,
    /// Records pending behind a dead letter of their order key: none of
    /// them goes upstream until it is replayed (and delivered) or dropped.
    pub blocked: i64,
    /// Records delivered in the last minute.
    pub done_last_minute: i64,
    /// Records delivered and still kept.
    pub done: i64,
}

/// The database: SQLite or PostgreSQL.
#[derive(Clone)]
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the pool of whichever back end `$db`
/// is (the same code compiled for both drivers).
macro_rules! with_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

/// A write transaction: `BEGIN IMMEDIATE` on SQLite, so the write lock is
/// taken up front and a read before a write never fails on a busy snapshot.
trait BeginWrite {
    type Database: sqlx::Database;
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Self::Database>, sqlx::Error>;
}

impl BeginWrite for SqlitePool {
    type Database = sqlx::Sqlite;
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.begin_with("BEGIN IMMEDIATE").await
    }
}

impl BeginWrite for PgPool {
    type Database = sqlx::Postgres;
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.begin().await
    }
}

/// Intake's part in keeping a dead letter that holds records back: see
/// [`Queue::prune_dead_letters`].
trait HoldDeadLetters {
    type Connection;
    /// Locks, until the transaction ends, the dead letters of `order_keys`,
    /// and returns the keys that have one: a record stored behind one of
    /// those is held (see [`HELD_MS`]). A replay or drop of a dead letter
    /// locked here waits for this transaction, so its release sees what it
    /// held; one that died after the lock was taken is not seen, and the
    /// record behind it is stored due, as the claim's order check allows.
    async fn hold_dead_letters(
        &self,
        conn: &mut Self::Connection,
        order_keys: &[String],
    ) -> Result<HashSet<String>, sqlx::Error>;
}

impl HoldDeadLetters for SqlitePool {
    type Connection = SqliteConnection;
    /// No lock to take: the write transaction already excludes the pruning
    /// and every settling.
    async fn hold_dead_letters(
        &self,
        conn: &mut SqliteConnection,
        order_keys: &[String],
    ) -> Result<HashSet<String>, sqlx::Error> {
        let mut dead = HashSet::new();
        for key in order_keys {
            if dead.contains(key) {
                continue;
            }
            let found: Option<i64> = sqlx::query_scalar(DEAD_OF_KEY)
                .bind(key)
                .fetch_optional(&mut *conn)
                .await?;
            if found.is_some() {
                dead.insert(key.clone());
            }
        }
        Ok(dead)
    }
}

impl HoldDeadLetters for PgPool {
    type Connection = PgConnection;
    async fn hold_dead_letters(
        &self,
        conn: &mut PgConnection,
        order_keys: &[String],
    ) -> Result<HashSet<String>, sqlx::Error> {
        let keys: Vec<String> = sqlx::query_scalar(
            "SELECT order_key FROM relay_records WHERE state = 'dead' AND order_key = ANY($1) \
             ORDER BY id FOR SHARE",
        )
        .bind(order_keys)
        .fetch_all(conn)
        .await?;
        Ok(keys.into_iter().collect())
    }
}

/// One operation for the writer, with the channel its caller waits on.
enum Op {
    Enqueue(NewRecord, oneshot::Sender<Result<Stored, RelayError>>),
    Finish {
        id: i64,
        /// The claim's attempt count: a claim of `id` renewed since (the
        /// lease expired mid-delivery and this relay claimed it again) has
        /// a higher one, and this outcome is not its.
        attempts: i64,
        owner: String,
        outcome: Outcome,
        done: oneshot::Sender<Result<(), RelayError>>,
    },
}

/// How a command uses a queue it opens with [`Queue::open_existing`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reads only (`status`, `dlq list`): the connections are read-only.
    Read,
    /// Settles dead letters (`dlq replay`, `dlq drop`).
    Settle,
}

/// What [`Queue::open`] leaves at its defaults and tests set.
struct Internals {
    recounter: Recounter,
    /// PostgreSQL's `lock_timeout` while migrating.
    lock_wait: Duration,
    /// Tests: told when a write transaction that stores records is about to
    /// commit, then holds it until released.
    #[cfg(test)]
    commit_hook: Option<Hook>,
}

impl Default for Internals {
    fn default() -> Internals {
        Internals {
            recounter: Recounter::default(),
            lock_wait: MIGRATION_LOCK_WAIT,
            #[cfg(test)]
            commit_hook: None,
        }
    }
}

/// Tests: a point in a task that says it got there, then waits for `gate`.
#[cfg(test)]
struct Hook {
    reached: mpsc::UnboundedSender<()>,
    gate: Arc<tokio::sync::Mutex<()>>,
}

#[cfg(test)]
impl Hook {
    async fn pass(&self) {
        let _ = self.reached.send(());
        let _held = self.gate.lock().await;
    }
}

/// The tables and columns `status` and `dlq` read.
const READ_COLUMNS: [(&str, &[&str]); 2] = [
    (
        "relay_records",
        &[
            "id",
            "idem_key",
            "order_key",
            "method",
            "path",
            "body",
            "bytes",
            "state",
            "attempts",
            "received_ms",
            "not_before_ms",
            "lease_owner",
            "lease_until_ms",
            "done_ms",
        ],
    ),
    (
        "relay_dead_letters",
        &["record_id", "status", "answer", "dead_ms"],
    ),
];

/// The queue: a cheap-clone handle (a pool and the writer's channel).
#[derive(Clone)]
pub struct Queue {
    db: Db,
    writer: mpsc::Sender<Op>,
    limits: Limits,
    /// The writer's last commit failed (disk full, database down).
    failing: Arc<AtomicBool>,
    /// Asks the recounter for a recount now.
    recount: Arc<Notify>,
}

/// The file of a SQLite queue URL (`sqlite:PATH`, `sqlite://PATH` or a bare
/// path); `None` for PostgreSQL (`postgres://`, `postgresql://`). Any other
/// URL scheme (`mysql://`) is an error, not a file name.
pub fn sqlite_path(url: &str) -> Result<Option<&str>, RelayError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(None);
    }
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        return Ok(Some(path));
    }
    if let Some((scheme, _)) = url.split_once("://") {
        let scheme: String = scheme.chars().take(20).collect();
        return Err(RelayError::Settings(format!(
            "the queue URL's scheme {scheme:?} is not supported: give a SQLite file \
             (sqlite:PATH or a path) or a postgres:// URL"
        )));
    }
    Ok(Some(url))
}

/// Takes `<path>.lock` for a serving relay: a second one on the same SQLite
/// file would release the first one's claims at its start and send their
/// records upstream again. (The CLI's inspections do not take it.) The
/// lock goes with the process, even a killed one.
pub(crate) fn lock_queue_file(path: &str) -> Result<std::fs::File, RelayError> {
    let lock_path = format!("{path}.lock");
    let (path, lock_shown) = (shown(path), shown(&lock_path));
    let io = |what: String| {
        move |source| RelayError::Io {
            what: what.clone(),
            source,
        }
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(format!("open the queue's lock file {lock_shown}")))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(RelayError::State(format!(
            "another relay uses the queue {path} (it holds {lock_shown}): one relay per SQLite \
             file; stop it first, or run several on PostgreSQL"
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(io(format!("lock the queue's lock file {lock_shown}"))(e))
        }
    }
}

impl Queue {
    /// Opens (creating if needed) the queue at `url`: `sqlite:PATH` or a
    /// bare path for SQLite, `postgres://...` for PostgreSQL (another
    /// scheme is an error; an unreachable server is said at once, with its
    /// reason), and brings its schema up to this version (see
    /// `migrate_sqlite` and `migrate_postgres`).
    /// Starts the writer task, which stops when every handle is dropped.
    pub async fn open(url: &str, limits: Limits) -> Result<Queue, RelayError> {
        Queue::open_with(url, limits, Internals::default()).await
    }

    async fn open_with(
        url: &str,
        limits: Limits,
        internals: Internals,
    ) -> Result<Queue, RelayError> {
        let (db, counter) = if let Some(path) = sqlite_path(url)? {
            let pool = sqlite(path, SQLITE_CONNECTIONS).await?;
            migrate_sqlite(&pool).await?;
            hold_sqlite(&pool).await?;
            (Db::Sqlite(pool), Db::Sqlite(sqlite(path, 1).await?))
        } else {
            let mut first = connect_postgres(url).await?;
            migrate_postgres(&mut first, internals.lock_wait).await?;
            // Its work is done (and its session's locks go with it): a
            // failed goodbye is no reason not to start.
            let _ = first.close().await;
            // Not held here (that could race a replay on another relay and
            // hold a key with no dead letter): intake and the drain hold
            // records as they go; the release below is safe.
            (
                Db::Postgres(postgres(url, PG_CONNECTIONS).await?),
                Db::Postgres(postgres(url, 1).await?),
            )
        };
        // The figures are known before the first record is taken.
        let room = Room::new();
        let (records, bytes) = count_open(&counter).await?;
        room.recounted(records, bytes);
        let (writer, ops) = mpsc::channel(CHANNEL);
        let failing = Arc::new(AtomicBool::new(false));
        let recount = Arc::new(Notify::new());
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(
            internals
                .recounter
                .run(counter, room.clone(), recount.clone(), stopped),
        );
        tokio::spawn(write_loop(
            Writer {
                db: db.clone(),
                limits,
                room,
                recount: recount.clone(),
                failing: failing.clone(),
                #[cfg(test)]
                hook: internals.commit_hook,
            },
            ops,
            stop,
        ));
        let queue = Queue {
            db,
            writer,
            limits,
            failing,
            recount,
        };
        queue.release_stranded().await?;
        Ok(queue)
    }

    /// Opens the queue at `url` as it is, for `gc-relay status` and `dlq`:
    /// no table or index is created, changed or dropped (a serving relay's
    /// queue is not migrated under it), and for [`Access::Read`] the
    /// connection is read-only. A queue that lacks a table or column these
    /// read is [`RelayError::OlderQueue`]. The handle stores no records:
    /// `enqueue` and `finish` answer [`RelayError::WriterGone`].
    pub async fn open_existing(url: &str, access: Access) -> Result<Queue, RelayError> {
        let read_only = access == Access::Read;
        let db = if let Some(path) = sqlite_path(url)? {
            // Not created: a mistyped path would be a new, empty queue,
            // reported as all zeros.
            if !std::path::Path::new(path).exists() {
                return Err(RelayError::Settings(format!(
                    "there is no queue at {}: give the --queue (or GC_RELAY_QUEUE) that \
                     gc-relay serve uses",
                    shown(path)
                )));
            }
            let options = SqliteConnectOptions::new()
                .filename(path)
                .read_only(read_only)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(BUSY_TIMEOUT);
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .map_err(|e| {
                    RelayError::db(&format!("open the SQLite queue {}", shown(path)), e)
                })?;
            Db::Sqlite(pool)
        } else {
            let connect = |e| RelayError::db("connect to PostgreSQL", e);
            let mut options: PgConnectOptions = url.parse().map_err(connect)?;
            if read_only {
                options = options.options([("default_transaction_read_only", "on")]);
            }
            // One connection first, as `serve` makes, for its own error
            // (connection refused, at once): the pool would retry for its
            // whole acquire timeout, then say only that it timed out.
            let first = connect_postgres_with(&options).await?;
            // A failed goodbye is no reason not to go on.
            let _ = first.close().await;
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(CONNECT_WAIT)
                .connect_with(options)
                .await
                .map_err(connect)?;
            Db::Postgres(pool)
        };
        if let Some(missing) = missing_column(&db).await? {
            return Err(RelayError::OlderQueue { missing });
        }
        let (writer, _) = mpsc::channel(1);
        Ok(Queue {
            db,
            writer,
            limits: Limits::default(),
            failing: Arc::default(),
            recount: Arc::default(),
        })
    }

    /// Whether the last write failed (and none succeeded since): the relay
    /// cannot store records now.
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Whether this queue is PostgreSQL.
    pub fn is_shared(&self) -> bool {
        matches!(self.db, Db::Postgres(_))
    }

    /// The limits intake enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Stores `record` (or finds its key), answering once committed.
    pub async fn enqueue(&self, record: NewRecord) -> Result<Stored, RelayError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Op::Enqueue(record, tx))
            .await
            .map_err(|_| RelayError::WriterGone)?;
        rx.await.map_err(|_| RelayError::WriterGone)?
    }

    /// Records the outcome of a claimed record (if `owner` still holds
    /// that claim of it: the one whose attempt count is `attempts`).
    pub async fn finish(
        &self,
        id: i64,
        attempts: i64,
        owner: &str,
        outcome: Outcome,
    ) -> Result<(), RelayError> {
        let (done, rx) = oneshot::channel();
        self.writer
            .send(Op::Finish {
                id,
                attempts,
                owner: owner.to_owned(),
                outcome,
                done,
            })
            .await
            .map_err(|_| RelayError::WriterGone)?;
        rx.await.map_err(|_| RelayError::WriterGone)?
    }

    /// Claims up to `n` records for `owner` until `lease` from now: pending,
    /// due (those due first), and with no older record of their order key
    /// pending, in flight or dead (so a key's records go upstream one at a
    /// time, in order).
    pub async fn claim(
        &self,
        owner: &str,
        n: usize,
        lease: Duration,
    ) -> Result<Vec<Record>, RelayError> {
        let now = now_ms();
        let until = now + lease.as_millis() as i64;
        // The candidates in the order they fell due, read from the
        // `relay_records_due` index: records waiting for a retry are not
        // read at all. PostgreSQL locks them and skips those another relay
        // is claiming.
        let lock = match self.db {
            Db::Sqlite(_) => "",
            Db::Postgres(_) => "FOR UPDATE SKIP LOCKED",
        };
        let sql = self.sql(&format!(
            "UPDATE relay_records SET state = 'inflight', lease_owner = ?, \
               lease_until_ms = ?, attempts = attempts + 1 \
             WHERE id IN (SELECT r.id FROM relay_records r \
               WHERE r.state = 'pending' AND r.not_before_ms <= ? \
                 AND NOT EXISTS (SELECT 1 FROM relay_records o WHERE o.order_key = r.order_key \
                   AND o.id < r.id AND o.state IN ('pending', 'inflight', 'dead')) \
               ORDER BY r.not_before_ms, r.id LIMIT ? {lock}) \
             RETURNING id, idem_key, method, path, body, attempts, received_ms"
        ));
        let mut records = with_pool!(&self.db, pool => {
            let rows = sqlx::query(&sql)
                .bind(owner)
                .bind(until)
                .bind(now)
                .bind(n as i64)
                .fetch_all(pool)
                .await
                .map_err(|e| RelayError::db("claim records", e))?;
            rows.iter().map(|row| {
                Ok(Record {
                    id: row.try_get("id")?,
                    key: row.try_get("idem_key")?,
                    method: row.try_get("method")?,
                    path: row.try_get("path")?,
                    body: row.try_get("body")?,
                    attempts: row.try_get("attempts")?,
                    received_ms: row.try_get("received_ms")?,
                })
            })
            .collect::<Result<Vec<Record>, sqlx::Error>>()
            .map_err(|e| RelayError::db("read claimed records", e))?
        });
        records.sort_by_key(|r| r.id);
        Ok(records)
    }

    /// Puts records whose lease has expired (their relay died) back to
    /// pending; returns how many.
    pub async fn reclaim(&self) -> Result<u64, RelayError> {
        let sql = self.sql(
            "UPDATE relay_records SET state = 'pending', lease_owner = NULL \
             WHERE state = 'inflight' AND lease_until_ms < ?",
        );
        self.execute("reclaim expired leases", &sql, &[now_ms()])
            .await
    }

    /// Puts every claimed record back to pending (a SQLite queue at start:
    /// its only relay is this one, so any claim is a dead predecessor's).
    pub async fn release_all_claims(&self) -> Result<u64, RelayError> {
        let sql = "UPDATE relay_records SET state = 'pending', lease_owner = NULL \
                   WHERE state = 'inflight'";
        self.execute("release claims of a previous run", sql, &[])
            .await
    }

    /// Deletes delivered and dropped records older than `keep`.
    pub async fn prune(&self, keep: Duration) -> Result<u64, RelayError> {
        let sql = self
            .sql("DELETE FROM relay_records WHERE state IN ('done', 'dropped') AND done_ms < ?");
        let before = now_ms() - keep.as_millis() as i64;
        self.execute("prune delivered records", &sql, &[before])
            .await
    }

    /// Drops the dead letters that died before `now_ms - keep`, at most
    /// `PRUNE_BATCH` per transaction (the writer waits for one batch, not
    /// for all), and returns how many. A dead letter that still holds
    /// records of its order key back (pending or in flight after it) is
    /// kept whatever its age: dropping it would send them upstream with
    /// nobody having decided to, and they show in [`Depth::blocked`] until
    /// it is replayed or dropped. A pruned record is `dropped` as `dlq drop`
    /// leaves it (its key still known until delivered records are pruned).
    pub async fn prune_dead_letters(&self, keep: Duration, now_ms: i64) -> Result<u64, RelayError> {
        let before = now_ms.saturating_sub(keep.as_millis().try_into().unwrap_or(i64::MAX));
        // On PostgreSQL the check that no record is held back, read in one
        // snapshot, misses a record another relay's intake has stored and
        // not yet committed. That intake holds the key's dead letters
        // (`FOR SHARE`, see `commit`) until it commits: the candidates are
        // locked first, skipping those an intake holds (kept this time),
        // and checked again by a statement of its own, whose snapshot is
        // taken once the locks are held and so sees every such record. An
        // intake that comes after the lock waits for this commit, and its
        // record is one that arrived after the dead letter was dropped.
        let lock = match self.db {
            Db::Sqlite(_) => "",
            Db::Postgres(_) => "FOR UPDATE OF r SKIP LOCKED",
        };
        let held_back = |r: &str| {
            format!(
                "EXISTS (SELECT 1 FROM relay_records f WHERE f.order_key = {r}.order_key \
                   AND f.id > {r}.id AND f.state IN ('pending', 'inflight'))"
            )
        };
        let candidates = self.sql(&format!(
            "SELECT r.id FROM relay_dead_letters d JOIN relay_records r ON r.id = d.record_id \
             WHERE d.dead_ms < ? AND r.state = 'dead' AND NOT {} \
             ORDER BY d.dead_ms LIMIT ? {lock}",
            held_back("r")
        ));
        let what = |e| RelayError::db("prune dead letters", e);
        let mut pruned = 0;
        loop {
            let (found, n) = with_pool!(&self.db, pool => {
                let mut tx = pool.begin_write().await.map_err(what)?;
                let found: Vec<i64> = sqlx::query_scalar(&candidates)
                    .bind(before)
                    .bind(PRUNE_BATCH)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(what)?;
                let mut n = 0;
                if !found.is_empty() {
                    let list: Vec<String> = found.iter().map(i64::to_string).collect();
                    let list = list.join(",");
                    let update = self.sql(&format!(
                        "UPDATE relay_records SET state = 'dropped', done_ms = ? \
                         WHERE state = 'dead' AND id IN ({list}) AND NOT {} RETURNING id",
                        held_back("relay_records")
                    ));
                    let ids: Vec<i64> = sqlx::query_scalar(&update)
                        .bind(now_ms)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(what)?;
                    if !ids.is_empty() {
                        let list: Vec<String> = ids.iter().map(i64::to_string).collect();
                        let delete = format!(
                            "DELETE FROM relay_dead_letters WHERE record_id IN ({})",
                            list.join(",")
                        );
                        sqlx::query(&delete).execute(&mut *tx).await.map_err(what)?;
                    }
                    n = ids.len() as u64;
                }
                tx.commit().await.map_err(what)?;
                (found.len(), n)
            });
            pruned += n;
            if found < PRUNE_BATCH as usize {
                return Ok(pruned);
            }
        }
    }

    /// The queue's figures now.
    pub async fn depth(&self) -> Result<Depth, RelayError> {
        self.depth_at(now_ms()).await
    }

    /// The queue's figures, ages and the last minute taken at `now_ms`.
    pub async fn depth_at(&self, now_ms: i64) -> Result<Depth, RelayError> {
        let now = now_ms;
        let open = self.sql(
            "SELECT COUNT(*) AS n, \
               CAST(COALESCE(SUM(CASE WHEN state = 'inflight' THEN 1 ELSE 0 END), 0) AS BIGINT) AS inflight, \
               CAST(COALESCE(SUM(bytes), 0) AS BIGINT) AS bytes, \
               CAST(COALESCE(MIN(received_ms), 0) AS BIGINT) AS oldest \
             FROM relay_records WHERE state IN ('pending', 'inflight')",
        );
        let done = self.sql(
            "SELECT \
               CAST(COALESCE(SUM(CASE WHEN done_ms >= ? THEN 1 ELSE 0 END), 0) AS BIGINT) AS recent, \
               COUNT(*) AS done \
             FROM relay_records WHERE state = 'done'",
        );
        let letters =
            "SELECT COUNT(*) AS dead, CAST(COALESCE(MIN(dead_ms), 0) AS BIGINT) AS oldest \
                       FROM relay_dead_letters";
        // From the few order keys a dead letter heads, not from every
        // pending record.
        let blocked = "SELECT COUNT(*) AS blocked FROM relay_records r \
                       JOIN (SELECT order_key, MIN(id) AS head_id FROM relay_records \
                             WHERE state = 'dead' GROUP BY order_key) d \
                         ON r.order_key = d.order_key AND r.id > d.head_id \
                       WHERE r.state = 'pending'";
        with_pool!(&self.db, pool => {
            let read = |e| RelayError::db("read the queue's depth", e);
            let a = sqlx::query(&open).fetch_one(pool).await.map_err(read)?;
            let b = sqlx::query(&done)
                .bind(now - 60_000)
                .fetch_one(pool)
                .await
                .map_err(read)?;
            let c = sqlx::query(letters).fetch_one(pool).await.map_err(read)?;
            let d = sqlx::query(blocked).fetch_one(pool).await.map_err(read)?;
            let get = |row: &_, name: &str| -> Result<i64, RelayError> {
                sqlx::Row::try_get::<i64, _>(row, name).map_err(read)
            };
            let age = |count: i64, since: i64| {
                if count > 0 {
                    ((now - since).max(0) as f64) / 1000.0
                } else {
                    0.0
                }
            };
            let records = get(&a, "n")?;
            let dead = get(&c, "dead")?;
            Ok(Depth {
                records,
                inflight: get(&a, "inflight")?,
                bytes: get(&a, "bytes")?,
                oldest_age_s: age(records, get(&a, "oldest")?),
                dead,
                oldest_dead_age_s: age(dead, get(&c, "oldest")?),
                blocked: get(&d, "blocked")?,
                done_last_minute: get(&b, "recent")?,
                done: get(&b, "done")?,
            })
        })
    }

    /// The dead letters, oldest first (at most `limit`).
    pub async fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, RelayError> {
        let sql = self.sql(
            "SELECT r.id, r.idem_key, r.method, r.path, d.status, d.answer, d.dead_ms \
             FROM relay_dead_letters d JOIN relay_records r ON r.id = d.record_id \
             ORDER BY r.id LIMIT ?",
        );
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(&sql)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
                .map_err(|e| RelayError::db("list dead letters", e))?;
            rows.iter()
                .map(|row| {
                    Ok(DeadLetter {
                        id: row.try_get("id")?,
                        key: row.try_get("idem_key")?,
                        method: row.try_get("method")?,
                        path: row.try_get("path")?,
                        status: row.try_get("status")?,
                        answer: row.try_get("answer")?,
                        dead_ms: row.try_get("dead_ms")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(|e| RelayError::db("read dead letters", e))
        })
    }

    /// Puts dead letters back in the queue (`ids`, or all when `None`);
    /// returns how many.
    pub async fn replay(&self, ids: Option<&[i64]>) -> Result<u64, RelayError> {
        Ok(self.replay_which(ids).await?.len() as u64)
    }

    /// [`Queue::replay`], returning the ids of the dead letters put back
    /// (in order).
    pub async fn replay_which(&self, ids: Option<&[i64]>) -> Result<Vec<i64>, RelayError> {
        let settled = self
            .settle_dead(
                ids,
                "state = 'pending', not_before_ms = ?, attempts = 0",
                now_ms(),
            )
            .await?;
        // Records back in the queue the writer did not store.
        self.recount.notify_one();
        Ok(settled)
    }

    /// Drops dead letters for good (`ids`, or all when `None`): their keys
    /// stay known, so a repeat is still one record; returns how many.
    pub async fn drop_dead(&self, ids: Option<&[i64]>) -> Result<u64, RelayError> {
        Ok(self.drop_dead_which(ids).await?.len() as u64)
    }

    /// [`Queue::drop_dead`], returning the ids of the dead letters dropped
    /// (in order).
    pub async fn drop_dead_which(&self, ids: Option<&[i64]>) -> Result<Vec<i64>, RelayError> {
        self.settle_dead(ids, "state = 'dropped', done_ms = ?", now_ms())
            .await
    }

    /// Sets `set` (with one `?`, bound to `value`) on the dead records of
    /// `ids` (all when `None`) and removes their dead letters; returns the
    /// ids settled.
    async fn settle_dead(
        &self,
        ids: Option<&[i64]>,
        set: &str,
        value: i64,
    ) -> Result<Vec<i64>, RelayError> {
        let which = match ids {
            None => String::new(),
            Some(ids) => {
                let list: Vec<String> = ids.iter().map(i64::to_string).collect();
                format!(" AND id IN ({})", list.join(","))
            }
        };
        let update = self.sql(&format!(
            "UPDATE relay_records SET {set} WHERE state = 'dead'{which}"
        ));
        let delete = "DELETE FROM relay_dead_letters WHERE record_id NOT IN \
                      (SELECT id FROM relay_records WHERE state = 'dead')";
        // In id order, as intake holds them: an intake holding one and
        // waiting for another is not waited for in turn (a deadlock). On
        // SQLite the write transaction holds the file: what it reads stays.
        let dead = format!(
            "SELECT id FROM relay_records WHERE state = 'dead'{which} ORDER BY id{}",
            match self.db {
                Db::Sqlite(_) => "",
                Db::Postgres(_) => " FOR UPDATE",
            }
        );
        let keys = self.sql(&format!(
            "SELECT DISTINCT order_key FROM relay_records WHERE state = 'dead'{which}"
        ));
        let release = self.sql(RELEASE_KEY);
        let what = |e| RelayError::db("settle dead letters", e);
        with_pool!(&self.db, pool => {
            let mut tx = pool.begin_write().await.map_err(what)?;
            let settled: Vec<i64> = sqlx::query_scalar(&dead)
                .fetch_all(&mut *tx)
                .await
                .map_err(what)?;
            let keys: Vec<String> = sqlx::query_scalar(&keys)
                .fetch_all(&mut *tx)
                .await
                .map_err(what)?;
            sqlx::query(&update)
                .bind(value)
                .execute(&mut *tx)
                .await
                .map_err(what)?;
            sqlx::query(delete).execute(&mut *tx).await.map_err(what)?;
            // What the settled dead letters held is due again, key by key.
            let now = now_ms();
            for key in &keys {
                sqlx::query(&release)
                    .bind(now)
                    .bind(key)
                    .bind(HELD_MS)
                    .bind(key)
                    .execute(&mut *tx)
                    .await
                    .map_err(what)?;
            }
            tx.commit().await.map_err(what)?;
            Ok(settled)
        })
    }

    /// Makes due the held records whose key has no dead letter left, and
    /// returns how many. None should be: a dead letter's replay or drop
    /// releases what it held. This is the net under that, for a settling
    /// done by a relay of an earlier version (`gc-relay dlq` of a rolling
    /// deploy), which does not release; the held due times are a speed-up
    /// of the claim, so a record held in error waits until this runs (at
    /// start, and each minute with the pruning). Read first: a queue with
    /// nothing to release is not written.
    pub async fn release_stranded(&self) -> Result<u64, RelayError> {
        let stranded: Option<i64> = with_pool!(&self.db, pool => {
            sqlx::query_scalar(&self.sql(STRANDED))
                .bind(HELD_MS)
                .fetch_optional(pool)
                .await
                .map_err(|e| RelayError::db("look for held records with nothing ahead", e))?
        });
        if stranded.is_none() {
            return Ok(0);
        }
        self.execute(
            "release held records with nothing ahead",
            &self.sql(RELEASE_HELD),
            &[now_ms(), HELD_MS],
        )
        .await
    }

    async fn execute(&self, what: &str, sql: &str, binds: &[i64]) -> Result<u64, RelayError> {
        with_pool!(&self.db, pool => {
            let mut q = sqlx::query(sql);
            for b in binds {
                q = q.bind(*b);
            }
            q.execute(pool)
                .await
                .map(|r| r.rows_affected())
                .map_err(|e| RelayError::db(what, e))
        })
    }

    fn sql(&self, text: &str) -> String {
        placeholders(&self.db, text)
    }
}

/// A queue's path (or other input) as an error names it: at most 200
/// characters.
pub fn shown(path: &str) -> String {
    gc_upstream::clip(path)
}

/// Opens the SQLite queue at `path` (created if missing), `connections`
/// at most.
async fn sqlite(path: &str, connections: u32) -> Result<SqlitePool, RelayError> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT);
    SqlitePoolOptions::new()
        .max_connections(connections)
        // A write SQLite rolled back by itself (disk full, I/O
        // error) leaves the driver's transaction count behind, and
        // that connection then refuses every BEGIN: close it, so
        // the pool opens a sound one once there is room again.
        .after_release(|conn, _| {
            Box::pin(async move { Ok(!sqlx::Connection::is_in_transaction(conn)) })
        })
        .connect_with(options)
        .await
        .map_err(|e| RelayError::db(&format!("open the SQLite queue {}", shown(path)), e))
}

/// One connection to the PostgreSQL queue at `url`, first, for its own
/// error (connection refused, no such database, a wrong password): a pool
/// would retry for its whole acquire timeout, then say only that it timed
/// out.
async fn connect_postgres(url: &str) -> Result<PgConnection, RelayError> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| RelayError::db("connect to PostgreSQL", e))?;
    connect_postgres_with(&options).await
}

/// [`connect_postgres`] with `options`.
async fn connect_postgres_with(options: &PgConnectOptions) -> Result<PgConnection, RelayError> {
    tokio::time::timeout(CONNECT_WAIT, PgConnection::connect_with(options))
        .await
        .map_err(|_| {
            let e = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} s", CONNECT_WAIT.as_secs()),
            );
            RelayError::db("connect to PostgreSQL", sqlx::Error::Io(e))
        })?
        .map_err(|e| RelayError::db("connect to PostgreSQL", e))
}

/// A pool of `connections` at most to the PostgreSQL queue at `url`.
async fn postgres(url: &str, connections: u32) -> Result<PgPool, RelayError> {
    PgPoolOptions::new()
        .max_connections(connections)
        // A server gone away fails a write within this (sqlx's 30 s
        // default held every intake behind the writer's batch that long,
        // past any Data Action's timeout): intake answers 503 and the flow
        // retries.
        .acquire_timeout(PG_ACQUIRE)
        .connect(url)
        .await
        .map_err(|e| RelayError::db("connect to PostgreSQL", e))
}

/// `text` with `?` placeholders, or `$1, $2, ...` for PostgreSQL.
fn placeholders(db: &Db, text: &str) -> String {
    match db {
        Db::Sqlite(_) => text.to_owned(),
        Db::Postgres(_) => {
            let mut out = String::with_capacity(text.len() + 8);
            let mut n = 0;
            for c in text.chars() {
                if c == '?' {
                    n += 1;
                    out.push('$');
                    out.push_str(&n.to_string());
                } else {
                    out.push(c);
                }
            }
            out
        }
    }
}

/// Milliseconds since the Unix epoch (wall clock: several relays share the
/// PostgreSQL queue's times).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The due time of a record held behind a dead letter of its order key:
/// never, until the dead letter is replayed or dropped. A record cannot go
/// before an older one of its key, so its due time is kept at least that
/// one's (a dead letter's being this): the claim, which reads due records
/// in due order, then never reads past records that cannot go, however
/// many there are. Only a speed-up: the claim still checks the order.
const HELD_MS: i64 = i64::MAX;

/// Holds (due at `?`, [`HELD_MS`]) the pending records behind record `?`
/// (its id, twice) of its key.
const HOLD_BEHIND: &str = "UPDATE relay_records SET not_before_ms = ? \
     WHERE order_key = (SELECT order_key FROM relay_records WHERE id = ?) \
       AND state = 'pending' AND id > ?";

/// Puts the pending records behind record `?` (its id, twice) of its key
/// off until at least `?` (twice), the time it was put off to.
const DELAY_BEHIND: &str = "UPDATE relay_records SET not_before_ms = ? \
     WHERE order_key = (SELECT order_key FROM relay_records WHERE id = ?) \
       AND state = 'pending' AND id > ? AND not_before_ms < ?";

/// Makes due at `?` the held records (due at `?`, [`HELD_MS`]) whose key
/// has no dead letter left.
const RELEASE_HELD: &str = "UPDATE relay_records SET not_before_ms = ? \
     WHERE state = 'pending' AND not_before_ms = ? \
       AND NOT EXISTS (SELECT 1 FROM relay_records d \
         WHERE d.order_key = relay_records.order_key AND d.state = 'dead')";

/// Whether a held record (due at `?`, [`HELD_MS`]) has no dead letter
/// ahead of it: read before [`RELEASE_HELD`], so a queue with nothing to
/// release is not written.
const STRANDED: &str = "SELECT r.id FROM relay_records r \
     WHERE r.state = 'pending' AND r.not_before_ms = ? \
       AND NOT EXISTS (SELECT 1 FROM relay_records d \
         WHERE d.order_key = r.order_key AND d.state = 'dead') LIMIT 1";

/// Makes due at `?` the held records (due at `?`, [`HELD_MS`]) of key `?`,
/// unless key `?` (the same) still has a dead letter.
const RELEASE_KEY: &str = "UPDATE relay_records SET not_before_ms = ? \
     WHERE order_key = ? AND state = 'pending' AND not_before_ms = ? \
       AND NOT EXISTS (SELECT 1 FROM relay_records d WHERE d.order_key = ? AND d.state = 'dead')";

/// A dead letter of key `?`, if it has one (a SQLite intake's look: see
/// `HoldDeadLetters`).
const DEAD_OF_KEY: &str =
    "SELECT id FROM relay_records WHERE order_key = ? AND state = 'dead' ORDER BY id LIMIT 1";

/// The due time of key `?`'s newest pending record.
const LAST_DUE: &str = "SELECT not_before_ms FROM relay_records \
     WHERE order_key = ? AND state = 'pending' ORDER BY id DESC LIMIT 1";

/// The queue's tables, `id` being its primary key's definition.
fn tables(id: &str) -> [String; 2] {
    [
        format!(
            "CREATE TABLE IF NOT EXISTS relay_records ( \
               {id}, \
               idem_key TEXT NOT NULL UNIQUE, \
               order_key TEXT NOT NULL, \
               method TEXT NOT NULL, \
               path TEXT NOT NULL, \
               body TEXT, \
               bytes BIGINT NOT NULL, \
               state TEXT NOT NULL, \
               attempts BIGINT NOT NULL DEFAULT 0, \
               received_ms BIGINT NOT NULL, \
               not_before_ms BIGINT NOT NULL, \
               lease_owner TEXT, \
               lease_until_ms BIGINT, \
               done_ms BIGINT)"
        ),
        "CREATE TABLE IF NOT EXISTS relay_dead_letters ( \
           record_id BIGINT PRIMARY KEY, \
           status BIGINT NOT NULL, \
           answer TEXT NOT NULL, \
           dead_ms BIGINT NOT NULL)"
            .into(),
    ]
}

/// The queue's indexes: name, table, columns.
const INDEXES: [(&str, &str, &str); 4] = [
    // The claim's candidates, due first; and the state's records (claims
    // to give back, records to prune, the figures).
    (
        "relay_records_due",
        "relay_records",
        "state, not_before_ms, id",
    ),
    // Whether an older record of a key is open: one probe per state, not
    // a walk through the key's delivered history.
    (
        "relay_records_order_state",
        "relay_records",
        "order_key, state, id",
    ),
    // The figures of the records pending or in flight (`/status`, the
    // recount) read from the index alone, not from every record.
    (
        "relay_records_open",
        "relay_records",
        "state, received_ms, bytes",
    ),
    ("relay_dead_letters_age", "relay_dead_letters", "dead_ms"),
];

/// Indexes of queues written before [`INDEXES`], superseded by them.
const SUPERSEDED: [&str; 2] = ["relay_records_state", "relay_records_order"];

/// Holds the records behind each dead letter of a SQLite queue written by
/// a version that did not: one relay per file, so nothing races it. (The
/// release of held records with nothing ahead follows at every open, see
/// [`Queue::release_stranded`].)
async fn hold_sqlite(pool: &SqlitePool) -> Result<(), RelayError> {
    let what = |e| RelayError::db("hold the records behind dead letters", e);
    let dead: Option<i64> =
        sqlx::query_scalar("SELECT id FROM relay_records WHERE state = 'dead' LIMIT 1")
            .fetch_optional(pool)
            .await
            .map_err(what)?;
    if dead.is_some() {
        sqlx::query(
            "UPDATE relay_records SET not_before_ms = ? \
             WHERE state = 'pending' AND not_before_ms < ? \
               AND EXISTS (SELECT 1 FROM relay_records d WHERE d.order_key = relay_records.order_key \
                 AND d.state = 'dead' AND d.id < relay_records.id)",
        )
        .bind(HELD_MS)
        .bind(HELD_MS)
        .execute(pool)
        .await
        .map_err(what)?;
    }
    Ok(())
}

/// Brings a SQLite queue to this version: one relay per file (its lock
/// file), so plain statements lock nobody else out.
async fn migrate_sqlite(pool: &SqlitePool) -> Result<(), RelayError> {
    let mut statements = tables("id INTEGER PRIMARY KEY AUTOINCREMENT").to_vec();
    for (name, table, columns) in INDEXES {
        statements.push(format!(
            "CREATE INDEX IF NOT EXISTS {name} ON {table} ({columns})"
        ));
    }
    for name in SUPERSEDED {
        statements.push(format!("DROP INDEX IF EXISTS {name}"));
    }
    for s in &statements {
        sqlx::raw_sql(s)
            .execute(pool)
            .await
            .map_err(|e| RelayError::db("create the queue's tables", e))?;
    }
    Ok(())
}

/// Brings a PostgreSQL queue, which other relays may be using, to this
/// version without stopping them: the tables are created only in a new
/// database, and indexes are built `CONCURRENTLY` (intake and claims go
/// on). Every wait for a lock is cut at `lock_wait`: a build that runs
/// into it is given up, logged, and tried again at the next start (an
/// index such a build left invalid is dropped and built again), and the
/// relay serves meanwhile with the indexes there are.
///
/// The superseded indexes are left in place: a relay of a previous
/// release (in a rolling deploy, or a rollback) creates them at its start
/// with a plain `CREATE INDEX`, which would hold every relay's intake for
/// the whole build of an index dropped under it. An operator drops them
/// once no relay of a previous release runs.
async fn migrate_postgres(conn: &mut PgConnection, lock_wait: Duration) -> Result<(), RelayError> {
    let what = |e| RelayError::db("create the queue's tables", e);
    sqlx::query(&format!("SET lock_timeout = {}", lock_wait.as_millis()))
        .execute(&mut *conn)
        .await
        .map_err(what)?;
    let exist: bool = sqlx::query_scalar(
        "SELECT to_regclass('relay_records') IS NOT NULL \
           AND to_regclass('relay_dead_letters') IS NOT NULL",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(what)?;
    if !exist {
        // Relays started at once on a new database create them one after
        // the other (the lock a previous release takes for the same).
        let mut tx = conn.begin().await.map_err(what)?;
        sqlx::query("SELECT pg_advisory_xact_lock(7311)")
            .execute(&mut *tx)
            .await
            .map_err(what)?;
        for s in tables("id BIGSERIAL PRIMARY KEY") {
            sqlx::query(&s).execute(&mut *tx).await.map_err(what)?;
        }
        tx.commit().await.map_err(what)?;
    }
    // One relay builds at a time; held until this connection closes. A
    // relay that finds it taken serves without waiting for the build.
    let builder: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(7312)")
        .fetch_one(&mut *conn)
        .await
        .map_err(what)?;
    if !builder {
        tracing::info!("another relay is building the queue's indexes; serving meanwhile");
        return Ok(());
    }
    for (name, table, columns) in INDEXES {
        match build_index(conn, name, table, columns).await {
            Ok(()) => {}
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                tracing::warn!(
                    index = name,
                    lock_wait_ms = lock_wait.as_millis() as u64,
                    "the queue's index was not built: a lock was held longer than the wait; \
                     serving without it, and building it at the next start"
                );
                return Ok(());
            }
            Err(e) => {
                return Err(RelayError::db(
                    &format!("build the queue's index {name}"),
                    e,
                ))
            }
        }
    }
    Ok(())
}

/// Builds index `name` of `table` on `columns` concurrently, unless it is
/// there and valid; one an interrupted build left invalid is dropped first.
async fn build_index(
    conn: &mut PgConnection,
    name: &str,
    table: &str,
    columns: &str,
) -> Result<(), sqlx::Error> {
    let valid: Option<bool> =
        sqlx::query_scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)")
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?;
    match valid {
        Some(true) => return Ok(()),
        Some(false) => {
            sqlx::query(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
                .execute(&mut *conn)
                .await?;
        }
        None => {}
    }
    tracing::info!(index = name, "building the queue's index");
    sqlx::query(&format!(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} ({columns})"
    ))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The first table or column in [`READ_COLUMNS`] that the queue lacks, as
/// `table` or `table.column`.
async fn missing_column(db: &Db) -> Result<Option<String>, RelayError> {
    let sql = match db {
        Db::Sqlite(_) => "SELECT name FROM pragma_table_info(?)",
        Db::Postgres(_) => {
            "SELECT attname::text FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped"
        }
    };
    let what = |e| RelayError::db("read the queue's tables", e);
    for (table, wanted) in READ_COLUMNS {
        let have: Vec<String> = with_pool!(db, pool => {
            sqlx::query_scalar(sql).bind(table).fetch_all(pool).await.map_err(what)?
        });
        if have.is_empty() {
            return Ok(Some(table.to_owned()));
        }
        if let Some(column) = wanted.iter().find(|c| !have.iter().any(|h| h == *c)) {
            return Ok(Some(format!("{table}.{column}")));
        }
    }
    Ok(None)
}

/// How often the recounter counts the queue while records arrive.
const RECOUNT_EVERY: Duration = Duration::from_secs(1);

/// The records pending or in flight, and their bytes, as the writer's room
/// check sees them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Figures {
    records: i64,
    bytes: i64,
}

/// The writer's [`Figures`] of the queue: recounted from the database by
/// the recounter (other relays on a shared queue and replays change it
/// too), moved by the writer's own commits in between. See [`Limits`] for
/// the bound this keeps.
#[derive(Clone)]
struct Room(Arc<Mutex<RoomState>>);

struct RoomState {
    now: Figures,
    /// What the writer stored since the running recount began: not in its
    /// count if committed after the count's snapshot was taken.
    added: Figures,
    /// When the last recount began.
    recounted_at: Instant,
    /// Records came since then. A queue no record comes to is not
    /// recounted (a count of a large backlog costs a core a few hundred ms):
    /// its figures are not read.
    intake: bool,
}

impl Room {
    fn new() -> Room {
        Room(Arc::new(Mutex::new(RoomState {
            now: Figures::default(),
            added: Figures::default(),
            recounted_at: Instant::now(),
            intake: false,
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RoomState> {
        // Every update leaves the figures whole: a panic elsewhere while
        // the lock was held does not make them wrong.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The figures for a batch of records; whether they are older than
    /// `every` (records come after a spell without: recount at once).
    fn for_intake(&self, every: Duration) -> (Figures, bool) {
        let mut s = self.state();
        s.intake = true;
        (s.now, s.recounted_at.elapsed() > every)
    }

    /// Whether records came since the last recount.
    fn had_intake(&self) -> bool {
        self.state().intake
    }

    /// A commit of the writer stored `added` and removed `removed`.
    fn committed(&self, added: Figures, removed: Figures) {
        let mut s = self.state();
        s.now.records = (s.now.records + added.records - removed.records).max(0);
        s.now.bytes = (s.now.bytes + added.bytes - removed.bytes).max(0);
        s.added.records += added.records;
        s.added.bytes += added.bytes;
    }

    /// A recount begins: its snapshot is taken after this.
    fn recount_begins(&self) {
        let mut s = self.state();
        s.added = Figures::default();
        s.recounted_at = Instant::now();
        s.intake = false;
    }

    /// A recount found `records` of `bytes`. A record stored after its
    /// snapshot is added to them; one stored between the start and the
    /// snapshot is counted twice, and one removed after the snapshot
    /// comes off at the next recount: both only ever overstate the queue.
    fn recounted(&self, records: i64, bytes: i64) {
        let mut s = self.state();
        s.now = Figures {
            records: records + s.added.records,
            bytes: bytes + s.added.bytes,
        };
    }
}

/// The records pending or in flight and their bytes, counted in the
/// database.
async fn count_open(db: &Db) -> Result<(i64, i64), RelayError> {
    let count = placeholders(db, COUNT_OPEN);
    let what = |e| RelayError::db("count the queue", e);
    with_pool!(db, pool => {
        let row = sqlx::query(&count).fetch_one(pool).await.map_err(what)?;
        Ok((
            row.try_get::<i64, _>("n").map_err(what)?,
            row.try_get::<i64, _>("bytes").map_err(what)?,
        ))
    })
}

const COUNT_OPEN: &str = "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(bytes), 0) AS BIGINT) AS bytes \
                          FROM relay_records WHERE state IN ('pending', 'inflight')";

/// The task that recounts the queue for the writer's [`Room`], on a
/// connection of its own: a count of a large backlog takes a while (a few
/// hundred ms at a million records), and intake does not wait for it.
struct Recounter {
    every: Duration,
    /// Tests: told when a recount has counted, then holds it until released.
    #[cfg(test)]
    hook: Option<Hook>,
}

impl Default for Recounter {
    fn default() -> Recounter {
        Recounter {
            every: RECOUNT_EVERY,
            #[cfg(test)]
            hook: None,
        }
    }
}

impl Recounter {
    /// Recounts every `every` while records arrive, and when `now` is
    /// notified, until `stop` (the writer's end).
    async fn run(self, db: Db, room: Room, now: Arc<Notify>, mut stop: oneshot::Receiver<()>) {
        // The first count was open's.
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + self.every, self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => if !room.had_intake() { continue },
                _ = now.notified() => {}
            }
            tokio::select! {
                _ = &mut stop => break,
                counted = self.recount(&db, &room) => {
                    if let Err(e) = counted {
                        tracing::warn!(error = %e, "the queue's recount failed; the writer keeps its figures");
                    }
                }
            }
        }
        with_pool!(&db, pool => pool.close().await);
    }

    async fn recount(&self, db: &Db, room: &Room) -> Result<(), RelayError> {
        room.recount_begins();
        let (records, bytes) = count_open(db).await?;
        #[cfg(test)]
        if let Some(hook) = &self.hook {
            hook.pass().await;
        }
        room.recounted(records, bytes);
        Ok(())
    }
}

/// What the writer task works with.
struct Writer {
    db: Db,
    limits: Limits,
    room: Room,
    recount: Arc<Notify>,
    failing: Arc<AtomicBool>,
    #[cfg(test)]
    hook: Option<Hook>,
}

/// The writer: gathers what is waiting (up to [`BATCH_MAX`]), commits it in
/// one transaction, then answers every caller. Drops `_stop` (stopping the
/// recounter) when every handle is gone.
async fn write_loop(w: Writer, mut ops: mpsc::Receiver<Op>, _stop: oneshot::Sender<()>) {
    let mut batch = Vec::with_capacity(BATCH_MAX);
    while ops.recv_many(&mut batch, BATCH_MAX).await > 0 {
        let (finishes, enqueues): (Vec<Op>, Vec<Op>) = batch
            .drain(..)
            .partition(|op| matches!(op, Op::Finish { .. }));
        let results = commit(&w, &finishes, &enqueues).await;
        w.failing.store(results.is_err(), Ordering::Relaxed);
        match results {
            Ok(stored) => {
                for op in finishes {
                    if let Op::Finish { done, .. } = op {
                        let _ = done.send(Ok(()));
                    }
                }
                for (op, s) in enqueues.into_iter().zip(stored) {
                    if let Op::Enqueue(_, reply) = op {
                        let _ = reply.send(Ok(s));
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "queue write failed; the batch is answered with the error");
                for op in finishes.into_iter().chain(enqueues) {
                    match op {
                        Op::Finish { done, .. } => {
                            let _ = done.send(Err(RelayError::Unavailable));
                        }
                        Op::Enqueue(_, reply) => {
                            let _ = reply.send(Err(RelayError::Unavailable));
                        }
                    }
                }
            }
        }
    }
}

/// One transaction: the outcomes first (writes, so SQLite's lock is held
/// from the start), then the new records, as far as the limits allow.
async fn commit(w: &Writer, finishes: &[Op], enqueues: &[Op]) -> Result<Vec<Stored>, RelayError> {
    let Writer {
        db,
        limits,
        room,
        recount,
        ..
    } = w;
    let limits = *limits;
    let insert = placeholders(
        db,
        "INSERT INTO relay_records (idem_key, order_key, method, path, body, bytes, state, \
           received_ms, not_before_ms) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?) \
         ON CONFLICT (idem_key) DO NOTHING RETURNING id",
    );
    let find = placeholders(
        db,
        "SELECT id, method, path, body FROM relay_records WHERE idem_key = ?",
    );
    let done = placeholders(
        db,
        "UPDATE relay_records SET state = 'done', done_ms = ?, lease_owner = NULL \
         WHERE id = ? AND state = 'inflight' AND lease_owner = ? AND attempts = ? RETURNING bytes",
    );
    let retry = placeholders(
        db,
        "UPDATE relay_records SET state = 'pending', not_before_ms = ?, lease_owner = NULL \
         WHERE id = ? AND state = 'inflight' AND lease_owner = ? AND attempts = ?",
    );
    let dead = placeholders(
        db,
        "UPDATE relay_records SET state = 'dead', lease_owner = NULL \
         WHERE id = ? AND state = 'inflight' AND lease_owner = ? AND attempts = ? RETURNING bytes",
    );
    let letter = placeholders(
        db,
        "INSERT INTO relay_dead_letters (record_id, status, answer, dead_ms) VALUES (?, ?, ?, ?) \
         ON CONFLICT (record_id) DO UPDATE SET status = excluded.status, \
           answer = excluded.answer, dead_ms = excluded.dead_ms",
    );
    let hold_behind = placeholders(db, HOLD_BEHIND);
    let delay_behind = placeholders(db, DELAY_BEHIND);
    let last_due = placeholders(db, LAST_DUE);
    let what = |e| RelayError::db("commit to the queue", e);
    let now = now_ms();
    with_pool!(db, pool => {
        let Figures { mut records, mut bytes } = if enqueues.is_empty() {
            Figures::default()
        } else {
            // Twice the interval: a recount is due on the tick before that.
            let (figures, old) = room.for_intake(2 * RECOUNT_EVERY);
            if old {
                recount.notify_one();
            }
            figures
        };
        let (mut added, mut removed) = (Figures::default(), Figures::default());
        let mut tx = pool.begin_write().await.map_err(what)?;
        for op in finishes {
            let Op::Finish { id, attempts, owner, outcome, .. } = op else { continue };
            match outcome {
                Outcome::Done => {
                    let row = sqlx::query(&done).bind(now).bind(*id).bind(owner).bind(*attempts)
                        .fetch_optional(&mut *tx).await.map_err(what)?;
                    if let Some(row) = row {
                        let size = row.try_get::<i64, _>("bytes").map_err(what)?;
                        records -= 1;
                        bytes -= size;
                        removed.records += 1;
                        removed.bytes += size;
                    }
                }
                Outcome::Retry { at_ms } => {
                    let retried = sqlx::query(&retry).bind(*at_ms).bind(*id).bind(owner)
                        .bind(*attempts).execute(&mut *tx).await.map_err(what)?;
                    if retried.rows_affected() == 1 {
                        sqlx::query(&delay_behind).bind(*at_ms).bind(*id).bind(*id).bind(*at_ms)
                            .execute(&mut *tx).await.map_err(what)?;
                    }
                }
                Outcome::Dead { status, answer } => {
                    let row = sqlx::query(&dead).bind(*id).bind(owner).bind(*attempts)
                        .fetch_optional(&mut *tx).await.map_err(what)?;
                    if let Some(row) = row {
                        let size = row.try_get::<i64, _>("bytes").map_err(what)?;
                        records -= 1;
                        bytes -= size;
                        removed.records += 1;
                        removed.bytes += size;
                        sqlx::query(&letter)
                            .bind(*id)
                            .bind(i64::from(*status))
                            .bind(cut(answer, DEAD_ANSWER_MAX))
                            .bind(now)
                            .execute(&mut *tx)
                            .await
                            .map_err(what)?;
                        sqlx::query(&hold_behind).bind(HELD_MS).bind(*id).bind(*id)
                            .execute(&mut *tx).await.map_err(what)?;
                    }
                }
            }
        }
        let order_keys: Vec<String> = enqueues
            .iter()
            .filter_map(|op| match op {
                Op::Enqueue(r, _) => Some(r.order_key.clone()),
                Op::Finish { .. } => None,
            })
            .collect();
        let dead_keys = if order_keys.is_empty() {
            HashSet::new()
        } else {
            pool.hold_dead_letters(&mut tx, &order_keys).await.map_err(what)?
        };
        let mut stored = Vec::with_capacity(enqueues.len());
        for op in enqueues {
            let Op::Enqueue(r, _) = op else { continue };
            let size = r.bytes() as i64;
            let room = has_room(limits, records, bytes, size);
            let inserted = if room {
                let due = if dead_keys.contains(&r.order_key) {
                    HELD_MS
                } else {
                    let last: Option<i64> = sqlx::query_scalar(&last_due)
                        .bind(&r.order_key)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(what)?;
                    last.unwrap_or(now).max(now)
                };
                sqlx::query(&insert)
                    .bind(&r.key)
                    .bind(&r.order_key)
                    .bind(&r.method)
                    .bind(&r.path)
                    .bind(r.body.as_deref())
                    .bind(size)
                    .bind(now)
                    .bind(due)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(what)?
                    .map(|row| row.try_get::<i64, _>("id"))
                    .transpose()
                    .map_err(what)?
            } else {
                None
            };
            let s = match inserted {
                Some(id) => {
                    records += 1;
                    bytes += size;
                    added.records += 1;
                    added.bytes += size;
                    Stored::New(id)
                }
                None => {
                    let found = sqlx::query(&find)
                        .bind(&r.key)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(what)?;
                    match found {
                        Some(row) => {
                            let id = row.try_get::<i64, _>("id").map_err(what)?;
                            let same = row.try_get::<String, _>("method").map_err(what)? == r.method
                                && row.try_get::<String, _>("path").map_err(what)? == r.path
                                && row.try_get::<Option<String>, _>("body").map_err(what)?
                                    == r.body;
                            if same {
                                Stored::Duplicate(id)
                            } else {
                                Stored::Conflict(id)
                            }
                        }
                        None => Stored::Full,
                    }
                }
            };
            stored.push(s);
        }
        #[cfg(test)]
        if let (Some(hook), false) = (&w.hook, enqueues.is_empty()) {
            hook.pass().await;
        }
        tx.commit().await.map_err(what)?;
        room.committed(added, removed);
        Ok(stored)
    })
}

/// Whether a record of `size` bytes fits beside `records` records of
/// `bytes` bytes. The figures are this relay's estimate, and on a shared
/// queue they go below zero: it counts off every record it finishes,
/// also those another relay stored after the estimate was read. A negative
/// figure is an empty queue, never (cast to `u64`) a full one.
fn has_room(limits: Limits, records: i64, bytes: i64, size: i64) -> bool {
    let records = u64::try_from(records).unwrap_or(0);
    let bytes = u64::try_from(bytes.saturating_add(size)).unwrap_or(0);
    records < limits.max_records && bytes <= limits.max_bytes
}

/// `s` cut to at most `max` bytes on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
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
            let tx = pool.begin_write().await.unwrap_or_else(|e| {
                panic!("write {n} after a transaction SQLite rolled back: {e}")
            });
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
        let (q, second, held) =
            a_record_stored_behind_a_dead_letter(&pg, "relay_replay_race").await;
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
}
