//! What the HTTP port answers while the broker starts (see `Port`):
//! `/readyz` 503 with what the start is doing, every other path but the
//! probes 503 "starting".

use super::refuse;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::{Arc, Mutex, PoisonError};

/// Sets what the HTTP port's `/readyz` says while the broker starts.
#[derive(Clone)]
pub(crate) struct StartStage(pub(super) Arc<Mutex<String>>);

impl StartStage {
    /// A stage of its own, for a broker without an HTTP port (the gRPC
    /// port's start-up answers say it too).
    pub(crate) fn new() -> StartStage {
        StartStage(Arc::new(Mutex::new("setting up".to_owned())))
    }

    /// From now on `/readyz` answers "starting: {what}".
    pub(crate) fn set(&self, what: &str) {
        let mut stage = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        what.clone_into(&mut stage);
    }

    /// What the start is doing now.
    pub(crate) fn now(&self) -> String {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// `/readyz` while the broker starts: 503 and what it is doing.
pub(super) async fn starting_readyz(State(stage): State<Arc<Mutex<String>>>) -> Response {
    let what = stage.lock().unwrap_or_else(PoisonError::into_inner).clone();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("starting: {what}\n"),
    )
        .into_response()
}

/// Every path but the probes while the broker starts: 503, come back soon.
pub(super) async fn starting_other() -> Response {
    let mut response = refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "starting: the broker is not serving yet (/healthz and /readyz answer meanwhile); \
         retry once /readyz says ready",
    );
    response.headers_mut().insert(
        header::RETRY_AFTER,
        axum::http::HeaderValue::from_static("1"),
    );
    response
}
