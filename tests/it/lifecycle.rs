//! Health, reflection-free discovery, and graceful shutdown.

use crate::harness::{config, req, start};
use quota_broker::pb::WatchRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const CFG: &str = r#"
[[tenants.buckets]]
name = "slots"
routes = ["* /**"]
max_in_flight = 1
"#;

#[tokio::test(start_paused = true)]
async fn shutdown_ends_streams_and_waits_and_reports_not_serving() {
    let mut b = start(&config(CFG)).await;
    let mut health = HealthClient::new(b.channel.clone());
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    for service in ["", "quota.v1.QuotaBroker", "quota.v1.QuotaAdmin"] {
        let s = health.check(check(service)).await.unwrap().into_inner();
        assert_eq!(s.status(), ServingStatus::Serving, "{service}");
    }
    let mut health_watch = health
        .watch(check("quota.v1.QuotaBroker"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health_watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    let mut w = b
        .client
        .clone()
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    w.message().await.unwrap().unwrap();
    assert!(b.acquire(req("GET", "/", 0)).await.granted);
    let mut c = b.client.clone();
    let waiter = tokio::spawn(async move { c.acquire(req("GET", "/", 60_000)).await });
    // Until the waiter is queued, the Watch stream sees it.
    loop {
        let s = w.message().await.unwrap().unwrap();
        if !s.waiting.is_empty() {
            break;
        }
    }
    b.trigger_stop();
    assert_eq!(
        health_watch.message().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    // The Watch stream ends cleanly.
    while let Some(_update) = w.message().await.unwrap() {}
    // The waiting Acquire is answered UNAVAILABLE, not left hanging.
    let status = waiter.await.unwrap().expect_err("no grant during shutdown");
    assert_eq!(
        status.code(),
        tonic::Code::Unavailable,
        "{}",
        status.message()
    );
    b.join().await;
}
