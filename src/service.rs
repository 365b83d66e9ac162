//! The `quota.v1.QuotaBroker` gRPC service: authenticate, decode and
//! validate a request, call the [`Broker`], encode the answer. Also the one
//! table that maps [`BrokerError`] and [`AuthError`] to gRPC status codes.

use crate::auth::{AuthError, Authenticator, Principal};
use crate::broker::{AcquireOutcome, Broker, Clock, TenantBucketStatus};
use crate::error::BrokerError;
use crate::headers;
use crate::pb;
use crate::tenant::AcquireArgs;
use std::pin::Pin;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

/// Longest accepted identifier-like field (tenant, client id, class, OAuth client).
const MAX_ID_LEN: usize = 256;
/// Longest accepted path.
const MAX_PATH_LEN: usize = 4096;

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        let msg = e.to_string();
        match e {
            BrokerError::InvalidArgument { .. } => Status::invalid_argument(msg),
            BrokerError::UnknownTenant { .. }
            | BrokerError::NoBucketMatches { .. }
            | BrokerError::LeaseNotFound { .. }
            | BrokerError::UnknownBucket { .. } => Status::not_found(msg),
            BrokerError::Internal(_) => Status::internal(msg),
            BrokerError::TooManyPermits { .. } => Status::failed_precondition(msg),
            BrokerError::ShuttingDown => Status::unavailable(msg),
        }
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        if e.is_unauthenticated() {
            Status::unauthenticated(e.to_string())
        } else {
            Status::permission_denied(e.to_string())
        }
    }
}

/// Authenticates a request from its `authorization` metadata.
pub(crate) fn principal<T>(
    auth: &Authenticator,
    request: &Request<T>,
) -> Result<Principal, Status> {
    let header = request
        .metadata()
        .get("authorization")
        .map(|v| v.to_str().unwrap_or(""));
    Ok(auth.authenticate(header)?)
}

/// The QuotaBroker service.
#[derive(Clone)]
pub struct BrokerService {
    broker: Broker,
    auth: Authenticator,
}

impl BrokerService {
    /// Serves `broker`, checking tokens with `auth`.
    pub fn new(broker: Broker, auth: Authenticator) -> BrokerService {
        BrokerService { broker, auth }
    }

    /// The broker this service serves.
    pub(crate) fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Checks that the caller may touch the tenant of a lease.
    fn check_lease(&self, who: &Principal, lease_id: &str) -> Result<(), Status> {
        if let Some(tenant) = self.broker.lease_tenant_id(lease_id)? {
            who.may_access(&tenant)?;
        }
        Ok(())
    }
}

fn required<'a>(
    field: &'static str,
    value: &'a str,
    example: &str,
) -> Result<&'a str, BrokerError> {
    if value.is_empty() {
        return Err(BrokerError::invalid(
            field,
            format!("required, e.g. {example:?}"),
        ));
    }
    bounded(field, value)
}

fn bounded<'a>(field: &'static str, value: &'a str) -> Result<&'a str, BrokerError> {
    if value.len() > MAX_ID_LEN {
        return Err(BrokerError::invalid(
            field,
            format!("{} bytes long; at most {MAX_ID_LEN}", value.len()),
        ));
    }
    Ok(value)
}

