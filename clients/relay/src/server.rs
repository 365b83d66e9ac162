//! The relay's HTTP side: `POST /records` (the Data Action's intake:
//! credentials, the record's checks, the durable store, 202 with the
//! record's id), `GET /status` (the queue's figures as JSON), `GET
//! /metrics` (Prometheus) and `GET /healthz`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use gc_upstream::Upstream;
use serde_json::json;
use tokio::sync::Notify;

use crate::error::RelayError;
use crate::metrics::Metrics;
use crate::queue::{Queue, Stored};
use crate::record::{Intake, Invalid, NewRecord};

/// The header that carries the shared secret.
pub const SECRET_HEADER: &str = "x-relay-secret";

/// Who may post records: Basic credentials, a shared secret, or both.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    /// `user:password` for Basic auth.
    pub basic: Option<(String, String)>,
    /// The value of the [`SECRET_HEADER`] header.
    pub secret: Option<String>,
}

impl Auth {
    /// Whether anything is configured (the relay refuses to start open).
    pub fn is_set(&self) -> bool {
        self.basic.is_some() || self.secret.is_some()
    }

    fn allows(&self, headers: &HeaderMap) -> bool {
        if let (Some(secret), Some(given)) = (&self.secret, headers.get(SECRET_HEADER)) {
            if same(secret.as_bytes(), given.as_bytes()) {
                return true;
            }
        }
        let Some((user, password)) = &self.basic else {
            return false;
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            // The scheme's name is case-insensitive (RFC 9110).
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
            .and_then(|(_, b)| {
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            });
        let expected = format!("{user}:{password}");
        given.is_some_and(|g| same(expected.as_bytes(), &g))
    }
}

/// Compares secrets in time that does not depend on where they differ
/// (a dependency for these few lines is not worth it).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct App {
    pub(crate) queue: Queue,
    pub(crate) auth: Arc<Auth>,
    pub(crate) metrics: Metrics,
    pub(crate) upstream: Upstream,
    pub(crate) max_record_bytes: usize,
    pub(crate) full_retry_after_s: u64,
    /// Tells the drain a record arrived.
    pub(crate) wake: Arc<Notify>,
}

pub(crate) fn router(app: App) -> Router {
    // Room for the JSON around a record of the largest size.
    let limit = app.max_record_bytes * 2 + 4096;
    Router::new()
        .route(
            "/records",
            post(intake).route_layer(axum::middleware::from_fn_with_state(
                app.clone(),
                authorized,
            )),
        )
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(health))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

/// 200 while the queue stores records; 503 while its last write failed
/// (disk full, database down), so an orchestrator sees what intake's 503s
/// say.
async fn health(State(app): State<App>) -> Response {
    if app.queue.is_failing() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the queue cannot store records; see the relay's log\n",
        )
            .into_response()
    } else {
        "ok".into_response()
    }
}

