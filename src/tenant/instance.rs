//! One instance of a bucket: its token bucket and slots, its learner, the
//! freeze after a 429 and the upstream's own view of its budget (a window's
//! count-down, or a continuous bucket's level and what of it is left to
//! consumers the broker does not manage), and the arithmetic of reserves
//! held back for higher classes.

use crate::config::BucketSettings;
use crate::learning::{LearnSettings, Learner, RateLimitInfo, SlotLearner, UpstreamBudget};
use crate::limits::{Slots, TokenBucket};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// One instance of a bucket.
#[derive(Debug)]
pub(super) struct Instance {
    pub(super) bucket: usize,
    pub(super) oauth_client: Option<Arc<str>>,
    pub(super) tokens: Option<TokenBucket>,
    pub(super) slots: Option<Slots>,
    /// Waiters per class index.
    pub(super) waiting: BTreeMap<usize, u32>,
    /// Classes refused here (not granted within their wait) per class
    /// index, and when they were told to ask again: demand that sleeps
    /// outside the queue until then (see `TenantState::bucket_share`).
    pub(super) deferred: BTreeMap<usize, Instant>,
    pub(super) queued: u32,
    pub(super) granted_total: u64,
    pub(super) throttled_total: u64,
    pub(super) reports_total: u64,
    /// When the last report reached it (since this run began).
    pub(super) last_report: Option<Instant>,
    /// Freezes after a 429 (for the metrics).
    pub(super) freezes_total: u64,
    pub(super) learner: Learner,
    /// The learned concurrency limit (instances with slots only).
    pub(super) slot_learner: Option<SlotLearner>,
    /// Grants resume no earlier than this (freeze end plus jitter).
    pub(super) resume_at: Option<Instant>,
    pub(super) upstream: Option<UpstreamBudget>,
    /// A continuous upstream's bucket as its headers tell it, and what of
    /// it is left for consumers the broker does not manage.
    pub(super) kept: Option<Kept>,
    /// Bumped on every change; Watch sends instances whose version moved.
    pub(super) version: u64,
    /// Slots that leases granted before a restart may hold (counted in
    /// `slots`), until renewals adopt them or `phantom_until`.
    pub(super) phantom: u32,
    /// When unclaimed phantom slots come back: no lease granted before the
    /// restart can be alive then without having been renewed (and adopted).
    pub(super) phantom_until: Option<Instant>,
    /// The longest time to reset the upstream's headers for this bucket
    /// stated: the length of the upstream's window as far as they show
    /// (see `header_window`).
    pub(super) longest_reset: Duration,
    /// The window the upstream's last stated limit applies to: the one its
    /// headers named (`w=`), else the header window then.
    pub(super) limit_window: Option<Duration>,
    /// The burst the config (or an operator) set; a limit the upstream
    /// stated scales it down (see [`Instance::apply_rate`]).
    pub(super) base_burst: u32,
}

impl Instance {
    pub(super) fn new(
        bucket: usize,
        settings: &BucketSettings,
        client: Option<Arc<str>>,
        now: Instant,
    ) -> Self {
        Instance {
            bucket,
            oauth_client: client,
            tokens: settings
                .rate
                .map(|r| TokenBucket::new(r.permits.get(), r.window, r.burst.get(), now)),
            base_burst: settings.rate.map_or(1, |r| r.burst.get()),
            slots: settings.max_in_flight.map(|m| Slots::new(m.get())),
            waiting: BTreeMap::new(),
            deferred: BTreeMap::new(),
            queued: 0,
            granted_total: 0,
            throttled_total: 0,
            reports_total: 0,
            last_report: None,
            freezes_total: 0,
            slot_learner: settings.max_in_flight.map(|m| {
                SlotLearner::new(
                    m.get(),
                    settings.rate.map_or(Duration::from_secs(60), |r| r.window),
                )
            }),
            learner: Learner::new(
                settings.rate.map_or(0.0, |r| r.per_minute()),
                settings.rate.map_or(Duration::from_secs(60), |r| r.window),
                now,
            ),
            resume_at: None,
            upstream: None,
            kept: None,
            version: 0,
            phantom: 0,
            phantom_until: None,
            longest_reset: Duration::ZERO,
            limit_window: None,
        }
    }

