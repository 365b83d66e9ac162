//! `/metrics`: counts kept on the request path and bucket state read at
//! scrape time, a per-client bucket's clients summed and its most cut one
//! apart, the few series of an idle tenant, waiters of a class added at
//! run time, slots held over from a crash, a state directory that broke,
//! and shed calls counted by method and code.

use super::{config, get, sample, start, tokens_config, with_token, BUCKETS, LIMIT, TOKEN};
use crate::harness::req;
use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::{ListBucketsRequest, ReportRequest};

#[tokio::test]
async fn metrics_count_on_the_path_and_read_the_buckets_at_scrape_time() {
    let b = start(&config("")).await;
    let mut client = b.client();
    // Two permits a minute: two grants, then a denial for the rate.
    for _ in 0..2 {
        let r = client
            .acquire(req("GET", "/api/v2/users/1", 0))
            .await
            .unwrap()
            .into_inner();
        assert!(r.granted);
    }
    let r = client
        .acquire(req("GET", "/api/v2/users/1", 0))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.granted);
    client
        .report(ReportRequest {
            tenant: "t".into(),
            method: "GET".into(),
            path: "/api/v2/users/1".into(),
            http_status: 429,
            retry_after_ms: 30_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let m = get(
        b.http,
        "/metrics",
        &[(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )],
    )
    .await;
    assert_eq!(m.status, 200);
    assert!(m
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/openmetrics-text")));
    assert!(m.body.ends_with("# EOF\n"));
    let text = &m.body;
    let t = "tenant=\"t\"";
    let tb = "tenant=\"t\",bucket=\"users\"";
    let expect = [
        (
            format!("quota_broker_grants_total{{{t},class=\"batch\"}}"),
            2.0,
        ),
        (
            format!("quota_broker_denials_total{{{t},class=\"batch\",reason=\"rate\"}}"),
            1.0,
        ),
        (
            format!("quota_broker_reports_total{{{tb},status=\"429\"}}"),
            1.0,
        ),
        (format!("quota_broker_bucket_grants_total{{{tb}}}"), 2.0),
        (format!("quota_broker_throttled_total{{{tb}}}"), 1.0),
        (format!("quota_broker_freezes_total{{{tb}}}"), 1.0),
        (format!("quota_broker_frozen{{{tb}}}"), 1.0),
        (format!("quota_broker_slots_max{{{tb}}}"), 5.0),
        // Alone, a broker grants for every tenant configured.
        ("quota_broker_tenants".to_owned(), 2.0),
        ("quota_broker_tenants_led".to_owned(), 2.0),
        // Untouched tenant "u": its series exist, at zero.
        (
            "quota_broker_bucket_grants_total{tenant=\"u\",bucket=\"users\"}".to_owned(),
            0.0,
        ),
        (
            "quota_broker_rpc_duration_seconds_count{method=\"/quota.v1.QuotaBroker/Acquire\"}"
                .to_owned(),
            3.0,
        ),
    ];
    for (series, value) in expect {
        assert_eq!(sample(text, &series), Some(value), "{series} in\n{text}");
    }
    let configured = sample(
        text,
        &format!("quota_broker_configured_rate_per_second{{{tb}}}"),
    )
    .expect("configured rate exported");
    assert!((configured - 2.0 / 60.0).abs() < 1e-9, "{configured}");
    let left = sample(
        text,
        &format!("quota_broker_freeze_remaining_seconds{{{tb}}}"),
    )
    .expect("freeze countdown exported");
    assert!(left > 0.0 && left <= 31.0, "{left}");
    // No unbounded label: no lease ids, paths or client ids.
    assert!(!text.contains("/api/v2"), "a path leaked into a label");
    assert!(
        !text.contains("client_id"),
        "a client id leaked into a label"
    );
    b.stop().await;
}

#[tokio::test]
async fn a_buckets_totals_keep_what_its_dropped_instances_counted() {
    let b = start(
        "[server]\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\n\
         name = \"pc\"\nscope = \"oauth_client\"\nroutes = [\"POST /q\"]\nmax_in_flight = 1\n\
         max_clients = 1\nlease_ttl_ms = 60000\n",
    )
    .await;
    let mut client = b.client();
    // Client a's instance grants one and goes idle; client b needs its
    // place (one instance at most), so a's instance is dropped.
    for oauth in ["a", "b"] {
        let mut r = req("POST", "/q", 0);
        r.oauth_client = oauth.into();
        let g = client.acquire(r).await.unwrap().into_inner();
        assert!(g.granted, "{}", g.reason);
        client
            .release(quota_broker::pb::ReleaseRequest {
                lease_id: g.lease_id,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let m = get(b.http, "/metrics", &[]).await;
    let series = "quota_broker_bucket_grants_total{tenant=\"t\",bucket=\"pc\"}";
    assert_eq!(
        sample(&m.body, series),
        Some(2.0),
        "a counter went down:\n{}",
        m.body
    );
    b.stop().await;
}

/// A per-OAuth-client bucket's rates are its clients' summed, and the
/// most cut client is exported apart: the sum hides one client cut to a
/// fraction among many at their full rate.
#[tokio::test]
async fn a_per_client_buckets_most_cut_client_is_exported() {
    let b = start(
        "[server]\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\n\
         name = \"pc\"\nscope = \"oauth_client\"\nroutes = [\"GET /q\"]\npermits = 60\n\
         window_ms = 60000\n",
    )
    .await;
    let mut client = b.client();
    for oauth in ["a", "b", "c"] {
        let mut r = req("GET", "/q", 0);
        r.oauth_client = oauth.into();
        let g = client.acquire(r).await.unwrap().into_inner();
        assert!(g.granted, "{}", g.reason);
    }
    // Client a's 429 without a Retry-After cuts its instance alone.
    client
        .report(ReportRequest {
            tenant: "t".into(),
            method: "GET".into(),
            path: "/q".into(),
            oauth_client: "a".into(),
            http_status: 429,
            ..Default::default()
        })
        .await
        .unwrap();
    let listed = QuotaAdminClient::new(b.channel.clone())
        .list_buckets(ListBucketsRequest { tenant: "t".into() })
        .await
        .unwrap()
        .into_inner()
        .buckets;
    assert_eq!(listed.len(), 3, "{listed:?}");
    let share =
        |s: &quota_broker::pb::QuotaStatus| s.effective_rate_per_min / s.configured_rate_per_min;
    let lowest = listed.iter().map(share).fold(f64::INFINITY, f64::min);
    let summed = listed.iter().map(|s| s.effective_rate_per_min).sum::<f64>()
        / listed
            .iter()
            .map(|s| s.configured_rate_per_min)
            .sum::<f64>();
    assert!(lowest < 1.0, "the 429 cut nothing: {listed:?}");
    let m = get(b.http, "/metrics", &[]).await.body;
    let at = |name: &str| {
        sample(
            &m,
            &format!("quota_broker_{name}{{tenant=\"t\",bucket=\"pc\"}}"),
        )
        .unwrap_or_else(|| panic!("no {name} in\n{m}"))
    };
    assert!(
        (at("effective_rate_lowest_share") - lowest).abs() < 1e-9,
        "{m}"
    );
    assert!(
        (at("effective_rate_per_second") / at("configured_rate_per_second") - summed).abs() < 1e-9,
        "{m}"
    );
    assert!(summed > lowest + 0.05, "{summed} {lowest}");
    b.stop().await;
}

/// The series of tenant `tenant` in a metrics text, by name.
fn series_of<'a>(text: &'a str, tenant: &str) -> Vec<&'a str> {
    let label = format!("tenant=\"{tenant}\"");
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(&label))
        .collect()
}

/// A tenant with no traffic exports its buckets' state and its leases,
/// a bounded few series (made up front, its per-class series were some
/// 160 more, nearly all zeros: a 137 MB scrape at 10,000 tenants); its
/// counts per class, reason and status appear with their first use, of the
/// class used only.
#[tokio::test]
async fn an_idle_tenant_exports_few_series_and_a_used_one_what_it_used() {
    let b = start(&config("")).await;
    // Per bucket: 3 counters, 12 gauges of its state (rate and slots) and
    // a waiters gauge per class (4 and `other`); per tenant: leases_held.
    const IDLE: usize = 3 + 12 + 5 + 1;
    let idle = get(b.http, "/metrics", &[]).await.body;
    for tenant in ["t", "u"] {
        let series = series_of(&idle, tenant);
        assert_eq!(series.len(), IDLE, "{series:#?}");
        assert!(
            series
                .iter()
                .all(|l| !l.contains("_total{") || l.contains("bucket=")),
            "{series:#?}"
        );
        assert_eq!(
            sample(
                &idle,
                &format!("quota_broker_waiters{{tenant=\"{tenant}\",bucket=\"users\",class=\"critical\"}}")
            ),
            Some(0.0)
        );
    }
    let mut client = b.client();
    // Two permits a minute: two grants, then a denial for the rate.
    for granted in [true, true, false] {
        let r = client
            .acquire(req("GET", "/api/v2/users/1", 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.granted, granted, "{}", r.reason);
    }
    let used = get(b.http, "/metrics", &[]).await.body;
    assert_eq!(series_of(&used, "u"), series_of(&idle, "u"));
    let t = series_of(&used, "t");
    assert_eq!(t.len(), IDLE + 2, "{t:#?}");
    for line in [
        "quota_broker_grants_total{tenant=\"t\",class=\"batch\"} 2",
        "quota_broker_denials_total{tenant=\"t\",class=\"batch\",reason=\"rate\"} 1",
    ] {
        assert!(t.contains(&line), "{line} in {t:#?}");
    }
    b.stop().await;
}

/// A per-OAuth-client bucket with no instance (no client yet; all dropped
/// for idleness) exports its own state: no instances, nobody waiting, and
/// the figures of a fresh instance, what its next client gets. An
/// operator's pause of it shows at once, before any client is refused.
#[tokio::test]
async fn an_idle_per_client_bucket_shows_its_state_and_its_pause() {
    let b = start(
        "[server]\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\n\
         name = \"pc\"\nscope = \"oauth_client\"\nroutes = [\"GET /q\"]\npermits = 60\n\
         window_ms = 60000\nmax_in_flight = 2\n",
    )
    .await;
    let at = |text: &str, name: &str| {
        sample(
            text,
            &format!("quota_broker_{name}{{tenant=\"t\",bucket=\"pc\"}}"),
        )
    };
    let idle = get(b.http, "/metrics", &[]).await.body;
    for (name, value) in [
        ("instances", 0.0),
        ("paused", 0.0),
        ("frozen", 0.0),
        ("configured_rate_per_second", 1.0),
        ("effective_rate_per_second", 1.0),
        ("tokens", 60.0),
        ("slots_in_flight", 0.0),
        ("slots_max", 2.0),
        ("bucket_grants_total", 0.0),
    ] {
        assert_eq!(at(&idle, name), Some(value), "{name} in\n{idle}");
    }
    assert_eq!(
        sample(
            &idle,
            "quota_broker_waiters{tenant=\"t\",bucket=\"pc\",class=\"critical\"}"
        ),
        Some(0.0),
        "{idle}"
    );
    // No client uses it: its most cut client's share says nothing.
    assert_eq!(at(&idle, "effective_rate_lowest_share"), None, "{idle}");
    b.admin()
        .pause_bucket(quota_broker::pb::PauseBucketRequest {
            tenant: "t".into(),
            bucket: "pc".into(),
            reason: "maintenance".into(),
        })
        .await
        .unwrap();
    let paused = get(b.http, "/metrics", &[]).await.body;
    assert_eq!(at(&paused, "paused"), Some(1.0), "{paused}");
    assert_eq!(at(&paused, "instances"), Some(0.0), "{paused}");
    b.stop().await;
}

#[tokio::test]
async fn waiters_of_a_class_added_at_run_time_are_labelled_other() {
    use quota_broker::pb::{PriorityClass, SetPriorityClassRequest};
    let b = start(&config("")).await;
    QuotaAdminClient::new(b.channel.clone())
        .set_priority_class(SetPriorityClassRequest {
            reset: false,
            tenant: "t".into(),
            class: Some(PriorityClass {
                name: "reports".into(),
                order: 1,
                weight: 1,
                reserve: 0.0,
                default_max_wait_ms: 0,
            }),
        })
        .await
        .unwrap();
    // Two permits a minute: the third Acquire, of the new class, waits.
    let mut client = b.client();
    for _ in 0..2 {
        assert!(
            client
                .acquire(req("GET", "/api/v2/users/1", 0))
                .await
                .unwrap()
                .into_inner()
                .granted
        );
    }
    let waiting = tokio::spawn({
        let mut client = b.client();
        async move {
            let mut r = req("GET", "/api/v2/users/1", 50_000);
            r.priority_class = "reports".into();
            client.acquire(r).await
        }
    });
    let other = "quota_broker_waiters{tenant=\"t\",bucket=\"users\",class=\"other\"}";
    let text = tokio::time::timeout(LIMIT, async {
        loop {
            let m = get(b.http, "/metrics", &[]).await;
            if sample(&m.body, other) == Some(1.0) {
                return m.body;
            }
        }
    })
    .await
    .expect("the waiter was exported under class other");
    assert!(!text.contains("class=\"reports\""), "{text}");
    waiting.abort();
    b.stop().await;
}

/// After a crash every free slot counts as held by an unknown lease of the
/// run before; `/metrics` says how many, so on-call does not read them as
/// load. (A graceful stop records its leases and leaves none.)
#[tokio::test]
async fn slots_held_over_from_before_a_crash_are_shown_apart() {
    let dir = crate::harness::fresh_dir("held-over");
    let config = format!(
        r#"[server]
state_dir = "{}"
shutdown_grace_ms = 1000
[[tenants]]
id = "t"
[[tenants.buckets]]
name = "jobs"
routes = ["* /**"]
max_in_flight = 5
lease_ttl_ms = 60000
"#,
        dir.display()
    );
    let held_over = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("quota_broker_slots_held_over{"))
            .map(str::to_owned)
    };
    let b = start(&config).await;
    let metrics = get(b.http, "/metrics", &[]).await.body;
    assert_eq!(
        held_over(&metrics).as_deref(),
        Some("quota_broker_slots_held_over{tenant=\"t\",bucket=\"jobs\"} 0.0"),
        "{metrics}"
    );
    // A bucket without a rate has no token gauge (0 would read as
    // exhausted), and its waiters series are there at 0, not missing.
    assert!(
        !metrics.contains("quota_broker_tokens{tenant=\"t\",bucket=\"jobs\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("quota_broker_waiters{tenant=\"t\",bucket=\"jobs\",class=\"other\"} 0\n"),
        "{metrics}"
    );
    b.stop().await;
    // What a crash leaves: the state file, no record of the leases.
    std::fs::remove_file(dir.join("stopped.json")).unwrap();
    let b = start(&config).await;
    let metrics = get(b.http, "/metrics", &[]).await.body;
    b.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        held_over(&metrics).as_deref(),
        Some("quota_broker_slots_held_over{tenant=\"t\",bucket=\"jobs\"} 5.0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("quota_broker_slots_in_flight{tenant=\"t\",bucket=\"jobs\"} 5.0"),
        "{metrics}"
    );
}

/// A state directory that breaks while the broker runs (removed, replaced,
/// its disk full) does not stop it, but `/metrics` says its learned state
/// is no longer saved.
#[tokio::test]
async fn a_state_directory_that_breaks_is_shown_in_the_metrics() {
    let dir = crate::harness::fresh_dir("state-breaks");
    let b = start(&format!(
        "[server]\nstate_dir = \"{}\"\nshutdown_grace_ms = 1000\n[[tenants]]\nid = \"t\"\n{BUCKETS}",
        dir.display()
    ))
    .await;
    let failing = |text: &str| sample(text, "quota_broker_state_save_failing");
    assert_eq!(failing(&get(b.http, "/metrics", &[]).await.body), Some(0.0));
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, "not a directory").unwrap();
    // Something learned, to be saved.
    b.client()
        .report(ReportRequest {
            tenant: "t".into(),
            method: "GET".into(),
            path: "/api/v2/users/1".into(),
            http_status: 429,
            retry_after_ms: 1_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let seen = tokio::time::timeout(LIMIT, async {
        loop {
            let text = get(b.http, "/metrics", &[]).await.body;
            if failing(&text) == Some(1.0) {
                return;
            }
        }
    })
    .await;
    b.stop().await;
    let _ = std::fs::remove_file(&dir);
    seen.expect("state_save_failing turned 1 once the state directory broke");
}

/// Calls shed under overload are counted by method and code (they are
/// logged at info only once every 10 s).
#[tokio::test]
async fn shed_calls_are_counted_by_method_and_code() {
    let capped = format!(
        "{}max_requests_per_sec = 2\n[overload]\nexempt_loopback = false\n",
        tokens_config()
    );
    let b = start(&config(&capped)).await;
    let mut admin = QuotaAdminClient::new(b.channel.clone());
    let mut shed = 0;
    for _ in 0..10 {
        let asked = ListBucketsRequest { tenant: "t".into() };
        match admin.list_buckets(with_token(asked, TOKEN)).await {
            Ok(_) => {}
            Err(e) if e.code() == tonic::Code::ResourceExhausted => shed += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        shed >= 5,
        "only {shed} of 10 calls at once over 2 a second were shed"
    );
    // A refusal of another kind, counted apart.
    let other = admin
        .list_buckets(with_token(ListBucketsRequest { tenant: "u".into() }, TOKEN))
        .await
        .unwrap_err();
    let denied = match other.code() {
        tonic::Code::PermissionDenied => "permission_denied",
        tonic::Code::ResourceExhausted => {
            shed += 1;
            ""
        }
        code => panic!("{code:?}: {other}"),
    };
    let text = get(b.http, "/metrics", &[]).await.body;
    let series = |code: &str| {
        format!(
            "quota_broker_rpc_refusals_total{{method=\"/quota.v1.QuotaAdmin/ListBuckets\",code=\"{code}\"}}"
        )
    };
    assert_eq!(
        sample(&text, &series("resource_exhausted")),
        Some(f64::from(shed)),
        "{text}"
    );
    if !denied.is_empty() {
        assert_eq!(sample(&text, &series(denied)), Some(1.0), "{text}");
    }
    b.stop().await;
}
