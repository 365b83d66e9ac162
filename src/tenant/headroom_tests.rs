//! The headroom below empty: while a lower class waits on a bucket (in the
//! queue, or sleeping out the `retry_after` of its refusal), the classes
//! above it may take what the classes between hold back below empty, and
//! the lower class repays it from the refill.

use super::tests::{args, granted, tenant, NOW, WAIT};
use super::{AcquireArgs, Decision, Queued};
use std::time::Duration;
use tokio::time::Instant;

const SEC: Duration = Duration::from_secs(1);

fn call(class: &str) -> AcquireArgs {
    AcquireArgs {
        class: class.into(),
        ..args("GET", "/x", 1)
    }
}

/// One permit a second, burst 10; the default classes hold 20% (2
/// permits) back from the lowest.
const ONE_A_SECOND: &str = "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"* /**\"]\n\
                            permits = 60\nwindow_ms = 60000\nburst = 10";

/// The queued batch request behind `rx` has not been answered yet.
fn still_waiting(rx: &mut tokio::sync::oneshot::Receiver<impl std::fmt::Debug>) {
    assert!(
        rx.try_recv().is_err(),
        "batch served before the debt was repaid"
    );
}

#[test]
fn critical_borrows_below_empty_only_while_a_lower_class_waits() {
    let t0 = Instant::now();
    let mut t = tenant(ONE_A_SECOND, t0);
    for _ in 0..10 {
        granted(t.acquire(&call("critical"), NOW, t0).unwrap());
    }
    // Empty, nobody below waits: critical waits like anyone.
    assert!(matches!(
        t.acquire(&call("critical"), NOW, t0).unwrap(),
        Decision::Denied(_)
    ));
    let Decision::Queued(Queued { reply: mut rx, .. }) =
        t.acquire(&call("batch"), WAIT, t0).unwrap()
    else {
        panic!("batch granted from an empty bucket")
    };
    // Batch waits: critical borrows the 2 held back from it, no more.
    granted(t.acquire(&call("critical"), NOW, t0).unwrap());
    granted(t.acquire(&call("critical"), NOW, t0).unwrap());
    let Decision::Denied(denial) = t.acquire(&call("critical"), NOW, t0).unwrap() else {
        panic!("borrowed past the reserve")
    };
    assert_eq!(denial.retry_after, SEC);
    // Batch pays it back: 1 permit plus its 2 held back are 5 s away.
    t.tick(t0 + 4 * SEC);
    still_waiting(&mut rx);
    t.tick(t0 + 5 * SEC);
    rx.try_recv().expect("answered").expect("granted");
}

#[test]
fn higher_classes_find_a_permit_at_once_while_batch_saturates_a_small_bucket() {
    let t0 = Instant::now();
    // One permit a second, burst 1: 20% of it is no whole permit, so a
    // reserve kept in the burst would hold nothing back.
    let mut t = tenant(
        "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"* /**\"]\npermits = 60\n\
         window_ms = 60000\nburst = 1",
        t0,
    );
    granted(t.acquire(&call("batch"), NOW, t0).unwrap());
    let Decision::Queued(Queued { reply: mut rx, .. }) =
        t.acquire(&call("batch"), WAIT, t0).unwrap()
    else {
        panic!("batch granted from an empty bucket")
    };
    // Batch saturates the bucket and waits on it: a trunk's call and a
    // wallboard's poll are granted at once, each from the headroom.
    granted(t.acquire(&call("interactive"), NOW, t0).unwrap());
    t.tick(t0 + SEC);
    still_waiting(&mut rx);
    granted(t.acquire(&call("critical"), NOW, t0 + SEC).unwrap());
    // The headroom is one permit below empty; it is repaid first.
    assert!(matches!(
        t.acquire(&call("critical"), NOW, t0 + SEC).unwrap(),
        Decision::Denied(_)
    ));
    t.tick(t0 + 2 * SEC);
    still_waiting(&mut rx);
    // The total is unchanged: 4 grants in 3 s from a bucket of 1 at 1/s.
    t.tick(t0 + 3 * SEC);
    rx.try_recv().expect("answered").expect("granted");
}

#[test]
fn critical_borrows_while_batch_sleeps_out_its_refusal() {
    let t0 = Instant::now();
    let mut t = tenant(ONE_A_SECOND, t0);
    // Batch takes all it may (the 2 held back stay) and is refused the
    // next: it asked not to wait, so it sleeps out the retry client-side.
    for _ in 0..8 {
        granted(t.acquire(&call("batch"), NOW, t0).unwrap());
    }
    let Decision::Denied(refused) = t.acquire(&call("batch"), NOW, t0).unwrap() else {
        panic!("batch took the reserve")
    };
    assert_eq!(refused.retry_after, SEC);
    // Two polls take the 2 held back; the next two borrow the 2 below
    // empty, as if batch still waited in the queue: it comes back and
    // repays them.
    for _ in 0..4 {
        granted(t.acquire(&call("critical"), NOW, t0).unwrap());
    }
    // Once batch was due back and is not, nothing is borrowed: 2.5
    // permits earned back since are not the 3 to be above empty again.
    let later = t0 + Duration::from_millis(2500);
    let Decision::Denied(_) = t.acquire(&call("critical"), NOW, later).unwrap() else {
        panic!("borrowed with no lower class waiting")
    };
}

#[test]
fn critical_borrows_while_batch_sleeps_after_its_wait_ran_out() {
    let t0 = Instant::now();
    let mut t = tenant(ONE_A_SECOND, t0);
    for _ in 0..8 {
        granted(t.acquire(&call("batch"), NOW, t0).unwrap());
    }
    // Batch queues; its wait runs out before its permit is earned back.
    let Decision::Queued(Queued { waiter, .. }) = t.acquire(&call("batch"), WAIT, t0).unwrap()
    else {
        panic!("batch took the reserve")
    };
    let gone = t.withdraw(waiter, t0).expect("still queued");
    assert_eq!(gone.retry_after, SEC);
    for _ in 0..4 {
        granted(t.acquire(&call("critical"), NOW, t0).unwrap());
    }
    let Decision::Denied(_) = t.acquire(&call("critical"), NOW, t0).unwrap() else {
        panic!("borrowed past the headroom")
    };
}

/// Polls of the top class granted at `at` after batch took all it may
/// and was refused (so it sleeps out the retry client-side).
fn polls_granted_while_batch_sleeps(t: &mut super::TenantState, at: Instant) -> usize {
    while let Decision::Granted(_) = t.acquire(&call("batch"), NOW, at).unwrap() {}
    (0..10)
        .take_while(|_| {
            matches!(
                t.acquire(&call("critical"), NOW, at),
                Ok(Decision::Granted(_))
            )
        })
        .count()
}

/// A tenant on `ONE_A_SECOND` told 429 (Retry-After 1 s) at `t0` and
/// again `second` later.
fn refused_twice(t0: Instant, second: Duration) -> super::TenantState {
    let mut t = tenant(ONE_A_SECOND, t0);
    for at in [t0, t0 + second] {
        t.report(
            ("GET", "/x", "oa"),
            429,
            Some(SEC),
            &crate::learning::RateLimitInfo::default(),
            at,
        )
        .unwrap();
    }
    t
}

#[test]
fn no_headroom_for_a_sleeping_batch_where_the_upstream_refills_continuously() {
    let t0 = Instant::now();
    let later = t0 + 150 * SEC;
    // The second 429 ten seconds after the first, inside the window the
    // first one's Retry-After implied: the upstream gives permits back
    // while it refuses, so the broker's empty bucket is the upstream's.
    // The polls get the 2 held back from batch, not the 2 below empty.
    let mut t = refused_twice(t0, 10 * SEC);
    assert_eq!(polls_granted_while_batch_sleeps(&mut t, later), 2);
    // A 429 a window and more later is a fixed window's next refusal:
    // below empty is still lent.
    let mut t = refused_twice(t0, 70 * SEC);
    assert_eq!(polls_granted_while_batch_sleeps(&mut t, later), 4);
}
