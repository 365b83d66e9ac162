//! How one simulated client process makes an upstream call in each mode,
//! retrying until it succeeds (nothing is dropped):
//!
//! - **naive**: send; on a 429 sleep the `Retry-After` (1 simulated second
//!   when absent) and send again.
//! - **local**: a token bucket per client process at the documented rate
//!   (capacity one minute's permits), a semaphore of `TotalLimit − 2` (the
//!   analytics family's concurrency limit, less 2 left to the wallboards)
//!   for the ingestion's analytics queries, a 429's `Retry-After` pauses
//!   the process's bucket, and the adaptive rule: when
//!   more than 1% of the process's calls over the last 60 simulated seconds
//!   were refused, its refill rate is cut by 20% for an hour (checked once
//!   per 60 s; cuts stack, each expires after its hour).
//! - **broker**: `Acquire` a lease (class, OAuth client), send, `Report`
//!   the answer (status and headers), `Release`; a refused Acquire is asked
//!   again after its `retry_after` (at most the class's wait); a 429 is
//!   reported and the call goes back to `Acquire` (the broker's freeze is
//!   the wait). While the broker is unreachable the client crate hands out
//!   leases from its local fallback limiter (its settings scaled like
//!   every duration, [`fallback_settings`]); requests sent on them are
//!   counted and timed for the chaos figures.
//!
//! The wait a call measures runs from when the client wanted to make it to
//! when the request that succeeded was sent.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use quota_broker_client::{says_concurrency, BrokerClient, Call, ClientError, FallbackSettings};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::clock::SimClock;
use crate::confgen::ORG;
use crate::error::Error;
use crate::measure::{BrokerGrant, Class, FallbackCall, Family, Metrics};
use crate::upstream::{Answer, Upstream};

/// Pause before resending after a transport error or a 5xx, simulated ms.
const ERROR_PAUSE_MS: f64 = 1_000.0;
/// Naive clients' sleep on a 429 without Retry-After, simulated ms.
const DEFAULT_RETRY_AFTER_MS: f64 = 1_000.0;
/// Local mode's adaptive rule: when more than `RATIO_THRESHOLD` of a
/// process's calls over `RATIO_WINDOW_MS` were refused, its refill rate is
/// multiplied by `RATE_CUT` for `CUT_HOLD_MS` (all simulated ms).
const RATIO_WINDOW_MS: f64 = 60_000.0;
const RATIO_THRESHOLD: f64 = 0.01;
const RATE_CUT: f64 = 0.8;
const CUT_HOLD_MS: f64 = 3_600_000.0;

/// What every caller of a mode shares.
pub(crate) struct Ctx {
    /// The simulator.
    pub(crate) upstream: Upstream,
    /// Its time line.
    pub(crate) clock: SimClock,
    /// Counters and waits.
    pub(crate) metrics: Arc<Metrics>,
}

/// A call that cannot succeed by retrying it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallFailed {
    /// The upstream answered a status that retrying cannot change (a 4xx
    /// other than 429): the record is lost.
    #[error("upstream answered {status}: {body}")]
    Rejected {
        /// The status.
        status: u16,
        /// The body, for the log.
        body: String,
    },
    /// The broker answered with an error (not a "not now").
    #[error(transparent)]
    Fatal(#[from] Error),
}

/// A client process's rate-limiting policy (cheap to clone; the clones of
/// one process share its state).
#[derive(Clone)]
pub(crate) enum Policy {
    /// Nothing but Retry-After.
    Naive,
    /// A local token bucket per process, cut by the adaptive rule.
    Local(Arc<LocalLimiter>),
    /// Leases from the broker.
    Broker(BrokerClient),
    /// Writes posted to gc-relay ("broker + relay" mode's trunks).
    Relay(crate::relay::RelayIntake),
}

/// One caller: a client process (its policy), one of its instances, an
/// OAuth client and a class.
#[derive(Clone)]
pub(crate) struct Caller {
    /// Shared by every caller of the mode.
    pub(crate) ctx: Arc<Ctx>,
    /// The process's policy.
    pub(crate) policy: Policy,
    /// Instance name (the broker's `client_id`).
    pub(crate) client_id: String,
    /// OAuth client (the upstream's token).
    pub(crate) oauth_client: String,
    /// Priority class.
    pub(crate) class: Class,
}

/// A call in progress: dropped unanswered (its task aborted at the drain
/// deadline), its wait until then is recorded as unserved, so a caller the
/// upstream locked out counts with a long wait, not as none.
struct Unserved<'a> {
    caller: &'a Caller,
    wanted: Instant,
    answered: bool,
}

