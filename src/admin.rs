//! The `quota.v1.QuotaAdmin` gRPC service for operators. ListBuckets works;
//! changing classes and limits and pausing buckets come with priority
//! classes and answer UNIMPLEMENTED until then.

use crate::broker::Broker;
use crate::pb;
use crate::service::status_to_pb;
use tonic::{Request, Response, Status};

/// The QuotaAdmin service.
#[derive(Clone)]
pub struct AdminService {
    broker: Broker,
}

impl AdminService {
    /// Serves `broker`.
    pub fn new(broker: Broker) -> AdminService {
        AdminService { broker }
    }
}

fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not available in this broker version; change the config file and restart"
    ))
}

#[tonic::async_trait]
impl pb::quota_admin_server::QuotaAdmin for AdminService {
    async fn list_buckets(
        &self,
        request: Request<pb::ListBucketsRequest>,
    ) -> Result<Response<pb::ListBucketsResponse>, Status> {
        let tenant = request.into_inner().tenant;
        let clock = self.broker.clock();
        let buckets = self
            .broker
            .list((!tenant.is_empty()).then_some(tenant.as_str()))?
            .into_iter()
            .map(|s| status_to_pb(s, clock))
            .collect();
        Ok(Response::new(pb::ListBucketsResponse { buckets }))
    }

    async fn set_priority_class(
        &self,
        _: Request<pb::SetPriorityClassRequest>,
    ) -> Result<Response<pb::SetPriorityClassResponse>, Status> {
        Err(not_yet("SetPriorityClass"))
    }

    async fn set_bucket_limit(
        &self,
        _: Request<pb::SetBucketLimitRequest>,
    ) -> Result<Response<pb::SetBucketLimitResponse>, Status> {
        Err(not_yet("SetBucketLimit"))
    }

    async fn pause_bucket(
        &self,
        _: Request<pb::PauseBucketRequest>,
    ) -> Result<Response<pb::PauseBucketResponse>, Status> {
        Err(not_yet("PauseBucket"))
    }

    async fn resume_bucket(
        &self,
        _: Request<pb::ResumeBucketRequest>,
    ) -> Result<Response<pb::ResumeBucketResponse>, Status> {
        Err(not_yet("ResumeBucket"))
    }
}
