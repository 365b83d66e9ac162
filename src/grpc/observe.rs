//! What every RPC leaves behind: a request id (the caller's `x-request-id`
//! when it is short and plain, else a new one) on a tracing span, so every
//! log line of the request carries it, sent back in the `x-request-id`
//! response metadata; the call's latency in the metrics; and each call
//! answered with an error status, logged and counted by method and code
//! (a refused login, UNAUTHENTICATED or PERMISSION_DENIED, with the peer's
//! address, so it can be traced to a source).

use super::throttled::Throttled;
use super::transport::PeerInfo;
use crate::metrics::Metrics;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tonic::codegen::http;
use tower::{Layer, Service};
use tracing::Instrument;

/// Request and response metadata carrying the request id (a name made
/// once: looking a header up by a string parses the string every time).
pub(crate) const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");
/// Longest caller-given request id kept; longer ones are replaced.
const MAX_REQUEST_ID: usize = 64;
/// Calls shed under overload or turned away while shutting down are
/// logged at info at most once this often (with how many there were),
/// the rest at debug: a line each would cost most when the broker has
/// least to spare.
const SHED_LOG_EVERY: Duration = Duration::from_secs(10);
/// Other refusals (a bad field, an unknown tenant): at most one line this
/// often at info, each at debug. A client with a typo repeats it thousands
/// of times a second, and a line each fills a disk in a day.
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(1);

/// The caller's request id if it is 1–64 characters of `[A-Za-z0-9._:-]`.
fn given_id(value: &http::HeaderValue) -> Option<&str> {
    let id = value.to_str().ok()?;
    let plain = !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    plain.then_some(id)
}

/// A new request id: 16 hex digits (written without a `format!`
/// allocation; a valid header value by construction).
fn new_id() -> http::HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u64(..);
    let mut digits = [0u8; 16];
    for d in digits.iter_mut().rev() {
        *d = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    http::HeaderValue::from_bytes(&digits).unwrap_or(http::HeaderValue::from_static("0"))
}

/// The tower layer in front of every service.
#[derive(Clone)]
pub(crate) struct ObserveLayer {
    metrics: Option<Arc<Metrics>>,
    /// When a shed call was last logged at info, and how many since.
    shed: Arc<Throttled>,
    /// The same for other refusals.
    refused: Arc<Throttled>,
}

impl ObserveLayer {
    /// Times calls into `metrics` (when on).
    pub(crate) fn new(metrics: Option<Arc<Metrics>>) -> ObserveLayer {
        ObserveLayer {
            metrics,
            shed: Arc::new(Throttled::new(SHED_LOG_EVERY)),
            refused: Arc::new(Throttled::new(REFUSED_LOG_EVERY)),
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.metrics.clone(),
            shed: self.shed.clone(),
            refused: self.refused.clone(),
        }
    }
}

/// The service [`ObserveLayer`] makes.
#[derive(Clone)]
pub(crate) struct Observe<S> {
    inner: S,
    metrics: Option<Arc<Metrics>>,
    shed: Arc<Throttled>,
    refused: Arc<Throttled>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> Service<http::Request<B>> for Observe<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<R>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let mut id = match req.headers().get(&REQUEST_ID).and_then(given_id) {
            Some(id) => http::HeaderValue::from_str(id).ok(),
            None => None,
        }
        .unwrap_or_else(new_id);
        // A value that differs on every call must not enter HPACK's dynamic
        // table: it would evict the headers that repeat (content-type,
        // grpc-status) and make every response larger. The first on a
        // connection does, so that the header's name is in the table and
        // the later ones send only their value.
        let peer = req.extensions().get::<PeerInfo>();
        let first = peer.is_some_and(PeerInfo::first_request_id);
        let peer_ip = peer.and_then(PeerInfo::ip);
        id.set_sensitive(!first);
        let method = Metrics::method(req.uri().path());
        // At error level, so a filter that keeps only warnings and errors
        // (RUST_LOG=warn) still puts the request id on them.
        let span = tracing::error_span!(
            "rpc",
            request_id = id.to_str().unwrap_or(""),
            method = Metrics::method_name(method),
            token = tracing::field::Empty
        );
        let call = self.inner.call(req).instrument(span.clone());
        let metrics = self.metrics.clone();
        let throttles = (self.shed.clone(), self.refused.clone());
        Box::pin(async move {
            let mut r = call.await;
            if let Ok(response) = &mut r {
                match refusal(response.headers()) {
                    // The broker answers nothing UNKNOWN: it is tonic's
                    // status for a request the connection broke under
                    // (its caller gone), which nobody is refused.
                    Some(tonic::Code::Unknown) => span.in_scope(|| {
                        tracing::debug!("call abandoned: its request could not be read")
                    }),
                    Some(code) => {
                        log_refusal(&span, response.headers(), code, peer_ip, &throttles);
                        if let Some(m) = &metrics {
                            m.refused(method, code);
                        }
                    }
                    None => {}
                }
                response.headers_mut().insert(REQUEST_ID, id);
            }
            if let Some(m) = metrics {
                m.rpc_done(method, started.elapsed());
            }
            r
        })
    }
}

