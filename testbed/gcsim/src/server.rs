//! The HTTP side: axum routes for the Genesys-like API and the `/_sim`
//! control plane, the simulated clock, auth, the rate-limit headers, the
//! 429 and error bodies, latency (slept while holding any concurrency slot),
//! and the log of every request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::SimConfig;
use crate::data::{parse_timestamp, uuid_like, History};
use crate::error::SimError;
use crate::jobs::{JobError, Jobs};
use crate::log::{Entry, Log};
use crate::org::{FamilyChange, Org, Refusal};

/// How long `shutdown` waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Simulated latency of a details query: fixed part and per row, ms.
const DETAILS_LATENCY_MS: (f64, f64) = (400.0, 2.0);
/// Simulated latency of a queue-observations query, ms.
const OBSERVATIONS_LATENCY_MS: f64 = 20.0;
/// Simulated latency of a wrap-up write, ms.
const WRAPUP_LATENCY_MS: f64 = 30.0;
/// Queues in every observations answer.
const OBSERVED_QUEUES: usize = 8;

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

/// An access token `POST /oauth/token` issued.
struct Issued {
    org: String,
    client: String,
    expires: Instant,
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

    fn log(&self, entry: Entry) {
        lock(&self.inner.log).push(entry);
    }

    /// One API request: auth, the org's decision, `answer` (run once
    /// admitted), its latency, the headers.
    async fn serve<F>(&self, headers: &HeaderMap, method: &str, path: &str, answer: F) -> Response
    where
        F: FnOnce(&OrgSlot) -> Answer,
    {
        self.serve_gated(
            headers,
            method,
            path,
            |_, _| Ok(()),
            |slot, ()| answer(slot),
        )
        .await
    }

    /// [`Self::serve`] for an endpoint with a limit of its own: `gate` (at
    /// the decision's simulated ms, under the org's lock) is that limit's
    /// last word in the org's decision (see [`Org::admit_gated`]); what it
    /// admits with goes to `answer`.
    async fn serve_gated<G, T, F>(
        &self,
        headers: &HeaderMap,
        method: &str,
        path: &str,
        gate: G,
        answer: F,
    ) -> Response
    where
        G: FnOnce(&OrgSlot, f64) -> Result<T, Refusal>,
        F: FnOnce(&OrgSlot, T) -> Answer,
    {
        let (org_id, client) = match self.caller(headers) {
            Ok(caller) => caller,
            Err(response) => return *response,
        };
        let (org_id, client) = (org_id.as_str(), client.as_str());
        let Some(slot) = self.inner.orgs.get(org_id) else {
            return unknown_org(org_id);
        };
        let clock = self.inner.clock;
        let now = clock.now_ms();
        let mut admitted = None;
        let decision = lock(&slot.org).admit_gated(now, client, method, path, || {
            admitted = Some(gate(slot, now)?);
            Ok(())
        });
        let entry = |status: StatusCode, reason: Option<String>| Entry {
            seq: 0,
            sim_ms: now,
            org: org_id.to_owned(),
            client: client.to_owned(),
            method: method.to_owned(),
            path: path.to_owned(),
            status: status.as_u16(),
            reason,
        };
        // None when no limit that applies tells (a silent org).
        let rate_headers: Vec<(&'static str, String)> = decision
            .told
            .map(|t| {
                vec![
                    ("inin-ratelimit-allowed", t.allowed.to_string()),
                    ("inin-ratelimit-count", t.count.to_string()),
                    ("inin-ratelimit-reset", clock.header_secs(t.reset_ms)),
                ]
            })
            .unwrap_or_default();
        let (slots, admitted) = match (decision.verdict, admitted) {
            (Ok(slots), Some(admitted)) => (slots, admitted),
            (Ok(_), None) => unreachable!("the gate runs whenever the org admits"),
            (Err(refusal), _) => {
                self.log(entry(
                    StatusCode::TOO_MANY_REQUESTS,
                    Some(refusal.reason.clone()),
                ));
                let mut response = too_many(&refusal);
                let h = response.headers_mut();
                if let Ok(v) = clock.header_secs(refusal.retry_after_ms).parse() {
                    h.insert(header::RETRY_AFTER, v);
                }
                add_headers(&mut response, &rate_headers);
                return response;
            }
        };
        let _slots = SlotGuard {
            slot: Arc::clone(slot),
            slots,
        };
        let answer = answer(slot, admitted);
        self.log(entry(answer.status, None));
        tokio::time::sleep(clock.real(answer.latency_ms)).await;
        let mut response = (
            answer.status,
            [(header::CONTENT_TYPE, "application/json")],
            answer.body,
        )
            .into_response();
        add_headers(&mut response, &rate_headers);
        response
    }
}

/// Gives back the concurrency slots of a request when it ends (or when its
/// client goes away mid-latency and the handler is dropped).
struct SlotGuard {
    slot: Arc<OrgSlot>,
    slots: Vec<usize>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if !self.slots.is_empty() {
            lock(&self.slot.org).release(&self.slots);
        }
    }
}

