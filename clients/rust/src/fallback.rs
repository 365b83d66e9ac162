//! The local fallback limiter used while the broker cannot be reached: a
//! governor rate limiter at a conservative rate — `fraction` of the rate
//! this client was granted over the last minute, never below `floor_per_min`
//! and never unlimited — and, for a client whose leases held concurrency
//! slots in that minute, a cap on calls in flight at `fraction` of the most
//! it held at once (at least one). It runs on tokio's clock (so it follows
//! paused time in tests, unlike governor's default quanta clock).

use governor::clock::Clock;
use governor::{Quota, RateLimiter};
use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::time::Duration;
use tokio::time::Instant;

/// How the client behaves while the broker is unreachable.
#[derive(Debug, Clone, Copy)]
pub struct FallbackSettings {
    /// Share of the recently granted rate to run at (default 0.5).
    pub fraction: f64,
    /// Lowest fallback rate, per minute, also used if nothing was granted
    /// yet (default 6: one call every ten seconds).
    pub floor_per_min: u32,
    /// How often to try the broker again while falling back (default 1 s).
    pub probe_every: Duration,
}

impl Default for FallbackSettings {
    fn default() -> Self {
        FallbackSettings {
            fraction: 0.5,
            floor_per_min: 6,
            probe_every: Duration::from_secs(1),
        }
    }
}

/// governor clock on tokio's time.
#[derive(Debug, Clone, Copy)]
struct TokioClock(Instant);

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

type Limiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    TokioClock,
    governor::middleware::NoOpMiddleware<Duration>,
>;

/// A fallback entered again this soon after it was left (a broker that
/// answers its probe but not the calls: a cluster with no leader) goes on
/// with the limiter it left: the same pacing, not logged again.
const REENTRY: Duration = Duration::from_secs(60);

pub(crate) struct Fallback {
    settings: FallbackSettings,
    /// Grant instants of the last minute (for the recent granted rate).
    grants: VecDeque<Instant>,
    /// The leases holding slots this client held at once, as of each grant
    /// of one in the last minute (for the cap on calls in flight).
    slot_peaks: VecDeque<(Instant, usize)>,
    /// While falling back: the most calls in flight (see `slot_peaks`).
    max_in_flight: Option<usize>,
    /// The local limiter, while falling back.
    local: Option<(Limiter, TokioClock)>,
    /// The last fallback's limiter, and when it was left.
    left: Option<(Limiter, TokioClock, Instant)>,
    /// This fallback goes on one left a moment ago: its end is not logged.
    quiet: bool,
    /// No local permission before this: a 429's Retry-After.
    held_until: Option<Instant>,
    /// The local limiter's rate, per minute.
    per_min: u32,
    /// The broker granted a call since the last fallback was left.
    served_since_left: bool,
    /// This outage's "answers the probe, not the calls" was logged.
    said_unserved: bool,
    last_probe: Option<Instant>,
}

impl Fallback {
    pub(crate) fn new(settings: FallbackSettings) -> Fallback {
        Fallback {
            settings,
            grants: VecDeque::new(),
            slot_peaks: VecDeque::new(),
            max_in_flight: None,
            local: None,
            left: None,
            quiet: false,
            held_until: None,
            per_min: 0,
            served_since_left: false,
            said_unserved: false,
            last_probe: None,
        }
    }

    /// Where a call goes: to the broker, unless falling back; then to the
    /// local limiter, and once every `probe_every` a probe of the broker
    /// is due (made in the background: a hung broker must not hold the
    /// calls that fall back for its keep-alive to notice).
    pub(crate) fn route(&mut self) -> Route {
        if self.local.is_none() {
            return Route::Broker;
        }
        let now = Instant::now();
        let probe = self
            .last_probe
            .is_none_or(|t| now >= t + self.settings.probe_every);
        if probe {
            self.last_probe = Some(now);
        }
        Route::Local { probe }
    }

    /// The broker granted a call of `permits`; `slots`: it holds slots,
    /// and that many such leases are held now.
    pub(crate) fn granted(&mut self, permits: u32, slots: Option<usize>) {
        self.served_since_left = true;
        let now = Instant::now();
        for _ in 0..permits {
            self.grants.push_back(now);
        }
        if let Some(held) = slots {
            // Only the highest since a lower one matters: at most one entry
            // per distinct level, not one per grant.
            while self.slot_peaks.back().is_some_and(|&(_, n)| n <= held) {
                self.slot_peaks.pop_back();
            }
            self.slot_peaks.push_back((now, held));
        }
        self.forget_old(now);
    }

