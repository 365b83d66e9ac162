//! The sample alert rules (docs/prometheus) and promtool: the rules and
//! their unit tests pass, a live `/metrics` passes `promtool check
//! metrics`, and every series the rules watch is one it exports.

use super::{get, sample, start, LIMIT};
use crate::harness::req;
use quota_broker::pb::ReportRequest;

/// The sample alert rules pass `promtool check rules` and their unit tests
/// (`promtool test rules`), and a live `/metrics` passes
/// `promtool check metrics`. Installs Debian's `prometheus` for promtool.
#[tokio::test]
async fn alert_rules_and_live_metrics_pass_promtool() {
    use std::process::{Command, Stdio};

    testsvc::apt_install(&["prometheus"])
        .unwrap_or_else(|e| panic!("promtool (Debian package prometheus) is needed: {e}"));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/prometheus");
    let run = |args: &[&str]| {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run promtool: {e}"));
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["check", "rules", "quota-broker-alerts.yml"]);
    run(&["test", "rules", "alerts-test.yml"]);

    // A bucket of one slot (and a rate): a grant, an Acquire that queues
    // for the slot and is granted when it is released, and one denied, so
    // every series the rules watch exists (a tenant's counts appear with
    // their first use).
    let b = start(
        "[server]\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\n\
         name = \"one\"\nroutes = [\"GET /**\"]\nmax_in_flight = 1\nlease_ttl_ms = 60000\n\
         permits = 1000\nwindow_ms = 1000\n",
    )
    .await;
    let mut client = b.client();
    let critical = |max_wait_ms| {
        let mut r = req("GET", "/one", max_wait_ms);
        r.priority_class = "critical".into();
        r
    };
    let first = client.acquire(critical(0)).await.unwrap().into_inner();
    assert!(first.granted, "{}", first.reason);
    let queued = tokio::spawn({
        let mut client = b.client();
        let r = critical(20_000);
        async move { client.acquire(r).await }
    });
    let waiter = "quota_broker_waiters{tenant=\"t\",bucket=\"one\",class=\"critical\"}";
    tokio::time::timeout(LIMIT, async {
        while sample(&get(b.http, "/metrics", &[]).await.body, waiter) != Some(1.0) {}
    })
    .await
    .expect("the second Acquire queued");
    client
        .release(quota_broker::pb::ReleaseRequest {
            lease_id: first.lease_id,
            ..Default::default()
        })
        .await
        .unwrap();
    let second = queued.await.unwrap().unwrap().into_inner();
    assert!(second.granted, "{}", second.reason);
    let third = client.acquire(critical(0)).await.unwrap().into_inner();
    assert!(!third.granted);
    client
        .report(ReportRequest {
            tenant: "t".into(),
            method: "GET".into(),
            path: "/one".into(),
            http_status: 200,
            ..Default::default()
        })
        .await
        .unwrap();
    let metrics = get(b.http, "/metrics", &[]).await;
    b.stop().await;
    // Asked without an Accept header: the Prometheus text format.
    assert!(metrics
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")));
    let text = metrics.body;
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = check.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every series the rules watch is one the broker exports: a renamed
    // metric would leave an alert that can never fire.
    let rules = std::fs::read_to_string(dir.join("quota-broker-alerts.yml")).unwrap();
    let mut watched: Vec<&str> = rules
        .match_indices("quota_broker_")
        .map(|(at, _)| {
            let rest = &rules[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    watched.sort_unstable();
    watched.dedup();
    assert!(watched.len() >= 5, "{watched:?}");
    // Exported only with [server.tls] (this broker is plaintext); its name
    // is checked by `metrics::tests::tls_certificates_expiry_is_exported`.
    watched.retain(|n| *n != "quota_broker_tls_cert_expiry_timestamp_seconds");
    for name in watched {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' '])),
            "the alert rules watch {name}, which /metrics does not export:\n{text}"
        );
    }
}
