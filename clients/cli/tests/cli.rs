//! End-to-end tests of the `quotactl` binary against a real broker started
//! in-process on 127.0.0.1:0. Every process wait is bounded in time.

use quota_broker::hash_token;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{AcquireRequest, ReportRequest};
use quota_broker::Settings;
use serde_json::Value;
use std::net::SocketAddr;
use std::process::{Output, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const ADMIN: &str = "secret-ops";
const CLIENT: &str = "secret-ingest";
/// Bound on any one quotactl run.
const LIMIT: Duration = Duration::from_secs(30);

/// Tenant "t": an org-wide rate bucket, a concurrency-only bucket and a
/// per-OAuth-client bucket; an admin token "ops" and a client token "ingest".
fn config() -> String {
    format!(
        r#"[server]
shutdown_grace_ms = 2000
state_dir = ""

[[auth.tokens]]
name = "ops"
sha256 = "{admin}"
role = "admin"
tenants = ["*"]

[[auth.tokens]]
name = "ingest"
sha256 = "{client}"
role = "client"
tenants = ["t"]

[[tenants]]
id = "t"

[[tenants.buckets]]
name = "org"
routes = ["* /**"]
permits = 600
window_ms = 60000
burst = 10

[[tenants.buckets]]
name = "jobs"
routes = ["POST /api/v2/jobs/**"]
max_in_flight = 5

[[tenants.buckets]]
name = "per-client"
scope = "oauth_client"
routes = ["* /**"]
permits = 300
window_ms = 60000
"#,
        admin = hash_token(ADMIN),
        client = hash_token(CLIENT),
    )
}

struct Broker {
    addr: SocketAddr,
    server: quota_broker::Embedded,
}

impl Broker {
    async fn start() -> Broker {
        let settings = Settings::from_toml(&config()).expect("test config is valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = quota_broker::Embedded::spawn(listener, settings).unwrap();
        // Its port answers at once, "starting" until the broker has started.
        assert!(server.started().await, "the broker started");
        Broker {
            addr: server.addr(),
            server,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A quotactl command aimed at this broker with `token`.
    fn cmd(&self, token: Option<&str>, args: &[&str]) -> Command {
        let mut c = quotactl(args);
        c.arg("--broker").arg(self.url());
        if let Some(t) = token {
            c.arg("--token").arg(t);
        }
        c
    }

    async fn run(&self, token: Option<&str>, args: &[&str]) -> Output {
        output(self.cmd(token, args)).await
    }

    /// Runs quotactl, asserts success, returns its stdout.
    async fn ok(&self, token: Option<&str>, args: &[&str]) -> String {
        let out = self.run(token, args).await;
        assert!(
            out.status.success(),
            "quotactl {args:?} failed ({:?}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `status --json`, parsed.
    async fn buckets(&self) -> Vec<Value> {
        let out = self.ok(Some(ADMIN), &["status", "--json"]).await;
        match serde_json::from_str(&out) {
            Ok(Value::Array(v)) => v,
            other => panic!("not a JSON array: {other:?}\n{out}"),
        }
    }

    async fn bucket(&self, name: &str) -> Value {
        self.buckets()
            .await
            .into_iter()
            .find(|b| b["bucket"] == name)
            .unwrap_or_else(|| panic!("no bucket {name}"))
    }

    async fn stop(self) {
        timeout(LIMIT, self.server.stop())
            .await
            .expect("broker stops in time")
            .unwrap();
    }
}

/// The quotactl binary with `args`, isolated from the caller's environment.
fn quotactl(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_quotactl"));
    c.args(args)
        .env_remove("QUOTA_BROKER_URL")
        .env_remove("QUOTA_BROKER_TOKEN")
        .env_remove("QUOTA_BROKER_TENANT")
        .env_remove("QUOTA_BROKER_CA_CERT")
        .env_remove("QUOTA_BROKER_CLIENT_CERT")
        .env_remove("QUOTA_BROKER_CLIENT_KEY")
        .env_remove("QUOTA_BROKER_TLS_SERVER_NAME")
        .env_remove("QUOTA_BROKER_TIMEOUT")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Runs a command to completion within [`LIMIT`]; on timeout the child is
/// killed (kill_on_drop) and the test fails.
async fn output(mut c: Command) -> Output {
    timeout(LIMIT, c.output())
        .await
        .expect("quotactl finished in time")
        .expect("quotactl started")
}

fn stderr_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        err.lines().count(),
        1,
        "exactly one line on stderr: {err:?}"
    );
    assert!(err.ends_with('\n'));
    err.trim_end().to_owned()
}

const FIELDS: [&str; 21] = [
    "tenant",
    "bucket",
    "configured_rate_per_min",
    "effective_rate_per_min",
    "tokens_available",
    "in_flight",
    "max_in_flight",
    "frozen_until_ms",
    "waiting",
    "granted_total",
    "throttled_total",
    "at_ms",
    "oauth_client",
    "scope",
    "burst",
    "reports_total",
    "paused",
    "learned_limit_per_min",
    "throttle_ratio",
    "cooldown_until_ms",
    "upstream_remaining",
];

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

/// The broker's HTTP port given for its gRPC port: hyper reads the HTTP/1
/// answer as a connection closed, which alone would read as a TLS mix-up;
/// quotactl asks the server what it speaks and says it is not the gRPC port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_http_port_given_for_its_grpc_port_is_named_as_such() {
    let settings = Settings::from_toml(&config()).expect("test config is valid");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let listeners = quota_broker::Listeners {
            grpc,
            http: Some(http),
        };
        quota_broker::serve(listeners, &settings, async {
            let _ = stopped.await;
        })
        .await
    });
    let mut c = quotactl(&["status"]);
    c.arg("--broker")
        .arg(format!("http://{http_addr}"))
        .arg("--token")
        .arg(ADMIN);
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(1));
    let line = stderr_line(&out);
    assert!(
        line.starts_with(&format!(
            "quotactl: http://{http_addr} is not a quota-broker's gRPC port: it answers in HTTP/1"
        )) && line.contains("505")
            && line.contains("server.listen")
            && !line.contains("TLS"),
        "{line}"
    );
    let _ = stop.send(());
    timeout(LIMIT, server)
        .await
        .expect("broker stops in time")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_is_one_line_and_exit_1() {
    // A port that was just free: nothing listens there any more.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut c = quotactl(&["status"]);
    c.arg("--broker").arg(format!("http://{addr}"));
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        stderr_line(&out),
        format!("quotactl: cannot reach the broker at http://{addr}: connection refused")
    );
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

/// A broker URL with a path: refused (gRPC would drop it), saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_url_with_a_path_is_refused() {
    let out = output(quotactl(&["--broker", "http://127.0.0.1:1/foo", "status"])).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a gRPC broker URL has no path or query (got /foo)"),
        "{err}"
    );
}

