//! Per-OAuth-client buckets: their instances bounded and dropped while
//! idle, and the unused row that stands for a bucket with none.

use super::tests::{args, granted, tenant, NOW};
use super::*;
use std::collections::HashMap;

const SEC: Duration = Duration::from_secs(1);

/// A tenant whose one bucket, `pc`, keeps an instance per OAuth client
/// (`permits` per `window_ms` each), at most two.
fn per_client(permits: u32, window_ms: u64, t0: Instant) -> TenantState {
    tenant(
        &format!(
            "[[tenants.buckets]]\nname = \"pc\"\nscope = \"oauth_client\"\nroutes = [\"* /**\"]\n\
             permits = {permits}\nwindow_ms = {window_ms}\nmax_clients = 2\n"
        ),
        t0,
    )
}

#[test]
fn per_client_instances_are_bounded_and_idle_ones_evicted() {
    let t0 = Instant::now();
    let mut t = per_client(1, 1000, t0);
    let mut a = args("GET", "/x", 1);
    for c in ["a", "b"] {
        a.oauth_client = c.into();
        granted(t.acquire(&a, NOW, t0).unwrap());
    }
    a.oauth_client = "c".into();
    let Decision::Denied(denial) = t.acquire(&a, NOW, t0).unwrap() else {
        panic!()
    };
    assert!(
        denial.reason.contains("limit of 2 OAuth clients"),
        "{}",
        denial.reason
    );
    // Once a and b are full again they are idle and make room; what was
    // written of them is written again (a restart would bring them back).
    let _ = t.take_learned_dirty();
    granted(t.acquire(&a, NOW, t0 + SEC).unwrap());
    assert_eq!(t.statuses(t0 + SEC).len(), 1);
    assert!(
        t.take_learned_dirty(),
        "dropped instances leave the learned state"
    );
    granted(t.acquire(&a, NOW, t0 + 2 * SEC).unwrap());
    assert!(!t.take_learned_dirty(), "nothing dropped, nothing to write");
    // Each client has its own budget.
    a.oauth_client = "a".into();
    granted(t.acquire(&a, NOW, t0 + SEC).unwrap());
}

#[test]
fn a_per_client_bucket_without_an_instance_shows_as_one_unused_row() {
    let t0 = Instant::now();
    let mut t = per_client(5, 1000, t0);
    let unused = |t: &TenantState, at| {
        let rows = t.statuses(at);
        assert_eq!(rows.len(), 1, "{rows:?}");
        rows[0].unused.then(|| rows[0].clone())
    };
    // Before its first client: a fresh instance's figures.
    let row = unused(&t, t0).expect("an unused row");
    assert_eq!(
        (row.bucket.as_str(), row.oauth_client.clone()),
        ("pc", None)
    );
    assert_eq!((row.configured_rate_per_min, row.burst), (300.0, 5));
    assert_eq!(row.tokens_available, 5.0);
    // A Watch reads it once, and again only when it changes.
    let mut seen = HashMap::new();
    assert_eq!(t.statuses_since(&mut seen, t0).len(), 1);
    assert!(t.statuses_since(&mut seen, t0).is_empty());
    t.set_paused("pc", Some("maintenance".into()), t0).unwrap();
    let paused = t.statuses_since(&mut seen, t0);
    assert_eq!(paused.len(), 1, "{paused:?}");
    assert_eq!(paused[0].paused.as_deref(), Some("maintenance"));
    assert!(paused[0].unused);
    t.set_paused("pc", None, t0).unwrap();
    // A client's instance stands for the bucket while it is there.
    let mut a = args("GET", "/x", 1);
    a.oauth_client = "a".into();
    granted(t.acquire(&a, NOW, t0).unwrap());
    assert_eq!(unused(&t, t0), None);
    let rows = t.statuses_since(&mut seen, t0);
    assert!(rows.iter().all(|r| !r.unused), "{rows:?}");
    // Dropped once idle and full: the unused row is back, and a Watch is
    // sent it.
    let later = t0 + 2 * SWEEP_EVERY;
    t.tick(later);
    assert!(unused(&t, later).is_some());
    let back = t.statuses_since(&mut seen, later);
    assert!(back.len() == 1 && back[0].unused, "{back:?}");
}

#[test]
fn reports_for_made_up_oauth_clients_cannot_fill_max_clients_for_good() {
    use crate::learning::RateLimitInfo;
    let t0 = Instant::now();
    let mut t = per_client(60, 60_000, t0);
    // Two reports teach limits for clients nobody acquires for.
    let low = RateLimitInfo {
        limit: Some(1),
        ..RateLimitInfo::default()
    };
    for c in ["made-up-1", "made-up-2"] {
        t.report(("GET", "/x", c), 200, None, &low, t0).unwrap();
    }
    // A real client still gets an instance: the one changed least recently
    // is forgotten, learned limit and all.
    let mut a = args("GET", "/x", 1);
    a.oauth_client = "real".into();
    granted(t.acquire(&a, NOW, t0).unwrap());
    let mut clients: Vec<String> = t
        .statuses(t0)
        .into_iter()
        .filter_map(|s| s.oauth_client)
        .collect();
    clients.sort();
    assert_eq!(clients, ["made-up-2", "real"]);
    // An instance in use is never forgotten: with both busy, a third waits.
    a.oauth_client = "made-up-2".into();
    granted(t.acquire(&a, NOW, t0).unwrap());
    a.oauth_client = "third".into();
    let Decision::Denied(denial) = t.acquire(&a, NOW, t0).unwrap() else {
        panic!("a busy client's instance was dropped")
    };
    assert!(
        denial.reason.contains("limit of 2 OAuth clients"),
        "{}",
        denial.reason
    );
}
