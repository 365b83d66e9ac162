//! A lease held ([`Lease`]): renewed in the background while held, also
//! past its expiry while renewals fail, reported, released when dropped,
//! and counted against the fallback's cap on calls in flight.

use crate::client::Inner;
use crate::error::{ClientError, RpcError};
use crate::{BrokerClient, Call};
use quota_broker::pb::{AcquireRequest, ReleaseRequest, RenewRequest};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Permission for one upstream call. Holds its concurrency slot, renewing it
/// in the background, until dropped. Dropped, it releases the slot in a task
/// of the Tokio runtime it is dropped in; dropped outside one (after the
/// runtime shut down, e.g. held past the end of `#[tokio::main]`), nothing
/// can be sent and the slot comes back only at its lease's expiry (logged
/// once): release leases before the runtime ends, or call
/// [`Lease::release`].
pub struct Lease {
    client: BrokerClient,
    call: Call,
    id: String,
    renewer: Option<tokio::task::JoinHandle<()>>,
    holds_slot: bool,
    /// The buckets the broker granted it on (none for a fallback lease).
    buckets: Vec<String>,
    /// Its slots' time to live as granted (zero: it holds none).
    ttl: Duration,
    /// Counted against the fallback's cap on calls in flight while held.
    pub(crate) counted: Option<Counted>,
}

/// One lease counted in `Inner::in_flight` until dropped.
pub(crate) struct Counted(Arc<Inner>);

impl Counted {
    /// Counts one more, unless `cap` are counted already.
    pub(crate) fn take(inner: &Arc<Inner>, cap: usize) -> Option<Counted> {
        inner
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| Counted(inner.clone()))
    }

    /// Counts one more.
    fn add(inner: &Arc<Inner>) -> Counted {
        inner.in_flight.fetch_add(1, Ordering::AcqRel);
        Counted(inner.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_waiters();
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.id)
            .field("fallback", &self.is_fallback())
            .field("holds_slot", &self.holds_slot)
            .field("call", &self.call)
            .finish_non_exhaustive()
    }
}

impl Lease {
    pub(crate) fn new(client: BrokerClient, call: Call, id: String, ttl_ms: u64) -> Lease {
        let holds_slot = ttl_ms > 0;
        let counted = holds_slot.then(|| Counted::add(&client.inner));
        let renewer = holds_slot.then(|| {
            let (client, id, acquired) = (client.clone(), id.clone(), call.acquire_request());
            tokio::spawn(renew_while_held(client, id, acquired, ttl_ms))
        });
        Lease {
            client,
            call,
            id,
            renewer,
            holds_slot,
            buckets: Vec::new(),
            ttl: Duration::from_millis(ttl_ms),
            counted,
        }
    }

    pub(crate) fn with_buckets(mut self, buckets: Vec<String>) -> Lease {
        self.buckets = buckets;
        self
    }

    /// The buckets the broker granted this lease on (none for a fallback
    /// lease).
    pub fn buckets(&self) -> &[String] {
        &self.buckets
    }

    /// How long its slots are held without a renewal, as granted (renewed
    /// in the background at half of it while the lease is held); zero for a
    /// lease that holds no slot.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub(crate) fn local(client: BrokerClient, call: Call, counted: Option<Counted>) -> Lease {
        Lease {
            client,
            call,
            id: String::new(),
            renewer: None,
            holds_slot: false,
            buckets: Vec::new(),
            ttl: Duration::ZERO,
            counted,
        }
    }

    /// This lease's release, with the Acquire that granted it: a broker
    /// that restarted after a crash (or a cluster's next leader) never
    /// knew the lease, and frees its slot at once only if told that.
    fn release_request(&mut self) -> ReleaseRequest {
        let mut acquired_with = self.call.acquire_request();
        acquired_with.idempotency_key.clear();
        ReleaseRequest {
            lease_id: std::mem::take(&mut self.id),
            acquired_with: Some(acquired_with),
            ..Default::default()
        }
    }

    fn stop_renewing(&mut self) {
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
    }

    /// The broker's lease id ("" for a fallback lease).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether this lease came from the local fallback limiter.
    pub fn is_fallback(&self) -> bool {
        self.id.is_empty()
    }

    /// Reports how the upstream call went: its status and the rate-limit
    /// headers of its response.
    pub async fn report(&self, status: u16, headers: &http::HeaderMap) -> Result<(), ClientError> {
        self.client
            .report(&self.call, &self.id, status, headers)
            .await
    }

    /// Releases the slot now and waits for the broker to confirm (dropping
    /// the lease releases in the background instead, which a process that
    /// exits right after may not get to send).
    pub async fn release(mut self) {
        self.stop_renewing();
        if std::mem::take(&mut self.holds_slot) {
            let req = self.release_request();
            self.client.release_or_keep(req).await;
        }
    }

    /// Reports a 429 whose body says it is about requests in flight (see
    /// [`says_concurrency`]), with its headers.
    ///
    /// [`says_concurrency`]: crate::says_concurrency
    pub async fn report_concurrency_429(
        &self,
        headers: &http::HeaderMap,
    ) -> Result<(), ClientError> {
        self.client
            .report_outcome(&self.call, &self.id, 429, headers, true)
            .await
    }

    /// [`Lease::report`] for an `http::Response`.
    pub async fn report_response<B>(
        &self,
        response: &http::Response<B>,
    ) -> Result<(), ClientError> {
        self.report(response.status().as_u16(), response.headers())
            .await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop_renewing();
        if self.holds_slot {
            let req = self.release_request();
            self.client.release_in_background(req);
        }
    }
}

