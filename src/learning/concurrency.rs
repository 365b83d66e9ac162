//! Learning a concurrency limit the upstream keeps to itself: a 429 the
//! upstream says is about requests in flight lowers the slot bucket's
//! learned limit to the slots that were in flight besides the refused call,
//! and the limit is probed back up one slot at a time, more rarely each time
//! the upstream refuses at the same level (as the rate's ceiling memory).
//! Pure: the clock is passed in.

use super::LearnSettings;
use std::time::Duration;
use tokio::time::Instant;

/// The learned concurrency limit of one slot bucket instance.
#[derive(Debug, Clone)]
pub(crate) struct SlotLearner {
    configured: u32,
    /// The bucket's window, the time unit of probing.
    window: Duration,
    learned: Option<u32>,
    /// Refusals in a row at the learned level or above.
    hits: u32,
    /// No probing before this.
    probe_after: Option<Instant>,
}

impl SlotLearner {
    pub(crate) fn new(configured: u32, window: Duration) -> SlotLearner {
        SlotLearner {
            configured,
            window: window.max(Duration::from_millis(1)),
            learned: None,
            hits: 0,
            probe_after: None,
        }
    }

    /// The limit in force: the learned one, at most the configured one.
    pub(crate) fn max(&self) -> u32 {
        self.learned.unwrap_or(self.configured).min(self.configured)
    }

    /// The learned limit, if one is in force.
    pub(crate) fn learned(&self) -> Option<u32> {
        self.learned.filter(|&l| l < self.configured)
    }

    /// An operator changed the configured limit; what was learned stays
    /// within it.
    pub(crate) fn set_configured(&mut self, configured: u32) {
        self.configured = configured;
        if self.learned.is_some_and(|l| l >= configured) {
            self.learned = None;
        }
    }

    /// What to keep across a restart: the learned limit and how many
    /// refusals in a row confirmed it.
    pub(crate) fn persisted(&self) -> Option<(u32, u32)> {
        self.learned().map(|l| (l, self.hits))
    }

    /// Restores a persisted limit (within the configured one); the wait
    /// before the next probe starts over at `now`.
    pub(crate) fn restore(&mut self, (learned, hits): (u32, u32), now: Instant, s: &LearnSettings) {
        if learned == 0 || learned >= self.configured {
            return;
        }
        self.learned = Some(learned);
        self.hits = hits.min(8);
        self.probe_after = Some(now + self.window.mul_f64(s.probe_hold_windows.max(0.0)));
    }

    /// Forgets what was learned.
    pub(crate) fn clear(&mut self) {
        *self = SlotLearner::new(self.configured, self.window);
    }

    /// A 429 about concurrency while `in_flight` slots were held, the
    /// refused call's among them: the upstream took `in_flight − 1` (and
    /// whatever others had in flight), so that is the new limit, at least
    /// one and at least one below the limit in force. The new limit if it
    /// changed.
    pub(crate) fn on_refused(
        &mut self,
        in_flight: u32,
        now: Instant,
        s: &LearnSettings,
    ) -> Option<u32> {
        let before = self.max();
        let target = in_flight
            .saturating_sub(1)
            .min(before.saturating_sub(1))
            .max(1);
        // Refused again at (or above) the level probed up from: confirmed.
        if self.learned.is_some_and(|l| target + 1 >= l) {
            self.hits = (self.hits + 1).min(8);
        } else {
            self.hits = 0;
        }
        self.learned = Some(target);
        let windows = (s.probe_hold_windows * f64::from(1u32 << self.hits.min(16)))
            .min(s.probe_max_windows.max(s.probe_hold_windows))
            .max(0.0);
        self.probe_after = Some(now + self.window.mul_f64(windows));
        (self.max() != before).then_some(self.max())
    }

