//! Learning over gRPC: freeze, paced resume, attribution, and learned
//! state across a restart. (Convergence under a hidden limit is a unit test
//! of the tenant, in-process on a simulated clock.)

use crate::harness::{req, start, TestBroker};
use quota_broker::pb::{ClearLearnedRequest, ListBucketsRequest, QuotaStatus, ReportRequest};
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// Tenants "t" and "u", each with one org-wide 60/min bucket.
fn two_tenants(state_dir: &str) -> String {
    let bucket = "[[tenants.buckets]]\nname = \"org\"\nroutes = [\"* /**\"]\npermits = 60\nwindow_ms = 60000\nburst = 10\n";
    format!(
        "[server]\nstate_dir = \"{state_dir}\"\nshutdown_grace_ms = 2000\n\
         [[tenants]]\nid = \"t\"\n{bucket}[[tenants]]\nid = \"u\"\n{bucket}"
    )
}

fn throttled(tenant: &str, retry_after: &str, headers: &[(&str, &str)]) -> ReportRequest {
    let mut h: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    h.insert("Retry-After".into(), retry_after.into());
    ReportRequest {
        tenant: tenant.into(),
        method: "GET".into(),
        path: "/api/v2/users".into(),
        http_status: 429,
        headers: h,
        ..Default::default()
    }
}

async fn status(b: &TestBroker, tenant: &str) -> QuotaStatus {
    let list = b
        .admin
        .clone()
        .list_buckets(ListBucketsRequest {
            tenant: tenant.into(),
        })
        .await
        .unwrap()
        .into_inner();
    list.buckets.into_iter().next().unwrap()
}

#[tokio::test(start_paused = true)]
async fn identical_429s_from_twenty_clients_cut_once_and_freeze_the_tenant_only() {
    let b = start(&two_tenants("")).await;
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let mut c = b.client.clone();
            tokio::spawn(async move { c.report(throttled("t", "15", &[])).await.unwrap() })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().into_inner().attributed_to, "org");
    }
    let s = status(&b, "t").await;
    assert_eq!(s.throttled_total, 20);
    assert!(
        (s.effective_rate_per_min - 42.0).abs() < 1e-6,
        "cut once: {}",
        s.effective_rate_per_min
    );
    assert_eq!(s.configured_rate_per_min, 60.0);
    assert!(
        s.frozen_until_ms >= s.at_ms + 14_900,
        "{} vs {}",
        s.frozen_until_ms,
        s.at_ms
    );
    assert!((s.throttle_ratio - 1.0).abs() < 1e-9);

    // Every client of "t" waits out the freeze; "u" is untouched.
    for client in ["wallboard", "ingest"] {
        let mut r = req("GET", "/api/v2/users", 0);
        r.client_id = client.into();
        r.priority_class = "critical".into();
        let a = b.acquire(r).await;
        assert!(!a.granted);
        // Freeze 15 s + jitter (< one 1 s interval) + the first paced permit (1.43 s).
        assert!(
            (15_000..=17_500).contains(&a.retry_after_ms),
            "{}",
            a.retry_after_ms
        );
        assert!(a.reason.contains("frozen"), "{}", a.reason);
    }
    let mut r = req("GET", "/api/v2/users", 0);
    r.tenant = "u".into();
    assert!(b.acquire(r).await.granted);
    assert_eq!(status(&b, "u").await.frozen_until_ms, 0);
    b.stop().await;
}

