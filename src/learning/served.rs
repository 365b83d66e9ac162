//! What the fleet was served, as the learner measures it: reports and 429s
//! per second over the ratio window ([`Ratio`], for the 429-ratio backstop)
//! and successes per slot of a bucket window ([`Fills`], for "what the
//! upstream's window served" when a 429 cuts the rate). Pure: the clock is
//! passed in.

use std::time::Duration;
use tokio::time::Instant;

/// Outcomes counted per second over the ratio window.
#[derive(Debug, Clone)]
pub(super) struct Ratio {
    /// (second index, reports, throttled), oldest first.
    slots: std::collections::VecDeque<(u64, u64, u64)>,
    origin: Instant,
}

impl Ratio {
    pub(super) fn new(origin: Instant) -> Ratio {
        Ratio {
            slots: Default::default(),
            origin,
        }
    }

    pub(super) fn record(&mut self, now: Instant, throttled: bool, window: Duration) {
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
    pub(super) fn totals(&self, now: Instant, window: Duration) -> (u64, u64) {
        let sec = now.saturating_duration_since(self.origin).as_secs();
        let keep = window.as_secs().max(1);
        self.slots
            .iter()
            .filter(|s| s.0 + keep > sec)
            .fold((0, 0), |(r, t), s| (r + s.1, t + s.2))
    }
}

/// Successful reports counted per slot of a bucket window, so a 429 can
/// tell how much of the upstream's window the fleet got before it filled.
#[derive(Debug, Clone)]
pub(super) struct Fills {
    origin: Instant,
    slot: Duration,
    /// (slot index, successes), oldest first; at most one window of slots.
    slots: std::collections::VecDeque<(u64, u32)>,
}

/// Slots per bucket window in [`Fills`].
const FILL_SLOTS: u32 = 60;

impl Fills {
    pub(super) fn new(origin: Instant, window: Duration) -> Fills {
        Fills {
            origin,
            slot: (window / FILL_SLOTS).max(Duration::from_millis(1)),
            slots: Default::default(),
        }
    }

    /// When counting began (slot 0 starts then).
    pub(super) fn origin(&self) -> Instant {
        self.origin
    }

    fn index(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(since / self.slot.as_nanos().max(1)).unwrap_or(u64::MAX)
    }

    pub(super) fn record(&mut self, now: Instant) {
        let i = self.index(now);
        while self
            .slots
            .front()
            .is_some_and(|s| s.0 + u64::from(FILL_SLOTS) < i)
        {
            self.slots.pop_front();
        }
        match self.slots.back_mut() {
            Some(s) if s.0 == i => s.1 += 1,
            _ => self.slots.push_back((i, 1)),
        }
    }

    /// The length of a counting slot.
    pub(super) fn slot(&self) -> Duration {
        self.slot
    }

    /// Successes reported in the slot `at` falls in and after it, whole.
    pub(super) fn whole_slots_since(&self, at: Instant) -> f64 {
        let first = self.index(at);
        self.slots
            .iter()
            .filter(|s| s.0 >= first)
            .map(|s| f64::from(s.1))
            .sum()
    }

    /// Successes reported from `start` on. Of the slot `start` falls in,
    /// which also holds successes from before it, the share after `start`.
    pub(super) fn since(&self, start: Instant) -> f64 {
        let first = self.index(start);
        let slot_end = self.origin + self.slot * u32::try_from(first + 1).unwrap_or(u32::MAX);
        let share =
            slot_end.saturating_duration_since(start).as_secs_f64() / self.slot.as_secs_f64();
        self.slots
            .iter()
            .filter(|s| s.0 >= first)
            .map(|s| f64::from(s.1) * if s.0 == first { share.min(1.0) } else { 1.0 })
            .sum()
    }
}
