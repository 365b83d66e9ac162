//! Learning from upstream throttling, for one bucket instance: the freeze
//! after a 429, the effective rate (cut on congestion, regrown on success),
//! the limit learned from rate-limit headers, and the 429-ratio backstop.
//! Pure: the clock is passed in; the tenant applies the results to the
//! instance's token bucket.
//!
//! The rules (README "How the broker learns" has a worked example):
//! - **Freeze.** A 429 freezes the bucket until its Retry-After (or the
//!   default freeze). Reports of the same wave only extend the freeze.
//! - **Cut, once per episode.** The first 429 of a congestion episode cuts
//!   the effective rate. When its Retry-After ends within a bucket window,
//!   the upstream's window is taken to end then, and the successes reported
//!   since that window began (or since the previous freeze ended, when that
//!   was at about its start: the calls the freeze released are the
//!   window's) are what it served the fleet (the "window
//!   fill"): the rate is cut to that less one permit, by at most β² and
//!   at least one permit per window. A 429 whose implied window began
//!   before the previous refusal (no fixed window does that: the upstream
//!   refills continuously or ages a log) cuts instead to what was served
//!   between the refusals (see `refill_rate`), or by a tenth of a permit
//!   where that reads at or above the rate refused (the upstream kept up:
//!   the refusal was its empty bucket's, not the rate's). A 429 without a usable
//!   Retry-After cuts by β. Either way the rate then holds for `probe_hold_windows` and for
//!   1/`ratio_threshold` successful calls before it grows again, so probing
//!   for capacity that is not there costs about one 429 per that many calls.
//!   The episode lasts until the freeze ends plus a grace; further 429s in it
//!   (twenty clients reporting the same wave) do not cut again.
//! - **Additive regrowth.** Each successful report outside an episode adds
//!   back `configured / recovery_windows` per bucket window elapsed since the
//!   last growth (at most one window's worth at a time). Additive rather than
//!   CUBIC: the broker is the fleet's one sender and the upstream's headers
//!   already tell it how much budget is left, so the rate only needs a slow,
//!   predictable probe; a fast convex return to the old maximum is what
//!   produces the next wave of 429s.
//! - **Ratio backstop.** A fleet whose share of 429s stays above a small
//!   threshold (1% by default) is pushing too hard, whatever the episodes
//!   say: the 429 ratio over a sliding window is tracked, and when a new
//!   episode starts while it is above the threshold (with enough reports to
//!   mean something), the rate is cut further to `ratio_cut` of itself
//!   (default 0.8) and held there for the cooldown (default an hour).
//! - **Bounds.** Never above the configured rate; never below the floor,
//!   which bounds only the learner's own cuts: a limit the upstream stated
//!   (the learned limit) caps the rate even below the floor.

mod ceiling;
mod measure;

use super::served::{Fills, Ratio};
use measure::Refusal;
use std::time::Duration;
use tokio::time::Instant;

/// How the broker learns; from `[learning]` in the config. `Copy`: a
/// report reads it while the tenant state is borrowed mutably.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearnSettings {
    /// Multiplicative cut on a new congestion episode.
    pub beta: f64,
    /// The learner's own cuts never take the rate below `configured ×
    /// floor_fraction`; a limit the upstream states may.
    pub floor_fraction: f64,
    /// Freeze after a 429 that says no Retry-After.
    pub default_freeze: Duration,
    /// Longest freeze or upstream-budget block one report may impose, so a
    /// wild `Retry-After` or reset cannot block a bucket for years.
    pub max_freeze: Duration,
    /// How long after a freeze ends further 429s still belong to its
    /// episode (at most a quarter of the bucket's window).
    pub episode_grace: Duration,
    /// Windows it takes to regrow from zero to the configured rate.
    pub recovery_windows: f64,
    /// Windows after a cut before the rate may grow again.
    pub probe_hold_windows: f64,
    /// Longest wait, in windows, before probing above a ceiling the
    /// upstream confirmed by refusing about the same rate again.
    pub probe_max_windows: f64,
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
            max_freeze: Duration::from_secs(15 * 60),
            episode_grace: Duration::from_secs(2),
            recovery_windows: 5.0,
            probe_hold_windows: 3.0,
            probe_max_windows: 8.0,
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
pub(crate) enum Learned {
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
    /// The upstream budget view: remaining, its reset, its window.
    pub upstream: Option<(u32, Instant, Duration)>,
    /// The ceiling memory: the rate the upstream last refused, per minute,
    /// and how many 429s in a row came at about that rate.
    pub ceiling: Option<(f64, u32)>,
    /// The learned concurrency limit and how many refusals in a row
    /// confirmed it (see `SlotLearner`).
    pub slots: Option<(u32, u32)>,
    /// The upstream was seen refilling continuously (see
    /// `Learner::refills_continuously`).
    pub refills_continuously: bool,
    /// The window the learned limit applies to (filled in by the tenant:
    /// the header window is the bucket instance's).
    pub limit_window: Option<Duration>,
}

