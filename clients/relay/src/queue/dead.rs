//! Dead letters: listed, replayed, dropped and pruned (none that still
//! holds records of its order key back), and the release of the records a
//! settled dead letter held, with the net under it for a settling that
//! did not release them.

use std::time::Duration;

use sqlx::Row;

use super::sql::{HELD_MS, RELEASE_HELD, RELEASE_KEY, STRANDED};
use super::{now_ms, with_pool, BeginWrite, Db, DeadLetter, Queue};
use crate::error::RelayError;

/// Dead letters pruned per transaction at most.
const PRUNE_BATCH: i64 = 500;

impl Queue {
    /// Drops the dead letters that died before `now_ms - keep`, at most
    /// `PRUNE_BATCH` per transaction (the writer waits for one batch, not
    /// for all), and returns how many. A dead letter that still holds
    /// records of its order key back (pending or in flight after it) is
    /// kept whatever its age: dropping it would send them upstream with
    /// nobody having decided to, and they show in [`Depth::blocked`](super::Depth::blocked) until
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
}
