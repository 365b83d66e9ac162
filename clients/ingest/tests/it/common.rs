//! The test bed: gcsim and the broker on ephemeral ports (the broker
//! restartable on the same port), an upstream for one OAuth client, runs
//! of the library, and what gcsim says it holds and served.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use gc_ingest::{BlockSize, Display, JobOptions, Plan, Sink, Source, SourceKind, QUERY_PATH};
use gc_upstream::{Credentials, Region, Upstream};
use quota_broker_client::{BrokerClient, Call};
use serde_json::Value;

/// gcsim at 100× speed: three days of `{per_day}` conversations; the analytics
/// family enforces 45 of its documented 60 per minute with an unmanaged
/// consumer taking 5; two jobs may run at once.
const GCSIM: &str = r#"
time_scale = 100.0
seed = 11
[[orgs]]
id = "org-a"
day = "2026-11-01"
days = 3
conversations_per_day = {per_day}
[[orgs.families]]
name = "analytics-query"
routes = ["POST /api/v2/analytics/**/query"]
documented_permits = 60
hidden_permits = 45
max_concurrent = 10
unmanaged = [{ at_ms = 0, per_window = 5 }]
[orgs.jobs]
max_running = 2
submits_per_window = 10
{jobs}
"#;

/// The broker's view of the same org, in real time (gcsim's minute is
/// 600 ms): the documented limits, not the hidden one.
const BROKER: &str = r#"
[server]
state_dir = ""
[[tenants]]
id = "org-a"
[[tenants.buckets]]
name = "per-client"
scope = "oauth_client"
routes = ["* /**"]
permits = 300
window_ms = 600
[[tenants.buckets]]
name = "analytics-query"
routes = ["POST /api/v2/analytics/**/query"]
permits = 60
window_ms = 600
burst = 2
max_in_flight = 8
[[tenants.buckets]]
name = "jobs-submit"
routes = ["POST /api/v2/analytics/conversations/details/jobs"]
permits = 10
window_ms = 600
[[tenants.buckets]]
name = "jobs-running"
routes = ["JOB /api/v2/analytics/conversations/details/jobs"]
max_in_flight = 2
lease_ttl_ms = 60000
"#;

/// The first day of gcsim's history.
pub const DAY1: &str = "2026-11-01";
/// The day after its last.
pub const END: &str = "2026-11-04";

pub struct Bed {
    pub sim: gcsim::SimHandle,
    pub broker: Broker,
    pub http: reqwest::Client,
}

pub struct Broker {
    pub addr: SocketAddr,
    server: Option<quota_broker::Embedded>,
}

impl Broker {
    pub async fn start(addr: &str) -> Broker {
        let settings = quota_broker::Settings::from_toml(BROKER).unwrap();
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let server = quota_broker::Embedded::spawn(listener, settings).unwrap();
        assert!(server.started().await, "the broker started");
        Broker {
            addr: server.addr(),
            server: Some(server),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops it (leases in flight end with it; after 10 s it is aborted).
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), server.stop()).await;
        }
    }
}

impl Bed {
    pub async fn start() -> Bed {
        Bed::with_per_day(8000).await
    }

    /// The bed with `per_day` conversations a day instead of 8,000.
    pub async fn with_per_day(per_day: u32) -> Bed {
        Bed::with(per_day, "").await
    }

    /// The bed whose jobs take ten real minutes to be fulfilled.
    pub async fn with_slow_jobs() -> Bed {
        Bed::with(8000, "fulfil_base_ms = 60000000").await
    }

