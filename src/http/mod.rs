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
//!
//! Here: the port, its routes, the assets, `/metrics` and the probes;
//! `access` who a caller is (token or session cookie) and `/session`;
//! `feed` the `/events` feed; `history` the last minutes; `session` the
//! cookies' keys; `connections` the accept loop; `starting` the answers
//! while the broker starts.

use crate::auth::Authenticator;
use crate::broker::Broker;
use crate::grpc::Overload;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use history::History;
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod access;
mod connections;
mod feed;
mod history;
mod session;
mod starting;
use access::{addressed_to_an_ip_or_localhost, close_session, open_session};
use feed::events;
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
    } else if let Some(but) = http.broker.ready_but() {
        format!("ready, but {but}\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, format!("{why}\n")).into_response()
}
