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
//!   between the refusals (see `refill_rate`). A 429 without a usable
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

use super::served::{Fills, Ratio};
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

/// A 429 that cut the rate, as the next one needs it.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    at: Instant,
    /// `Learner::served` then.
    served: u64,
    /// When the upstream is taken to have started serving again: the end
    /// of its Retry-After less one permit interval at the rate refused, or
    /// the refusal itself if that is later (see `refill_rate`).
    serving_from: Instant,
}

impl Refusal {
    /// A refusal at `at` frozen for `freeze`, when the fleet was paced at
    /// `per_min`.
    fn new(at: Instant, served: u64, freeze: Duration, per_min: f64) -> Refusal {
        let interval = Duration::from_secs_f64(60.0 / per_min.max(1e-3)).min(freeze);
        Refusal {
            at,
            served,
            serving_from: at + (freeze - interval),
        }
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
                    (
                        rate.clamp(most, least),
                        "429 again within the window the last one implied: cut to the rate the \
                         upstream served the fleet between the refusals of this descent",
                    )
                }
                // One window's measurement cuts at most two β steps, and at
                // least one permit per window.
                None => match self.window_fill(now, retry_after, previous_freeze) {
                    Some(fill) => (
                        fill.clamp(most, least),
                        "429: cut to what the upstream's window served the fleet",
                    ),
                    None => (cut, "429: multiplicative decrease (new congestion episode)"),
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

    /// The rate, per minute, that fills the upstream's window as far as this
    /// 429 shows: successes reported since the window that `retry_after`
    /// ends began, less one permit: even pacing then stays inside it while
    /// other consumers' spend wobbles by a call or so.
    /// `None` without a Retry-After within one window, or with under two
    /// successes.
    ///
    /// A freeze that ended within a counting slot of that window's start
    /// (`previous_freeze`) ended at the same reset, seen through two
    /// reports that each reached the broker a moment after the upstream
    /// answered: the calls it released are this window's, though they
    /// fall a few ms before the start this 429 implies, and the slot it
    /// ended in served nothing before it. Counting that slot by the share
    /// of it after the start would miss the calls released at once.
    fn window_fill(
        &self,
        now: Instant,
        retry_after: Option<Duration>,
        previous_freeze: Option<Instant>,
    ) -> Option<f64> {
        let reset = now + retry_after.filter(|r| *r <= self.window)?;
        let start = reset
            .checked_sub(self.window)
            .unwrap_or(self.fills.origin());
        let released_at_start = previous_freeze
            .filter(|&f| f <= now && f.max(start) - f.min(start) <= self.fills.slot());
        let served = match released_at_start {
            Some(f) => self.fills.whole_slots_since(f),
            None => self.fills.since(start),
        };
        (served >= 2.0).then(|| self.per_min(served - 1.0))
    }

    /// The rate, per minute, the upstream served the fleet between the
    /// refusals of a descent: `None` (and the descent over) unless the
    /// window this 429's Retry-After implies began before the previous
    /// refusal; `Some(None)` while the time measured is under a tenth of a
    /// window (a call or two either way would decide the figure).
    ///
    /// A window that resets whole (fixed windows) cannot contain a refusal
    /// and then serve again: the refusal blocks until the window ends. When
    /// it does, the upstream gives permits back while it refuses — a token
    /// bucket refills, a sliding log ages entries out — and what it served
    /// over that window is no measure of what it can keep serving: inflated
    /// by what it held before (a bucket that starts full serves a minute's
    /// worth on top of the refill, so a cut to the window fill lands above
    /// the refill and the next 429 follows), or deflated by the previous
    /// refusal's freeze. Between two refusals, though, such an upstream was
    /// at its limit at both ends, so it served the fleet what it refilled
    /// less what others took. The refill runs through the first one's
    /// freeze, but a freeze longer than a permit interval (a sliding log
    /// overfull after a drop) is time the upstream had nothing to give: the
    /// time measured starts one permit interval (at the rate refused)
    /// before the freeze ended, or at the refusal if that is later, and
    /// the permit the freeze gave back counts as served in it. A straggler
    /// of the same episode (a retry at the freeze's end that the upstream
    /// still refused) shows it was at its limit then too: the measure
    /// starts again from it. Neither end is biased (the upstream holds
    /// under one permit at a refusal, whichever), and summed over the
    /// descent the ±1 call of where each refusal fell weighs less.
    fn refill_rate(&mut self, now: Instant, retry_after: Option<Duration>) -> Option<Option<f64>> {
        let implied_start = retry_after
            .filter(|r| *r <= self.window)
            .and_then(|r| (now + r).checked_sub(self.window));
        let prev = self
            .last_refusal
            .filter(|p| implied_start.is_some_and(|start| start < p.at));
        let Some(prev) = prev else {
            self.descent = None;
            return None;
        };
        self.continuous = true;
        let served = self.served.saturating_sub(prev.served) as f64;
        let secs = now
            .saturating_duration_since(prev.serving_from)
            .as_secs_f64();
        let least_span = (self.window / 10).as_secs_f64();
        let (total, span) = self.descent.get_or_insert((0.0, 0.0));
        *total += served;
        *span += secs;
        Some((*span >= least_span && *span > 0.0).then(|| *total * 60.0 / *span))
    }

    /// A 429 at `rate`: at or above the remembered ceiling, or within 15%
    /// below it, it confirms it (probing above it then waits longer);
    /// further below, the capacity dropped and it is the new ceiling.
    fn remember_ceiling(&mut self, rate: f64) {
        match self.ceiling {
            Some(c) if rate >= 0.85 * c => {
                self.ceiling = Some(c.min((c + rate) / 2.0));
                self.ceiling_hits = (self.ceiling_hits + 1).min(8);
            }
            _ => {
                self.ceiling = Some(rate);
                self.ceiling_hits = 0;
            }
        }
        self.probe_after = None;
    }

    /// The rate after growing `step` from `rate` under the ceiling rule:
    /// growth stops just below the rate the upstream last refused (5% or a
    /// permit per window below it, the lower); after `probe_hold_windows`
    /// × 2^(times it was confirmed) windows there (at most
    /// `probe_max_windows`), it probes up to the ceiling by a step shrunk by
    /// that count, and past it by the full step. Past 10% above the ceiling without a 429 the ceiling has
    /// moved: it is forgotten. `None`: hold the rate.
    fn ceiling_growth(
        &mut self,
        rate: f64,
        step: f64,
        now: Instant,
        s: &LearnSettings,
    ) -> Option<f64> {
        let Some(c) = self.ceiling else {
            return Some(rate + step);
        };
        let cruise = (c * 0.95).min(c - self.per_min(1.0)).max(self.floor(s));
        if rate + 1e-9 < cruise {
            return Some((rate + step).min(cruise));
        }
        let probe_after = *self.probe_after.get_or_insert_with(|| {
            let windows = (s.probe_hold_windows * f64::from(1u32 << self.ceiling_hits.min(16)))
                .min(s.probe_max_windows)
                .max(0.0);
            now + self.window.mul_f64(windows)
        });
        if now < probe_after {
            return None;
        }
        // Up to the ceiling by a shrunk step; once past it without a 429
        // the capacity has likely risen, so the full step.
        let next = if rate < c {
            (rate + step / f64::from(1 + self.ceiling_hits.min(3))).min(c)
        } else {
            rate + step
        };
        if next > c * 1.1 {
            self.ceiling = None;
            self.ceiling_hits = 0;
            self.probe_after = None;
        }
        Some(next)
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
    fn an_operators_raise_applies_at_once_unless_a_429_cut_the_rate() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let minute = Duration::from_secs(60);
        let mut l = learner(t0);
        // Lowered, then raised: nothing was learned, the rate follows.
        l.set_configured(30.0, minute);
        assert_eq!(l.rate(t0, &s), 30.0);
        l.set_configured(240.0, minute);
        assert_eq!(l.rate(t0, &s), 240.0);
        // A 429 cut it: a raise keeps the cut (it regrows from there).
        l.on_throttled(t0, Some(SEC), false, &s);
        let cut = l.rate(t0 + 2 * SEC, &s);
        assert!(cut < 240.0, "{cut}");
        l.set_configured(480.0, minute);
        assert_eq!(l.rate(t0 + 2 * SEC, &s), cut);
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
        let s = LearnSettings {
            probe_hold_windows: 0.0,
            ratio_threshold: 0.0,
            ..Default::default()
        };
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

    /// `n` successes evenly spread over `[from, from + over)`.
    fn successes(l: &mut Learner, from: Instant, over: Duration, n: u32, s: &LearnSettings) {
        for k in 0..n {
            l.on_success(from + over * k / n, s);
        }
    }

    #[test]
    fn a_429_cuts_to_what_the_upstream_window_served() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let mut l = learner(t0);
        // The upstream window is [0 s, 60 s): 36 served in its first 40 s,
        // then a 429 saying it resets in 20 s.
        successes(&mut l, t0, 40 * SEC, 36, &s);
        let out = l.on_throttled(t0 + 40 * SEC, Some(20 * SEC), false, &s);
        assert!(
            out.iter()
                .any(|c| matches!(c, Learned::Cut { to, .. } if (to - 35.0).abs() < 1e-9)),
            "{out:?}"
        );
        // Successes before the window began do not count: 20 more served
        // from 60 s, in a window that now holds only 21.
        let t1 = t0 + 60 * SEC;
        successes(&mut l, t1, 30 * SEC, 20, &s);
        let mut l2 = l.clone();
        l.on_throttled(t1 + 30 * SEC, Some(30 * SEC), false, &s);
        // 19 is above two β steps from 35 (17.2): taken as measured.
        assert!((l.rate(t1 + 30 * SEC, &s) - 19.0).abs() < 1e-9);
        // A Retry-After longer than the window says nothing of the window.
        l2.on_throttled(t1 + 30 * SEC, Some(90 * SEC), false, &s);
        assert!((l2.rate(t1 + 30 * SEC, &s) - 35.0 * s.beta).abs() < 1e-9);
    }

    #[test]
    fn a_window_fill_cuts_at_most_two_beta_steps_and_at_least_one_permit() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let mut l = learner(t0);
        // Only 2 served before the 429: one odd window does not crash the rate.
        successes(&mut l, t0, SEC, 2, &s);
        l.on_throttled(t0 + 5 * SEC, Some(55 * SEC), false, &s);
        assert!((l.rate(t0, &s) - 60.0 * s.beta * s.beta).abs() < 1e-9);
        // 80 served at 60/min (a burst carried over): still one permit less.
        let mut l = learner(t0);
        successes(&mut l, t0, 50 * SEC, 80, &s);
        l.on_throttled(t0 + 50 * SEC, Some(10 * SEC), false, &s);
        assert!((l.rate(t0, &s) - 59.0).abs() < 1e-9);
    }

