//! The one error type of a load run: what failed (I/O, transport, an RPC, a
//! child server that would not start) with enough context to act on it.
//! Rows that may fail on their own (stream mode against a server without
//! LeaseStream) catch it and print it in the table instead of aborting.

use std::fmt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Why a run could not be completed.
#[derive(Debug)]
pub(crate) enum Error {
    /// A file or process operation failed; the string says which.
    Io(String, std::io::Error),
    /// A gRPC connection could not be made.
    Transport(tonic::transport::Error),
    /// An RPC failed.
    Rpc(tonic::Status),
    /// The generated broker config was rejected.
    Config(quota_broker::ConfigError),
    /// Histograms of different loops could not be merged.
    Histogram(hdrhistogram::AdditionError),
    /// A load task panicked or was cancelled.
    Task(tokio::task::JoinError),
    /// The `quota-broker` binary to run as a child is not there.
    MissingBinary(PathBuf),
    /// A child server exited before it was ready.
    Exited {
        /// Which server.
        what: String,
        /// How it ended.
        status: ExitStatus,
        /// The end of its log.
        log: String,
    },
    /// A child server did not answer an Acquire→Release pair in time.
    NotReady {
        /// Which server.
        what: String,
        /// How long we tried.
        waited: Duration,
        /// The last failure.
        last: String,
    },
    /// A LeaseStream answered something that matches no request.
    Protocol(String),
    /// Holding leases needs every Acquire granted with a slot.
    NotHeld(String),
    /// `loadgen cluster`: etcd, or the cluster's leaders, did not come up.
    Cluster(String),
}

impl Error {
    /// An I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |e| Error::Io(context, e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(context, e) => write!(f, "{context}: {e}"),
            Error::Transport(e) => write!(f, "cannot connect: {e}"),
            Error::Rpc(s) => write!(f, "RPC failed: {} ({:?})", s.message(), s.code()),
            Error::Config(e) => write!(f, "generated broker config rejected: {e}"),
            Error::Histogram(e) => write!(f, "cannot merge histograms: {e}"),
            Error::Task(e) => write!(f, "load task failed: {e}"),
            Error::MissingBinary(path) => write!(
                f,
                "no quota-broker binary at {} (build it with `cargo build --release --bin quota-broker`, \
                 pass --broker-bin PATH, or run the broker in this process with --in-process)",
                path.display()
            ),
            Error::Exited { what, status, log } => {
                write!(f, "{what} exited before it was ready ({status}); its log ends:\n{log}")
            }
            Error::NotReady { what, waited, last } => write!(
                f,
                "{what} did not serve an Acquire→Release pair within {waited:?} (last: {last})"
            ),
            Error::Protocol(what) => write!(f, "LeaseStream protocol: {what}"),
            Error::NotHeld(what) => write!(f, "cannot hold leases: {what}"),
            Error::Cluster(what) => write!(f, "broker cluster: {what}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(_, e) => Some(e),
            Error::Transport(e) => Some(e),
            Error::Rpc(e) => Some(e),
            Error::Config(e) => Some(e),
            Error::Histogram(e) => Some(e),
            Error::Task(e) => Some(e),
            _ => None,
        }
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(e: tonic::transport::Error) -> Self {
        Error::Transport(e)
    }
}

impl From<tonic::Status> for Error {
    fn from(e: tonic::Status) -> Self {
        Error::Rpc(e)
    }
}

impl From<quota_broker::ConfigError> for Error {
    fn from(e: quota_broker::ConfigError) -> Self {
        Error::Config(e)
    }
}

impl From<hdrhistogram::AdditionError> for Error {
    fn from(e: hdrhistogram::AdditionError) -> Self {
        Error::Histogram(e)
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Task(e)
    }
}
