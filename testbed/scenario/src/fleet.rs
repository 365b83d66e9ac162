//! The fleet: the same demand in every mode, seeded.
//!
//! - **Ingestion** (class `batch`, OAuth client `ingest`, one process of 4
//!   workers): pages through a day of analytics history in 1-hour
//!   intervals, 100 conversations a page. A worker fetches page 1 of an
//!   interval to learn `totalHits`, which queues its other pages for every
//!   worker; a new interval is started only when no page is queued and no
//!   page 1 is in flight (so little is half-done when production stops).
//!   Workers send their next request as soon as they may. This is the
//!   naive and local modes' ingestion; the modes through the broker run
//!   gc-ingest instead ([`crate::ingest`]).
//! - **Wallboards** (class `critical`, OAuth clients `wallboard-0..2`): each
//!   polls the queue observations every 10 simulated seconds, phase-offset;
//!   a poll that comes due while the previous one is still retrying is
//!   skipped (and counted).
//! - **Trunks** (class `interactive`, OAuth clients `trunks-a` for 0–9 and
//!   `trunks-b` for 10–19, one process each): Poisson bursts (mean one per
//!   20 simulated seconds) of 1–5 wrap-up writes for fresh conversations
//!   `t{trunk}-{n}`, sent at once.
//!
//! At the end of production nothing new starts (no interval, poll or
//! burst) and the started work drains for at most 3 windows; what is not
//! done by then is lost.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::ModeName;
use crate::confgen::{Plan, DAY, WINDOW_MS};
use crate::error::Error;
use crate::ingest::GcIngest;
use crate::measure::{Class, Family, Records};
use crate::modes::{CallFailed, Caller, Ctx, LocalLimiter, Policy};

/// Ingestion workers.
const WORKERS: usize = 4;
/// Analytics rows per page.
const PAGE_SIZE: u64 = 100;
/// Hours in the day of history.
const INTERVALS: u32 = 24;
/// The day after [`DAY`], where the last interval ends.
const DAY_AFTER: &str = "2026-11-02";
/// Wallboards and their polling period, simulated ms.
pub(crate) const WALLBOARDS: usize = 3;
pub(crate) const POLL_MS: f64 = 10_000.0;
/// Trunks, their mean time between bursts (simulated ms), burst sizes.
const TRUNKS: usize = 20;
const BURST_MEAN_MS: f64 = 20_000.0;
const BURST_WRITES: std::ops::RangeInclusive<u32> = 1..=5;
/// Windows the started work may take to drain after production ends.
const DRAIN_WINDOWS: u64 = 3;
/// Documented per-minute rates the local mode's buckets use.
const LOCAL_ANALYTICS_PER_MIN: f64 = 60.0;
const LOCAL_WRITES_PER_MIN: f64 = 300.0;
/// Local mode's ingestion: a semaphore of the family's concurrency limit
/// (TotalLimit) − 2 analytics queries in flight, leaving room for the
/// wallboards.
const LOCAL_INGEST_SLOTS: usize = crate::confgen::ANALYTICS_MAX_CONCURRENT as usize - 2;

/// The ingestion's query.
pub(crate) const DETAILS_PATH: &str = "/api/v2/analytics/conversations/details/query";
/// The wallboards' query.
pub(crate) const OBSERVATIONS_PATH: &str = "/api/v2/analytics/queues/observations/query";
/// A trunk's write, for conversation `id`.
pub(crate) fn wrapup_path(id: &str) -> String {
    format!("/api/v2/conversations/calls/{id}/participants/p1/communications/c1/wrapup")
}

/// One burst of writes of a trunk.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Burst {
    /// When, simulated ms.
    pub(crate) at_ms: f64,
    /// How many writes.
    pub(crate) writes: u32,
}

/// Every trunk's bursts before `duration_ms`: Poisson arrivals from `seed`.
pub(crate) fn trunk_schedule(seed: u64, duration_ms: u64) -> Vec<Vec<Burst>> {
    (0..TRUNKS)
        .map(|t| {
            let mut rng = fastrand::Rng::with_seed(
                seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add(t as u64 + 1),
            );
            let mut at = 0.0;
            let mut bursts = Vec::new();
            loop {
                // Exponential inter-arrival time; 1 − U is in (0, 1].
                at += -(1.0 - rng.f64()).ln() * BURST_MEAN_MS;
                if at >= duration_ms as f64 {
                    return bursts;
                }
                bursts.push(Burst {
                    at_ms: at,
                    writes: rng.u32(BURST_WRITES),
                });
            }
        })
        .collect()
}

