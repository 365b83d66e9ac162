//! The ceiling memory: the rate the upstream last refused, how often it
//! was confirmed, and how growth cruises below it and probes above it
//! less and less often.

use super::{LearnSettings, Learner};
use tokio::time::Instant;

impl Learner {
    /// A 429 at `rate`: at or above the remembered ceiling, or within 15%
    /// below it, it confirms it (probing above it then waits longer);
    /// further below, the capacity dropped and it is the new ceiling.
    pub(super) fn remember_ceiling(&mut self, rate: f64) {
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

    /// The ceiling a 429 confirms, and how often it then was, when it
    /// ends a probe that passed the ceiling `passed` by a tenth (which
    /// forgot it as a rise) and the upstream served the fleet about that
    /// ceiling since its previous refusal (`since_refusal`, see
    /// `refill_since_last_refusal`): from 15 % below it to 5 % above, no
    /// rise was found. On an upstream that refills continuously what it
    /// stored while the fleet cruised below its refill pays for a probe for
    /// a while, so the probe passes the ceiling without a 429 and the 429
    /// comes well above it; the rate refused then is no ceiling, nor is
    /// what the window served (both inflated by what was stored), and
    /// remembered at either, growth would cruise back above the refill
    /// until the next 429. The measure reads low after a rise (the old
    /// refill, and what a full bucket let overflow, are in it), so one
    /// above the ceiling is taken for the rise it likely is.
    pub(super) fn confirmed_by_probe(
        passed: Option<(f64, u32)>,
        since_refusal: Option<f64>,
    ) -> Option<(f64, u32)> {
        let (c, hits) = passed?;
        let rate = since_refusal?;
        (0.85 * c..=1.05 * c)
            .contains(&rate)
            .then_some((rate, (hits + 1).min(8)))
    }

    /// The rate after growing `step` from `rate` under the ceiling rule:
    /// growth stops just below the rate the upstream last refused (5% or a
    /// permit per window below it, the lower); after `probe_hold_windows`
    /// × 2^(times it was confirmed) windows there (at most
    /// `probe_max_windows`), it probes up to the ceiling by a step shrunk by
    /// that count, and past it by the full step. Past 10% above the ceiling without a 429 the ceiling has
    /// moved: it is forgotten. `None`: hold the rate.
    pub(super) fn ceiling_growth(
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
            self.passed_ceiling = Some((c, self.ceiling_hits));
            self.ceiling = None;
            self.ceiling_hits = 0;
            self.probe_after = None;
        }
        Some(next)
    }
}
