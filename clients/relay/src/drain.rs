//! The drain: claims due records from the queue and sends each upstream
//! through [`gc_upstream::Upstream`] (every attempt leased from the broker
//! as class `interactive` and reported back), at most `concurrency` at a
//! time, then records the outcome: delivered; pending again after the
//! upstream's or the broker's wait (429, 5xx, transport, no lease); or dead
//! (any other 4xx than 408 and 429, with the upstream's answer). It also gives back the
//! records of relays whose claims expired and prunes old delivered ones
//! and old dead letters.

use std::sync::Arc;
use std::time::Duration;

use gc_upstream::{Request, RetryPolicy, Upstream, UpstreamError};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::queue::{now_ms, Outcome, Queue};
use crate::record::Record;

/// How often claims that expired are given back, and the wait between
/// claims when nothing is due (records retried later become due by time,
/// not by a wake-up).
const TICK: Duration = Duration::from_millis(100);
/// How often delivered records past their keeping time are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Pause after a queue error before claiming again.
const ERROR_PAUSE: Duration = Duration::from_secs(1);
/// Longest wait before a record is retried after a 5xx or transport error.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The wait after a 429 without Retry-After.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long in-flight deliveries may finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How the drain works.
#[derive(Clone, Debug)]
pub struct DrainSettings {
    /// Records being delivered at once.
    pub concurrency: usize,
    /// How long a claim holds a record; a relay that dies gives its records
    /// back after this. Deliveries that take longer are abandoned (and the
    /// record retried) at 80% of it.
    pub claim: Duration,
    /// Leased attempts per claim before the record goes back to the queue.
    pub attempts: u32,
    /// How long delivered records are kept (a repeated key within it is
    /// still recognised).
    pub keep_done: Duration,
    /// How long dead letters are kept (those holding later records of
    /// their order key back are kept until replayed or dropped).
    pub keep_dead: Duration,
}

impl Default for DrainSettings {
    fn default() -> DrainSettings {
        DrainSettings {
            concurrency: 16,
            claim: Duration::from_secs(60),
            attempts: 3,
            keep_done: Duration::from_secs(24 * 3600),
            keep_dead: Duration::from_secs(14 * 24 * 3600),
        }
    }
}

/// What the drain shares with its deliveries.
#[derive(Clone)]
pub(crate) struct Drain {
    pub(crate) queue: Queue,
    pub(crate) upstream: Upstream,
    pub(crate) metrics: Metrics,
    pub(crate) settings: DrainSettings,
    /// This relay's name on its claims.
    pub(crate) owner: String,
    /// Intake's "a record arrived".
    pub(crate) wake: Arc<Notify>,
}

