//! The arithmetic of one limit: a token bucket (rate with burst) and a pool of
//! concurrency slots. Pure: no I/O, no locks, the clock is passed in.
//!
//! The token bucket is GCRA (the "theoretical arrival time" form of a token
//! bucket, as governor uses), kept in integer time so no float drift can ever
//! grant a permit too many. We do not use governor's limiter itself because the
//! broker needs what it does not offer: the effective rate changes at run time
//! without losing the bucket's level, a grant must draw on several buckets
//! all-or-nothing (governor can take from one limiter but cannot give permits
//! back to it if the next refuses), the broker answers *when* `n` permits will
//! be ready for a waiting queue, and later issues drain or shrink a bucket to
//! what the upstream says is left. Time is `tokio::time::Instant`, so tests
//! drive it with `tokio::time::pause()`.

use std::time::Duration;
use tokio::time::Instant;

/// A token bucket in GCRA form.
///
/// `tat` ("theoretical arrival time") is the instant at which the bucket is
/// full again if nothing more is taken. Taking `n` permits moves it `n ×
/// interval` later; a take is allowed while `tat` stays within `burst ×
/// interval` of now. So in any window of length `w`, at most `burst + w /
/// interval` permits are granted.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    /// Time to earn one permit at the current (effective) rate.
    interval: Duration,
    /// Most permits held at once.
    burst: u32,
    tat: Instant,
    /// Nothing is granted before this instant (a freeze), and the bucket
    /// is empty then; rate changes during a freeze rescale only what is
    /// owed after it.
    resume_at: Instant,
}