/// What the fleet itself knows at the end.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub(crate) struct FleetOutcome {
    /// Ingestion: expected = Σ totalHits of the intervals started, stored =
    /// distinct conversation ids received.
    pub(crate) ingest: Records,
    /// Intervals whose page 1 was fetched.
    pub(crate) intervals_started: u64,
    /// Pages received.
    pub(crate) pages: u64,
    /// Writes the trunks generated.
    pub(crate) writes_generated: u64,
    /// Writes the upstream accepted (client side).
    pub(crate) writes_acked: u64,
    /// Tasks still running when the drain ended (aborted).
    pub(crate) unfinished_tasks: usize,
    /// Simulated time when the last task ended (or the drain deadline).
    pub(crate) drained_at_ms: f64,
    /// Calls the upstream rejected for good (not 429), a few examples.
    pub(crate) rejected: Vec<String>,
    /// How many such calls.
    pub(crate) rejected_count: u64,
}

/// The ingestion's shared work queue and results.
struct Ingest {
    /// std `Mutex`: held for queue bookkeeping, never across `.await`.
    state: Mutex<IngestState>,
    /// Wakes workers waiting for pages.
    changed: Notify,
}

#[derive(Default)]
struct IngestState {
    next_interval: u32,
    pages: VecDeque<(u32, u64)>,
    discovering: u32,
    expected: u64,
    intervals_started: u64,
    pages_fetched: u64,
    ids: HashSet<String>,
    duplicates: u64,
}

/// What an ingestion worker does next.
#[derive(Debug, PartialEq)]
enum Job {
    /// Fetch (interval, page).
    Page(u32, u64),
    /// A page 1 is in flight: its pages are coming.
    Wait,
    /// Nothing left (production over, or the day done).
    Finished,
}

impl IngestState {
    fn next_job(&mut self, stopping: bool) -> Job {
        if let Some((interval, page)) = self.pages.pop_front() {
            return Job::Page(interval, page);
        }
        if self.discovering > 0 {
            return Job::Wait;
        }
        if stopping || self.next_interval >= INTERVALS {
            return Job::Finished;
        }
        let interval = self.next_interval;
        self.next_interval += 1;
        self.discovering += 1;
        Job::Page(interval, 1)
    }

    /// Takes in one page's answer (`None`: the page could not be fetched).
    fn received(&mut self, interval: u32, page: u64, answer: Option<DetailsPage>) {
        if page == 1 {
            self.discovering = self.discovering.saturating_sub(1);
        }
        let Some(answer) = answer else { return };
        self.pages_fetched += 1;
        if page == 1 {
            self.intervals_started += 1;
            self.expected += answer.total_hits;
            let pages = answer.total_hits.div_ceil(PAGE_SIZE);
            self.pages.extend((2..=pages).map(|p| (interval, p)));
        }
        for c in answer.conversations {
            if !self.ids.insert(c.conversation_id) {
                self.duplicates += 1;
            }
        }
    }
}

/// A page of `POST /api/v2/analytics/conversations/details/query`.
#[derive(Debug, Deserialize)]
struct DetailsPage {
    #[serde(default)]
    conversations: Vec<Conversation>,
    #[serde(rename = "totalHits")]
    total_hits: u64,
}

#[derive(Debug, Deserialize)]
struct Conversation {
    #[serde(rename = "conversationId")]
    conversation_id: String,
}

/// The query body for hour `interval` of the day, page `page`.
fn details_body(interval: u32, page: u64) -> Bytes {
    let start = format!("{DAY}T{interval:02}:00:00.000Z");
    let end = if interval + 1 >= INTERVALS {
        format!("{DAY_AFTER}T00:00:00.000Z")
    } else {
        format!("{DAY}T{:02}:00:00.000Z", interval + 1)
    };
    Bytes::from(format!(
        r#"{{"interval":"{start}/{end}","paging":{{"pageSize":{PAGE_SIZE},"pageNumber":{page}}}}}"#
    ))
}

/// Failures to keep as examples.
const REJECTED_EXAMPLES: usize = 5;

