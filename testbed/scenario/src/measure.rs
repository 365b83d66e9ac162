//! What a mode measured: the fleet's own counters and wait histograms
//! (client side, simulated time), and the figures computed from the
//! simulator's per-window stats afterwards (goodput share, convergence after
//! a hidden-limit change).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::confgen::{LimitChange, WINDOW_MS};
use crate::upstream::{FamilyStats, WindowStats};

/// Longest wait a histogram tracks (larger ones count as this), simulated µs.
const MAX_WAIT_US: u64 = 36_000_000_000;

/// A priority class of the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Class {
    /// Wallboards.
    Critical,
    /// Call-disposition writes.
    Interactive,
    /// Ingestion.
    Batch,
}

impl Class {
    /// Every class, most urgent first.
    pub(crate) const ALL: [Class; 3] = [Class::Critical, Class::Interactive, Class::Batch];

    /// The broker's name for it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Class::Critical => "critical",
            Class::Interactive => "interactive",
            Class::Batch => "batch",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Which endpoint family a call belongs to (client-side counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    /// `POST /api/v2/analytics/**/query`.
    Analytics,
    /// `POST /api/v2/conversations/**`.
    Writes,
}

/// Request counters of one family.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Upstream requests sent.
    pub(crate) sent: AtomicU64,
    /// Of them, answered 429.
    pub(crate) refused: AtomicU64,
    /// Of them, failed otherwise (transport, 5xx, unexpected 4xx).
    pub(crate) errors: AtomicU64,
}

/// Everything the fleet counts while it runs (shared by every task).
#[derive(Debug)]
pub(crate) struct Metrics {
    /// Analytics calls.
    pub(crate) analytics: Counters,
    /// Write calls.
    pub(crate) writes: Counters,
    /// Per class: waits in simulated microseconds. std `Mutex`: held for
    /// one `record`, never across `.await`.
    waits: [Mutex<Histogram<u64>>; 3],
    /// Broker mode: Acquires answered "not granted".
    pub(crate) not_granted: AtomicU64,
    /// Broker mode: leases granted.
    pub(crate) granted: AtomicU64,
    /// Broker mode: leases from the client's local fallback (broker away).
    pub(crate) fallback_leases: AtomicU64,
    /// Broker mode: the requests sent on a fallback lease. std `Mutex`:
    /// held for one push.
    fallback_calls: Mutex<Vec<FallbackCall>>,
    /// Broker mode: the leases a broker granted (not the fallback's). std
    /// `Mutex`: held for one push.
    broker_grants: Mutex<Vec<BrokerGrant>>,
    /// Broker mode: reports the broker did not take.
    pub(crate) report_errors: AtomicU64,
    /// Local mode: refill-rate cuts (more than 1% of a process's calls
    /// refused over 60 simulated s → its rate × 0.8 for an hour).
    pub(crate) rate_cuts: AtomicU64,
    /// Writes the upstream accepted.
    pub(crate) writes_acked: AtomicU64,
    /// Wallboard polls made.
    pub(crate) polls: AtomicU64,
    /// Wallboard polls due over the run (one every 10 s per wallboard); the
    /// ones not made were skipped because the previous one was late, or
    /// never answered.
    pub(crate) polls_due: AtomicU64,
    /// Per class: calls still unserved when the drain ended.
    unserved: [AtomicU64; 3],
    /// Critical calls: (wanted at, waited), simulated ms. std `Mutex`: held
    /// for one push.
    critical: Mutex<Vec<(f64, f64)>>,
}

