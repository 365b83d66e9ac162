//! The decision on an Acquire: resolve the call's instances and the class's
//! share, then take from every instance or from none; when that is not
//! possible now, explain why and when it could be, and queue the request if
//! it may wait.

use super::instance::Share;
use super::{AcquireArgs, Decision, Denial, Grant, TenantState};
use crate::clock::millis;
use crate::error::BrokerError;
use crate::limits::{Hold, Holds, Lease, LeaseId, Rest};
use std::fmt::Write as _;
use std::time::Duration;
use tokio::time::Instant;

/// Shortest retry told to a request refused behind earlier waiters.
const QUEUED_BACKOFF: Duration = Duration::from_millis(250);
/// Longest: the waiters ahead may be served sooner than estimated.
const MAX_QUEUED_BACKOFF: Duration = Duration::from_secs(30);
/// Waiters counted in the estimate (the queue's length bounds nothing else).
const MAX_QUEUED_ESTIMATE: u32 = 10_000;

/// What a paused bucket's denial says to wait before asking again: a pause
/// has no end an operator states, and 0 had every caller that honours it
/// ask again at once, in a loop.
pub(crate) const PAUSED_RETRY: Duration = Duration::from_secs(5);

/// When to retry a request for more permits than a bucket holds now (its
/// burst shrank under a stated limit, which lasts until the upstream says
/// otherwise): not at once.
const NEVER_FITS_RETRY: Duration = Duration::from_secs(60);

impl TenantState {
    /// Decides an Acquire: granted at once, denied (with when it could be
    /// granted and why not), or queued until capacity frees for at most its
    /// wait: `max_wait`, else the class's default, capped by the server's.
    pub fn acquire(
        &mut self,
        args: &AcquireArgs,
        max_wait: Option<Duration>,
        now: Instant,
    ) -> Result<Decision, BrokerError> {
        let now = self.monotonic(now);
        if let Some(e) = self.not_leading(now) {
            return Err(e);
        }
        self.expire_leases(now);
        let class = self.class_index(&args.class)?;
        let reserve = self.reserve_above(class);
        let wait = max_wait
            .unwrap_or_else(|| {
                self.classes
                    .get(class)
                    .map_or(Duration::ZERO, |c| c.default_max_wait)
            })
            .min(self.max_wait);
        let instances = match self.resolve(
            &args.method,
            &args.path,
            &args.oauth_client,
            args.permits,
            reserve,
            now,
        )? {
            Ok(i) => i,
            Err(denial) => return Ok(Decision::Denied(denial)),
        };
        if let Some(denial) = self.paused(&instances) {
            return Ok(Decision::Denied(denial));
        }
        let share = self.bucket_share(class, &instances, now);
        if !self.held_from(&instances, args.permits, self.order(class), now)
            && self.can_take(&instances, args.permits, share, now)
        {
            let grant = self.take(&instances, args.permits, &args.client_id, now);
            if grant.slot.is_some() && !args.idempotency_key.is_empty() {
                self.granted_keyed(&args.idempotency_key, grant.lease_id, now);
            }
            return Ok(Decision::Granted(grant));
        }
        let denial = self.explain(&instances, args.permits, share, self.order(class), now);
        let back = now + denial.retry_after;
        let full = instances.iter().find_map(|&i| {
            let x = self.instances.get(i)?;
            (x.queued >= self.max_waiters).then(|| self.buckets[x.bucket].settings.name.clone())
        });
        if let Some(bucket) = full {
            self.defer(&instances, class, back);
            return Ok(Decision::Denied(Denial {
                reason: format!(
                    "{}; and {} requests already wait on bucket {bucket:?} \
                     (scheduling.max_waiters_per_bucket), so this one may not queue",
                    denial.reason, self.max_waiters
                ),
                ..denial
            }));
        }
        // Frozen past the end of its wait, it cannot be granted within it:
        // told at once when to come back, not held for nothing (a caller
        // that waits 20 s on a bucket frozen for 33 s learned it at 20 s).
        let frozen_past_wait = instances.iter().any(|&i| {
            self.instances
                .get(i)
                .and_then(|x| x.learner.frozen_until(now))
                .is_some_and(|until| until > now + wait)
        });
        if wait.is_zero() || frozen_past_wait {
            self.defer(&instances, class, back);
            return Ok(Decision::Denied(denial));
        }
        // Likewise when the bucket's refill at its rate cannot give the
        // permits within the wait (a bucket that starts empty after a
        // restart, a class waiting for the reserve above it): the caller
        // learns now, not at the end of its wait. A tenth of the wait is
        // left for the rate to grow meanwhile; slots, which a release may
        // free at any moment, never refuse early.
        let refilled_past_wait = instances.iter().any(|&i| {
            self.instances
                .get(i)
                .and_then(|x| x.rate_ready_at(args.permits, share, now).ok())
                .is_some_and(|at| at > now + wait + wait / 10)
        });
        if refilled_past_wait {
            self.defer(&instances, class, back);
            return Ok(Decision::Denied(Denial {
                reason: format!(
                    "{}; at the bucket's rate that is past this call's wait of {} ms, so it is \
                     answered now",
                    denial.reason,
                    wait.as_millis()
                ),
                ..denial
            }));
        }
        Ok(Decision::Queued(self.enqueue(
            instances,
            class,
            args,
            now + wait,
            now,
        )))
    }

