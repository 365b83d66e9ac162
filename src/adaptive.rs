//! Learning from upstream throttling, for one bucket instance: the freeze
//! after a 429, the effective rate (cut on congestion, regrown on success),
//! the limit learned from rate-limit headers, and the 429-ratio backstop.
//! Pure: the clock is passed in; `tenant.rs` applies the results to the
//! instance's token bucket.
//!
//! The rules (README "How the broker learns" has a worked example):
//! - **Freeze.** A 429 freezes the bucket until its Retry-After (or the
//!   default freeze). Reports of the same wave only extend the freeze.
//! - **Multiplicative cut, once per episode.** The first 429 of a congestion
//!   episode cuts the effective rate by β. The episode lasts until the freeze
//!   ends plus a grace; further 429s in it (twenty clients reporting the same
//!   wave) do not cut again.
//! - **Additive regrowth.** Each successful report outside an episode adds
//!   back `configured / recovery_windows` per bucket window elapsed since the
//!   last growth (at most one window's worth at a time). Additive rather than
//!   CUBIC: the broker is the fleet's one sender and the upstream's headers
//!   already tell it how much budget is left, so the rate only needs a slow,
//!   predictable probe; a fast convex return to the old maximum is what
//!   produces the next wave of 429s.
//! - **Ratio backstop** (seed 001's rule). The 429 ratio over a sliding
//!   window is tracked; when a new episode starts while it is above the
//!   threshold (with enough reports to mean something), the rate is cut a
//!   further 20% and held there for the cooldown.
//! - **Bounds.** Never below the floor, never above the configured rate or a
//!   learned limit.

use std::time::Duration;
use tokio::time::Instant;

/// How the broker learns; from `[learning]` in the config. `Copy`: a
/// report reads it while the tenant state is borrowed mutably.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearnSettings {
    /// Multiplicative cut on a new congestion episode.
    pub beta: f64,
    /// Effective rate never goes below `configured × floor_fraction`.
    pub floor_fraction: f64,
    /// Freeze after a 429 that says no Retry-After.
    pub default_freeze: Duration,
    /// How long after a freeze ends further 429s still belong to its episode.
    pub episode_grace: Duration,
    /// Windows it takes to regrow from zero to the configured rate.
    pub recovery_windows: f64,
    /// Sliding window of the 429 ratio.
    pub ratio_window: Duration,
    /// 429 ratio above which the backstop cuts.
    pub ratio_threshold: f64,
    /// Fewer reports than this in the ratio window say nothing.
    pub ratio_min_reports: u64,
    /// The backstop keeps this share of the rate (0.8 = cut 20%).
    pub ratio_cut: f64,
    /// How long the backstop holds the rate down.
    pub cooldown: Duration,
    /// Random delay added to a freeze's end, as a share of one permit
    /// interval, so instances do not resume in lockstep.
    pub jitter: f64,
}

impl Default for LearnSettings {
    fn default() -> Self {
        LearnSettings {
            beta: 0.7,
            floor_fraction: 0.05,
            default_freeze: Duration::from_secs(10),
            episode_grace: Duration::from_secs(2),
            recovery_windows: 5.0,
            ratio_window: Duration::from_secs(60),
            ratio_threshold: 0.01,
            ratio_min_reports: 100,
            ratio_cut: 0.8,
            cooldown: Duration::from_secs(3600),
            jitter: 1.0,
        }
    }
}

/// Something the learner changed, for the info log.
#[derive(Debug, Clone, PartialEq)]
pub enum Learned {
    /// Frozen until this instant.
    Frozen {
        /// Until when.
        until: Instant,
    },
    /// The effective rate was cut.
    Cut {
        /// Rate before, per minute.
        from: f64,
        /// Rate after, per minute.
        to: f64,
        /// Which rule.
        why: &'static str,
    },
    /// A limit below the configured rate was learned from headers.
    Limit {
        /// The learned limit per minute.
        per_min: f64,
    },
}