/// Validates a method and path; returns the upper-case method and the path
/// without its query string.
pub(crate) fn call_of(method: &str, path: &str) -> Result<(String, String), BrokerError> {
    let method = required("method", method, "POST")?;
    if method.len() > 16 || !method.chars().all(|c| c.is_ascii_alphabetic()) {
        return Err(BrokerError::invalid(
            "method",
            format!("{method:?} is not an HTTP method such as GET or POST"),
        ));
    }
    if path.is_empty() {
        return Err(BrokerError::invalid(
            "path",
            "required, e.g. \"/api/v2/analytics/conversations/details/query\"",
        ));
    }
    if !path.starts_with('/') || path.len() > MAX_PATH_LEN {
        return Err(BrokerError::invalid(
            "path",
            format!("must start with '/' and be at most {MAX_PATH_LEN} bytes; got {path:?}"),
        ));
    }
    let path = path.split(['?', '#']).next().unwrap_or(path);
    Ok((method.to_ascii_uppercase(), path.to_owned()))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Encodes a bucket status for the wire.
pub(crate) fn status_to_pb(s: TenantBucketStatus, clock: Clock) -> pb::QuotaStatus {
    let b = s.status;
    pb::QuotaStatus {
        tenant: s.tenant,
        bucket: b.bucket,
        configured_rate_per_min: b.configured_rate_per_min,
        effective_rate_per_min: b.effective_rate_per_min,
        tokens_available: b.tokens_available,
        in_flight: b.in_flight,
        max_in_flight: b.max_in_flight,
        frozen_until_ms: b.frozen_until.map_or(0, |t| clock.unix_ms(t)),
        waiting: b.waiting.into_iter().collect(),
        granted_total: b.granted_total,
        throttled_total: b.throttled_total,
        at_ms: clock.unix_ms(s.at),
        oauth_client: b.oauth_client.unwrap_or_default(),
        scope: b.scope.as_str().to_owned(),
        burst: b.burst,
        reports_total: b.reports_total,
        paused: b.paused.is_some(),
        learned_limit_per_min: b.learned_limit_per_min.unwrap_or(0.0),
        throttle_ratio: b.throttle_ratio,
        cooldown_until_ms: b.cooldown_until.map_or(0, |t| clock.unix_ms(t)),
        upstream_remaining: b.upstream_remaining.map_or(-1, i64::from),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::QuotaStatus, Status>> + Send>>;
type LeaseStreamOut = Pin<Box<dyn Stream<Item = Result<pb::LeaseStreamResponse, Status>> + Send>>;

impl BrokerService {
    /// Acquire for an authenticated caller (unary and LeaseStream alike).
    pub(crate) async fn acquire_op(
        &self,
        who: &Principal,
        r: pb::AcquireRequest,
    ) -> Result<pb::AcquireResponse, Status> {
        let tenant = required("tenant", &r.tenant, "demo")?;
        who.may_access(tenant)?;
        let client_id = required("client_id", &r.client_id, "ingest-worker-1")?;
        let class = bounded("priority_class", &r.priority_class)?;
        let oauth_client = bounded("oauth_client", &r.oauth_client)?;
        let (method, path) = call_of(&r.method, &r.path)?;
        let args = AcquireArgs {
            client_id: client_id.to_owned(),
            class: class.to_owned(),
            method,
            path,
            oauth_client: oauth_client.to_owned(),
            permits: r.permits.max(1),
        };
        let outcome = self
            .broker
            .acquire(tenant, args, r.max_wait_ms.map(Duration::from_millis))
            .await?;
        let clock = self.broker.clock();
        Ok(match outcome {
            AcquireOutcome::Granted(g) => {
                let (expires_at_ms, ttl_ms) = g
                    .slot
                    .map_or((0, 0), |(at, ttl)| (clock.unix_ms(at), ms(ttl)));
                pb::AcquireResponse {
                    granted: true,
                    lease_id: g.lease_id.to_string(),
                    permits: g.permits,
                    lease_expires_at_ms: expires_at_ms,
                    lease_ttl_ms: ttl_ms,
                    retry_after_ms: 0,
                    reason: String::new(),
                    buckets: g.buckets,
                }
            }
            AcquireOutcome::Denied(d) => pb::AcquireResponse {
                granted: false,
                permits: 0,
                retry_after_ms: ms(d.retry_after),
                reason: d.reason,
                buckets: d.buckets,
                ..Default::default()
            },
        })
    }

    /// Release for an authenticated caller.
    pub(crate) fn release_op(
        &self,
        who: &Principal,
        r: pb::ReleaseRequest,
    ) -> Result<pb::ReleaseResponse, Status> {
        self.check_lease(who, &r.lease_id)?;
        let released = self.broker.release(&r.lease_id)?;
        Ok(pb::ReleaseResponse { released })
    }

    /// Renew for an authenticated caller.
    pub(crate) fn renew_op(
        &self,
        who: &Principal,
        r: pb::RenewRequest,
    ) -> Result<pb::RenewResponse, Status> {
        self.check_lease(who, &r.lease_id)?;
        let (at, ttl) = self
            .broker
            .renew(&r.lease_id, Duration::from_millis(r.extend_ms))?;
        Ok(pb::RenewResponse {
            lease_expires_at_ms: self.broker.clock().unix_ms(at),
            lease_ttl_ms: ms(ttl),
        })
    }

    /// Report for an authenticated caller.
    pub(crate) fn report_op(
        &self,
        who: &Principal,
        r: pb::ReportRequest,
    ) -> Result<pb::ReportResponse, Status> {
        let tenant = required("tenant", &r.tenant, "demo")?;
        who.may_access(tenant)?;
        let oauth_client = bounded("oauth_client", &r.oauth_client)?;
        let (method, path) = call_of(&r.method, &r.path)?;
        if !(100..=599).contains(&r.http_status) {
            return Err(BrokerError::invalid(
                "http_status",
                format!("{} is not an HTTP status (100-599)", r.http_status),
            )
            .into());
        }
        let info = headers::parse(
            r.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            std::time::SystemTime::now(),
        );
        // Retry-After as sent by the upstream first, then the client's
        // conversion of it.
        let retry_after = info
            .retry_after
            .or((r.retry_after_ms > 0).then(|| Duration::from_millis(r.retry_after_ms)));
        let outcome = self.broker.report(
            tenant,
            (&method, &path, oauth_client),
            r.http_status,
            retry_after,
            &info,
        )?;
        Ok(pb::ReportResponse {
            buckets: outcome.buckets,
            attributed_to: outcome.attributed_to.unwrap_or_default(),
        })
    }
}

#[tonic::async_trait]
impl pb::quota_broker_server::QuotaBroker for BrokerService {
    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let who = principal(&self.auth, &request)?;
        Ok(Response::new(
            self.acquire_op(&who, request.into_inner()).await?,
        ))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let who = principal(&self.auth, &request)?;
        Ok(Response::new(self.release_op(&who, request.into_inner())?))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let who = principal(&self.auth, &request)?;
        Ok(Response::new(self.renew_op(&who, request.into_inner())?))
    }

    async fn report(
        &self,
        request: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let who = principal(&self.auth, &request)?;
        Ok(Response::new(self.report_op(&who, request.into_inner())?))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let who = principal(&self.auth, &request)?;
        let tenant = request.into_inner().tenant;
        if !tenant.is_empty() {
            who.may_access(&tenant)?;
        }
        let rx = self
            .broker
            .watch((!tenant.is_empty()).then_some(tenant.as_str()), |t| {
                who.sees(t)
            })?;
        let clock = self.broker.clock();
        let stream = ReceiverStream::new(rx).map(move |s| Ok(status_to_pb(s, clock)));
        Ok(Response::new(Box::pin(stream)))
    }

    type LeaseStreamStream = LeaseStreamOut;

    async fn lease_stream(
        &self,
        request: Request<tonic::Streaming<pb::LeaseStreamRequest>>,
    ) -> Result<Response<LeaseStreamOut>, Status> {
        let who = principal(&self.auth, &request)?;
        let rx = crate::stream::serve(self.clone(), who, request.into_inner());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