/// What an admitted request answers.
struct Answer {
    status: StatusCode,
    body: String,
    /// Simulated ms before the answer is sent.
    latency_ms: f64,
}

impl Answer {
    fn ok(status: StatusCode, body: String, latency_ms: f64) -> Answer {
        Answer {
            status,
            body,
            latency_ms,
        }
    }

    /// A Genesys-style error, answered at once.
    fn error(status: StatusCode, code: &str, message: &str) -> Answer {
        Answer {
            status,
            body: error_json(status, code, message, None),
            latency_ms: 0.0,
        }
    }

    fn bad_request(message: String) -> Answer {
        Answer::error(StatusCode::BAD_REQUEST, "bad.request", &message)
    }
}

fn add_headers(response: &mut Response, headers: &[(&'static str, String)]) {
    for (name, value) in headers {
        if let Ok(v) = value.parse() {
            response.headers_mut().insert(*name, v);
        }
    }
}

impl Sim {
    /// The caller of an API request: `Authorization: Bearer <token>` with a
    /// token `POST /oauth/token` issued, or `Bearer <org>:<client>`, →
    /// (org, client).
    fn caller(&self, headers: &HeaderMap) -> Result<(String, String), Box<Response>> {
        let unauthorized = |why: &str| {
            Box::new(error_body(
                StatusCode::UNAUTHORIZED,
                "authentication.required",
                format!(
                    "{why}: expected \"Authorization: Bearer <access token>\" \
                     (from POST /oauth/token) or \"Bearer <org>:<client>\"."
                ),
                None,
            ))
        };
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("No authorization header"))?
            .to_str()
            .map_err(|_| unauthorized("Authorization header is not text"))?;
        let token = value
            .strip_prefix("Bearer ")
            .ok_or_else(|| unauthorized("Not a bearer token"))?;
        if let Some((org, client)) = token.split_once(':') {
            return if !org.is_empty() && !client.is_empty() {
                Ok((org.to_owned(), client.to_owned()))
            } else {
                Err(unauthorized("Malformed bearer token"))
            };
        }
        match lock(&self.inner.tokens).get(token) {
            Some(issued) if issued.expires > Instant::now() => {
                Ok((issued.org.clone(), issued.client.clone()))
            }
            Some(_) => Err(unauthorized("The access token has expired")),
            None => Err(unauthorized("Unknown access token")),
        }
    }
}

/// The form of `POST /oauth/token`.
#[derive(Deserialize)]
struct TokenForm {
    grant_type: String,
}

/// OAuth client credentials: `Authorization: Basic base64(<client>@<org>:
/// <the org's oauth_secret>)`, form `grant_type=client_credentials`.
async fn oauth_token(
    State(sim): State<Sim>,
    headers: HeaderMap,
    form: Result<axum::Form<TokenForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let oauth_error = |status: StatusCode, error: &str, description: &str| {
        (
            status,
            axum::Json(json!({ "error": error, "description": description })),
        )
            .into_response()
    };
    let invalid_client =
        |description: &str| oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", description);
    match form {
        Ok(form) if form.grant_type == "client_credentials" => {}
        Ok(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only grant_type=client_credentials is supported",
            )
        }
        Err(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "expected a form body grant_type=client_credentials",
            )
        }
    }
    let Some((client_id, secret)) = basic_credentials(&headers) else {
        return invalid_client("expected Authorization: Basic base64(client_id:client_secret)");
    };
    let Some((client, org)) = client_id
        .rsplit_once('@')
        .filter(|(c, o)| !c.is_empty() && !o.is_empty())
    else {
        return invalid_client("a gcsim client id is <client>@<org>");
    };
    let Some(slot) = sim.inner.orgs.get(org) else {
        return invalid_client("no such org");
    };
    if secret != slot.oauth_secret {
        return invalid_client("wrong client secret");
    }
    let token = format!("gcsim-{}", uuid_like(&mut fastrand::Rng::new()));
    let now = Instant::now();
    {
        let mut tokens = lock(&sim.inner.tokens);
        tokens.retain(|_, t| t.expires > now);
        tokens.insert(
            token.clone(),
            Issued {
                org: org.to_owned(),
                client: client.to_owned(),
                expires: now + slot.token_ttl,
            },
        );
    }
    axum::Json(json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": slot.token_ttl.as_secs(),
    }))
    .into_response()
}

