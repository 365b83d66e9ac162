//! The `quota.v1.QuotaAdmin` gRPC service for operators: list buckets,
//! set priority classes and bucket limits, pause and resume buckets. Every
//! change needs an admin token scoped to the tenant, is logged with who made
//! it, applies at once to waiting requests, and is saved to the state
//! directory (see the broker's `admin` module).

use super::codec::{bounded, class_from_pb, class_to_pb, principal, required, status_to_pb};
use crate::auth::Authenticator;
use crate::broker::{Broker, TenantBucketStatus};
use crate::config::{hidden_char, hidden_char_named};
use crate::error::BrokerError;
use crate::pb;
use crate::tenant::LimitChange;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// Longest pause reason accepted.
const MAX_REASON_LEN: usize = 256;

/// A bucket name, for the error that says one is required.
const BUCKET_EXAMPLE: &str = "analytics-query";

/// The QuotaAdmin service.
#[derive(Clone)]
pub(super) struct AdminService {
    broker: Broker,
    auth: Authenticator,
}

impl AdminService {
    /// Serves `broker`, checking tokens with `auth`.
    pub(super) fn new(broker: Broker, auth: Authenticator) -> AdminService {
        AdminService { broker, auth }
    }

    /// The admin's name, if the caller is an admin of `tenant`.
    fn admin<T>(&self, request: &Request<T>, tenant: &str) -> Result<String, Status> {
        let who = principal(&self.auth, request)?;
        who.require_admin()?;
        if tenant.is_empty() {
            return Err(BrokerError::invalid("tenant", "required, e.g. \"demo\"").into());
        }
        who.may_access(tenant)?;
        Ok(who.name().to_owned())
    }

    fn first(&self, statuses: Vec<TenantBucketStatus>) -> Option<pb::QuotaStatus> {
        let clock = self.broker.clock();
        statuses.into_iter().next().map(|s| status_to_pb(s, clock))
    }
}

fn nonzero<T: Default + PartialEq>(v: T) -> Option<T> {
    (v != T::default()).then_some(v)
}

#[tonic::async_trait]
impl pb::quota_admin_server::QuotaAdmin for AdminService {
    async fn list_buckets(
        &self,
        request: Request<pb::ListBucketsRequest>,
    ) -> Result<Response<pb::ListBucketsResponse>, Status> {
        let who = principal(&self.auth, &request)?;
        let tenant = request.into_inner().tenant;
        if !tenant.is_empty() {
            who.may_access(&tenant)?;
        }
        let clock = self.broker.clock();
        let buckets = self
            .broker
            .list((!tenant.is_empty()).then_some(tenant.as_str()), |t| {
                who.sees(t)
            })?
            .into_iter()
            .map(|s| status_to_pb(s, clock))
            .collect();
        Ok(Response::new(pb::ListBucketsResponse { buckets }))
    }

    async fn set_priority_class(
        &self,
        request: Request<pb::SetPriorityClassRequest>,
    ) -> Result<Response<pb::SetPriorityClassResponse>, Status> {
        let who = self.admin(&request, &request.get_ref().tenant)?;
        let r = request.into_inner();
        let c = r.class.ok_or_else(|| {
            BrokerError::invalid("class", "required: the class to create or change")
        })?;
        if r.reset {
            if c.order != 0 || c.weight != 0 || c.reserve != 0.0 || c.default_max_wait_ms != 0 {
                return Err(BrokerError::invalid(
                    "reset",
                    "reset puts the class back to the config's (or removes one the config \
                     lacks): give only its name",
                )
                .into());
            }
            required("class.name", &c.name, "reports")?;
            let class = self.broker.reset_class(&r.tenant, &c.name, &who).await?;
            return Ok(Response::new(pb::SetPriorityClassResponse {
                class: class.as_ref().map(class_to_pb),
            }));
        }
        let class = self
            .broker
            .set_class(&r.tenant, class_from_pb(c), &who)
            .await?;
        Ok(Response::new(pb::SetPriorityClassResponse {
            class: Some(class_to_pb(&class)),
        }))
    }

    async fn list_priority_classes(
        &self,
        request: Request<pb::ListPriorityClassesRequest>,
    ) -> Result<Response<pb::ListPriorityClassesResponse>, Status> {
        let who = principal(&self.auth, &request)?;
        let tenant = request.into_inner().tenant;
        if tenant.is_empty() {
            return Err(BrokerError::invalid(
                "tenant",
                "required: the tenant whose classes to list",
            )
            .into());
        }
        who.may_access(&tenant)?;
        let (classes, default_class) = self.broker.classes(&tenant)?;
        Ok(Response::new(pb::ListPriorityClassesResponse {
            classes: classes.iter().map(class_to_pb).collect(),
            default_class,
        }))
    }

