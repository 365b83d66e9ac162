//! A `tower::Layer` that leases every request of an HTTP client service
//! from the broker and reports its response, so call sites stay unchanged.
//!
//! The lease lasts as long as the response: its body ([`LeasedBody`])
//! holds it until the body has been read to its end, failed, or been
//! dropped, so a page streamed after the head still counts against the
//! bucket's concurrency slots. The body is not read by the layer, so a 429
//! is reported as a rate refusal even where the upstream's body says it was
//! about requests in flight; where that matters (an upstream with a
//! concurrency limit), lease with [`crate::BrokerClient::acquire`] around
//! the whole call and report with `Lease::report_concurrency_429`.

use crate::{BrokerClient, Call, ClientError, Lease};
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tower::{Layer, Service};

/// Wraps a service so each request is leased (method and path from the
/// request; tenant, client, OAuth client and class from `template`) and its
/// response reported.
#[derive(Clone)]
pub struct LeaseLayer {
    broker: BrokerClient,
    template: Call,
}

impl LeaseLayer {
    /// Leases with `broker`, filling calls from `template` (its method and
    /// path are replaced by each request's).
    pub fn new(broker: BrokerClient, template: Call) -> LeaseLayer {
        LeaseLayer { broker, template }
    }
}

impl<S> Layer<S> for LeaseLayer {
    type Service = LeaseService<S>;

    fn layer(&self, inner: S) -> LeaseService<S> {
        LeaseService {
            inner,
            broker: self.broker.clone(),
            template: self.template.clone(),
        }
    }
}

impl std::fmt::Debug for LeaseLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseLayer")
            .field("broker", &self.broker)
            .field("template", &self.template)
            .finish()
    }
}

/// The service [`LeaseLayer`] makes.
#[derive(Clone)]
pub struct LeaseService<S> {
    inner: S,
    broker: BrokerClient,
    template: Call,
}

impl<S> std::fmt::Debug for LeaseService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseService")
            .field("broker", &self.broker)
            .field("template", &self.template)
            .finish_non_exhaustive()
    }
}

/// Errors of a [`LeaseService`]: the lease, or the inner service.
#[derive(Debug, thiserror::Error)]
pub enum LeaseServiceError<E> {
    /// No lease (not granted, or refused by the broker).
    #[error(transparent)]
    Lease(ClientError),
    /// The wrapped service failed.
    #[error("upstream call failed: {0}")]
    Inner(E),
}

impl<S, B, RB> Service<http::Request<B>> for LeaseService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    B: Send + 'static,
    RB: Send + 'static,
{
    type Response = http::Response<LeasedBody<RB>>;
    type Error = LeaseServiceError<S::Error>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(LeaseServiceError::Inner)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The readied service goes with this call; a fresh clone stays behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let call = self
            .template
            .to(request.method().as_str(), request.uri().path());
        let broker = self.broker.clone();
        Box::pin(async move {
            let lease = broker
                .acquire(&call)
                .await
                .map_err(LeaseServiceError::Lease)?;
            let response = inner
                .call(request)
                .await
                .map_err(LeaseServiceError::Inner)?;
            let (status, headers) = (response.status().as_u16(), response.headers().clone());
            if let Err(e) = lease.report(status, &headers).await {
                tracing::warn!(error = %e, "could not report the upstream answer to the broker");
            }
            Ok(response.map(|inner| LeasedBody {
                inner,
                lease: Some(lease),
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds the lease of its call until it has been
    /// read to its end, failed, or been dropped.
    pub struct LeasedBody<B> {
        #[pin]
        inner: B,
        lease: Option<Lease>,
    }
}

impl<B> LeasedBody<B> {
    /// Whether the lease is still held (the body is not over).
    pub fn holds_lease(&self) -> bool {
        self.lease.is_some()
    }

    /// The body without its lease, which is released now.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for LeasedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeasedBody")
            .field("inner", &self.inner)
            .field("lease", &self.lease.as_ref().map(Lease::id))
            .finish()
    }
}

impl<B: http_body::Body> http_body::Body for LeasedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            // Dropping the lease releases its slots (in the background).
            this.lease.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
