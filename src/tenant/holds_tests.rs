//! How waiters hold the buckets they need: a waiter for a slot holds only
//! what it lacks, one for a refill holds that and spares the rest, and a
//! request refused behind waiters is told when to retry.

use super::tests::{args, granted, tenant, NOW, TWO, WAIT};
use super::{Decision, Queued};
use std::time::Duration;
use tokio::time::Instant;

const SEC: Duration = Duration::from_secs(1);

/// A request refused only because an earlier request waits for more of a
/// bucket it shares than the bucket has is told a retry time, not 0 ms (a
/// caller honouring it would spin): one refill interval per waiter ahead.
#[test]
fn a_refusal_behind_waiters_says_when_to_retry() {
    let t0 = Instant::now();
    let mut t = tenant(TWO, t0);
    granted(t.acquire(&args("GET", "/x", 1), NOW, t0).unwrap());
    // 2 permits asked of the 1 left: it waits, and holds "rate".
    let Decision::Queued(_waiter) = t.acquire(&args("GET", "/x", 2), WAIT, t0).unwrap() else {
        panic!("the request for 2 was not queued")
    };
    let Decision::Denied(denial) = t.acquire(&args("GET", "/x", 1), NOW, t0).unwrap() else {
        panic!("a request for 1 went ahead of the waiter for 2")
    };
    assert!(
        denial
            .reason
            .contains("1 earlier requests wait on bucket \"rate\""),
        "{}",
        denial.reason
    );
    assert_eq!(
        denial.retry_after,
        Duration::from_millis(500),
        "one refill interval of 2/s"
    );
}

/// A waiter blocked on one bucket (no slot free) does not hold the others
/// it needs: a request for only one of those, which has capacity, is
/// granted at once rather than queued behind it (head-of-line blocking:
/// one saturated slot bucket stalled every call sharing a rate bucket).
/// Once capacity frees on what it lacked, the waiter goes first.
#[test]
fn a_waiter_blocked_on_one_bucket_does_not_hold_the_others() {
    let t0 = Instant::now();
    let mut t = tenant(TWO, t0);
    let held = granted(t.acquire(&args("POST", "/q", 1), NOW, t0).unwrap());
    let Decision::Queued(Queued { reply: mut rx, .. }) =
        t.acquire(&args("POST", "/q", 1), WAIT, t0).unwrap()
    else {
        panic!("the second POST was not queued behind the slot")
    };
    // "rate" has a permit: a GET (rate only) is granted, not queued.
    granted(t.acquire(&args("GET", "/x", 1), NOW, t0).unwrap());
    // Another POST is queued behind the first (it lacks the slot too).
    let Decision::Queued(_second) = t.acquire(&args("POST", "/q", 1), WAIT, t0).unwrap() else {
        panic!("a POST went ahead of the waiter for the slot")
    };
    // The slot comes back: the first waiter gets it once "rate" refills.
    assert!(t.release(held.lease_id));
    t.tick(t0 + SEC);
    let g = rx.try_recv().expect("answered").expect("granted");
    assert_eq!(g.buckets, ["rate", "slots"]);
}

/// A waiter that lacks only permits refilling at a known time holds all
/// its buckets, so a slot it has is not taken from under it while it waits
/// for the permit (holding only what it lacked, it could lose the slot
/// each time the permit came back).
#[test]
fn a_waiter_short_only_of_refilling_permits_keeps_its_slot() {
    let t0 = Instant::now();
    let mut t = tenant(
        r#"
    [[tenants.buckets]]
    name = "rate"
    routes = ["POST /q"]
    permits = 1
    window_ms = 1000
    burst = 1
    [[tenants.buckets]]
    name = "slots"
    routes = ["* /**"]
    max_in_flight = 1
    lease_ttl_ms = 5000
"#,
        t0,
    );
    let first = granted(t.acquire(&args("POST", "/q", 1), NOW, t0).unwrap());
    assert!(t.release(first.lease_id));
    // The slot is free, "rate" refills in 1 s: the next POST waits for it.
    let Decision::Queued(Queued { reply: mut rx, .. }) =
        t.acquire(&args("POST", "/q", 1), WAIT, t0).unwrap()
    else {
        panic!("the POST was not queued for its permit")
    };
    // A GET (slot only) does not take the slot meanwhile.
    let Decision::Denied(denial) = t.acquire(&args("GET", "/x", 1), NOW, t0).unwrap() else {
        panic!("a GET took the slot the waiter is about to use")
    };
    assert!(
        denial.reason.contains("wait on bucket \"slots\""),
        "{}",
        denial.reason
    );
    t.tick(t0 + SEC);
    let g = rx.try_recv().expect("answered").expect("granted");
    assert_eq!(g.buckets, ["rate", "slots"]);
}

/// A backlog on a rate-limited bucket does not stall calls that share
/// another bucket with it: the waiter spares what it does not lack, so a
/// request for that one alone goes ahead while the waiter's permit is still
/// there when its wait ends; one that would take it is held back.
#[test]
fn a_waiter_for_a_refill_spares_its_other_buckets() {
    let t0 = Instant::now();
    let mut t = tenant(
        r#"
    [[tenants.buckets]]
    name = "query"
    routes = ["POST /q"]
    permits = 2
    window_ms = 1000
    burst = 1
    [[tenants.buckets]]
    name = "per-client"
    routes = ["* /**"]
    permits = 1
    window_ms = 1000
    burst = 3
"#,
        t0,
    );
    granted(t.acquire(&args("POST", "/q", 1), NOW, t0).unwrap());
    // "query" refills in 0.5 s: the next POST waits for it.
    let Decision::Queued(Queued { reply: mut rx, .. }) =
        t.acquire(&args("POST", "/q", 1), WAIT, t0).unwrap()
    else {
        panic!("the POST was not queued for its permit")
    };
    // "per-client" has 2 permits and refills one a second: one GET leaves
    // the waiter's permit there at 0.5 s; a second would not.
    granted(t.acquire(&args("GET", "/x", 1), NOW, t0).unwrap());
    let Decision::Denied(denial) = t.acquire(&args("GET", "/x", 1), NOW, t0).unwrap() else {
        panic!("a second GET took the permit the waiter needs at 0.5 s")
    };
    assert!(
        denial.reason.contains("wait on bucket \"per-client\""),
        "{}",
        denial.reason
    );
    t.tick(t0 + SEC / 2);
    let g = rx.try_recv().expect("answered").expect("granted at 0.5 s");
    assert_eq!(g.buckets, ["query", "per-client"]);
}