/// Calls rejected for good.
#[derive(Default)]
struct Rejections {
    count: u64,
    examples: Vec<String>,
}

/// What every task of the fleet shares.
struct Shared {
    ingest: Ingest,
    /// std `Mutex`: held to push one line.
    rejected: Mutex<Rejections>,
    /// End of production.
    stop_at: Instant,
    /// End of production, simulated ms.
    stop_ms: f64,
}

impl Shared {
    /// Keeps a rejected call; fatal errors go up.
    fn failed(&self, what: &str, e: CallFailed) -> Result<(), Error> {
        match e {
            CallFailed::Fatal(e) => Err(e),
            CallFailed::Rejected { .. } => {
                tracing::warn!(what, error = %e, "call rejected; its record is lost");
                let mut r = self.rejected.lock().unwrap_or_else(PoisonError::into_inner);
                r.count += 1;
                if r.examples.len() < REJECTED_EXAMPLES {
                    r.examples.push(format!("{what}: {e}"));
                }
                Ok(())
            }
        }
    }
}

/// Builds a caller for one client process.
struct Processes {
    ctx: Arc<Ctx>,
    mode: ModeName,
    broker_url: Option<String>,
    /// "broker + relay" mode: where the trunks post their writes.
    relay: Option<crate::relay::RelayIntake>,
}

impl Processes {
    /// A new process's policy: local buckets at `per_minute`, with `slots`.
    fn policy(&self, per_minute: f64, slots: Option<usize>) -> Result<Policy, Error> {
        Ok(match self.mode {
            ModeName::Naive => Policy::Naive,
            ModeName::Local => Policy::Local(Arc::new(LocalLimiter::new(
                per_minute,
                slots,
                self.ctx.clock.now_ms(),
            ))),
            ModeName::Broker | ModeName::Relay => {
                let url = self.broker_url.as_deref().ok_or_else(|| {
                    Error::BrokerServer("broker mode without a broker address".into())
                })?;
                Policy::Broker(quota_broker_client::BrokerClient::with_fallback(
                    url,
                    None,
                    crate::modes::fallback_settings(self.ctx.clock.scale()),
                )?)
            }
        })
    }

    fn caller(&self, policy: &Policy, client_id: String, oauth: &str, class: Class) -> Caller {
        Caller {
            ctx: self.ctx.clone(),
            policy: policy.clone(),
            client_id,
            oauth_client: oauth.to_owned(),
            class,
        }
    }
}

