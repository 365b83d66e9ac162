//! The in-process acquire decision: route matching, the all-or-none check
//! and take, and (for slot buckets) the lease bookkeeping and release.
//! No gRPC, no runtime: this is the broker's own cost per grant.

use criterion::{criterion_group, criterion_main, Criterion};
use quota_broker::{AcquireArgs, Decision, Settings, TenantState};
use std::hint::black_box;
use std::time::Duration;
use tokio::time::Instant;

/// Rates high enough that the bench never runs out of permits.
const CONFIG: &str = r#"
[[tenants]]
id = "bench"
[[tenants.buckets]]
name = "per-client"
scope = "oauth_client"
routes = ["* /**"]
permits = 1000000
window_ms = 1
burst = 1000000
[[tenants.buckets]]
name = "org"
routes = ["* /api/v2/**"]
permits = 1000000
window_ms = 1
burst = 1000000
[[tenants.buckets]]
name = "analytics-query"
routes = ["POST /api/v2/analytics/**/query"]
permits = 1000000
window_ms = 1
burst = 1000000
max_in_flight = 1000000
"#;

/// Never wait: the decision alone.
const NOW: Option<Duration> = Some(Duration::ZERO);

fn args(method: &str, path: &str) -> AcquireArgs {
    AcquireArgs {
        client_id: "bench".into(),
        class: String::new(),
        method: method.into(),
        path: path.into(),
        oauth_client: "oauth-1".into(),
        permits: 1,
        idempotency_key: String::new(),
    }
}

fn decision(c: &mut Criterion) {
    let settings = Settings::from_toml(CONFIG).expect("bench config is valid");
    let mut g = c.benchmark_group("decision");

    // One bucket: a call only the per-client bucket matches.
    let mut t = TenantState::new(
        0,
        &settings.tenants[0],
        &settings,
        Default::default(),
        Instant::now(),
    );
    let one = args("GET", "/other");
    g.bench_function("1 bucket (rate)", |b| {
        b.iter(|| match t.acquire(black_box(&one), NOW, Instant::now()) {
            Ok(Decision::Granted(grant)) => black_box(grant),
            _ => panic!("bench bucket ran dry"),
        })
    });

    // Three buckets, one with a concurrency slot: acquire, then release.
    let mut t = TenantState::new(
        0,
        &settings.tenants[0],
        &settings,
        Default::default(),
        Instant::now(),
    );
    let three = args("POST", "/api/v2/analytics/conversations/details/query");
    g.bench_function("3 buckets (rate + slot) acquire+release", |b| {
        b.iter(|| match t.acquire(black_box(&three), NOW, Instant::now()) {
            Ok(Decision::Granted(grant)) => black_box(t.release(grant.lease_id)),
            _ => panic!("bench bucket ran dry"),
        })
    });
    g.finish();
}

criterion_group!(benches, decision);
criterion_main!(benches);
