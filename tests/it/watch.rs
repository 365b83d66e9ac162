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
    let mut w = b
        .client
        .clone()
        .watch(WatchRequest { tenant: "t".into() })
        .await
        .unwrap()
        .into_inner();
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
