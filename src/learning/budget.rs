//! The upstream's budget as its rate-limit headers tell it: what is left
//! until the window resets, counted down by the broker's own grants between
//! reports, with room left for consumers the broker does not manage. Pure:
//! the clock is passed in.

use std::time::Duration;
use tokio::time::Instant;

/// What the upstream says is left of a budget until its window resets,
/// kept current between reports by counting our own grants down, with a
/// margin for what consumers the broker does not manage will spend before
/// the reset (estimated from what they spent in the previous window).
#[derive(Debug, Clone, Copy)]
pub(crate) struct UpstreamBudget {
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
    pub(crate) fn observe(
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

    /// The view to save: remaining, reset, window (`None`: its window is
    /// over, nothing to carry).
    pub(crate) fn saved(&self, now: Instant) -> Option<(u32, Instant, Duration)> {
        (self.reset_at > now).then_some((self.remaining, self.reset_at, self.window))
    }

    /// A saved view resumed at `now`, if its window is not over.
    pub(crate) fn resumed(
        (remaining, reset_at, window): (u32, Instant, Duration),
        now: Instant,
    ) -> Option<UpstreamBudget> {
        (reset_at > now).then(|| {
            UpstreamBudget::observe(
                None,
                None,
                u64::from(remaining),
                reset_at - now,
                window,
                now,
            )
        })
    }

    /// Counts `n` of our grants made at `now`.
    pub(crate) fn take(&mut self, n: u32, now: Instant) {
        if now >= self.reset_at {
            self.carried = self.carried.saturating_add(n);
        } else {
            self.remaining = self.remaining.saturating_sub(n);
            self.ours = self.ours.saturating_add(n);
        }
    }

    /// The upstream's remaining budget as we see it, while its window lasts.
    pub(crate) fn remaining(&self, now: Instant) -> Option<u32> {
        (self.reset_at > now).then_some(self.remaining)
    }

    /// The earliest instant `n` more grants fit, leaving room for what
    /// others are expected to spend until the reset; `None` when the
    /// budget does not constrain us.
    pub(crate) fn ready_at(&self, n: u32, now: Instant) -> Option<Instant> {
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
