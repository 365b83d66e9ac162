//! End-to-end tests of the `quotactl` binary against a real broker started
//! in-process on 127.0.0.1:0. Every process wait is bounded in time.

// The crate root: its modules are found under tests/cli/ by path.
#[path = "cli/admin.rs"]
mod admin;
#[path = "cli/connecting.rs"]
mod connecting;
#[path = "cli/environment.rs"]
mod environment;
#[path = "cli/errors.rs"]
mod errors;
#[path = "cli/status.rs"]
mod status;
#[path = "cli/watch.rs"]
mod watch;

use quota_broker::hash_token;
use quota_broker::Settings;
use serde_json::Value;
use std::net::SocketAddr;
use std::process::{Output, Stdio};
use std::time::Duration;
use tokio::process::Command;
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
