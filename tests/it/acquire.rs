//! Grants, waits, timeouts, all-or-nothing, expiry and release over gRPC.

use crate::harness::{config, req, start};
use quota_broker::pb::{AcquireRequest, ReleaseRequest, RenewRequest};
use std::time::Duration;
use tokio::time::Instant;

const SLOT: &str = r#"
[[tenants.buckets]]
name = "slots"
routes = ["POST /q"]
max_in_flight = 1
lease_ttl_ms = 5000
"#;

const RATE: &str = r#"
[[tenants.buckets]]
name = "rate"
routes = ["* /**"]
permits = 1
window_ms = 10000
burst = 1
"#;

#[tokio::test(start_paused = true)]
async fn grant_names_buckets_and_lease() {
    let b = start(&config(&format!("{RATE}{SLOT}"))).await;
    let r = b.acquire(req("post", "/q?x=1", 0)).await;
    assert!(r.granted, "{}", r.reason);
    assert_eq!(r.buckets, ["rate", "slots"]);
    assert_eq!(r.permits, 1);
    assert_eq!(r.lease_ttl_ms, 5000);
    assert!(r.lease_expires_at_ms > 0);
    assert!(!r.lease_id.is_empty());
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn rate_wait_is_granted_when_a_token_refills() {
    let b = start(&config(RATE)).await;
    assert!(b.acquire(req("GET", "/a", 0)).await.granted);
    let t0 = Instant::now();
    let r = b.acquire(req("GET", "/a", 20_000)).await;
    assert!(r.granted, "{}", r.reason);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(9_900) && waited <= Duration::from_millis(10_100),
        "granted after {waited:?}, the refill is at 10 s"
    );
    b.stop().await;
}

/// A wait the refill may just meet (within a tenth) queues, and ends
/// refused at its end with when to come back.
#[tokio::test(start_paused = true)]
async fn timeout_answers_with_retry_after_and_reason() {
    let b = start(&config(RATE)).await;
    assert!(b.acquire(req("GET", "/a", 0)).await.granted);
    let t0 = Instant::now();
    let r = b.acquire(req("GET", "/a", 9_500)).await;
    let waited = t0.elapsed();
    assert!(!r.granted);
    assert!(
        waited >= Duration::from_millis(9_500) && waited < Duration::from_millis(9_600),
        "{waited:?}"
    );
    assert!(
        (400..=500).contains(&r.retry_after_ms),
        "retry_after_ms {} should point at the refill 0.5 s later",
        r.retry_after_ms
    );
    assert!(r.reason.contains("\"rate\""), "{}", r.reason);
    assert!(r.lease_id.is_empty());
    assert_eq!(
        b.bucket("rate").await.waiting.len(),
        0,
        "the waiter left the queue"
    );
    b.stop().await;
}