/// A broker URL without a port is dialled on the scheme's (80 for http://
/// or a bare host): the error says so, and which port a broker has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_url_without_a_port_says_the_port_used() {
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", 80)).is_err(),
        "this test needs nothing listening on 127.0.0.1:80, and something does: stop it"
    );
    for given in ["127.0.0.1", "http://127.0.0.1"] {
        let out = output(quotactl(&["--broker", given, "status"])).await;
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            stderr_line(&out),
            "quotactl: cannot reach the broker at http://127.0.0.1: connection refused (the URL \
             gives no port, so port 80 was used; a broker's gRPC port is 50051 unless its \
             server.listen says another: give it, like http://127.0.0.1:50051)",
            "{given}"
        );
    }
}

/// An environment variable set but empty (or blanks) is unset, for every
/// one quotactl reads: `QUOTA_BROKER_URL=` is the default broker, as
/// `QUOTA_BROKER_TOKEN=` is no token and `QUOTA_BROKER_TENANT=` no tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_environment_variables_are_unset() {
    let b = Broker::start().await;
    let blank = |c: &mut Command| {
        for var in [
            "QUOTA_BROKER_TOKEN",
            "QUOTA_BROKER_TENANT",
            "QUOTA_BROKER_TIMEOUT",
            "QUOTA_BROKER_CA_CERT",
            "QUOTA_BROKER_CLIENT_CERT",
            "QUOTA_BROKER_CLIENT_KEY",
            "QUOTA_BROKER_TLS_SERVER_NAME",
        ] {
            c.env(var, "");
        }
        c.env("QUOTA_BROKER_URL", " ");
    };
    // Every tenant (no tenant), no TLS options, the default timeout.
    let mut c = b.cmd(Some(ADMIN), &["status", "--json"]);
    blank(&mut c);
    let out = output(c).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The default broker (none is asked: the tenant is missing first).
    let mut c = quotactl(&["class", "list"]);
    blank(&mut c);
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr_line(&out),
        "quotactl: class list needs a tenant: give --tenant <T> or set QUOTA_BROKER_TENANT"
    );
    b.stop().await;
}