    /// A denial if any of `instances` belongs to a paused bucket.
    #[inline]
    pub(super) fn paused(&self, instances: &[usize]) -> Option<Denial> {
        instances.iter().find_map(|&i| {
            let def = &self.buckets[self.instances.get(i)?.bucket];
            def.paused.as_ref().map(|why| Denial {
                retry_after: PAUSED_RETRY,
                reason: format!(
                    "bucket {:?} is paused by an operator: {why}",
                    def.settings.name
                ),
                buckets: self.names(instances),
            })
        })
    }

    #[inline]
    pub(super) fn can_take(&self, instances: &[usize], n: u32, share: Share, now: Instant) -> bool {
        instances.iter().all(|&i| {
            self.instances
                .get(i)
                .is_some_and(|x| x.ready_at(n, share, now).is_ok_and(|t| t <= now))
        })
    }

    /// How a request for `n` on `instances` that cannot be granted holds
    /// them while it waits (see [`crate::limits::Holds`]), and when it could
    /// be granted, if known. Lacking something with no known time (a slot,
    /// a paused bucket), it holds only what it lacks: its other buckets
    /// stay open to other requests meanwhile (one waiting for a slot must
    /// not stall every call sharing its rate bucket). Lacking only permits
    /// that refill at a known time, it holds those and spares the rest: a
    /// new request may take from them only what leaves this one's permits
    /// there when its wait ends. Holding only what it lacked, it could lose
    /// its slot to a newcomer each time its permits came back, and wait for
    /// ever; holding the rest outright, a backlog on one rate-limited
    /// bucket would stall every call that shares another with it.
    pub(super) fn holds_for(
        &self,
        instances: &[usize],
        n: u32,
        share: Share,
        now: Instant,
    ) -> (Holds, Option<Instant>) {
        let mut lacking = 0;
        let mut indefinitely = false;
        let mut at = Some(now);
        for (j, &i) in instances.iter().enumerate() {
            let paused = self.paused(&[i]).is_some();
            let ready = self
                .instances
                .get(i)
                .map_or(Err(()), |x| x.ready_at(n, share, now));
            match ready {
                Ok(t) if !paused => {
                    at = at.map(|a| a.max(t));
                    if t > now {
                        lacking |= crate::limits::place_bit(j);
                    }
                }
                _ => {
                    indefinitely = true;
                    at = None;
                    lacking |= crate::limits::place_bit(j);
                }
            }
        }
        let rest = if indefinitely {
            Rest::Open
        } else {
            Rest::Spared
        };
        (Holds { lacking, rest }, at)
    }

    /// Whether a hold of a waiter of order `order` or above keeps `n`
    /// permits on `instances` from a new request now: held outright, or
    /// spared but taking `n` would leave less than the waiter's permits
    /// there when its wait ends.
    pub(super) fn held_from(&self, instances: &[usize], n: u32, order: u32, now: Instant) -> bool {
        instances
            .iter()
            .any(|&i| match self.queue.hold_on(i, order) {
                None => false,
                Some(Hold { spare: None, .. }) => true,
                Some(Hold {
                    spare: Some((p, at)),
                    ..
                }) => !self.spares(i, n, p, at, now),
            })
    }

