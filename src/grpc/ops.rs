//! The QuotaBroker operations for an authenticated caller: decode and
//! validate, call the [`Broker`], encode. Unary RPCs and LeaseStream
//! sessions run the same operations, so an operation answers the same
//! either way.

use super::codec::{bounded, call_of, denial_to_pb, grant_to_pb, required};
use crate::auth::Principal;
use crate::broker::{AcquireOutcome, Broker};
use crate::clock::millis;
use crate::error::BrokerError;
use crate::learning::parse_headers;
use crate::pb;
use crate::tenant::AcquireArgs;
use std::time::Duration;
use tonic::Status;

/// The operations, on one broker.
#[derive(Clone)]
pub(crate) struct Ops {
    broker: Broker,
}

impl Ops {
    /// Operations on `broker`.
    pub(crate) fn new(broker: Broker) -> Ops {
        Ops { broker }
    }

    /// The broker the operations run on.
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

impl Ops {
    /// Acquire for an authenticated caller (unary and LeaseStream alike).
    pub(crate) async fn acquire_op(
        &self,
        who: &Principal,
        r: pb::AcquireRequest,
    ) -> Result<pb::AcquireResponse, Status> {
        let max_wait = r.max_wait_ms.map(Duration::from_millis);
        let (tenant, args) = acquire_args_owned(who, r)?;
        let outcome = self.broker.acquire(&tenant, args, max_wait).await?;
        Ok(match outcome {
            AcquireOutcome::Granted(g) => grant_to_pb(g, self.broker.clock()),
            AcquireOutcome::Denied(d) => denial_to_pb(d),
        })
    }

    /// Release for an authenticated caller.
    pub(crate) fn release_op(
        &self,
        who: &Principal,
        r: pb::ReleaseRequest,
    ) -> Result<pb::ReleaseResponse, Status> {
        // Naming nothing, it releases nothing: what a client falling back
        // sends to learn whether a broker answers again (not a refusal to
        // log each time).
        if r.lease_id.is_empty() && r.acquire_key.is_empty() {
            return Ok(pb::ReleaseResponse { released: false });
        }
        if r.lease_id.is_empty() {
            let tenant = required("tenant", &r.tenant, "demo")?;
            who.may_access(tenant)?;
            let key = bounded("acquire_key", &r.acquire_key)?;
            let released = self.broker.release_by_key(tenant, key)?;
            return Ok(pb::ReleaseResponse { released });
        }
        self.check_lease(who, &r.lease_id)?;
        // The Acquire is only of use for a lease this broker does not
        // know: a live lease is released whatever it says, and the
        // Acquire is refused only when it was needed.
        let released = match r.acquired_with.as_ref().map(|a| acquire_args(who, a)) {
            None => self.broker.release(&r.lease_id, None)?,
            Some(Ok((tenant, args))) => self
                .broker
                .release(&r.lease_id, Some((tenant.as_str(), &args)))?,
            Some(Err(refused)) => {
                if !self.broker.release(&r.lease_id, None)? {
                    return Err(refused);
                }
                true
            }
        };
        Ok(pb::ReleaseResponse { released })
    }

    /// Renew for an authenticated caller.
    pub(crate) fn renew_op(
        &self,
        who: &Principal,
        r: pb::RenewRequest,
    ) -> Result<pb::RenewResponse, Status> {
        self.check_lease(who, &r.lease_id)?;
        let acquired_with = r
            .acquired_with
            .as_ref()
            .map(|a| acquire_args(who, a))
            .transpose()?;
        let (at, ttl) = self.broker.renew(
            &r.lease_id,
            Duration::from_millis(r.extend_ms),
            acquired_with.as_ref().map(|(t, a)| (t.as_str(), a)),
        )?;
        Ok(pb::RenewResponse {
            lease_expires_at_ms: self.broker.clock().unix_ms(at),
            lease_ttl_ms: millis(ttl),
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
        let key = bounded("idempotency_key", &r.idempotency_key)?;
        let (method, path) = call_of(&r.method, &r.path)?;
        if !(100..=599).contains(&r.http_status) {
            return Err(BrokerError::invalid(
                "http_status",
                format!("{} is not an HTTP status (100-599)", r.http_status),
            )
            .into());
        }
        let info = parse_headers(
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
            (r.http_status, r.concurrency_limited),
            retry_after,
            &info,
            key,
        )?;
        Ok(pb::ReportResponse {
            buckets: outcome.buckets,
            attributed_to: outcome.attributed_to.unwrap_or_default(),
        })
    }
}

/// [`acquire_args`], moving the request's strings instead of copying them
/// (the hot path: four allocations fewer per call).
fn acquire_args_owned(
    who: &Principal,
    mut r: pb::AcquireRequest,
) -> Result<(String, AcquireArgs), Status> {
    let (_, checked) = acquire_args_checked(who, &r)?;
    let args = AcquireArgs {
        client_id: std::mem::take(&mut r.client_id),
        class: std::mem::take(&mut r.priority_class),
        oauth_client: std::mem::take(&mut r.oauth_client),
        idempotency_key: std::mem::take(&mut r.idempotency_key),
        ..checked
    };
    Ok((r.tenant, args))
}

/// Validates an Acquire for `who`: its tenant, and its arguments with the
/// caller's strings left empty (the method and path are normalised copies).
fn acquire_args_checked<'r>(
    who: &Principal,
    r: &'r pb::AcquireRequest,
) -> Result<(&'r str, AcquireArgs), Status> {
    let tenant = required("tenant", &r.tenant, "demo")?;
    who.may_access(tenant)?;
    required("client_id", &r.client_id, "ingest-worker-1")?;
    bounded("priority_class", &r.priority_class)?;
    bounded("oauth_client", &r.oauth_client)?;
    bounded("idempotency_key", &r.idempotency_key)?;
    let (method, path) = call_of(&r.method, &r.path)?;
    let args = AcquireArgs {
        client_id: String::new(),
        class: String::new(),
        method,
        path,
        oauth_client: String::new(),
        permits: r.permits.max(1),
        idempotency_key: String::new(),
    };
    Ok((tenant, args))
}

/// Decodes and validates an Acquire for `who`: its tenant and arguments.
fn acquire_args(who: &Principal, r: &pb::AcquireRequest) -> Result<(String, AcquireArgs), Status> {
    let (tenant, checked) = acquire_args_checked(who, r)?;
    let args = AcquireArgs {
        client_id: r.client_id.clone(),
        class: r.priority_class.clone(),
        oauth_client: r.oauth_client.clone(),
        ..checked
    };
    Ok((tenant.to_owned(), args))
}
