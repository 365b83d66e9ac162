//! The gRPC port while the broker starts. The listener is bound before the
//! broker's start-up work (tenants, the metrics' label sets, the state
//! directory), which may take seconds; a health check or a call meanwhile
//! must get an answer, not a connection that hangs until its deadline.
//!
//! The tonic server is built once, before the start, with [`GateLayer`] as
//! its only layer around the services that exist then: grpc.health.v1
//! (every name NOT_SERVING until the start is done), server reflection, and
//! a [`Starting`] stand-in for each broker service, which answers every
//! call UNAVAILABLE "the broker is starting" (clients read that as an
//! outage: they retry or run on their fallback rate). Once the broker has
//! started, `serve` puts the full stack (its layers, the fast Acquire
//! path, the real services) in the gate's [`OnceLock`], and [`Gate`]
//! sends every call there.
//!
//! The switch costs the calls nothing once made: tonic clones the gate for
//! each connection and hyper each connection's service for each request,
//! and a clone made after the start is the started stack itself
//! ([`Gate::Started`]), with no lock or atomic left to read. Only a
//! connection opened during the start reads the `OnceLock` (one atomic
//! load) per request.

use super::observe::{Observe, ObserveLayer};
use super::overload::{Guard, GuardLayer};
use crate::http::StartStage;
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::Status;
use tower::{Layer, Service};

/// Makes the [`Gate`] in front of the services tonic is given (those that
/// answer during the start).
#[derive(Clone)]
pub(super) struct GateLayer<B> {
    /// The layers the start-up answers go through (no metrics yet).
    observe: ObserveLayer,
    guard: GuardLayer,
    /// The full stack, once the broker has started.
    started: Arc<OnceLock<B>>,
}

impl<B> GateLayer<B> {
    /// Answers through `observe` and `guard` until `started` is set, then
    /// through what it holds.
    pub(super) fn new(
        observe: ObserveLayer,
        guard: GuardLayer,
        started: Arc<OnceLock<B>>,
    ) -> GateLayer<B> {
        GateLayer {
            observe,
            guard,
            started,
        }
    }
}

impl<S, B> Layer<S> for GateLayer<B> {
    type Service = Gate<Observe<Guard<S>>, B>;

    fn layer(&self, inner: S) -> Self::Service {
        Gate::Starting {
            starting: self.observe.layer(self.guard.layer(inner)),
            started: self.started.clone(),
        }
    }
}

/// The start-up answers (`A`) until the broker has started, then the full
/// stack (`B`).
pub(super) enum Gate<A, B> {
    /// Made before the start was done: looks for the full stack on each
    /// request.
    Starting {
        starting: A,
        started: Arc<OnceLock<B>>,
    },
    /// The full stack.
    Started(B),
}

impl<A: Clone, B: Clone> Clone for Gate<A, B> {
    fn clone(&self) -> Self {
        match self {
            Gate::Started(stack) => Gate::Started(stack.clone()),
            Gate::Starting { starting, started } => match started.get() {
                Some(stack) => Gate::Started(stack.clone()),
                None => Gate::Starting {
                    starting: starting.clone(),
                    started: started.clone(),
                },
            },
        }
    }
}

impl<A, B, Req> Service<Req> for Gate<A, B>
where
    A: Service<Req>,
    // One future type for both: no wrapper to poll on every call.
    B: Service<Req, Response = A::Response, Error = A::Error, Future = A::Future> + Clone,
{
    type Response = A::Response;
    type Error = A::Error;
    type Future = A::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), A::Error>> {
        if let Gate::Starting { started, .. } = self {
            if let Some(stack) = started.get() {
                *self = Gate::Started(stack.clone());
            }
        }
        match self {
            Gate::Starting { starting, .. } => starting.poll_ready(cx),
            Gate::Started(stack) => stack.poll_ready(cx),
        }
    }

    fn call(&mut self, req: Req) -> A::Future {
        match self {
            Gate::Starting { starting, .. } => starting.call(req),
            Gate::Started(stack) => stack.call(req),
        }
    }
}

/// Stands in for the broker service `S` during the start: every call is
/// answered UNAVAILABLE, saying the broker is starting and what it is
/// doing.
pub(super) struct Starting<S> {
    stage: StartStage,
    service: PhantomData<fn() -> S>,
}

impl<S> Starting<S> {
    /// Says what `stage` says the start is doing.
    pub(super) fn new(stage: StartStage) -> Starting<S> {
        Starting {
            stage,
            service: PhantomData,
        }
    }
}

impl<S> Clone for Starting<S> {
    fn clone(&self) -> Self {
        Starting::new(self.stage.clone())
    }
}

impl<S: NamedService> NamedService for Starting<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Starting<S> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: http::Request<B>) -> Self::Future {
        ready(Ok(starting_status(&self.stage.now()).into_http()))
    }
}

/// The answer to a broker call during the start.
fn starting_status(stage: &str) -> Status {
    Status::unavailable(format!(
        "the broker is starting ({stage}); retry shortly (grpc.health.v1 answers NOT_SERVING \
         until it serves)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A service that answers its own number, counting its clones.
    struct Numbered(u8, Arc<AtomicUsize>);

    impl Clone for Numbered {
        fn clone(&self) -> Self {
            self.1.fetch_add(1, Ordering::Relaxed);
            Numbered(self.0, self.1.clone())
        }
    }

    impl Service<()> for Numbered {
        type Response = u8;
        type Error = Infallible;
        type Future = Ready<Result<u8, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: ()) -> Self::Future {
            ready(Ok(self.0))
        }
    }

    async fn answer(gate: &Gate<Numbered, Numbered>) -> u8 {
        use tower::ServiceExt;
        gate.clone().oneshot(()).await.unwrap()
    }

    #[tokio::test]
    async fn calls_go_to_the_full_stack_once_it_is_in() {
        let clones = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(OnceLock::new());
        let gate = Gate::Starting {
            starting: Numbered(1, clones.clone()),
            started: started.clone(),
        };
        // A connection opened during the start.
        let early = gate.clone();
        assert_eq!(answer(&gate).await, 1);
        assert_eq!(answer(&early).await, 1);
        assert!(started.set(Numbered(2, clones.clone())).is_ok());
        assert_eq!(answer(&gate).await, 2);
        assert_eq!(
            answer(&early).await,
            2,
            "a connection from before the start"
        );
        // A connection opened now holds the full stack itself.
        assert!(matches!(gate.clone(), Gate::Started(_)));
        // A gate made before the start turns on its first poll.
        let mut early = early;
        let _ = std::future::poll_fn(|cx| early.poll_ready(cx)).await;
        assert!(matches!(early, Gate::Started(_)));
    }

    #[test]
    fn the_starting_answer_is_unavailable_and_says_why() {
        let status = starting_status("reading the state directory");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status
                .message()
                .starts_with("the broker is starting (reading the state directory)"),
            "{}",
            status.message()
        );
    }
}
