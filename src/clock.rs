//! Time on the wire and on disk. The broker decides on the monotonic clock
//! (`tokio::time::Instant`, so tests pause and advance it); clients and the
//! state files speak unix milliseconds. [`Clock`] maps one to the other,
//! [`millis`] turns a duration into the `_ms` integers of the wire.

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// A duration in whole milliseconds, saturating (a `u64` of milliseconds
/// outlasts any duration the broker handles).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The wall clock now, in unix seconds (certificate expiry, session
/// cookies: times that must hold across restarts and hosts).
pub(crate) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Maps the broker's monotonic clock to unix milliseconds for the wire.
/// Anchored once at start, so paused test time and wire times agree.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    origin: Instant,
    origin_unix_ms: u64,
}

impl Clock {
    /// Anchors the clock now.
    pub(crate) fn new() -> Clock {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Clock {
            origin: Instant::now(),
            origin_unix_ms: millis(unix),
        }
    }

    /// The instant of a unix-ms time, if it is still in the future.
    pub(crate) fn instant_of(&self, unix_ms: u64, now: Instant) -> Option<Instant> {
        let now_ms = self.unix_ms(now);
        (unix_ms > now_ms).then(|| now + Duration::from_millis(unix_ms - now_ms))
    }

    /// `at` in unix milliseconds.
    pub(crate) fn unix_ms(&self, at: Instant) -> u64 {
        self.origin_unix_ms
            .saturating_add(millis(at.saturating_duration_since(self.origin)))
    }
}