    #[test]
    fn after_a_cut_growth_waits_for_the_hold_and_enough_calls() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let mut l = learner(t0);
        successes(&mut l, t0, 40 * SEC, 36, &s);
        l.on_throttled(t0 + 40 * SEC, Some(20 * SEC), false, &s);
        let cut = l.rate(t0, &s);
        // Three windows after the reset (60 s + 180 s) at 35 calls a window:
        // held, even though 100 calls have been made by then.
        let mut t = t0 + 60 * SEC;
        successes(&mut l, t, 180 * SEC, 105, &s);
        t += 180 * SEC;
        assert_eq!(l.rate(t, &s), cut);
        // Past the hold, growth resumes, one window's worth per window.
        successes(&mut l, t, 60 * SEC, 35, &s);
        let grown = l.rate(t + 60 * SEC, &s) - cut;
        assert!(grown > 10.0 && grown <= 12.0 + 1e-9, "grew {grown}");

        // Past the hold but fewer than 1/ratio_threshold calls: still held.
        let mut l = learner(t0);
        successes(&mut l, t0, 40 * SEC, 36, &s);
        l.on_throttled(t0 + 40 * SEC, Some(20 * SEC), false, &s);
        successes(&mut l, t0 + 60 * SEC, 300 * SEC, 60, &s);
        assert_eq!(l.rate(t0 + 360 * SEC, &s), cut);
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

