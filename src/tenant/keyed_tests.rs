//! Idempotency keys on Acquire: the keys of ended leases forgotten, and a
//! release by key that meets the grant however the two are ordered.

use super::tests::{args, granted, tenant, NOW, TWO, WAIT};

const SEC: Duration = Duration::from_secs(1);
use super::*;

/// An Acquire of `permits` on `POST /q` with idempotency key `key`.
fn keyed(key: &str, permits: u32) -> AcquireArgs {
    AcquireArgs {
        idempotency_key: key.into(),
        ..args("POST", "/q", permits)
    }
}

#[test]
fn keys_of_acquires_whose_leases_ended_are_forgotten() {
    let t0 = Instant::now();
    let mut t = tenant(TWO, t0);
    let mut now = t0;
    for i in 0..500 {
        now += Duration::from_secs(1);
        let g = granted(t.acquire(&keyed(&format!("k{i}"), 1), NOW, now).unwrap());
        assert!(t.release(g.lease_id));
    }
    // At most a few dozen beyond twice the live leases (none live here).
    assert!(t.acquire_keys.len() <= 65, "{}", t.acquire_keys.len());
    granted(
        t.acquire(&keyed("live", 1), NOW, now + Duration::from_secs(1))
            .unwrap(),
    );
    assert!(t.release_by_key("live"));
    assert!(!t.release_by_key("live"));
    // One key granted twice (sent again after no answer): both released.
    let mut t = tenant(
        r#"
        [[tenants.buckets]]
        name = "slots"
        routes = ["POST /q"]
        max_in_flight = 2
        lease_ttl_ms = 5000
        "#,
        t0,
    );
    for _ in 0..2 {
        granted(t.acquire(&keyed("twice", 1), NOW, t0).unwrap());
    }
    assert!(t.release_by_key("twice"));
    assert!(matches!(
        t.acquire(&args("POST", "/q", 2), NOW, t0).unwrap(),
        Decision::Granted(_)
    ));
}

#[test]
fn a_keyed_acquire_granted_from_the_queue_is_released_by_its_key() {
    let t0 = Instant::now();
    let mut t = tenant(TWO, t0);
    let first = granted(t.acquire(&args("POST", "/q", 1), NOW, t0).unwrap());
    let Decision::Queued(Queued { reply: mut rx, .. }) =
        t.acquire(&keyed("waited", 1), WAIT, t0).unwrap()
    else {
        panic!("the second Acquire should wait for the only slot")
    };
    assert!(t.release(first.lease_id));
    t.tick(t0);
    // Noted under its key in the step that granted it, before its caller
    // has read the answer: a release by key that comes first finds it.
    assert!(t.release_by_key("waited"), "the queued grant under its key");
    let g = rx.try_recv().expect("granted").expect("a grant");
    assert!(!t.release(g.lease_id), "already released by its key");
    granted(t.acquire(&args("POST", "/q", 1), NOW, t0 + SEC).unwrap());
}

/// A release by key that comes before the Acquire under that key is
/// granted (the Acquire read from a connection the client gave up on,
/// decided after a release sent on a new one; or still queued) is not
/// lost: the lease granted later gives its slot back at once.
#[test]
fn a_key_released_before_its_acquire_was_granted_gives_the_grant_back() {
    let t0 = Instant::now();
    let mut t = tenant(TWO, t0);
    assert!(!t.release_by_key("early"), "nothing granted under it yet");
    let g = granted(t.acquire(&keyed("early", 1), NOW, t0).unwrap());
    assert!(!t.release(g.lease_id), "given back when granted");
    // The slot is free for another.
    let other = granted(t.acquire(&args("POST", "/q", 1), NOW, t0).unwrap());
    // Queued when released: given back when the queue grants it.
    let Decision::Queued(Queued { reply: mut rx, .. }) =
        t.acquire(&keyed("queued", 1), WAIT, t0).unwrap()
    else {
        panic!("the Acquire should wait for the only slot")
    };
    assert!(!t.release_by_key("queued"), "nothing granted under it yet");
    assert!(t.release(other.lease_id));
    // The rate bucket (2 a second) has a permit again.
    t.tick(t0 + SEC);
    let g = rx.try_recv().expect("granted").expect("a grant");
    assert!(!t.release(g.lease_id), "given back when granted");
    granted(t.acquire(&args("POST", "/q", 1), NOW, t0 + SEC).unwrap());
    // Remembered for a bounded number of keys.
    for i in 0..5_000 {
        t.release_by_key(&format!("k{i}"));
    }
    assert!(t.released_early.len() <= 1024, "{}", t.released_early.len());
}
