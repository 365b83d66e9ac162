//! Why a client operation failed ([`ClientError`], and the broker's
//! overload answer read from a status), how one RPC failed inside the client
//! ([`RpcError`]), and what a failed call's status says of the broker: away,
//! and whether the call may have reached it before it went.

use crate::address;
use std::time::Duration;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker URL is not usable.
    #[error("invalid broker URL {url:?}: {message}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The token cannot be sent as a header.
    #[error("the token contains characters that cannot be sent in a header")]
    Token,
    /// The TLS settings are not usable (a file, a certificate, a key).
    #[error("TLS: {0}")]
    Tls(String),
    /// The broker answered "not now".
    #[error("not granted: {reason} (retry in {retry_after:?})")]
    NotGranted {
        /// The broker's reason.
        reason: String,
        /// When to retry at the earliest.
        retry_after: Duration,
    },
    /// The broker is overloaded for this caller (request rate, Watch
    /// streams): try again after `retry_after`.
    #[error("broker overloaded: {message} (retry in {retry_after:?})")]
    Overloaded {
        /// The broker's message.
        message: String,
        /// When to retry at the earliest.
        retry_after: Duration,
    },
    /// The client was made outside a Tokio runtime (its connections'
    /// tasks need one).
    #[error(
        "BrokerClient must be created inside a Tokio runtime (its connections run as tasks of it)"
    )]
    NoRuntime,
    /// The broker refused the request (bad field, unknown tenant, auth...).
    #[error("broker refused: {}: {}", quota_broker::code_name(.0.code()), .0.message())]
    Refused(tonic::Status),
    /// The server at `url` answers, but not as a quota-broker's gRPC port:
    /// another gRPC service, an HTTP/1 server (such as a broker's HTTP
    /// port, `server.http_listen`), a TLS port addressed with `http://`.
    /// Never answered from the fallback (that is for a broker that is
    /// down, and this address never serves): fix the URL.
    #[error(
        "the server at {url} is not a quota-broker's gRPC port: {reason}; give the broker's gRPC \
         address (its server.listen, default 127.0.0.1:50051) [{}: {detail}]",
        quota_broker::code_name(*.code)
    )]
    NotABroker {
        /// The URL called.
        url: String,
        /// What the server is, as far as its answer tells.
        reason: String,
        /// The gRPC status the call got.
        code: tonic::Code,
        /// The status's message.
        detail: String,
    },
}

/// Response metadata in which the broker says how long to wait after an
/// overload refusal, in milliseconds.
const RETRY_AFTER_MS: &str = "retry-after-ms";

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> ClientError {
        let retry_after = s
            .metadata()
            .get(RETRY_AFTER_MS)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        match retry_after {
            Some(ms) if s.code() == tonic::Code::ResourceExhausted => ClientError::Overloaded {
                message: s.message().to_owned(),
                retry_after: Duration::from_millis(ms),
            },
            _ => ClientError::Refused(s),
        }
    }
}

/// How an RPC failed.
#[derive(Debug)]
pub(crate) enum RpcError {
    /// The broker's answer, or a transport failure, as tonic gives it.
    Status(tonic::Status),
    /// The server at the URL is not a quota-broker's gRPC port
    /// ([`ClientError::NotABroker`]).
    NotABroker(ClientError),
}

impl RpcError {
    /// The status, for the caller to read; a server that is not a broker
    /// as the caller's error.
    pub(crate) fn status(self) -> Result<tonic::Status, ClientError> {
        match self {
            RpcError::Status(s) => Ok(s),
            RpcError::NotABroker(e) => Err(e),
        }
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RpcError::Status(s) => write!(f, "{s}"),
            RpcError::NotABroker(e) => write!(f, "{e}"),
        }
    }
}

/// The broker did not answer (down, restarting, network, or it closed the
/// connection before serving it): fall back. A status made locally from a
/// transport failure carries its source; the broker's own answers do not.
pub(crate) fn is_unreachable(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable
        || std::error::Error::source(s).is_some()
        || address::from_a_proxy_404(s)
}

/// Whether a call that failed on the transport may have been read by a
/// broker (the connection broke or went unanswered), rather than failing to
/// connect at all.
pub(crate) fn may_have_reached_a_broker(s: &tonic::Status) -> bool {
    let Some(source) = std::error::Error::source(s) else {
        return false;
    };
    let chain = error_chain(source);
    !(chain.contains("tcp connect error") || chain.contains("Connection refused"))
}

/// An error and its causes on one line, each cause once (a cause whose text
/// the line already holds is left out): how the client words a transport or
/// TLS failure, for tools that report one the same way.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}
