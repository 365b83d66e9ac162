//! Unit tests of the tenant state machine: grants, waits, reserves,
//! expiry, per-client instances, and a proptest of the limits.

use super::*;
use crate::config::Settings;
use crate::error::BrokerError;
use crate::limits::LeaseId;
use proptest::prelude::*;

const SEC: Duration = Duration::from_secs(1);

pub(super) fn tenant(toml_buckets: &str, now: Instant) -> TenantState {
    let s = Settings::from_toml(&format!("[[tenants]]\nid = \"t\"\n{toml_buckets}")).unwrap();
    TenantState::new(0, &s.tenants[0], &s, Default::default(), now)
}

/// An Acquire of `permits` on `method path` by client "c", OAuth client "oa".
pub(crate) fn args(method: &str, path: &str, permits: u32) -> AcquireArgs {
    AcquireArgs {
        client_id: "c".into(),
        class: String::new(),
        method: method.into(),
        path: path.into(),
        oauth_client: "oa".into(),
        permits,
        idempotency_key: String::new(),
    }
}

pub(super) const TWO: &str = r#"
    [[tenants.buckets]]
    name = "rate"
    routes = ["* /**"]
    permits = 2
    window_ms = 1000
    [[tenants.buckets]]
    name = "slots"
    routes = ["POST /q"]
    max_in_flight = 1
    lease_ttl_ms = 5000
"#;

pub(super) fn granted(a: Decision) -> Grant {
    match a {
        Decision::Granted(g) => g,
        Decision::Denied(denial) => panic!("not granted: {}", denial.reason),
        Decision::Queued(_) => panic!("queued"),
    }
}

/// Waits long enough for any test: the request queues if it is not granted.
pub(super) const WAIT: Option<Duration> = Some(Duration::from_secs(3600));
/// No wait: granted or denied at once.
pub(super) const NOW: Option<Duration> = Some(Duration::ZERO);

#[test]
fn grant_draws_on_all_buckets_or_none() {
    let t0 = Instant::now();
    let mut t = tenant(TWO, t0);
    let g = granted(t.acquire(&args("POST", "/q", 1), NOW, t0).unwrap());
    assert_eq!(g.buckets, ["rate", "slots"]);
    assert_eq!(g.slot, Some((t0 + 5 * SEC, 5 * SEC)));
    // The slot is taken: the next POST takes nothing from "rate" either.
    let Decision::Denied(denial) = t.acquire(&args("POST", "/q", 1), NOW, t0).unwrap() else {
        panic!("granted past the slot limit")
    };
    assert!(
        denial
            .reason
            .contains("\"slots\" has 1 of 1 concurrency slots in use"),
        "{}",
        denial.reason
    );
    assert_eq!(denial.retry_after, 5 * SEC);
    let rate = t
        .statuses(t0)
        .into_iter()
        .find(|s| s.bucket == "rate")
        .unwrap();
    assert_eq!(rate.tokens_available, 1.0);
    assert!(t.release(g.lease_id));
    assert!(!t.release(g.lease_id), "second release changes nothing");
    granted(t.acquire(&args("POST", "/q", 1), NOW, t0).unwrap());
}

#[test]
fn expiry_returns_slots_and_serves_waiters() {
    let t0 = Instant::now();
    let mut t = tenant(TWO, t0);
    granted(t.acquire(&args("POST", "/q", 1), NOW, t0).unwrap());
    let Decision::Queued(Queued { reply: mut rx, .. }) =
        t.acquire(&args("POST", "/q", 1), WAIT, t0).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        t.tick(t0),
        Some(t0 + 5 * SEC),
        "wakes at the lease's expiry"
    );
    assert!(rx.try_recv().is_err());
    t.tick(t0 + 5 * SEC);
    let g = rx
        .try_recv()
        .expect("answered once the slot expired")
        .expect("granted");
    assert_eq!(g.slot.map(|s| s.0), Some(t0 + 10 * SEC));
    assert_eq!(t.waiting(), 0);
    assert_eq!(t.leases_held(), 1);
}

