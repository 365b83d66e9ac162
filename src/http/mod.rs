//! The HTTP port (`server.http_listen`): Prometheus `/metrics`, the live
//! dashboard at `/` with its server-sent event feed `/events`, and the
//! orchestrators' probes `/healthz` (the process answers) and `/readyz`
//! (it serves, and is not shutting down). The port answers from the
//! moment it is bound, before the broker has started (see [`Port`]).
//!
//! `/metrics` and the probes need no token, like gRPC health. The event
//! feed shows tenants' buckets, so it follows the gRPC rules: with
//! `[[auth.tokens]]` configured it needs a token, shows only the tenants the
//! token is scoped to, and refuses a token sent from another host over this
//! plaintext port. A browser's `EventSource` cannot send headers, so the
//! page trades its token for a session cookie first (`POST /session` with
//! `Authorization: Bearer`; see `session`), which keeps the token out of
//! URLs, access logs and the browser; `/events` takes `Authorization`,
//! `?token=`, or that cookie. The dashboard's page and scripts
//! are static, embedded in the binary (no CDN: it works offline). A
//! browser's tabs of the dashboard share one feed (a `SharedWorker`,
//! `dashboard-feed.js`): each holds its connection open, and a browser
//! opens at most 6 to a host over HTTP/1.1, which this port speaks.
//!
//! The feed starts with what each visible instance showed over the last
//! minutes (`history`: one `history` event per instance), then is the
//! broker's Watch feed (a snapshot, then each bucket again when it changes,
//! coalesced): the page polls nothing.

use crate::auth::{AuthError, Authenticator};
use crate::broker::{Broker, TenantBucketStatus};
use crate::clock::{millis, Clock};
use crate::grpc::{Overload, PeerInfo};
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use history::History;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

mod connections;
mod history;
mod session;
mod starting;
pub(crate) use session::KEY_FILE;
pub(crate) use starting::StartStage;

const INDEX_HTML: &str = include_str!("assets/index.html");
const DASHBOARD_JS: &str = include_str!("assets/dashboard.js");
/// The event feed, as the page's tabs share it (their `SharedWorker`).
const DASHBOARD_FEED_JS: &str = include_str!("assets/dashboard-feed.js");
const DASHBOARD_CSS: &str = include_str!("assets/dashboard.css");
/// OpenMetrics text, for scrapers that ask for it.
const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Prometheus text format 0.0.4, for everyone else (promtool, curl).
const PROMETHEUS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// A comment on an idle feed this often, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// The event feed sends each instance at most this often: the page keeps
/// one chart point per half second, and a per-client bucket of 300 busy
/// clients would otherwise send it some 600 events a second.
const FEED_COALESCE: Duration = Duration::from_millis(500);
/// The event feed says which instances exist this often.
const INSTANCES_EVERY: Duration = Duration::from_secs(15);

/// What the handlers share.
#[derive(Clone)]
struct Http {
    registry: Arc<Registry>,
    broker: Broker,
    auth: Authenticator,
    /// Caps the event feeds a caller holds open, with gRPC Watch's limits.
    overload: Arc<Overload>,
    shutdown: CancellationToken,
    /// The last minutes, for pages that open now.
    history: Arc<History>,
    /// The dashboard's session cookies.
    sessions: Arc<session::Sessions>,
    /// The port is bound to a loopback address: what it shows without a
    /// token is for this host's own callers, addressed as such.
    loopback: bool,
}

/// The HTTP port from the moment it is bound: the broker's start-up work
/// (its tenants, the metrics' label sets, the state directory) runs after
/// the port is bound and may take seconds, and an orchestrator probing
/// meanwhile must get an answer, not a connection that never answers.
/// Until [`Port::serve`] installs the broker's routes it answers
/// `/healthz` 200 (the process is alive), `/readyz` 503 saying what the
/// start is doing, and every other path 503 "starting" with a
/// `Retry-After`. The switch is per request: a connection kept alive
/// from before (a scraper's) gets the broker's routes once they are in.
pub(crate) struct Port {
    /// The broker's routes, once it has started.
    serving: Arc<OnceLock<Router>>,
    /// What the start is doing, for `/readyz`.
    stage: Arc<Mutex<String>>,
    /// Ends the accept loop (and the dashboard's history task).
    stop: CancellationToken,
    /// Bound to a loopback address (see [`Http::loopback`]).
    loopback: bool,
}

