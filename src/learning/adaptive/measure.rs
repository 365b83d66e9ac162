//! What the upstream served the fleet, measured at a 429: the window fill
//! of an upstream that resets whole windows, and the refill between two
//! refusals of one that gives permits back while it refuses. The cuts in
//! `Learner::on_throttled` go to these figures.

use super::Learner;
use std::time::Duration;
use tokio::time::Instant;

/// A 429 that cut the rate, as the next one needs it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Refusal {
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
    pub(super) fn new(at: Instant, served: u64, freeze: Duration, per_min: f64) -> Refusal {
        let interval = Duration::from_secs_f64(60.0 / per_min.max(1e-3)).min(freeze);
        Refusal {
            at,
            served,
            serving_from: at + (freeze - interval),
        }
    }
}

impl Learner {
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
    pub(super) fn window_fill(
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
    pub(super) fn refill_rate(
        &mut self,
        now: Instant,
        retry_after: Option<Duration>,
    ) -> Option<Option<f64>> {
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

    /// On an upstream seen refilling continuously, the rate it served the
    /// fleet since the previous refusal, per minute, when that began at
    /// least a window and at most 20 windows ago. Such an upstream was
    /// empty at both refusals, so over the span it served the fleet what it
    /// refilled less what others took, whatever it stored and gave back in
    /// between: a measure that a probe running on stored permits does not
    /// inflate, as it does the window fill. (A bucket that filled up and
    /// overflowed meanwhile makes it read low, not high.)
    pub(super) fn refill_since_last_refusal(&self, now: Instant) -> Option<f64> {
        let prev = self.last_refusal.filter(|_| self.continuous)?;
        let secs = now
            .saturating_duration_since(prev.serving_from)
            .as_secs_f64();
        let window = self.window.as_secs_f64();
        if !(window..=20.0 * window).contains(&secs) {
            return None;
        }
        let served = self.served.saturating_sub(prev.served) as f64;
        Some(served * 60.0 / secs)
    }
}