#[test]
fn renew_extends_and_unknown_is_not_found() {
    let t0 = Instant::now();
    let mut t = tenant(TWO, t0);
    let g = granted(t.acquire(&args("POST", "/q", 1), NOW, t0).unwrap());
    let (at, ttl) = t
        .renew(g.lease_id, Some(20 * SEC), None, t0 + 4 * SEC)
        .unwrap();
    assert_eq!((at, ttl), (t0 + 24 * SEC, 20 * SEC));
    t.tick(t0 + 10 * SEC);
    assert_eq!(
        t.leases_held(),
        1,
        "renewed lease survives its first expiry"
    );
    let (at, _) = t.renew(g.lease_id, None, None, t0 + 10 * SEC).unwrap();
    assert_eq!(at, t0 + 15 * SEC, "default TTL");
    t.tick(t0 + 15 * SEC);
    assert!(matches!(
        t.renew(g.lease_id, None, None, t0 + 15 * SEC),
        Err(BrokerError::LeaseNotFound { .. })
    ));
    assert!(!t.release(g.lease_id), "release after expiry is a no-op");
}

#[test]
fn errors_name_what_is_wrong() {
    let t0 = Instant::now();
    let mut t = tenant(TWO, t0);
    assert!(matches!(
        t.acquire(&args("POST", "/q", 3), NOW, t0),
        Err(BrokerError::TooManyPermits {
            max: 2,
            what: "burst",
            ..
        })
    ));
    let mut t = tenant(
        "[[tenants.buckets]]\nname = \"only\"\nroutes = [\"GET /a\"]\nmax_in_flight = 1\n",
        t0,
    );
    assert!(matches!(
        t.acquire(&args("GET", "/b", 1), NOW, t0),
        Err(BrokerError::NoBucketMatches { .. })
    ));
}

#[test]
fn a_bad_class_is_refused_naming_it_once_and_clipped() {
    let t0 = Instant::now();
    let mut t = tenant(TWO, t0);
    let mut class = crate::config::ClassSettings {
        name: "reports".into(),
        order: 1,
        weight: 0,
        reserve: 0.0,
        default_max_wait: Duration::ZERO,
    };
    let err = t.set_class(class.clone()).unwrap_err().to_string();
    assert!(
        err.ends_with("class: \"reports\": weight must be at least 1"),
        "{err}"
    );
    class.name = "x".repeat(10_000);
    class.weight = 1;
    let err = t.set_class(class).unwrap_err().to_string();
    assert!(
        err.contains("(10000 bytes): name must be 1 to 64 characters"),
        "{err}"
    );
    assert!(err.len() < 300, "{} bytes", err.len());
}