/// `Authorization: Basic base64(id:secret)` → (id, secret).
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// A Genesys-style error body.
fn error_json(
    status: StatusCode,
    code: &str,
    message: &str,
    params: Option<(Option<u64>, &str)>,
) -> String {
    let params = match params {
        None => json!({}),
        Some((Some(limit), reason)) => json!({ "limit": limit.to_string(), "reason": reason }),
        Some((None, reason)) => json!({ "reason": reason }),
    };
    let context = uuid_like(&mut fastrand::Rng::new());
    json!({
        "message": message,
        "code": code,
        "status": status.as_u16(),
        "messageParams": params,
        "contextId": context,
        "details": [],
        "errors": [],
    })
    .to_string()
}

fn error_body(
    status: StatusCode,
    code: &str,
    message: String,
    params: Option<(Option<u64>, &str)>,
) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        error_json(status, code, &message, params),
    )
        .into_response()
}

fn too_many(refusal: &Refusal) -> Response {
    error_body(
        StatusCode::TOO_MANY_REQUESTS,
        "too.many.requests",
        format!("Rate limit exceeded the maximum. [{}]", refusal.reason),
        Some((refusal.limit, &refusal.reason)),
    )
}

/// The details query's body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DetailsQuery {
    interval: String,
    #[serde(default)]
    paging: Paging,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Paging {
    page_size: Option<i64>,
    page_number: Option<i64>,
}

/// `"<start>/<end>"` in ISO-8601 UTC, start before end → Unix ms.
fn parse_interval(interval: &str) -> Option<(i64, i64)> {
    let (a, b) = interval.split_once('/')?;
    let (from, to) = (parse_timestamp(a)?, parse_timestamp(b)?);
    (from < to).then_some((from, to))
}

fn bad_interval(interval: &str) -> String {
    // Bounded: an interval is a few dozen characters, not an echo of a body.
    let shown: String = interval.chars().take(80).collect();
    format!("interval {shown:?} is not \"<start>/<end>\" in ISO-8601 UTC with start before end")
}