/// Whether a renewal refused with `code` may pass if tried again: the
/// broker was unreachable, overloaded or busy, not "no such lease" or a
/// refusal of the caller.
fn renewal_may_pass_later(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unavailable
            | ResourceExhausted
            | DeadlineExceeded
            | Aborted
            | Internal
            | Unknown
            | Cancelled
    )
}

/// Renews lease `id` at half its TTL for as long as it is held. A renewal
/// that fails for a while (broker restarting, overloaded, leader moving) is
/// tried again every eighth of the TTL, also past the lease's expiry: the
/// call still runs, so its slot is still in use upstream, and a restarted
/// broker or a cluster's next leader adopts a lease renewed within one TTL
/// of its start (`RenewRequest.acquired_with`), which an election longer
/// than a short TTL would otherwise miss. It stops when the broker says the
/// lease holds no slot or the caller may not renew it.
async fn renew_while_held(client: BrokerClient, id: String, acquired: AcquireRequest, ttl_ms: u64) {
    let mut ttl = Duration::from_millis(ttl_ms);
    let mut expires = tokio::time::Instant::now() + ttl;
    let mut wait = ttl / 2;
    let mut failing = false;
    let mut past_expiry = false;
    loop {
        tokio::time::sleep(wait).await;
        match client.renew(id.clone(), acquired.clone()).await {
            Ok(t) if !t.is_zero() => {
                if past_expiry {
                    tracing::info!(lease = %id, "lease renewed again after its expiry: the broker kept or adopted it");
                }
                (ttl, wait, failing, past_expiry) = (t, t / 2, false, false);
                expires = tokio::time::Instant::now() + t;
            }
            // The lease holds no slot any more.
            Ok(_) => return,
            Err(RpcError::Status(s)) if !renewal_may_pass_later(s.code()) => {
                tracing::warn!(lease = %id, error = %s, "lease can no longer be renewed");
                return;
            }
            Err(e @ RpcError::NotABroker(_)) => {
                tracing::warn!(lease = %id, error = %e, "lease can no longer be renewed");
                return;
            }
            Err(s) => {
                let left = expires.saturating_duration_since(tokio::time::Instant::now());
                if !failing {
                    tracing::warn!(lease = %id, error = %s, "lease renewal failed; trying again");
                } else if left.is_zero() && !past_expiry {
                    tracing::warn!(lease = %id, error = %s,
                        "lease passed its expiry while renewals failed; renewing on while it is held");
                } else {
                    tracing::debug!(lease = %id, error = %s, "lease renewal failed");
                }
                failing = true;
                past_expiry |= left.is_zero();
                wait = (ttl / 8).max(Duration::from_millis(100));
                if !left.is_zero() {
                    wait = wait.min(left);
                }
            }
        }
    }
}

impl BrokerClient {
    async fn renew(
        &self,
        lease_id: String,
        acquired_with: AcquireRequest,
    ) -> Result<Duration, RpcError> {
        let req = RenewRequest {
            lease_id,
            extend_ms: 0,
            acquired_with: Some(acquired_with),
        };
        self.rpc(|mut c| {
            let req = self.request(req.clone());
            async move { c.renew(req).await }
        })
        .await
        .map(|r| Duration::from_millis(r.lease_ttl_ms))
    }
}
