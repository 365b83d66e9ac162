//! The HTTP port (`server.http_listen`): Prometheus `/metrics`, the live
//! dashboard at `/` with its server-sent event feed `/events`, and the
//! orchestrators' probes `/healthz` (the process answers) and `/readyz`
//! (it serves, and is not shutting down).
//!
//! `/metrics` and the probes need no token, like gRPC health. The event
//! feed shows tenants' buckets, so it follows the gRPC rules: with
//! `[[auth.tokens]]` configured it needs a token, shows only the tenants the
//! token is scoped to, and refuses a token sent from another host over this
//! plaintext port. A browser's `EventSource` cannot send headers, so the
//! page trades its token for a cookie first (`POST /session` with
//! `Authorization: Bearer`; the cookie is `HttpOnly`, `SameSite=Strict`,
//! sent to `/events` only), which keeps the token out of URLs and access
//! logs; `/events` takes `Authorization`, that cookie, or `?token=`. The dashboard's page and script
//! are static, embedded in the binary (no CDN: it works offline).
//!
//! The feed starts with what each visible instance showed over the last
//! minutes (`history`: one `history` event per instance), then is the
//! broker's Watch feed (a snapshot, then each bucket again when it changes,
//! coalesced): the page polls nothing.

use crate::auth::{AuthError, Authenticator};
use crate::broker::{Broker, TenantBucketStatus};
use crate::clock::{millis, Clock};
use crate::grpc::{Overload, PeerInfo};
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
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

mod history;

const INDEX_HTML: &str = include_str!("assets/index.html");
const DASHBOARD_JS: &str = include_str!("assets/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("assets/dashboard.css");
/// OpenMetrics text, for scrapers that ask for it.
const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Prometheus text format 0.0.4, for everyone else (promtool, curl).
const PROMETHEUS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// A comment on an idle feed this often, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

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
}

/// Serves the HTTP port on `listener` until `stop` is cancelled; `/readyz`
/// answers 503 from when `shutdown` (the broker's) is cancelled, so
/// orchestrators see the drain.
pub(crate) async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    broker: Broker,
    auth: Authenticator,
    overload: Arc<Overload>,
    shutdown: CancellationToken,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let history = History::spawn(broker.clone(), stop.clone());
    let state = Http {
        registry,
        broker,
        auth,
        overload,
        shutdown,
        history,
    };
    let app = Router::new()
        .route("/", get(index))
        .route("/dashboard.js", get(script))
        .route("/dashboard.css", get(style))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/events", get(events))
        .route("/session", axum::routing::post(session))
        .with_state(state);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { stop.cancelled().await })
    .await
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", DASHBOARD_JS)
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

/// The cookie the page's token is kept in (see [`session`]), followed by
/// the port the browser addressed: browsers scope cookies by host name
/// only, and two brokers' dashboards on one host (or two tunnels) must not
/// trade each other's tokens.
const SESSION_COOKIE: &str = "qb_token_";
/// How long the browser keeps it (a wallboard runs for weeks; a token
/// revoked before then is refused anyway).
const SESSION_MAX_AGE_S: u64 = 30 * 24 * 3600;

/// The caller, by the token in `Authorization`, else in the session cookie,
/// else in `?token=`; or the refusal to answer with.
fn caller(
    http: &Http,
    peer: SocketAddr,
    headers: &HeaderMap,
    query_token: &str,
) -> Result<crate::auth::Principal, Box<Response>> {
    let from_cookie = session_token(headers);
    let bearer = match (from_cookie, query_token) {
        (Some(t), _) => Some(format!("Bearer {t}")),
        (None, t) if !t.is_empty() => Some(format!("Bearer {t}")),
        _ => None,
    };
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .or(bearer.as_deref());
    if authorization.is_some() && !http.auth.is_open() && !peer.ip().to_canonical().is_loopback() {
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
    http.auth
        .authenticate(authorization)
        .map_err(|e| Box::new(refuse(StatusCode::UNAUTHORIZED, &auth_message(&e))))
}

/// The token in the session cookie, if the request carries one.
fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(&cookie_name(headers))?
                .strip_prefix('=')
        })
        .map(|v| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
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

/// Trades the token in `Authorization` for a session cookie the page's
/// `EventSource` sends to `/events` (it cannot send headers): 204 with the
/// cookie, or the refusal `/events` would give. In open mode there is
/// nothing to trade: 204 without a cookie.
async fn session(
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
    if let Err(refused) = caller(&http, peer, &headers, "") {
        return *refused;
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .trim();
    if http.auth.is_open() || token.is_empty() {
        return StatusCode::NO_CONTENT.into_response();
    }
    let value: String =
        percent_encoding::utf8_percent_encode(token, percent_encoding::NON_ALPHANUMERIC).collect();
    let cookie = format!(
        "{}={value}; Path=/events; HttpOnly; SameSite=Strict; Max-Age={SESSION_MAX_AGE_S}",
        cookie_name(&headers)
    );
    match axum::http::HeaderValue::from_str(&cookie) {
        Ok(v) => (StatusCode::NO_CONTENT, [(header::SET_COOKIE, v)]).into_response(),
        Err(_) => refuse(
            StatusCode::BAD_REQUEST,
            "the token cannot be kept in a cookie",
        ),
    }
}

async fn events(
    State(http): State<Http>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Response {
    let who = match caller(&http, peer, &headers, &q.token) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
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
        Err(status) => return refuse(StatusCode::TOO_MANY_REQUESTS, status.message()),
    };
    // The minutes before, of the instances there are now, read up to now
    // (not to the last step) and before the live feed's first snapshot, so
    // that snapshot is never older than the history.
    let live = match http.broker.list(tenant, |t| who.sees(t)) {
        Ok(list) => list.iter().map(history::key_of).collect(),
        Err(e) => return refuse(StatusCode::NOT_FOUND, &e.to_string()),
    };
    http.history.sample(&http.broker, true);
    let now = tokio::time::Instant::now();
    let past: Vec<Result<Event, Infallible>> = http
        .history
        .series(&live, now)
        .iter()
        .map(|s| Ok(Event::default().event("history").data(s.to_json(now))))
        .collect();
    let rx = match http.broker.watch(tenant, |t| who.sees(t)) {
        Ok(rx) => rx,
        Err(e) => return refuse(StatusCode::NOT_FOUND, &e.to_string()),
    };
    let clock = http.broker.clock();
    let stream = futures_util::stream::iter(past).chain(ReceiverStream::new(rx).map(move |s| {
        // The feed holds its place under the cap until it ends.
        let _open = &permit;
        Ok::<_, Infallible>(Event::default().event("bucket").data(record(&s, clock)))
    }));
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
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
    format!(
        "{e}; the dashboard takes the token as #token=... in its address, \
         the event feed as Authorization: Bearer, the session cookie (POST /session) \
         or ?token="
    )
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, format!("{why}\n")).into_response()
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