fn details_answer(slot: &OrgSlot, body: &[u8]) -> Answer {
    let history = &slot.history;
    let query: DetailsQuery = match serde_json::from_slice(body) {
        Ok(q) => q,
        Err(e) => {
            return Answer::bad_request(format!("The request body is not a details query: {e}"))
        }
    };
    let Some((from, to)) = parse_interval(&query.interval) else {
        return Answer::bad_request(bad_interval(&query.interval));
    };
    let page_size = query.paging.page_size.unwrap_or(25);
    let page_number = query.paging.page_number.unwrap_or(1);
    if !(1..=100).contains(&page_size) || page_number < 1 {
        return Answer::bad_request(format!(
            "paging: pageSize must be 1–100 and pageNumber ≥ 1, got {page_size} and {page_number}"
        ));
    }
    let (size, number) = (page_size as usize, page_number as usize);
    let mut page = history.query(from, to, size, number);
    if number == 1 {
        let shifted = page.rows() > 0
            && slot
                .shifted_queries
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
        slot.shifting.store(shifted, Ordering::Relaxed);
    } else if slot.shifting.load(Ordering::Relaxed) {
        page = history.query_shifted(from, to, size, number);
    }
    // A page fault set by the control plane, taken once per page with rows.
    let take = |left: &AtomicU64| {
        page.rows() > 0
            && left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
    };
    let (short, malformed) = (take(&slot.short_pages), take(&slot.malformed_pages));
    let nul = take(&slot.nul_fields);
    if short {
        page.drop_last();
    }
    if malformed {
        page.garble_first();
    }
    if nul {
        page.nul_in_first();
    }
    let latency = DETAILS_LATENCY_MS.0 + DETAILS_LATENCY_MS.1 * page.rows() as f64;
    json_answer(&page, latency)
}

async fn details(State(sim): State<Sim>, headers: HeaderMap, uri: Uri, body: Bytes) -> Response {
    sim.serve(&headers, "POST", uri.path(), |slot| {
        details_answer(slot, &body)
    })
    .await
}

async fn observations(
    State(sim): State<Sim>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    sim.serve(
        &headers,
        "POST",
        uri.path(),
        |_| match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(_) => Answer::ok(
                StatusCode::OK,
                sim.inner.observations.clone(),
                OBSERVATIONS_LATENCY_MS,
            ),
            Err(e) => Answer::bad_request(format!("The request body is not JSON: {e}")),
        },
    )
    .await
}

/// The fixed answer of a queue-observations query.
fn observations_body() -> String {
    let results: Vec<_> = (0..OBSERVED_QUEUES)
        .map(|q| {
            json!({
                "group": { "queueId": format!("queue-{q}") },
                "data": [
                    { "metric": "oWaiting", "stats": { "count": q } },
                    { "metric": "oInteracting", "stats": { "count": 2 * q } },
                ],
            })
        })
        .collect();
    json!({ "results": results }).to_string()
}

#[derive(Deserialize)]
struct Wrapup {
    code: String,
}

async fn wrapup(
    State(sim): State<Sim>,
    Path((conversation, _participant, _communication)): Path<(String, String, String)>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    sim.serve(
        &headers,
        "POST",
        uri.path(),
        |slot| match serde_json::from_slice::<Wrapup>(&body) {
            Ok(w) if !w.code.is_empty() => {
                lock(&slot.org).store_write(&conversation);
                Answer::ok(StatusCode::ACCEPTED, "{}".into(), WRAPUP_LATENCY_MS)
            }
            Ok(_) => Answer::bad_request("code must not be empty".into()),
            Err(e) => Answer::bad_request(format!("The request body is not a wrap-up: {e}")),
        },
    )
    .await
}

