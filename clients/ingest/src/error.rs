//! Why an ingestion run stops: a bad argument, the sink, the upstream
//! (through the broker), or an answer it cannot use.

use gc_upstream::UpstreamError;

/// Why a run (or one block of it) failed.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A command-line value or setting that cannot be used.
    #[error("{0}")]
    Usage(String),
    /// The database refused or failed.
    #[error("sink: {0}")]
    Sink(#[from] sqlx::Error),
    /// The upstream call could not be made (lease, login, transport).
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamError),
    /// The upstream answered with a status that retrying will not fix.
    #[error("{what} answered HTTP {status}: {message}")]
    Status {
        /// Which request.
        what: &'static str,
        /// The status.
        status: u16,
        /// The start of the body.
        message: String,
    },
    /// An answer that is not what the API documents.
    #[error("{what}: unexpected answer: {message}")]
    Answer {
        /// Which request.
        what: &'static str,
        /// What was wrong.
        message: String,
    },
    /// A job the upstream gave up on (FAILED, CANCELLED, EXPIRED).
    #[error("job for {interval} ended {state}")]
    JobFailed {
        /// The block's interval.
        interval: String,
        /// The job's last state.
        state: String,
    },
    /// Another run is working on this sink under the same worker name.
    #[error("{0}")]
    WorkerBusy(String),
    /// A block still disagreed with its `totalHits` after every attempt.
    #[error("block {interval}: {received} distinct records received, totalHits {total_hits}, after {attempts} attempts")]
    Mismatch {
        /// The block's interval.
        interval: String,
        /// Distinct records received in the last attempt.
        received: u64,
        /// What the upstream said there are.
        total_hits: u64,
        /// Attempts made.
        attempts: u32,
    },
}

impl IngestError {
    /// A database that could not be reached (down, restarting, not
    /// answering): the same run may pass later, unlike a refusal (a wrong
    /// password, a database that does not exist, a path that cannot be).
    pub fn may_pass_later(&self) -> bool {
        matches!(
            self,
            IngestError::Sink(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut)
        )
    }

    /// A non-2xx answer, with at most 200 characters of its body.
    pub(crate) fn status(what: &'static str, status: u16, body: &str) -> IngestError {
        IngestError::Status {
            what,
            status,
            message: body.chars().take(200).collect(),
        }
    }

    /// A body that does not parse as documented.
    pub(crate) fn answer(what: &'static str, e: impl std::fmt::Display) -> IngestError {
        IngestError::Answer {
            what,
            message: e.to_string().chars().take(200).collect(),
        }
    }
}
