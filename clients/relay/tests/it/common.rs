//! What the relay's tests and its bench share: a real gcsim and a real
//! broker in process on 127.0.0.1, relays (in process or the binary as a
//! child), an intake client, and waiting on observable conditions.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use gc_relay::{Auth, RelayHandle, Settings, UpstreamSettings};
use gcsim::{Sim, SimConfig, SimHandle};
use serde_json::{json, Value};

/// The org, and the broker's tenant for it.
pub const ORG: &str = "org-a";
/// The Data Action's Basic credentials in the tests.
pub const USER: &str = "architect";
pub const PASSWORD: &str = "flow-secret";
/// The writes family's documented permits per window.
pub const DOCUMENTED: u64 = 300;

/// gcsim at `scale` simulated ms per real ms; the writes family enforces
/// `hidden` per window (below the documented 300) and an unmanaged
/// consumer takes `unmanaged` of it per window.
pub fn sim_config(scale: f64, hidden: u64, unmanaged: u64) -> SimConfig {
    let mut config = SimConfig {
        time_scale: scale,
        ..SimConfig::default()
    };
    let writes = &mut config.orgs[0].families[1];
    writes.hidden_permits = Some(hidden);
    if unmanaged > 0 {
        writes.unmanaged = vec![gcsim::UnmanagedStep {
            at_ms: 0,
            per_window: unmanaged,
        }];
    }
    config
}

pub async fn gcsim(config: SimConfig) -> SimHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Sim::start(config, listener).unwrap()
}

/// A broker in process whose writes bucket holds the documented permits
/// per `window_ms` (real ms: gcsim's window at its scale).
pub struct Broker {
    pub url: String,
    server: quota_broker::Embedded,
}

pub async fn broker(window_ms: u64) -> Broker {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    broker_on(listener, window_ms).await
}

/// [`broker`] on `listener`, started.
pub async fn broker_on(listener: tokio::net::TcpListener, window_ms: u64) -> Broker {
    let config = format!(
        r#"
[server]
state_dir = ""
[[tenants]]
id = "{ORG}"
[[tenants.buckets]]
name = "writes"
routes = ["POST /api/v2/conversations/**"]
permits = {DOCUMENTED}
window_ms = {window_ms}
"#
    );
    let settings = quota_broker::Settings::from_toml(&config).unwrap();
    let server = quota_broker::Embedded::spawn(listener, settings).unwrap();
    assert!(server.started().await, "the broker started");
    Broker {
        url: server.url(),
        server,
    }
}

impl Broker {
    pub async fn stop(self) {
        self.server.stop().await.unwrap();
    }
}

/// Relay settings for `queue` against `sim` through `broker`.
pub fn settings(queue: &str, sim: &SimHandle, broker: &str) -> Settings {
    let upstream = UpstreamSettings {
        region: format!("http://{}", sim.addr()),
        client_id: format!("relay@{ORG}"),
        client_secret: "gcsim-secret".into(),
        broker: broker.into(),
        broker_token: None,
        tenant: ORG.into(),
    };
    let auth = Auth {
        basic: Some((USER.into(), PASSWORD.into())),
        secret: Some("shared-secret".into()),
    };
    Settings::new(queue, upstream, auth)
}

pub async fn relay(settings: Settings) -> RelayHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    gc_relay::start(settings, listener).await.unwrap()
}