    /// A successful call: once the probe wait is over, one more slot (and
    /// the wait again before the next). The new limit if it changed.
    pub(crate) fn on_success(&mut self, now: Instant, s: &LearnSettings) -> Option<u32> {
        let learned = self.learned?;
        if self.probe_after.is_some_and(|p| now < p) {
            return None;
        }
        let next = learned + 1;
        self.learned = (next < self.configured).then_some(next);
        self.probe_after = Some(now + self.window.mul_f64(s.probe_hold_windows.max(0.0)));
        Some(self.max())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn a_refusal_lowers_the_limit_to_what_was_in_flight_besides_it() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let mut l = SlotLearner::new(8, MIN);
        // 5 in flight, the fifth refused: 4.
        assert_eq!(l.on_refused(5, t0, &s), Some(4));
        assert_eq!((l.max(), l.learned()), (4, Some(4)));
        // Refused with fewer in flight than the limit: still one lower.
        assert_eq!(l.on_refused(2, t0, &s), Some(1));
        assert_eq!(l.on_refused(1, t0, &s), None, "never below one");
        assert_eq!(l.max(), 1);
    }

    #[test]
    fn the_limit_is_probed_back_up_more_rarely_once_confirmed() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let mut l = SlotLearner::new(8, MIN);
        l.on_refused(5, t0, &s);
        // Held for probe_hold_windows (3) windows, then one slot.
        assert_eq!(l.on_success(t0 + 2 * MIN, &s), None);
        assert_eq!(l.on_success(t0 + 3 * MIN, &s), Some(5));
        // Refused at 5 again: back to 4, and now a longer wait (6 windows).
        let t1 = t0 + 4 * MIN;
        assert_eq!(l.on_refused(5, t1, &s), Some(4));
        assert_eq!(l.on_success(t1 + 5 * MIN, &s), None);
        assert_eq!(l.on_success(t1 + 6 * MIN, &s), Some(5));
        // Confirmed again: the wait grows to probe_max_windows (8), no more.
        let t2 = t1 + 7 * MIN;
        l.on_refused(5, t2, &s);
        assert_eq!(l.on_success(t2 + 7 * MIN, &s), None);
        assert_eq!(l.on_success(t2 + 8 * MIN, &s), Some(5));
        // Never refused again: up to the configured limit, then nothing learned.
        let mut t = t2 + 8 * MIN;
        for _ in 0..3 {
            t += 3 * MIN;
            l.on_success(t, &s);
        }
        assert_eq!((l.max(), l.learned()), (8, None));
        assert_eq!(l.on_success(t + 9 * MIN, &s), None);
    }

    #[test]
    fn a_learned_limit_survives_a_restart() {
        let s = LearnSettings::default();
        let t0 = Instant::now();
        let mut l = SlotLearner::new(8, MIN);
        l.on_refused(5, t0, &s);
        l.on_refused(5, t0 + MIN, &s);
        let p = l.persisted();
        assert_eq!(p, Some((3, 1)));
        let mut fresh = SlotLearner::new(8, MIN);
        fresh.restore((4, 2), t0, &s);
        assert_eq!((fresh.max(), fresh.learned(), fresh.hits), (4, Some(4), 2));
        // Not probed up before the hold is over, from the restart.
        assert_eq!(fresh.on_success(t0 + 2 * MIN, &s), None);
        assert_eq!(fresh.on_success(t0 + 3 * MIN, &s), Some(5));
        // Nothing beyond the configured limit is restored.
        let mut small = SlotLearner::new(3, MIN);
        small.restore((4, 0), t0, &s);
        assert_eq!(small.learned(), None);
    }

    #[test]
    fn an_operator_change_bounds_what_was_learned() {
        let s = LearnSettings::default();
        let mut l = SlotLearner::new(8, MIN);
        l.on_refused(5, Instant::now(), &s);
        l.set_configured(3);
        assert_eq!((l.max(), l.learned()), (3, None));
        l.set_configured(10);
        assert_eq!(l.max(), 10);
        l.on_refused(7, Instant::now(), &s);
        l.clear();
        assert_eq!(l.max(), 10);
    }
}