/// Outcomes counted per second over the ratio window.
#[derive(Debug, Clone)]
struct Ratio {
    /// (second index, reports, throttled), oldest first.
    slots: std::collections::VecDeque<(u64, u64, u64)>,
    origin: Instant,
}

impl Ratio {
    fn new(origin: Instant) -> Ratio {
        Ratio {
            slots: Default::default(),
            origin,
        }
    }

    fn record(&mut self, now: Instant, throttled: bool, window: Duration) {
        let sec = now.saturating_duration_since(self.origin).as_secs();
        self.expire(sec, window);
        match self.slots.back_mut() {
            Some(s) if s.0 == sec => {
                s.1 += 1;
                s.2 += u64::from(throttled);
            }
            _ => self.slots.push_back((sec, 1, u64::from(throttled))),
        }
    }

    fn expire(&mut self, sec: u64, window: Duration) {
        let keep = window.as_secs().max(1);
        while self.slots.front().is_some_and(|s| s.0 + keep <= sec) {
            self.slots.pop_front();
        }
    }

    /// (reports, throttled) in the window ending at `now`.
    fn totals(&self, now: Instant, window: Duration) -> (u64, u64) {
        let sec = now.saturating_duration_since(self.origin).as_secs();
        let keep = window.as_secs().max(1);
        self.slots
            .iter()
            .filter(|s| s.0 + keep > sec)
            .fold((0, 0), |(r, t), s| (r + s.1, t + s.2))
    }
}

/// Learned state worth keeping across a restart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Persisted {
    /// Effective rate per minute.
    pub effective_per_min: f64,
    /// Learned limit per minute.
    pub learned_limit_per_min: Option<f64>,
    /// Freeze end.
    pub frozen_until: Option<Instant>,
    /// Backstop cooldown end and the rate it holds.
    pub cooldown: Option<(Instant, f64)>,
}

/// The learning state of one bucket instance.
#[derive(Debug, Clone)]
pub struct Learner {
    /// Configured rate per minute (0: the bucket has no rate).
    configured: f64,
    /// The bucket's window, the time unit of regrowth.
    window: Duration,
    effective: f64,
    learned_limit: Option<f64>,
    frozen_until: Option<Instant>,
    episode_until: Option<Instant>,
    cooldown: Option<(Instant, f64)>,
    last_growth: Option<Instant>,
    ratio: Ratio,
}

impl Learner {
    /// A learner for a bucket configured at `configured_per_min` (0 for
    /// none) per `window`.
    pub fn new(configured_per_min: f64, window: Duration, now: Instant) -> Learner {
        Learner {
            configured: configured_per_min,
            window: window.max(Duration::from_millis(1)),
            effective: configured_per_min,
            learned_limit: None,
            frozen_until: None,
            episode_until: None,
            cooldown: None,
            last_growth: None,
            ratio: Ratio::new(now),
        }
    }

    /// The rate to grant at, per minute: the effective rate within its
    /// bounds (floor, configured, learned limit, cooldown cap).
    pub fn rate(&self, now: Instant, s: &LearnSettings) -> f64 {
        let mut cap = self.configured;
        if let Some(l) = self.learned_limit {
            cap = cap.min(l);
        }
        if let Some((until, held)) = self.cooldown {
            if now < until {
                cap = cap.min(held);
            }
        }
        self.effective.min(cap).max(self.floor(s))
    }

    fn floor(&self, s: &LearnSettings) -> f64 {
        self.configured * s.floor_fraction
    }

    /// An operator changed the configured rate: the effective rate keeps
    /// its value within the new bound (and regrows toward it).
    pub fn set_configured(&mut self, per_min: f64, window: Duration) {
        self.configured = per_min;
        self.window = window.max(Duration::from_millis(1));
        self.effective = self.effective.min(per_min);
        if self.effective <= 0.0 {
            self.effective = per_min;
        }
    }

    /// The configured rate per minute.
    pub fn configured(&self) -> f64 {
        self.configured
    }

    /// The learned limit per minute, if any.
    pub fn learned_limit(&self) -> Option<f64> {
        self.learned_limit
    }

