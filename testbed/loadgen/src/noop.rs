//! The no-op QuotaBroker: the same gRPC stack as the broker (tonic, HTTP/2,
//! the same transport limits) answering every request at once with a grant,
//! including on LeaseStream, so the broker/no-op ratio isolates the cost of
//! the broker's decisions from the cost of the transport.

use std::future::Future;
use std::pin::Pin;

use quota_broker::pb::lease_stream_request::Op;
use quota_broker::pb::lease_stream_response::Result as Answer;
use quota_broker::pb::quota_broker_server::{QuotaBroker, QuotaBrokerServer};
use quota_broker::pb::{
    AcquireRequest, AcquireResponse, LeaseStreamRequest, LeaseStreamResponse, OperationError,
    QuotaStatus, ReleaseRequest, ReleaseResponse, RenewRequest, RenewResponse, ReportRequest,
    ReportResponse, WatchRequest,
};
use tokio::net::TcpListener;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

/// A QuotaBroker that grants everything at once.
struct Noop;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn grant(req: &AcquireRequest) -> AcquireResponse {
    AcquireResponse {
        granted: true,
        lease_id: "noop".into(),
        permits: req.permits.max(1),
        ..Default::default()
    }
}

/// The answer to one LeaseStream request, as the unary RPC would give it.
fn answer(req: LeaseStreamRequest) -> LeaseStreamResponse {
    let result = match req.op {
        Some(Op::Acquire(a)) => Answer::Acquire(grant(&a)),
        Some(Op::Release(_)) => Answer::Release(ReleaseResponse { released: true }),
        Some(Op::Renew(_)) => Answer::Renew(RenewResponse::default()),
        Some(Op::Report(_)) => Answer::Report(ReportResponse::default()),
        None => Answer::Error(OperationError {
            code: tonic::Code::InvalidArgument as i32,
            message: "request names no operation".into(),
        }),
    };
    LeaseStreamResponse {
        id: req.id,
        result: Some(result),
    }
}

#[tonic::async_trait]
impl QuotaBroker for Noop {
    async fn acquire(
        &self,
        request: Request<AcquireRequest>,
    ) -> Result<Response<AcquireResponse>, Status> {
        Ok(Response::new(grant(request.get_ref())))
    }

    async fn release(
        &self,
        _request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        Ok(Response::new(ReleaseResponse { released: true }))
    }

    async fn renew(
        &self,
        _request: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        Ok(Response::new(RenewResponse::default()))
    }

    async fn report(
        &self,
        _request: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        Ok(Response::new(ReportResponse::default()))
    }

    type WatchStream = BoxStream<QuotaStatus>;

    async fn watch(
        &self,
        _request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(Box::pin(tokio_stream::empty())))
    }

    type LeaseStreamStream = BoxStream<LeaseStreamResponse>;

    async fn lease_stream(
        &self,
        request: Request<Streaming<LeaseStreamRequest>>,
    ) -> Result<Response<Self::LeaseStreamStream>, Status> {
        // Each request answered as soon as it is decoded; a broken request
        // stream ends the answers with its status.
        let answers = request.into_inner().map(|r| r.map(answer));
        Ok(Response::new(Box::pin(answers)))
    }
}

/// Serves the no-op service on `listener` until `shutdown` completes, with
/// the broker's transport settings (TCP_NODELAY, 1024 streams per
/// connection).
pub(crate) async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .max_concurrent_streams(quota_broker::MAX_CONCURRENT_STREAMS)
        .add_service(QuotaBrokerServer::new(Noop))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use quota_broker::pb::{lease_stream_request, ReleaseRequest};

    #[test]
    fn answers_echo_the_id_and_grant() {
        let a = answer(LeaseStreamRequest {
            id: 7,
            op: Some(lease_stream_request::Op::Acquire(AcquireRequest {
                permits: 0,
                ..Default::default()
            })),
        });
        assert_eq!(a.id, 7);
        assert!(matches!(a.result, Some(Answer::Acquire(ref g)) if g.granted && g.permits == 1));
        let r = answer(LeaseStreamRequest {
            id: 8,
            op: Some(lease_stream_request::Op::Release(ReleaseRequest::default())),
        });
        assert!(matches!(r.result, Some(Answer::Release(ref r)) if r.released));
        let e = answer(LeaseStreamRequest { id: 9, op: None });
        assert!(matches!(e.result, Some(Answer::Error(_))));
    }
}
