//! Simulated time, as the simulator counts it: sim time = (now − start) ×
//! scale, in milliseconds. The fleet's clock is aligned to the simulator's
//! start (read from `/_sim/stats`), so the fleet's schedules, the
//! simulator's windows and its limit changes share one time line.

use std::time::Duration;

use tokio::time::Instant;

/// Converts between real instants and simulated milliseconds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SimClock {
    /// The real instant of simulated time 0.
    start: Instant,
    /// Simulated seconds per real second.
    scale: f64,
}

impl SimClock {
    /// A clock whose simulated time was `sim_ms_now` at the real instant `now`.
    pub(crate) fn aligned(now: Instant, sim_ms_now: f64, scale: f64) -> SimClock {
        let back = Duration::from_secs_f64((sim_ms_now / 1000.0 / scale).max(0.0));
        SimClock {
            start: now.checked_sub(back).unwrap_or(now),
            scale,
        }
    }

    /// Simulated milliseconds at the real instant `at`.
    pub(crate) fn sim_ms_at(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.start).as_secs_f64() * 1000.0 * self.scale
    }

    /// Simulated milliseconds now.
    pub(crate) fn now_ms(&self) -> f64 {
        self.sim_ms_at(Instant::now())
    }

    /// The real instant of simulated time `sim_ms`.
    pub(crate) fn instant_of(&self, sim_ms: f64) -> Instant {
        self.start + self.real(sim_ms)
    }

    /// How long `sim_ms` simulated milliseconds last in real time.
    pub(crate) fn real(&self, sim_ms: f64) -> Duration {
        Duration::from_secs_f64((sim_ms / 1000.0 / self.scale).max(0.0))
    }

    /// A real duration in simulated milliseconds.
    pub(crate) fn sim_ms(&self, real: Duration) -> f64 {
        real.as_secs_f64() * 1000.0 * self.scale
    }

    /// Simulated seconds per real second.
    pub(crate) fn scale(&self) -> f64 {
        self.scale
    }

    /// Sleeps until simulated time `sim_ms`.
    pub(crate) async fn sleep_until(&self, sim_ms: f64) {
        tokio::time::sleep_until(self.instant_of(sim_ms)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let now = Instant::now();
        let clock = SimClock::aligned(now, 2000.0, 20.0);
        // 2000 sim ms at scale 20 is 100 real ms ago.
        assert!((clock.sim_ms_at(now) - 2000.0).abs() < 0.01);
        assert!((clock.sim_ms_at(clock.instant_of(6000.0)) - 6000.0).abs() < 0.01);
        assert_eq!(clock.real(60_000.0), Duration::from_secs(3));
        assert!((clock.sim_ms(Duration::from_millis(50)) - 1000.0).abs() < 1e-6);
    }
}