impl TokenBucket {
    /// A full bucket granting `permits` per `window`, holding at most `burst`.
    pub(crate) fn new(permits: u32, window: Duration, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            interval: interval_of(permits, window),
            burst: burst.max(1),
            tat: now,
            resume_at: now,
        }
    }

    /// Most permits the bucket can ever hold.
    pub(crate) fn burst(&self) -> u32 {
        self.burst
    }

    /// Time to earn one permit at the current rate.
    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    /// Current rate in permits per minute.
    pub(crate) fn rate_per_min(&self) -> f64 {
        60.0 / self.interval.as_secs_f64()
    }

    /// Permits that could be taken at `now` (fractional).
    pub(crate) fn available(&self, now: Instant) -> f64 {
        let backlog = self.tat.saturating_duration_since(now);
        (f64::from(self.burst) - backlog.as_secs_f64() / self.interval.as_secs_f64()).max(0.0)
    }

    /// Whether the bucket is full at `now` (an idle bucket can be dropped and
    /// re-created without anyone noticing).
    pub(crate) fn is_full(&self, now: Instant) -> bool {
        self.tat <= now
    }

    /// The earliest instant at which `n` permits can be taken, or `None` if
    /// `n` exceeds the burst and never can.
    pub(crate) fn ready_at(&self, n: u32, now: Instant) -> Option<Instant> {
        if n > self.burst {
            return None;
        }
        let headroom = self.interval.saturating_mul(self.burst - n);
        Some(self.tat.checked_sub(headroom).map_or(now, |t| t.max(now)))
    }

    /// Whether `p` permits can still be taken at `at` if `n` are taken at
    /// `now` (a new request going ahead of a waiter for `p`).
    pub(crate) fn fits_after(&self, n: u32, p: u32, at: Instant, now: Instant) -> bool {
        if p > self.burst {
            return false;
        }
        let tat = self.tat.max(now) + self.interval.saturating_mul(n);
        let headroom = self.interval.saturating_mul(self.burst - p);
        tat.checked_sub(headroom).is_none_or(|t| t <= at)
    }

    /// The earliest instant at which `n` permits can be taken while
    /// `reserve` permits (fractional) stay in the bucket for others, or
    /// `None` if that never fits in the burst. A negative `reserve` may be
    /// borrowed: the level may go that far below empty.
    pub(crate) fn ready_at_reserved(&self, n: u32, reserve: f64, now: Instant) -> Option<Instant> {
        if reserve == 0.0 {
            return self.ready_at(n, now);
        }
        let headroom = f64::from(self.burst) - f64::from(n) - reserve;
        if headroom < -1e-9 {
            return None;
        }
        let headroom = self.interval.mul_f64(headroom.max(0.0));
        Some(self.tat.checked_sub(headroom).map_or(now, |t| t.max(now)))
    }

    #[cfg(test)]
    /// Takes `n` permits if they are available at `now`.
    pub(crate) fn try_take(&mut self, n: u32, now: Instant) -> bool {
        if self.ready_at(n, now).is_some_and(|t| t <= now) {
            self.take(n, now);
            true
        } else {
            false
        }
    }

    /// Takes `n` permits; the caller has checked [`TokenBucket::ready_at`].
    pub(crate) fn take(&mut self, n: u32, now: Instant) {
        self.tat = self.tat.max(now) + self.interval.saturating_mul(n);
    }

    #[cfg(test)]
    /// Changes the rate at `now`, keeping the bucket's level: the permits
    /// taken and not yet earned back stay taken.
    pub(crate) fn set_rate(&mut self, permits: u32, window: Duration, now: Instant) {
        self.set_interval(interval_of(permits, window), now);
    }

    fn set_interval(&mut self, interval: Duration, now: Instant) {
        let from = now.max(self.resume_at);
        let backlog = self.tat.saturating_duration_since(from);
        let owed = backlog.as_secs_f64() / self.interval.as_secs_f64();
        self.interval = interval;
        self.tat = from + interval.mul_f64(owed);
    }

    /// Changes the rate to `per_min` permits per minute at `now`, keeping
    /// the level (see [`TokenBucket::set_rate`]).
    pub(crate) fn set_rate_per_min(&mut self, per_min: f64, now: Instant) {
        if !(per_min.is_finite() && per_min > 0.0) {
            return;
        }
        // Whole nanoseconds, rounded up: a rate never reads above the one
        // asked for (45 a minute is 1.333… s, not 45.00000001 a minute).
        let nanos = ((60.0 / per_min).min(86_400.0) * 1e9).ceil();
        self.set_interval(Duration::from_nanos((nanos as u64).max(1)), now);
    }

    /// Empties the bucket as of `at` (a freeze ending then): one permit at
    /// `at`, when the upstream's window has reset, then one interval apart,
    /// with no burst.
    pub(crate) fn empty_at(&mut self, at: Instant) {
        self.resume_at = self.resume_at.max(at);
        self.tat = self
            .tat
            .max(at + self.interval.saturating_mul(self.burst.saturating_sub(1)));
    }

    /// Starts the bucket over at `now` with one permit, then one interval
    /// apart, whatever freeze or debt it carried (an operator lifting a
    /// freeze).
    pub(crate) fn restart_empty(&mut self, now: Instant) {
        self.resume_at = now;
        self.tat = now + self.interval.saturating_mul(self.burst.saturating_sub(1));
    }

    /// Starts the bucket over at `now` with nothing in it, the first permit
    /// one interval later (a restart that does not know the level: the
    /// bucket may have been empty when the broker stopped, and a permit at
    /// once would add one to the bound at every restart of a crash loop).
    /// A freeze restored on it before keeps it empty until the freeze ends.
    pub(crate) fn restart_drained(&mut self, now: Instant) {
        self.resume_at = self.resume_at.max(now);
        self.tat = self.tat.max(now + self.interval.saturating_mul(self.burst));
    }

    /// Sets the level to `tokens` at `now` (capped to the burst): a level
    /// known exactly, handed over by the previous leader of a cluster. A
    /// freeze restored on it before keeps it empty until the freeze ends.
    pub(crate) fn set_level(&mut self, tokens: f64, now: Instant) {
        let owed = (f64::from(self.burst) - tokens).clamp(0.0, f64::from(self.burst));
        // Only a freeze holds it lower (a restart's drain is what the
        // handed level replaces).
        let frozen = if self.resume_at > now {
            self.resume_at + self.interval.saturating_mul(self.burst.saturating_sub(1))
        } else {
            now
        };
        self.tat = frozen.max(now + self.interval.mul_f64(owed));
    }

    /// Earns nothing for `lapse` from `from` on: the level at
    /// `from + lapse` is the level at `from` (a cluster leader whose lead
    /// lapsed while the fleet ran on its fallback).
    pub(crate) fn postpone(&mut self, from: Instant, lapse: Duration) {
        if self.tat > from {
            self.tat += lapse;
        }
        if self.resume_at > from {
            self.resume_at += lapse;
        }
    }

    /// Lowers the level to at most `tokens` at `now` (someone else spent
    /// part of the budget). Never raises it.
    pub(crate) fn shrink_to(&mut self, tokens: u32, now: Instant) {
        let tokens = tokens.min(self.burst);
        let tat = now + self.interval.saturating_mul(self.burst - tokens);
        self.tat = self.tat.max(tat);
    }

    /// Changes the burst at `now`; the level is capped to the new burst.
    /// Raised, the level stays where it was (the new room fills at the
    /// rate, never at once: a raise must not hand out its difference); a
    /// debt below empty (a freeze, borrowed permits) is kept either way.
    pub(crate) fn set_burst(&mut self, burst: u32, now: Instant) {
        let backlog = self.tat.saturating_duration_since(now);
        let full = self.interval.saturating_mul(self.burst);
        let debt = backlog.saturating_sub(full);
        let level = full.saturating_sub(backlog);
        self.burst = burst.max(1);
        let full = self.interval.saturating_mul(self.burst);
        self.tat = now + debt + (full - level.min(full));
    }
}