/// Runs the fleet in `mode` until production ends at the plan's duration
/// and the started work drains.
pub(crate) async fn run(
    mode: ModeName,
    ctx: Arc<Ctx>,
    plan: &Plan,
    seed: u64,
    broker_url: Option<String>,
    relay: Option<crate::relay::RelayIntake>,
    gc_ingest: Option<Arc<GcIngest>>,
) -> Result<FleetOutcome, Error> {
    let clock = ctx.clock;
    let stop_ms = plan.duration_ms as f64;
    let shared = Arc::new(Shared {
        ingest: Ingest {
            state: Mutex::new(IngestState::default()),
            changed: Notify::new(),
        },
        rejected: Mutex::new(Rejections::default()),
        stop_at: clock.instant_of(stop_ms),
        stop_ms,
    });
    let procs = Processes {
        ctx: ctx.clone(),
        mode,
        broker_url,
        relay,
    };
    let mut tasks: JoinSet<Result<(), Error>> = JoinSet::new();

    // The broker modes' ingestion is gc-ingest (crate::ingest).
    if let Some(gc) = &gc_ingest {
        gc.spawn(&mut tasks, &ctx, shared.stop_at);
    } else {
        let ingest = procs.policy(LOCAL_ANALYTICS_PER_MIN, Some(LOCAL_INGEST_SLOTS))?;
        for w in 0..WORKERS {
            let caller = procs.caller(&ingest, format!("ingest-w{w}"), "ingest", Class::Batch);
            tasks.spawn(ingest_worker(caller, shared.clone()));
        }
    }
    for b in 0..WALLBOARDS {
        let policy = procs.policy(LOCAL_ANALYTICS_PER_MIN, None)?;
        let name = format!("wallboard-{b}");
        let caller = procs.caller(&policy, name.clone(), &name, Class::Critical);
        let phase = POLL_MS * b as f64 / WALLBOARDS as f64;
        tasks.spawn(wallboard(caller, shared.clone(), phase));
    }
    let schedule = trunk_schedule(seed, plan.duration_ms);
    let writes_generated = schedule.iter().flatten().map(|b| u64::from(b.writes)).sum();
    for (t, bursts) in schedule.into_iter().enumerate() {
        let policy = match &procs.relay {
            Some(relay) => Policy::Relay(relay.clone()),
            None => procs.policy(LOCAL_WRITES_PER_MIN, None)?,
        };
        let oauth = if t < TRUNKS / 2 {
            "trunks-a"
        } else {
            "trunks-b"
        };
        let caller = procs.caller(&policy, format!("trunk-{t}"), oauth, Class::Interactive);
        tasks.spawn(trunk(caller, shared.clone(), t, bursts));
    }

    let deadline_ms = stop_ms + (DRAIN_WINDOWS * WINDOW_MS) as f64;
    let deadline = clock.instant_of(deadline_ms);
    let mut unfinished_tasks = 0;
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(done)) => done??,
            Ok(None) => break,
            Err(_) => {
                unfinished_tasks = tasks.len();
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
        }
    }
    let drained_at_ms = clock.now_ms().min(deadline_ms);
    let gc = match &gc_ingest {
        Some(gc) => Some(gc.finish(&ctx).await?),
        None => None,
    };

    let state = shared
        .ingest
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let rejected = shared
        .rejected
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let (ingest, intervals_started, pages) = match gc {
        Some(gc) => (gc.records, gc.blocks_started, gc.pages),
        None => (
            Records::new(state.expected, state.ids.len() as u64, state.duplicates),
            state.intervals_started,
            state.pages_fetched,
        ),
    };
    Ok(FleetOutcome {
        ingest,
        intervals_started,
        pages,
        writes_generated,
        writes_acked: ctx.metrics.writes_acked.load(Ordering::Relaxed),
        unfinished_tasks,
        drained_at_ms,
        rejected: rejected.examples.clone(),
        rejected_count: rejected.count,
    })
}

/// One ingestion worker.
async fn ingest_worker(caller: Caller, shared: Arc<Shared>) -> Result<(), Error> {
    let ingest = &shared.ingest;
    loop {
        let notified = ingest.changed.notified();
        tokio::pin!(notified);
        // Registered before looking at the queue, so no wake-up is missed.
        notified.as_mut().enable();
        let job = ingest
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_job(Instant::now() >= shared.stop_at);
        let (interval, page) = match job {
            Job::Page(interval, page) => (interval, page),
            Job::Wait => {
                notified.await;
                continue;
            }
            Job::Finished => return Ok(()),
        };
        let wanted = Instant::now();
        let body = details_body(interval, page);
        let answer = match caller
            .call(Family::Analytics, DETAILS_PATH, body, wanted)
            .await
        {
            Ok(answer) => match serde_json::from_slice::<DetailsPage>(&answer.body) {
                Ok(page) => Some(page),
                Err(e) => {
                    let what = format!("interval {interval} page {page}");
                    shared.failed(
                        &what,
                        CallFailed::Rejected {
                            status: answer.status,
                            body: format!("undecodable page: {e}"),
                        },
                    )?;
                    None
                }
            },
            Err(e) => {
                shared.failed(&format!("interval {interval} page {page}"), e)?;
                None
            }
        };
        ingest
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .received(interval, page, answer);
        ingest.changed.notify_waiters();
    }
}

