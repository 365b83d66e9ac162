//! The relay's errors, and the one table that turns them into HTTP answers.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::record::Invalid;

/// Why a relay operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The database refused or could not be reached.
    #[error("queue database: could not {what}: {source}")]
    Db {
        /// What was being done.
        what: String,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// The queue's writer task has stopped (the relay is shutting down).
    #[error("the queue's writer has stopped")]
    WriterGone,
    /// A write failed; the details are in the log.
    #[error("the queue could not store the record; see the relay's log")]
    Unavailable,
    /// The record is not acceptable.
    #[error("{0}")]
    Invalid(#[from] Invalid),
    /// The body is not a record.
    #[error("the body is not a relay record (JSON with idempotencyKey, method, path, body, orderKey): {0}")]
    Body(String),
    /// No or wrong credentials.
    #[error("credentials required: Basic auth or the shared-secret header")]
    Unauthorized,
    /// The queue is full.
    #[error("the relay's queue is full; retry later")]
    Full {
        /// Seconds to wait.
        retry_after_s: u64,
    },
    /// The queue lacks a table or column `status` or `dlq` reads (it is
    /// migrated only by `serve`).
    #[error(
        "the queue has no {missing}: it was written by an older gc-relay (or is not a \
         gc-relay queue); run `gc-relay serve` with this version on it first"
    )]
    OlderQueue {
        /// The table, or `table.column`.
        missing: String,
    },
    /// Bad settings or arguments (at start): exit 2.
    #[error("settings: {0}")]
    Settings(String),
    /// The queue is not as the operation needs it (another relay holds
    /// the SQLite file, ids named that are not dead letters): not a
    /// mistake in the settings, and it may pass later.
    #[error("{0}")]
    State(String),
    /// The upstream caller could not be built.
    #[error("upstream: {0}")]
    Upstream(String),
    /// An I/O error (binding the listener).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

impl RelayError {
    /// The exit code of `gc-relay` failing with this error: 2 for a bad
    /// argument or setting, or a start-up check every record would fail
    /// (a refused tenant, token or client secret, a login host that
    /// refuses connections), as `gc-ingest` does; 1 for the rest, which
    /// may pass if run again (a database down, another relay holding the
    /// queue, ids that are not dead letters).
    pub fn exit_code(&self) -> u8 {
        match self {
            RelayError::Settings(_) | RelayError::Upstream(_) => 2,
            _ => 1,
        }
    }

    pub(crate) fn db(what: &str, source: sqlx::Error) -> RelayError {
        RelayError::Db {
            what: what.to_owned(),
            source,
        }
    }
}

impl IntoResponse for RelayError {
    fn into_response(self) -> Response {
        let (status, retry_after) = match &self {
            RelayError::Invalid(Invalid::TooLarge(_)) => (StatusCode::PAYLOAD_TOO_LARGE, None),
            RelayError::Invalid(_) | RelayError::Body(_) => (StatusCode::BAD_REQUEST, None),
            RelayError::Unauthorized => (StatusCode::UNAUTHORIZED, None),
            RelayError::Full { retry_after_s } => {
                (StatusCode::SERVICE_UNAVAILABLE, Some(*retry_after_s))
            }
            RelayError::Db { .. } | RelayError::WriterGone | RelayError::Unavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, Some(1))
            }
            RelayError::Settings(_)
            | RelayError::State(_)
            | RelayError::OlderQueue { .. }
            | RelayError::Upstream(_)
            | RelayError::Io { .. } => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        let message = match &self {
            // Internal details go to the log, not to the caller.
            RelayError::Db { .. } | RelayError::WriterGone => {
                tracing::error!(error = %self, "intake failed");
                RelayError::Unavailable.to_string()
            }
            other => other.to_string(),
        };
        let body = json!({ "status": status.as_u16(), "message": message }).to_string();
        let mut response =
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        let h = response.headers_mut();
        if let Some(s) = retry_after {
            h.insert(header::RETRY_AFTER, s.into());
        }
        if status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"gc-relay\""),
            );
        }
        response
    }
}