    /// The window a header-stated limit applies to when the headers do not
    /// say: the longest reset they stated, at most the bucket's window.
    /// A fixed or sliding window's reset reaches its window's length at the
    /// window's start; a token bucket's only reaches the time to refill it
    /// from empty (capacity ÷ rate), so capacity over that window is its
    /// refill rate, where taking the capacity as a per-window limit would
    /// starve the fleet. Until a long reset is seen the limit reads high,
    /// which caps nothing: the budget view and the 429 rules still apply.
    pub(super) fn header_window(&mut self, reset: Option<Duration>, bucket: Duration) -> Duration {
        if let Some(r) = reset {
            self.longest_reset = self.longest_reset.max(r.min(bucket));
        }
        // Within 10% of the bucket's window it is that window, seen a
        // little after it started.
        if self.longest_reset >= bucket.mul_f64(0.9) || self.longest_reset.is_zero() {
            bucket
        } else {
            self.longest_reset
        }
    }

    /// Nobody uses it: dropping it would lose at most what it learned.
    pub(super) fn quiet(&self, now: Instant) -> bool {
        self.queued == 0
            && self.slots.is_none_or(|s| s.in_flight() == 0)
            && self.tokens.as_ref().is_none_or(|t| t.is_full(now))
            && self.resume_at.is_none_or(|t| t <= now)
            && self.learner.frozen_until(now).is_none()
    }

    /// Quiet and has learned nothing still in force: a fresh instance would
    /// be the same.
    pub(super) fn idle(&self, now: Instant) -> bool {
        self.quiet(now)
            && self.learner.is_pristine(now)
            && self
                .slot_learner
                .as_ref()
                .is_none_or(|l| l.learned().is_none())
    }

    /// Puts the concurrency limit the slot learner says into the slots.
    pub(super) fn apply_slot_limit(&mut self) {
        if let (Some(slots), Some(l)) = (self.slots.as_mut(), self.slot_learner.as_ref()) {
            slots.set_max(l.max());
        }
    }

    /// When `n` permits could be taken, ignoring the queue: `Ok` with the
    /// token-ready instant if slots are free, `Err` if slots are the limit.
    /// `share` is what the class leaves to higher classes or may borrow.
    #[inline]
    pub(super) fn ready_at(&self, n: u32, share: Share, now: Instant) -> Result<Instant, ()> {
        if let Some(s) = self.slots {
            if !s.has_room(n.saturating_add(share.slots(s.max()))) {
                return Err(());
            }
        }
        self.rate_ready_at(n, share, now)
    }

    /// When the bucket's rate (its tokens at the rate they refill, a
    /// freeze, what is left to others) lets `n` permits be taken, whatever
    /// its slots say: the earliest a grant could come, slots or not. `Err`
    /// if `n` does not fit in the bucket as it stands.
    #[inline]
    pub(super) fn rate_ready_at(&self, n: u32, share: Share, now: Instant) -> Result<Instant, ()> {
        let mut at = match self.tokens.as_ref() {
            Some(t) => t
                .ready_at_reserved(n, share.tokens(t.burst()), now)
                .ok_or(())?,
            None => now,
        };
        if let Some(resume) = self.resume_at {
            // A class that may borrow (one above a waiting lower class)
            // resumes when the freeze ends; the jitter spreads the lower
            // classes' resumption behind it.
            let resume = if share.borrow > 0.0 {
                self.learner.frozen_until(now).unwrap_or(now).min(resume)
            } else {
                resume
            };
            at = at.max(resume);
        }
        // An ask larger than the bucket holds above its floor is not held
        // by it: it would never be served.
        if let Some(k) = self.kept.as_ref().filter(|_| share.leaves_kept) {
            at = at.max(k.ready_at(n, now).unwrap_or(now));
        }
        if let Some(u) = self.upstream.and_then(|u| u.ready_at(n, now)) {
            at = at.max(u);
        }
        Ok(at)
    }