/// The error code of a call answered with an error status (a
/// trailers-only answer: how the broker answers every refusal); `None` for
/// an answer that goes on to a body. An error in a stream's trailers is
/// logged where it happens.
fn refusal(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let code = headers.get(&GRPC_STATUS).and_then(|v| v.to_str().ok())?;
    (code != "0").then(|| {
        code.parse::<i32>()
            .map_or(tonic::Code::Unknown, tonic::Code::from_i32)
    })
}

/// Logs a refused call with the request id the caller got back, so that id
/// leads to a line; a refused login (UNAUTHENTICATED, PERMISSION_DENIED)
/// with the address it came from (`peer`; under mutual TLS the
/// certificate was checked before any call). The message is the broker's
/// own, bounded.
fn log_refusal(
    span: &tracing::Span,
    headers: &http::HeaderMap,
    code: tonic::Code,
    peer: Option<std::net::IpAddr>,
    (shed, refused): &(Arc<Throttled>, Arc<Throttled>),
) {
    let message = headers
        .get(&GRPC_MESSAGE)
        .and_then(|v| v.to_str().ok())
        .map(|m| {
            percent_encoding::percent_decode_str(m)
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    span.in_scope(|| match code {
        // Shed under overload, or sent elsewhere (shutting down, not the
        // leader).
        tonic::Code::ResourceExhausted | tonic::Code::Unavailable => match shed.note() {
            Some(calls) => tracing::info!(
                code = ?code,
                reason = %message,
                calls_shed_since_last_line = calls,
                "refused (shed: at most one line every 10 s at info, each call at debug)"
            ),
            None => tracing::debug!(code = ?code, reason = %message, "refused"),
        },
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            // (`-` when the connection's address is not known.)
            let peer =
                tracing::field::display(peer.map_or_else(|| "-".to_owned(), |ip| ip.to_string()));
            match refused.note() {
                Some(calls) => tracing::info!(
                    code = ?code,
                    peer,
                    reason = %message,
                    calls_refused_since_last_line = calls,
                    "refused"
                ),
                None => tracing::debug!(code = ?code, peer, reason = %message, "refused"),
            }
        }
        _ => match refused.note() {
            Some(calls) => tracing::info!(
                code = ?code,
                reason = %message,
                calls_refused_since_last_line = calls,
                "refused"
            ),
            None => tracing::debug!(code = ?code, reason = %message, "refused"),
        },
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_plain_ids_are_kept() {
        let ok = http::HeaderValue::from_static("abc-123_x.y:z");
        assert_eq!(given_id(&ok), Some("abc-123_x.y:z"));
        for bad in ["", "has space", "a/b", &"x".repeat(65)] {
            let v = http::HeaderValue::from_str(bad).unwrap();
            assert_eq!(given_id(&v), None, "{bad:?}");
        }
    }
}