async fn intake(State(app): State<App>, body: Result<Bytes, BytesRejection>) -> Response {
    // A body over the buffer limit is refused before it is read whole:
    // answered as every other refusal is (JSON), not in axum's words.
    let body = match body {
        Ok(body) => body,
        Err(e) => {
            app.metrics.intake("invalid");
            return if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                RelayError::Invalid(Invalid::TooLarge(app.max_record_bytes)).into_response()
            } else {
                RelayError::Body(e.body_text().chars().take(200).collect()).into_response()
            };
        }
    };
    let started = Instant::now();
    let answer = accept(&app, &body).await;
    let outcome = match &answer {
        Ok(Stored::New(_)) => "accepted",
        Ok(Stored::Duplicate(_)) => "duplicate",
        Ok(Stored::Conflict(_)) => "conflict",
        Ok(Stored::Full) | Err(RelayError::Full { .. }) => "full",
        Err(RelayError::Unauthorized) => "unauthorized",
        Err(RelayError::Invalid(_) | RelayError::Body(_)) => "invalid",
        Err(_) => "unavailable",
    };
    app.metrics.intake(outcome);
    match answer {
        Ok(Stored::New(id)) | Ok(Stored::Duplicate(id)) => {
            app.metrics
                .ack_seconds
                .observe(started.elapsed().as_secs_f64());
            if outcome == "accepted" {
                app.wake.notify_one();
            }
            let duplicate = outcome == "duplicate";
            (
                StatusCode::ACCEPTED,
                axum::Json(json!({ "recordId": id, "duplicate": duplicate })),
            )
                .into_response()
        }
        Ok(Stored::Conflict(id)) => (
            StatusCode::CONFLICT,
            // The shape of every other refusal (`status`, `message`), and
            // the record the key is taken by.
            axum::Json(json!({
                "status": StatusCode::CONFLICT.as_u16(),
                "message": "this idempotencyKey was stored before with another method, path \
                            or body; this record was not stored: give each write its own key",
                "recordId": id,
            })),
        )
            .into_response(),
        Ok(Stored::Full) => RelayError::Full {
            retry_after_s: app.full_retry_after_s,
        }
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Refuses a caller without the intake's credentials before its body is
/// read (an unauthenticated caller must not make the relay buffer it).
async fn authorized(
    State(app): State<App>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !app.auth.allows(request.headers()) {
        app.metrics.intake("unauthorized");
        return RelayError::Unauthorized.into_response();
    }
    next.run(request).await
}

async fn accept(app: &App, body: &[u8]) -> Result<Stored, RelayError> {
    let intake = parse_intake(body).map_err(RelayError::Body)?;
    let record = NewRecord::check(intake, app.max_record_bytes)?;
    app.queue.enqueue(record).await
}

/// The record in `body`, or why it is not one. A body that is JSON but not
/// an object is said to be so: serde would read an array as the record's
/// fields in order and call its first element a mistyped field.
fn parse_intake(body: &[u8]) -> Result<Intake, String> {
    let kind = match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => Some("an array"),
        Some(b'"') => Some("a string"),
        Some(b't' | b'f') => Some("a boolean"),
        Some(b'n') => Some("null"),
        Some(b'-' | b'0'..=b'9') => Some("a number"),
        _ => None,
    };
    match kind {
        Some(kind) => match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Ok(_) => Err(format!(
                "the body is {kind}, not a JSON object: one record is one object, \
                 {{\"idempotencyKey\": …, \"method\": …, \"path\": …}}"
            )),
            Err(e) => Err(body_error(&e)),
        },
        None => serde_json::from_slice(body).map_err(|e| body_error(&e)),
    }
}

/// Why a body is not a record, in serde's words where they name only the
/// record's own fields (a missing field, what a field expects), never the
/// input (an unknown field's name, a mistyped value are left out).
fn body_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let message = e.to_string();
    // serde's message ends with the position, said below.
    let said = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(said, _)| said);
    let what = match e.classify() {
        Category::Io => "unreadable".to_owned(),
        Category::Syntax => "not JSON".to_owned(),
        Category::Eof => "cut short".to_owned(),
        // "missing field `idempotencyKey`": the name is the record's.
        Category::Data if said.starts_with("missing field `") => said.to_owned(),
        // "unknown field `<input>`, expected one of `idempotencyKey`, ..."
        // or "invalid type: string \"<input>\", expected i64": what follows
        // the last ", expected " is serde's, what precedes it may be input.
        Category::Data => {
            let kind = if said.starts_with("unknown field") {
                "unknown field"
            } else if said.starts_with("invalid type") {
                "mistyped field"
            } else {
                "invalid field"
            };
            match said.rsplit_once(", expected ") {
                Some((_, expected)) => format!("{kind}, expected {expected}"),
                None => kind.to_owned(),
            }
        }
    };
    format!(
        "{} at line {} column {}",
        what.chars().take(300).collect::<String>(),
        e.line(),
        e.column()
    )
}

