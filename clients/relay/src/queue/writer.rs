//! The group commit: one writer task takes intake's records and the
//! drain's outcomes, commits whatever has gathered in one transaction (the
//! outcomes, then the records as far as the limits allow, each held
//! behind a dead letter of its key or due after the key's last), and
//! answers every caller only once that transaction is committed.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sqlx::postgres::{PgConnection, PgPool};
use sqlx::sqlite::{SqliteConnection, SqlitePool};
use sqlx::Row;
use tokio::sync::{mpsc, oneshot, Notify};

use super::room::{Figures, Room, RECOUNT_EVERY};
use super::sql::{placeholders, DEAD_OF_KEY, DELAY_BEHIND, HELD_MS, HOLD_BEHIND, LAST_DUE};
#[cfg(test)]
use super::Hook;
use super::{now_ms, with_pool, BeginWrite, Db, Limits, Outcome, Stored};
use crate::error::RelayError;
use crate::record::NewRecord;

/// Operations the writer gathers per transaction at most.
const BATCH_MAX: usize = 512;
/// Operations waiting for the writer at most (then callers wait).
pub(super) const CHANNEL: usize = 4096;

/// Bytes of an upstream answer kept in a dead letter.
const DEAD_ANSWER_MAX: usize = 4096;

/// Intake's part in keeping a dead letter that holds records back: see
/// [`Queue::prune_dead_letters`](super::Queue::prune_dead_letters).
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
pub(super) enum Op {
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

/// What the writer task works with.
pub(super) struct Writer {
    pub(super) db: Db,
    pub(super) limits: Limits,
    pub(super) room: Room,
    pub(super) recount: Arc<Notify>,
    pub(super) failing: Arc<AtomicBool>,
    #[cfg(test)]
    pub(super) hook: Option<Hook>,
}

/// The writer: gathers what is waiting (up to [`BATCH_MAX`]), commits it in
/// one transaction, then answers every caller. Drops `_stop` (stopping the
/// recounter) when every handle is gone.
pub(super) async fn write_loop(w: Writer, mut ops: mpsc::Receiver<Op>, _stop: oneshot::Sender<()>) {
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
pub(super) fn has_room(limits: Limits, records: i64, bytes: i64, size: i64) -> bool {
    let records = u64::try_from(records).unwrap_or(0);
    let bytes = u64::try_from(bytes.saturating_add(size)).unwrap_or(0);
    records < limits.max_records && bytes <= limits.max_bytes
}

/// `s` cut to at most `max` bytes on a character boundary.
pub(super) fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
