//! The admin commands changing a real broker: `class set`, `list` and
//! `reset` (the fields not given of a class kept, a new class given the
//! defaults), `bucket set-limit` and its `--reset`, `pause` and `resume`,
//! and `clear`, which lifts a freeze and needs an admin token.

use super::{stderr_line, Broker, ADMIN, CLIENT};
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{AcquireRequest, ReportRequest};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_change_the_broker() {
    let b = Broker::start().await;

    // class set: printed as set, and Acquire now accepts the class.
    let out = b
        .ok(
            Some(ADMIN),
            &[
                "class",
                "set",
                "--tenant",
                "t",
                "reports",
                "--order",
                "1",
                "--weight",
                "3",
                "--reserve",
                "0.05",
                "--default-max-wait-ms",
                "1000",
            ],
        )
        .await;
    assert!(out.contains("reports") && out.contains("1000 ms"), "{out}");
    let json = b
        .ok(
            Some(ADMIN),
            &[
                "class",
                "set",
                "--tenant",
                "t",
                "reports",
                "--order",
                "1",
                "--weight",
                "4",
                "--reserve",
                "0.05",
                "--json",
            ],
        )
        .await;
    let class: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(class["weight"], 4);
    // Not given: kept.
    assert_eq!(class["default_max_wait_ms"], 1000);
    // class list: the config's classes and the one added, in the order they
    // are served, the default marked.
    let table = b.ok(Some(ADMIN), &["class", "list", "--tenant", "t"]).await;
    assert!(table.starts_with("CLASS"), "{table}");
    assert!(table.contains("(default)"), "{table}");
    let rows: Vec<&str> = table.lines().skip(1).filter(|l| !l.is_empty()).collect();
    assert!(
        rows.iter()
            .any(|r| r.starts_with("reports ") && r.contains("5.00%")),
        "{table}"
    );
    let listed: Value = serde_json::from_str(
        &b.ok(Some(ADMIN), &["class", "list", "--tenant", "t", "--json"])
            .await,
    )
    .unwrap();
    let classes = listed["classes"].as_array().unwrap();
    let orders: Vec<u64> = classes
        .iter()
        .map(|c| c["order"].as_u64().unwrap())
        .collect();
    assert!(orders.windows(2).all(|w| w[0] <= w[1]), "{listed}");
    let reports = classes.iter().find(|c| c["name"] == "reports").unwrap();
    assert_eq!(reports["weight"], 4);
    assert!(
        classes.iter().any(|c| c["name"] == listed["default_class"]),
        "{listed}"
    );
    assert_eq!(classes.len(), rows.len(), "{table}");
    let mut client = QuotaBrokerClient::connect(b.url()).await.unwrap();
    let acquire = || {
        let mut acquire = tonic::Request::new(AcquireRequest {
            tenant: "t".into(),
            client_id: "cli-test".into(),
            priority_class: "reports".into(),
            method: "GET".into(),
            path: "/x".into(),
            max_wait_ms: Some(0),
            ..Default::default()
        });
        acquire
            .metadata_mut()
            .insert("authorization", format!("Bearer {CLIENT}").parse().unwrap());
        acquire
    };
    let r = client
        .acquire(acquire())
        .await
        .expect("class reports exists");
    assert!(r.into_inner().granted);
    // class reset: the added class removed (new Acquires naming it refused),
    // a class of the config as the config has it.
    let out = b
        .ok(Some(ADMIN), &["class", "reset", "--tenant", "t", "reports"])
        .await;
    assert!(out.contains("class reports removed"), "{out}");
    let err = client.acquire(acquire()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let critical = |listed: &Value| {
        listed["classes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "critical")
            .cloned()
            .unwrap()
    };
    let configured = critical(&listed);
    let json = b
        .ok(
            Some(ADMIN),
            &["class", "reset", "--tenant", "t", "critical", "--json"],
        )
        .await;
    assert_eq!(serde_json::from_str::<Value>(&json).unwrap(), configured);
    let json = b
        .ok(Some(ADMIN), &["class", "list", "--tenant", "t", "--json"])
        .await;
    let listed: Value = serde_json::from_str(&json).unwrap();
    assert!(
        !listed["classes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "reports"),
        "{listed}"
    );

    // bucket set-limit: the resulting row, and the new limits in status.
    let out = b
        .ok(
            Some(ADMIN),
            &[
                "bucket",
                "set-limit",
                "--tenant",
                "t",
                "org",
                "--permits",
                "120",
                "--window-ms",
                "60000",
                "--burst",
                "4",
            ],
        )
        .await;
    assert!(out.starts_with("TENANT"), "{out}");
    assert!(out.contains("120/120"), "{out}");
    let org = b.bucket("org").await;
    assert_eq!(org["configured_rate_per_min"], 120.0);
    assert_eq!(org["burst"], 4);
    b.ok(
        Some(ADMIN),
        &[
            "bucket",
            "set-limit",
            "--tenant",
            "t",
            "jobs",
            "--max-in-flight",
            "2",
        ],
    )
    .await;
    assert_eq!(b.bucket("jobs").await["max_in_flight"], 2);
    // --reset: the config's limits again.
    let out = b
        .ok(
            Some(ADMIN),
            &["bucket", "set-limit", "--tenant", "t", "org", "--reset"],
        )
        .await;
    assert!(out.starts_with("TENANT"), "{out}");
    let org = b.bucket("org").await;
    assert_eq!(
        (&org["configured_rate_per_min"], &org["burst"]),
        (&serde_json::json!(600.0), &serde_json::json!(10)),
        "{org}"
    );

    // pause / resume.
    let out = b
        .ok(
            Some(ADMIN),
            &["pause", "--tenant", "t", "jobs", "--reason", "maintenance"],
        )
        .await;
    assert!(
        out.lines().nth(1).unwrap().ends_with("paused: maintenance"),
        "{out}"
    );
    assert_eq!(b.bucket("jobs").await["paused"], true);
    assert_eq!(b.bucket("jobs").await["pause_reason"], "maintenance");
    assert_eq!(b.bucket("org").await["paused"], false);
    let out = b
        .ok(Some(ADMIN), &["resume", "--tenant", "t", "jobs", "--json"])
        .await;
    let s: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["paused"], false);
    assert_eq!(s["pause_reason"], "");
    assert_eq!(b.bucket("jobs").await["paused"], false);
    b.stop().await;
}

/// `class set` keeps the fields not given of a class in force (read with
/// ListPriorityClasses first) and gives a new class the config's defaults
/// (weight 1, reserve 0, no wait); a new class needs its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_set_keeps_what_is_not_given_and_defaults_a_new_class() {
    async fn set(b: &Broker, args: &[&str]) -> Value {
        let mut all = vec!["class", "set", "--tenant", "t", "--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&b.ok(Some(ADMIN), &all).await).unwrap()
    }
    let b = Broker::start().await;
    // The default classes' critical: order 0, weight 8, reserve 0.1, 2000 ms.
    let class = set(&b, &["critical", "--order", "5"]).await;
    assert_eq!(
        class,
        serde_json::json!({"name": "critical", "order": 5, "weight": 8, "reserve": 0.1,
                           "default_max_wait_ms": 2000})
    );
    let class = set(&b, &["reports", "--order", "7"]).await;
    assert_eq!(
        class,
        serde_json::json!({"name": "reports", "order": 7, "weight": 1, "reserve": 0.0,
                           "default_max_wait_ms": 0})
    );
    // As listed.
    let listed: Value = serde_json::from_str(
        &b.ok(Some(ADMIN), &["class", "list", "--tenant", "t", "--json"])
            .await,
    )
    .unwrap();
    let reports = listed["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "reports")
        .cloned();
    assert_eq!(reports, Some(class));
    let out = b
        .run(
            Some(ADMIN),
            &["class", "set", "--tenant", "t", "other", "--weight", "2"],
        )
        .await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr_line(&out),
        "quotactl: class \"other\" is not one of tenant \"t\"'s classes yet: a new class needs \
         --order (the others default to weight 1, reserve 0, default-max-wait-ms 0)"
    );
    b.stop().await;
}

#[tokio::test]
async fn clear_lifts_a_freeze_and_needs_an_admin() {
    let b = Broker::start().await;
    let mut client = QuotaBrokerClient::connect(b.url()).await.unwrap();
    let mut report = tonic::Request::new(ReportRequest {
        tenant: "t".into(),
        method: "GET".into(),
        path: "/x".into(),
        http_status: 429,
        retry_after_ms: 600_000,
        ..Default::default()
    });
    report
        .metadata_mut()
        .insert("authorization", format!("Bearer {CLIENT}").parse().unwrap());
    client.report(report).await.unwrap();
    let frozen = b.bucket("org").await;
    assert!(frozen["frozen_until_ms"].as_u64().unwrap() > 0, "{frozen}");

    let out = b
        .run(Some(CLIENT), &["clear", "--tenant", "t", "org"])
        .await;
    assert_eq!(out.status.code(), Some(1), "a client token may not clear");
    assert!(b.bucket("org").await["frozen_until_ms"].as_u64().unwrap() > 0);

    let out = b
        .ok(Some(ADMIN), &["clear", "--tenant", "t", "org", "--json"])
        .await;
    let cleared: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(cleared[0]["bucket"], "org");
    assert_eq!(cleared[0]["frozen_until_ms"], 0);
    assert_eq!(b.bucket("org").await["frozen_until_ms"], 0);
    b.stop().await;
}
