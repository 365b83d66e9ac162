//! The unary Acquire's own gRPC framing: the innermost layer reads
//! `/quota.v1.QuotaBroker/Acquire` calls off the HTTP/2 stream, runs the
//! same `acquire` as the generated service, and writes the answer as one
//! DATA frame and the `grpc-status` trailers. Everything else (and an
//! Acquire that asks for compression) goes on to tonic's router.
//!
//! Acquire is the call every upstream request makes, and per call tonic's
//! generic unary path (the router, a streaming decoder with its own
//! buffer, a streaming encoder, a boxed body per direction) costs more
//! than the decision. The layers in front of it (request id, latency,
//! overload guard) and tonic's around them (deadline, panics) still see
//! every call; only the codec differs, and it keeps tonic's rules: the
//! same size limit, status codes and trailers-only errors.

use super::broker_service::BrokerService;
use super::codec::MAX_MESSAGE_BYTES;
use crate::pb;
use crate::pb::quota_broker_server::QuotaBroker;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use prost::Message;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::codegen::http::{self, header, HeaderMap, HeaderValue};
use tonic::codegen::Bytes;
use tonic::Status;
use tower::{Layer, Service};

/// The path of the call served here.
const ACQUIRE: &str = "/quota.v1.QuotaBroker/Acquire";
/// The gRPC message prefix: compressed flag and length.
const PREFIX: usize = 5;
const GRPC_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
const GRPC_ENCODING: http::HeaderName = http::HeaderName::from_static("grpc-encoding");

/// Puts [`FastAcquire`] in front of a service.
#[derive(Clone)]
pub(crate) struct FastAcquireLayer {
    service: Arc<BrokerService>,
}

impl FastAcquireLayer {
    /// Serves Acquire with `service`'s `acquire`.
    pub(crate) fn new(service: BrokerService) -> FastAcquireLayer {
        FastAcquireLayer {
            service: Arc::new(service),
        }
    }
}

impl<S> Layer<S> for FastAcquireLayer {
    type Service = FastAcquire<S>;

    fn layer(&self, inner: S) -> FastAcquire<S> {
        FastAcquire {
            inner,
            service: self.service.clone(),
        }
    }
}

/// The service [`FastAcquireLayer`] makes.
#[derive(Clone)]
pub(crate) struct FastAcquire<S> {
    inner: S,
    service: Arc<BrokerService>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<http::Request<Body>> for FastAcquire<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != ACQUIRE || req.headers().contains_key(GRPC_ENCODING) {
            return Box::pin(self.inner.call(req));
        }
        let service = self.service.clone();
        Box::pin(async move { Ok(acquire(&service, req).await) })
    }
}

/// One unary Acquire, answered.
async fn acquire(service: &BrokerService, req: http::Request<Body>) -> http::Response<Body> {
    let (parts, body) = req.into_parts();
    let message = match read_message(body).await {
        Ok(m) => m,
        Err(status) => return status.into_http(),
    };
    let request = match pb::AcquireRequest::decode(message) {
        Ok(r) => r,
        Err(e) => {
            return Status::internal(format!("failed to decode the AcquireRequest: {e}"))
                .into_http()
        }
    };
    let request = tonic::Request::from_http(http::Request::from_parts(parts, request));
    match service.acquire(request).await {
        Ok(response) => answer(response),
        Err(status) => status.into_http(),
    }
}

/// The request's one message, without its prefix: the body read to its end.
async fn read_message(mut body: Body) -> Result<Bytes, Status> {
    let mut whole: Option<Bytes> = None;
    let mut more: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            // Request trailers carry nothing Acquire reads.
            continue;
        };
        // Most requests arrive in one DATA frame: keep it without copying.
        match whole.take() {
            None if more.is_empty() => whole = Some(data),
            Some(first) => {
                more.extend_from_slice(&first);
                more.extend_from_slice(&data);
            }
            None => more.extend_from_slice(&data),
        }
        let len = whole.as_ref().map_or(more.len(), Bytes::len);
        if len > PREFIX + MAX_MESSAGE_BYTES {
            // Not read to its end: its length is not known yet.
            return Err(too_large(None));
        }
    }
    let bytes = whole.unwrap_or_else(|| Bytes::from(more));
    if bytes.is_empty() {
        return Err(Status::internal("Missing request message."));
    }
    if bytes.len() < PREFIX {
        return Err(Status::internal(
            "the request ended inside a gRPC message prefix",
        ));
    }
    if bytes[0] != 0 {
        return Err(Status::unimplemented(
            "the message is compressed but no grpc-encoding was given; send it uncompressed",
        ));
    }
    let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(too_large(Some(len)));
    }
    match (bytes.len() - PREFIX).cmp(&len) {
        std::cmp::Ordering::Less => Err(Status::internal(format!(
            "the request ended inside its message: {} of {len} bytes",
            bytes.len() - PREFIX
        ))),
        std::cmp::Ordering::Greater => Err(Status::unimplemented(
            "Acquire takes one request message; the body holds more",
        )),
        std::cmp::Ordering::Equal => Ok(bytes.slice(PREFIX..)),
    }
}

