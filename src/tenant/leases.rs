//! Slot-holding leases of a tenant: release, renew, and the slots a lease
//! gives back when released or expired.

use super::{AcquireArgs, TenantState};
use crate::error::BrokerError;
use crate::limits::{Lease, LeaseId};
use std::time::Duration;
use tokio::time::Instant;

/// How long a key released before any Acquire under it was granted is
/// remembered (longer than any Acquire waits, `server.max_wait_ms` at most
/// an hour, plus its way here).
const EARLY_RELEASE_KEPT: Duration = Duration::from_secs(3660);
/// Most such keys remembered per tenant (the oldest forgotten first).
const EARLY_RELEASES: usize = 1024;

impl TenantState {
    /// Notes that slot-holding lease `id` was granted to an Acquire with
    /// idempotency key `key`, for [`TenantState::release_by_key`]: every
    /// lease under one key (a client that sent the Acquire again to this
    /// broker after no answer, a frozen broker reading both). Entries of
    /// leases that ended are dropped once they outnumber the live ones.
    pub fn granted_with_key(&mut self, key: &str, id: LeaseId) {
        if self.acquire_keys.len() >= 64 + 2 * self.leases.len() {
            let leases = &self.leases;
            self.acquire_keys.retain(|_, ids| {
                ids.retain(|l| leases.get(l.seq, l.nonce).is_some());
                !ids.is_empty()
            });
        }
        self.acquire_keys
            .entry(Box::from(key))
            .or_default()
            .push(id);
    }

    /// Returns the slots of the leases granted to Acquires with idempotency
    /// key `key` (their answers never reached the client); false if none
    /// held any. A key no lease was granted under yet is remembered: the
    /// Acquire may still be on its way (read from a connection the client
    /// gave up on, decided after this release that came on a new one), and
    /// a lease granted under it later is given back at once.
    pub fn release_by_key(&mut self, key: &str) -> bool {
        let Some(ids) = self.acquire_keys.remove(key) else {
            let now = self.latest;
            if self.released_early.len() >= EARLY_RELEASES {
                self.released_early.retain(|_, until| *until > now);
                if self.released_early.len() >= EARLY_RELEASES {
                    let oldest = self
                        .released_early
                        .iter()
                        .min_by_key(|(_, until)| **until)
                        .map(|(k, _)| k.clone());
                    if let Some(k) = oldest {
                        self.released_early.remove(&k);
                    }
                }
            }
            self.released_early
                .insert(Box::from(key), now + EARLY_RELEASE_KEPT);
            return false;
        };
        let mut released = false;
        for id in ids {
            released |= self.release(id);
        }
        released
    }

    /// Lease `id`, holding slots, was granted to an Acquire with key `key`:
    /// noted for [`TenantState::release_by_key`], or, if the key was
    /// released already, its slots given back at once.
    pub(super) fn granted_keyed(&mut self, key: &str, id: LeaseId, now: Instant) {
        match self.released_early.remove(key) {
            Some(until) if until > now => {
                self.release(id);
            }
            _ => self.granted_with_key(key, id),
        }
    }

    /// Returns a lease's slots; false if it holds none (unknown, released,
    /// expired, or a lease of rate buckets only).
    pub fn release(&mut self, id: LeaseId) -> bool {
        self.expire_leases(self.latest);
        let Some(lease) = self.leases.remove(id.seq, id.nonce) else {
            return false;
        };
        self.give_back(&lease);
        true
    }

    /// Gives back the slots of leases that expired by `now`. The driver
    /// does it on time; a call that comes first does it itself, so nothing
    /// it decides (or a renewal it accepts) counts an expired lease. Not
    /// while this broker does not lead the tenant (see `tick`).
    pub(super) fn expire_leases(&mut self, now: Instant) {
        if !self.leads(now) {
            return;
        }
        while let Some((seq, lease)) = self.leases.pop_expired(now) {
            tracing::info!(
                tenant = %self.id,
                lease = %LeaseId { tenant: self.tag, seq, nonce: lease.nonce },
                client_id = %lease.client_id,
                "lease expired without release; its slots are back"
            );
            self.give_back(&lease);
        }
    }

    /// Notes a lease that expires at `at`: if that is before the driver's
    /// next run, the driver must be woken to expire it on time.
    pub(super) fn expires_at(&mut self, at: Instant) {
        if self.driver_next.is_none_or(|next| at < next) {
            self.wake_driver = true;
        }
    }

    /// Whether the driver must be woken (see `expires_at`); clears it.
    pub fn take_wake_driver(&mut self) -> bool {
        std::mem::take(&mut self.wake_driver)
    }

    pub(super) fn give_back(&mut self, lease: &Lease) {
        for &i in &lease.instances {
            if let Some(s) = self.instances.get_mut(i).and_then(|x| x.slots.as_mut()) {
                s.give_back(lease.permits);
            }
            self.touch(i);
        }
    }

    /// Extends a lease's slots to `now + extend` (`None`: its default TTL).
    /// A lease this run does not know, renewed with the Acquire that granted
    /// it (`acquired_with`) while the restart learning mode lasts, is
    /// adopted.
    pub fn renew(
        &mut self,
        id: LeaseId,
        extend: Option<Duration>,
        acquired_with: Option<&AcquireArgs>,
        now: Instant,
    ) -> Result<(Instant, Duration), BrokerError> {
        let now = self.monotonic(now);
        self.expire_leases(now);
        let not_found = || BrokerError::LeaseNotFound {
            lease_id: id.to_string(),
        };
        let Some(default_ttl) = self.leases.get(id.seq, id.nonce).map(|l| l.ttl) else {
            return match acquired_with {
                Some(args) => self.adopt(id, args, extend, now)?.ok_or_else(not_found),
                None => Err(not_found()),
            };
        };
        let ttl = extend.unwrap_or(default_ttl);
        let expires_at = now + ttl;
        self.leases
            .renew(id.seq, id.nonce, expires_at)
            .ok_or_else(not_found)?;
        self.expires_at(expires_at);
        Ok((expires_at, ttl))
    }
}