/// A wait the refill cannot meet is answered at once, saying when and why,
/// instead of holding the caller for its whole wait.
#[tokio::test(start_paused = true)]
async fn a_refill_past_the_wait_is_answered_at_once() {
    let b = start(&config(RATE)).await;
    assert!(b.acquire(req("GET", "/a", 0)).await.granted);
    let t0 = Instant::now();
    let r = b.acquire(req("GET", "/a", 2_000)).await;
    assert!(!r.granted);
    assert!(
        t0.elapsed() < Duration::from_millis(100),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        (9_900..=10_000).contains(&r.retry_after_ms),
        "retry_after_ms {} should point at the refill 10 s later",
        r.retry_after_ms
    );
    assert!(
        r.reason
            .contains("past this call's wait of 2000 ms, so it is answered now"),
        "{}",
        r.reason
    );
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn waiter_is_granted_the_moment_a_slot_is_released() {
    let b = start(&config(SLOT)).await;
    let first = b.acquire(req("POST", "/q", 0)).await;
    assert!(first.granted);
    let mut watch = b.watch_all().await;
    let waiter = {
        let b_client = b.client.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let r = b_client.clone().acquire(req("POST", "/q", 60_000)).await;
            (r.unwrap().into_inner(), t0.elapsed())
        })
    };
    // Wait (on the Watch stream, not the clock) until the request queues.
    crate::harness::wait_for(&mut watch, |s| s.waiting.get("batch") == Some(&1)).await;
    let released = b
        .client
        .clone()
        .release(ReleaseRequest {
            lease_id: first.lease_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(released.released);
    let (r, waited) = waiter.await.unwrap();
    assert!(r.granted, "{}", r.reason);
    assert!(
        waited < Duration::from_secs(1),
        "granted on release, not at expiry: {waited:?}"
    );
    b.stop().await;
}

/// A client that got no answer to an Acquire releases, by the Acquire's
/// idempotency key, the lease the broker granted it anyway: its slot is
/// free again at once, not at the lease's expiry.
#[tokio::test(start_paused = true)]
async fn a_lease_whose_answer_was_lost_is_released_by_the_acquires_key() {
    let b = start(&config(SLOT)).await;
    let mut c = b.client.clone();
    let by_key = |tenant: &str, key: &str| ReleaseRequest {
        tenant: tenant.into(),
        acquire_key: key.into(),
        ..Default::default()
    };
    let lost = b
        .acquire(AcquireRequest {
            idempotency_key: "k-lost".into(),
            ..req("POST", "/q", 0)
        })
        .await;
    assert!(lost.granted, "{}", lost.reason);
    assert!(
        !b.acquire(req("POST", "/q", 0)).await.granted,
        "the one slot is held"
    );
    let unknown = c
        .release(by_key("t", "k-other"))
        .await
        .unwrap()
        .into_inner();
    assert!(!unknown.released);
    let released = c.release(by_key("t", "k-lost")).await.unwrap().into_inner();
    assert!(released.released);
    assert!(
        b.acquire(req("POST", "/q", 0)).await.granted,
        "free again at once"
    );
    // Once only; and a lease released by its id is not released again.
    assert!(
        !c.release(by_key("t", "k-lost"))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    // Naming nothing (a fallback's probe): nothing released, no refusal.
    let nothing = c.release(ReleaseRequest::default()).await.unwrap();
    assert!(!nothing.into_inner().released);
    let e = c.release(by_key("", "k")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = c.release(by_key("t", &"k".repeat(300))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("acquire_key"), "{}", e.message());
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn expired_lease_returns_its_slot_by_itself() {
    let b = start(&config(SLOT)).await;
    let first = b.acquire(req("POST", "/q", 0)).await;
    assert!(first.granted);
    let denied = b.acquire(req("POST", "/q", 0)).await;
    assert!(!denied.granted);
    assert!(
        (4_900..=5_000).contains(&denied.retry_after_ms),
        "retry_after_ms {} points at the slot's expiry",
        denied.retry_after_ms
    );
    let t0 = Instant::now();
    let r = b.acquire(req("POST", "/q", 60_000)).await;
    assert!(r.granted);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(4_900) && waited <= Duration::from_millis(5_100),
        "{waited:?}"
    );
    // The expired lease's release is OK and changes nothing.
    let rel = b
        .client
        .clone()
        .release(ReleaseRequest {
            lease_id: first.lease_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!rel.released);
    assert_eq!(b.bucket("slots").await.in_flight, 1);
    b.stop().await;
}

/// Nobody waiting: an expired lease's slot is back at its expiry all the
/// same, in what the broker reports as in what it decides, and the lease
/// can no longer be renewed (the driver slept until its next sweep, a
/// minute, so a crashed holder's slot looked held that long).
#[tokio::test(start_paused = true)]
async fn an_expired_lease_frees_its_slot_on_time_with_nobody_waiting() {
    let b = start(&config(SLOT)).await;
    let first = b.acquire(req("POST", "/q", 0)).await;
    assert!(first.granted);
    tokio::time::advance(Duration::from_millis(5_100)).await;
    assert_eq!(
        b.bucket("slots").await.in_flight,
        0,
        "ListBuckets still counts the expired lease"
    );
    let renewed = b
        .client
        .clone()
        .renew(RenewRequest {
            lease_id: first.lease_id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        renewed.map(|_| ()).unwrap_err().code(),
        tonic::Code::NotFound
    );
    let r = b.acquire(req("POST", "/q", 0)).await;
    assert!(r.granted, "{}", r.reason);
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn release_is_idempotent_and_renew_extends() {
    let b = start(&config(SLOT)).await;
    let g = b.acquire(req("POST", "/q", 0)).await;
    let mut c = b.client.clone();
    let renewed = c
        .renew(RenewRequest {
            lease_id: g.lease_id.clone(),
            extend_ms: 60_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.lease_ttl_ms, 60_000);
    assert_eq!(renewed.lease_expires_at_ms, g.lease_expires_at_ms + 55_000);
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(
        b.bucket("slots").await.in_flight,
        1,
        "renewed past the first TTL"
    );
    let rel = |id: String| {
        let mut c = c.clone();
        async move {
            c.release(ReleaseRequest {
                lease_id: id,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .released
        }
    };
    assert!(rel(g.lease_id.clone()).await);
    assert!(!rel(g.lease_id.clone()).await);
    assert_eq!(b.bucket("slots").await.in_flight, 0);
    assert!(b.acquire(req("POST", "/q", 0)).await.granted);
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn grant_takes_from_all_buckets_or_none() {
    let both = r#"
[[tenants.buckets]]
name = "org"
routes = ["* /**"]
permits = 2
window_ms = 60000
[[tenants.buckets]]
name = "slots"
routes = ["POST /q"]
max_in_flight = 1
"#;
    let b = start(&config(both)).await;
    assert!(b.acquire(req("POST", "/q", 0)).await.granted);
    let denied = b.acquire(req("POST", "/q", 0)).await;
    assert!(!denied.granted);
    assert!(denied.reason.contains("\"slots\""), "{}", denied.reason);
    // The refused request took nothing from "org".
    assert_eq!(b.bucket("org").await.tokens_available, 1.0);
    assert!(b.acquire(req("GET", "/other", 0)).await.granted);
    assert_eq!(b.bucket("org").await.tokens_available, 0.0);
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn concurrent_acquires_never_exceed_a_limit() {
    let cfg = r#"
[[tenants.buckets]]
name = "org"
routes = ["* /**"]
permits = 600
window_ms = 60000
[[tenants.buckets]]
name = "slots"
routes = ["POST /q"]
max_in_flight = 3
"#;
    let b = start(&config(cfg)).await;
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let mut c = b.client.clone();
            let path = if i % 2 == 0 { "/q" } else { "/r" };
            let method = if i % 2 == 0 { "POST" } else { "GET" };
            tokio::spawn(async move { c.acquire(req(method, path, 0)).await.unwrap().into_inner() })
        })
        .collect();
    let mut slot_grants = 0;
    let mut grants = 0;
    for (i, call) in calls.into_iter().enumerate() {
        let r = call.await.unwrap();
        if r.granted {
            grants += 1;
            if i % 2 == 0 {
                slot_grants += 1;
            }
        }
    }
    // "org" has room for all 20: only the slot limit refuses, and exactly
    // the POSTs past its 3.
    assert_eq!(slot_grants, 3, "slots granted of 3");
    assert_eq!(grants, 13, "the 10 GETs and 3 of the 10 POSTs");
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn per_oauth_client_buckets_are_separate() {
    let cfg = r#"
[[tenants.buckets]]
name = "per-client"
scope = "oauth_client"
routes = ["* /**"]
permits = 1
window_ms = 60000
"#;
    let b = start(&config(cfg)).await;
    let mut r = req("GET", "/a", 0);
    r.oauth_client = "one".into();
    assert!(b.acquire(r.clone()).await.granted);
    assert!(!b.acquire(r.clone()).await.granted);
    r.oauth_client = "two".into();
    assert!(b.acquire(r).await.granted);
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn cancelled_waiter_leaves_the_queue_and_takes_nothing() {
    let b = start(&config(SLOT)).await;
    let first = b.acquire(req("POST", "/q", 0)).await;
    let mut watch = b.watch_all().await;
    let mut c = b.client.clone();
    let waiter = tokio::spawn(async move { c.acquire(req("POST", "/q", 60_000)).await });
    crate::harness::wait_for(&mut watch, |s| s.waiting.get("batch") == Some(&1)).await;
    waiter.abort();
    // The server sees the stream reset and withdraws the waiter.
    crate::harness::wait_for(&mut watch, |s| s.waiting.is_empty()).await;
    b.client
        .clone()
        .release(ReleaseRequest {
            lease_id: first.lease_id,
            ..Default::default()
        })
        .await
        .unwrap();
    let s = b.bucket("slots").await;
    assert_eq!(
        (s.in_flight, s.waiting.len()),
        (0, 0),
        "nothing granted to the gone waiter"
    );
    b.stop().await;
}

/// The Acquire a release carries is needed only for a lease the broker
/// does not know: a live lease is released whatever it says (an Acquire
/// that would be refused, one naming another tenant); for a lease the
/// broker does not know, a bad one is still refused.
#[tokio::test(start_paused = true)]
async fn a_live_lease_is_released_whatever_acquire_its_release_carries() {
    let toml = format!("{}[[tenants]]\nid = \"u\"\n{SLOT}", config(SLOT));
    let b = start(&toml).await;
    let mut c = b.client.clone();
    let bad_acquires = [
        AcquireRequest {
            client_id: String::new(),
            ..req("POST", "/q", 0)
        },
        AcquireRequest {
            method: "NOT A METHOD".into(),
            ..req("POST", "/q", 0)
        },
        AcquireRequest {
            tenant: "u".into(),
            ..req("POST", "/q", 0)
        },
    ];
    for bad in bad_acquires {
        let lease = b.acquire(req("POST", "/q", 0)).await;
        assert!(lease.granted, "{}", lease.reason);
        let released = c
            .release(ReleaseRequest {
                lease_id: lease.lease_id.clone(),
                acquired_with: Some(bad.clone()),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{bad:?}: {e:?}"))
            .into_inner();
        assert!(released.released, "{bad:?}");
        // Released: now unknown, and the bad Acquire is needed and refused.
        let e = c
            .release(ReleaseRequest {
                lease_id: lease.lease_id,
                acquired_with: Some(bad.clone()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e:?}");
    }
    // Each release freed its slot (the one slot was granted again each
    // time): the last one too.
    assert!(b.acquire(req("POST", "/q", 0)).await.granted);
    b.stop().await;
}