impl Drop for Unserved<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let clock = self.caller.ctx.clock;
        let waited = clock.sim_ms(self.wanted.elapsed());
        self.caller.ctx.metrics.record_unserved(
            self.caller.class,
            clock.sim_ms_at(self.wanted),
            waited,
        );
    }
}

/// What one answer means for the caller.
enum Outcome {
    /// Served: the call is done.
    Done(Answer),
    /// 429: wait (this long, if the upstream said) and send again.
    Throttled(Option<Duration>),
    /// Transport error or 5xx: pause and send again.
    Retry,
    /// Retrying cannot help.
    Rejected(CallFailed),
}

fn outcome(answer: Result<Answer, crate::upstream::CallError>) -> Outcome {
    match answer {
        Ok(a) if (200..300).contains(&a.status) => Outcome::Done(a),
        Ok(a) if a.status == 429 => Outcome::Throttled(a.retry_after()),
        Ok(a) if a.status >= 500 => Outcome::Retry,
        Ok(a) => Outcome::Rejected(CallFailed::Rejected {
            status: a.status,
            body: String::from_utf8_lossy(&a.body).into_owned(),
        }),
        Err(_) => Outcome::Retry,
    }
}

impl Caller {
    /// Makes `POST path` until it is served; `wanted` is when the client
    /// wanted to make it.
    pub(crate) async fn call(
        &self,
        family: Family,
        path: &str,
        body: Bytes,
        wanted: Instant,
    ) -> Result<Answer, CallFailed> {
        let mut pending = Unserved {
            caller: self,
            wanted,
            answered: false,
        };
        let answer = match &self.policy {
            Policy::Naive => self.call_naive(family, path, body, wanted).await,
            Policy::Local(limiter) => self.call_local(limiter, family, path, body, wanted).await,
            Policy::Broker(client) => self.call_broker(client, family, path, body, wanted).await,
            Policy::Relay(relay) => self.call_relay(relay, path, body, wanted).await,
        };
        pending.answered = true;
        answer
    }

