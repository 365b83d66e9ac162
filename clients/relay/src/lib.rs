//! gc-relay: the call-flow relay. A Genesys Architect flow can only call
//! HTTP (a Web Services Data Action, 1–60 s timeout), so the relay takes
//! each upstream write the flow wants made as a record, stores it durably
//! and answers `202` at once; it then drains the records to the Genesys
//! Cloud API at the pace the quota broker grants, so the flow never waits
//! on the upstream's rate limits and no record is dropped.
//!
//! # Layout
//!
//! - `record`: the intake's JSON record and its checks.
//! - `queue`: the durable queue (SQLite or PostgreSQL): records, claims,
//!   outcomes, dead letters, and the group commit every 202 waits for.
//! - `server`: the HTTP side (intake with its credentials, status,
//!   metrics).
//! - `drain`: claims due records and sends them upstream through
//!   `gc-upstream` (leased as class `interactive`, reported back).
//! - `metrics`: the Prometheus metrics.
//! - `error`: the relay's errors and their HTTP answers.
//!
//! A record's way: Data Action → `POST /records` → checked → queued in the
//! writer's next transaction → committed (fsynced) → `202 {recordId}` →
//! claimed by the drain when due and first of its order key → leased,
//! sent, reported → done, back to pending after the broker's or the
//! upstream's wait, or a dead letter.

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod drain;
mod error;
mod metrics;
mod queue;
mod record;
mod server;

pub use drain::DrainSettings;
pub use error::RelayError;
pub use queue::{
    now_ms, shown, sqlite_path, Access, DeadLetter, Depth, Limits, Outcome, Queue, Stored,
};
pub use record::{Intake, Invalid, NewRecord, Record, KEY_MAX, PATH_MAX};
pub use server::{Auth, SECRET_HEADER};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gc_upstream::{Credentials, Region, Upstream};
use quota_broker_client::{BrokerClient, Call};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

/// How long the HTTP side waits for requests in flight at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Where the relay sends records, and as whom.
#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    /// Region host (`mypurecloud.com`) or base URL (`http://127.0.0.1:PORT`).
    pub region: String,
    /// OAuth client-credentials client id.
    pub client_id: String,
    /// Its secret.
    pub client_secret: String,
    /// The broker's URL.
    pub broker: String,
    /// The broker's bearer token, if it wants one.
    pub broker_token: Option<String>,
    /// The broker tenant (the org).
    pub tenant: String,
}

/// Everything the relay runs on.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `sqlite:PATH` (or a path) or `postgres://...`.
    pub queue: String,
    /// How full the queue may get.
    pub limits: Limits,
    /// Largest record, bytes.
    pub max_record_bytes: usize,
    /// `Retry-After` of a "queue full" 503, seconds.
    pub full_retry_after_s: u64,
    /// Who may post records.
    pub auth: Auth,
    /// The upstream and the broker.
    pub upstream: UpstreamSettings,
    /// The drain.
    pub drain: DrainSettings,
    /// This relay's name (the broker's client id, the owner of its claims).
    pub name: String,
}

impl Settings {
    /// Settings with the defaults, for `queue`, `upstream` and `auth`.
    pub fn new(queue: &str, upstream: UpstreamSettings, auth: Auth) -> Settings {
        Settings {
            queue: queue.to_owned(),
            limits: Limits::default(),
            max_record_bytes: 64 * 1024,
            full_retry_after_s: 5,
            auth,
            upstream,
            drain: DrainSettings::default(),
            name: "gc-relay".into(),
        }
    }
}

/// A running relay.
pub struct RelayHandle {
    addr: SocketAddr,
    queue: Queue,
    upstream: Upstream,
    stop: watch::Sender<bool>,
    http: JoinHandle<std::io::Result<()>>,
    drain: JoinHandle<()>,
    /// SQLite: this relay is the file's only one while it serves.
    _only_relay: Option<std::fs::File>,
}

impl RelayHandle {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its queue.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Its upstream caller (for its counters).
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Stops taking records, lets deliveries in flight finish (bounded),
    /// and returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let mut http = self.http;
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut http)
            .await
            .is_err()
        {
            http.abort();
        }
        let _ = self.drain.await;
    }
}

