//! `quotactl status`: the table of the configured buckets, its columns
//! lined up, `--tenant` filtering (a tenant the token may not see denied),
//! and `--json` with every field.

use super::{stderr_line, Broker, CLIENT, FIELDS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_table_lists_the_configured_buckets() {
    let b = Broker::start().await;
    let out = b.ok(Some(CLIENT), &["status"]).await;
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("TENANT"), "{out}");
    for col in [
        "BUCKET",
        "RATE/MIN",
        "TOKENS",
        "IN FLIGHT",
        "WAITING",
        "429",
        "FROZEN",
        "PAUSED",
    ] {
        assert!(lines[0].contains(col), "no {col} column: {out}");
    }
    let row = |name: &str| {
        lines
            .iter()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{out}"))
    };
    assert!(row("org").contains("600/600"), "{out}");
    assert!(row("org").contains("10.0/10"), "{out}");
    assert!(row("jobs").contains("0/5"), "{out}");
    // Columns line up: every bucket name starts where the BUCKET header does.
    let at = lines[0].find("BUCKET").unwrap();
    for name in ["org", "jobs"] {
        assert_eq!(row(name).find(name), Some(at), "{out}");
    }
    // --tenant filters; a tenant the token may not see is PERMISSION_DENIED.
    let t = b.ok(Some(CLIENT), &["status", "--tenant", "t"]).await;
    assert_eq!(t, out);
    let other = b.run(Some(CLIENT), &["status", "--tenant", "u"]).await;
    assert_eq!(other.status.code(), Some(1));
    assert!(stderr_line(&other).starts_with("quotactl: PERMISSION_DENIED: "));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_has_every_field() {
    let b = Broker::start().await;
    let buckets = b.buckets().await;
    assert!(buckets.len() >= 2, "{buckets:?}");
    for s in &buckets {
        let obj = s.as_object().expect("an object per bucket");
        for f in FIELDS {
            assert!(obj.contains_key(f), "no field {f} in {s}");
        }
        assert_eq!(s["tenant"], "t");
        assert!(s["waiting"].is_object());
        assert!(s["at_ms"].as_u64().unwrap() > 0);
    }
    let org = b.bucket("org").await;
    assert_eq!(org["configured_rate_per_min"], 600.0);
    assert_eq!(org["burst"], 10);
    assert_eq!(org["scope"], "org");
    assert_eq!(org["paused"], false);
    let jobs = b.bucket("jobs").await;
    assert_eq!(jobs["max_in_flight"], 5);
    b.stop().await;
}