/// The learning state of one bucket instance.
#[derive(Debug, Clone)]
pub(crate) struct Learner {
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
    /// No growth before this (after a cut)...
    hold_until: Option<Instant>,
    /// ...nor before this many successes since the cut.
    since_cut: u64,
    /// The rate the upstream last refused (see `ceiling_growth`).
    ceiling: Option<f64>,
    /// How many 429s in a row came at about that rate.
    ceiling_hits: u32,
    /// No probing above the ceiling before this.
    probe_after: Option<Instant>,
    /// The ceiling a probe passed by a tenth, forgetting it as a rise, and
    /// how often it had been confirmed (see `Learner::confirmed_by_probe`).
    passed_ceiling: Option<(f64, u32)>,
    /// Successful reports ever counted (a clock for "served since").
    served: u64,
    /// The last 429 of the last episode that cut (see `refill_rate`).
    last_refusal: Option<Refusal>,
    /// Whether the current episode is the one `last_refusal` began.
    refusal_episode: bool,
    /// Successes and seconds of serving counted since the first refusal
    /// of the current descent (see `refill_rate`).
    descent: Option<(f64, f64)>,
    /// A 429 came within the window the previous one implied: the
    /// upstream gives permits back while it refuses (see `refill_rate`).
    continuous: bool,
    ratio: Ratio,
    fills: Fills,
}

impl Learner {
    /// A learner for a bucket configured at `configured_per_min` (0 for
    /// none) per `window`.
    pub(crate) fn new(configured_per_min: f64, window: Duration, now: Instant) -> Learner {
        Learner {
            configured: configured_per_min,
            window: window.max(Duration::from_millis(1)),
            effective: configured_per_min,
            learned_limit: None,
            frozen_until: None,
            episode_until: None,
            cooldown: None,
            last_growth: None,
            hold_until: None,
            since_cut: 0,
            ceiling: None,
            ceiling_hits: 0,
            probe_after: None,
            passed_ceiling: None,
            served: 0,
            last_refusal: None,
            refusal_episode: false,
            descent: None,
            continuous: false,
            ratio: Ratio::new(now),
            fills: Fills::new(now, window.max(Duration::from_millis(1))),
        }
    }

    /// The rate to grant at, per minute: the effective rate within its
    /// bounds, in this order: at most the configured rate and the cooldown
    /// cap, at least the floor, at most the learned limit. The floor bounds
    /// the learner's own cuts (from 429s and the backstop); a limit the
    /// upstream stated wins over it.
    pub(crate) fn rate(&self, now: Instant, s: &LearnSettings) -> f64 {
        let mut cap = self.configured;
        if let Some((until, held)) = self.cooldown {
            if now < until {
                cap = cap.min(held);
            }
        }
        let rate = self.effective.min(cap).max(self.floor(s));
        match self.learned_limit {
            Some(l) => rate.min(l),
            None => rate,
        }
    }

    fn floor(&self, s: &LearnSettings) -> f64 {
        self.configured * s.floor_fraction
    }

    /// An operator changed the configured rate. A rate nothing cut (it ran
    /// at the configured one) follows the change either way; a rate a 429
    /// cut keeps its value within the new bound (and regrows toward it).
    pub(crate) fn set_configured(&mut self, per_min: f64, window: Duration) {
        let uncut = self.effective >= self.configured;
        self.configured = per_min;
        self.window = window.max(Duration::from_millis(1));
        self.fills = Fills::new(self.fills.origin(), self.window);
        self.effective = if uncut {
            per_min
        } else {
            self.effective.min(per_min)
        };
        if self.effective <= 0.0 {
            self.effective = per_min;
        }
    }

    /// The configured rate per minute.
    pub(crate) fn configured(&self) -> f64 {
        self.configured
    }

    /// The bucket's configured window.
    pub(crate) fn window(&self) -> Duration {
        self.window
    }

    /// The learned limit per minute, if any.
    pub(crate) fn learned_limit(&self) -> Option<f64> {
        self.learned_limit
    }