    /// The floor bounds the learner's own cuts, not what the upstream
    /// stated: 2 per 6 s (20/min) where 1200/min is configured and the
    /// floor is 60/min is granted at 20/min, also after 429s.
    #[test]
    fn a_stated_limit_below_the_floor_wins_over_it() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let mut l = Learner::new(1200.0, Duration::from_secs(6), t0);
        assert_eq!(l.rate(t0, &s), 1200.0);
        assert!(l.on_limit(20.0).is_some());
        assert_eq!(l.rate(t0, &s), 20.0);
        let mut t = t0;
        for _ in 0..20 {
            t += 10 * SEC;
            l.on_throttled(t, Some(SEC), false, &s);
        }
        assert_eq!(l.rate(t, &s), 20.0);
        // Without a stated limit the cuts stop at the floor.
        assert!(l.on_limit(1200.0).is_none());
        assert_eq!(l.rate(t, &s), 1200.0 * s.floor_fraction);
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
        // 1 of 101: below 1%, a plain cut (the window served 100, so one
        // permit); a second report of the wave.
        l.on_throttled(ms(10_000), Some(SEC), false, &s);
        assert!((l.rate(ms(10_000), &s) - 59.0).abs() < 1e-9);
        l.on_throttled(ms(10_100), Some(SEC), false, &s);
        assert!(l.cooldown_until(ms(10_100)).is_none());
        // A new episode while 3 of 104 (2.9%) were 429s: the backstop cuts
        // what the episode's own cut left by a further 20%.
        l.on_success(ms(19_000), &s);
        let mut plain = l.clone();
        let no_backstop = LearnSettings {
            ratio_threshold: 1.0,
            ..s
        };
        plain.on_throttled(ms(20_000), Some(SEC), false, &no_backstop);
        l.on_throttled(ms(20_000), Some(SEC), false, &s);
        let t = ms(20_000);
        assert!(
            (l.rate(t, &s) - plain.rate(t, &s) * 0.8).abs() < 1e-9,
            "{} vs {}",
            l.rate(t, &s),
            plain.rate(t, &s)
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
    fn the_ceiling_memory_survives_a_restart() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let mut l = learner(t0);
        // Refused at about 45, confirmed once.
        (l.ceiling, l.ceiling_hits) = (Some(45.0), 1);
        // And seen refilling continuously.
        l.on_throttled(t0, Some(SEC), false, &s);
        l.on_throttled(t0 + 10 * SEC, Some(SEC), false, &s);
        assert!(l.refills_continuously());
        (l.ceiling, l.ceiling_hits) = (Some(45.0), 1);
        let p = l.persisted();
        assert_eq!(p.ceiling, Some((45.0, 1)));
        let mut fresh = learner(t0);
        assert!(!fresh.refills_continuously());
        fresh.restore(p);
        assert_eq!((fresh.ceiling, fresh.ceiling_hits), (Some(45.0), 1));
        assert!(fresh.refills_continuously());
        // So regrowth after the restart stops below it, as before it.
        let grown = fresh.ceiling_growth(40.0, 12.0, t0, &s);
        assert_eq!(grown, Some(45.0 * 0.95));
    }