/// One wallboard: a poll every [`POLL_MS`] from `phase_ms` until production ends.
async fn wallboard(caller: Caller, shared: Arc<Shared>, phase_ms: f64) -> Result<(), Error> {
    let clock = caller.ctx.clock;
    let metrics = caller.ctx.metrics.clone();
    let body = Bytes::from_static(
        br#"{"filter":{"type":"or","predicates":[]},"metrics":["oWaiting","oInteracting"]}"#,
    );
    // The first tick at or after now.
    let mut k = ((clock.now_ms() - phase_ms) / POLL_MS).ceil().max(0.0);
    let due = ((shared.stop_ms - phase_ms) / POLL_MS).ceil() - k;
    metrics
        .polls_due
        .fetch_add(due.max(0.0) as u64, Ordering::Relaxed);
    loop {
        let tick = phase_ms + k * POLL_MS;
        if tick >= shared.stop_ms {
            return Ok(());
        }
        clock.sleep_until(tick).await;
        // Measured from the wake-up, so the timer's own lateness (up to a
        // real millisecond, i.e. `scale` simulated ms) is not counted.
        let wanted = Instant::now();
        match caller
            .call(Family::Analytics, OBSERVATIONS_PATH, body.clone(), wanted)
            .await
        {
            Ok(_) => {
                metrics.polls.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => shared.failed(&format!("{} poll", caller.client_id), e)?,
        }
        // The next tick still ahead; the ones passed meanwhile are skipped.
        k = ((clock.now_ms() - phase_ms) / POLL_MS).ceil().max(k + 1.0);
    }
}

/// One trunk: its bursts, each write sent at once and retried until stored.
async fn trunk(
    caller: Caller,
    shared: Arc<Shared>,
    trunk: usize,
    bursts: Vec<Burst>,
) -> Result<(), Error> {
    let clock = caller.ctx.clock;
    let mut writes: JoinSet<Result<(), Error>> = JoinSet::new();
    let mut n = 0u64;
    for burst in bursts {
        clock.sleep_until(burst.at_ms).await;
        let wanted = Instant::now();
        for _ in 0..burst.writes {
            let id = format!("t{trunk}-{n}");
            n += 1;
            let (caller, shared) = (caller.clone(), shared.clone());
            writes.spawn(async move {
                let path = wrapup_path(&id);
                let body = Bytes::from_static(br#"{"code":"resolved","notes":"scenario"}"#);
                match caller.call(Family::Writes, &path, body, wanted).await {
                    Ok(_) => {
                        caller
                            .ctx
                            .metrics
                            .writes_acked
                            .fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    Err(e) => shared.failed(&format!("write {id}"), e),
                }
            });
        }
        // Reap the finished ones as we go.
        while let Some(done) = writes.try_join_next() {
            done??;
        }
    }
    while let Some(done) = writes.join_next().await {
        done??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_seeded_and_poisson_ish() {
        let a = trunk_schedule(7, 300_000);
        assert_eq!(a, trunk_schedule(7, 300_000));
        assert_ne!(a, trunk_schedule(8, 300_000));
        assert_eq!(a.len(), TRUNKS);
        let bursts: usize = a.iter().map(Vec::len).sum();
        // 20 trunks × 300 s / 20 s = 300 bursts expected.
        assert!((200..400).contains(&bursts), "{bursts}");
        assert!(a
            .iter()
            .flatten()
            .all(|b| b.at_ms < 300_000.0 && BURST_WRITES.contains(&b.writes)));
    }

    #[test]
    fn intervals_are_discovered_one_at_a_time_and_drain() {
        let mut s = IngestState::default();
        assert_eq!(s.next_job(false), Job::Page(0, 1));
        assert_eq!(s.next_job(false), Job::Wait);
        let page = |n: u64, ids: &[&str]| DetailsPage {
            total_hits: n,
            conversations: ids
                .iter()
                .map(|id| Conversation {
                    conversation_id: (*id).into(),
                })
                .collect(),
        };
        s.received(0, 1, Some(page(250, &["a", "b"])));
        assert_eq!(s.expected, 250);
        assert_eq!(s.next_job(true), Job::Page(0, 2));
        s.received(0, 2, Some(page(250, &["b", "c"])));
        assert_eq!(s.duplicates, 1);
        assert_eq!(s.next_job(true), Job::Page(0, 3));
        // Production over and nothing queued: done.
        assert_eq!(s.next_job(true), Job::Finished);
        assert_eq!(s.next_job(false), Job::Page(1, 1));
        assert_eq!(s.ids.len(), 3);
    }

    #[test]
    fn last_interval_ends_next_day() {
        let body = String::from_utf8(details_body(23, 2).to_vec()).unwrap();
        assert!(body.contains("2026-11-01T23:00:00.000Z/2026-11-02T00:00:00.000Z"));
        assert!(body.contains(r#""pageNumber":2"#));
        let body = String::from_utf8(details_body(0, 1).to_vec()).unwrap();
        assert!(body.contains("2026-11-01T00:00:00.000Z/2026-11-01T01:00:00.000Z"));
    }
}