    /// One upstream request, counted.
    async fn send(
        &self,
        family: Family,
        path: &str,
        body: &Bytes,
    ) -> Result<Answer, crate::upstream::CallError> {
        let counters = self.ctx.metrics.family(family);
        counters.sent.fetch_add(1, Ordering::Relaxed);
        let answer = self
            .ctx
            .upstream
            .post(ORG, &self.oauth_client, path, body.clone())
            .await;
        match &answer {
            Ok(a) if a.status == 429 => {
                counters.refused.fetch_add(1, Ordering::Relaxed);
            }
            Ok(a) if (200..300).contains(&a.status) => {}
            Ok(a) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path, status = a.status, "upstream error");
            }
            Err(e) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(path, error = %e, "upstream unreachable");
            }
        }
        answer
    }

    /// Records the wait of a served call sent at `sent`.
    pub(crate) fn done_at(&self, wanted: Instant, sent: Instant) {
        let clock = self.ctx.clock;
        let waited = clock.sim_ms(sent.saturating_duration_since(wanted));
        self.ctx
            .metrics
            .record_wait(self.class, clock.sim_ms_at(wanted), waited);
    }

    async fn pause(&self, sim_ms: f64) {
        tokio::time::sleep(self.ctx.clock.real(sim_ms)).await;
    }

    async fn call_naive(
        &self,
        family: Family,
        path: &str,
        body: Bytes,
        wanted: Instant,
    ) -> Result<Answer, CallFailed> {
        loop {
            let sent = Instant::now();
            match outcome(self.send(family, path, &body).await) {
                Outcome::Done(answer) => {
                    self.done_at(wanted, sent);
                    return Ok(answer);
                }
                Outcome::Throttled(Some(ra)) => tokio::time::sleep(ra).await,
                Outcome::Throttled(None) => self.pause(DEFAULT_RETRY_AFTER_MS).await,
                Outcome::Retry => self.pause(ERROR_PAUSE_MS).await,
                Outcome::Rejected(e) => return Err(e),
            }
        }
    }

    async fn call_local(
        &self,
        limiter: &LocalLimiter,
        family: Family,
        path: &str,
        body: Bytes,
        wanted: Instant,
    ) -> Result<Answer, CallFailed> {
        let clock = self.ctx.clock;
        loop {
            limiter.take(&clock).await;
            let slot = match &limiter.slots {
                // The semaphore is never closed.
                Some(s) => s.acquire().await.ok(),
                None => None,
            };
            let sent = Instant::now();
            let o = outcome(self.send(family, path, &body).await);
            drop(slot);
            let ra = match &o {
                Outcome::Throttled(ra) => Some(ra.map(|d| clock.sim_ms(d))),
                _ => None,
            };
            if limiter.observe(clock.now_ms(), ra) {
                self.ctx.metrics.rate_cuts.fetch_add(1, Ordering::Relaxed);
            }
            match o {
                Outcome::Done(answer) => {
                    self.done_at(wanted, sent);
                    return Ok(answer);
                }
                // The pause is in the bucket now: the next take() waits it out.
                Outcome::Throttled(_) => {}
                Outcome::Retry => self.pause(ERROR_PAUSE_MS).await,
                Outcome::Rejected(e) => return Err(e),
            }
        }
    }

    async fn call_broker(
        &self,
        client: &BrokerClient,
        family: Family,
        path: &str,
        body: Bytes,
        wanted: Instant,
    ) -> Result<Answer, CallFailed> {
        let metrics = &self.ctx.metrics;
        let call = Call::new(ORG, "POST", path)
            .client_id(self.client_id.clone())
            .oauth_client(self.oauth_client.clone())
            .class(self.class.as_str());
        let retry_cap = self.ctx.clock.real(class_wait_ms(self.class));
        let clock = self.ctx.clock;
        let mut steps = Steps::new(self.class);
        loop {
            let asked = Instant::now();
            let lease = match client.acquire(&call).await {
                Ok(lease) => lease,
                Err(ClientError::NotGranted {
                    retry_after,
                    reason,
                }) => {
                    metrics.not_granted.fetch_add(1, Ordering::Relaxed);
                    let wait = retry_after.clamp(Duration::from_millis(1), retry_cap);
                    steps.note(|| {
                        format!(
                            "acquire {:.1} ms at {:.0}: not granted ({reason}), retry in {:.1} ms",
                            clock.sim_ms(asked.elapsed()),
                            clock.sim_ms_at(asked),
                            clock.sim_ms(wait)
                        )
                    });
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Err(e) => return Err(CallFailed::Fatal(e.into())),
            };
            metrics.granted.fetch_add(1, Ordering::Relaxed);
            let fallback = lease.is_fallback();
            if fallback {
                metrics.fallback_leases.fetch_add(1, Ordering::Relaxed);
            } else {
                let clock = self.ctx.clock;
                metrics.record_grant(BrokerGrant {
                    sent_ms: clock.sim_ms_at(asked),
                    answered_ms: clock.now_ms(),
                });
            }
            let sent = Instant::now();
            steps.note(|| {
                format!(
                    "acquire {:.1} ms at {:.0}: granted",
                    clock.sim_ms(sent.saturating_duration_since(asked)),
                    clock.sim_ms_at(asked)
                )
            });
            let answer = self.send(family, path, &body).await;
            if let Ok(a) = &answer {
                steps.note(|| {
                    format!(
                        "sent at {:.0}: {} after {:.1} ms",
                        clock.sim_ms_at(sent),
                        a.status,
                        clock.sim_ms(sent.elapsed())
                    )
                });
            }
            if fallback {
                let clock = self.ctx.clock;
                metrics.record_fallback(FallbackCall {
                    sent_ms: clock.sim_ms_at(sent),
                    answered_ms: clock.now_ms(),
                    refused: matches!(&answer, Ok(a) if a.status == 429),
                });
            }
            if let Ok(a) = &answer {
                let reported = if a.status == 429 && says_concurrency(&a.body) {
                    lease.report_concurrency_429(&a.headers).await
                } else {
                    lease.report(a.status, &a.headers).await
                };
                if let Err(e) = reported {
                    metrics.report_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "report refused");
                }
            }
            lease.release().await;
            match outcome(answer) {
                Outcome::Done(answer) => {
                    self.done_at(wanted, sent);
                    steps.log_if_slow(&self.client_id, clock, wanted, sent);
                    return Ok(answer);
                }
                // Reported: the broker froze the bucket; Acquire waits it out.
                Outcome::Throttled(_) => {}
                Outcome::Retry => self.pause(ERROR_PAUSE_MS).await,
                Outcome::Rejected(e) => return Err(e),
            }
        }
    }
}

/// What a broker-mode critical call went through (each Acquire, its time
/// and answer, each send), logged at info under the target
/// `scenario::slow_critical` when the call waited longer than the critical
/// target: how a slow poll is told apart (queued behind a refill, a
/// freeze, a slow round trip). Nothing is kept for other classes.
struct Steps(Option<Vec<String>>);

impl Steps {
    fn new(class: Class) -> Steps {
        Steps((class == Class::Critical).then(Vec::new))
    }

    fn note(&mut self, step: impl FnOnce() -> String) {
        if let Some(steps) = self.0.as_mut() {
            steps.push(step());
        }
    }