impl Metrics {
    /// Empty counters.
    pub(crate) fn new() -> Metrics {
        let hist = || Mutex::new(wait_histogram());
        Metrics {
            analytics: Counters::default(),
            writes: Counters::default(),
            waits: [hist(), hist(), hist()],
            not_granted: AtomicU64::new(0),
            granted: AtomicU64::new(0),
            fallback_leases: AtomicU64::new(0),
            fallback_calls: Mutex::new(Vec::new()),
            broker_grants: Mutex::new(Vec::new()),
            report_errors: AtomicU64::new(0),
            rate_cuts: AtomicU64::new(0),
            writes_acked: AtomicU64::new(0),
            polls: AtomicU64::new(0),
            polls_due: AtomicU64::new(0),
            unserved: Default::default(),
            critical: Mutex::new(Vec::new()),
        }
    }

    /// The counters of `family`.
    pub(crate) fn family(&self, family: Family) -> &Counters {
        match family {
            Family::Analytics => &self.analytics,
            Family::Writes => &self.writes,
        }
    }

    /// Records one call's wait, simulated ms; for a critical call also
    /// when it was wanted (for [`quiet_critical`]).
    pub(crate) fn record_wait(&self, class: Class, wanted_ms: f64, waited_ms: f64) {
        record(
            &mut self.waits[class.index()]
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            waited_ms,
        );
        if class == Class::Critical {
            self.critical
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((wanted_ms, waited_ms));
        }
    }

    /// Records the wait so far of a call still unserved when the drain
    /// ended (its task aborted).
    pub(crate) fn record_unserved(&self, class: Class, wanted_ms: f64, waited_ms: f64) {
        self.unserved[class.index()].fetch_add(1, Ordering::Relaxed);
        self.record_wait(class, wanted_ms, waited_ms);
    }

    /// Records a request sent on a fallback lease.
    pub(crate) fn record_fallback(&self, call: FallbackCall) {
        self.fallback_calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(call);
    }

    /// The requests sent on a fallback lease so far.
    pub(crate) fn fallback_calls(&self) -> Vec<FallbackCall> {
        self.fallback_calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records a lease a broker granted.
    pub(crate) fn record_grant(&self, grant: BrokerGrant) {
        self.broker_grants
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(grant);
    }

    /// The leases brokers granted so far.
    pub(crate) fn broker_grants(&self) -> Vec<BrokerGrant> {
        self.broker_grants
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The critical calls recorded so far: (wanted at, waited), sim ms.
    pub(crate) fn critical_calls(&self) -> Vec<(f64, f64)> {
        self.critical
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// p50/p99/max of each class's waits.
    pub(crate) fn waits(&self) -> BTreeMap<&'static str, WaitStats> {
        Class::ALL
            .iter()
            .map(|&c| {
                let h = self.waits[c.index()]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let unserved = self.unserved[c.index()].load(Ordering::Relaxed);
                (
                    c.as_str(),
                    WaitStats {
                        unserved,
                        ..WaitStats::of(&h)
                    },
                )
            })
            .collect()
    }
}

/// A request sent on a lease of the client's local fallback (the broker
/// unreachable), simulated ms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct FallbackCall {
    /// When it was sent.
    pub(crate) sent_ms: f64,
    /// When it was answered (or failed).
    pub(crate) answered_ms: f64,
    /// Answered 429.
    pub(crate) refused: bool,
}

/// A lease a broker granted (the Acquire that got it), simulated ms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct BrokerGrant {
    /// When the Acquire was sent.
    pub(crate) sent_ms: f64,
    /// When the grant came back.
    pub(crate) answered_ms: f64,
}

/// An empty histogram of waits in simulated µs.
fn wait_histogram() -> Histogram<u64> {
    // Bounds 1 µs to 10 simulated hours, 3 significant digits: valid
    // bounds, so construction cannot fail.
    Histogram::new_with_bounds(1, MAX_WAIT_US, 3)
        .unwrap_or_else(|_| unreachable!("1 < MAX_WAIT_US and sigfig 3 are valid"))
}

/// Records a wait of `ms` simulated ms.
fn record(h: &mut Histogram<u64>, ms: f64) {
    h.saturating_record(((ms.max(0.0) * 1000.0).round() as u64).max(1));
}