/// The binary's `serve` arguments for the same set-up.
pub fn serve_args(queue: &str, sim: &SimHandle, broker: &str) -> Vec<String> {
    [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--queue",
        queue,
        "--region",
        &format!("http://{}", sim.addr()),
        "--client-id",
        &format!("relay@{ORG}"),
        "--client-secret",
        "gcsim-secret",
        "--broker",
        broker,
        "--tenant",
        ORG,
        "--basic-user",
        USER,
        "--basic-password",
        PASSWORD,
        "--log",
        "warn",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A child relay's log lines.
pub type Log = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>;

/// A relay binary running as a child process.
pub struct Child {
    pub url: String,
    child: tokio::process::Child,
}

impl Child {
    pub async fn start(args: &[String]) -> Child {
        Child::spawn(args, std::process::Stdio::inherit()).await
    }

    /// As [`Child::start`], its log (stderr) read line by line.
    pub async fn start_logged(args: &[String]) -> (Child, Log) {
        use tokio::io::AsyncBufReadExt;
        let mut child = Child::spawn(args, std::process::Stdio::piped()).await;
        let stderr = child.child.stderr.take().unwrap();
        (child, tokio::io::BufReader::new(stderr).lines())
    }

    async fn spawn(args: &[String], stderr: std::process::Stdio) -> Child {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gc-relay"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("gc-relay did not say where it listens within 30 s")
            .unwrap()
            .expect("gc-relay exited before listening");
        let url = line
            .strip_prefix("gc-relay listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Child { url, child }
    }

    /// SIGTERM; its exit status once it has stopped (at most 30 s).
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running").to_string();
        let sent = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("gc-relay did not exit within 30 s of SIGTERM")
            .unwrap()
    }

    /// SIGKILL: no shutdown, no flush.
    pub async fn kill9(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }
}

/// The Data Action's side: posts records to a relay.
#[derive(Clone)]
pub struct Flow {
    http: reqwest::Client,
    url: String,
}

impl Flow {
    pub fn new(base: &str) -> Flow {
        Flow {
            http: reqwest::Client::new(),
            url: format!("{base}/records"),
        }
    }

    /// Posts `record` with the Basic credentials: (status, JSON answer).
    pub async fn post(&self, record: &Value) -> Result<(u16, Value), reqwest::Error> {
        let r = self
            .http
            .post(&self.url)
            .basic_auth(USER, Some(PASSWORD))
            .json(record)
            .send()
            .await?;
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }
}

/// A wrap-up write for conversation `c`, keyed by conversation, participant
/// and kind.
pub fn wrapup(c: &str) -> Value {
    json!({
        "idempotencyKey": format!("{c}:p1:wrapup"),
        "method": "POST",
        "path": format!("/api/v2/conversations/calls/{c}/participants/p1/communications/m1/wrapup"),
        "body": {"code": "resolved", "notes": "relay test"},
    })
}

/// gcsim's stored writes: conversation → times written.
pub async fn writes(sim: &SimHandle) -> BTreeMap<String, u64> {
    reqwest::get(format!("http://{}/_sim/orgs/{ORG}/writes", sim.addr()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// gcsim's stats for the org (its served and refused counts).
pub async fn sim_stats(sim: &SimHandle) -> Value {
    let v: Value = reqwest::get(format!("http://{}/_sim/stats", sim.addr()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["orgs"][0].clone()
}

/// Waits until `check` answers true, polling; panics with `what` after
/// `limit`. Polling, because what these tests wait for is state kept by
/// others that says nothing when it changes: rows in the relay's queue
/// database and gcsim's counters.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A temporary directory, removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "gc-relay-{name}-{}-{:x}",
            std::process::id(),
            gc_relay::now_ms()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn sqlite(&self) -> String {
        format!("sqlite:{}", self.0.join("queue.db").display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Posts wrap-ups `k0..k{total}` to `child` from `flows` concurrent flows
/// and SIGKILLs it once `kill_after` are acknowledged; returns the ones
/// acknowledged (a post refused or cut off by the kill is the flow's
/// failure path).
pub async fn burst_and_kill(
    child: Child,
    total: usize,
    flows: usize,
    kill_after: usize,
) -> std::collections::BTreeSet<String> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let flow = Flow::new(&child.url);
    let acked = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let mut posters = tokio::task::JoinSet::new();
    for _ in 0..flows {
        let (flow, acked, next) = (flow.clone(), acked.clone(), next.clone());
        posters.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let c = format!("k{i}");
                if let Ok((202, _)) = flow.post(&wrapup(&c)).await {
                    acked.lock().unwrap().insert(c);
                }
            }
        });
    }
    wait_until(
        "records acknowledged before the kill",
        Duration::from_secs(120),
        || {
            let acked = acked.clone();
            async move { acked.lock().unwrap().len() >= kill_after }
        },
    )
    .await;
    child.kill9().await;
    while posters.join_next().await.is_some() {}
    let acked = acked.lock().unwrap().clone();
    acked
}

/// Posts to the relay at `url` every wrap-up of `k0..k{total}` not in
/// `acked` (the flows trying again), then waits until its queue is empty.
pub async fn repost_and_drain(url: &str, total: usize, acked: &std::collections::BTreeSet<String>) {
    let flow = Flow::new(url);
    for i in 0..total {
        let c = format!("k{i}");
        if !acked.contains(&c) {
            assert_eq!(flow.post(&wrapup(&c)).await.unwrap().0, 202);
        }
    }
    let status = format!("{url}/status");
    wait_until(
        "the queue drained after the restart",
        Duration::from_secs(300),
        || {
            let status = status.clone();
            async move {
                let s: Value = reqwest::get(&status).await.unwrap().json().await.unwrap();
                s["queue"]["records"] == 0
            }
        },
    )
    .await;
}