    /// Until when the bucket is frozen, if it is at `now`.
    pub fn frozen_until(&self, now: Instant) -> Option<Instant> {
        self.frozen_until.filter(|&t| t > now)
    }

    /// Until when the backstop holds the rate, if it does at `now`.
    pub fn cooldown_until(&self, now: Instant) -> Option<Instant> {
        self.cooldown.map(|c| c.0).filter(|&t| t > now)
    }

    /// Whether nothing has been learned that is still in force at `now`
    /// (such an instance can be dropped and re-created without loss).
    pub fn is_pristine(&self, now: Instant) -> bool {
        self.effective >= self.configured
            && self.learned_limit.is_none()
            && self.frozen_until(now).is_none()
            && self.cooldown_until(now).is_none()
    }

    /// The 429 ratio over the ratio window ending at `now`.
    pub fn throttle_ratio(&self, now: Instant, s: &LearnSettings) -> f64 {
        let (reports, throttled) = self.ratio.totals(now, s.ratio_window);
        if reports == 0 {
            0.0
        } else {
            throttled as f64 / reports as f64
        }
    }

    /// A 429: freeze for `retry_after` (or the default), cut once per
    /// episode, and apply the ratio backstop. A 429 whose headers show the
    /// upstream's budget used up (`budget_spent`) is a budget event, not
    /// rate congestion: the freeze until the reset is the whole answer and
    /// the rate is not cut (the budget view paces the next window).
    pub fn on_throttled(
        &mut self,
        now: Instant,
        retry_after: Option<Duration>,
        budget_spent: bool,
        s: &LearnSettings,
    ) -> Vec<Learned> {
        let mut out = Vec::new();
        self.ratio.record(now, true, s.ratio_window);
        let until = now + retry_after.unwrap_or(s.default_freeze);
        if self.frozen_until.is_none_or(|f| f < until) {
            self.frozen_until = Some(until);
            out.push(Learned::Frozen { until });
        }
        let new_episode = self.episode_until.is_none_or(|e| now >= e);
        let episode_end = self.frozen_until.unwrap_or(until) + s.episode_grace;
        self.episode_until = Some(
            self.episode_until
                .map_or(episode_end, |e| e.max(episode_end)),
        );
        if !new_episode || self.configured <= 0.0 {
            return out;
        }
        self.last_growth = Some(now);
        if !budget_spent {
            let from = self.rate(now, s);
            self.effective = (from * s.beta).max(self.floor(s));
            out.push(Learned::Cut {
                from,
                to: self.effective,
                why: "429: multiplicative decrease (new congestion episode)",
            });
        }
        let (reports, throttled) = self.ratio.totals(now, s.ratio_window);
        let over =
            reports >= s.ratio_min_reports && throttled as f64 > s.ratio_threshold * reports as f64;
        if over && self.cooldown_until(now).is_none() {
            let from = self.rate(now, s);
            self.effective = (from * s.ratio_cut).max(self.floor(s));
            self.cooldown = Some((now + s.cooldown, self.effective));
            out.push(Learned::Cut {
                from,
                to: self.effective,
                why: "429 ratio above threshold: cut 20% and hold for the cooldown",
            });
        }
        out
    }

    /// A successful upstream call: count it and regrow the rate.
    pub fn on_success(&mut self, now: Instant, s: &LearnSettings) {
        self.ratio.record(now, false, s.ratio_window);
        if self.configured <= 0.0
            || self.frozen_until(now).is_some()
            || self.episode_until.is_some_and(|e| now < e)
        {
            return;
        }
        // Growth accrues only outside freezes and episodes.
        let from = match (self.last_growth, self.episode_until) {
            (Some(g), Some(e)) => Some(g.max(e)),
            (g, e) => g.or(e),
        };
        let since = from
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
            .min(self.window);
        self.last_growth = Some(now);
        let step = self.configured / s.recovery_windows.max(0.1)
            * (since.as_secs_f64() / self.window.as_secs_f64());
        // Grow from the rate actually in force, so a cap lifted later does
        // not release a backlog of growth at once.
        self.effective = (self.rate(now, s) + step).min(self.configured);
    }