async fn status(State(app): State<App>) -> Response {
    match app.queue.depth().await {
        Ok(depth) => {
            // The relay's count first: each answer it counts was counted
            // by the upstream client before.
            let client_4xx = app.metrics.client_4xx.get();
            let s = app.upstream.stats();
            axum::Json(json!({
                "queue": depth,
                "upstream": {
                    "calls": s.calls,
                    "ok_2xx": s.ok_2xx,
                    "client_4xx": client_4xx,
                    "retried_4xx": s.client_4xx.saturating_sub(client_4xx),
                    "throttled_429": s.throttled_429,
                    "server_5xx": s.server_5xx,
                    "transport_errors": s.transport_errors,
                    "retries": s.retries,
                    "fallback_leases": s.fallback_leases,
                    "logins": s.logins,
                },
            }))
            .into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(app): State<App>) -> Response {
    match app.queue.depth().await {
        Ok(depth) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            app.metrics.encode(&depth),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_error_of(body: &str) -> String {
        let Err(e) = serde_json::from_str::<Intake>(body) else {
            panic!("{body} is a record")
        };
        body_error(&e)
    }

    #[test]
    fn a_body_error_names_the_field_but_never_echoes_the_input() {
        let missing = body_error_of(r#"{"method": "POST", "path": "/api/v2/x", "body": {}}"#);
        assert!(
            missing.starts_with("missing field `idempotencyKey` at line 1 column"),
            "{missing}"
        );
        let unknown = body_error_of(r#"{"idempotencyKey": "k", "secret-xyz": 1}"#);
        assert!(!unknown.contains("secret-xyz"), "{unknown}");
        assert!(
            unknown.starts_with("unknown field, expected one of `idempotencyKey`"),
            "{unknown}"
        );
        let mistyped = body_error_of(r#"{"idempotencyKey": 5, "method": "POST", "path": "/x"}"#);
        assert!(
            mistyped.starts_with("mistyped field, expected a string at line 1"),
            "{mistyped}"
        );
        let echoed = body_error_of(r#""secret, expected x""#);
        assert!(!echoed.contains("secret"), "{echoed}");
        let long = format!(r#"{{"{}": 1}}"#, "x".repeat(10_000));
        assert!(body_error_of(&long).len() < 400);
        assert!(body_error_of("{").starts_with("cut short"));
        assert!(body_error_of("nope").starts_with("not JSON"));
    }

    #[test]
    fn a_body_that_is_json_but_not_an_object_says_so() {
        for (body, kind) in [
            ("[1, 2]", "an array"),
            (" \"k\"", "a string"),
            ("42", "a number"),
            ("true", "a boolean"),
            ("null", "null"),
        ] {
            let Err(e) = parse_intake(body.as_bytes()) else {
                panic!("{body} taken as a record")
            };
            assert!(
                e.starts_with(&format!("the body is {kind}, not a JSON object")),
                "{body}: {e}"
            );
        }
        // Not JSON at all, or an object: serde's own account, as before.
        assert!(parse_intake(b"[1, 2").unwrap_err().starts_with("cut short"));
        assert!(parse_intake(b"{\"method\": \"POST\"}")
            .unwrap_err()
            .starts_with("missing field"));
    }

    #[test]
    fn basic_and_secret_are_checked() {
        let auth = Auth {
            basic: Some(("flow".into(), "pw".into())),
            secret: Some("s3cret".into()),
        };
        let mut h = HeaderMap::new();
        assert!(!auth.allows(&h));
        h.insert(SECRET_HEADER, "s3cret".parse().unwrap());
        assert!(auth.allows(&h));
        h.insert(SECRET_HEADER, "s3creT".parse().unwrap());
        assert!(!auth.allows(&h));
        // "flow:pw"
        h.insert(header::AUTHORIZATION, "Basic Zmxvdzpwdw==".parse().unwrap());
        assert!(auth.allows(&h));
        h.insert(header::AUTHORIZATION, "Basic Zmxvdzpwdg==".parse().unwrap());
        assert!(!auth.allows(&h));
    }
}