/// Waits of the critical calls that began and ended in windows where the
/// fleet took no 429 on `family`: what critical traffic waits once the
/// limits are learned, apart from the windows a limit change or the first
/// discovery of the hidden limit closes upstream for everyone.
pub(crate) fn quiet_critical(calls: &[(f64, f64)], family: Option<&FamilyStats>) -> QuietWaits {
    let loud: Vec<u64> = family
        .map(|f| {
            f.windows
                .iter()
                .filter(|w| w.refused_fleet > 0)
                .map(|w| w.index)
                .collect()
        })
        .unwrap_or_default();
    let window_ms = family.map_or(WINDOW_MS, |f| f.window_ms).max(1) as f64;
    let index = |ms: f64| (ms / window_ms) as u64;
    let (mut h, mut in_loud) = (wait_histogram(), wait_histogram());
    for &(wanted, waited) in calls {
        let (from, to) = (index(wanted), index(wanted + waited));
        if loud.iter().any(|w| (from..=to).contains(w)) {
            record(&mut in_loud, waited);
        } else {
            record(&mut h, waited);
        }
    }
    QuietWaits {
        loud_windows: loud,
        of: calls.len() as u64,
        waits: WaitStats::of(&h),
        loud_waits: WaitStats::of(&in_loud),
    }
}

/// See [`quiet_critical`].
#[derive(Clone, Debug, Serialize)]
pub(crate) struct QuietWaits {
    /// Windows where the fleet took a 429 on the family (left out).
    pub(crate) loud_windows: Vec<u64>,
    /// Critical calls in all.
    pub(crate) of: u64,
    /// Waits of those in the other windows.
    pub(crate) waits: WaitStats,
    /// Waits of those that began or ended in a window with a 429.
    pub(crate) loud_waits: WaitStats,
}

/// A wait in simulated ms as the tables print it: one decimal under 10.
pub(crate) fn ms_text(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// Wait percentiles of one class, simulated ms.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct WaitStats {
    /// Calls measured.
    pub(crate) count: u64,
    /// Of those, calls still unserved when the drain ended (a caller the
    /// upstream kept refusing), counted with their wait until then: a
    /// lower bound.
    pub(crate) unserved: u64,
    /// Median wait.
    pub(crate) p50_ms: f64,
    /// 99th percentile wait.
    pub(crate) p99_ms: f64,
    /// Longest wait.
    pub(crate) max_ms: f64,
}

impl WaitStats {
    /// The percentiles of a histogram of simulated µs.
    fn of(h: &Histogram<u64>) -> WaitStats {
        let ms = |us: u64| us as f64 / 1000.0;
        WaitStats {
            count: h.len(),
            unserved: 0,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }

    /// The percentiles of `waits_ms`, of which `unserved` were never
    /// served (counted with their wait until the end).
    pub(crate) fn of_waits(waits_ms: &[f64], unserved: u64) -> WaitStats {
        let mut h = wait_histogram();
        for &w in waits_ms {
            record(&mut h, w);
        }
        WaitStats {
            unserved,
            ..WaitStats::of(&h)
        }
    }
}

/// A family's goodput over the run's whole windows.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Goodput {
    /// Windows counted (the first is skipped, and the drain).
    pub(crate) windows: Vec<u64>,
    /// Fleet requests served in them.
    pub(crate) served_fleet: u64,
    /// What the org could serve the fleet in them: enforced permits less
    /// what the unmanaged consumer got.
    pub(crate) available: u64,
    /// served_fleet / available.
    pub(crate) share: Option<f64>,
    /// What the org could serve the fleet had the unmanaged consumer been
    /// served in full: enforced permits less its requests, served or not.
    pub(crate) fair_available: u64,
    /// served_fleet / fair_available: above 1 means the fleet took budget
    /// the unmanaged consumer asked for.
    pub(crate) fair_share: Option<f64>,
    /// The unmanaged consumer's requests served in them.
    pub(crate) unmanaged_served: u64,
    /// The unmanaged consumer's requests refused in them (a fleet that
    /// takes the whole window leaves it nothing: its share of `available`
    /// looks better for it).
    pub(crate) unmanaged_refused: u64,
}