    /// The upstream says its limit is `per_min` per minute. Below the
    /// configured rate it becomes the learned limit; at or above, the
    /// learned limit is dropped.
    pub fn on_limit(&mut self, per_min: f64) -> Option<Learned> {
        if !(per_min.is_finite() && per_min > 0.0) || self.configured <= 0.0 {
            return None;
        }
        if per_min + 1e-9 < self.configured {
            let changed = self
                .learned_limit
                .is_none_or(|l| (l - per_min).abs() > 1e-6);
            self.learned_limit = Some(per_min);
            changed.then_some(Learned::Limit { per_min })
        } else {
            self.learned_limit = None;
            None
        }
    }

    /// The state worth persisting.
    pub fn persisted(&self) -> Persisted {
        Persisted {
            effective_per_min: self.effective,
            learned_limit_per_min: self.learned_limit,
            frozen_until: self.frozen_until,
            cooldown: self.cooldown,
        }
    }

    /// Restores persisted state (clamped to the configured rate).
    pub fn restore(&mut self, p: Persisted) {
        if p.effective_per_min.is_finite() && p.effective_per_min > 0.0 {
            self.effective = p.effective_per_min.min(self.configured);
        }
        self.learned_limit = p
            .learned_limit_per_min
            .filter(|l| l.is_finite() && *l > 0.0);
        self.frozen_until = p.frozen_until;
        self.episode_until = p.frozen_until;
        self.cooldown = p.cooldown;
    }
}

/// What the upstream says is left of a budget until its window resets,
/// kept current between reports by counting our own grants down, with a
/// margin for what consumers the broker does not manage will spend before
/// the reset (estimated from what they spent in the previous window).
#[derive(Debug, Clone, Copy)]
pub struct UpstreamBudget {
    /// Upstream's remaining, minus our grants since it said so.
    remaining: u32,
    reset_at: Instant,
    window: Duration,
    /// Our grants in this upstream window.
    ours: u32,
    /// Our grants after this window's reset, before the upstream told us
    /// of the next window: they belong to the next one.
    carried: u32,
    /// Most of the budget the upstream reported used in this window.
    max_used: u64,
    /// What others spent in the previous window.
    others_prev: f64,
}

impl UpstreamBudget {
    /// Folds a report (`limit` if stated, `remaining`, time to `reset`, the
    /// budget's `window`) into the previous view.
    pub fn observe(
        prev: Option<UpstreamBudget>,
        limit: Option<u64>,
        remaining: u64,
        reset: Duration,
        window: Duration,
        now: Instant,
    ) -> UpstreamBudget {
        let reset_at = now + reset;
        let remaining32 = u32::try_from(remaining).unwrap_or(u32::MAX);
        let used = limit.map_or(0, |l| l.saturating_sub(remaining));
        match prev {
            // The same upstream window: responses race each other, and we
            // count our own grants down, so the lower figure is the newer.
            Some(p)
                if p.reset_at > now && abs_diff(p.reset_at, reset_at) <= Duration::from_secs(1) =>
            {
                UpstreamBudget {
                    remaining: p.remaining.min(remaining32),
                    reset_at: p.reset_at.max(reset_at),
                    max_used: p.max_used.max(used),
                    ..p
                }
            }
            _ => UpstreamBudget {
                remaining: remaining32,
                reset_at,
                window: window.max(reset).max(Duration::from_millis(1)),
                ours: prev.map_or(0, |p| p.carried),
                carried: 0,
                max_used: used,
                others_prev: prev
                    .map_or(0.0, |p| p.max_used.saturating_sub(u64::from(p.ours)) as f64),
            },
        }
    }

    /// Counts `n` of our grants made at `now`.
    pub fn take(&mut self, n: u32, now: Instant) {
        if now >= self.reset_at {
            self.carried = self.carried.saturating_add(n);
        } else {
            self.remaining = self.remaining.saturating_sub(n);
            self.ours = self.ours.saturating_add(n);
        }
    }

    /// The upstream's remaining budget as we see it, while its window lasts.
    pub fn remaining(&self, now: Instant) -> Option<u32> {
        (self.reset_at > now).then_some(self.remaining)
    }