async fn namespace(
    State(sim): State<Sim>,
    Path(ns): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    sim.serve(&headers, "GET", uri.path(), |slot| {
        match lock(&slot.org).namespace(&ns) {
            Some(entities) => {
                let entities: Vec<_> = entities
                    .into_iter()
                    .map(|(key, value)| json!({ "key": key, "value": value }))
                    .collect();
                Answer::ok(
                    StatusCode::OK,
                    json!({ "namespace": ns, "entities": entities }).to_string(),
                    0.0,
                )
            }
            None => Answer::error(
                StatusCode::NOT_FOUND,
                "not.found",
                &format!("No limits namespace {ns:?}."),
            ),
        }
    })
    .await
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

async fn stats(State(sim): State<Sim>) -> Response {
    let now = sim.inner.clock.now_ms();
    let orgs: Vec<_> = sim
        .inner
        .ids
        .iter()
        .filter_map(|id| {
            let slot = sim.inner.orgs.get(id)?;
            Some(lock(&slot.org).stats(now, id))
        })
        .collect();
    axum::Json(json!({ "sim_ms": now, "orgs": orgs })).into_response()
}

fn unknown_org(org: &str) -> Response {
    error_body(
        StatusCode::NOT_FOUND,
        "not.found",
        format!("No org {org:?} here."),
        None,
    )
}

async fn writes(State(sim): State<Sim>, Path(org): Path<String>) -> Response {
    match sim.inner.orgs.get(&org) {
        Some(slot) => axum::Json(lock(&slot.org).writes().clone()).into_response(),
        None => unknown_org(&org),
    }
}

async fn change(
    State(sim): State<Sim>,
    Path((org, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Some(slot) = sim.inner.orgs.get(&org) else {
        return unknown_org(&org);
    };
    let change: FamilyChange = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return error_body(
                StatusCode::BAD_REQUEST,
                "bad.request",
                format!("expected any of {{\"hidden_permits\":N,\"max_concurrent\":N,\"unmanaged_per_window\":N}}: {e}"),
                None,
            )
        }
    };
    if change.hidden_permits == Some(0) {
        return error_body(
            StatusCode::BAD_REQUEST,
            "bad.request",
            "hidden_permits must be above 0 (a limit of 0 refuses every request, as no upstream does)"
                .into(),
            None,
        );
    }
    let now = sim.inner.clock.now_ms();
    if lock(&slot.org).change(now, &name, change) {
        tracing::info!(org, family = name, ?change, sim_ms = now, "family changed");
        axum::Json(json!({ "sim_ms": now })).into_response()
    } else {
        error_body(
            StatusCode::NOT_FOUND,
            "not.found",
            format!("Org {org:?} has no family {name:?}."),
            None,
        )
    }
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    since: u64,
}

async fn log_page(State(sim): State<Sim>, Query(q): Query<Since>) -> Response {
    let page = lock(&sim.inner.log).page(q.since);
    axum::Json(page).into_response()
}

/// Simulated latency of a job submission or status, ms.
const JOB_LATENCY_MS: f64 = 50.0;
/// Simulated latency of a job results page: fixed part and per row, ms.
const JOB_RESULTS_LATENCY_MS: (f64, f64) = (100.0, 0.1);
/// Unix ms of simulated time 0 in a job's dates: the Unix epoch itself.
const JOB_EPOCH_MS: i64 = 0;

/// A job submission's body: the interval, as the details query has it.
#[derive(Deserialize)]
struct JobQuery {
    interval: String,
}

/// A job submission's interval from its body (Unix ms), or the 400's message.
fn job_interval(body: &[u8]) -> Result<(i64, i64), String> {
    let query: JobQuery = serde_json::from_slice(body)
        .map_err(|e| format!("The request body is not a job query: {e}"))?;
    parse_interval(&query.interval).ok_or_else(|| bad_interval(&query.interval))
}

fn job_error(e: JobError) -> Answer {
    match e {
        JobError::NotFound => Answer::error(
            StatusCode::NOT_FOUND,
            "not.found",
            "No such job (never submitted, or expired).",
        ),
        JobError::NotFulfilled => Answer::bad_request("The job is not fulfilled yet.".into()),
        JobError::BadRequest(message) => Answer::bad_request(message),
    }
}

fn json_answer<T: serde::Serialize>(value: &T, latency_ms: f64) -> Answer {
    match serde_json::to_string(value) {
        Ok(body) => Answer::ok(StatusCode::OK, body, latency_ms),
        Err(e) => Answer::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal.server.error",
            &format!("The answer could not be encoded: {e}"),
        ),
    }
}

