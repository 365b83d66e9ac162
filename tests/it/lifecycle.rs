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
    // A reflection stream the client keeps open (its requests never end).
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let (asks, asked) = tokio::sync::mpsc::channel(1);
    asks.send(ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    })
    .await
    .unwrap();
    let mut reflection = ServerReflectionClient::new(b.channel.clone())
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(asked))
        .await
        .unwrap()
        .into_inner();
    reflection.message().await.unwrap().expect("a service list");

    b.trigger_stop();
    assert_eq!(
        health_watch.message().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    // The health Watch and the reflection stream, which never end on their
    // own, are ended by the stop (before, they held it for the whole grace
    // and broke off with the connection).
    let bound = std::time::Duration::from_secs(1);
    for (what, end) in [
        (
            "health Watch",
            tokio::time::timeout(bound, health_watch.message()).await,
        ),
        (
            "reflection",
            tokio::time::timeout(bound, reflection.message())
                .await
                .map(|r| r.map(|_| None)),
        ),
    ] {
        let end = end.unwrap_or_else(|_| panic!("the {what} stream was not ended by the stop"));
        let status = end.expect_err(what);
        assert_eq!(status.code(), tonic::Code::Unavailable, "{what}: {status}");
        assert!(status.message().contains("stopping"), "{what}: {status}");
    }
    drop(asks);
    // The Watch stream ends saying why (a caller tells it from a normal
    // end, and looks again later).
    let end = loop {
        match w.message().await {
            Ok(Some(_update)) => continue,
            Ok(None) => panic!("the Watch ended without saying the broker is shutting down"),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end}");
    assert!(end.message().contains("shutting down"), "{end}");
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