    /// The earliest instant `n` more grants fit, leaving room for what
    /// others are expected to spend until the reset; `None` when the
    /// budget does not constrain us.
    pub fn ready_at(&self, n: u32, now: Instant) -> Option<Instant> {
        if self.reset_at <= now {
            return None;
        }
        let spare = f64::from(self.remaining) - f64::from(n);
        if spare < 0.0 {
            return Some(self.reset_at);
        }
        if self.others_prev <= 0.0 {
            return None;
        }
        // Others spend `others_prev` per window: by instant t they will
        // still take others_prev × (reset − t) / window before the reset.
        let lead = self.window.mul_f64((spare / self.others_prev).min(1e6));
        self.reset_at.checked_sub(lead).filter(|&t| t > now)
    }
}

fn abs_diff(a: Instant, b: Instant) -> Duration {
    a.max(b) - a.min(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn learner(now: Instant) -> Learner {
        Learner::new(60.0, Duration::from_secs(60), now)
    }

    #[test]
    fn a_wave_of_identical_429s_cuts_once() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let mut l = learner(t0);
        let mut cuts = 0;
        for i in 0..20 {
            let out = l.on_throttled(
                t0 + Duration::from_millis(i * 50),
                Some(15 * SEC),
                false,
                &s,
            );
            cuts += out
                .iter()
                .filter(|c| matches!(c, Learned::Cut { .. }))
                .count();
        }
        assert_eq!(cuts, 1);
        assert!((l.rate(t0, &s) - 42.0).abs() < 1e-9);
        assert!(l.frozen_until(t0).is_some_and(|f| f >= t0 + 15 * SEC));
        // After the episode, a new 429 is a new episode.
        let later = t0 + 20 * SEC;
        let out = l.on_throttled(later, Some(SEC), false, &s);
        assert!(out.iter().any(|c| matches!(c, Learned::Cut { .. })));
    }

    #[test]
    fn a_429_without_retry_after_freezes_for_the_default() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let mut l = learner(t0);
        l.on_throttled(t0, None, false, &s);
        assert_eq!(l.frozen_until(t0), Some(t0 + s.default_freeze));
        assert_eq!(l.frozen_until(t0 + s.default_freeze), None);
    }

    #[test]
    fn a_429_with_the_budget_spent_freezes_without_cutting() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let mut l = learner(t0);
        let out = l.on_throttled(t0, Some(20 * SEC), true, &s);
        assert_eq!(
            out,
            [Learned::Frozen {
                until: t0 + 20 * SEC
            }]
        );
        assert_eq!(l.rate(t0, &s), 60.0);
    }

    #[test]
    fn success_regrows_additively_up_to_the_configured_rate() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let mut l = learner(t0);
        l.on_throttled(t0, Some(SEC), false, &s);
        let cut = l.rate(t0, &s);
        // Frozen and in the episode: no growth.
        l.on_success(t0 + SEC / 2, &s);
        assert_eq!(l.rate(t0, &s), cut);
        let mut t = t0 + 4 * SEC;
        l.on_success(t, &s);
        for _ in 0..60 {
            t += SEC;
            l.on_success(t, &s);
        }
        // One window of successes regrows configured / recovery_windows.
        let grown = l.rate(t, &s) - cut;
        assert!(
            (grown - 60.0 / s.recovery_windows).abs() < 0.5,
            "grew {grown}"
        );
        for _ in 0..600 {
            t += SEC;
            l.on_success(t, &s);
        }
        assert_eq!(l.rate(t, &s), 60.0);
    }

    #[test]
    fn never_below_the_floor() {
        let s = LearnSettings::default();
        let mut t = Instant::now();
        let mut l = learner(t);
        for _ in 0..100 {
            l.on_throttled(t, Some(SEC), false, &s);
            t += 10 * SEC;
        }
        assert_eq!(l.rate(t, &s), 60.0 * s.floor_fraction);
    }

    #[test]
    fn ratio_backstop_cuts_20_percent_and_holds() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let mut l = learner(t0);
        let ms = |m: u64| t0 + Duration::from_millis(m);
        for i in 0..100 {
            l.on_success(ms(i * 100), &s);
        }
        // 1 of 101: below 1%, a plain β cut; a second report of the wave.
        l.on_throttled(ms(10_000), Some(SEC), false, &s);
        l.on_throttled(ms(10_100), Some(SEC), false, &s);
        assert!(l.cooldown_until(ms(10_100)).is_none());
        // A new episode while 3 of 104 (2.9%) were 429s: the backstop.
        l.on_success(ms(19_000), &s);
        let before = l.rate(ms(20_000), &s);
        l.on_throttled(ms(20_000), Some(SEC), false, &s);
        let t = ms(20_000);
        assert!(
            (l.rate(t, &s) - before * 0.7 * 0.8).abs() < 1e-9,
            "{}",
            l.rate(t, &s)
        );
        assert!(l.cooldown_until(t).is_some());
        assert!((l.throttle_ratio(t, &s) - 3.0 / 104.0).abs() < 1e-9);
        let held = l.rate(t, &s);
        // Successes for ten minutes: held during the cooldown.
        let mut now = t + 5 * SEC;
        for _ in 0..600 {
            now += SEC;
            l.on_success(now, &s);
        }
        assert!((l.rate(now, &s) - held).abs() < 1e-9);
        // The ratio window forgot the 429s.
        assert_eq!(l.throttle_ratio(now, &s), 0.0);
        let after = t + s.cooldown + SEC;
        l.on_success(after, &s);
        l.on_success(after + 60 * SEC, &s);
        assert!(l.rate(after + 60 * SEC, &s) > held);
    }

    #[test]
    fn learned_limit_caps_and_clears() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let mut l = learner(t0);
        assert!(l.on_limit(45.0).is_some());
        assert!(l.on_limit(45.0).is_none(), "unchanged is not news");
        assert_eq!(l.rate(t0, &s), 45.0);
        assert!(l.on_limit(60.0).is_none());
        assert_eq!(l.rate(t0, &s), 60.0);
        assert_eq!(l.learned_limit(), None);
    }

    #[test]
    fn persisted_state_restores() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let mut l = learner(t0);
        l.on_limit(50.0);
        l.on_throttled(t0, Some(30 * SEC), false, &s);
        let mut fresh = learner(t0);
        fresh.restore(l.persisted());
        assert_eq!(fresh.rate(t0, &s), l.rate(t0, &s));
        assert_eq!(fresh.frozen_until(t0), l.frozen_until(t0));
        assert_eq!(fresh.learned_limit(), Some(50.0));
    }

    #[test]
    fn upstream_budget_counts_down_and_leaves_room_for_others() {
        let t0 = Instant::now();
        let w = 60 * SEC;
        let b = UpstreamBudget::observe(None, Some(60), 10, 30 * SEC, w, t0);
        assert_eq!(b.remaining(t0), Some(10));
        assert_eq!(b.ready_at(10, t0), None, "no estimate of others yet");
        let mut b = b;
        b.take(4, t0);
        // A stale response (remaining 8) does not raise our view.
        let b = UpstreamBudget::observe(Some(b), Some(60), 8, 30 * SEC, w, t0);
        assert_eq!(b.remaining(t0), Some(6));
        assert_eq!(b.ready_at(7, t0), Some(t0 + 30 * SEC));
        // Next window: others spent 52 (most reported used) - 4 (ours) = 48.
        let t1 = t0 + 31 * SEC;
        let b = UpstreamBudget::observe(Some(b), Some(60), 30, 60 * SEC, w, t1);
        // 20 spare of 30: others will take 48 × (time left)/60 s, so 10 of
        // ours fit only once 25 s or less are left: at t1 + 35 s.
        let at = b.ready_at(10, t1).unwrap();
        assert!(
            abs_diff(at, t1 + 35 * SEC) < Duration::from_millis(1),
            "{:?}",
            at - t1
        );
        assert_eq!(b.remaining(t1 + 61 * SEC), None);
    }
}