/// A submission: once the token and family limits admit it, a bad body is
/// a 400 (whatever the jobs running) and a good one meets the jobs limits,
/// last in the org's decision, so that their refusal counts as any other.
async fn job_submit(State(sim): State<Sim>, headers: HeaderMap, uri: Uri, body: Bytes) -> Response {
    let interval = job_interval(&body);
    sim.serve_gated(
        &headers,
        "POST",
        uri.path(),
        |slot, now| match interval {
            Ok((from, to)) => {
                let id = uuid_like(&mut fastrand::Rng::new());
                lock(&slot.jobs)
                    .submit(now, &slot.history, from, to, id)
                    .map(Ok)
            }
            Err(message) => Ok(Err(message)),
        },
        |_, submitted| match submitted {
            Ok(id) => Answer::ok(
                StatusCode::ACCEPTED,
                json!({ "jobId": id }).to_string(),
                JOB_LATENCY_MS,
            ),
            Err(message) => Answer::bad_request(message),
        },
    )
    .await
}

async fn job_status(
    State(sim): State<Sim>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let now = sim.inner.clock.now_ms();
    sim.serve(&headers, "GET", uri.path(), |slot| {
        match lock(&slot.jobs).status(now, &id, JOB_EPOCH_MS) {
            Ok(status) => json_answer(&status, JOB_LATENCY_MS),
            Err(e) => job_error(e),
        }
    })
    .await
}

async fn job_delete(
    State(sim): State<Sim>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let now = sim.inner.clock.now_ms();
    sim.serve(&headers, "DELETE", uri.path(), |slot| {
        match lock(&slot.jobs).delete(now, &id) {
            Ok(()) => Answer::ok(StatusCode::NO_CONTENT, String::new(), JOB_LATENCY_MS),
            Err(e) => job_error(e),
        }
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResultsParams {
    cursor: Option<String>,
    page_size: Option<usize>,
}

async fn job_results(
    State(sim): State<Sim>,
    Path(id): Path<String>,
    Query(params): Query<ResultsParams>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let now = sim.inner.clock.now_ms();
    sim.serve(&headers, "GET", uri.path(), |slot| {
        // A cursor the endless-cursor fault handed out reads the page of
        // the cursor it was made from.
        let cursor = params.cursor.as_deref().map(|c| match c.rsplit_once('~') {
            Some((base, n))
                if n.parse::<u64>()
                    .is_ok_and(|n| n < slot.fresh_cursors.load(Ordering::Relaxed)) =>
            {
                base
            }
            _ => c,
        });
        let page = lock(&slot.jobs).results(now, &slot.history, &id, cursor, params.page_size);
        match page {
            Ok(mut page) => {
                if slot
                    .endless_cursors
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let n = slot.fresh_cursors.fetch_add(1, Ordering::Relaxed);
                    let base = cursor.map_or_else(|| format!("{id}.0"), str::to_owned);
                    page.set_cursor(format!("{base}~{n}"));
                }
                // The fault, taken once per page read with a cursor that
                // has a page after it.
                if let Some(asked) = &params.cursor {
                    if page.has_next()
                        && slot
                            .repeating_cursors
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                n.checked_sub(1)
                            })
                            .is_ok()
                    {
                        page.set_cursor(asked.clone());
                    }
                }
                let latency =
                    JOB_RESULTS_LATENCY_MS.0 + JOB_RESULTS_LATENCY_MS.1 * page.rows() as f64;
                json_answer(&page, latency)
            }
            Err(e) => job_error(e),
        }
    })
    .await
}

async fn conversation_ids(
    State(sim): State<Sim>,
    Path(org): Path<String>,
    Query(q): Query<IdsParams>,
) -> Response {
    let Some(slot) = sim.inner.orgs.get(&org) else {
        return unknown_org(&org);
    };
    match q.interval {
        None => axum::Json(slot.history.ids()).into_response(),
        Some(interval) => match parse_interval(&interval) {
            Some((from, to)) => axum::Json(slot.history.ids_in(from, to)).into_response(),
            None => error_body(
                StatusCode::BAD_REQUEST,
                "bad.request",
                bad_interval(&interval),
                None,
            ),
        },
    }
}

/// `GET /_sim/orgs/{org}/conversations?interval=<start>/<end>`: only the
/// conversations starting in the interval.
#[derive(Deserialize)]
struct IdsParams {
    interval: Option<String>,
}

