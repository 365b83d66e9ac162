//! Every error code the broker answers, with a message a person can act on.

use crate::harness::{config, req, start};
use quota_broker::pb::{
    ClearLearnedRequest, PauseBucketRequest, ReleaseRequest, RenewRequest, ReportRequest,
    ResumeBucketRequest, SetBucketLimitRequest, WatchRequest,
};
use tonic::Code;

const CFG: &str = r#"
[[tenants.buckets]]
name = "query"
routes = ["POST /api/v2/analytics/**/query"]
permits = 10
window_ms = 60000
burst = 5
max_in_flight = 2
"#;

fn expect(code: Code, result: Result<impl std::fmt::Debug, tonic::Status>, needle: &str) {
    let status = result.expect_err("expected an error");
    assert_eq!(status.code(), code, "{}", status.message());
    assert!(
        status.message().contains(needle),
        "message {:?} should mention {needle:?}",
        status.message()
    );
}

#[tokio::test(start_paused = true)]
async fn acquire_errors() {
    let b = start(&config(CFG)).await;
    let mut c = b.client.clone();
    let q = "/api/v2/analytics/conversations/details/query";

    let mut r = req("POST", q, 0);
    r.tenant.clear();
    expect(Code::InvalidArgument, c.acquire(r).await, "tenant");
    let mut r = req("POST", q, 0);
    r.client_id.clear();
    expect(Code::InvalidArgument, c.acquire(r).await, "client_id");
    expect(
        Code::InvalidArgument,
        c.acquire(req("P0ST", q, 0)).await,
        "method",
    );
    expect(
        Code::InvalidArgument,
        c.acquire(req("POST", "api/v2", 0)).await,
        "path",
    );
    let mut r = req("POST", q, 0);
    r.tenant = "acme".into();
    expect(
        Code::NotFound,
        c.acquire(r).await,
        "tenant \"acme\" is not configured on this broker (configured: t)",
    );
    expect(
        Code::NotFound,
        c.acquire(req("GET", "/api/v2/users", 0)).await,
        "no bucket matches GET /api/v2/users",
    );
    let mut r = req("POST", q, 0);
    r.permits = 5;
    expect(
        Code::FailedPrecondition,
        c.acquire(r).await,
        "bucket \"query\" allows at most 4 (burst less the reserve of higher classes)",
    );
    let mut r = req("POST", q, 0);
    r.permits = 6;
    r.priority_class = "critical".into();
    expect(
        Code::FailedPrecondition,
        c.acquire(r).await,
        "bucket \"query\" allows at most 5 (burst)",
    );
    let mut r = req("POST", q, 0);
    r.priority_class = "urgent".into();
    expect(
        Code::InvalidArgument,
        c.acquire(r).await,
        "\"urgent\" is not a class of tenant \"t\"; use one of: critical, interactive, batch, best_effort",
    );
    // Ids are printed (logs, quotactl, the dashboard): no control
    // characters, which would forge a row or colour a terminal.
    for field in [
        "client_id",
        "oauth_client",
        "priority_class",
        "idempotency_key",
    ] {
        let mut r = req("POST", q, 0);
        let forged = "evil\ndemo    fake-bucket   \x1b[31mRED".to_owned();
        match field {
            "client_id" => r.client_id = forged,
            "oauth_client" => r.oauth_client = forged,
            "priority_class" => r.priority_class = forged,
            _ => r.idempotency_key = forged,
        }
        expect(
            Code::InvalidArgument,
            c.acquire(r).await,
            &format!("{field}: it holds a control character"),
        );
    }
    let mut r = req("POST", q, 0);
    r.permits = 3;
    // burst 5 allows 3, but only 2 slots exist.
    expect(
        Code::FailedPrecondition,
        c.acquire(r).await,
        "at most 2 (max_in_flight)",
    );
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn lease_report_and_watch_errors() {
    let b = start(&config(CFG)).await;
    let mut c = b.client.clone();
    // Naming nothing it releases nothing (a fallback's probe), no error.
    let nothing = c.release(ReleaseRequest::default()).await.unwrap();
    assert!(!nothing.into_inner().released);
    expect(
        Code::InvalidArgument,
        c.release(ReleaseRequest {
            lease_id: "not-a-lease".into(),
            ..Default::default()
        })
        .await,
        "not a lease id",
    );
    expect(
        Code::NotFound,
        c.renew(RenewRequest {
            lease_id: "0-99-00000001".into(),
            extend_ms: 0,
            ..Default::default()
        })
        .await,
        "acquire a new lease",
    );
    expect(
        Code::InvalidArgument,
        c.renew(RenewRequest {
            lease_id: "0-99-00000001".into(),
            extend_ms: 86_400_000,
            ..Default::default()
        })
        .await,
        "max_lease_ttl_ms",
    );
    let report = ReportRequest {
        tenant: "t".into(),
        method: "POST".into(),
        path: "/api/v2/analytics/x/query".into(),
        http_status: 42,
        ..Default::default()
    };
    expect(
        Code::InvalidArgument,
        c.report(report.clone()).await,
        "http_status",
    );
    expect(
        Code::NotFound,
        c.report(ReportRequest {
            tenant: "nope".into(),
            http_status: 200,
            ..report
        })
        .await,
        "tenant \"nope\"",
    );
    expect(
        Code::NotFound,
        c.watch(WatchRequest {
            tenant: "nope".into(),
        })
        .await
        .map(|_| ()),
        "tenant \"nope\"",
    );
    expect(
        Code::NotFound,
        b.admin
            .clone()
            .pause_bucket(PauseBucketRequest {
                tenant: "t".into(),
                bucket: "nope".into(),
                reason: String::new(),
            })
            .await,
        "tenant \"t\" has no bucket \"nope\" (buckets: query)",
    );
    // A bucket not named at all is a request to fix, not a bucket missing.
    let admin = || b.admin.clone();
    let pause = |reason: &str| PauseBucketRequest {
        tenant: "t".into(),
        bucket: String::new(),
        reason: reason.into(),
    };
    let missing = "bucket: required";
    expect(
        Code::InvalidArgument,
        admin().pause_bucket(pause("")).await,
        missing,
    );
    expect(
        Code::InvalidArgument,
        admin()
            .resume_bucket(ResumeBucketRequest {
                tenant: "t".into(),
                bucket: String::new(),
            })
            .await,
        missing,
    );
    expect(
        Code::InvalidArgument,
        admin()
            .set_bucket_limit(SetBucketLimitRequest {
                tenant: "t".into(),
                permits: 5,
                ..Default::default()
            })
            .await,
        missing,
    );
    expect(
        Code::InvalidArgument,
        admin()
            .clear_learned(ClearLearnedRequest {
                tenant: "t".into(),
                ..Default::default()
            })
            .await,
        missing,
    );
    // A pause reason is repeated in every refusal and log line: one line.
    let mut forged = pause("maintenance\n2026-12-06T00:00:00Z INFO all clear");
    forged.bucket = "query".into();
    expect(
        Code::InvalidArgument,
        admin().pause_bucket(forged).await,
        "reason: it holds a control character",
    );
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn report_counts_429s_per_bucket() {
    let b = start(&config(CFG)).await;
    let mut c = b.client.clone();
    let report = |status| ReportRequest {
        tenant: "t".into(),
        method: "POST".into(),
        path: "/api/v2/analytics/conversations/details/query".into(),
        http_status: status,
        ..Default::default()
    };
    for status in [200, 429, 429, 503] {
        let r = c.report(report(status)).await.unwrap().into_inner();
        assert_eq!(r.buckets, ["query"]);
    }
    let s = b.bucket("query").await;
    assert_eq!((s.reports_total, s.throttled_total), (4, 2));
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn oversized_requests_are_refused() {
    let b = start(&config(CFG)).await;
    let report = ReportRequest {
        tenant: "t".into(),
        method: "POST".into(),
        path: "/api/v2/analytics/x/query".into(),
        http_status: 200,
        headers: [("x-huge".to_owned(), "a".repeat(100 * 1024))].into(),
        ..Default::default()
    };
    let over_the_limit = |status: tonic::Status| {
        assert_eq!(status.code(), Code::OutOfRange, "{}", status.message());
        assert!(
            status.message().contains("limit is: 65536"),
            "{}",
            status.message()
        );
    };
    over_the_limit(b.client.clone().report(report).await.unwrap_err());
    // Acquire has its own framing (src/grpc/fast.rs), with the same limit.
    let acquire = req("GET", &format!("/api/v2/{}", "a".repeat(100 * 1024)), 0);
    over_the_limit(b.client.clone().acquire(acquire).await.unwrap_err());
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn errors_never_echo_a_long_value_back() {
    let b = start(&config(CFG)).await;
    let mut c = b.client.clone();
    let long = "x".repeat(60_000);
    let short = |status: tonic::Status, code: Code| {
        let start: String = status.message().chars().take(200).collect();
        assert_eq!(status.code(), code, "{start}");
        assert!(
            status.message().len() <= 1024,
            "{} bytes of message",
            status.message().len()
        );
    };
    let lease = c
        .release(ReleaseRequest {
            lease_id: long.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    short(lease, Code::InvalidArgument);
    let path = c
        .acquire(req("GET", &format!("/{long}"), 0))
        .await
        .unwrap_err();
    short(path, Code::InvalidArgument);
    let mut r = req("GET", "/api/v2/analytics/x/query", 0);
    r.tenant = "y".repeat(200);
    r.priority_class = "z".repeat(250);
    let class = c.acquire(r).await.unwrap_err();
    short(class, Code::NotFound);
    let pause = b
        .admin
        .clone()
        .pause_bucket(PauseBucketRequest {
            tenant: "t".into(),
            bucket: long.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    short(pause, Code::InvalidArgument);
    b.stop().await;
}

/// Ids that would print as something else (a right-to-left override, an
/// isolate, a zero-width space) are refused like control characters: by
/// field and code point, the value never echoed.
#[tokio::test(start_paused = true)]
async fn ids_with_invisible_format_characters_are_refused() {
    let b = start(&config(CFG)).await;
    let mut c = b.client.clone();
    let q = "/api/v2/analytics/conversations/details/query";
    for (field, hidden, code) in [
        ("oauth_client", "\u{202E}", "U+202E"),
        ("client_id", "\u{2066}", "U+2066"),
        ("priority_class", "\u{200B}", "U+200B"),
        ("idempotency_key", "\u{FEFF}", "U+FEFF"),
    ] {
        let spoofed = format!("ops-team{hidden}tneilc-live");
        let mut r = req("POST", q, 0);
        match field {
            "oauth_client" => r.oauth_client = spoofed.clone(),
            "client_id" => r.client_id = spoofed.clone(),
            "priority_class" => r.priority_class = spoofed.clone(),
            _ => r.idempotency_key = spoofed.clone(),
        }
        let status = c.acquire(r).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
        let message = status.message();
        assert!(
            message.starts_with(&format!("{field}: it holds an invisible format character")),
            "{message}"
        );
        assert!(message.contains(code), "{message}");
        assert!(
            !message.contains(hidden) && !message.contains("tneilc"),
            "{message}"
        );
    }
    // The admin RPCs' ids and a pause's reason alike.
    expect(
        Code::InvalidArgument,
        b.admin
            .clone()
            .clear_learned(ClearLearnedRequest {
                tenant: "t".into(),
                bucket: "query".into(),
                oauth_client: "a\u{202E}b".into(),
            })
            .await,
        "oauth_client: it holds an invisible format character (U+202E",
    );
    expect(
        Code::InvalidArgument,
        b.admin
            .clone()
            .pause_bucket(PauseBucketRequest {
                tenant: "t".into(),
                bucket: "query".into(),
                reason: "maintenance \u{2067}by ops".into(),
            })
            .await,
        "reason: it holds an invisible format character (U+2067",
    );
    // Other scripts and emoji are ids like any other.
    let mut r = req("POST", q, 0);
    r.oauth_client = "клиент-客户-👍".into();
    assert!(c.acquire(r).await.unwrap().into_inner().granted);
    b.stop().await;
}

/// An operator's limits are held to the config's bounds: no slot limit
/// of four billion, no burst or window past what a config may give.
#[tokio::test(start_paused = true)]
async fn set_bucket_limit_is_bounded_as_the_config_is() {
    let b = start(&config(CFG)).await;
    let limit = |change: SetBucketLimitRequest| {
        let mut admin = b.admin.clone();
        async move {
            admin
                .set_bucket_limit(SetBucketLimitRequest {
                    tenant: "t".into(),
                    bucket: "query".into(),
                    ..change
                })
                .await
        }
    };
    expect(
        Code::InvalidArgument,
        limit(SetBucketLimitRequest {
            max_in_flight: u32::MAX,
            ..Default::default()
        })
        .await,
        "max_in_flight: 4294967295 must be between 1 and 1000000",
    );
    expect(
        Code::InvalidArgument,
        limit(SetBucketLimitRequest {
            burst: u32::MAX,
            ..Default::default()
        })
        .await,
        "burst 4294967295 must be between 1 and 1000000",
    );
    // A burst that follows the permits is held to the burst's bound.
    let mut admin = b.admin.clone();
    admin
        .set_bucket_limit(SetBucketLimitRequest {
            tenant: "t".into(),
            bucket: "query".into(),
            burst: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    expect(
        Code::InvalidArgument,
        limit(SetBucketLimitRequest {
            permits: u32::MAX,
            ..Default::default()
        })
        .await,
        "burst not given, so it would be permits (4294967295), above the most a burst may be \
         (1000000)",
    );
    expect(
        Code::InvalidArgument,
        limit(SetBucketLimitRequest {
            window_ms: u64::MAX,
            ..Default::default()
        })
        .await,
        "window_ms 18446744073709551615 must be between 1 and 86400000",
    );
    // Nothing of a refused change applied.
    let s = b.bucket("query").await;
    assert_eq!((s.max_in_flight, s.burst), (2, 10));
    assert_eq!(s.configured_rate_per_min, 10.0);
    // The most is allowed.
    let set = limit(SetBucketLimitRequest {
        max_in_flight: 1_000_000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(set.status.unwrap().max_in_flight, 1_000_000);
    b.stop().await;
}

/// SIGHUP reloads nothing, but checks the config file the broker started
/// with: a file edited into one a restart would refuse is said at once,
/// with its problems, while the broker serves on; a fixed one is said to
/// be valid.
#[cfg(unix)]
#[tokio::test]
async fn sighup_checks_the_config_file_and_serves_on() {
    use crate::child::{temp_config, Broker};
    let good = "[server]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"\"\nstate_dir = \"\"\n\
                [[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\n\
                routes = [\"* /**\"]\nmax_in_flight = 2\n";
    let path = temp_config("sighup-check", good);
    let broker = Broker::start(&path).await;
    // Broken two ways, one of them a hidden character in a token's name.
    std::fs::write(
        &path,
        format!(
            "{good}[scheduling]\nmax_waiters_per_bucket = 4294967295\n[[auth.tokens]]\n\
             name = \"ops\\u202Eevil\"\nsha256 = \"{}\"\nrole = \"admin\"\ntenants = [\"*\"]\n",
            quota_broker::hash_token("a-token-of-at-least-thirty-two-characters")
        ),
    )
    .unwrap();
    broker.signal("-HUP");
    broker
        .until_logged("the config file is not valid: a restart would fail")
        .await;
    let log = broker.logged();
    assert!(log.contains("SIGHUP ignored"), "{log}");
    assert!(log.contains("problems=2"), "{log}");
    assert!(
        log.contains("scheduling.max_waiters_per_bucket 4294967295 must be between 1 and 1000000"),
        "{log}"
    );
    assert!(log.contains("U+202E"), "{log}");
    assert!(!log.contains('\u{202E}'), "{log}");
    // It serves on, on the config it started with.
    let mut client =
        quota_broker::pb::quota_broker_client::QuotaBrokerClient::connect(broker.url())
            .await
            .unwrap();
    let acquire = quota_broker::pb::AcquireRequest {
        tenant: "t".into(),
        client_id: "it".into(),
        method: "GET".into(),
        path: "/x".into(),
        ..Default::default()
    };
    assert!(client.acquire(acquire).await.unwrap().into_inner().granted);
    // Fixed: said to be valid.
    let offset = broker.logged().len();
    std::fs::write(&path, good).unwrap();
    broker.signal("-HUP");
    broker
        .until_logged_after(offset, "the config file is valid now: restart to apply it")
        .await;
    let (status, log) = broker.terminate().await;
    let _ = std::fs::remove_file(&path);
    assert!(status.success(), "{status:?}\n{log}");
}

/// `hash-token` hashes a short token, but says on stderr that it is
/// guessable: tokens are kept as unsalted SHA-256.
#[test]
fn hash_token_warns_of_a_short_token() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let hash = |token: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_quota-broker"))
            .arg("hash-token")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(token.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
        (out.status.code(), text(out.stdout), text(out.stderr))
    };
    let (code, out, err) = hash("a");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, format!("{}\n", quota_broker::hash_token("a")));
    assert!(
        err.contains("warning: the token is 1 characters")
            && err.contains("use at least 32 random characters, e.g. `openssl rand -hex 32`"),
        "{err}"
    );
    let strong = "3f9a1c".repeat(6);
    assert_eq!(
        hash(&strong),
        (
            Some(0),
            format!("{}\n", quota_broker::hash_token(&strong)),
            String::new()
        )
    );
}
