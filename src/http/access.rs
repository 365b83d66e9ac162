//! Who calls the HTTP port: the token (`Authorization`, `?token=`) or the
//! dashboard's session cookie a caller is known by, the `/session`
//! handlers that trade a token for that cookie and end it, and the
//! loopback port's check that a request was addressed to localhost or an
//! IP (a page elsewhere must not reach it by DNS rebinding). A caller
//! refused (401, 403) is logged with its address, sampled as gRPC's
//! refusals are ([`refuse_caller`]).

use super::{refuse, session, Http};
use crate::auth::AuthError;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::time::Duration;

/// The session cookie's name is this, then the port the browser
/// addressed: browsers scope cookies by host name only, and two brokers'
/// dashboards on one host (or two tunnels) keep theirs apart.
const SESSION_COOKIE: &str = "qb_session_";

/// Callers refused, for a log line at info at most once a second (each at
/// debug), as the gRPC port logs its refusals: someone trying tokens
/// thousands of times a second must not fill the disk. One for the
/// process, like the gRPC port's count of failed handshakes.
static REFUSED: crate::grpc::Throttled = crate::grpc::Throttled::new(Duration::from_secs(1));

/// Refuses a caller of `path` from `peer` (a 401 or 403: a token or a
/// session that is missing, wrong, or not allowed there) with `why`, and
/// logs it with the peer's address so a refused login can be traced.
pub(super) fn refuse_caller(
    path: &'static str,
    peer: SocketAddr,
    status: StatusCode,
    why: &str,
) -> Response {
    let ip = peer.ip().to_canonical();
    let status_code = status.as_u16();
    match REFUSED.note() {
        Some(n) => tracing::info!(
            path,
            status = status_code,
            peer = %ip,
            reason = why,
            refused_since_last_line = n,
            "HTTP port: refused"
        ),
        None => {
            tracing::debug!(path, status = status_code, peer = %ip, reason = why, "HTTP port: refused")
        }
    }
    refuse(status, why)
}

/// The caller, by the token in `Authorization`, else in `?token=`, else by
/// the session cookie; or the refusal to answer with.
pub(super) fn caller(
    http: &Http,
    path: &'static str,
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
        return Err(Box::new(refuse_caller(
            path,
            peer,
            StatusCode::UNAUTHORIZED,
            "a token sent over plain HTTP from another host is refused (it crossed the network \
             in the clear; rotate it): open the dashboard on the broker's host, or through an \
             SSH tunnel or a TLS-terminating proxy there",
        )));
    }
    if http.auth.is_open() && !addressed_to_an_ip_or_localhost(headers) {
        return Err(Box::new(refuse_caller(
            path,
            peer,
            StatusCode::FORBIDDEN,
            "with no [[auth.tokens]] the event feed answers only requests addressed to \
             localhost or an IP address (a page elsewhere must not reach it by DNS \
             rebinding); configure tokens to serve it under a name",
        )));
    }
    if authorization.is_none() && !http.auth.is_open() {
        if let Some(value) = cookie {
            return http.sessions.check(&value, &http.auth).ok_or_else(|| {
                Box::new(refuse_caller(
                    path,
                    peer,
                    StatusCode::UNAUTHORIZED,
                    "the dashboard's session has expired, or its token was removed or \
                     replaced: open the page again with #token=... in its address",
                ))
            });
        }
    }
    http.auth.authenticate(authorization).map_err(|e| {
        Box::new(refuse_caller(
            path,
            peer,
            StatusCode::UNAUTHORIZED,
            &auth_message(&e),
        ))
    })
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
pub(super) async fn open_session(
    State(http): State<Http>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if headers.get(header::AUTHORIZATION).is_none() && !http.auth.is_open() {
        return refuse_caller(
            "/session",
            peer,
            StatusCode::UNAUTHORIZED,
            "POST /session takes the token as Authorization: Bearer TOKEN",
        );
    }
    let who = match caller(&http, "/session", peer, &headers, "") {
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
pub(super) fn new_session(
    http: &Http,
    headers: &HeaderMap,
    who: &crate::auth::Principal,
) -> Option<axum::http::HeaderValue> {
    let index = who.token_index()?;
    let (_, hash) = http.auth.token_at(index)?;
    set_cookie(headers, Some(&http.sessions.issue(index, &hash)?))
}

/// Ends the page's session (clears its cookie).
pub(super) async fn close_session(headers: HeaderMap) -> Response {
    match set_cookie(&headers, None) {
        Some(v) => (StatusCode::NO_CONTENT, [(header::SET_COOKIE, v)]).into_response(),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Whether the request's `Host` is `localhost` or an IP address (with or
/// without a port), not a name a browser may have resolved to this host.
pub(super) fn addressed_to_an_ip_or_localhost(headers: &HeaderMap) -> bool {
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