/// `POST /_sim/orgs/{org}/short-pages` body `N`: the next N details-query
/// pages with rows each lose their last row.
async fn short_pages(State(sim): State<Sim>, Path(org): Path<String>, body: Bytes) -> Response {
    page_fault(&sim, &org, &body, "short_pages", |slot| &slot.short_pages)
}

/// `POST /_sim/orgs/{org}/shifted-queries` body `N`: the next N details
/// queries (counted at their first page) answer every later page as if a
/// conversation on the first was removed once it was read (rows one place
/// on, `totalHits` one fewer), until another query's first page.
async fn shifted_queries(State(sim): State<Sim>, Path(org): Path<String>, body: Bytes) -> Response {
    page_fault(&sim, &org, &body, "shifted_queries", |slot| {
        &slot.shifted_queries
    })
}

/// `POST /_sim/orgs/{org}/repeating-cursor` body `N`: the next N job results
/// pages read with a cursor, that have a page after them, hand back the
/// cursor they were read with instead of the next page's.
async fn repeating_cursor(
    State(sim): State<Sim>,
    Path(org): Path<String>,
    body: Bytes,
) -> Response {
    page_fault(&sim, &org, &body, "repeating_cursor", |slot| {
        &slot.repeating_cursors
    })
}

/// `POST /_sim/orgs/{org}/endless-cursor` body `N`: the next N job results
/// pages (the last one too) hand out a cursor never handed out before that
/// reads the same page again.
async fn endless_cursor(State(sim): State<Sim>, Path(org): Path<String>, body: Bytes) -> Response {
    page_fault(&sim, &org, &body, "endless_cursor", |slot| {
        &slot.endless_cursors
    })
}

/// `POST /_sim/orgs/{org}/malformed-pages` body `N`: the first row of each
/// of the next N details-query pages with rows lacks `conversationStart`.
async fn malformed_pages(State(sim): State<Sim>, Path(org): Path<String>, body: Bytes) -> Response {
    page_fault(&sim, &org, &body, "malformed_pages", |slot| {
        &slot.malformed_pages
    })
}

/// `POST /_sim/orgs/{org}/nul-fields` body `N`: the first row of each of
/// the next N details-query pages with rows has a NUL character at the end
/// of its `queueId` and `wrapUpCode`.
async fn nul_fields(State(sim): State<Sim>, Path(org): Path<String>, body: Bytes) -> Response {
    page_fault(&sim, &org, &body, "nul_fields", |slot| &slot.nul_fields)
}

/// `POST /_sim/orgs/{org}/jobs-available-until` body a Unix ms time, or
/// `null`: jobs submitted from now on see only conversations starting
/// before it, and their results say it as `dataAvailabilityDate`.
async fn jobs_available_until(
    State(sim): State<Sim>,
    Path(org): Path<String>,
    body: Bytes,
) -> Response {
    let Some(slot) = sim.inner.orgs.get(&org) else {
        return unknown_org(&org);
    };
    match serde_json::from_slice::<Option<i64>>(&body) {
        Ok(until) => {
            lock(&slot.jobs).set_available_until(until);
            axum::Json(json!({ "jobs_available_until": until })).into_response()
        }
        Err(e) => error_body(
            StatusCode::BAD_REQUEST,
            "bad.request",
            format!("expected Unix ms or null: {e}"),
            None,
        ),
    }
}

/// Sets the count of a details-query page fault from a request body `N`.
fn page_fault(
    sim: &Sim,
    org: &str,
    body: &[u8],
    name: &str,
    counter: impl Fn(&OrgSlot) -> &AtomicU64,
) -> Response {
    let Some(slot) = sim.inner.orgs.get(org) else {
        return unknown_org(org);
    };
    match serde_json::from_slice::<u64>(body) {
        Ok(n) => {
            counter(slot).store(n, Ordering::Relaxed);
            axum::Json(json!({ name: n })).into_response()
        }
        Err(e) => error_body(
            StatusCode::BAD_REQUEST,
            "bad.request",
            format!("expected a number of pages: {e}"),
            None,
        ),
    }
}