    /// Keeps only the last minute's grants.
    fn forget_old(&mut self, now: Instant) {
        let old = |t: &Instant| now.duration_since(*t) > Duration::from_secs(60);
        while self.grants.front().is_some_and(old) {
            self.grants.pop_front();
        }
        while self.slot_peaks.front().is_some_and(|(t, _)| old(t)) {
            self.slot_peaks.pop_front();
        }
    }

    /// While falling back, the most leases (the broker's holding slots and
    /// the fallback's) held at once; `None`: no cap (not falling back, or
    /// no slot was held in the minute before).
    pub(crate) fn max_in_flight(&self) -> Option<usize> {
        self.local.as_ref().and(self.max_in_flight)
    }

    /// How often the broker is probed while falling back.
    pub(crate) fn probe_every(&self) -> Duration {
        self.settings.probe_every
    }

    pub(crate) fn broker_answered(&mut self) {
        // A Retry-After reported while falling back was sent on with the
        // report: the broker holds the bucket now.
        self.held_until = None;
        if let Some((limiter, clock)) = self.local.take() {
            if !self.quiet {
                tracing::info!("quota broker reachable again; leaving the local fallback limiter");
            }
            self.left = Some((limiter, clock, Instant::now()));
            self.served_since_left = false;
        }
    }

    pub(crate) fn broker_unreachable(&mut self, status: &tonic::Status) {
        if self.local.is_some() {
            return;
        }
        let now = Instant::now();
        // Left a moment ago and nothing granted since (the broker answered
        // the probe, not the calls): a permit it paced out stays paced
        // (leaving and entering again must not hand out a call at once each
        // time). A new outage after real service starts afresh, said again.
        let served = self.served_since_left;
        if let Some((limiter, clock, _)) = self
            .left
            .take()
            .filter(|(_, _, at)| !served && now.duration_since(*at) < REENTRY)
        {
            if self.said_unserved {
                tracing::debug!(error = %status, "quota broker unreachable again; still pacing calls");
            } else {
                // The "reachable again" just logged was its probe only.
                tracing::warn!(
                    error = %status,
                    "quota broker answers its health check but not the calls; pacing calls \
                     with the local limiter again (a cluster answers so while no broker leads \
                     the tenant yet)"
                );
                self.said_unserved = true;
            }
            self.local = Some((limiter, clock));
            self.quiet = true;
            self.last_probe = Some(now);
            return;
        }
        self.quiet = false;
        self.said_unserved = false;
        self.forget_old(now);
        let recent = self.grants.len() as f64; // grants in the last minute
        let per_min = (recent * self.settings.fraction)
            .max(f64::from(self.settings.floor_per_min))
            .max(1.0);
        let rate = NonZeroU32::new(per_min as u32).unwrap_or(NonZeroU32::MIN);
        // The front is the highest of the last minute.
        self.max_in_flight = self
            .slot_peaks
            .front()
            .map(|&(_, n)| ((n as f64 * self.settings.fraction).ceil() as usize).max(1));
        tracing::warn!(
            error = %status,
            fallback_per_min = rate.get(),
            fallback_max_in_flight = ?self.max_in_flight,
            "quota broker unreachable; pacing calls with a local limiter until it is back"
        );
        self.per_min = rate.get();
        let clock = TokioClock(now);
        let quota = Quota::per_minute(rate).allow_burst(NonZeroU32::MIN);
        self.local = Some((RateLimiter::direct_with_clock(quota, clock), clock));
        self.last_probe = Some(now);
    }

    /// Takes one call's permission from the local limiter. A multi-permit
    /// call counts as one here: the fallback rate is a floor-level trickle,
    /// not an accounting of the upstream's budget.
    pub(crate) fn try_take(&mut self) -> Take {
        let Some((limiter, clock)) = self.local.as_ref() else {
            return Take::BrokerBack;
        };
        let held = self.held_until.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
        });
        let permit_in = if held.is_zero() {
            match limiter.check() {
                Ok(()) => return Take::Taken,
                Err(not_until) => not_until.wait_time_from(clock.now()),
            }
        } else {
            held
        }
        .max(Duration::from_millis(1));
        // Never past the next probe: a waiting call takes its turn to ask
        // the broker.
        let nap = permit_in.min(self.settings.probe_every);
        Take::Wait {
            permit_in,
            nap,
            retry_after: if held.is_zero() { nap } else { permit_in },
        }
    }

    /// The upstream answered 429 with this Retry-After while falling back:
    /// no local permission before it ends.
    pub(crate) fn throttled(&mut self, retry_after: Duration) {
        let until = Instant::now() + retry_after;
        if self.held_until.is_none_or(|t| t < until) {
            self.held_until = Some(until);
        }
    }

    /// The local limiter's rate, per minute (0 when not falling back).
    pub(crate) fn per_min(&self) -> u32 {
        if self.local.is_some() {
            self.per_min
        } else {
            0
        }
    }
}