/// The whole windows of a run of `duration_ms`, skipping window 0:
/// 1..=last where the last ends by the end of production.
fn full_windows(duration_ms: u64, window_ms: u64) -> std::ops::Range<u64> {
    1..(duration_ms / window_ms.max(1))
}

/// What the org could serve the fleet in window `w`.
fn available(w: &WindowStats) -> u64 {
    w.enforced_permits.saturating_sub(w.served_unmanaged)
}

/// What the unmanaged consumer's demand left the fleet in window `w`: its
/// refused requests count as its demand, not as budget the fleet should
/// have taken from it.
fn left(w: &WindowStats) -> u64 {
    w.enforced_permits
        .saturating_sub(w.served_unmanaged + w.refused_unmanaged)
}

/// Goodput of `family` over the whole windows of a run of `duration_ms`.
pub(crate) fn goodput(family: Option<&FamilyStats>, duration_ms: u64) -> Goodput {
    let Some(family) = family else {
        return Goodput {
            windows: vec![],
            served_fleet: 0,
            available: 0,
            share: None,
            fair_available: 0,
            fair_share: None,
            unmanaged_served: 0,
            unmanaged_refused: 0,
        };
    };
    let range = full_windows(duration_ms, family.window_ms);
    let counted: Vec<&WindowStats> = family
        .windows
        .iter()
        .filter(|w| range.contains(&w.index))
        .collect();
    let served_fleet = counted.iter().map(|w| w.served_fleet).sum();
    let available: u64 = counted.iter().map(|w| available(w)).sum();
    let fair_available: u64 = counted.iter().map(|w| left(w)).sum();
    Goodput {
        windows: counted.iter().map(|w| w.index).collect(),
        served_fleet,
        available,
        share: (available > 0).then(|| served_fleet as f64 / available as f64),
        fair_available,
        fair_share: (fair_available > 0).then(|| served_fleet as f64 / fair_available as f64),
        unmanaged_served: counted.iter().map(|w| w.served_unmanaged).sum(),
        unmanaged_refused: counted.iter().map(|w| w.refused_unmanaged).sum(),
    }
}

/// How long the fleet took to use the org well again after a change.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Convergence {
    /// The change.
    pub(crate) change: LimitChange,
    /// The first window that met the bar, if any.
    pub(crate) window: Option<u64>,
    /// Windows from the change to the end of that window (1.0 = the first
    /// whole window after a change at a window boundary already met it).
    pub(crate) windows_after: Option<f64>,
    /// Whether a whole window after the change lies within the run at all.
    pub(crate) measurable: bool,
    /// Windows from the change to the end of the run's last whole window:
    /// a fleet that has not re-converged by then may still do so within
    /// a target longer than that.
    pub(crate) windows_in_run: f64,
}

impl Convergence {
    /// Neither met nor missed against a target of `target` windows: not
    /// re-converged by the end of a run that ends before the target does.
    pub(crate) fn pending(&self, target: f64) -> bool {
        self.windows_after.is_none() && self.windows_in_run < target
    }
}

/// Whether window `w` uses the org well: served ≥ 90% of what the
/// unmanaged consumer left (as the goodput counts it), and at most
/// max(1, 1% of served) refusals.
fn converged(w: &WindowStats) -> bool {
    let served = w.served_fleet as f64;
    served >= 0.9 * left(w) as f64 && w.refused_fleet as f64 <= (0.01 * served).max(1.0)
}