impl Port {
    /// Serves `listener` at once (the start-up answers), until `stop` is
    /// cancelled; the task ends once the open connections have finished.
    pub(crate) fn open(
        listener: TcpListener,
        max_connections: usize,
        stop: CancellationToken,
    ) -> (Port, JoinHandle<()>) {
        let port = Port {
            serving: Arc::default(),
            stage: Arc::new(Mutex::new("setting up".to_owned())),
            stop: stop.clone(),
            loopback: listener.local_addr().is_ok_and(|a| a.ip().is_loopback()),
        };
        let starting = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(starting::starting_readyz))
            .fallback(starting::starting_other)
            .with_state(port.stage.clone());
        let serving = port.serving.clone();
        // Each request goes to the broker's routes if they are in, else to
        // the start-up answers.
        let app = Router::new().fallback(move |request: axum::extract::Request| {
            let mut router = serving.get().unwrap_or(&starting).clone();
            async move {
                match tower::Service::call(&mut router, request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            }
        });
        let task = tokio::spawn(connections::accept(
            listener,
            app,
            max_connections.min(connections::MAX_HTTP_CONNECTIONS),
            stop,
        ));
        (port, task)
    }

    /// A handle that sets what `/readyz` says the start is doing.
    pub(crate) fn stage(&self) -> StartStage {
        StartStage(self.stage.clone())
    }

    /// Installs the broker's routes: `/metrics`, the dashboard and its
    /// feed, `/healthz`, and `/readyz` answering 503 from when `shutdown`
    /// (the broker's) is cancelled, so orchestrators see the drain.
    pub(crate) fn serve(
        &self,
        registry: Arc<Registry>,
        broker: Broker,
        overload: Arc<Overload>,
        shutdown: CancellationToken,
    ) {
        let auth = overload.auth().clone();
        let history = History::spawn(broker.clone(), self.stop.clone());
        let sessions = Arc::new(session::Sessions::new(broker.state_dir()));
        let state = Http {
            registry,
            broker,
            auth,
            overload,
            shutdown,
            history,
            sessions,
            loopback: self.loopback,
        };
        let app = Router::new()
            .route("/", get(index))
            .route("/dashboard.js", get(script))
            .route("/dashboard-feed.js", get(feed_script))
            .route("/dashboard.css", get(style))
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/events", get(events))
            .route(
                "/session",
                axum::routing::post(open_session).delete(close_session),
            )
            .with_state(state);
        if self.serving.set(app).is_err() {
            tracing::error!("the HTTP port's routes were installed twice; the first are kept");
        }
    }
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", DASHBOARD_JS)
}

async fn feed_script() -> Response {
    asset("text/javascript; charset=utf-8", DASHBOARD_FEED_JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", DASHBOARD_CSS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// The metrics as OpenMetrics when the scraper accepts it (Prometheus
/// does), else as Prometheus text.
async fn metrics(State(http): State<Http>, headers: HeaderMap) -> Response {
    if http.loopback && !addressed_to_an_ip_or_localhost(&headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            "on a loopback address the metrics answer only requests addressed to localhost \
             or an IP address (a page elsewhere must not read them by DNS rebinding); scrape \
             127.0.0.1 or localhost",
        );
    }
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let mut text = String::with_capacity(16 * 1024);
    let (encoded, content_type) = if openmetrics {
        (
            prometheus_client::encoding::text::encode(&mut text, &http.registry),
            OPENMETRICS_TYPE,
        )
    } else {
        (
            prometheus_client::encoding::prometheus_text::encode(&mut text, &http.registry),
            PROMETHEUS_TYPE,
        )
    };
    match encoded {
        Ok(()) => ([(header::CONTENT_TYPE, content_type)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics\n",
            )
                .into_response()
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(http): State<Http>) -> Response {
    if http.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if let Some(why) = http.broker.not_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response()
    } else {
        "ready\n".into_response()
    }
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    token: String,
}

/// The session cookie's name is this, then the port the browser
/// addressed: browsers scope cookies by host name only, and two brokers'
/// dashboards on one host (or two tunnels) keep theirs apart.
const SESSION_COOKIE: &str = "qb_session_";

/// The caller, by the token in `Authorization`, else in `?token=`, else by
/// the session cookie; or the refusal to answer with.
fn caller(
    http: &Http,
    peer: SocketAddr,
    headers: &HeaderMap,
    query_token: &str,
) -> Result<crate::auth::Principal, Box<Response>> {
    let bearer = (!query_token.is_empty()).then(|| format!("Bearer {query_token}"));
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .or(bearer.as_deref());
    let cookie = session_cookie(headers);
    if (authorization.is_some() || cookie.is_some())
        && !http.auth.is_open()
        && !peer.ip().to_canonical().is_loopback()
    {
        return Err(Box::new(refuse(
            StatusCode::UNAUTHORIZED,
            "a token sent over plain HTTP from another host is refused (it crossed the network \
             in the clear; rotate it): open the dashboard on the broker's host, or through an \
             SSH tunnel or a TLS-terminating proxy there",
        )));
    }
    if http.auth.is_open() && !addressed_to_an_ip_or_localhost(headers) {
        return Err(Box::new(refuse(
            StatusCode::FORBIDDEN,
            "with no [[auth.tokens]] the event feed answers only requests addressed to \
             localhost or an IP address (a page elsewhere must not reach it by DNS \
             rebinding); configure tokens to serve it under a name",
        )));
    }
    if authorization.is_none() && !http.auth.is_open() {
        if let Some(value) = cookie {
            return http.sessions.check(&value, &http.auth).ok_or_else(|| {
                Box::new(refuse(
                    StatusCode::UNAUTHORIZED,
                    "the dashboard's session has expired, or its token was removed or \
                     replaced: open the page again with #token=... in its address",
                ))
            });
        }
    }
    http.auth
        .authenticate(authorization)
        .map_err(|e| Box::new(refuse(StatusCode::UNAUTHORIZED, &auth_message(&e))))
}

/// The session cookie's value, if the request carries one.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    let name = cookie_name(headers);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(&name)?.strip_prefix('='))
        .map(str::to_owned)
        .filter(|t| !t.is_empty())
}

/// The session cookie's name for the port in the request's `Host` (80
/// without one).
fn cookie_name(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let port = host
        .rsplit_once(':')
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.len() <= 5)
        .unwrap_or("80");
    format!("{SESSION_COOKIE}{port}")
}