impl Drain {
    /// Runs until `stop` turns true, then lets deliveries finish for
    /// [`SHUTDOWN_GRACE`] (the rest are sent again: at the next start with
    /// a SQLite queue, once their claims expire with PostgreSQL).
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(self.settings.concurrency.max(1)));
        let mut deliveries = JoinSet::new();
        let mut last_reclaim = Instant::now();
        let mut last_prune = Instant::now();
        let mut logins = self.upstream.stats().logins;
        self.maintain(true).await;
        loop {
            while deliveries.try_join_next().is_some() {}
            if last_reclaim.elapsed() >= TICK {
                last_reclaim = Instant::now();
                self.note_logins(&mut logins);
                let prune = last_prune.elapsed() >= PRUNE_EVERY;
                if prune {
                    last_prune = Instant::now();
                }
                self.maintain(prune).await;
            }
            let first = tokio::select! {
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
                _ = stop.wait_for(|s| *s) => break,
            };
            let n = 1 + slots.available_permits();
            let records = match self.queue.claim(&self.owner, n, self.settings.claim).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming records failed; retrying");
                    drop(first);
                    tokio::select! {
                        _ = tokio::time::sleep(ERROR_PAUSE) => continue,
                        _ = stop.wait_for(|s| *s) => break,
                    }
                }
            };
            if records.is_empty() {
                drop(first);
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(TICK) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                continue;
            }
            let mut first = Some(first);
            for record in records {
                // `n` was free a moment ago and only this loop takes slots.
                let slot = match first.take() {
                    Some(s) => s,
                    None => match slots.clone().acquire_owned().await {
                        Ok(s) => s,
                        Err(_) => break,
                    },
                };
                let drain = self.clone();
                deliveries.spawn(async move {
                    drain.deliver(record).await;
                    drop(slot);
                });
            }
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, async {
            while deliveries.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!(
                left = deliveries.len(),
                "deliveries still running at shutdown; their records are sent again: at the next \
                 start with a SQLite queue, once their claims expire with PostgreSQL"
            );
            deliveries.abort_all();
        }
    }

    /// Says when the upstream client logged in again since `seen` logins:
    /// its token was due to expire, or the upstream refused it with a 401
    /// (it restarted, or revoked it) and the call was made again with the
    /// new one. That 401 is no client error, and without this line nothing
    /// would say it happened.
    fn note_logins(&self, seen: &mut u64) {
        let now = self.upstream.stats().logins;
        if now > *seen {
            if *seen > 0 {
                tracing::info!(
                    logins = now,
                    "logged in to the upstream again (the access token was due to expire, or \
                     the upstream answered 401 to it and the call was made again)"
                );
            }
            *seen = now;
        }
    }

    /// Gives back expired claims (`prune`: and deletes old delivered
    /// records and dead letters, and releases records held with nothing
    /// ahead).
    async fn maintain(&self, prune: bool) {
        match self.queue.reclaim().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(records = n, "records of expired claims are pending again"),
            Err(e) => tracing::warn!(error = %e, "giving back expired claims failed"),
        }
        if prune {
            if let Err(e) = self.queue.prune(self.settings.keep_done).await {
                tracing::warn!(error = %e, "pruning delivered records failed");
            }
            match self
                .queue
                .prune_dead_letters(self.settings.keep_dead, now_ms())
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(records = n, "dead letters past their keeping time dropped")
                }
                Err(e) => tracing::warn!(error = %e, "pruning dead letters failed"),
            }
            match self.queue.release_stranded().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    records = n,
                    "records held behind a dead letter that was no longer there are due again \
                     (its replay or drop raced an intake, or was made by an earlier version)"
                ),
                Err(e) => tracing::warn!(error = %e, "releasing held records failed"),
            }
        }
    }

    /// One record upstream, and its outcome into the queue.
    async fn deliver(&self, record: Record) {
        let outcome = match tokio::time::timeout(
            self.settings.claim.mul_f64(0.8),
            self.send(&record),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::warn!(
                    id = record.id,
                    "delivery outlived its claim (waiting for a lease, or for the upstream); \
                     retrying the record after a backoff"
                );
                // Not at once: a slow upstream that does take the write
                // would get it again every claim.
                Outcome::Retry {
                    at_ms: now_ms() + backoff(record.attempts).as_millis() as i64,
                }
            }
        };
        let label = match &outcome {
            Outcome::Done => "delivered",
            Outcome::Retry { .. } => "retried",
            Outcome::Dead { status, .. } => {
                tracing::warn!(
                    id = record.id,
                    method = %record.method,
                    path = %record.path.chars().take(200).collect::<String>(),
                    status,
                    "the upstream refused the record for good: it is a dead letter, and later \
                     records of its order wait behind it until it is replayed or dropped \
                     (gc-relay dlq list, then dlq replay ID or dlq drop ID)"
                );
                "dead"
            }
        };
        match self
            .queue
            .finish(record.id, record.attempts, &self.owner, outcome)
            .await
        {
            Ok(()) => self.metrics.drained(label),
            // Its claim expires and it is delivered again (the upstream
            // write is idempotent by the record's key).
            Err(e) => tracing::error!(id = record.id, error = %e, "recording an outcome failed"),
        }
    }

    async fn send(&self, record: &Record) -> Outcome {
        let request = match request(record) {
            Ok(r) => r,
            Err(why) => {
                return Outcome::Dead {
                    status: 0,
                    answer: why.into(),
                }
            }
        };
        let policy = RetryPolicy {
            max_attempts: self.settings.attempts.max(1),
        };
        let answer = self.upstream.send_retrying(&request, &policy).await;
        if let Ok(r) = &answer {
            if (400..500).contains(&r.status) && r.status != 429 {
                self.metrics.client_4xx.inc();
            }
        }
        match answer {
            Ok(r) if (200..300).contains(&r.status) => Outcome::Done,
            Ok(r) if r.is_retryable() => {
                let wait = retry_wait(r.status, r.retry_after(), record.attempts);
                if r.status != 429 {
                    tracing::warn!(
                        id = record.id,
                        status = r.status,
                        retry_in_ms = wait.as_millis() as u64,
                        "the upstream failed the record; it is retried"
                    );
                }
                Outcome::Retry {
                    at_ms: now_ms() + wait.as_millis() as i64,
                }
            }
            Ok(r) => Outcome::Dead {
                status: r.status,
                answer: r.text(),
            },
            Err(e @ UpstreamError::Invalid { .. }) => Outcome::Dead {
                status: 0,
                answer: e.to_string(),
            },
            Err(e) => {
                tracing::warn!(id = record.id, error = %e, "upstream call failed; the record is retried");
                Outcome::Retry {
                    at_ms: now_ms() + backoff(record.attempts).as_millis() as i64,
                }
            }
        }
    }
}

/// The upstream request of `record`.
fn request(record: &Record) -> Result<Request, &'static str> {
    let method = http::Method::from_bytes(record.method.as_bytes())
        .map_err(|_| "the stored method is not an HTTP method")?;
    let body = match &record.body {
        Some(text) => Some(serde_json::from_str(text).map_err(|_| "the stored body is not JSON")?),
        None => None,
    };
    Ok(Request {
        method,
        path: record.path.clone(),
        body,
    })
}

/// 1 s, 2 s, 4 s, ... up to [`MAX_BACKOFF`], by attempts so far.
/// How long a record waits after a retryable answer (a 429 or a 5xx): the
/// upstream's `Retry-After` when it sent one (at most [`MAX_BACKOFF`]),
/// else a default for a 429 and the backoff for a 5xx.
fn retry_wait(status: u16, retry_after: Option<Duration>, attempts: i64) -> Duration {
    match retry_after {
        Some(w) => w.min(MAX_BACKOFF),
        None if status == 429 => DEFAULT_RETRY_AFTER,
        None => backoff(attempts),
    }
}

fn backoff(attempts: i64) -> Duration {
    let exp = attempts.saturating_sub(1).clamp(0, 16) as u32;
    Duration::from_secs(1)
        .saturating_mul(1 << exp)
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_minute() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn a_retry_after_is_followed_on_a_5xx_too() {
        let s = Duration::from_secs;
        assert_eq!(retry_wait(503, Some(s(20)), 1), s(20));
        assert_eq!(retry_wait(429, Some(s(7)), 1), s(7));
        assert_eq!(retry_wait(503, Some(s(3_600)), 1), MAX_BACKOFF);
        assert_eq!(retry_wait(503, None, 3), backoff(3));
        assert_eq!(retry_wait(429, None, 3), DEFAULT_RETRY_AFTER);
    }
}
