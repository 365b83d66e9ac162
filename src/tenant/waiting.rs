//! The waiting side of a tenant: requests queue, leave when their wait ends
//! or their caller goes, and are granted by the driver's
//! [`TenantState::tick`] the moment capacity frees, in the order the
//! scheduler picks.

use super::{AcquireArgs, Denial, Grant, Queued, Reply, TenantState, SWEEP_EVERY};
use crate::limits::{Offer, Waiter};
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::time::Instant;

impl TenantState {
    /// Puts a request that may wait in the queue.
    pub(super) fn enqueue(
        &mut self,
        instances: Vec<usize>,
        class: usize,
        args: &AcquireArgs,
        deadline: Instant,
        now: Instant,
    ) -> Queued {
        // It holds from now, not from the driver's next pass: a smaller
        // request must not take what it waits for ahead of it meanwhile.
        // (One queued only behind the holds of others, with capacity on all
        // its buckets, adds none: theirs cover it.)
        let share = self.bucket_share(class, &instances, now);
        if !self.can_take(&instances, args.permits, share, now) {
            let (holds, at) = self.holds_for(&instances, args.permits, share, now);
            let order = self.order(class);
            self.queue
                .hold_waiter(&instances, order, args.permits, holds, at);
        }
        for &i in &instances {
            if let Some(x) = self.instances.get_mut(i) {
                x.queued += 1;
                *x.waiting.entry(class).or_default() += 1;
            }
            self.touch(i);
        }
        let (tx, rx) = oneshot::channel();
        let waiter = self.queue.push(
            instances,
            args.permits,
            class,
            Arc::from(args.client_id.as_str()),
            Reply {
                tx,
                key: Box::from(args.idempotency_key.as_str()),
            },
        );
        Queued {
            waiter,
            deadline,
            reply: rx,
        }
    }

    pub(super) fn unqueue(&mut self, w: &Waiter<Reply>) {
        for &i in &w.instances {
            if let Some(x) = self.instances.get_mut(i) {
                x.queued = x.queued.saturating_sub(1);
                if x.queued == 0 {
                    self.queue.unhold(i);
                }
                if let Some(c) = x.waiting.get_mut(&w.class) {
                    *c -= 1;
                    if *c == 0 {
                        x.waiting.remove(&w.class);
                    }
                }
            }
            self.touch(i);
        }
    }

    /// Takes a waiter out of the queue (timeout or caller gone) and says why
    /// it was not granted; `None` if it already left (it was granted).
    pub fn withdraw(&mut self, waiter: u64, now: Instant) -> Option<Denial> {
        let now = self.monotonic(now);
        let w = self.queue.remove(waiter)?;
        self.unqueue(&w);
        let share = self.bucket_share(w.class, &w.instances, now);
        let denial = self.explain(&w.instances, w.permits, share, self.order(w.class), now);
        self.defer(&w.instances, w.class, now + denial.retry_after);
        Some(denial)
    }

    /// Hands a grant back (its waiter was gone before it could take it).
    pub fn undo(&mut self, grant: &Grant) {
        self.release(grant.lease_id);
    }

    /// Expires leases, serves waiters, drops idle instances; returns when to
    /// run again at the latest (`None`: only when something changes).
    pub fn tick(&mut self, now: Instant) -> Option<Instant> {
        let now = self.monotonic(now);
        if !self.leads(now) {
            // Cluster mode, not (or no longer) the leader: nothing is
            // granted, and no lease expires either: its holder cannot renew
            // here, and if this broker wins the tenant back as it left it,
            // each lease resumes the time it had left (`resume_lapsed`).
            return None;
        }
        self.expire_leases(now);
        let phantoms_end = self.end_phantoms(now);
        let mut queue = std::mem::take(&mut self.queue);
        let mut grants = Vec::new();
        let (granted, next_ready) = queue.serve(|w| {
            let share = self.bucket_share(w.class, &w.instances, now);
            if self.paused(&w.instances).is_none()
                && self.can_take(&w.instances, w.permits, share, now)
            {
                grants.push(self.take(&w.instances, w.permits, &w.client_id, now));
                return Offer::Granted;
            }
            // When it could be granted (unknown while a slot or a pause
            // stands in the way: a release or a resume wakes the driver).
            let (holds, at) = self.holds_for(&w.instances, w.permits, share, now);
            Offer::BlockedOn(at, holds)
        });
        self.queue = queue;
        for (w, grant) in granted.into_iter().zip(grants) {
            self.unqueue(&w);
            let (lease, slot) = (grant.lease_id, grant.slot.is_some());
            match w.reply.tx.send(Ok(grant)) {
                // The waiter's caller is gone and could not withdraw first
                // (it withdraws under this same lock): hand the grant back.
                Err(Ok(grant)) => self.undo(&grant),
                _ if slot && !w.reply.key.is_empty() => {
                    self.granted_keyed(&w.reply.key, lease, now)
                }
                _ => {}
            }
        }
        if now >= self.next_sweep {
            self.evict_idle(None, now);
            self.next_sweep = now + SWEEP_EVERY;
        }
        let next = [
            next_ready,
            self.leases.next_expiry(),
            Some(self.next_sweep),
            phantoms_end,
        ]
        .into_iter()
        .flatten()
        .min();
        self.driver_next = next;
        // This run planned for every lease granted so far.
        self.wake_driver = false;
        next
    }

    /// Answers every waiter (shutdown): they leave the queue unanswered and
    /// their callers see the channel closed.
    pub fn drop_waiters(&mut self) {
        let waiters = self.queue.drain();
        for w in &waiters {
            self.unqueue(w);
        }
    }
}
