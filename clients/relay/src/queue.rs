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
//!
//! # Layout
//!
//! - here: the [`Queue`] handle (opening, intake, claims, the figures),
//!   the types it answers with, and what the parts share: the back end
//!   (`Db`, `with_pool!`, `BeginWrite`) and the test hooks.
//! - `connect`: the queue's URL, its pools and first connections, and a
//!   SQLite queue's lock file.
//! - `schema`: the tables and indexes of both back ends, the migrations
//!   that bring a queue to this version, and the check of what `status`
//!   and `dlq` read.
//! - `sql`: the statements that keep a key's records in order by their
//!   due times, and the placeholders of each back end.
//! - `writer`: the group commit: the writer task and its transaction.
//! - `room`: the writer's figures of the queue, and the recounter.
//! - `dead`: dead letters: listed, replayed, dropped and pruned, and the
//!   release of the records they held.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use sqlx::{Connection as _, Row};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::error::RelayError;
use crate::record::{NewRecord, Record};

mod connect;
mod dead;
mod room;
mod schema;
mod sql;
#[cfg(test)]
mod tests;
mod writer;

pub(crate) use connect::lock_queue_file;
pub use connect::sqlite_path;
use connect::{connect_postgres, postgres, postgres_existing, sqlite, sqlite_existing};
use room::{count_open, Recounter, Room};
use schema::{hold_sqlite, migrate_postgres, migrate_sqlite, missing_column, MIGRATION_LOCK_WAIT};
use sql::placeholders;
use writer::{write_loop, Op, Writer, CHANNEL};

/// SQLite connections: the writer, the drain's claims, status reads (the
/// recounter has one more of its own).
const SQLITE_CONNECTIONS: u32 = 4;
/// PostgreSQL connections per relay.
const PG_CONNECTIONS: u32 = 8;

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
// By path too, for the parts below.
use with_pool;

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
            Db::Sqlite(sqlite_existing(path, read_only).await?)
        } else {
            Db::Postgres(postgres_existing(url, read_only).await?)
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

/// Milliseconds since the Unix epoch (wall clock: several relays share the
/// PostgreSQL queue's times).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