/// Time to earn one permit, rounded up so the granted rate never exceeds
/// the configured one.
fn interval_of(permits: u32, window: Duration) -> Duration {
    let nanos = window.as_nanos().div_ceil(u128::from(permits.max(1)));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX).max(1))
}

/// A pool of concurrency slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slots {
    max: u32,
    in_flight: u32,
}

impl Slots {
    /// An empty pool of `max` slots.
    pub(crate) fn new(max: u32) -> Slots {
        Slots { max, in_flight: 0 }
    }

    /// Slots currently held.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// The limit.
    pub(crate) fn max(&self) -> u32 {
        self.max
    }

    /// Whether `n` more slots are free.
    pub(crate) fn has_room(&self, n: u32) -> bool {
        self.in_flight.saturating_add(n) <= self.max
    }

    /// Holds `n` slots; the caller has checked [`Slots::has_room`].
    pub(crate) fn take(&mut self, n: u32) {
        self.in_flight = self.in_flight.saturating_add(n);
    }

    /// Returns `n` slots.
    pub(crate) fn give_back(&mut self, n: u32) {
        self.in_flight = self.in_flight.saturating_sub(n);
    }

    /// Changes the limit; slots held above it stay held until returned.
    pub(crate) fn set_max(&mut self, max: u32) {
        self.max = max;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn burst_then_paced_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(60, Duration::from_secs(60), 10, t0);
        assert_eq!(b.available(t0), 10.0);
        for _ in 0..10 {
            assert!(b.try_take(1, t0));
        }
        assert!(!b.try_take(1, t0));
        assert_eq!(b.ready_at(1, t0), Some(t0 + Duration::from_secs(1)));
        assert_eq!(b.ready_at(3, t0), Some(t0 + Duration::from_secs(3)));
        assert!(!b.try_take(1, t0 + 999 * MS));
        assert!(b.try_take(1, t0 + Duration::from_secs(1)));
        let later = t0 + Duration::from_secs(100);
        assert_eq!(b.available(later), 10.0);
        assert!(b.is_full(later));
    }

    #[test]
    fn more_than_burst_is_never_ready() {
        let t0 = Instant::now();
        let b = TokenBucket::new(5, Duration::from_secs(1), 5, t0);
        assert_eq!(b.ready_at(6, t0), None);
        assert_eq!(b.ready_at(5, t0), Some(t0));
    }

