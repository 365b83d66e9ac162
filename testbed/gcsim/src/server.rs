//! The HTTP side: axum routes for the Genesys-like API and the `/_sim`
//! control plane, the simulated clock, auth, the rate-limit headers, the
//! 429 and error bodies, latency (slept while holding any concurrency slot),
//! and the log of every request.
//!
//! This file owns the simulator's state (the clock, each org's slot, the
//! access tokens, the log), starting and stopping it, and the route table.
//! The rest, by what each part owns:
//!
//! - `serve`: one API request from auth to answer (decision, 429, latency
//!   under the concurrency slots, headers, log entry) and what an endpoint
//!   answers with.
//! - `auth`: the caller of an API request and `POST /oauth/token`.
//! - `errors`: the Genesys-style error bodies (the 429, the 404s).
//! - `api`: the details query, observations, wrap-up and limits namespaces.
//! - `jobs_api`: the asynchronous details jobs' endpoints.
//! - `control`: the `/_sim` control plane (stats, changes, log, faults).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::http::{Method, StatusCode, Uri};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::SimConfig;
use crate::data::History;
use crate::error::SimError;
use crate::jobs::Jobs;
use crate::log::Log;
use crate::org::Org;

mod api;
mod auth;
mod control;
mod errors;
mod jobs_api;
mod serve;

use api::{details, namespace, observations, observations_body, wrapup};
use auth::{oauth_token, Issued};
use control::{
    change, conversation_ids, endless_cursor, jobs_available_until, log_page, malformed_pages,
    nul_fields, repeating_cursor, shifted_queries, short_pages, stats, writes,
};
use errors::error_body;
use jobs_api::{job_delete, job_results, job_status, job_submit};

/// How long `shutdown` waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Simulated time: real time since start × scale.
#[derive(Clone, Copy, Debug)]
struct Clock {
    start: Instant,
    scale: f64,
}

impl Clock {
    fn now_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1000.0 * self.scale
    }

    /// The real duration of `sim_ms`.
    fn real(&self, sim_ms: f64) -> Duration {
        Duration::from_secs_f64((sim_ms / self.scale / 1000.0).max(0.0))
    }

    /// `sim_ms` as header seconds: whole (rounded up) at scale 1, else
    /// decimal with 3 places (never 0, so a client never retries at once).
    fn header_secs(&self, sim_ms: f64) -> String {
        // Whole real ms first, so float noise never rounds 2 s up to 3.
        let secs = (sim_ms / self.scale).round() / 1000.0;
        if self.scale == 1.0 {
            format!("{}", secs.ceil().max(1.0))
        } else {
            format!("{:.3}", secs.max(0.001))
        }
    }
}

/// One org and its history.
struct OrgSlot {
    /// std `Mutex`: held only for one decision, never across an await.
    org: Mutex<Org>,
    history: History,
    /// std `Mutex`: held for one submission, status or page.
    jobs: Mutex<Jobs>,
    /// Details-query pages still to answer one row short (a fault the
    /// control plane sets; `totalHits` stays true).
    short_pages: AtomicU64,
    /// Details-query pages still to answer with their first row missing
    /// its `conversationStart` (a fault the control plane sets).
    malformed_pages: AtomicU64,
    /// Details-query pages still to answer with a NUL character in their
    /// first row's `queueId` and `wrapUpCode` (a fault the control plane
    /// sets).
    nul_fields: AtomicU64,
    /// Details queries still to be read as if a conversation on their first
    /// page was removed once it was read (a fault the control plane sets):
    /// counted down at each first page...
    shifted_queries: AtomicU64,
    /// ...and whether the pages after the last first page read are shifted
    /// (rows one place on, `totalHits` one fewer).
    shifting: std::sync::atomic::AtomicBool,
    /// Job results pages still to hand back the cursor they were read with
    /// instead of the next one (a fault the control plane sets).
    repeating_cursors: AtomicU64,
    /// Job results pages still to hand out a fresh cursor that reads them
    /// again (a fault the control plane sets)...
    endless_cursors: AtomicU64,
    /// ...and how many such cursors were handed out: `<cursor>~<n>` is
    /// taken for `<cursor>` only if its `n` is below.
    fresh_cursors: AtomicU64,
    /// Its OAuth clients' secret and the lifetime of the tokens it issues.
    oauth_secret: String,
    token_ttl: Duration,
}

struct Inner {
    clock: Clock,
    /// In config order (for stats).
    ids: Vec<String>,
    /// `Arc`: a request's concurrency slots are given back through it.
    orgs: HashMap<String, Arc<OrgSlot>>,
    /// The queue-observations answer: fixed, so built once.
    observations: String,
    /// std `Mutex`: held to push one entry or copy one page.
    log: Mutex<Log>,
    /// Access tokens issued, by token; std `Mutex`: held for one lookup.
    tokens: Mutex<HashMap<String, Issued>>,
}