/// Where a call goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Not falling back: ask the broker.
    Broker,
    /// Falling back: the local limiter; `probe` when the broker is to be
    /// probed now.
    Local { probe: bool },
}

/// What the local limiter says to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Take {
    /// Go ahead, unleased.
    Taken,
    /// No permission for `permit_in`; ask again after `nap` (when the
    /// broker is also probed again).
    Wait {
        /// Until the local limiter (or a Retry-After) gives one.
        permit_in: Duration,
        /// How long to sleep before asking again.
        nap: Duration,
        /// When a caller that will not wait may try again: the upstream's
        /// Retry-After, else the next probe (the broker may be back by
        /// then) if that comes before the local permit.
        retry_after: Duration,
    },
    /// Not falling back (the broker answered meanwhile): ask the broker.
    BrokerBack,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broker that answers its probe but not the calls (a cluster with
    /// no leader): leaving and entering the fallback every 2 s for a
    /// minute gives the fallback's pace, not a call per round.
    #[tokio::test(start_paused = true)]
    async fn entering_again_soon_after_leaving_keeps_the_pacing() {
        let mut fb = Fallback::new(FallbackSettings::default()); // 6 a minute
        let down = tonic::Status::unavailable("this broker does not lead the tenant");
        fb.broker_unreachable(&down);
        let mut taken = u32::from(fb.try_take() == Take::Taken);
        for _ in 0..30 {
            tokio::time::advance(Duration::from_secs(2)).await;
            fb.broker_answered();
            fb.broker_unreachable(&down);
            taken += u32::from(fb.try_take() == Take::Taken);
        }
        assert_eq!(taken, 1 + 6);
        // The first quiet entry said that the broker answered only its
        // probe (the "reachable again" before it was not the end).
        assert!(fb.said_unserved);
        // Left longer ago: a new outage, a new limiter (its first call at once).
        fb.broker_answered();
        tokio::time::advance(Duration::from_secs(120)).await;
        fb.broker_unreachable(&down);
        assert_eq!(fb.try_take(), Take::Taken);
        assert!(!fb.quiet, "a new outage is logged");
        assert!(
            !fb.said_unserved,
            "and its own probe-only answer said again"
        );
        // Left a moment ago, but the broker granted calls since: a new
        // outage too, logged and paced afresh.
        fb.broker_answered();
        fb.granted(1, None);
        tokio::time::advance(Duration::from_secs(2)).await;
        fb.broker_unreachable(&down);
        assert!(!fb.quiet, "an outage after real service is logged again");
        assert_eq!(fb.try_take(), Take::Taken);
    }

    /// A 429's Retry-After holds the local limiter until it ends, and only
    /// while no broker answers: one that answers was sent the report and
    /// holds the upstream's bucket itself; a later outage is not held by
    /// the earlier word (it holds every call of the client, not one bucket).
    #[tokio::test(start_paused = true)]
    async fn a_retry_after_holds_the_fallback_until_it_ends_or_the_broker_answers() {
        let mut fb = Fallback::new(FallbackSettings::default());
        let down = tonic::Status::unavailable("connection refused");
        fb.broker_unreachable(&down);
        assert_eq!(fb.try_take(), Take::Taken);
        tokio::time::advance(Duration::from_secs(30)).await;
        fb.throttled(Duration::from_secs(60));
        match fb.try_take() {
            Take::Wait { permit_in, .. } => assert!(
                permit_in > Duration::from_secs(59) && permit_in <= Duration::from_secs(60),
                "{permit_in:?}"
            ),
            other => panic!("taken during a 60 s Retry-After: {other:?}"),
        }
        // A shorter word later does not shorten the hold.
        fb.throttled(Duration::from_secs(5));
        assert_ne!(fb.try_take(), Take::Taken);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(fb.try_take(), Take::Taken, "held past the Retry-After");

        tokio::time::advance(Duration::from_secs(30)).await;
        fb.throttled(Duration::from_secs(60));
        fb.broker_answered();
        fb.granted(1, None);
        fb.broker_unreachable(&down);
        assert_eq!(
            fb.try_take(),
            Take::Taken,
            "an outage after the broker answered is held by a Retry-After it was told"
        );
    }
}
