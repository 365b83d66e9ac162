//! The Genesys-style error answers: the JSON error body every refusal and
//! failure carries, the 429 of a refused request, and the 404 of an org the
//! simulator does not have.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::data::uuid_like;
use crate::org::Refusal;

/// A Genesys-style error body.
pub(super) fn error_json(
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

pub(super) fn error_body(
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

pub(super) fn too_many(refusal: &Refusal) -> Response {
    error_body(
        StatusCode::TOO_MANY_REQUESTS,
        "too.many.requests",
        format!("Rate limit exceeded the maximum. [{}]", refusal.reason),
        Some((refusal.limit, &refusal.reason)),
    )
}

pub(super) fn unknown_org(org: &str) -> Response {
    error_body(
        StatusCode::NOT_FOUND,
        "not.found",
        format!("No org {org:?} here."),
        None,
    )
}