/// The simulator: a cheap-clone handle on its state.
#[derive(Clone)]
pub struct Sim {
    inner: Arc<Inner>,
}

/// A running simulator.
pub struct SimHandle {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl SimHandle {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving: requests in flight get `SHUTDOWN_GRACE` (5 s) to finish.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves counters that are still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Sim {
    /// Checks `config`, builds its orgs and serves on `listener` (call
    /// within a tokio runtime).
    pub fn start(config: SimConfig, listener: TcpListener) -> Result<SimHandle, SimError> {
        let ready = config.ready()?;
        let addr = listener.local_addr().map_err(|source| SimError::Io {
            what: "read the listener's address".into(),
            source,
        })?;
        let mut orgs = HashMap::new();
        let mut ids = Vec::new();
        for org in ready {
            let id = org.config.id.clone();
            let slot = OrgSlot {
                jobs: Mutex::new(Jobs::new(org.config.jobs.clone())),
                short_pages: AtomicU64::new(0),
                shifted_queries: AtomicU64::new(0),
                shifting: std::sync::atomic::AtomicBool::new(false),
                malformed_pages: AtomicU64::new(0),
                nul_fields: AtomicU64::new(0),
                repeating_cursors: AtomicU64::new(0),
                endless_cursors: AtomicU64::new(0),
                fresh_cursors: AtomicU64::new(0),
                history: History::generate(
                    config.seed,
                    &id,
                    org.day_ms,
                    org.config.days,
                    org.config.conversations_per_day,
                ),
                oauth_secret: org.config.oauth_secret.clone(),
                token_ttl: Duration::from_secs(org.config.token_ttl_s),
                org: Mutex::new(Org::new(
                    org.config,
                    org.families,
                    (config.escalation_base_ms, config.escalation_max_ms),
                )),
            };
            ids.push(id.clone());
            orgs.insert(id, Arc::new(slot));
        }
        let sim = Sim {
            inner: Arc::new(Inner {
                clock: Clock {
                    start: Instant::now(),
                    scale: config.time_scale,
                },
                ids,
                orgs,
                log: Mutex::new(Log::default()),
                observations: observations_body(),
                tokens: Mutex::new(HashMap::new()),
            }),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let router = sim.router();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        tracing::info!(%addr, scale = config.time_scale, "gcsim serving");
        Ok(SimHandle { addr, stop, task })
    }

    fn router(&self) -> Router {
        Router::new()
            .route(
                "/api/v2/analytics/conversations/details/query",
                post(details),
            )
            .route(
                "/api/v2/analytics/queues/observations/query",
                post(observations),
            )
            .route(
                "/api/v2/conversations/calls/{conversation}/participants/{participant}/communications/{communication}/wrapup",
                post(wrapup),
            )
            .route("/api/v2/analytics/conversations/details/jobs", post(job_submit))
            .route(
                "/api/v2/analytics/conversations/details/jobs/{id}",
                get(job_status).delete(job_delete),
            )
            .route(
                "/api/v2/analytics/conversations/details/jobs/{id}/results",
                get(job_results),
            )
            .route("/_sim/orgs/{org}/conversations", get(conversation_ids))
            .route("/_sim/orgs/{org}/short-pages", post(short_pages))
            .route("/_sim/orgs/{org}/malformed-pages", post(malformed_pages))
            .route("/_sim/orgs/{org}/nul-fields", post(nul_fields))
            .route("/_sim/orgs/{org}/shifted-queries", post(shifted_queries))
            .route("/_sim/orgs/{org}/repeating-cursor", post(repeating_cursor))
            .route("/_sim/orgs/{org}/endless-cursor", post(endless_cursor))
            .route(
                "/_sim/orgs/{org}/jobs-available-until",
                post(jobs_available_until),
            )
            .route(
                "/api/v2/organizations/limits/namespaces/{ns}",
                get(namespace),
            )
            .route("/oauth/token", post(oauth_token))
            .route("/_sim/stats", get(stats))
            .route("/_sim/orgs/{org}/writes", get(writes))
            .route("/_sim/orgs/{org}/families/{name}", post(change))
            .route("/_sim/log", get(log_page))
            .fallback(not_found)
            .with_state(self.clone())
    }
}

async fn not_found(method: Method, uri: Uri) -> Response {
    error_body(
        StatusCode::NOT_FOUND,
        "not.found",
        format!(
            "{method} {} is not something this simulator serves.",
            uri.path()
        ),
        None,
    )
}
