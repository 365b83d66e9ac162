//! After a freeze: the top class resumes at the freeze's end with the
//! bucket's refill, while the jitter holds back only the classes below it.

use super::tests::{args, granted, tenant, NOW, WAIT};
use super::{AcquireArgs, Decision, Queued, TenantState};
use crate::learning::RateLimitInfo;
use std::time::Duration;
use tokio::time::Instant;

const SEC: Duration = Duration::from_secs(1);

fn call(class: &str) -> AcquireArgs {
    AcquireArgs {
        class: class.into(),
        ..args("GET", "/x", 1)
    }
}

/// A bucket of 6 a minute (a permit every 10 s, so the jitter after a
/// freeze is up to 10 s), frozen at `t0` by a 429 with Retry-After 20 s.
fn frozen_for_20s(t0: Instant) -> TenantState {
    frozen_for_20s_with_burst(t0, 10)
}

/// [`frozen_for_20s`] with a burst of `burst`.
fn frozen_for_20s_with_burst(t0: Instant, burst: u32) -> TenantState {
    let mut t = tenant(
        &format!(
            "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"* /**\"]\npermits = 6\n\
             window_ms = 60000\nburst = {burst}"
        ),
        t0,
    );
    t.report(
        ("GET", "/x", "oa"),
        429,
        Some(20 * SEC),
        &RateLimitInfo::default(),
        t0,
    )
    .unwrap();
    t
}

#[test]
fn a_call_that_would_wait_less_than_the_freeze_is_told_at_once() {
    let t0 = Instant::now();
    let mut t = frozen_for_20s(t0);
    let Decision::Denied(d) = t.acquire(&call("batch"), Some(10 * SEC), t0 + SEC).unwrap() else {
        panic!("held for a wait the freeze outlasts")
    };
    assert!(d.retry_after >= 19 * SEC, "{:?}", d.retry_after);
    // A wait past the freeze's end still queues.
    assert!(matches!(
        t.acquire(&call("critical"), Some(30 * SEC), t0 + SEC)
            .unwrap(),
        Decision::Queued(_)
    ));
}

#[test]
fn after_a_freeze_critical_resumes_at_its_end_while_batch_waits_out_the_jitter() {
    let t0 = Instant::now();
    // A burst of 4: the 20 % the default classes keep above batch is not a
    // whole permit, so the permit there at the freeze's end is batch's to
    // take but for the jitter (critical still borrows below empty).
    let mut t = frozen_for_20s_with_burst(t0, 4);
    let Decision::Queued(Queued {
        reply: mut batch, ..
    }) = t.acquire(&call("batch"), WAIT, t0).unwrap()
    else {
        panic!("batch granted while frozen")
    };
    let at_end = t0 + 20 * SEC;
    let resume = t.instances.iter().next().unwrap().1.resume_at.unwrap();
    assert!(resume > at_end, "no jitter drawn: {:?}", resume - at_end);
    t.tick(at_end);
    assert!(batch.try_recv().is_err(), "batch resumed with critical");
    granted(t.acquire(&call("critical"), NOW, at_end).unwrap());
}

#[test]
fn after_a_freeze_the_top_class_refills_from_its_end_not_from_after_the_jitter() {
    let t0 = Instant::now();
    let mut t = frozen_for_20s(t0);
    let until = t0 + 20 * SEC;
    let (_, x) = t.instances.iter().next().unwrap();
    let interval = x.tokens.as_ref().unwrap().interval();
    let resume = x.resume_at.unwrap();
    // The seeded draw: a jitter of a good part of an interval, else this
    // test could not tell the two apart.
    assert!(
        resume >= until + interval / 10,
        "jitter {:?} of {interval:?}",
        resume - until
    );
    let Decision::Queued(Queued {
        reply: mut batch, ..
    }) = t.acquire(&call("batch"), WAIT, t0).unwrap()
    else {
        panic!("batch granted while frozen")
    };
    // Three polls came due during the freeze and are served at its end:
    // the permit of the freeze's end and the two borrowed below empty.
    for _ in 0..3 {
        granted(t.acquire(&call("critical"), NOW, until).unwrap());
    }
    // The next one is due once the refill earned a permit back, one
    // interval after the freeze's end. The jitter is not the top class's
    // to wait out twice (it was served before it).
    granted(t.acquire(&call("critical"), NOW, until + interval).unwrap());
    t.tick(until + interval);
    assert!(
        batch.try_recv().is_err(),
        "batch served before the debt was repaid"
    );
}

/// A wave of 429s that extends a freeze is one freeze; a 429 after it
/// ended is another (`freezes_total` counted every 429 before).
#[test]
fn a_wave_of_429s_is_one_freeze() {
    let t0 = Instant::now();
    let mut t = frozen_for_20s(t0);
    for k in 1..=3u32 {
        t.report(
            ("GET", "/x", "oa"),
            429,
            Some(20 * SEC + SEC * k),
            &RateLimitInfo::default(),
            t0 + Duration::from_millis(10 * u64::from(k)),
        )
        .unwrap();
    }
    let s = &t.statuses(t0)[0];
    assert_eq!((s.throttled_total, s.freezes_total), (4, 1));
    let later = t0 + 60 * SEC;
    t.report(
        ("GET", "/x", "oa"),
        429,
        Some(SEC),
        &RateLimitInfo::default(),
        later,
    )
    .unwrap();
    let s = &t.statuses(later)[0];
    assert_eq!((s.throttled_total, s.freezes_total), (5, 2));
    // A 429 that asks no wait (Retry-After 0, a date past) holds nothing
    // back: a 429 counted, no freeze.
    let much_later = later + 60 * SEC;
    t.report(
        ("GET", "/x", "oa"),
        429,
        Some(Duration::ZERO),
        &RateLimitInfo::default(),
        much_later,
    )
    .unwrap();
    let s = &t.statuses(much_later)[0];
    assert_eq!((s.throttled_total, s.freezes_total), (6, 2));
}

#[test]
fn a_refusal_during_a_freeze_says_the_wait_for_the_permits_left_to_higher_classes() {
    // A burst of 10 with the default classes: batch leaves 2 to the
    // classes above it, which the empty bucket refills after the freeze
    // (10 s a permit) before batch is served.
    let t0 = Instant::now();
    let mut t = frozen_for_20s(t0);
    let Decision::Denied(d) = t.acquire(&call("batch"), NOW, t0 + SEC).unwrap() else {
        panic!("batch granted while frozen")
    };
    assert!(d.retry_after >= 19 * SEC + 20 * SEC, "{:?}", d.retry_after);
    assert!(
        d.reason.contains("is frozen for")
            && d.reason.contains(&format!(
                "waits for the 2 permits it leaves higher classes (about {} ms in all)",
                d.retry_after.as_millis()
            )),
        "{}",
        d.reason
    );
    // The top class leaves nothing: the freeze alone.
    let Decision::Denied(d) = t.acquire(&call("critical"), NOW, t0 + SEC).unwrap() else {
        panic!("critical granted while frozen")
    };
    assert!(!d.reason.contains("refills"), "{}", d.reason);
}