/// A bad value from an environment variable is said with its name (clap
/// names only the flag it stands for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_environment_value_is_named_by_its_variable() {
    for args in [&["status"][..], &["--timeout", "5", "status"]] {
        let mut c = quotactl(args);
        c.env("QUOTA_BROKER_TIMEOUT", "abc");
        let out = output(c).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(
            stderr_line(&out),
            "quotactl: invalid value 'abc' for --timeout <SECS> from the environment variable \
             QUOTA_BROKER_TIMEOUT: invalid digit found in string; fix or unset \
             QUOTA_BROKER_TIMEOUT",
            "{args:?}"
        );
    }
    let mut c = quotactl(&["status"]);
    c.env("QUOTA_BROKER_URL", format!("ftp://{}", "x".repeat(5_000)));
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_line(&out);
    assert!(
        err.contains(
            "… (5006 bytes)' for --broker <URL[,URL...]> from the environment variable \
                      QUOTA_BROKER_URL: expected an http:// or https:// URL"
        ) && err.len() < 400,
        "{err}"
    );
    // Given on the command line: clap's own words, naming the flag.
    let mut c = quotactl(&["--timeout", "abc", "status"]);
    c.env("QUOTA_BROKER_TIMEOUT", "7");
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'abc' for '--timeout <SECS>'")
            && !err.contains("QUOTA_BROKER_TIMEOUT"),
        "{err}"
    );
}