    fn log_if_slow(&self, client_id: &str, clock: SimClock, wanted: Instant, sent: Instant) {
        let Some(steps) = &self.0 else { return };
        let waited = clock.sim_ms(sent.saturating_duration_since(wanted));
        if waited > crate::report::MAX_CRITICAL_P99_MS {
            tracing::info!(
                target: "scenario::slow_critical",
                wanted_ms = clock.sim_ms_at(wanted),
                waited_ms = waited,
                client = client_id,
                "slow critical call: {}",
                steps.join(" | ")
            );
        }
    }
}

/// The broker-mode clients' local fallback (used while the broker is
/// unreachable): the client's defaults (half the rate granted over the
/// last minute, at least 6 a minute, the broker probed every second) with
/// their durations scaled like every other duration of the run, so that
/// they mean the same in simulated time: at least 6 a *simulated* minute,
/// a probe every simulated second. (The client's one-minute look-back is
/// not a setting: it stays a real minute, i.e. `scale` simulated minutes,
/// which makes the fallback rate lower than it would be unscaled while a
/// run is younger than a real minute.)
pub(crate) fn fallback_settings(scale: f64) -> FallbackSettings {
    let default = FallbackSettings::default();
    FallbackSettings {
        floor_per_min: (f64::from(default.floor_per_min) * scale).round() as u32,
        probe_every: default.probe_every.div_f64(scale),
        ..default
    }
}

/// The broker's default wait of a class (examples/broker.toml), simulated ms.
fn class_wait_ms(class: Class) -> f64 {
    match class {
        Class::Critical => 2_000.0,
        Class::Interactive => 500.0,
        Class::Batch => 30_000.0,
    }
}

/// Local mode's limiter for one client process: a token bucket in simulated
/// time, paused by Retry-After, its refill rate cut by the adaptive rule.
pub(crate) struct LocalLimiter {
    /// std `Mutex`: held for one arithmetic step, never across `.await`.
    state: Mutex<LocalState>,
    /// `TotalLimit − 2` analytics calls in flight (the ingestion only).
    slots: Option<Semaphore>,
}

impl LocalLimiter {
    /// A full bucket of `per_minute` permits refilled at that rate, with
    /// `slots` concurrent calls at most, at simulated time `now_ms`.
    pub(crate) fn new(per_minute: f64, slots: Option<usize>, now_ms: f64) -> LocalLimiter {
        LocalLimiter {
            state: Mutex::new(LocalState::new(per_minute, now_ms)),
            slots: slots.map(Semaphore::new),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LocalState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a permit.
    async fn take(&self, clock: &SimClock) {
        loop {
            let wait = self.state().try_take(clock.now_ms());
            match wait {
                Ok(()) => return,
                Err(ms) => tokio::time::sleep(clock.real(ms.max(0.1))).await,
            }
        }
    }

    /// Counts an answer (`throttled`: a 429, with its Retry-After in
    /// simulated ms if it had one); true when the adaptive rule cut the rate.
    fn observe(&self, now_ms: f64, throttled: Option<Option<f64>>) -> bool {
        self.state().observe(now_ms, throttled)
    }
}

/// The arithmetic of [`LocalLimiter`], simulated ms.
#[derive(Debug)]
struct LocalState {
    per_minute: f64,
    capacity: f64,
    tokens: f64,
    last_ms: f64,
    paused_until_ms: f64,
    /// When each active cut expires.
    cuts_until: Vec<f64>,
    ratio_from_ms: f64,
    ratio_total: u64,
    ratio_refused: u64,
}

impl LocalState {
    fn new(per_minute: f64, now_ms: f64) -> LocalState {
        LocalState {
            per_minute,
            capacity: per_minute,
            tokens: per_minute,
            last_ms: now_ms,
            paused_until_ms: 0.0,
            cuts_until: Vec::new(),
            ratio_from_ms: now_ms,
            ratio_total: 0,
            ratio_refused: 0,
        }
    }

    /// Permits per simulated ms now.
    fn rate(&mut self, now_ms: f64) -> f64 {
        self.cuts_until.retain(|&until| until > now_ms);
        let cuts = i32::try_from(self.cuts_until.len()).unwrap_or(i32::MAX);
        self.per_minute * RATE_CUT.powi(cuts) / 60_000.0
    }

    /// Takes a permit, or says how long to wait for one.
    fn try_take(&mut self, now_ms: f64) -> Result<(), f64> {
        let rate = self.rate(now_ms);
        let elapsed = (now_ms - self.last_ms).max(0.0);
        self.tokens = (self.tokens + elapsed * rate).min(self.capacity);
        self.last_ms = self.last_ms.max(now_ms);
        if now_ms < self.paused_until_ms {
            return Err(self.paused_until_ms - now_ms);
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - self.tokens) / rate)
        }
    }