    /// Until when the bucket is frozen, if it is at `now`.
    pub(crate) fn frozen_until(&self, now: Instant) -> Option<Instant> {
        self.frozen_until.filter(|&t| t > now)
    }

    /// Until when the backstop holds the rate, if it does at `now`.
    pub(crate) fn cooldown_until(&self, now: Instant) -> Option<Instant> {
        self.cooldown.map(|c| c.0).filter(|&t| t > now)
    }

    /// Whether nothing has been learned that is still in force at `now`
    /// (such an instance can be dropped and re-created without loss).
    pub(crate) fn is_pristine(&self, now: Instant) -> bool {
        self.effective >= self.configured
            && self.learned_limit.is_none()
            && self.frozen_until(now).is_none()
            && self.cooldown_until(now).is_none()
    }

    /// The 429 ratio over the ratio window ending at `now`.
    pub(crate) fn throttle_ratio(&self, now: Instant, s: &LearnSettings) -> f64 {
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
    pub(crate) fn on_throttled(
        &mut self,
        now: Instant,
        retry_after: Option<Duration>,
        budget_spent: bool,
        s: &LearnSettings,
    ) -> Vec<Learned> {
        let mut out = Vec::new();
        self.ratio.record(now, true, s.ratio_window);
        let previous_freeze = self.frozen_until;
        let until = now + retry_after.unwrap_or(s.default_freeze);
        if self.frozen_until.is_none_or(|f| f < until) {
            self.frozen_until = Some(until);
            out.push(Learned::Frozen { until });
        }
        let new_episode = self.episode_until.is_none_or(|e| now >= e);
        // Stragglers of one episode come back within a round trip; a 429 a
        // window later is new congestion, whatever the configured grace.
        let grace = s.episode_grace.min(self.window / 4);
        let episode_end = self.frozen_until.unwrap_or(until) + grace;
        self.episode_until = Some(
            self.episode_until
                .map_or(episode_end, |e| e.max(episode_end)),
        );
        if new_episode {
            self.refusal_episode = false;
        } else if self.refusal_episode {
            // A straggler the upstream refused at the freeze's end: the
            // measure of its refill starts again from it (see `refill_rate`).
            if let Some(r) = self.last_refusal.as_mut() {
                let per_min = self.effective.min(self.configured);
                let freeze = retry_after.unwrap_or(s.default_freeze);
                *r = Refusal::new(now, self.served, freeze, per_min);
            }
        }
        if !new_episode || self.configured <= 0.0 {
            return out;
        }
        self.last_growth = Some(now);
        if !budget_spent {
            let from = self.rate(now, s);
            let cut = (from * s.beta).max(self.floor(s));
            self.remember_ceiling(from);
            let most = (from * s.beta * s.beta).max(self.floor(s));
            let least = (from - self.per_min(1.0)).max(most);
            let since_refusal = self.refill_since_last_refusal(now);
            let passed = self.passed_ceiling.take();
            let refill = self.refill_rate(now, retry_after);
            let ra = retry_after.unwrap_or(s.default_freeze);
            self.last_refusal = Some(Refusal::new(now, self.served, ra, from));
            self.refusal_episode = true;
            let (to, why) = match refill {
                Some(None) => (
                    least,
                    "429 again within the window the last one implied, too soon to measure \
                     the upstream's refill: cut by one permit",
                ),
                Some(Some(rate)) => {
                    // The rate refused was inflated by what the upstream
                    // held; the refill is where its ceiling is. No permit
                    // less, as after a window fill: the measure is not
                    // biased either way, and paced evenly at its refill a
                    // continuous upstream refuses nothing.
                    self.ceiling = Some(rate.max(self.floor(s)));
                    self.ceiling_hits = 0;
                    if rate >= from {
                        // The upstream served the fleet at least the rate
                        // refused: the 429 was the jitter of an empty
                        // bucket paced at its refill, and a whole permit
                        // less would starve a class that asks exactly
                        // what is left.
                        (
                            (from - self.per_min(0.1)).max(most),
                            "429 again within the window the last one implied, the upstream \
                             serving the fleet at least the rate refused since: cut by a tenth \
                             of a permit",
                        )
                    } else {
                        (
                            rate.clamp(most, least),
                            "429 again within the window the last one implied: cut to the rate \
                             the upstream served the fleet between the refusals of this descent",
                        )
                    }
                }
                // One window's measurement cuts at most two β steps, and at
                // least one permit per window.
                None => match (
                    Self::confirmed_by_probe(passed, since_refusal),
                    self.window_fill(now, retry_after, previous_freeze),
                ) {
                    (Some((rate, hits)), _) => {
                        self.ceiling = Some(rate.max(self.floor(s)));
                        self.ceiling_hits = hits;
                        (
                            rate.clamp(most, least),
                            "429 ending a probe above the ceiling, which the upstream served about \
                             again since its previous refusal: cut to that rate",
                        )
                    }
                    (None, Some(fill)) => (
                        fill.clamp(most, least),
                        "429: cut to what the upstream's window served the fleet",
                    ),
                    (None, None) => (cut, "429: multiplicative decrease (new congestion episode)"),
                },
            };
            self.effective = to;
            self.hold_until = Some(
                now + retry_after.unwrap_or(s.default_freeze)
                    + self.window.mul_f64(s.probe_hold_windows.max(0.0)),
            );
            self.since_cut = 0;
            out.push(Learned::Cut { from, to, why });
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
                why: "the 429 ratio is above learning.ratio_threshold: cut to learning.ratio_cut of the rate \
                      and held for learning.cooldown_ms",
            });
        }
        out
    }

    /// `permits` per bucket window, as a rate per minute.
    fn per_min(&self, permits: f64) -> f64 {
        permits * 60.0 / self.window.as_secs_f64()
    }

    /// A successful upstream call: count it and regrow the rate.
    pub(crate) fn on_success(&mut self, now: Instant, s: &LearnSettings) {
        self.ratio.record(now, false, s.ratio_window);
        self.fills.record(now);
        self.served = self.served.saturating_add(1);
        self.since_cut = self.since_cut.saturating_add(1);
        if self.configured <= 0.0
            || self.frozen_until(now).is_some()
            || self.episode_until.is_some_and(|e| now < e)
        {
            return;
        }
        if let Some(hold) = self.hold_until {
            // A probe above the last cut costs a 429 when the capacity is
            // not there: at most one per 1/ratio_threshold calls.
            let calls = if s.ratio_threshold > 0.0 {
                (1.0 / s.ratio_threshold).min(1e9) as u64
            } else {
                0
            };
            if now < hold || self.since_cut < calls {
                return;
            }
            // Growth accrues from the end of the hold.
            self.hold_until = None;
            self.last_growth = Some(hold);
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
        let rate = self.rate(now, s);
        if let Some(next) = self.ceiling_growth(rate, step, now, s) {
            self.effective = next.min(self.configured);
        }
    }

    /// The upstream says its limit is `per_min` per minute. Below the
    /// configured rate it becomes the learned limit; at or above, the
    /// learned limit is dropped.
    pub(crate) fn on_limit(&mut self, per_min: f64) -> Option<Learned> {
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
    pub(crate) fn persisted(&self) -> Persisted {
        Persisted {
            effective_per_min: self.effective,
            learned_limit_per_min: self.learned_limit,
            frozen_until: self.frozen_until,
            cooldown: self.cooldown,
            upstream: None,
            ceiling: self.ceiling.map(|c| (c, self.ceiling_hits)),
            slots: None,
            refills_continuously: self.continuous,
            limit_window: None,
        }
    }

    /// Whether the upstream was seen giving permits back while it refused
    /// (a token bucket refilling, a sliding log ageing entries out) rather
    /// than resetting whole windows: where it does, the broker's pace at
    /// the learned rate is all the upstream has. An upstream's kind does
    /// not change: once seen, kept (and persisted).
    pub(crate) fn refills_continuously(&self) -> bool {
        self.continuous
    }

    /// Whether a ceiling is remembered.
    pub(crate) fn has_ceiling(&self) -> bool {
        self.ceiling.is_some()
    }

    /// Restores persisted state (clamped to the configured rate).
    pub(crate) fn restore(&mut self, p: Persisted) {
        if p.effective_per_min.is_finite() && p.effective_per_min > 0.0 {
            self.effective = p.effective_per_min.min(self.configured);
        }
        self.learned_limit = p
            .learned_limit_per_min
            .filter(|l| l.is_finite() && *l > 0.0);
        self.frozen_until = p.frozen_until;
        self.episode_until = p.frozen_until;
        self.cooldown = p.cooldown;
        // The wait before the next probe starts over from the restart.
        if let Some((c, hits)) = p.ceiling.filter(|(c, _)| c.is_finite() && *c > 0.0) {
            self.ceiling = Some(c);
            self.ceiling_hits = hits.min(8);
            self.probe_after = None;
        }
        self.continuous |= p.refills_continuously;
    }
}

#[cfg(test)]
mod tests;
