//! Streams of the services that never end their own (grpc.health.v1's
//! Watch, server reflection's bidirectional stream) ended when the broker
//! stops: without it one open health Watch, which client-side health
//! checking keeps, held every graceful stop for the whole shutdown grace.
//! The broker's own streams (Watch, LeaseStream) end themselves.

use http_body::Frame;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::body::Body;
use tonic::codegen::http::{self, HeaderMap, HeaderValue};
use tonic::codegen::Bytes;
use tonic::server::NamedService;
use tonic::Status;

/// `S`, its answers ended with `UNAVAILABLE` once `stop` is cancelled.
#[derive(Clone)]
pub(super) struct EndOnStop<S> {
    inner: S,
    stop: CancellationToken,
}

impl<S> EndOnStop<S> {
    pub(super) fn new(inner: S, stop: CancellationToken) -> Self {
        EndOnStop { inner, stop }
    }
}

impl<S: NamedService> NamedService for EndOnStop<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for EndOnStop<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let answer = self.inner.call(req);
        let stop = self.stop.clone();
        Box::pin(async move {
            let answer = answer.await?;
            Ok(answer.map(|body| {
                Body::new(EndingBody {
                    inner: body,
                    stopped: Box::pin(stop.cancelled_owned()),
                    done: false,
                })
            }))
        })
    }
}

/// A response body that, once the broker stops, ends with `UNAVAILABLE`
/// trailers unless it ended first.
struct EndingBody {
    inner: Body,
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    done: bool,
}

impl http_body::Body for EndingBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        // What the service already has to say goes first.
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            let last = match &frame {
                None | Some(Err(_)) => true,
                Some(Ok(f)) => f.is_trailers(),
            };
            self.done |= last;
            return Poll::Ready(frame);
        }
        if self.stopped.as_mut().poll(cx).is_ready() {
            self.done = true;
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("14"));
            trailers.insert(
                "grpc-message",
                HeaderValue::from_static("the broker is stopping"),
            );
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }
}
