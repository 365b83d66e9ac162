//! Outcomes the broker could not be told while it was unreachable, kept
//! (at most [`KEPT_MAX`], the oldest dropped) and sent when it answers
//! again, so the broker learns from the outage too. Their timing headers
//! are aged by the time they waited: a `Retry-After` or a reset that has
//! since passed is dropped rather than replayed as if it were new.

use quota_broker::pb::{ReleaseRequest, ReportRequest};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Most outcomes kept.
pub(crate) const KEPT_MAX: usize = 1000;

/// Headers whose value is seconds from when the answer came.
const DELTA_SECONDS: &[&str] = &[
    "retry-after",
    "inin-ratelimit-reset",
    "x-ratelimit-reset",
    "ratelimit-reset",
];

/// Headers that describe the upstream's current window only.
const WINDOW_COUNTS: &[&str] = &[
    "inin-ratelimit-count",
    "x-ratelimit-remaining",
    "ratelimit-remaining",
    "ratelimit",
];

#[derive(Debug, Default)]
pub(crate) struct Kept {
    reports: VecDeque<(Instant, ReportRequest)>,
    dropped: u64,
    /// Releases to send once the broker answers again: of leases whose
    /// release found it away, and (by tenant and idempotency key) of
    /// Acquires that got no answer, whose lease nobody holds.
    releases: VecDeque<ReleaseRequest>,
}

impl Kept {
    /// Keeps `report`, made now; drops the oldest past [`KEPT_MAX`].
    pub(crate) fn keep(&mut self, report: ReportRequest) {
        if self.reports.len() >= KEPT_MAX {
            self.reports.pop_front();
            self.dropped += 1;
            if self.dropped == 1 {
                tracing::warn!(
                    max = KEPT_MAX,
                    "too many outcomes kept for an unreachable broker; dropping the oldest"
                );
            }
        }
        self.reports.push_back((Instant::now(), report));
    }

    /// Whether anything waits to be sent.
    pub(crate) fn is_empty(&self) -> bool {
        self.reports.is_empty() && self.releases.is_empty()
    }

    /// Keeps a release for when the broker answers again; drops the oldest
    /// past [`KEPT_MAX`] (its slot comes back at its expiry).
    pub(crate) fn keep_release(&mut self, release: ReleaseRequest) {
        if self.releases.len() >= KEPT_MAX {
            self.releases.pop_front();
        }
        self.releases.push_back(release);
    }

    /// The oldest kept release.
    pub(crate) fn next_release(&mut self) -> Option<ReleaseRequest> {
        self.releases.pop_front()
    }

    /// Puts a release that could not be sent back at the front.
    pub(crate) fn put_back_release(&mut self, release: ReleaseRequest) {
        self.releases.push_front(release);
    }

    /// The oldest kept outcome, aged to now.
    pub(crate) fn next(&mut self) -> Option<ReportRequest> {
        let (at, report) = self.reports.pop_front()?;
        Some(aged(report, at.elapsed()))
    }

    /// Puts an outcome that could not be sent back at the front.
    pub(crate) fn put_back(&mut self, report: ReportRequest) {
        self.reports.push_front((Instant::now(), report));
    }
}

/// `report` as it reads `waited` after it was made.
fn aged(mut report: ReportRequest, waited: Duration) -> ReportRequest {
    let waited_s = waited.as_secs_f64();
    let mut window_over = false;
    report.headers.retain(|name, value| {
        let name = name.to_ascii_lowercase();
        if !DELTA_SECONDS.contains(&name.as_str()) {
            return true;
        }
        match value.trim().parse::<f64>() {
            // Large values are unix times: they do not age.
            Ok(s) if s < 1e9 => {
                let left = s - waited_s;
                if left <= 0.0 {
                    window_over |= name != "retry-after";
                    return false;
                }
                *value = format!("{}", left.ceil() as u64);
                true
            }
            _ => true,
        }
    });
    if window_over {
        report
            .headers
            .retain(|name, _| !WINDOW_COUNTS.contains(&name.to_ascii_lowercase().as_str()));
    }
    report.retry_after_ms = report
        .retry_after_ms
        .saturating_sub(u64::try_from(waited.as_millis()).unwrap_or(u64::MAX));
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(headers: &[(&str, &str)]) -> ReportRequest {
        ReportRequest {
            http_status: 429,
            retry_after_ms: 30_000,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn timing_headers_age_and_a_passed_window_says_nothing() {
        let r = aged(
            report(&[
                ("Retry-After", "30"),
                ("inin-ratelimit-reset", "5"),
                ("inin-ratelimit-count", "60"),
                ("inin-ratelimit-allowed", "60"),
            ]),
            Duration::from_secs(10),
        );
        assert_eq!(r.headers.get("Retry-After").map(String::as_str), Some("20"));
        assert_eq!(r.retry_after_ms, 20_000);
        assert!(!r.headers.contains_key("inin-ratelimit-reset"));
        assert!(!r.headers.contains_key("inin-ratelimit-count"));
        assert_eq!(
            r.headers.get("inin-ratelimit-allowed").map(String::as_str),
            Some("60"),
            "the limit itself still holds"
        );
    }

    #[test]
    fn the_oldest_are_dropped_past_the_bound() {
        let mut k = Kept::default();
        for i in 0..KEPT_MAX + 5 {
            let mut r = report(&[]);
            r.lease_id = i.to_string();
            k.keep(r);
        }
        assert_eq!(k.dropped, 5);
        assert_eq!(k.next().map(|r| r.lease_id), Some("5".to_owned()));
    }
}