    /// Whether instance `i` can give `n` now and still `p` at `at`.
    fn spares(&self, i: usize, n: u32, p: u32, at: Instant, now: Instant) -> bool {
        let Some(x) = self.instances.get(i) else {
            return false;
        };
        // The upstream's own budget view is shared with consumers the broker
        // does not manage: nothing is promised from it.
        if x.upstream.is_some() {
            return false;
        }
        if x.slots.is_some_and(|s| !s.has_room(n.saturating_add(p))) {
            return false;
        }
        x.tokens
            .as_ref()
            .is_none_or(|t| t.fits_after(n, p, at, now))
    }

    /// Takes `n` from every instance; the caller has checked [`Self::can_take`].
    pub(super) fn take(
        &mut self,
        instances: &[usize],
        n: u32,
        client_id: &str,
        now: Instant,
    ) -> Grant {
        let mut slot_instances = Vec::new();
        let mut ttl: Option<Duration> = None;
        for &i in instances {
            let Some(x) = self.instances.get_mut(i) else {
                continue;
            };
            if let Some(t) = x.tokens.as_mut() {
                t.take(n, now);
            }
            if let Some(u) = x.upstream.as_mut() {
                u.take(n, now);
            }
            if let Some(k) = x.kept.as_mut() {
                k.view.take(n, now);
            }
            if let Some(s) = x.slots.as_mut() {
                s.take(n);
                slot_instances.push(i);
                let bucket_ttl = self.buckets[x.bucket].settings.lease_ttl;
                ttl = Some(ttl.map_or(bucket_ttl, |t| t.min(bucket_ttl)));
            }
            x.granted_total += u64::from(n);
            self.touch(i);
        }
        let seq = self.leases.next_seq();
        let nonce = fastrand::u32(..);
        let slot = ttl.map(|ttl| {
            let expires_at = now + ttl;
            self.leases.insert(
                seq,
                Lease {
                    nonce,
                    instances: slot_instances,
                    permits: n,
                    expires_at,
                    ttl,
                    client_id: client_id.to_owned(),
                },
            );
            self.expires_at(expires_at);
            (expires_at, ttl)
        });
        Grant {
            lease_id: LeaseId {
                tenant: self.tag,
                seq,
                nonce,
            },
            permits: n,
            slot,
            buckets: self.names(instances),
        }
    }