/// How long the start-up check waits for the broker and the login host.
const PREFLIGHT_WAIT: Duration = Duration::from_secs(5);
/// Opens the queue, builds the upstream caller, and serves on `listener`
/// while draining (call within a tokio runtime). Settings that cannot work
/// (no credentials for intake, a bad region or broker URL) are errors here.
pub async fn start(settings: Settings, listener: TcpListener) -> Result<RelayHandle, RelayError> {
    if !settings.auth.is_set() {
        return Err(RelayError::Settings(
            "intake needs credentials: Basic (user and password) or a shared secret".into(),
        ));
    }
    // The broker's client id: refused on every call were it not here.
    if let Some(why) = gc_upstream::client_id_problem(&settings.name) {
        return Err(RelayError::Settings(format!(
            "the relay's name (--name, GC_RELAY_NAME), its broker client id: {why}: give \
             another"
        )));
    }
    let addr = listener.local_addr().map_err(|source| RelayError::Io {
        what: "read the listener's address".into(),
        source,
    })?;
    // A queue URL of no supported kind is said before anything waits.
    let sqlite_file = queue::sqlite_path(&settings.queue)?;
    let upstream = upstream(&settings)?;
    // A wrong broker token, tenant or client secret stops the relay here,
    // not every record it would take and never deliver.
    for warning in upstream
        .preflight(PREFLIGHT_WAIT)
        .await
        .map_err(|e| RelayError::Upstream(format!("start-up check: {e}")))?
    {
        tracing::warn!("{warning}");
    }
    let only_relay = match sqlite_file {
        Some(path) => Some(queue::lock_queue_file(path)?),
        None => None,
    };
    let queue = Queue::open(&settings.queue, settings.limits).await?;
    let metrics = metrics::Metrics::default();
    let wake = Arc::new(Notify::new());
    let (stop, stopped) = watch::channel(false);
    // A random part, so a restarted relay never finishes the claims of its
    // previous life (those come back when they expire).
    let owner = format!("{}-{:016x}", settings.name, random_u64());
    let drain = drain::Drain {
        queue: queue.clone(),
        upstream: upstream.clone(),
        metrics: metrics.clone(),
        settings: settings.drain.clone(),
        owner,
        wake: wake.clone(),
    };
    if !queue.is_shared() {
        // One relay per SQLite file: whatever is in flight is a previous
        // life's, so it is due again now rather than when its claim expires.
        queue.release_all_claims().await?;
    }
    let drain = tokio::spawn(drain.run(stopped.clone()));
    let app = server::App {
        queue: queue.clone(),
        auth: Arc::new(settings.auth.clone()),
        metrics,
        upstream: upstream.clone(),
        max_record_bytes: settings.max_record_bytes,
        full_retry_after_s: settings.full_retry_after_s,
        wake,
    };
    let router = server::router(app);
    let mut http_stop = stopped;
    let http = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });
    tracing::info!(%addr, queue = %redact(&settings.queue), "gc-relay serving");
    Ok(RelayHandle {
        addr,
        queue,
        upstream,
        stop,
        http,
        drain,
        _only_relay: only_relay,
    })
}

fn upstream(settings: &Settings) -> Result<Upstream, RelayError> {
    let u = &settings.upstream;
    let region = Region::new(&u.region).map_err(|e| RelayError::Upstream(e.to_string()))?;
    let broker = BrokerClient::connect(&u.broker, u.broker_token.as_deref())
        .map_err(|e| RelayError::Upstream(format!("broker: {e}")))?;
    let template = Call::new(&u.tenant, "POST", "/")
        .client_id(&settings.name)
        .oauth_client(&u.client_id)
        .class("interactive");
    Upstream::new(
        region,
        Credentials {
            client_id: u.client_id.clone(),
            client_secret: u.client_secret.clone(),
        },
        broker,
        template,
    )
    .map_err(|e| RelayError::Upstream(e.to_string()))
}

/// `url` without a password.
pub fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => match rest.split_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or_default();
                format!("{scheme}://{user}:***@{host}")
            }
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded randomly per process: enough for a claim name.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(now_ms());
    h.finish()
}
