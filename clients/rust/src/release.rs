//! Releases of leases: sent with the Acquire that granted them only when
//! that cannot free a slot since given to someone else, sent in the
//! background for a dropped lease (counted until done, for
//! [`BrokerClient::settle`]) or for an Acquire whose caller went away, and
//! kept when the broker is away.

use crate::client::Inner;
use crate::error::{is_unreachable, may_have_reached_a_broker, RpcError};
use crate::BrokerClient;
use quota_broker::pb::{AcquireRequest, ReleaseRequest, ReleaseResponse};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

impl BrokerClient {
    /// Waits until the releases of dropped leases have reached the broker
    /// (or failed), at most `within`; returns how many are still on their
    /// way. A process about to exit calls it so that the slots its leases
    /// held come back now, not at their expiry.
    pub async fn settle(&self, within: Duration) -> usize {
        use std::sync::atomic::Ordering::Acquire;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let released = self.inner.released.notified();
            tokio::pin!(released);
            // Registered before the count is read: a release ending in
            // between still wakes it.
            released.as_mut().enable();
            let left = self.inner.releasing.load(Acquire);
            if left == 0 || tokio::time::Instant::now() >= deadline {
                return left;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return self.inner.releasing.load(Acquire);
            }
        }
    }

    /// Sends `req`. One carrying the Acquire that granted its lease goes
    /// without it first, and with it only if a broker answered that it
    /// does not know the lease (it restarted after a crash, or leads since
    /// a failover) and no attempt may have been processed before: adopted
    /// and released on a release some broker already processed (its answer
    /// lost), it would free a slot since granted to someone else.
    pub(crate) async fn send_release_adopting(
        &self,
        req: &ReleaseRequest,
        reached: &AtomicBool,
    ) -> Result<ReleaseResponse, RpcError> {
        let bare = ReleaseRequest {
            acquired_with: None,
            ..req.clone()
        };
        let answer = self
            .rpc_noting(reached, |mut c| {
                let req = self.request(bare.clone());
                async move { c.release(req).await }
            })
            .await?;
        if answer.released || req.acquired_with.is_none() || reached.load(Ordering::Acquire) {
            return Ok(answer);
        }
        self.rpc_noting(reached, |mut c| {
            let req = self.request(req.clone());
            async move { c.release(req).await }
        })
        .await
    }

    pub(crate) async fn send_release(
        &self,
        req: &ReleaseRequest,
    ) -> Result<ReleaseResponse, RpcError> {
        self.rpc(|mut c| {
            let req = self.request(req.clone());
            async move { c.release(req).await }
        })
        .await
    }

    /// Sends `req` in a task of its own, counted for [`BrokerClient::settle`].
    /// Outside a runtime nothing is sent: the slot comes back at its expiry.
    pub(crate) fn release_in_background(&self, req: ReleaseRequest) {
        use std::sync::atomic::Ordering::AcqRel;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.inner.releasing.fetch_add(1, AcqRel);
            let counted = Releasing(self.inner.clone());
            let client = self.clone();
            rt.spawn(async move {
                let _counted = counted;
                client.release_or_keep(req).await;
            });
        } else {
            static SAID: AtomicBool = AtomicBool::new(false);
            if !SAID.swap(true, Ordering::Relaxed) {
                tracing::warn!(lease = %req.lease_id,
                    "a lease dropped outside a Tokio runtime cannot be released: its slot comes \
                     back at the lease's expiry (release leases before the runtime ends; said once)");
            }
        }
    }

    pub(crate) async fn release_or_keep(&self, req: ReleaseRequest) {
        let reached = AtomicBool::new(false);
        match self.send_release_adopting(&req, &reached).await {
            // Away (restarting, a cluster between leaders): sent once a
            // broker answers again, so a next leader that took the lease
            // over frees its slot then rather than at its expiry.
            Err(RpcError::Status(e)) if is_unreachable(&e) => {
                tracing::debug!(error = %e, "release failed; kept for when the broker answers");
                if may_have_reached_a_broker(&e) {
                    reached.store(true, Ordering::Release);
                }
                self.kept().keep_release(without_adoption(req, &reached));
            }
            Err(e) => {
                tracing::debug!(error = %e, "release refused; the slot comes back at its expiry")
            }
            Ok(_) => {}
        }
    }
}

/// `req` as kept for later: without the Acquire that granted its lease if
/// an attempt may have been processed already (see
/// [`BrokerClient::send_release_adopting`]).
pub(crate) fn without_adoption(mut req: ReleaseRequest, reached: &AtomicBool) -> ReleaseRequest {
    if reached.load(Ordering::Acquire) {
        req.acquired_with = None;
    }
    req
}

/// A release of a dropped lease on its way: uncounted when it ends, also
/// if its task is cancelled or panics (see [`BrokerClient::settle`]).
struct Releasing(Arc<Inner>);

impl Drop for Releasing {
    fn drop(&mut self) {
        if self
            .0
            .releasing
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.released.notify_waiters();
        }
    }
}

/// An Acquire sent and not answered yet. Dropped so (the caller's own
/// timeout, a task aborted at a signal), a lease the broker granted it as
/// the caller went away would hold its slots to its expiry with nobody
/// holding it: it is released by the Acquire's idempotency key, as a
/// dropped lease is by its id (a waiting Acquire the broker still had
/// queued leaves the queue by itself; the release then finds nothing).
pub(crate) struct Unanswered<'a> {
    client: &'a BrokerClient,
    release: Option<ReleaseRequest>,
}

impl<'a> Unanswered<'a> {
    pub(crate) fn of(client: &'a BrokerClient, req: &AcquireRequest) -> Unanswered<'a> {
        let release = (!req.idempotency_key.is_empty()).then(|| ReleaseRequest {
            tenant: req.tenant.clone(),
            acquire_key: req.idempotency_key.clone(),
            ..Default::default()
        });
        Unanswered { client, release }
    }

    pub(crate) fn answered(mut self) {
        self.release = None;
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some(req) = self.release.take() {
            self.client.release_in_background(req);
        }
    }
}