    #[test]
    fn rate_change_keeps_the_level() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(60, Duration::from_secs(60), 10, t0);
        for _ in 0..6 {
            b.take(1, t0);
        }
        assert!((b.available(t0) - 4.0).abs() < 1e-9);
        b.set_rate(30, Duration::from_secs(60), t0);
        assert!((b.available(t0) - 4.0).abs() < 1e-9);
        assert_eq!(b.rate_per_min(), 30.0);
        // Six owed permits now take two seconds each to earn back.
        assert!(b.is_full(t0 + Duration::from_secs(12)));
        assert!(!b.is_full(t0 + Duration::from_secs(11)));
    }

    #[test]
    fn burst_shrink_caps_the_backlog() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, Duration::from_secs(10), 10, t0);
        b.take(10, t0);
        b.set_burst(4, t0);
        assert_eq!(b.available(t0), 0.0);
        assert_eq!(b.ready_at(4, t0), Some(t0 + Duration::from_secs(4)));
    }

    #[test]
    fn a_raised_burst_keeps_the_level_and_a_lowered_one_caps_it() {
        let t0 = Instant::now();
        let minute = Duration::from_secs(60);
        // Drained, then raised from 10 to 100: still empty, refilling at
        // the rate (it handed out the 90 of difference at once).
        let mut b = TokenBucket::new(60, minute, 10, t0);
        b.take(10, t0);
        b.set_burst(100, t0);
        assert!(b.available(t0) < 1e-9, "{}", b.available(t0));
        assert_eq!(b.ready_at(1, t0), Some(t0 + Duration::from_secs(1)));
        // Part full, raised: the same level.
        let mut b = TokenBucket::new(60, minute, 10, t0);
        b.take(4, t0);
        b.set_burst(50, t0);
        assert!((b.available(t0) - 6.0).abs() < 1e-9, "{}", b.available(t0));
        // Lowered below the level: capped to the new burst.
        let mut b = TokenBucket::new(60, minute, 200, t0);
        b.take(17, t0);
        b.set_burst(10, t0);
        assert!((b.available(t0) - 10.0).abs() < 1e-9, "{}", b.available(t0));
        // A freeze's debt survives a change either way.
        let mut b = TokenBucket::new(60, minute, 10, t0);
        b.empty_at(t0 + Duration::from_secs(30));
        b.set_burst(20, t0);
        assert!(b.ready_at(1, t0).unwrap() >= t0 + Duration::from_secs(30));
    }

    #[test]
    fn a_rate_set_never_reads_above_what_was_asked() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(60, Duration::from_secs(60), 10, t0);
        for per_min in [45.0, 42.0, 31.5, 7.0, 1e-3, 59.999, 33.333_333] {
            b.set_rate_per_min(per_min, t0);
            let read = b.rate_per_min();
            assert!(
                read <= per_min && read > per_min * (1.0 - 1e-9),
                "{per_min}: {read}"
            );
        }
    }

    #[test]
    fn empty_at_paces_from_the_freeze_end() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(60, Duration::from_secs(60), 10, t0);
        let end = t0 + Duration::from_secs(15);
        b.empty_at(end);
        assert_eq!(b.available(end), 1.0, "one permit as the freeze ends");
        assert_eq!(b.ready_at(1, t0), Some(end));
        assert_eq!(b.ready_at(2, t0), Some(end + Duration::from_secs(1)));
    }

    #[test]
    fn a_negative_reserve_borrows_below_empty() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(60, Duration::from_secs(60), 10, t0);
        b.take(10, t0);
        assert_eq!(
            b.ready_at_reserved(1, 0.0, t0),
            Some(t0 + Duration::from_secs(1))
        );
        assert_eq!(b.ready_at_reserved(2, -2.0, t0), Some(t0));
        b.take(2, t0);
        // Two below empty: the next plain permit is 3 s away, not 1.
        assert_eq!(b.ready_at(1, t0), Some(t0 + Duration::from_secs(3)));
        assert_eq!(
            b.ready_at_reserved(1, -2.0, t0),
            Some(t0 + Duration::from_secs(1))
        );
    }

    #[test]
    fn shrink_never_raises() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(60, Duration::from_secs(60), 10, t0);
        b.shrink_to(4, t0);
        assert!((b.available(t0) - 4.0).abs() < 1e-9);
        b.shrink_to(8, t0);
        assert!((b.available(t0) - 4.0).abs() < 1e-9);
        b.set_rate_per_min(30.0, t0);
        assert!((b.rate_per_min() - 30.0).abs() < 1e-6);
        assert!((b.available(t0) - 4.0).abs() < 1e-6);
    }

    #[test]
    fn fits_after_says_whether_a_waiter_keeps_its_permits() {
        let t0 = Instant::now();
        // 1 a second, burst 3, full: taking 2 now leaves 1 now, and 1 is
        // there for a waiter at any later instant; taking 3 leaves none
        // until one refills at 1 s.
        let b = TokenBucket::new(1, Duration::from_secs(1), 3, t0);
        assert!(b.fits_after(2, 1, t0, t0));
        assert!(!b.fits_after(3, 1, t0 + Duration::from_millis(999), t0));
        assert!(b.fits_after(3, 1, t0 + Duration::from_secs(1), t0));
        assert!(
            !b.fits_after(0, 4, t0 + Duration::from_secs(60), t0),
            "over the burst"
        );
    }

    #[test]
    fn interval_rounds_up() {
        let i = interval_of(7, Duration::from_secs(60));
        assert!(i.as_nanos() * 7 >= Duration::from_secs(60).as_nanos());
    }

    #[test]
    fn slots_account() {
        let mut s = Slots::new(2);
        assert!(s.has_room(2));
        s.take(2);
        assert!(!s.has_room(1));
        s.give_back(1);
        assert!(s.has_room(1));
        s.give_back(5);
        assert_eq!(s.in_flight(), 0);
    }

    proptest! {
        /// However requests arrive, no window of length `w` sees more than
        /// `burst + w / interval` permits granted.
        #[test]
        fn never_exceeds_burst_plus_rate(
            permits in 1u32..50,
            window_ms in 100u64..5_000,
            burst in 1u32..20,
            steps in prop::collection::vec((0u64..400, 1u32..4), 1..200),
        ) {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(permits, Duration::from_millis(window_ms), burst, t0);
            let mut now = t0;
            let mut grants: Vec<(Instant, u32)> = Vec::new();
            for (gap_ms, n) in steps {
                now += Duration::from_millis(gap_ms);
                if b.try_take(n, now) {
                    grants.push((now, n));
                }
            }
            let interval = b.interval().as_secs_f64();
            for (i, &(start, _)) in grants.iter().enumerate() {
                for &(end, _) in &grants[i..] {
                    let w = (end - start).as_secs_f64();
                    let granted: u32 = grants.iter()
                        .filter(|(t, _)| *t >= start && *t <= end)
                        .map(|(_, n)| n)
                        .sum();
                    let bound = f64::from(burst) + w / interval;
                    prop_assert!(f64::from(granted) <= bound + 1e-9,
                        "{granted} granted in {w}s, bound {bound}");
                }
            }
        }
    }
}