/// `Set-Cookie` for the session `value` (`None`: clear it). `Secure` when
/// a TLS-terminating proxy says the page came over https.
fn set_cookie(headers: &HeaderMap, value: Option<&str>) -> Option<axum::http::HeaderValue> {
    let secure = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let cookie = format!(
        "{}={}; Path=/events; HttpOnly; SameSite=Strict; Max-Age={}{}",
        cookie_name(headers),
        value.unwrap_or(""),
        value.map_or(0, |_| session::SESSION_TTL.as_secs()),
        if secure { "; Secure" } else { "" }
    );
    axum::http::HeaderValue::from_str(&cookie).ok()
}

/// Trades the token in `Authorization` for a session cookie the page's
/// `EventSource` sends to `/events` (it cannot send headers): 204 with the
/// cookie, or the refusal `/events` would give. In open mode there is
/// nothing to trade: 204 without a cookie.
async fn open_session(
    State(http): State<Http>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if headers.get(header::AUTHORIZATION).is_none() && !http.auth.is_open() {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "POST /session takes the token as Authorization: Bearer TOKEN",
        );
    }
    let who = match caller(&http, peer, &headers, "") {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    if !http.auth.is_open() && !http.sessions.available() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the broker could not make a key for the dashboard's sessions at start \
             (see its log): restart it",
        );
    }
    // (Open mode's caller has no token: nothing to keep.)
    match new_session(&http, &headers, &who) {
        Some(v) => (StatusCode::NO_CONTENT, [(header::SET_COOKIE, v)]).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

/// `Set-Cookie` for a new session of `who`'s token (`None` without one).
fn new_session(
    http: &Http,
    headers: &HeaderMap,
    who: &crate::auth::Principal,
) -> Option<axum::http::HeaderValue> {
    let index = who.token_index()?;
    let (_, hash) = http.auth.token_at(index)?;
    set_cookie(headers, Some(&http.sessions.issue(index, &hash)?))
}

/// Ends the page's session (clears its cookie).
async fn close_session(headers: HeaderMap) -> Response {
    match set_cookie(&headers, None) {
        Some(v) => (StatusCode::NO_CONTENT, [(header::SET_COOKIE, v)]).into_response(),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn events(
    State(http): State<Http>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                &format!(
                    "{}: /events takes ?tenant=ID and ?token=TOKEN, each at most once",
                    crate::error::clip_plain(&e.body_text())
                ),
            )
        }
    };
    let who = match caller(&http, peer, &headers, &q.token) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    // A feed opened with the session renews it.
    let by_session =
        !http.auth.is_open() && headers.get(header::AUTHORIZATION).is_none() && q.token.is_empty();
    let renewed = by_session
        .then(|| new_session(&http, &headers, &who))
        .flatten();
    let tenant = (!q.tenant.is_empty()).then_some(q.tenant.as_str());
    if let Some(t) = tenant {
        if let Err(e) = who.may_access(t) {
            return refuse(StatusCode::FORBIDDEN, &e.to_string());
        }
    }
    let permit = match http
        .overload
        .open_watch(&who, Some(&PeerInfo::new(Some(peer), false)))
    {
        Ok(permit) => permit,
        Err(status) => {
            let mut refused = refuse(StatusCode::TOO_MANY_REQUESTS, status.message());
            // HTTP says when to come back in whole seconds.
            let ms = status
                .metadata()
                .get(crate::grpc::RETRY_AFTER_MS)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .unwrap_or(1_000);
            refused
                .headers_mut()
                .insert(header::RETRY_AFTER, ms.div_ceil(1_000).max(1).into());
            return refused;
        }
    };
    let only = tenant.map(str::to_owned);
    let viewer = who.clone();
    let shows = move |t: &str| only.as_deref().map_or_else(|| viewer.sees(t), |o| o == t);
    // Which instances exist now: the feed's first `instances` event, and
    // the instances whose last minutes it sends, read up to now (not to the
    // last step) and before the live feed's first snapshot, so that
    // snapshot is never older than the history.
    let (live, first_census) = census(&http.broker, &shows);
    http.history.sample(&http.broker, true);
    let now = tokio::time::Instant::now();
    let past: Vec<Result<Event, Infallible>> = http
        .history
        .series(&live, now)
        .iter()
        .map(|s| Ok(Event::default().event("history").data(s.to_json(now))))
        .collect();
    let rx = match http
        .broker
        .watch_every(tenant, |t| who.sees(t), FEED_COALESCE)
    {
        Ok(rx) => rx,
        // Another broker of the cluster leads it (or none does yet): a
        // retry may find it here, or the message says where it is led.
        Err(crate::error::BrokerError::NotLeader { tenant, leader }) => {
            // Its leader's gRPC address is what the cluster knows: the
            // dashboard is on that broker's HTTP port.
            let said = match leader {
                Some(url) => format!(
                    "this broker does not lead tenant {}; its leader is the broker at {} \
                     (its gRPC address): open the dashboard on that broker's HTTP port",
                    crate::error::clip(&tenant),
                    crate::error::clip(&url)
                ),
                None => crate::error::BrokerError::NotLeader {
                    tenant,
                    leader: None,
                }
                .to_string(),
            };
            let mut refused = refuse(StatusCode::SERVICE_UNAVAILABLE, &said);
            refused.headers_mut().insert(
                header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("5"),
            );
            return refused;
        }
        // Stopping: another broker (or this one restarted) will serve it.
        Err(e @ crate::error::BrokerError::ShuttingDown) => {
            let mut refused = refuse(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            refused.headers_mut().insert(
                header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("5"),
            );
            return refused;
        }
        Err(e) => return refuse(StatusCode::NOT_FOUND, &e.to_string()),
    };
    let clock = http.broker.clock();
    let broker = http.broker.clone();
    // Which instances exist (Watch announces no removals: an idle OAuth
    // client's instance is dropped and re-created at 0) and what the
    // dropped ones had counted: at once, then every INSTANCES_EVERY, read
    // as each is sent.
    let later = futures_util::stream::unfold((), move |()| {
        let (broker, shows) = (broker.clone(), shows.clone());
        async move {
            tokio::time::sleep(INSTANCES_EVERY).await;
            Some((Ok(census(&broker, &shows).1), ()))
        }
    });
    // A feed of one tenant ends when it is led elsewhere: the page
    // reconnects, and is told where it is led (503).
    let live =
        tokio_stream::StreamExt::map_while(ReceiverStream::new(rx), Result::ok).map(move |s| {
            Ok::<_, Infallible>(Event::default().event("bucket").data(record(&s, clock)))
        });
    // The feed ends with the live part (the tenant led elsewhere, or the
    // broker shutting down), the census with it, so the page reconnects
    // and the HTTP port can shut down.
    let live = live
        .map(Some)
        .chain(futures_util::stream::once(std::future::ready(None)));
    let later = later
        .take_until(http.shutdown.clone().cancelled_owned())
        .map(Some);
    let merged = futures_util::stream::select(later, live)
        .take_while(|e| std::future::ready(e.is_some()))
        .filter_map(std::future::ready);
    let stream = futures_util::stream::iter(past)
        .chain(futures_util::stream::once(async { Ok(first_census) }))
        .chain(merged)
        .map(move |e| {
            // The feed holds its place under the cap until it ends.
            let _open = &permit;
            e
        });
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    if let Some(cookie) = renewed {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

/// Whether the request's `Host` is `localhost` or an IP address (with or
/// without a port), not a name a browser may have resolved to this host.
fn addressed_to_an_ip_or_localhost(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    // "[::1]:9464", "127.0.0.1:9464", "localhost", "::1"
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None if host.matches(':').count() > 1 => host,
        None => host.split(':').next().unwrap_or_default(),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

fn auth_message(e: &AuthError) -> String {
    // (gRPC's wording, "metadata", is not this port's.)
    let why = match e {
        AuthError::Missing => "no token".to_owned(),
        other => other.to_string(),
    };
    format!(
        "{why}; the dashboard takes the token as #token=... in its address, \
         the event feed as Authorization: Bearer, the session cookie (POST /session) \
         or ?token="
    )
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, format!("{why}\n")).into_response()
}

/// Every instance of the tenants `shows` accepts, and the `instances`
/// event that says so (`"tenant/bucket/oauth client"`), with per bucket
/// what its dropped instances had counted and each tenant's classes.
fn census(broker: &Broker, shows: &dyn Fn(&str) -> bool) -> (HashSet<history::Key>, Event) {
    let (live, retired) = broker.list_with_retired();
    let live: Vec<&TenantBucketStatus> = live.iter().filter(|s| shows(&s.tenant)).collect();
    let set: HashSet<history::Key> = live.iter().map(|s| history::key_of(s)).collect();
    let mut keys: Vec<String> = set
        .iter()
        .map(|(tenant, bucket, client)| format!("{tenant}/{bucket}/{client}"))
        .collect();
    keys.sort_unstable();
    let retired: Vec<serde_json::Value> = retired
        .iter()
        .filter(|(t, _, _)| shows(t))
        .map(|(t, b, r)| {
            serde_json::json!({
                "tenant": t, "bucket": b, "granted": r.granted, "throttled": r.throttled,
            })
        })
        .collect();
    // Each shown tenant's classes: a class may not take of a bucket what
    // the classes served before it keep back (their reserves), so the page
    // can tell a bucket its waiters cannot draw from.
    let mut tenants: Vec<&str> = live.iter().map(|s| s.tenant.as_str()).collect();
    tenants.dedup();
    let classes: serde_json::Map<String, serde_json::Value> = tenants
        .into_iter()
        .filter(|t| shows(t))
        .filter_map(|t| {
            let (classes, _) = broker.classes(t).ok()?;
            let list: Vec<serde_json::Value> = classes
                .iter()
                .map(
                    |c| serde_json::json!({"name": c.name, "order": c.order, "reserve": c.reserve}),
                )
                .collect();
            Some((t.to_owned(), serde_json::Value::from(list)))
        })
        .collect();
    let event = Event::default().event("instances").data(
        serde_json::json!({ "instances": keys, "retired": retired, "classes": classes })
            .to_string(),
    );
    (set, event)
}

/// One bucket instance as the dashboard reads it (times relative to `at_ms`,
/// so the page needs no clock of its own in sync).
fn record(s: &TenantBucketStatus, clock: Clock) -> String {
    let b = &s.status;
    let frozen_ms = b
        .frozen_until
        .map_or(0, |u| millis(u.saturating_duration_since(s.at)));
    serde_json::json!({
        "tenant": s.tenant,
        "bucket": b.bucket,
        "scope": b.scope.as_str(),
        "oauth_client": b.oauth_client.as_deref().unwrap_or(""),
        "configured_per_min": b.configured_rate_per_min,
        "effective_per_min": b.effective_rate_per_min,
        "learned_per_min": b.learned_limit_per_min,
        "burst": b.burst,
        "tokens": b.tokens_available,
        "in_flight": b.in_flight,
        "held_over": b.held_over,
        "max_in_flight": b.max_in_flight,
        "waiting": b.waiting,
        "paused": b.paused.is_some(),
        "granted_total": b.granted_total,
        "throttled_total": b.throttled_total,
        "reports_total": b.reports_total,
        "frozen_ms": frozen_ms,
        "at_ms": clock.unix_ms(s.at),
    })
    .to_string()
}
