//! The one error type of a scenario run: what failed (flags, a child
//! process, the simulator's HTTP API, the broker) with enough context to act
//! on it. A missed target is not an error: it is reported in the table.

use std::path::PathBuf;

/// Why a run could not be completed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// A flag value is not usable.
    #[error("{0}")]
    Usage(String),
    /// A binary named on the command line is not there.
    #[error("no executable at {0}")]
    MissingBinary(PathBuf),
    /// A file or process operation failed; the string says which.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// A child process exited or went silent before it was ready.
    #[error("{what} did not start: {why}\n--- end of its log ---\n{log}")]
    ChildStart {
        /// Which child.
        what: String,
        /// What went wrong.
        why: String,
        /// The end of its log.
        log: String,
    },
    /// The simulator did not answer a control-plane call as its contract says.
    #[error("simulator {what}: {why}")]
    Sim {
        /// Which call.
        what: String,
        /// What went wrong.
        why: String,
    },
    /// The generated broker config was rejected.
    #[error("generated broker config rejected: {0}")]
    BrokerConfig(#[from] quota_broker::ConfigError),
    /// The broker refused a call (not a "not now": an error).
    #[error("broker: {0}")]
    Broker(#[from] quota_broker_client::ClientError),
    /// The in-process broker failed or did not become ready.
    #[error("in-process broker: {0}")]
    BrokerServer(String),
    /// `--cluster`: etcd or the cluster did not behave.
    #[error("broker cluster: {0}")]
    Cluster(String),
    /// gc-relay ("broker + relay" mode) did not start.
    #[error("gc-relay: {0}")]
    Relay(#[from] gc_relay::RelayError),
    /// gc-ingest (the broker modes' ingestion) could not be set up or
    /// its sink failed.
    #[error("gc-ingest: {0}")]
    Ingest(String),
    /// A fleet task panicked.
    #[error("a fleet task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl Error {
    /// An I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |e| Error::Io(context, e)
    }

    /// A simulator control-plane failure.
    pub(crate) fn sim(what: impl Into<String>, why: impl ToString) -> Error {
        Error::Sim {
            what: what.into(),
            why: why.to_string(),
        }
    }
}
