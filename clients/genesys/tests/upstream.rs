//! Leased calls against a real gcsim and a real broker, both in process on
//! 127.0.0.1, tokio's clock paused (windows and Retry-After pass by
//! auto-advance, never by sleeping).

use gc_upstream::{Credentials, Region, Request, RetryPolicy, Stats, Upstream, UpstreamError};
use gcsim::{Sim, SimConfig, SimHandle};
use quota_broker::{Embedded, Settings};
use quota_broker_client::{BrokerClient, Call, FallbackSettings};
use serde_json::json;
use std::time::Duration;

const BROKER: &str = r#"
[server]
state_dir = ""
[[tenants]]
id = "org-a"
[[tenants.buckets]]
name = "writes"
routes = ["POST /api/v2/conversations/**"]
permits = 300
window_ms = 60000
"#;

async fn broker() -> Embedded {
    let settings = Settings::from_toml(BROKER).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broker = Embedded::spawn(listener, settings).unwrap();
    assert!(broker.started().await, "the broker started");
    broker
}

/// The default org with its writes family enforcing `hidden` a minute.
async fn gcsim(hidden: u64, token_ttl_s: u64) -> SimHandle {
    let mut config = SimConfig::default();
    config.orgs[0].families[1].hidden_permits = Some(hidden);
    config.orgs[0].token_ttl_s = token_ttl_s;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Sim::start(config, listener).unwrap()
}

fn upstream(sim: &SimHandle, broker: BrokerClient, secret: &str) -> Upstream {
    let region = Region::new(&format!("http://{}", sim.addr())).unwrap();
    let credentials = Credentials {
        client_id: "relay@org-a".into(),
        client_secret: secret.into(),
    };
    let template = Call::new("org-a", "GET", "/")
        .client_id("test")
        .class("interactive");
    // No request timeout: with the clock paused it would fire whenever the
    // runtime idles on a socket.
    Upstream::with_timeout(region, credentials, broker, template, None).unwrap()
}

fn wrapup(conversation: &str) -> Request {
    Request::post(
        format!(
            "/api/v2/conversations/calls/{conversation}/participants/p/communications/m/wrapup"
        ),
        json!({"code": "sale"}),
    )
}