    /// Why `n` permits on `instances` cannot be granted now, and when they
    /// could be at the earliest.
    pub(super) fn explain(
        &self,
        instances: &[usize],
        n: u32,
        share: Share,
        order: u32,
        now: Instant,
    ) -> Denial {
        let mut retry = now;
        let mut reason = String::new();
        for &i in instances {
            let Some(x) = self.instances.get(i) else {
                continue;
            };
            let name = &self.buckets[x.bucket].settings.name;
            let sep = if reason.is_empty() { "" } else { "; " };
            if let Some(resume) = x.resume_at.filter(|&r| r > now) {
                let ready = x.ready_at(n, share, now).unwrap_or(resume);
                retry = retry.max(ready);
                let _ = write!(
                    reason,
                    "{sep}bucket {name:?} is frozen for {} ms after the upstream answered 429",
                    millis(resume.saturating_duration_since(now))
                );
                // The bucket restarts empty: a class below others first
                // waits for the permits it leaves them to refill.
                let held = x.tokens.as_ref().map_or(0.0, |t| share.tokens(t.burst()));
                if held >= 1.0 && ready > resume + Duration::from_millis(1) {
                    let _ = write!(
                        reason,
                        ", then refills empty: this class waits for the {held:.0} permits it \
                         leaves higher classes (about {} ms in all)",
                        millis(ready.saturating_duration_since(now))
                    );
                }
                continue;
            }
            if let Some(at) = x.upstream.and_then(|u| u.ready_at(n, now)) {
                retry = retry.max(at);
                let _ = write!(
                    reason,
                    "{sep}bucket {name:?}: the upstream reports {} requests left before its \
                     window resets, shared with consumers the broker does not manage",
                    x.upstream.and_then(|u| u.remaining(now)).unwrap_or(0)
                );
                continue;
            }
            if let Some((k, at)) = x
                .kept
                .as_ref()
                .filter(|_| share.leaves_kept)
                .and_then(|k| Some((k, k.ready_at(n, now)?)))
                .filter(|&(_, at)| at > now)
            {
                // The bucket and the slots may hold it longer.
                retry = retry.max(x.ready_at(n, share, now).unwrap_or(at));
                let _ = write!(
                    reason,
                    "{sep}bucket {name:?}: the upstream's bucket has {:.1} of {} permits left, \
                     and {} are left in it for consumers the broker does not manage",
                    k.view.available(now),
                    k.view.burst(),
                    k.floor
                );
                continue;
            }
            let note = |capacity: u32| match share.slots(capacity) {
                0 => String::new(),
                held => format!(", {held} held back for higher classes"),
            };
            if let Some(s) = x
                .slots
                .filter(|s| !s.has_room(n.saturating_add(share.slots(s.max()))))
            {
                // The first slot back: a known lease's expiry, or the
                // end of the slots counted for an earlier run's unknown
                // leases after a restart.
                let phantoms = x.phantom_until.filter(|_| x.phantom > 0);
                let at = match (self.leases.first_expiry_holding(i), phantoms) {
                    (Some(lease), Some(phantom)) => lease.min(phantom),
                    (lease, phantom) => lease.or(phantom).unwrap_or(now),
                };
                retry = retry.max(at);
                let _ = write!(
                    reason,
                    "{sep}bucket {name:?} has {} of {} concurrency slots in use{}",
                    s.in_flight(),
                    s.max(),
                    note(s.max())
                );
                if phantoms.is_some() {
                    let _ = write!(
                        reason,
                        " ({} of them counted for leases of the run before a restart: each is \
                         freed when its holder renews or releases it, all once those leases \
                         would have expired)",
                        x.phantom
                    );
                }
                continue;
            }
            if let Some(t) = x.tokens.as_ref() {
                let Some(at) = t.ready_at_reserved(n, share.tokens(t.burst()), now) else {
                    // More than the bucket holds now: its burst shrank
                    // under a limit the upstream stated.
                    retry = retry.max(now + NEVER_FITS_RETRY);
                    let _ = write!(
                        reason,
                        "{sep}bucket {name:?} holds at most {} permits now (under the limit the \
                         upstream states, {:.1}/min): {n} asked cannot be granted at once while \
                         it stands",
                        t.burst(),
                        t.rate_per_min()
                    );
                    continue;
                };
                if at > now {
                    retry = retry.max(at);
                    let (available, per_min) = (t.available(now), t.rate_per_min());
                    let _ = match share.slots(t.burst()) {
                        0 => write!(
                            reason,
                            "{sep}bucket {name:?} has {available:.2} permits for {n} asked \
                             (refills at {per_min:.1}/min)"
                        ),
                        held => write!(
                            reason,
                            "{sep}bucket {name:?} has {available:.2} permits and holds {held} \
                             back for higher classes: too few permits for {n} asked in this \
                             class (refills at {per_min:.1}/min)"
                        ),
                    };
                    continue;
                }
            }
            if x.queued > 0 && self.queue.hold_on(i, order).is_some() {
                // Not before those ahead of it: on a token bucket one
                // refill interval each; they may wait on another bucket of
                // theirs, so never less than a short backoff (an answer of
                // "retry in 0 ms" to a caller that honours it is a spin).
                let ahead = x.tokens.as_ref().map_or(Duration::ZERO, |t| {
                    t.interval()
                        .saturating_mul(x.queued.min(MAX_QUEUED_ESTIMATE))
                });
                retry = retry.max(now + ahead.clamp(QUEUED_BACKOFF, MAX_QUEUED_BACKOFF));
                let _ = write!(
                    reason,
                    "{sep}{} earlier requests wait on bucket {name:?}",
                    x.queued
                );
            }
        }
        if reason.is_empty() {
            reason.push_str("capacity is taken");
        }
        Denial {
            retry_after: retry.saturating_duration_since(now),
            reason,
            buckets: self.names(instances),
        }
    }
}