#[test]
fn a_stale_clock_read_never_denies_a_full_bucket() {
    let t0 = Instant::now();
    // Burst 3 at 1000/s: the whole burst spans 3 ms.
    let mut t = tenant(
        "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"* /**\"]\npermits = 1000\n\
         window_ms = 1000\nburst = 3",
        t0,
    );
    let t1 = t0 + SEC;
    granted(t.acquire(&args("GET", "/", 1), NOW, t1).unwrap());
    // A caller that read the clock a second earlier, then waited for the
    // lock: the bucket has 2 permits now, and it must see them.
    granted(t.acquire(&args("GET", "/", 1), NOW, t0).unwrap());
    let s = &t.statuses(t0)[0];
    assert!(s.tokens_available >= 1.0, "{}", s.tokens_available);
}

#[test]
fn a_report_cannot_block_a_bucket_for_years() {
    use crate::learning::RateLimitInfo;
    let t0 = Instant::now();
    let max = LearnSettings::default().max_freeze;
    let bucket = "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"* /**\"]\npermits = 60\n\
                  window_ms = 60000";
    let mut t = tenant(bucket, t0);
    let forever = Some(Duration::from_millis(u64::MAX));
    let none = RateLimitInfo::default();
    t.report(("GET", "/", "oa"), 429, forever, &none, t0)
        .unwrap();
    let frozen = t.statuses(t0)[0].frozen_until.expect("frozen");
    assert!(frozen <= t0 + max, "frozen for {:?}", frozen - t0);
    let Decision::Denied(d) = t.acquire(&args("GET", "/", 1), NOW, t0).unwrap() else {
        panic!("granted while frozen")
    };
    // Then it resumes paced, at the cut rate, from an empty bucket.
    assert!(d.retry_after <= max + 60 * SEC, "{:?}", d.retry_after);

    // A 200 that says nothing is left until a reset decades away.
    let mut t = tenant(bucket, t0);
    let far = RateLimitInfo {
        limit: Some(60),
        remaining: Some(0),
        reset: Some(Duration::from_secs(1_000_000_000_000)),
        ..RateLimitInfo::default()
    };
    t.report(("GET", "/", "oa"), 200, None, &far, t0).unwrap();
    let Decision::Denied(d) = t.acquire(&args("GET", "/", 1), NOW, t0).unwrap() else {
        panic!("granted past the upstream's budget")
    };
    // The block ends at the capped reset; the next window then paces in.
    assert!(d.retry_after <= max + 60 * SEC, "{:?}", d.retry_after);

    // The same budget read back from a state file (an old one, or edited).
    let mut t = tenant(bucket, t0);
    let saved = crate::learning::Persisted {
        effective_per_min: 60.0,
        learned_limit_per_min: None,
        frozen_until: None,
        cooldown: None,
        upstream: Some((0, t0 + Duration::from_secs(1_000_000_000), 60 * SEC)),
        ceiling: None,
        slots: None,
        refills_continuously: false,
        limit_window: None,
    };
    assert!(t.restore("r", None, saved, t0));
    let Decision::Denied(d) = t.acquire(&args("GET", "/", 1), NOW, t0).unwrap() else {
        panic!("granted past the restored budget")
    };
    assert!(d.retry_after <= max + 60 * SEC, "{:?}", d.retry_after);
}

#[derive(Debug, Clone)]
enum Op {
    Acquire(u32),
    Release(usize),
    Advance(u64),
}

proptest! {
    /// No interleaving of acquires, releases, waits and expiries holds
    /// more slots than the limit, or grants more permits in any window
    /// than burst + rate × window.
    #[test]
    fn limits_hold_under_any_interleaving(
        ops in prop::collection::vec(prop_oneof![
            (1u32..3).prop_map(Op::Acquire),
            (0usize..8).prop_map(Op::Release),
            (0u64..3000).prop_map(Op::Advance),
        ], 1..150)
    ) {
        let t0 = Instant::now();
        let mut t = tenant(r#"
            [[tenants.buckets]]
            name = "both"
            routes = ["* /**"]
            permits = 5
            window_ms = 1000
            burst = 3
            max_in_flight = 3
            lease_ttl_ms = 2000
        "#, t0);
        let mut now = t0;
        let mut held: Vec<LeaseId> = Vec::new();
        let mut waiting = Vec::new();
        let mut grants: Vec<(Instant, u32)> = Vec::new();
        for op in ops {
            match op {
                Op::Acquire(n) => match t.acquire(&args("GET", "/", n), WAIT, now).unwrap() {
                    Decision::Granted(g) => { grants.push((now, n)); held.push(g.lease_id); }
                    Decision::Queued(q) => waiting.push((n, q.reply)),
                    Decision::Denied(d) => panic!("denied with a wait: {}", d.reason),
                },
                Op::Release(k) => if !held.is_empty() {
                    let id = held.remove(k % held.len());
                    t.release(id);
                },
                Op::Advance(ms) => now += Duration::from_millis(ms),
            }
            t.tick(now);
            waiting.retain_mut(|(n, rx)| match rx.try_recv() {
                Ok(Ok(g)) => { grants.push((now, *n)); held.push(g.lease_id); false }
                Ok(Err(_)) => false,
                Err(_) => true,
            });
            let s = &t.statuses(now)[0];
            prop_assert!(s.in_flight <= 3, "{} slots held", s.in_flight);
        }
        for (i, &(start, _)) in grants.iter().enumerate() {
            for &(end, _) in &grants[i..] {
                let w = (end - start).as_secs_f64();
                let n: u32 = grants.iter().filter(|(t, _)| *t >= start && *t <= end).map(|(_, n)| n).sum();
                prop_assert!(f64::from(n) <= 3.0 + w * 5.0 + 1e-9, "{n} in {w}s");
            }
        }
    }
}

#[test]
fn a_token_buckets_capacity_is_not_taken_for_a_per_window_limit() {
    use crate::learning::RateLimitInfo;
    let t0 = Instant::now();
    let bucket = "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"* /**\"]\npermits = 60\n\
                  window_ms = 60000";
    let told = |count: u64, reset_ms: u64| RateLimitInfo {
        limit: Some(10),
        remaining: Some(10 - count),
        reset: Some(Duration::from_millis(reset_ms)),
        ..RateLimitInfo::default()
    };
    let learned = |t: &TenantState| t.statuses(t0)[0].learned_limit_per_min;
    // A bucket of 10 refilled at 45 a minute: its reset is the time to
    // refill what is used, 10 / 0.75 per s = 13.3 s from empty.
    let mut t = tenant(bucket, t0);
    for (count, reset_ms) in [(2, 2_667), (6, 8_000), (10, 13_333), (4, 5_333)] {
        t.report(("GET", "/", "oa"), 200, None, &told(count, reset_ms), t0)
            .unwrap();
    }
    let per_min = learned(&t).expect("a limit below 60 a minute");
    assert!((per_min - 45.0).abs() < 0.1, "learned {per_min} a minute");

    // A fixed window of 10 a minute: a report at its start says 60 s.
    let mut t = tenant(bucket, t0);
    for (count, reset_ms) in [(5, 30_000), (1, 60_000), (3, 40_000)] {
        t.report(("GET", "/", "oa"), 200, None, &told(count, reset_ms), t0)
            .unwrap();
    }
    assert_eq!(learned(&t), Some(10.0));
}

#[test]
fn a_concurrency_429_lowers_the_slot_limit_not_the_rate() {
    use crate::learning::RateLimitInfo;
    let t0 = Instant::now();
    let bucket = "[[tenants.buckets]]\nname = \"q\"\nroutes = [\"POST /q\"]\npermits = 600\n\
                  window_ms = 60000\nmax_in_flight = 8\nlease_ttl_ms = 60000";
    let mut t = tenant(bucket, t0);
    for _ in 0..5 {
        granted(t.acquire(&args("POST", "/q", 1), NOW, t0).unwrap());
    }
    let out = t
        .report_in_flight_refusal(
            ("POST", "/q", "oa"),
            Some(SEC),
            &RateLimitInfo::default(),
            t0,
        )
        .unwrap();
    assert_eq!(out.attributed_to.as_deref(), Some("q"));
    let q = &t.statuses(t0)[0];
    assert_eq!((q.in_flight, q.max_in_flight), (5, 4));
    assert_eq!(q.frozen_until, None, "the rate is not frozen");
    assert_eq!(q.effective_rate_per_min, 600.0, "nor cut");
    // Five in flight, four allowed: no grant until two come back.
    assert!(matches!(
        t.acquire(&args("POST", "/q", 1), NOW, t0).unwrap(),
        Decision::Denied(_)
    ));

    // Without a slot bucket it is an ordinary 429: the rate freezes.
    let rate_only = "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"* /**\"]\npermits = 60\n\
                     window_ms = 60000";
    let mut t = tenant(rate_only, t0);
    t.report_in_flight_refusal(("GET", "/", "oa"), Some(SEC), &RateLimitInfo::default(), t0)
        .unwrap();
    assert!(t.statuses(t0)[0].frozen_until.is_some());
}

#[test]
fn a_continuously_refilled_budget_is_not_waited_for_until_its_reset() {
    use crate::learning::RateLimitInfo;
    let t0 = Instant::now();
    let mut t = tenant(
        "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"* /**\"]\npermits = 60\n\
         window_ms = 60000\nburst = 10",
        t0,
    );
    // A bucket of 10 refilled at 45 a minute, seen empty: full in 13.3 s,
    // its next permit 1.3 s away.
    let empty = RateLimitInfo {
        limit: Some(10),
        remaining: Some(0),
        reset: Some(Duration::from_millis(13_333)),
        ..RateLimitInfo::default()
    };
    t.report(("GET", "/x", "oa"), 200, None, &empty, t0)
        .unwrap();
    let mut critical = args("GET", "/x", 1);
    critical.class = "critical".into();
    let Decision::Denied(d) = t.acquire(&critical, NOW, t0).unwrap() else {
        panic!("granted from an empty budget")
    };
    // A permit interval at the learned 45 a minute.
    assert!(d.retry_after <= 2 * SEC, "waits {:?}", d.retry_after);
    // The default class also leaves half the upstream's bucket to the
    // consumers the broker does not manage: 6 × 1.33 s, short of the reset.
    let Decision::Denied(d) = t.acquire(&args("GET", "/x", 1), NOW, t0).unwrap() else {
        panic!("granted from an empty budget")
    };
    assert!(
        d.retry_after <= Duration::from_millis(8100),
        "waits {:?}",
        d.retry_after
    );
    // The same from a fixed window (its reset seen at a full minute):
    // nothing more until the reset.
    let mut t = tenant(
        "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"* /**\"]\npermits = 60\n\
         window_ms = 60000\nburst = 10",
        t0,
    );
    let fresh = RateLimitInfo {
        remaining: Some(9),
        reset: Some(60 * SEC),
        ..empty
    };
    t.report(("GET", "/x", "oa"), 200, None, &fresh, t0)
        .unwrap();
    t.report(("GET", "/x", "oa"), 200, None, &empty, t0)
        .unwrap();
    let Decision::Denied(d) = t.acquire(&args("GET", "/x", 1), NOW, t0).unwrap() else {
        panic!("granted from an empty budget")
    };
    assert!(d.retry_after >= 13 * SEC, "waits {:?}", d.retry_after);
}

#[test]
fn the_upstream_budget_view_is_saved_and_resumed() {
    use crate::learning::RateLimitInfo;
    let t0 = Instant::now();
    let bucket = "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"* /**\"]\npermits = 600\n\
                  window_ms = 60000";
    let mut t = tenant(bucket, t0);
    let told = RateLimitInfo {
        limit: Some(300),
        remaining: Some(7),
        reset: Some(Duration::from_secs(45)),
        ..RateLimitInfo::default()
    };
    t.report(("GET", "/", "oa"), 200, None, &told, t0).unwrap();
    assert!(t.take_learned_dirty(), "a budget view is learned state");
    let saved = t.learned(t0);
    assert_eq!(saved[0].2.upstream.map(|u| u.0), Some(7), "{saved:?}");

    // A new leader (or a restart) 5 s later resumes it until its reset.
    let t1 = t0 + Duration::from_secs(5);
    let mut next = tenant(bucket, t1);
    for (bucket, client, p) in saved.clone() {
        assert!(next.restore(&bucket, client.as_deref(), p, t1));
    }
    assert_eq!(next.statuses(t1)[0].upstream_remaining, Some(7));
    // Past its reset there is nothing to carry.
    let mut late = tenant(bucket, t0 + Duration::from_secs(50));
    for (bucket, client, p) in saved {
        late.restore(&bucket, client.as_deref(), p, t0 + Duration::from_secs(50));
    }
    assert_eq!(
        late.statuses(t0 + Duration::from_secs(50))[0].upstream_remaining,
        None
    );
}

#[test]
fn a_default_burst_follows_the_permits_an_operator_sets_and_a_set_one_stays() {
    let t0 = Instant::now();
    let mut t = tenant(
        "[[tenants.buckets]]\nname = \"implicit\"\nroutes = [\"GET /a\"]\npermits = 300\n\
         window_ms = 60000\n[[tenants.buckets]]\nname = \"explicit\"\nroutes = [\"GET /b\"]\n\
         permits = 300\nwindow_ms = 60000\nburst = 20\n",
        t0,
    );
    let lower = |permits| LimitChange {
        permits: Some(permits),
        window: None,
        burst: None,
        max_in_flight: None,
    };
    let implicit = t.set_bucket_limit("implicit", lower(100), t0).unwrap();
    assert_eq!(implicit.rate.map(|r| r.burst.get()), Some(100));
    let explicit = t.set_bucket_limit("explicit", lower(100), t0).unwrap();
    assert_eq!(explicit.rate.map(|r| r.burst.get()), Some(20));
    // At most the new burst at once (less the reserve the default class
    // leaves to those above it), not the old window's 300.
    let mut granted = 0;
    while matches!(
        t.acquire(&args("GET", "/a", 1), NOW, t0),
        Ok(Decision::Granted(_))
    ) {
        granted += 1;
        assert!(granted <= 300, "no end to the burst");
    }
    assert!((50..=100).contains(&granted), "{granted} granted at once");
}