    async fn set_bucket_limit(
        &self,
        request: Request<pb::SetBucketLimitRequest>,
    ) -> Result<Response<pb::SetBucketLimitResponse>, Status> {
        let who = self.admin(&request, &request.get_ref().tenant)?;
        let r = request.into_inner();
        required("bucket", &r.bucket, BUCKET_EXAMPLE)?;
        if r.reset {
            if r.permits != 0 || r.window_ms != 0 || r.burst != 0 || r.max_in_flight != 0 {
                return Err(BrokerError::invalid(
                    "reset",
                    "reset puts every limit back to the config's: give no permits, window_ms, \
                     burst or max_in_flight with it"
                        .to_owned(),
                )
                .into());
            }
            let statuses = self
                .broker
                .reset_bucket_limit(&r.tenant, &r.bucket, &who)
                .await?;
            return Ok(Response::new(pb::SetBucketLimitResponse {
                status: self.first(statuses),
            }));
        }
        let change = LimitChange {
            permits: nonzero(r.permits),
            window: nonzero(r.window_ms).map(Duration::from_millis),
            burst: nonzero(r.burst),
            max_in_flight: nonzero(r.max_in_flight),
        };
        let statuses = self
            .broker
            .set_bucket_limit(&r.tenant, &r.bucket, change, &who)
            .await?;
        Ok(Response::new(pb::SetBucketLimitResponse {
            status: self.first(statuses),
        }))
    }

    async fn pause_bucket(
        &self,
        request: Request<pb::PauseBucketRequest>,
    ) -> Result<Response<pb::PauseBucketResponse>, Status> {
        let who = self.admin(&request, &request.get_ref().tenant)?;
        let r = request.into_inner();
        required("bucket", &r.bucket, BUCKET_EXAMPLE)?;
        if r.reason.len() > MAX_REASON_LEN {
            return Err(BrokerError::invalid(
                "reason",
                format!(
                    "{} bytes long; at most {MAX_REASON_LEN}: every request the pause refuses carries it",
                    r.reason.len()
                ),
            )
            .into());
        }
        // Repeated in every refusal, log line and `quotactl status`: a
        // newline or an escape there would forge lines or colour a terminal,
        // a bidirectional override make it read as something else.
        if let Some(c) = hidden_char(&r.reason) {
            return Err(BrokerError::invalid(
                "reason",
                format!("it holds {}; give one line of text", hidden_char_named(c)),
            )
            .into());
        }
        let reason = if r.reason.is_empty() {
            format!("paused by {who}")
        } else {
            r.reason
        };
        let statuses = self
            .broker
            .set_paused(&r.tenant, &r.bucket, Some(reason), &who)
            .await?;
        Ok(Response::new(pb::PauseBucketResponse {
            status: self.first(statuses),
        }))
    }

    async fn resume_bucket(
        &self,
        request: Request<pb::ResumeBucketRequest>,
    ) -> Result<Response<pb::ResumeBucketResponse>, Status> {
        let who = self.admin(&request, &request.get_ref().tenant)?;
        let r = request.into_inner();
        required("bucket", &r.bucket, BUCKET_EXAMPLE)?;
        let statuses = self
            .broker
            .set_paused(&r.tenant, &r.bucket, None, &who)
            .await?;
        Ok(Response::new(pb::ResumeBucketResponse {
            status: self.first(statuses),
        }))
    }

    async fn clear_learned(
        &self,
        request: Request<pb::ClearLearnedRequest>,
    ) -> Result<Response<pb::ClearLearnedResponse>, Status> {
        let who = self.admin(&request, &request.get_ref().tenant)?;
        let r = request.into_inner();
        required("bucket", &r.bucket, BUCKET_EXAMPLE)?;
        let oauth_client = bounded("oauth_client", &r.oauth_client)?;
        let clock = self.broker.clock();
        let statuses = self
            .broker
            .clear_learned(
                &r.tenant,
                &r.bucket,
                (!oauth_client.is_empty()).then_some(oauth_client),
                &who,
            )
            .await?
            .into_iter()
            .map(|s| status_to_pb(s, clock))
            .collect();
        Ok(Response::new(pb::ClearLearnedResponse { statuses }))
    }
}
