//! The `quota.v1.QuotaBroker` gRPC service: authenticates each call and
//! runs its operation; `Watch` streams the broker's change feed and
//! `LeaseStream` hands the stream to a session.

use super::codec::{principal, status_to_pb};
use super::lease_stream;
use super::ops::Ops;
use super::overload::Overload;
use super::transport::PeerInfo;
use crate::auth::Authenticator;
use crate::broker::Broker;
use crate::pb;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

/// The QuotaBroker service.
#[derive(Clone)]
pub(crate) struct BrokerService {
    ops: Ops,
    auth: Authenticator,
    /// Caps the Watch streams each caller holds open.
    overload: Arc<Overload>,
}

impl BrokerService {
    /// Serves `broker`, checking tokens with `auth` and Watch caps with
    /// `overload`.
    pub(crate) fn new(
        broker: Broker,
        auth: Authenticator,
        overload: Arc<Overload>,
    ) -> BrokerService {
        BrokerService {
            ops: Ops::new(broker),
            auth,
            overload,
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::QuotaStatus, Status>> + Send>>;
type LeaseStreamOut = Pin<Box<dyn Stream<Item = Result<pb::LeaseStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::quota_broker_server::QuotaBroker for BrokerService {
    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let who = principal(&self.auth, &request)?;
        Ok(Response::new(
            self.ops.acquire_op(&who, request.into_inner()).await?,
        ))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let who = principal(&self.auth, &request)?;
        Ok(Response::new(
            self.ops.release_op(&who, request.into_inner())?,
        ))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let who = principal(&self.auth, &request)?;
        Ok(Response::new(
            self.ops.renew_op(&who, request.into_inner())?,
        ))
    }

    async fn report(
        &self,
        request: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let who = principal(&self.auth, &request)?;
        Ok(Response::new(
            self.ops.report_op(&who, request.into_inner())?,
        ))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let who = principal(&self.auth, &request)?;
        let permit = self
            .overload
            .open_watch(&who, request.extensions().get::<PeerInfo>())?;
        let tenant = request.into_inner().tenant;
        if !tenant.is_empty() {
            who.may_access(&tenant)?;
        }
        let rx = self
            .ops
            .broker()
            .watch((!tenant.is_empty()).then_some(tenant.as_str()), |t| {
                who.sees(t)
            })?;
        let clock = self.ops.broker().clock();
        let stream = ReceiverStream::new(rx).map(move |s| {
            // Counted against the caller's Watch cap until the stream is dropped.
            let _open = &permit;
            // An error (the tenant is led elsewhere now) is the last item.
            s.map(|s| status_to_pb(s, clock)).map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type LeaseStreamStream = LeaseStreamOut;

    async fn lease_stream(
        &self,
        request: Request<tonic::Streaming<pb::LeaseStreamRequest>>,
    ) -> Result<Response<LeaseStreamOut>, Status> {
        let who = principal(&self.auth, &request)?;
        let rx = lease_stream::serve(self.ops.clone(), who, request.into_inner());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