    fn observe(&mut self, now_ms: f64, throttled: Option<Option<f64>>) -> bool {
        self.ratio_total += 1;
        if let Some(retry_after) = throttled {
            self.ratio_refused += 1;
            if let Some(ms) = retry_after {
                self.paused_until_ms = self.paused_until_ms.max(now_ms + ms);
            }
        }
        if now_ms - self.ratio_from_ms < RATIO_WINDOW_MS {
            return false;
        }
        let cut = self.ratio_refused as f64 > RATIO_THRESHOLD * self.ratio_total as f64;
        if cut {
            self.cuts_until.push(now_ms + CUT_HOLD_MS);
        }
        self.ratio_from_ms = now_ms;
        self.ratio_total = 0;
        self.ratio_refused = 0;
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call whose task is aborted before any answer (an upstream that
    /// never answers, the drain deadline passing) counts as an unserved
    /// wait; one answered does not.
    #[tokio::test(start_paused = true)]
    async fn a_call_aborted_unanswered_counts_as_an_unserved_wait() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = Arc::new(Metrics::new());
        let ctx = Arc::new(Ctx {
            upstream: crate::upstream::Upstream::new(silent.local_addr().unwrap()),
            clock: SimClock::aligned(Instant::now(), 0.0, 10.0),
            metrics: metrics.clone(),
        });
        let caller = Caller {
            ctx,
            policy: Policy::Naive,
            client_id: "wallboard-0".into(),
            oauth_client: "wallboard-0".into(),
            class: Class::Critical,
        };
        let call = tokio::spawn(async move {
            let wanted = Instant::now();
            caller
                .call(Family::Analytics, "/x", Bytes::new(), wanted)
                .await
        });
        // Accepted, never answered: the call waits until aborted.
        let (_held, _) = silent.accept().await.unwrap();
        tokio::time::advance(Duration::from_secs(3)).await;
        call.abort();
        assert!(call.await.unwrap_err().is_cancelled());
        let w = metrics.waits()["critical"];
        assert_eq!((w.count, w.unserved), (1, 1));
        // 3 real s at x10.
        assert!((w.p50_ms - 30_000.0).abs() < 100.0, "{w:?}");
    }

    #[test]
    fn fallback_settings_are_scaled_like_every_duration() {
        let f = fallback_settings(20.0);
        let default = FallbackSettings::default();
        assert_eq!(f.floor_per_min, default.floor_per_min * 20);
        assert_eq!(f.probe_every, default.probe_every / 20);
        assert_eq!(f.fraction, default.fraction);
    }

    #[test]
    fn bucket_starts_full_and_refills_at_the_rate() {
        let mut s = LocalState::new(60.0, 0.0);
        for _ in 0..60 {
            assert!(s.try_take(0.0).is_ok());
        }
        // Empty: one permit per simulated second.
        let wait = s.try_take(0.0).unwrap_err();
        assert!((wait - 1000.0).abs() < 1e-6, "{wait}");
        assert!(s.try_take(1000.0).is_ok());
        assert!(s.try_take(1000.0).is_err());
    }

    #[test]
    fn retry_after_pauses_the_bucket() {
        let mut s = LocalState::new(60.0, 0.0);
        assert!(!s.observe(10.0, Some(Some(5000.0))));
        assert_eq!(s.try_take(1000.0), Err(4010.0));
        assert!(s.try_take(5010.0).is_ok());
    }

    #[test]
    fn more_than_one_percent_refused_cuts_the_rate_for_an_hour() {
        let mut s = LocalState::new(60.0, 0.0);
        for i in 0..98 {
            assert!(!s.observe(i as f64, None));
        }
        assert!(!s.observe(100.0, Some(None)));
        assert!(!s.observe(200.0, Some(None)));
        // 2 of 101 refused, evaluated once 60 s have passed.
        assert!(s.observe(60_000.0, None));
        assert!((s.rate(60_000.0) * 60_000.0 - 48.0).abs() < 1e-9);
        // One refusal in a clean minute is below 1% of 200: no new cut.
        for i in 0..199 {
            s.observe(60_001.0 + i as f64, None);
        }
        s.observe(61_000.0, Some(None));
        assert!(!s.observe(120_000.0, None));
        // The cut expires after its hour.
        assert!((s.rate(60_000.0 + CUT_HOLD_MS + 1.0) * 60_000.0 - 60.0).abs() < 1e-9);
    }
}
