//! The idempotency keys of a tenant's recent Reports and what each was
//! answered: a Report a client sends again because it got no answer is
//! answered as the first time and not counted twice.
//!
//! Written here rather than with a cache crate: it is a queue in arrival
//! order beside a map, forgotten by age and count, and the tenant's lock
//! already serialises every use.

use super::{ReportOutcome, TenantState};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a key is remembered.
pub(crate) const KEEP_FOR: Duration = Duration::from_secs(600);
/// Most keys remembered per tenant: the oldest are forgotten first.
const MOST: usize = 4096;

/// Keys seen in the last [`KEEP_FOR`], at most [`MOST`], each with what it
/// was answered.
#[derive(Debug, Default)]
pub(super) struct Recent {
    order: VecDeque<(Instant, Arc<str>)>,
    answers: HashMap<Arc<str>, ReportOutcome>,
}

impl Recent {
    fn forget_old(&mut self, now: Instant) {
        while let Some((at, key)) = self.order.front() {
            if now.saturating_duration_since(*at) < KEEP_FOR && self.order.len() <= MOST {
                break;
            }
            self.answers.remove(key);
            self.order.pop_front();
        }
    }
}

impl TenantState {
    /// What a Report with idempotency key `key` was answered, if one was
    /// counted within `KEEP_FOR` (ten minutes) of `now`.
    pub fn reported_before(&mut self, key: &str, now: Instant) -> Option<ReportOutcome> {
        let now = self.monotonic(now);
        self.recent_reports.forget_old(now);
        self.recent_reports.answers.get(key).cloned()
    }

    /// Remembers that the Report with idempotency key `key` was counted
    /// and answered `outcome`.
    pub fn counted_report(&mut self, key: &str, outcome: &ReportOutcome, now: Instant) {
        let now = self.monotonic(now);
        let recent = &mut self.recent_reports;
        let key: Arc<str> = Arc::from(key);
        if recent
            .answers
            .insert(key.clone(), outcome.clone())
            .is_none()
        {
            recent.order.push_back((now, key));
        }
        recent.forget_old(now);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{tenant, TWO};
    use super::*;

    fn outcome(bucket: &str) -> ReportOutcome {
        ReportOutcome {
            buckets: vec![bucket.to_owned()],
            attributed_to: None,
        }
    }

    #[test]
    fn a_key_is_remembered_for_ten_minutes_and_the_oldest_go_first() {
        let t0 = Instant::now();
        let mut t = tenant(TWO, t0);
        assert_eq!(t.reported_before("a", t0), None);
        t.counted_report("a", &outcome("x"), t0);
        assert_eq!(
            t.reported_before("a", t0 + KEEP_FOR / 2),
            Some(outcome("x"))
        );
        assert_eq!(t.reported_before("a", t0 + KEEP_FOR), None);
        for i in 0..=MOST {
            t.counted_report(&i.to_string(), &outcome("y"), t0 + KEEP_FOR);
        }
        assert_eq!(t.reported_before("0", t0 + KEEP_FOR), None);
        assert_eq!(t.reported_before("1", t0 + KEEP_FOR), Some(outcome("y")));
        assert_eq!(t.recent_reports.order.len(), MOST);
    }
}