/// Convergence after each change, over the run's whole windows.
pub(crate) fn convergence(
    family: Option<&FamilyStats>,
    changes: &[LimitChange],
    duration_ms: u64,
) -> Vec<Convergence> {
    let window_ms = family.map_or(WINDOW_MS, |f| f.window_ms).max(1);
    let range = full_windows(duration_ms, window_ms);
    changes
        .iter()
        .map(|&change| {
            let first = change.at_ms.div_ceil(window_ms);
            let candidates: Vec<&WindowStats> = family
                .map(|f| {
                    f.windows
                        .iter()
                        .filter(|w| w.index >= first && range.contains(&w.index))
                        .collect()
                })
                .unwrap_or_default();
            let hit = candidates.iter().find(|w| converged(w)).map(|w| w.index);
            Convergence {
                change,
                window: hit,
                windows_after: hit.map(|k| {
                    ((k + 1) * window_ms).saturating_sub(change.at_ms) as f64 / window_ms as f64
                }),
                measurable: first < range.end,
                windows_in_run: (range.end * window_ms).saturating_sub(change.at_ms) as f64
                    / window_ms as f64,
            }
        })
        .collect()
}

/// Whether the upstream ever served more than a limit in a window, from
/// the simulator's own per-window counts. gcsim answers 429 to a request
/// over a limit before serving it, so `served_over` is 0 by construction
/// unless the simulator is wrong: this checks that invariant. What the
/// fleet sent beyond a limit shows as its 429s.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct LimitCheck {
    /// The family.
    pub(crate) family: String,
    /// The window that served the most (fleet and unmanaged consumer).
    pub(crate) busiest_window: Option<u64>,
    /// Requests it served.
    pub(crate) most_served: u64,
    /// The limit in force in it.
    pub(crate) limit: u64,
    /// Σ over the windows of requests served beyond the limit in force.
    pub(crate) served_over: u64,
    /// Windows that served beyond it.
    pub(crate) windows_over: Vec<u64>,
}

/// [`LimitCheck`] of `family`, whose hidden limit changed at `changes`.
/// The limit in force in a window is what the simulator enforced at its
/// end, or, when a change fell inside it (not on its start), the larger of
/// that and the limit before the change (what was served before a drop
/// counted against the old limit).
///
/// A token bucket may serve its capacity on top of a window's refill in
/// one aligned window, so its limit in a window is that much higher.
pub(crate) fn limit_check(family: &FamilyStats, changes: &[LimitChange]) -> LimitCheck {
    let burst = match family.kind.as_deref() {
        Some("token_bucket") => family.burst.unwrap_or(0),
        _ => 0,
    };
    let limit_of = |w: &WindowStats| {
        let end = w.start_ms + family.window_ms;
        changes
            .iter()
            .filter(|c| c.at_ms > w.start_ms && c.at_ms < end)
            .map(|c| c.from)
            .fold(w.enforced_permits, u64::max)
            + burst
    };
    let served = |w: &WindowStats| w.served_fleet + w.served_unmanaged;
    let busiest = family
        .windows
        .iter()
        .max_by_key(|w| (served(w), std::cmp::Reverse(w.index)));
    let over: Vec<(u64, u64)> = family
        .windows
        .iter()
        .filter(|w| served(w) > limit_of(w))
        .map(|w| (w.index, served(w) - limit_of(w)))
        .collect();
    LimitCheck {
        family: family.name.clone(),
        busiest_window: busiest.map(|w| w.index),
        most_served: busiest.map_or(0, served),
        limit: busiest.map_or(0, limit_of),
        served_over: over.iter().map(|(_, n)| n).sum(),
        windows_over: over.iter().map(|(i, _)| *i).collect(),
    }
}

/// Records of one kind: what should be stored, what is.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct Records {
    /// Records the fleet should have stored.
    pub(crate) expected: u64,
    /// Distinct records stored.
    pub(crate) stored: u64,
    /// Records received or written more than once (the extra copies).
    pub(crate) duplicates: u64,
    /// Records not stored because the drain deadline stopped the work that
    /// was fetching them, where that work is checkpointed and the next run
    /// fetches them (gc-ingest's blocks whose checkpoint is not done).
    pub(crate) unfinished: u64,
    /// expected − stored − unfinished.
    pub(crate) lost: u64,
}

