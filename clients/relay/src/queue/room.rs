//! The writer's figures of the queue (records pending or in flight, and
//! their bytes) for its room check, and the recounter task that counts
//! them in the database while the writer's own commits move them in
//! between.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::Row;
use tokio::sync::{oneshot, Notify};

use super::sql::placeholders;
#[cfg(test)]
use super::Hook;
use super::{with_pool, Db};
use crate::error::RelayError;

/// How often the recounter counts the queue while records arrive.
pub(super) const RECOUNT_EVERY: Duration = Duration::from_secs(1);

/// The records pending or in flight, and their bytes, as the writer's room
/// check sees them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Figures {
    pub(super) records: i64,
    pub(super) bytes: i64,
}

/// The writer's [`Figures`] of the queue: recounted from the database by
/// the recounter (other relays on a shared queue and replays change it
/// too), moved by the writer's own commits in between. See [`Limits`](super::Limits) for
/// the bound this keeps.
#[derive(Clone)]
pub(super) struct Room(Arc<Mutex<RoomState>>);

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
    pub(super) fn new() -> Room {
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
    pub(super) fn for_intake(&self, every: Duration) -> (Figures, bool) {
        let mut s = self.state();
        s.intake = true;
        (s.now, s.recounted_at.elapsed() > every)
    }

    /// Whether records came since the last recount.
    fn had_intake(&self) -> bool {
        self.state().intake
    }

    /// A commit of the writer stored `added` and removed `removed`.
    pub(super) fn committed(&self, added: Figures, removed: Figures) {
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
    pub(super) fn recounted(&self, records: i64, bytes: i64) {
        let mut s = self.state();
        s.now = Figures {
            records: records + s.added.records,
            bytes: bytes + s.added.bytes,
        };
    }
}

/// The records pending or in flight and their bytes, counted in the
/// database.
pub(super) async fn count_open(db: &Db) -> Result<(i64, i64), RelayError> {
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
pub(super) struct Recounter {
    pub(super) every: Duration,
    /// Tests: told when a recount has counted, then holds it until released.
    #[cfg(test)]
    pub(super) hook: Option<Hook>,
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
    pub(super) async fn run(
        self,
        db: Db,
        room: Room,
        now: Arc<Notify>,
        mut stop: oneshot::Receiver<()>,
    ) {
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