fn too_large(found: Option<usize>) -> Status {
    Status::out_of_range(match found {
        Some(n) => format!(
            "request message too large: found {n} bytes, the limit is: {MAX_MESSAGE_BYTES} bytes"
        ),
        None => format!(
            "request message too large: more than the limit, the limit is: {MAX_MESSAGE_BYTES} bytes"
        ),
    })
}

/// A successful answer: headers, one message, `grpc-status: 0`.
fn answer(response: tonic::Response<pb::AcquireResponse>) -> http::Response<Body> {
    let (metadata, message, extensions) = response.into_parts();
    let len = message.encoded_len();
    let mut data = Vec::with_capacity(PREFIX + len);
    data.push(0);
    // AcquireResponse is a few hundred bytes at most (bounded names).
    data.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    message.encode_raw(&mut data);
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert(GRPC_STATUS, HeaderValue::from_static("0"));
    // A stream of frames rather than a body of known size: hyper would add
    // a content-length header to every answer, which gRPC does not use and
    // every client would decode.
    let frames: [Result<Frame<Bytes>, Infallible>; 2] = [
        Ok(Frame::data(Bytes::from(data))),
        Ok(Frame::trailers(trailers)),
    ];
    let body = StreamBody::new(tokio_stream::iter(frames));
    let mut out = http::Response::new(Body::new(body));
    *out.headers_mut() = metadata.into_headers();
    out.headers_mut()
        .insert(header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
    *out.extensions_mut() = extensions;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn body(chunks: &[&[u8]]) -> Body {
        let owned: Vec<Result<Frame<Bytes>, Status>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        Body::new(StreamBody::new(tokio_stream::iter(owned)))
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    #[tokio::test]
    async fn a_message_split_over_frames_is_put_together() {
        let whole = framed(b"hello world");
        let (a, b) = whole.split_at(3);
        let (b, c) = b.split_at(6);
        let m = read_message(body(&[a, b, c])).await.unwrap();
        assert_eq!(&m[..], b"hello world");
        let m = read_message(body(&[&whole])).await.unwrap();
        assert_eq!(&m[..], b"hello world");
    }

    #[tokio::test]
    async fn broken_bodies_get_the_codes_tonic_gives() {
        let code = |chunks: Vec<Vec<u8>>| async move {
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            read_message(body(&refs)).await.unwrap_err().code()
        };
        assert_eq!(code(vec![]).await, Code::Internal, "no message");
        assert_eq!(code(vec![vec![0, 0]]).await, Code::Internal, "cut prefix");
        let mut cut = framed(b"abcdef");
        cut.truncate(8);
        assert_eq!(code(vec![cut]).await, Code::Internal, "cut message");
        let mut compressed = framed(b"abc");
        compressed[0] = 1;
        assert_eq!(code(vec![compressed]).await, Code::Unimplemented);
        let two = [framed(b"a"), framed(b"b")].concat();
        assert_eq!(code(vec![two]).await, Code::Unimplemented, "two messages");
        let mut big = vec![0];
        big.extend_from_slice(&((MAX_MESSAGE_BYTES + 1) as u32).to_be_bytes());
        assert_eq!(
            code(vec![big]).await,
            Code::OutOfRange,
            "declared too large"
        );
        let sent = vec![vec![0u8; PREFIX + MAX_MESSAGE_BYTES + 1]];
        assert_eq!(code(sent).await, Code::OutOfRange, "sent too much");
    }
}