async fn writes(sim: &SimHandle) -> serde_json::Value {
    reqwest::get(format!("http://{}/_sim/orgs/org-a/writes", sim.addr()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_429_is_reported_and_retried_only_when_the_broker_grants_again() {
    let sim = gcsim(10, 86_400).await;
    let broker = broker().await;
    let up = upstream(
        &sim,
        BrokerClient::connect(&broker.url(), None).unwrap(),
        "gcsim-secret",
    );
    let start = tokio::time::Instant::now();
    for i in 0..25 {
        let answer = up
            .send_retrying(&wrapup(&format!("c{i}")), &RetryPolicy::default())
            .await
            .unwrap();
        assert_eq!(answer.status, 202, "write {i}: {}", answer.text());
    }
    let stats = up.stats();
    // 10 a minute really: the first 429 teaches the broker the window; at
    // most one more while it learns the rate.
    assert!(stats.throttled_429 >= 1, "{stats:?}");
    assert!(stats.throttled_429 <= 2, "{stats:?}");
    assert_eq!(stats.retries, stats.throttled_429, "{stats:?}");
    assert_eq!(stats.ok_2xx, 25);
    assert_eq!(stats.logins, 1);
    // 25 writes at 10 a minute: into the third minute, not sooner.
    assert!(
        start.elapsed() >= Duration::from_secs(120),
        "{:?}",
        start.elapsed()
    );
    let w = writes(&sim).await;
    assert_eq!(w.as_object().unwrap().len(), 25, "{w}");
    assert!(w.as_object().unwrap().values().all(|n| n == 1), "{w}");
    broker.stop().await.unwrap();
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn tokens_are_refreshed_before_they_expire_and_bad_credentials_fail() {
    let sim = gcsim(300, 10).await;
    let broker = broker().await;
    let client = BrokerClient::connect(&broker.url(), None).unwrap();
    let up = upstream(&sim, client.clone(), "gcsim-secret");
    assert_eq!(up.send(&wrapup("a")).await.unwrap().status, 202);
    assert_eq!(up.send(&wrapup("b")).await.unwrap().status, 202);
    assert_eq!(up.stats().logins, 1);
    tokio::time::advance(Duration::from_secs(9)).await;
    assert_eq!(up.send(&wrapup("c")).await.unwrap().status, 202);
    let stats = up.stats();
    assert_eq!(
        (stats.logins, stats.client_4xx, stats.retries),
        (2, 0, 0),
        "{stats:?}"
    );

    let wrong = upstream(&sim, client, "not-the-secret");
    match wrong.send(&wrapup("d")).await {
        Err(UpstreamError::Auth {
            status: 401,
            message,
        }) => {
            assert!(message.contains("invalid_client"), "{message}")
        }
        other => panic!("expected a login refusal, got {other:?}"),
    }
    assert_eq!(wrong.stats().calls, 0, "no API call without a token");
    broker.stop().await.unwrap();
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_4xx_is_answered_not_retried() {
    let sim = gcsim(300, 86_400).await;
    let broker = broker().await;
    let up = upstream(
        &sim,
        BrokerClient::connect(&broker.url(), None).unwrap(),
        "gcsim-secret",
    );
    let bad = Request::post(
        "/api/v2/conversations/calls/c1/participants/p/communications/m/wrapup",
        json!({}),
    );
    let answer = up
        .send_retrying(&bad, &RetryPolicy::default())
        .await
        .unwrap();
    assert_eq!(answer.status, 400, "{}", answer.text());
    let stats = up.stats();
    assert_eq!(
        stats,
        Stats {
            calls: 1,
            client_4xx: 1,
            logins: 1,
            ..Stats::default()
        }
    );
    assert!(matches!(
        up.send(&Request::get("api/v2/no-slash")).await,
        Err(UpstreamError::Invalid { what: "path", .. })
    ));
    broker.stop().await.unwrap();
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn without_a_broker_calls_go_out_on_the_fallback_rate() {
    let sim = gcsim(300, 86_400).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let fallback = FallbackSettings {
        floor_per_min: 60,
        ..FallbackSettings::default()
    };
    let client = BrokerClient::with_fallback(&format!("http://{closed}"), None, fallback).unwrap();
    let up = upstream(&sim, client, "gcsim-secret");
    let start = tokio::time::Instant::now();
    for c in ["x", "y", "z"] {
        assert_eq!(up.send(&wrapup(c)).await.unwrap().status, 202);
    }
    assert_eq!(up.stats().fallback_leases, 3);
    // 60 a minute locally: the third call a second or more after the first.
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(writes(&sim).await.as_object().unwrap().len(), 3);
    sim.shutdown().await;
}

/// A login host that refuses connections (a wrong region) is an error at
/// the start-up check, with the system's reason; a broker that refuses
/// connections is a warning that says so, not "did not answer". (Real
/// time: the probes are connections, each answered at once.)
#[tokio::test]
async fn the_start_up_check_says_who_refuses_connections() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let credentials = Credentials {
        client_id: "relay@org-a".into(),
        client_secret: "gcsim-secret".into(),
    };
    let template = Call::new("org-a", "GET", "/").client_id("test");
    // The login host: nothing listens there.
    let broker = broker().await;
    let client = BrokerClient::connect(&broker.url(), None).unwrap();
    let region = Region::new(&format!("http://{closed}")).unwrap();
    let up = Upstream::new(region, credentials.clone(), client, template.clone()).unwrap();
    let err = up.preflight(Duration::from_secs(2)).await.unwrap_err();
    assert!(
        matches!(err, UpstreamError::LoginUnreachable { .. }),
        "{err}"
    );
    let said = err.to_string();
    assert!(
        said.starts_with(&format!(
            "the login host http://{closed} refuses connections ("
        )) && said.to_lowercase().contains("connection refused")
            && said.ends_with(": check --region"),
        "{said}"
    );
    broker.stop().await.unwrap();
    // The broker: nothing listens there; the login host answers.
    let sim = gcsim(300, 3600).await;
    let client = BrokerClient::connect(&format!("http://{closed}"), None).unwrap();
    let region = Region::new(&format!("http://{}", sim.addr())).unwrap();
    let up = Upstream::new(region, credentials, client, template).unwrap();
    let warnings = up.preflight(Duration::from_millis(500)).await.unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with(&format!(
            "the broker at http://{closed} refuses connections ("
        )),
        "{warnings:?}"
    );
    assert!(!warnings[0].contains("did not answer"), "{warnings:?}");
    sim.shutdown().await;
}
