//! Leases ten "analytics query" calls from a broker and reports each.
//!
//! Start a broker (`cargo run --release` at the repository root), then:
//! `cargo run -p quota-broker-client --example lease [BROKER_URL]`

use quota_broker_client::{BrokerClient, Call, ClientError};
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), ClientError> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let token = std::env::var("QUOTA_BROKER_TOKEN").ok();
    let broker = BrokerClient::connect(&url, token.as_deref())?;
    let call = Call::new(
        "demo",
        "POST",
        "/api/v2/analytics/conversations/details/query",
    )
    .client_id("example-ingest")
    .oauth_client("example-oauth-client")
    .class("batch")
    .max_wait(Duration::from_secs(5));
    for i in 1..=10 {
        let lease = broker.acquire(&call).await?;
        // A real integration makes the upstream call here; we pretend it
        // answered 200 with Genesys's rate-limit headers.
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "inin-ratelimit-allowed",
            http::HeaderValue::from_static("300"),
        );
        headers.insert("inin-ratelimit-count", http::HeaderValue::from(i * 3));
        headers.insert("inin-ratelimit-reset", http::HeaderValue::from_static("42"));
        lease.report(200, &headers).await?;
        println!(
            "call {i}: lease {} ({})",
            if lease.is_fallback() { "-" } else { lease.id() },
            if lease.is_fallback() {
                "local fallback"
            } else {
                "granted by the broker"
            }
        );
        lease.release().await;
    }
    Ok(())
}