    /// Puts the rate the learner says into the token bucket.
    pub(super) fn apply_rate(&mut self, now: Instant, s: &LearnSettings) {
        let rate = self.learner.rate(now, s);
        let burst = self.stated_burst();
        if let Some(t) = self.tokens.as_mut() {
            if (t.rate_per_min() - rate).abs() > 1e-9 * rate.max(1.0) {
                t.set_rate_per_min(rate, now);
            }
            if t.burst() != burst {
                t.set_burst(burst, now);
            }
        }
    }

    /// The burst under a limit the upstream stated: scaled as that limit
    /// scales the configured rate (the bucket holds the same time's worth),
    /// and no more than the upstream allows in the window its headers
    /// state, so an idle spell saves up no more than that window allows.
    /// (Kept at the configured burst, a learned 20 a minute under a
    /// configured 1,200 saved up 1,200, and the headroom lent below empty
    /// to higher classes, a share of the burst, let `critical` take 240 in
    /// a second where the upstream allowed 2 per 6 s.) The learner's own
    /// cuts after 429s leave the burst as is.
    fn stated_burst(&self) -> u32 {
        let configured = self.learner.configured();
        let base = self.base_burst.max(1);
        match self.learner.learned_limit() {
            Some(limit) if limit < configured && configured > 0.0 => {
                let scaled = f64::from(base) * limit / configured;
                let window = self
                    .limit_window
                    .map_or(self.learner.window(), |w| w.min(self.learner.window()));
                let per_window = limit * window.as_secs_f64() / 60.0;
                (scaled.min(per_window).ceil() as u32).clamp(1, base)
            }
            _ => base,
        }
    }

    /// Freezes grants until `until`, after which they resume paced from a
    /// bucket empty at `until`; classes that may not borrow resume up to
    /// `jitter` permit intervals later (`draw` in 0..1). The refill starts
    /// at `until` all the same: a class that may borrow is served from the
    /// freeze's end (see `ready_at`), and a refill started after the
    /// jitter would make it repay its headroom that much later. Counted as
    /// a freeze only if the bucket was not frozen at `now` (a wave of 429s
    /// that extends one is one freeze).
    pub(super) fn freeze(&mut self, until: Instant, draw: f64, s: &LearnSettings, now: Instant) {
        let jitter = self
            .tokens
            .as_ref()
            .map_or(Duration::ZERO, |t| t.interval().mul_f64(s.jitter * draw));
        let resume = until + jitter;
        // A freeze that ends before it began (Retry-After 0, a date past)
        // holds nothing back: not one.
        if self.resume_at.is_none_or(|r| r <= now) && until > now {
            self.freezes_total += 1;
        }
        self.resume_at = Some(self.resume_at.map_or(resume, |r| r.max(resume)));
        if let Some(t) = self.tokens.as_mut() {
            t.empty_at(until);
        }
    }

    /// Applies what the upstream says is left of the budget of `window`.
    /// A `continuous` budget (a token bucket's: refilled all the time, its
    /// reset only the time to refill it whole) only shrinks the bucket: a
    /// view that waits for its reset would hold every class for seconds
    /// while the next permit is a fraction of one away.
    pub(super) fn sync_budget(
        &mut self,
        info: &RateLimitInfo,
        (window, continuous): (Duration, bool),
        now: Instant,
    ) {
        let Some(remaining) = info.remaining else {
            return;
        };
        if let Some(t) = self.tokens.as_mut() {
            t.shrink_to(u32::try_from(remaining).unwrap_or(u32::MAX), now);
        }
        if continuous {
            self.upstream = None;
            self.sync_kept(info.limit, remaining, window, now);
            return;
        }
        self.kept = None;
        if let Some(reset) = info.reset {
            self.upstream = Some(UpstreamBudget::observe(
                self.upstream,
                info.limit,
                remaining,
                reset,
                window,
                now,
            ));
        }
    }

