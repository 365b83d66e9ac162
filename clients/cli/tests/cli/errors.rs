//! How quotactl fails: a broker's error is one line on stderr, with its
//! request id and never the token, and exits 1; a usage error exits 2, an
//! argument far too long refused without echoing it.

use super::{output, quotactl, stderr_line, Broker, ADMIN, CLIENT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_errors_are_one_line_and_exit_1() {
    let b = Broker::start().await;
    let out = b
        .run(Some(CLIENT), &["pause", "--tenant", "t", "jobs"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    // With the broker's request id, which its log line about the call carries.
    let line = stderr_line(&out);
    let (said, id) = line
        .strip_suffix(')')
        .and_then(|l| l.split_once(" (request id "))
        .unwrap_or_else(|| panic!("no request id: {line}"));
    assert_eq!(
        said,
        "quotactl: PERMISSION_DENIED: token \"ingest\" has role client; this RPC needs an admin token"
    );
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    assert_eq!(b.bucket("jobs").await["paused"], false);

    let out = b.run(None, &["status"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).starts_with("quotactl: UNAUTHENTICATED: "));

    let out = b.run(Some("wrong"), &["status"]).await;
    let line = stderr_line(&out);
    assert!(line.starts_with("quotactl: UNAUTHENTICATED: "), "{line}");
    assert!(!line.contains("wrong"), "never echo the token: {line}");

    let out = b
        .run(Some(ADMIN), &["resume", "--tenant", "t", "nope"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).starts_with("quotactl: NOT_FOUND: "));
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2() {
    for args in [
        &["bucket", "set-limit", "--tenant", "t", "org"][..],
        &[
            "bucket",
            "set-limit",
            "--tenant",
            "t",
            "org",
            "--reset",
            "--permits",
            "5",
        ],
        // No field to set.
        &["class", "set", "--tenant", "t", "x"],
        &[
            "class",
            "set",
            "--tenant",
            "t",
            "x",
            "--order",
            "1",
            "--weight",
            "1",
            "--reserve",
            "2",
        ],
        &["watch", "--count", "0"],
        &["--broker", "ftp://x", "status"],
        &["--broker", "http://127.0.0.1:abc", "status"],
        &["--broker", "127.0.0.1:70000", "status"],
        &["--broker", "http://127.0.0.1:50051/foo", "status"],
        &["frobnicate"],
    ] {
        let out = output(quotactl(args)).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
    // An argument far longer than any name is refused without echoing it.
    let long = "x".repeat(100_000);
    let out = output(quotactl(&["--broker", &long, "status"])).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the value of --broker is 100000 bytes long"),
        "{err}"
    );
    assert!(err.len() < 200, "{} bytes", err.len());
    // A shorter one that clap echoes in its error is clipped.
    let url = format!("ftp://{}", "x".repeat(5_000));
    let out = output(quotactl(&["--broker", &url, "status"])).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("… (5006 bytes)"), "{err}");
    assert!(err.len() < 500, "{} bytes: {err}", err.len());
}