    async fn with(per_day: u32, jobs: &str) -> Bed {
        let config = GCSIM
            .replace("{per_day}", &per_day.to_string())
            .replace("{jobs}", jobs);
        let config = gcsim::SimConfig::from_toml(&config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sim = gcsim::Sim::start(config, listener).unwrap();
        Bed {
            sim,
            broker: Broker::start("127.0.0.1:0").await,
            http: reqwest::Client::new(),
        }
    }

    pub fn region(&self) -> String {
        format!("http://{}", self.sim.addr())
    }

    /// A source reading as OAuth client `client` of org-a, leased from
    /// the broker as class batch.
    pub fn source(&self, kind: SourceKind, client: &str) -> Source {
        self.source_with_secret(kind, client, "gcsim-secret")
    }

    /// Like [`Bed::source`], logging in with `secret`.
    pub fn source_with_secret(&self, kind: SourceKind, client: &str, secret: &str) -> Source {
        let jobs = JobOptions {
            max_running: 2,
            first_poll: Duration::from_millis(100),
            ..JobOptions::default()
        };
        self.source_with(kind, client, secret, jobs)
    }

    /// Like [`Bed::source`], its jobs run as `jobs` says.
    pub fn source_with_jobs(&self, kind: SourceKind, client: &str, jobs: JobOptions) -> Source {
        self.source_with(kind, client, "gcsim-secret", jobs)
    }

    fn source_with(
        &self,
        kind: SourceKind,
        client: &str,
        secret: &str,
        jobs: JobOptions,
    ) -> Source {
        let broker = BrokerClient::connect(&self.broker.url(), None).unwrap();
        let client_id = format!("{client}@org-a");
        let template = Call::new("org-a", "POST", QUERY_PATH)
            .client_id(client)
            .oauth_client(&client_id)
            .class("batch");
        let upstream = Upstream::new(
            Region::new(&self.region()).unwrap(),
            Credentials {
                client_id,
                client_secret: secret.into(),
            },
            broker.clone(),
            template.clone(),
        )
        .unwrap();
        Source::new(kind, upstream, Some((broker, template)), jobs)
    }

    /// The next `n` details-query pages answer one row short.
    pub async fn short_pages(&self, n: u64) {
        self.page_fault("short-pages", n).await;
    }

    /// The next `n` details queries read every page after their first as
    /// if a conversation on it was removed once it was read.
    pub async fn shifted_queries(&self, n: u64) {
        self.page_fault("shifted-queries", n).await;
    }

    /// The first row of each of the next `n` details-query pages lacks its
    /// `conversationStart`.
    pub async fn malformed_pages(&self, n: u64) {
        self.page_fault("malformed-pages", n).await;
    }

    /// The first row of each of the next `n` details-query pages has a NUL
    /// character at the end of its `queueId` and `wrapUpCode`.
    pub async fn nul_fields(&self, n: u64) {
        self.page_fault("nul-fields", n).await;
    }

    /// The next `n` job results pages read with a cursor, with a page
    /// after them, give back the cursor they were read with.
    pub async fn repeating_cursor(&self, n: u64) {
        self.page_fault("repeating-cursor", n).await;
    }

    /// The next `n` job results pages, the last one too, give a cursor
    /// never given before that reads the same page again.
    pub async fn endless_cursor(&self, n: u64) {
        self.page_fault("endless-cursor", n).await;
    }

    /// Jobs submitted from now on see data only up to `until` (Unix ms;
    /// `None`: all of it).
    pub async fn jobs_available_until(&self, until: Option<i64>) {
        let url = format!("{}/_sim/orgs/org-a/jobs-available-until", self.region());
        let body = serde_json::to_string(&until).unwrap();
        let answer = self.http.post(url).body(body).send().await.unwrap();
        assert!(answer.status().is_success(), "{answer:?}");
    }

    async fn page_fault(&self, fault: &str, n: u64) {
        let url = format!("{}/_sim/orgs/org-a/{fault}", self.region());
        let answer = self
            .http
            .post(url)
            .body(n.to_string())
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{answer:?}");
    }

    /// GET `path` of gcsim's control plane, as JSON.
    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let url = format!("{}{path}", self.region());
        let answer = self.http.get(url).send().await.unwrap();
        answer.json().await.unwrap()
    }

    /// Every conversation id gcsim holds, sorted.
    pub async fn conversation_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.get("/_sim/orgs/org-a/conversations").await;
        ids.sort();
        ids
    }

    /// The paths and statuses of the `method` requests under `path` gcsim
    /// answered, in order.
    pub async fn answered(&self, method: &str, path: &str) -> Vec<(String, u64)> {
        let (mut since, mut statuses) = (0, Vec::new());
        loop {
            let page: Value = self.get(&format!("/_sim/log?since={since}")).await;
            let entries = page["entries"].as_array().unwrap();
            statuses.extend(
                entries
                    .iter()
                    .filter(|e| {
                        e["method"] == method
                            && e["path"].as_str().is_some_and(|p| p.starts_with(path))
                    })
                    .filter_map(|e| Some((e["path"].as_str()?.to_owned(), e["status"].as_u64()?))),
            );
            if entries.is_empty() {
                return statuses;
            }
            since = page["next"].as_u64().unwrap();
        }
    }

    /// Slots held now in the broker's bucket `bucket` of org-a.
    pub async fn in_flight(&self, bucket: &str) -> u32 {
        let mut admin =
            quota_broker::pb::quota_admin_client::QuotaAdminClient::connect(self.broker.url())
                .await
                .unwrap();
        let listed = admin
            .list_buckets(quota_broker::pb::ListBucketsRequest {
                tenant: "org-a".into(),
            })
            .await
            .unwrap()
            .into_inner();
        listed
            .buckets
            .iter()
            .filter(|b| b.bucket == bucket)
            .map(|b| b.in_flight)
            .sum()
    }

    /// (requests, 429s with their sim time and reason) gcsim logged for
    /// OAuth client `client`.
    pub async fn served(&self, client: &str) -> (u64, Vec<String>) {
        let (mut since, mut all, mut throttled) = (0, 0, Vec::new());
        loop {
            let page: Value = self.get(&format!("/_sim/log?since={since}")).await;
            let entries = page["entries"].as_array().unwrap();
            for e in entries.iter().filter(|e| e["client"] == client) {
                all += 1;
                if e["status"] == 429 {
                    throttled.push(format!("{} ms {}", e["sim_ms"], e["reason"]));
                }
            }
            if entries.is_empty() {
                return (all, throttled);
            }
            since = page["next"].as_u64().unwrap();
        }
    }
}

/// A plan over `[from, to)` with the wall clock (gcsim's days are long
/// past, so every block is final), no progress output.
pub fn plan(from: &str, to: &str, block: BlockSize) -> Plan {
    let mut plan = Plan::new(
        gc_ingest::parse_time(from).unwrap(),
        gc_ingest::parse_time(to).unwrap(),
        block,
    );
    plan.display = Display::Quiet;
    plan
}

/// A fresh SQLite file path for `name` (removed first if left over).
pub fn sqlite(name: &str) -> PathBuf {
    let dir = testsvc::scratch_dir("gc-ingest").unwrap();
    dir.join(format!("{name}.db"))
}

pub async fn open(path: &std::path::Path) -> Sink {
    Sink::open(path.to_str().unwrap()).await.unwrap()
}

/// Waits (bounded) until `sink` has at least `n` blocks done.
pub async fn until_done(sink: &Sink, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        let done = sink
            .checkpoints()
            .await
            .unwrap()
            .iter()
            .filter(|c| c.status == "done")
            .count();
        if done >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {done} of {n} blocks done after 60 s"
        );
    }
}
