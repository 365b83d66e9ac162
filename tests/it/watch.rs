//! Watch: a snapshot at once, then updates, coalesced.

use crate::harness::{config, req, start};
use quota_broker::pb::WatchRequest;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

const CFG: &str = r#"
[[tenants.buckets]]
name = "a"
routes = ["GET /**"]
permits = 100
window_ms = 60000
[[tenants.buckets]]
name = "b"
routes = ["POST /**"]
max_in_flight = 4
"#;

#[tokio::test(start_paused = true)]
async fn snapshot_then_updates() {
    let b = start(&config(CFG)).await;
    let mut w = b.watch_tenant("t").await;
    let mut first = HashMap::new();
    for _ in 0..2 {
        let s = w.message().await.unwrap().unwrap();
        first.insert(s.bucket.clone(), s);
    }
    assert_eq!(first["a"].tokens_available, 100.0);
    assert_eq!(first["a"].configured_rate_per_min, 100.0);
    assert_eq!(first["b"].max_in_flight, 4);
    assert!(first["a"].at_ms > 0);

    assert!(b.acquire(req("POST", "/x", 0)).await.granted);
    let s = w.message().await.unwrap().unwrap();
    assert_eq!(
        (s.bucket.as_str(), s.in_flight, s.granted_total),
        ("b", 1, 1)
    );
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_busy_bucket_updates_at_most_ten_times_a_second() {
    let b = start(&config(CFG)).await;
    let mut w = b
        .client
        .clone()
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        w.message().await.unwrap().unwrap();
    }
    // 100 grants spread over one second of (paused) time.
    let t0 = Instant::now();
    let c = b.client.clone();
    let load = tokio::spawn(async move {
        for _ in 0..100 {
            let mut r = req("GET", "/x", 0);
            r.priority_class = "critical".into();
            let r = c.clone().acquire(r).await.unwrap().into_inner();
            assert!(r.granted);
            tokio::time::advance(Duration::from_millis(10)).await;
        }
    });
    let mut updates = 0;
    let mut last_total = 0;
    while last_total < 100 {
        let s = w.message().await.unwrap().unwrap();
        assert_eq!(s.bucket, "a");
        updates += 1;
        last_total = s.granted_total;
    }
    load.await.unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        updates as f64 <= 10.0 * secs + 2.0,
        "{updates} updates in {secs:.2}s"
    );
    assert!(
        updates >= 2,
        "changes were sent as they happened, not only at the end"
    );
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn every_tenant_is_listed_in_config_order() {
    let ids = ["delta", "alpha", "echo", "charlie", "bravo", "foxtrot"];
    let mut toml = String::from("[server]\nstate_dir = \"\"\n");
    for id in ids {
        toml.push_str(&format!(
            "[[tenants]]\nid = \"{id}\"\n[[tenants.buckets]]\nname = \"org\"\n\
             routes = [\"* /**\"]\nmax_in_flight = 1\n"
        ));
    }
    let b = start(&toml).await;
    let listed: Vec<String> = b
        .admin
        .clone()
        .list_buckets(quota_broker::pb::ListBucketsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .buckets
        .into_iter()
        .map(|s| s.tenant)
        .collect();
    assert_eq!(listed, ids, "not in config order");
    let mut w = b
        .client
        .clone()
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut watched = Vec::new();
    for _ in ids {
        watched.push(w.message().await.unwrap().unwrap().tenant);
    }
    assert_eq!(watched, ids, "the Watch snapshot is not in config order");
    b.stop().await;
}

const PER_CLIENT: &str = r#"
[[tenants.buckets]]
name = "pc"
scope = "oauth_client"
routes = ["GET /**"]
permits = 60
window_ms = 60000
burst = 2
"#;

/// A per-client bucket no client uses is one row marked unused (a fresh
/// instance's figures) in ListBuckets, Watch and an operator's answer, so
/// a pause of it is seen; a client's instance replaces it, and once that
/// is dropped while idle the row is sent again.
#[tokio::test(start_paused = true)]
async fn a_per_client_bucket_no_client_uses_is_shown_and_its_pause_with_it() {
    use quota_broker::pb::{ListBucketsRequest, PauseBucketRequest, ResumeBucketRequest};
    let b = start(&config(PER_CLIENT)).await;
    let list = || async {
        b.admin
            .clone()
            .list_buckets(ListBucketsRequest { tenant: "t".into() })
            .await
            .unwrap()
            .into_inner()
            .buckets
    };
    let rows = list().await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert!(row.unused && row.oauth_client.is_empty(), "{row:?}");
    assert_eq!(row.scope, "oauth_client");
    assert_eq!(
        (row.configured_rate_per_min, row.burst, row.tokens_available),
        (60.0, 2, 2.0)
    );
    let mut w = b.watch_tenant("t").await;
    assert!(next(&mut w).await.unused);

    let paused = b
        .admin
        .clone()
        .pause_bucket(PauseBucketRequest {
            tenant: "t".into(),
            bucket: "pc".into(),
            reason: "maintenance".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        paused.status.as_ref().is_some_and(|s| s.unused && s.paused),
        "{paused:?}"
    );
    let s = next(&mut w).await;
    assert!(
        s.unused && s.paused && s.pause_reason == "maintenance",
        "{s:?}"
    );
    assert!(list().await[0].paused);
    b.admin
        .clone()
        .resume_bucket(ResumeBucketRequest {
            tenant: "t".into(),
            bucket: "pc".into(),
        })
        .await
        .unwrap();
    let s = next(&mut w).await;
    assert!(s.unused && !s.paused, "{s:?}");

    let mut r = req("GET", "/x", 0);
    r.oauth_client = "oa".into();
    assert!(b.acquire(r).await.granted);
    let s = next(&mut w).await;
    assert_eq!((s.oauth_client.as_str(), s.unused), ("oa", false));
    let rows = list().await;
    assert!(rows.len() == 1 && !rows[0].unused, "{rows:?}");

    // Full and idle again, the instance is dropped at the next sweep.
    tokio::time::advance(Duration::from_secs(150)).await;
    let mut back = next(&mut w).await;
    for _ in 0..10 {
        if back.unused {
            break;
        }
        back = next(&mut w).await;
    }
    assert!(back.unused, "{back:?}");
    assert!(back.oauth_client.is_empty());
    assert!(list().await[0].unused);
    b.stop().await;
}

/// The Watch's next message, within a minute (of the paused clock: at once
/// when nothing else is due).
async fn next(
    w: &mut tonic::Streaming<quota_broker::pb::QuotaStatus>,
) -> quota_broker::pb::QuotaStatus {
    tokio::time::timeout(Duration::from_secs(60), w.message())
        .await
        .expect("a Watch message within a minute")
        .unwrap()
        .unwrap()
}