impl Records {
    /// Records with `lost` computed; nothing unfinished.
    pub(crate) fn new(expected: u64, stored: u64, duplicates: u64) -> Records {
        Records::with_unfinished(expected, stored, duplicates, 0)
    }

    /// Records with `lost` computed, `unfinished` of the missing ones left
    /// for the next run.
    pub(crate) fn with_unfinished(
        expected: u64,
        stored: u64,
        duplicates: u64,
        unfinished: u64,
    ) -> Records {
        let missing = expected.saturating_sub(stored);
        Records {
            expected,
            stored,
            duplicates,
            unfinished: unfinished.min(missing),
            lost: missing.saturating_sub(unfinished),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(index: u64, enforced: u64, fleet: u64, unmanaged: u64, refused: u64) -> WindowStats {
        WindowStats {
            index,
            start_ms: index * 60_000,
            enforced_permits: enforced,
            max_concurrent: None,
            served_fleet: fleet,
            served_unmanaged: unmanaged,
            refused_fleet: refused,
            refused_unmanaged: 0,
        }
    }

    fn family(windows: Vec<WindowStats>) -> FamilyStats {
        FamilyStats {
            name: "analytics-query".into(),
            window_ms: 60_000,
            kind: None,
            burst: None,
            in_flight: 0,
            windows,
        }
    }

    #[test]
    fn goodput_skips_the_first_window_and_the_drain() {
        let f = family(vec![
            window(0, 45, 10, 5, 9),
            window(1, 45, 38, 5, 0),
            window(2, 30, 20, 5, 2),
            window(3, 30, 25, 5, 0),
        ]);
        // 180 s of production: windows 1 and 2 count, 3 is the drain.
        let g = goodput(Some(&f), 180_000);
        assert_eq!(g.windows, [1, 2]);
        assert_eq!((g.served_fleet, g.available), (58, 65));
        assert!((g.share.unwrap() - 58.0 / 65.0).abs() < 1e-9);
        assert!(goodput(None, 180_000).share.is_none());
    }

    #[test]
    fn convergence_counts_windows_from_the_change() {
        let f = family(vec![
            window(0, 45, 40, 5, 0),
            window(1, 45, 40, 5, 0),
            window(2, 30, 30, 5, 12),
            window(3, 30, 23, 5, 0),
            window(4, 30, 25, 5, 0),
        ]);
        let change = |at_ms| LimitChange {
            at_ms,
            from: 45,
            to: 30,
        };
        let c = convergence(Some(&f), &[change(120_000), change(90_000)], 300_000);
        // Window 2 had 12 refusals; window 3 served 23 ≥ 0.9 × 25.
        assert_eq!(c[0].window, Some(3));
        assert_eq!(c[0].windows_after, Some(2.0));
        assert_eq!(c[1].window, Some(3));
        assert_eq!(c[1].windows_after, Some(2.5));
        assert_eq!(c[0].windows_in_run, 3.0);
        let late = convergence(Some(&f), &[change(250_000)], 300_000);
        assert!(!late[0].measurable);
        assert_eq!(late[0].window, None);
    }

    #[test]
    fn convergence_counts_refused_unmanaged_demand_as_the_consumers_own() {
        // 30 enforced, the consumer asked 10 and got 6: 20 left for the
        // fleet, which served 18 (90%), not 18 of the 24 the consumer's
        // refusals would leave if they counted as the fleet's.
        let refused = |mut w: WindowStats, n| {
            w.refused_unmanaged = n;
            w
        };
        let f = family(vec![
            window(0, 45, 35, 10, 0),
            window(1, 45, 35, 10, 0),
            refused(window(2, 30, 17, 6, 1), 4),
            refused(window(3, 30, 18, 6, 0), 4),
            window(4, 30, 20, 10, 0),
        ]);
        let drop = LimitChange {
            at_ms: 120_000,
            from: 45,
            to: 30,
        };
        let c = convergence(Some(&f), &[drop], 300_000);
        assert_eq!(c[0].window, Some(3));
        let g = goodput(Some(&f), 300_000);
        assert_eq!(g.fair_available, 35 + 20 + 20 + 20);
    }

    #[test]
    fn quiet_critical_leaves_out_calls_touching_a_window_with_a_429() {
        let f = family(vec![
            window(0, 45, 40, 5, 1),
            window(1, 45, 40, 5, 0),
            window(2, 45, 40, 5, 0),
            window(3, 45, 40, 5, 2),
        ]);
        let calls = [
            (10_000.0, 30_000.0), // window 0: out
            (61_000.0, 5.0),
            (70_000.0, 15.0),
            (119_000.0, 2_000.0), // windows 1–2: in
            (179_000.0, 2_000.0), // runs into window 3: out
        ];
        let q = quiet_critical(&calls, Some(&f));
        assert_eq!(q.loud_windows, [0, 3]);
        assert_eq!((q.of, q.waits.count), (5, 3));
        assert!((q.waits.max_ms - 2_000.0).abs() < 2.0, "{q:?}");
    }

    #[test]
    fn limit_check_counts_served_beyond_the_limit_in_force() {
        let f = family(vec![
            window(0, 30, 38, 5, 0), // 45 → 30 at 40 s: 43 served, under 45
            window(1, 30, 25, 5, 0),
            window(2, 30, 27, 5, 1), // 32 served of 30: 2 over
        ]);
        let drop = LimitChange {
            at_ms: 40_000,
            from: 45,
            to: 30,
        };
        let c = limit_check(&f, &[drop]);
        assert_eq!(
            (c.busiest_window, c.most_served, c.limit),
            (Some(0), 43, 45)
        );
        assert_eq!((c.served_over, c.windows_over.clone()), (2, vec![2]));
        // A change at a window's start is that window's own limit.
        let at_start = LimitChange {
            at_ms: 60_000,
            ..drop
        };
        let c = limit_check(&f, &[at_start]);
        assert_eq!((c.limit, c.served_over), (30, 15));
    }

    #[test]
    fn waits_are_percentiles_in_sim_ms() {
        let m = Metrics::new();
        for ms in 1..=100 {
            m.record_wait(Class::Critical, 0.0, ms as f64);
        }
        let w = m.waits()["critical"];
        assert_eq!(w.count, 100);
        assert!((w.p50_ms - 50.0).abs() < 0.1, "{w:?}");
        assert!((w.p99_ms - 99.0).abs() < 0.1, "{w:?}");
        assert_eq!(m.waits()["batch"].count, 0);
    }

    #[test]
    fn a_token_bucket_may_serve_its_burst_on_top_of_a_window() {
        let mut f = family(vec![window(0, 45, 50, 5, 0), window(1, 45, 40, 5, 0)]);
        assert_eq!(limit_check(&f, &[]).served_over, 10);
        f.kind = Some("token_bucket".into());
        f.burst = Some(10);
        assert_eq!(limit_check(&f, &[]).served_over, 0);
        f.burst = Some(9);
        assert_eq!(limit_check(&f, &[]).windows_over, [0]);
    }

    #[test]
    fn critical_waits_inside_and_outside_windows_with_a_429() {
        let f = family(vec![window(0, 45, 40, 5, 0), window(1, 45, 40, 5, 2)]);
        let q = quiet_critical(
            &[(1_000.0, 5.0), (59_000.0, 2_000.0), (70_000.0, 9.0)],
            Some(&f),
        );
        assert_eq!((q.waits.count, q.loud_waits.count), (1, 2));
        assert_eq!(q.loud_windows, [1]);
    }
}