    /// A fleet paced by the learner against a fixed-window upstream whose
    /// capacity per window is `capacity(window)`, one step a second for
    /// `windows` windows: (429s, successes) per window.
    fn drive(s: &LearnSettings, windows: u64, capacity: impl Fn(u64) -> u64) -> Vec<(u64, u64)> {
        let t0 = Instant::now();
        let mut l = learner(t0);
        let mut out = vec![(0, 0); windows as usize];
        let mut credit = 0.0;
        for sec in 0..windows * 60 {
            let now = t0 + SEC * sec as u32;
            let w = (sec / 60) as usize;
            if l.frozen_until(now).is_some() {
                credit = 0.0;
                continue;
            }
            credit += l.rate(now, s) / 60.0;
            while credit >= 1.0 {
                credit -= 1.0;
                if out[w].1 < capacity(w as u64) {
                    out[w].1 += 1;
                    l.on_success(now, s);
                } else {
                    out[w].0 += 1;
                    let reset = SEC * (60 - (sec % 60)) as u32;
                    l.on_throttled(now, Some(reset), false, s);
                    credit = 0.0;
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn a_confirmed_ceiling_is_probed_less_and_less_often() {
        let s = LearnSettings::default();
        let run = drive(&s, 120, |_| 45);
        let late: Vec<u64> = run[20..].iter().map(|w| w.0).collect();
        let throttled: u64 = late.iter().sum();
        let served: u64 = run[20..].iter().map(|w| w.1).sum();
        // 100 windows at a steady 45: one probe at most every
        // probe_max_windows (8) once confirmed.
        assert!(throttled <= 100 / 8 + 1, "429s per window: {late:?}");
        assert!(
            served as f64 >= 0.95 * 45.0 * 100.0,
            "served {served} of {}",
            45 * 100
        );
        // Without the memory (probing as soon as the hold ends, full step)
        // the same upstream refuses more.
        let forgetful = LearnSettings {
            probe_max_windows: 0.0,
            ..s
        };
        let more: u64 = drive(&forgetful, 120, |_| 45)[20..]
            .iter()
            .map(|w| w.0)
            .sum();
        assert!(more > throttled, "{more} vs {throttled}");
    }

    /// A fleet paced by the learner against a token bucket of `capacity`
    /// (full at the start) refilled at `refill` a minute, shared with a
    /// steady unmanaged consumer of `unmanaged` a minute; Retry-After is the
    /// time to the next permit in whole seconds, rounded up. Steps of 100 ms
    /// for `windows` windows: (429s, successes) per window and the rate at
    /// the end.
    fn drive_bucket(
        s: &LearnSettings,
        windows: u64,
        (capacity, refill, unmanaged): (f64, f64, f64),
    ) -> (Vec<(u64, u64)>, f64) {
        let t0 = Instant::now();
        let mut l = learner(t0);
        let mut out = vec![(0, 0); windows as usize];
        let (mut level, mut credit, mut theirs) = (capacity, 0.0, 0.0);
        let step = Duration::from_millis(100);
        for k in 0..windows * 600 {
            let now = t0 + step * k as u32;
            let w = (k / 600) as usize;
            level = (level + refill / 600.0).min(capacity);
            theirs += unmanaged / 600.0;
            if theirs >= 1.0 && level >= 1.0 {
                theirs -= 1.0;
                level -= 1.0;
            }
            if l.frozen_until(now).is_some() {
                credit = 0.0;
                continue;
            }
            credit += l.rate(now, s) / 600.0;
            if credit >= 1.0 {
                credit -= 1.0;
                if level >= 1.0 {
                    level -= 1.0;
                    out[w].1 += 1;
                    l.on_success(now, s);
                } else {
                    out[w].0 += 1;
                    let wait = ((1.0 - level) * 60.0 / refill).ceil().max(1.0);
                    l.on_throttled(now, Some(Duration::from_secs_f64(wait)), false, s);
                    credit = 0.0;
                }
            }
        }
        let end = t0 + step * (windows * 600) as u32;
        (out, l.rate(end, s))
    }

    #[test]
    fn refusals_within_the_window_the_last_one_implied_cut_to_the_refill() {
        let s = LearnSettings::default();
        // Token buckets that start full, refilled continuously, shared with
        // a steady consumer that is not the fleet's: (capacity, refill,
        // theirs) a minute, and what that leaves the fleet.
        for (bucket, left) in [
            ((45.0, 45.0, 15.0), 30.0),
            ((60.0, 50.0, 15.0), 35.0),
            ((20.0, 45.0, 15.0), 30.0),
            ((45.0, 45.0, 0.0), 45.0),
        ] {
            let (run, rate) = drive_bucket(&s, 6, bucket);
            let throttled: u64 = run.iter().map(|w| w.0).sum();
            // The first refusal's window fill is inflated by the full
            // bucket; the next refusals come within the window it implied
            // and cut to what was served between refusals: no cascade of
            // cuts to a window fill that is still draining the bucket.
            assert!(throttled <= 4, "{bucket:?}: 429s per window: {run:?}");
            assert!(rate <= left + 1.0, "{bucket:?}: rate {rate}");
            // Once the bucket is drained, each window serves nearly all
            // that is left, not the measure of a refill cut short by the
            // freezes (28 of 30, 28 of 35, 26 of 30).
            assert!(
                run.iter().skip(3).all(|w| w.1 as f64 >= 0.9 * left),
                "{bucket:?}: (429s, served) per window: {run:?}"
            );
        }
    }

    #[test]
    fn a_long_freeze_is_not_counted_as_time_the_upstream_refilled() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let mut l = learner(t0);
        // A sliding log overfull after a drop: nothing for 30 s, then 30 a
        // minute as entries age out, until it refuses again.
        l.on_throttled(t0 + 10 * SEC, Some(30 * SEC), false, &s);
        for k in 0..6u32 {
            l.on_success(t0 + (41 + 2 * k) * SEC, &s);
        }
        let out = l.on_throttled(t0 + 52 * SEC, Some(2 * SEC), false, &s);
        let to = out.iter().find_map(|x| match x {
            Learned::Cut { to, .. } => Some(*to),
            _ => None,
        });
        // 6 served from a second before the freeze ended: 27.7 a minute,
        // not 6 over the 42 s since the first refusal (8.6).
        assert!(to.is_some_and(|r| (26.0..=32.0).contains(&r)), "{out:?}");
    }

    #[test]
    fn only_a_straggler_of_the_episode_that_cut_restarts_the_measure() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let mut l = learner(t0);
        l.on_throttled(t0, Some(SEC), false, &s);
        // A later episode that cut nothing (the budget the headers showed
        // spent), and a straggler of it.
        l.on_throttled(t0 + 30 * SEC, Some(45 * SEC), true, &s);
        l.on_throttled(t0 + 31 * SEC, Some(44 * SEC), true, &s);
        // A 429 whose implied window began after the cut but before that
        // straggler: no refusal of a descent came inside it.
        l.on_throttled(t0 + 79 * SEC, Some(SEC), false, &s);
        assert!(!l.refills_continuously());
    }

    #[test]
    fn the_calls_a_freeze_released_at_a_reset_count_in_the_window_it_began() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = learner(t0);
        // A fixed window resets at 60 s; the 429's report reached the
        // broker 30 ms after the upstream answered, so the freeze ends at
        // 59.97 s and releases 3 queued calls then.
        l.on_throttled(t0 + 40 * SEC, Some(ms(19_970)), false, &s);
        for _ in 0..3 {
            l.on_success(t0 + ms(59_980), &s);
        }
        for k in 0..27u32 {
            l.on_success(t0 + ms(62_000 + 1_000 * u64::from(k)), &s);
        }
        // The next refusal's report lags 20 ms less: the window it
        // implies starts at 59.99 s, 10 ms after the 3 released calls.
        let out = l.on_throttled(t0 + 100 * SEC, Some(ms(19_990)), false, &s);
        let to = out.iter().find_map(|x| match x {
            Learned::Cut { to, .. } => Some(*to),
            _ => None,
        });
        // 30 served in the window: cut to 29, not to the 26 of the share
        // of their slot after 59.99 s.
        assert!(to.is_some_and(|r| (r - 29.0).abs() < 0.5), "{out:?}");
    }

    #[test]
    fn a_rise_above_a_confirmed_ceiling_is_still_found() {
        let s = LearnSettings::default();
        let run = drive(&s, 80, |w| if w < 40 { 40 } else { 55 });
        // Found within probe_max_windows and a few windows of growth.
        let found = run[40..].iter().position(|w| w.1 >= 50).map(|i| i + 40);
        assert!(
            found.is_some_and(|w| w <= 40 + 8 + 4),
            "served per window: {:?}",
            run.iter().map(|w| w.1).collect::<Vec<_>>()
        );
    }

    /// At a low rate the hold's call budget (1/`ratio_threshold`
    /// successful calls after a cut), not its windows, paces the probes:
    /// on fixed windows of 16 a minute, 100 calls are 6 windows. A
    /// smaller budget finds a rise sooner and pays for it in 429s.
    #[test]
    fn at_a_low_rate_the_call_budget_trades_429s_for_finding_a_rise() {
        let s = LearnSettings::default();
        let half = LearnSettings {
            ratio_threshold: 0.02,
            ..s
        };
        let steady = |s: &LearnSettings| {
            let run = drive(s, 120, |_| 16);
            let throttled: u64 = run[20..].iter().map(|w| w.0).sum();
            let served: u64 = run[20..].iter().map(|w| w.1).sum();
            (throttled, served)
        };
        let found = |s: &LearnSettings| {
            let run = drive(s, 60, |w| if w < 10 { 16 } else { 24 });
            run[10..].iter().position(|w| w.1 >= 22)
        };
        let ((cost, served), (cost_half, _)) = (steady(&s), steady(&half));
        let (rise, rise_half) = (found(&s), found(&half));
        // Over 100 windows: 14 429s (0.9 % of the calls), 95 % served; a
        // rise to 24 found 6 windows after it. Half the budget: 21 and 4.
        assert!(
            cost <= 15 && served >= 1_500,
            "{cost} 429s, {served} served"
        );
        assert!(rise.is_some_and(|w| w <= 6), "{rise:?}");
        assert!(cost_half > cost, "{cost_half} vs {cost}");
        assert!(rise_half < rise, "{rise_half:?} vs {rise:?}");
    }
}