    /// Follows a continuous upstream's bucket of `capacity` (its headers'
    /// limit, refilled over `window`: see [`Instance::header_window`]) from
    /// what it says is left, keeping half of it for consumers the broker
    /// does not manage (see [`Kept`]). No limit stated: nothing followed.
    fn sync_kept(&mut self, capacity: Option<u64>, remaining: u64, window: Duration, now: Instant) {
        let capacity = capacity.map_or(0, |c| u32::try_from(c).unwrap_or(u32::MAX));
        let floor = capacity / 2;
        if floor == 0 {
            self.kept = None;
            return;
        }
        // The refill the headers state, whatever the configured rate and
        // the learner's cuts: the upstream refills at it for everyone.
        let per_min = f64::from(capacity) * 60.0 / window.as_secs_f64().max(1e-3);
        let kept = self.kept.get_or_insert_with(|| Kept {
            view: TokenBucket::new(capacity, Duration::from_secs(60), capacity, now),
            floor,
        });
        kept.floor = floor;
        kept.view.set_burst(capacity, now);
        kept.view.set_rate_per_min(per_min, now);
        kept.view.set_level(remaining as f64, now);
    }
}

/// An upstream token bucket that tells what is left of it, followed between
/// its answers by counting the fleet's grants down and refilling at the
/// rate its headers state. Such a bucket saves what is not spent for a
/// burst; the fleet, paced by the broker, needs none, but the consumers the
/// broker does not manage may: a broker that spent every token the headers
/// said were left took the ones saved for their next burst, and refused
/// it. So the classes that hold reserves for others leave `floor`, half the
/// bucket, in it (`batch`, `best_effort`: see `TenantState::bucket_share`).
/// Paced at the refill, the fleet still gets all that the others leave (the
/// floor only sets the level at which it waits), and the half absorbs the
/// fleet's own calls still in flight when a header was read, as many as
/// the half holds. The classes the reserves are for (wallboards, trunks)
/// may take it down to empty: what they ask must not wait.
#[derive(Debug, Clone)]
pub(super) struct Kept {
    pub(super) view: TokenBucket,
    pub(super) floor: u32,
}

impl Kept {
    /// When `n` can be taken leaving the floor, if ever (`None`: more than
    /// the bucket holds above it).
    #[inline]
    pub(super) fn ready_at(&self, n: u32, now: Instant) -> Option<Instant> {
        self.view.ready_at_reserved(n, f64::from(self.floor), now)
    }
}

/// What a class leaves of a bucket to the classes above it, and what it may
/// take of it below empty (see `TenantState::bucket_share`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Share {
    /// Share of the burst and of the slots held back for higher classes.
    pub(super) held: f64,
    /// Share of the burst the class may borrow below empty; when positive,
    /// at least one permit.
    pub(super) borrow: f64,
    /// Whether the class leaves what an upstream bucket keeps for the
    /// consumers the broker does not manage (see [`Kept`]).
    pub(super) leaves_kept: bool,
}

impl Share {
    /// Nothing held back, nothing borrowed.
    pub(super) const NONE: Share = Share {
        held: 0.0,
        borrow: 0.0,
        leaves_kept: true,
    };

    /// Permits of a token bucket of `burst` that must stay in it; negative:
    /// how far below empty the class may take it.
    #[inline]
    pub(super) fn tokens(self, burst: u32) -> f64 {
        let held = f64::from(held_back(burst, self.held));
        if self.borrow <= 0.0 {
            return held;
        }
        // A bucket too small for a whole permit of the reserve still gives
        // one: the headroom is repaid from the refill, not kept in the burst.
        let borrowed = (f64::from(burst) * self.borrow + 1e-9).floor().max(1.0);
        (held - borrowed).min(-1.0)
    }

    /// Slots of `max` that must stay free (slots are never borrowed).
    #[inline]
    pub(super) fn slots(self, max: u32) -> u32 {
        held_back(max, self.held)
    }
}

/// Whole permits or slots of `capacity` held back by a reserve `share`
/// (rounded down, so a small bucket keeps at least one for everyone; 0 for
/// a negative share).
#[inline]
pub(super) fn held_back(capacity: u32, share: f64) -> u32 {
    ((f64::from(capacity) * share + 1e-9).floor() as u32).min(capacity.saturating_sub(1))
}
