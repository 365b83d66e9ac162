//! Unit tests of a limit the upstream states in its headers: it caps the
//! effective rate below the floor, and shrinks the burst (and the headroom
//! lent from it) to what the stated window allows.

use super::tests::{args, tenant, NOW};
use super::*;

const SEC: Duration = Duration::from_secs(1);

/// A 200 whose headers say the upstream allows 2 per 6 s, all spent.
fn upstream_states_2_per_6s(t: &mut TenantState, at: Instant) {
    let told = crate::learning::RateLimitInfo {
        limit: Some(2),
        remaining: Some(0),
        reset: Some(6 * SEC),
        ..crate::learning::RateLimitInfo::default()
    };
    t.report(("GET", "/", "oa"), 200, None, &told, at).unwrap();
}

/// A limit the upstream states below the floor (`floor_fraction` of the
/// configured rate) is the rate granted at: 2 per 6 s is 20 a minute, not
/// the floor's 60 of the 1200 configured.
#[test]
fn a_stated_limit_below_the_floor_caps_the_grants() {
    let t0 = Instant::now();
    let bucket = "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"* /**\"]\npermits = 120\n\
                  window_ms = 6000";
    let mut t = tenant(bucket, t0);
    upstream_states_2_per_6s(&mut t, t0);
    let r = &t.statuses(t0)[0];
    assert_eq!(
        (r.effective_rate_per_min, r.learned_limit_per_min),
        (20.0, Some(20.0))
    );
    // A critical acquire every 250 ms for 24 s; grants per 6 s window.
    let mut per_window = [0u32; 4];
    for k in 0..96u32 {
        let now = t0 + Duration::from_millis(250 * u64::from(k));
        let mut a = args("GET", "/", 1);
        a.class = "critical".into();
        if let Decision::Granted(_) = t.acquire(&a, NOW, now).unwrap() {
            per_window[(k / 24) as usize] += 1;
        }
    }
    // None until the reset; the window after it also gets what refilled
    // during the block; from then on 2 a window, as stated.
    assert_eq!(per_window[0], 0, "{per_window:?}");
    assert!(per_window[1] >= 2, "{per_window:?}");
    assert!(per_window[2..].iter().all(|&n| n == 2), "{per_window:?}");
}

/// Under a limit the upstream stated, the bucket holds no more than that
/// limit's worth: neither the headroom lent to higher classes while a
/// lower one waits (a share of the burst) nor an idle spell lets a burst
/// of the configured size through. Before, with 1,200 a minute configured
/// (burst 1,200) and 2 per 6 s stated, a refused batch call let `critical`
/// take 240 at once, and an idle hour saved up 1,200.
#[test]
fn a_stated_limit_scales_the_burst_and_the_headroom_lent_from_it() {
    let t0 = Instant::now();
    let bucket = "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"* /**\"]\npermits = 1200\n\
                  window_ms = 60000";
    let mut t = tenant(bucket, t0);
    upstream_states_2_per_6s(&mut t, t0);
    // 2 per the 6 s window the headers state (scaled as the rate, 20).
    assert_eq!(t.statuses(t0)[0].burst, 2);
    // After the reset a batch call is refused (it waits for the reserve),
    // then critical calls for a second.
    let at = t0 + 7 * SEC;
    let batch = args("GET", "/", 1);
    let _ = t.acquire(&batch, NOW, at).unwrap();
    let mut critical = args("GET", "/", 1);
    critical.class = "critical".into();
    let burst = (0..1000)
        .filter(|k| {
            let now = at + Duration::from_millis(*k);
            matches!(
                t.acquire(&critical, NOW, now).unwrap(),
                Decision::Granted(_)
            )
        })
        .count();
    assert!(
        (1..=3).contains(&burst),
        "{burst} granted in a second under 2 per 6 s"
    );
    // An idle hour saves up no more than the scaled burst.
    let later = at + Duration::from_secs(3600);
    let saved = (0..1000)
        .filter(|_| {
            matches!(
                t.acquire(&critical, NOW, later).unwrap(),
                Decision::Granted(_)
            )
        })
        .count();
    assert_eq!(saved, 2, "granted at once after an idle hour");
    // More permits than that at once: said so, and not "retry now".
    let mut three = critical.clone();
    three.permits = 3;
    let Decision::Denied(d) = t.acquire(&three, NOW, later).unwrap() else {
        panic!("3 permits granted under a burst of 2")
    };
    assert!(
        d.reason.contains("holds at most 2 permits now"),
        "{}",
        d.reason
    );
    assert!(
        d.retry_after >= Duration::from_secs(60),
        "{:?}",
        d.retry_after
    );
    // The stated limit lifted (an operator's clear): the configured burst again.
    t.clear_learned("r", None, later).unwrap();
    assert_eq!(t.statuses(later)[0].burst, 1200);
}

/// A 200 whose headers name the window of their limit: 2 per 6 s
/// (`RateLimit-Policy: 2;w=6`), with no reset to read a window from.
fn upstream_states_2_per_6s_with_its_window(t: &mut TenantState, at: Instant) {
    let told = crate::learning::RateLimitInfo {
        limit: Some(2),
        window: Some(6 * SEC),
        ..crate::learning::RateLimitInfo::default()
    };
    t.report(("GET", "/", "oa"), 200, None, &told, at).unwrap();
}

/// The window the headers name bounds the burst as a stated reset does:
/// 2 per 6 s is a burst of 2 (before, with no reset seen, the bucket's
/// own minute: 20 at once, 18 of them refused).
#[test]
fn a_limit_stated_with_its_window_shrinks_the_burst_to_that_window() {
    let t0 = Instant::now();
    let bucket = "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"* /**\"]\npermits = 1200\n\
                  window_ms = 60000";
    let mut t = tenant(bucket, t0);
    upstream_states_2_per_6s_with_its_window(&mut t, t0);
    let r = &t.statuses(t0)[0];
    assert_eq!((r.learned_limit_per_min, r.burst), (Some(20.0), 2));
}

/// A restart keeps the window the learned limit was read over: the burst
/// stays what that window allows, and a header stated a moment into a
/// window (a short reset) does not read the limit over that short time and
/// lift it (before: the restored limit of 20 a minute read as 60 from
/// `2, reset 2 s`, above nothing configured, and was dropped).
#[test]
fn a_restart_keeps_the_window_of_the_learned_limit() {
    let t0 = Instant::now();
    let bucket = "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"* /**\"]\npermits = 40\n\
                  window_ms = 60000";
    let mut before = tenant(bucket, t0);
    upstream_states_2_per_6s(&mut before, t0);
    assert_eq!(before.statuses(t0)[0].learned_limit_per_min, Some(20.0));
    let saved = before.learned(t0);
    let mut after = tenant(bucket, t0);
    for (b, client, p) in saved {
        assert!(after.restore(&b, client.as_deref(), p, t0));
    }
    let r = &after.statuses(t0)[0];
    assert_eq!((r.learned_limit_per_min, r.burst), (Some(20.0), 2));
    let told = crate::learning::RateLimitInfo {
        limit: Some(2),
        remaining: Some(1),
        reset: Some(2 * SEC),
        ..crate::learning::RateLimitInfo::default()
    };
    after
        .report(("GET", "/", "oa"), 200, None, &told, t0 + SEC)
        .unwrap();
    let r = &after.statuses(t0 + SEC)[0];
    assert_eq!((r.learned_limit_per_min, r.burst), (Some(20.0), 2));
}