/// A Report sent again with its idempotency key (its first answer never
/// reached the client) is answered as the first time and counted once;
/// without a key, or with another, every Report counts.
#[tokio::test(start_paused = true)]
async fn a_report_sent_again_with_its_key_counts_once() {
    let b = start(&two_tenants("")).await;
    let mut c = b.client.clone();
    let keyed = |key: &str| ReportRequest {
        idempotency_key: key.into(),
        ..throttled("t", "15", &[])
    };
    let first = c.report(keyed("k1")).await.unwrap().into_inner();
    assert_eq!(first.attributed_to, "org");
    let again = c.report(keyed("k1")).await.unwrap().into_inner();
    assert_eq!(again, first);
    assert_eq!(status(&b, "t").await.throttled_total, 1);
    c.report(keyed("k2")).await.unwrap();
    c.report(keyed("")).await.unwrap();
    c.report(keyed("")).await.unwrap();
    assert_eq!(status(&b, "t").await.throttled_total, 4);
    // The same key on another tenant is another report.
    c.report(ReportRequest {
        idempotency_key: "k1".into(),
        ..throttled("u", "15", &[])
    })
    .await
    .unwrap();
    assert_eq!(status(&b, "u").await.throttled_total, 1);
    // A key longer than any id is refused, not stored.
    let e = c.report(keyed(&"k".repeat(300))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("idempotency_key"), "{}", e.message());
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_wild_retry_after_is_capped_and_an_operator_can_lift_the_freeze() {
    let b = start(&two_tenants("")).await;
    // 2^64-1 ms: about 585 million years.
    let mut r = throttled("t", "0", &[]);
    r.headers.clear();
    r.retry_after_ms = u64::MAX;
    b.client.clone().report(r).await.unwrap();
    let s = status(&b, "t").await;
    let frozen_for = Duration::from_millis(s.frozen_until_ms.saturating_sub(s.at_ms));
    assert!(frozen_for > Duration::ZERO, "not frozen at all");
    assert!(
        frozen_for <= Duration::from_secs(15 * 60),
        "frozen for {frozen_for:?}"
    );
    let denied = b.acquire(req("GET", "/x", 0)).await;
    assert!(!denied.granted);

    let cleared = b
        .admin
        .clone()
        .clear_learned(ClearLearnedRequest {
            tenant: "t".into(),
            bucket: "org".into(),
            oauth_client: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .statuses;
    assert_eq!(cleared.len(), 1);
    assert_eq!(cleared[0].frozen_until_ms, 0);
    assert_eq!(
        cleared[0].effective_rate_per_min, 60.0,
        "the cut is gone too"
    );
    // Granted within seconds (the batch class waits out the 2 permits held
    // back for higher classes), then paced: no burst after the reset.
    let t0 = Instant::now();
    assert!(b.acquire(req("GET", "/x", 10_000)).await.granted);
    let first = Instant::now() - t0;
    assert!(
        first <= Duration::from_secs(4),
        "first grant after {first:?}"
    );
    assert!(b.acquire(req("GET", "/x", 10_000)).await.granted);
    let second = Instant::now() - t0;
    assert!(
        second - first >= Duration::from_millis(900),
        "{first:?} {second:?}"
    );

    let err = b
        .admin
        .clone()
        .clear_learned(ClearLearnedRequest {
            tenant: "t".into(),
            bucket: "nope".into(),
            oauth_client: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn after_the_freeze_grants_resume_paced_not_in_a_burst() {
    let b = start(&two_tenants("")).await;
    b.client
        .clone()
        .report(throttled("t", "5", &[]))
        .await
        .unwrap();
    let t0 = Instant::now();
    // Ten clients wait through the freeze at once.
    let waiters: Vec<_> = (0..10)
        .map(|i| {
            let mut c = b.client.clone();
            tokio::spawn(async move {
                let mut r = req("GET", "/x", 30_000);
                r.client_id = format!("c{i}");
                let a = c.acquire(r).await.unwrap().into_inner();
                (a.granted, Instant::now())
            })
        })
        .collect();
    let mut at = Vec::new();
    for w in waiters {
        let (granted, when) = w.await.unwrap();
        assert!(granted);
        at.push(when - t0);
    }
    at.sort();
    assert!(
        at[0] >= Duration::from_secs(5),
        "nothing before the freeze ends: {at:?}"
    );
    // Effective 42/min after the cut: one permit every ~1.43 s, no burst.
    let first_second = at
        .iter()
        .filter(|d| **d < at[0] + Duration::from_secs(1))
        .count();
    assert_eq!(first_second, 1, "{at:?}");
    for pair in at.windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_millis(1_400), "{at:?}");
    }
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn headers_teach_the_limit_and_attribution_picks_the_matching_bucket() {
    let cfg = r#"
[server]
state_dir = ""
[[tenants]]
id = "t"
[[tenants.buckets]]
name = "per-client"
scope = "oauth_client"
routes = ["* /**"]
permits = 300
window_ms = 60000
[[tenants.buckets]]
name = "analytics"
routes = ["* /api/v2/analytics/**"]
permits = 60
window_ms = 60000
"#;
    let b = start(cfg).await;
    let mut c = b.client.clone();
    let report = |status, allowed: &str, count: &str, reset: &str| ReportRequest {
        tenant: "t".into(),
        method: "GET".into(),
        path: "/api/v2/analytics/users/summary".into(),
        oauth_client: "oc".into(),
        http_status: status,
        headers: [
            ("inin-ratelimit-allowed", allowed),
            ("inin-ratelimit-count", count),
            ("inin-ratelimit-reset", reset),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        ..Default::default()
    };
    // allowed 300: the per-OAuth-client budget; 6 used, 294 left.
    let r = c
        .report(report(200, "300", "6", "38"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.attributed_to, "per-client");
    // allowed 45: the analytics budget, lower than the configured 60, in a
    // window that started 2 s ago (a reset that long says the limit is per
    // minute, not per the seconds left).
    let r = c
        .report(report(200, "45", "40", "58"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.attributed_to, "analytics");
    let list = b
        .admin
        .clone()
        .list_buckets(ListBucketsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let a = list
        .buckets
        .iter()
        .find(|s| s.bucket == "analytics")
        .unwrap();
    assert_eq!(a.learned_limit_per_min, 45.0);
    assert_eq!(a.configured_rate_per_min, 60.0);
    assert!((a.effective_rate_per_min - 45.0).abs() < 1e-6);
    assert_eq!(a.upstream_remaining, 5);
    assert!(
        a.tokens_available <= 5.0,
        "shrunk to what the upstream has left"
    );
    let p = list
        .buckets
        .iter()
        .find(|s| s.bucket == "per-client")
        .unwrap();
    assert_eq!(p.upstream_remaining, 294);

    // A 429 carrying the per-client headers with budget left came from
    // another limit (Genesys sends the per-client headers on every
    // answer): it freezes the analytics bucket, not the OAuth client's.
    let mut throttled = report(429, "300", "7", "38");
    throttled.headers.insert("Retry-After".into(), "20".into());
    let r = c.report(throttled).await.unwrap().into_inner();
    assert_eq!(r.attributed_to, "analytics");
    let bucket =
        |list: &[QuotaStatus], name: &str| list.iter().find(|s| s.bucket == name).unwrap().clone();
    let list = b
        .admin
        .clone()
        .list_buckets(ListBucketsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .buckets;
    let (a, p) = (bucket(&list, "analytics"), bucket(&list, "per-client"));
    assert!(a.frozen_until_ms > 0 && a.throttled_total == 1, "{a:?}");
    assert!(p.frozen_until_ms == 0 && p.throttled_total == 0, "{p:?}");
    assert_eq!(
        p.upstream_remaining, 293,
        "the headers still update the per-client budget"
    );

    // The same headers with the budget used up: the per-client bucket refused.
    let mut spent = report(429, "300", "300", "38");
    spent.headers.insert("Retry-After".into(), "20".into());
    let r = c.report(spent).await.unwrap().into_inner();
    assert_eq!(r.attributed_to, "per-client");
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn learned_state_survives_a_restart() {
    let dir = std::env::temp_dir().join(format!("qb-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = two_tenants(dir.to_str().unwrap());
    let b = start(&cfg).await;
    let mut c = b.client.clone();
    c.report(throttled("t", "600", &[("X-RateLimit-Limit", "50")]))
        .await
        .unwrap();
    let before = status(&b, "t").await;
    assert_eq!(before.learned_limit_per_min, 50.0);
    assert!((before.effective_rate_per_min - 35.0).abs() < 1e-6);
    b.stop().await;
    assert!(dir.join("learned.toml").is_file());

    let b = start(&cfg).await;
    let after = status(&b, "t").await;
    assert_eq!(after.learned_limit_per_min, 50.0);
    assert!(
        (after.effective_rate_per_min - 35.0).abs() < 1e-6,
        "{}",
        after.effective_rate_per_min
    );
    assert!(
        after.frozen_until_ms > after.at_ms,
        "the freeze is still on after the restart"
    );
    assert!(!b.acquire(req("GET", "/x", 0)).await.granted);
    assert_eq!(status(&b, "u").await.effective_rate_per_min, 60.0);
    b.stop().await;

    // A corrupt file is reported and the broker starts on config alone.
    std::fs::write(dir.join("learned.toml"), "not = [valid").unwrap();
    let b = start(&cfg).await;
    assert_eq!(status(&b, "t").await.effective_rate_per_min, 60.0);
    b.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until `/metrics` says `state_save_failing` is `value` (the
/// writer's round that made it so has run).
async fn until_state_save_failing(b: &crate::observe::Observed, value: f64) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let text = crate::observe::get(b.http, "/metrics", &[]).await.body;
            if crate::observe::sample(&text, "quota_broker_state_save_failing") == Some(value) {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("state_save_failing never became {value}"));
}

#[tokio::test]
async fn learned_state_whose_write_failed_is_written_at_a_later_round() {
    let dir = std::env::temp_dir().join(format!("qb-persist-retry-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let b = crate::observe::start(&two_tenants(dir.to_str().unwrap())).await;
    let file = dir.join("learned.toml");
    assert!(file.is_file(), "written before serving");
    // Something takes the file's place: the writes fail.
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir_all(file.join("in-the-way")).unwrap();
    b.client()
        .report(throttled("t", "600", &[("X-RateLimit-Limit", "50")]))
        .await
        .unwrap();
    until_state_save_failing(&b, 1.0).await;
    assert!(file.is_dir());
    std::fs::remove_dir_all(&file).unwrap();
    // Nothing changes any more, and still the cut is written at a later
    // round of the writer.
    until_state_save_failing(&b, 0.0).await;
    let text = std::fs::read_to_string(&file).expect("the learned state was written");
    assert!(text.contains("learned_limit_per_min = 50"), "{text}");
    b.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Tenant `t` with bucket `q` (`POST /q`, 600 a minute, 8 slots), its
/// state kept in `state_dir` (`""`: none).
fn slot_bucket(state_dir: &str) -> String {
    format!(
        "[server]\nstate_dir = \"{state_dir}\"\nshutdown_grace_ms = 2000\n[[tenants]]\nid = \"t\"\n\
         [[tenants.buckets]]\nname = \"q\"\nroutes = [\"POST /q\"]\npermits = 600\n\
         window_ms = 60000\nmax_in_flight = 8\nlease_ttl_ms = 60000\n"
    )
}

/// A 429 on `POST /q` that the client says is about concurrency.
fn concurrency_429() -> ReportRequest {
    ReportRequest {
        tenant: "t".into(),
        method: "POST".into(),
        path: "/q".into(),
        http_status: 429,
        concurrency_limited: true,
        headers: [("Retry-After".to_owned(), "1".to_owned())].into(),
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_429_flagged_as_concurrency_lowers_the_slot_limit_and_leaves_the_rate() {
    let b = start(&slot_bucket("")).await;
    for _ in 0..3 {
        assert!(b.acquire(req("POST", "/q", 0)).await.granted);
    }
    let refused = concurrency_429();
    let r = b.client.clone().report(refused.clone()).await.unwrap();
    assert_eq!(r.into_inner().attributed_to, "q");
    let q = b.bucket("q").await;
    assert_eq!((q.in_flight, q.max_in_flight), (3, 2), "{q:?}");
    assert_eq!(q.frozen_until_ms, 0, "the rate is not frozen: {q:?}");
    assert_eq!(q.effective_rate_per_min, 600.0);
    // The same 429 without the flag freezes and cuts the rate instead.
    let r = ReportRequest {
        concurrency_limited: false,
        ..refused
    };
    b.client.clone().report(r).await.unwrap();
    let q = b.bucket("q").await;
    assert!(q.frozen_until_ms > 0, "{q:?}");
    assert_eq!(q.max_in_flight, 2);
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_learned_slot_limit_and_the_ceiling_memory_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("qb-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = slot_bucket(&dir.display().to_string());
    let b = start(&cfg).await;
    for _ in 0..3 {
        assert!(b.acquire(req("POST", "/q", 0)).await.granted);
    }
    let refused = concurrency_429();
    b.client.clone().report(refused.clone()).await.unwrap();
    // And a rate 429: the rate it came at is the remembered ceiling.
    let rate = ReportRequest {
        concurrency_limited: false,
        ..refused
    };
    b.client.clone().report(rate).await.unwrap();
    assert_eq!(b.bucket("q").await.max_in_flight, 2);
    b.stop().await;
    let memory = std::fs::read_to_string(dir.join("learned.toml")).unwrap();
    assert!(memory.contains("ceiling_per_min = 600.0"), "{memory}");

    let b = start(&cfg).await;
    let q = b.bucket("q").await;
    assert_eq!(q.max_in_flight, 2, "the learned slot limit is back: {q:?}");
    b.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
