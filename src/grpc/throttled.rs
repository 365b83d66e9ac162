//! A log line's throttle: the first event logged, then at most one line
//! per interval with how many came since (failed handshakes, HTTP/1 on the
//! gRPC port, refused and shed calls).

use std::time::Duration;

/// Counts events and says when one may be logged: the first, then at most
/// one per `every`, with how many came since the last line. (By hand: a
/// counter and a timestamp in two atomics; the crates for this throttle
/// whole subscribers, not one message.)
pub(crate) struct Throttled {
    every: Duration,
    /// Milliseconds since the process's first event, of the last line + 1
    /// (0: no line yet).
    last: std::sync::atomic::AtomicU64,
    count: std::sync::atomic::AtomicU64,
}

impl Throttled {
    pub(crate) const fn new(every: Duration) -> Throttled {
        Throttled {
            every,
            last: std::sync::atomic::AtomicU64::new(0),
            count: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Counts one event; `Some(events since the last line)` if it may be
    /// logged now.
    pub(crate) fn note(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let now = START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as u64
            + 1;
        self.count.fetch_add(1, Relaxed);
        let last = self.last.load(Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.every.as_millis() as u64;
        if due
            && self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.count.swap(0, Relaxed));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_message_is_logged_first_then_held_with_its_count() {
        let t = Throttled::new(Duration::from_secs(3600));
        assert_eq!(t.note(), Some(1), "the first is logged");
        assert_eq!(t.note(), None);
        assert_eq!(t.note(), None);
        assert_eq!(t.count.load(std::sync::atomic::Ordering::Relaxed), 2);
        let every = Throttled::new(Duration::ZERO);
        assert_eq!(every.note(), Some(1));
        assert_eq!(every.note(), Some(1), "due again: counts only itself");
    }
}