/// Every command for one tenant, with its other required arguments.
const ONE_TENANT: [&[&str]; 8] = [
    &["class", "list"],
    &[
        "class",
        "set",
        "x",
        "--order",
        "1",
        "--weight",
        "1",
        "--reserve",
        "0",
        "--default-max-wait-ms",
        "0",
    ],
    // Reads the class first (ListPriorityClasses).
    &["class", "set", "x", "--weight", "2"],
    &["class", "reset", "x"],
    &["bucket", "set-limit", "org", "--burst", "4"],
    &["pause", "org"],
    &["resume", "org"],
    &["clear", "org"],
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_is_optional_in_usage_and_needed_by_flag_or_environment() {
    for command in ONE_TENANT {
        // The usage does not demand the flag, and the help still shows it
        // with its environment variable.
        let out = output(quotactl(&[command[0], command[1], "--help"])).await;
        assert!(out.status.success(), "{command:?}");
        let help = String::from_utf8(out.stdout).unwrap();
        let usage = help.lines().find(|l| l.starts_with("Usage: ")).unwrap();
        assert!(!usage.contains("--tenant"), "{command:?}: {usage}");
        assert!(
            help.contains("--tenant <T>") && help.contains("QUOTA_BROKER_TENANT"),
            "{command:?}: {help}"
        );
        // Neither the flag nor the variable: a usage error naming both,
        // before any broker is asked (none listens at port 1).
        let mut args = vec!["--broker", "127.0.0.1:1"];
        args.extend_from_slice(command);
        let out = output(quotactl(&args)).await;
        assert_eq!(out.status.code(), Some(2), "{command:?}");
        let err = stderr_line(&out);
        assert!(err.starts_with("quotactl: "), "{err}");
        assert!(
            err.contains("--tenant") && err.contains("QUOTA_BROKER_TENANT"),
            "{command:?}: {err}"
        );
    }
    // The commands over every tenant take none.
    for command in ["status", "watch"] {
        let out = output(quotactl(&[command, "--help"])).await;
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(help.contains(&format!("Usage: quotactl {command} [OPTIONS]\n")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_alone_gives_the_tenant() {
    let b = Broker::start().await;
    let run = |args: &[&str]| {
        let mut c = b.cmd(Some(ADMIN), args);
        c.env("QUOTA_BROKER_TENANT", "t");
        output(c)
    };
    for command in ONE_TENANT {
        let out = run(command).await;
        assert!(
            out.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(&["class", "list", "--json"]).await;
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["tenant"], "t");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_json_count_prints_the_snapshot_and_exits() {
    let b = Broker::start().await;
    let out = b
        .ok(Some(CLIENT), &["watch", "--json", "--count", "2"])
        .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    for l in lines {
        let v: Value = serde_json::from_str(l).unwrap();
        for f in FIELDS {
            assert!(v.get(f).is_some(), "no {f} in {l}");
        }
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_table_merges_the_snapshot() {
    let b = Broker::start().await;
    let n = b.buckets().await.len();
    let count = n.to_string();
    let out = b
        .ok(Some(CLIENT), &["watch", "--tenant", "t", "--count", &count])
        .await;
    // Not a terminal: no escape codes, just the table(s).
    assert!(!out.contains('\x1b'), "{out:?}");
    let last = out
        .split("\n\n")
        .filter(|t| !t.trim().is_empty())
        .last()
        .unwrap();
    let lines: Vec<&str> = last.lines().collect();
    assert!(lines[0].starts_with("TENANT"), "{out}");
    assert_eq!(lines.len(), n + 1, "one row per bucket, merged: {out}");
    assert!(last.contains("org") && last.contains("jobs"), "{out}");
    b.stop().await;
}

/// A Watch does not end by itself: when its broker stops, quotactl says
/// so and exits 1, so a script can tell it from `--count` reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_says_so_and_exits_1_when_the_broker_stops() {
    // Of one tenant too: with one broker given there is nowhere to follow
    // it to.
    for args in [
        &["watch", "--json"][..],
        &["watch", "--tenant", "t", "--json"],
    ] {
        watch_ends_when_the_broker_stops(args).await;
    }
}

async fn watch_ends_when_the_broker_stops(args: &[&str]) {
    let b = Broker::start().await;
    let mut child = b
        .cmd(Some(CLIENT), args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = timeout(LIMIT, lines.next_line())
        .await
        .expect("a snapshot line in time")
        .unwrap()
        .expect("a line");
    serde_json::from_str::<Value>(&first).unwrap();
    // Shutting the broker down ends the Watch stream.
    b.stop().await;
    while let Ok(Some(_)) = timeout(LIMIT, lines.next_line())
        .await
        .expect("stdout closes in time")
    {}
    let status = timeout(LIMIT, child.wait())
        .await
        .expect("quotactl exits in time")
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert_eq!(
        (status.code(), err.trim()),
        (
            Some(1),
            "quotactl: UNAVAILABLE: the broker is shutting down; retry once it is back"
        ),
        "{args:?}"
    );
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

/// A gRPC server for both broker services that takes every call and never
/// answers it (a broker whose connections and pings are served while its
/// calls are stuck).
#[derive(Clone)]
struct Silent<const ADMIN: bool>;

impl<const ADMIN: bool> tonic::server::NamedService for Silent<ADMIN> {
    const NAME: &'static str = if ADMIN {
        "quota.v1.QuotaAdmin"
    } else {
        "quota.v1.QuotaBroker"
    };
}

impl<const ADMIN: bool> tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>>
    for Silent<ADMIN>
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Pending<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        std::future::pending()
    }
}

/// Starts a [`Silent`] server; its URL and the task serving it.
async fn silent() -> (String, JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(Silent::<true>)
            .add_service(Silent::<false>)
            .serve_with_incoming(incoming)
            .await;
    });
    (url, server)
}

#[tokio::test]
async fn a_broker_that_never_answers_is_given_up_after_the_timeout_and_the_next_tried() {
    let b = Broker::start().await;
    let (stuck, server) = silent().await;
    let brokers = format!("{stuck},{}", b.url());
    let started = tokio::time::Instant::now();
    // Both brokers, the stuck one first, 2 s for each call.
    let run = |args: &[&str]| {
        let mut c = quotactl(&["--broker", &brokers, "--token", ADMIN, "--timeout", "2"]);
        c.args(args);
        output(c)
    };
    let out = run(&[
        "pause",
        "--tenant",
        "t",
        "org",
        "--reason",
        "stuck broker",
        "--json",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let paused: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(paused["paused"], true, "{paused}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the stuck broker was given its 2 s"
    );
    // A command over every broker given says which one did not answer, and
    // shows what the other said.
    let out = run(&["status", "--json"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("quotactl: {stuck}: no answer within 2s\n")),
        "{err}"
    );
    let buckets: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let org = buckets
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["bucket"] == "org")
        .expect("bucket org listed");
    assert_eq!(org["paused"], true, "{org}");
    // Nonsense timeouts are refused before anything is sent.
    for bad in ["0", "3601", "soon"] {
        let out = b.run(Some(ADMIN), &["--timeout", bad, "status"]).await;
        assert_eq!(out.status.code(), Some(2), "--timeout {bad}");
    }
    server.abort();
    b.stop().await;
}
