//! The learning mode after a restart. A broker that starts with state may
//! have granted, before it stopped, leases whose holders are still calling
//! the upstream, and token buckets it cannot know the level of. So, for
//! every bucket instance:
//!
//! - its token bucket starts empty (its first permit one interval later,
//!   then paced), never full: the upstream's window did not reset when the
//!   broker did, and a permit at once would add one per restart;
//! - all its slots count as held by unknown leases ("phantoms") for one
//!   lease TTL; a renewal of a lease granted before the restart that says
//!   which Acquire granted it is adopted (its phantom becomes a known
//!   lease), and phantoms nobody claimed come back at the end of the TTL,
//!   when every unrenewed lease of the earlier run has expired.
//!
//! New slots are therefore granted only from capacity no unknown lease can
//! hold. Per-OAuth-client instances first seen during the window get the
//! same treatment.
//!
//! Two starts know more, and hold back less:
//!
//! - after a graceful stop that left its record of live leases
//!   (`resume_after_stop`), the token buckets still start empty, but the
//!   slots are held by those leases, known by id, instead of phantoms: each
//!   comes back when released or expired;
//! - a cluster leader taking a tenant over from one that handed it over
//!   (`resume_levels`) resumes the token levels it was given rather than
//!   starting the buckets empty.

use super::{AcquireArgs, TenantState};
use crate::error::BrokerError;
use crate::limits::{Lease, LeaseId};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::time::Instant;

/// A live lease that holds slots, as a cluster leader hands it to the next:
/// its id's parts, the (bucket, OAuth client) instances it holds, and how
/// long it has left.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct HandedLease {
    seq: u64,
    nonce: u32,
    slots: Vec<(String, Option<String>)>,
    permits: u32,
    left_ms: u64,
    ttl_ms: u64,
    client_id: String,
    /// The idempotency key of the Acquire that was granted it, so a client
    /// whose answer was lost can still release it by that key at the next
    /// leader (or after a graceful restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    acquire_key: Option<String>,
}

/// Longest idempotency key taken from a hand-over (a snapshot is input;
/// the gRPC API takes no longer ones).
pub(super) const MAX_HANDED_KEY: usize = 256;

impl TenantState {
    /// Enters the learning mode at `now` (the broker started with state).
    pub fn resume_after_restart(&mut self, now: Instant) {
        let now = self.monotonic(now);
        self.restarted_at = Some(now);
        self.levels_unknown_since = Some(now);
        self.unknown_leases = true;
        let all: Vec<usize> = self.instances.iter().map(|(i, _)| i).collect();
        for i in all {
            self.restart_instance(i, now);
        }
        // At debug: the broker logs one line for every tenant at a start
        // (and a cluster one per tenant taken over).
        tracing::debug!(
            tenant = %self.id,
            "started with state: token buckets start empty, slots count as held until \
             renewals claim them or one lease TTL passes"
        );
    }

    /// Resumes after a graceful stop that recorded every live lease
    /// (`leases`, from [`TenantState::live_leases`] at the stop): the token
    /// buckets start empty as after a crash (the upstream's window did not
    /// reset, and callers may have spent on their local fallback while no
    /// broker answered), but the slots are the recorded leases', not
    /// phantoms, so a deploy does not hold every free slot for a lease TTL.
    /// A recorded lease with no place in this config (it changed) falls
    /// back to the crash learning mode. `false` then. `down`: how long no
    /// broker ran (the stop's wall time to now, one host's clock): it
    /// counts against every lease, and one that ran out meanwhile holds
    /// nothing.
    pub(crate) fn resume_after_stop(
        &mut self,
        leases: &[HandedLease],
        down: Duration,
        max_left: Duration,
        now: Instant,
    ) -> bool {
        let down_ms = crate::clock::millis(down);
        let leases: Vec<HandedLease> = leases
            .iter()
            .filter(|h| h.left_ms > down_ms)
            .map(|h| HandedLease {
                left_ms: h.left_ms - down_ms,
                ..h.clone()
            })
            .collect();
        let at = self.monotonic(now);
        self.restarted_at = Some(at);
        self.levels_unknown_since = Some(at);
        self.unknown_leases = false;
        let all: Vec<usize> = self.instances.iter().map(|(i, _)| i).collect();
        for i in all {
            self.restart_instance(i, at);
        }
        if !self.resume_leases(&leases, max_left, now) {
            tracing::warn!(tenant = %self.id,
                "some leases recorded at the last stop have no place in this config: \
                 their slots count as held until renewals claim them or one lease TTL passes");
            self.resume_after_restart(now);
            return false;
        }
        tracing::debug!(tenant = %self.id, leases = leases.len(),
            "started after a graceful stop: token buckets start empty, the leases it recorded \
             hold their slots and every other slot is free");
        true
    }

    /// Whether `now` is inside the learning window of some bucket.
    pub(super) fn restart_window(&self, now: Instant) -> Option<Instant> {
        let at = self.restarted_at?;
        let longest = self
            .buckets
            .iter()
            .filter(|b| b.settings.max_in_flight.is_some())
            .map(|b| b.settings.lease_ttl)
            .max()?;
        Some(at + longest).filter(|&end| end > now)
    }

    /// Applies the learning mode to instance `i` (at start, or when a
    /// per-client instance is first seen inside the window).
    pub(super) fn restart_instance(&mut self, i: usize, now: Instant) {
        if self.restarted_at.is_none() && self.levels_unknown_since.is_none() {
            return;
        }
        let Some(x) = self.instances.get_mut(i) else {
            return;
        };
        let settings = &self.buckets[x.bucket].settings;
        let ttl = settings.lease_ttl;
        // The upstream's window did not reset with the broker: within one
        // window of the restart, the level before it is unknown.
        let window = settings.rate.map_or(Duration::ZERO, |r| r.window);
        let unknown = self
            .levels_unknown_since
            .is_some_and(|at| at + window > now || at == now);
        if let Some(t) = x.tokens.as_mut().filter(|_| unknown) {
            t.restart_drained(now);
        }
        let phantoms_from = self.restarted_at.filter(|_| self.unknown_leases);
        if let (Some(s), Some(at)) = (x.slots.as_mut(), phantoms_from) {
            let until = at + ttl;
            if until > now {
                let free = s.max().saturating_sub(s.in_flight());
                s.take(free);
                x.phantom += free;
                x.phantom_until = Some(until);
            }
        }
        self.touch(i);
    }

    /// Gives back phantom slots whose window ended; returns the next end.
    pub(super) fn end_phantoms(&mut self, now: Instant) -> Option<Instant> {
        // Phantoms exist only after a restart: no walk over every instance
        // on each run of the driver otherwise.
        self.restarted_at?;
        let mut next = None;
        let mut ended = Vec::new();
        for (i, x) in self.instances.iter_mut() {
            match x.phantom_until {
                Some(until) if until <= now => {
                    if let Some(s) = x.slots.as_mut() {
                        s.give_back(x.phantom);
                    }
                    if x.phantom > 0 {
                        ended.push((i, x.phantom));
                    }
                    x.phantom = 0;
                    x.phantom_until = None;
                }
                Some(until) => next = Some(next.map_or(until, |n: Instant| n.min(until))),
                None => {}
            }
        }
        for (i, n) in ended {
            tracing::info!(tenant = %self.id, bucket = %self.name(i), slots = n,
                "restart learning over: slots no renewal claimed are free again");
            self.touch(i);
        }
        next
    }

    /// Adopts a lease granted before the restart, renewed with the Acquire
    /// that granted it: its slots turn from phantoms into a known lease.
    /// `Ok(None)` when it cannot be adopted (outside the window).
    pub(super) fn adopt(
        &mut self,
        id: LeaseId,
        args: &AcquireArgs,
        extend: Option<Duration>,
        now: Instant,
    ) -> Result<Option<(Instant, Duration)>, BrokerError> {
        if !self.unknown_leases
            || self.restart_window(now).is_none()
            || !self.leases.may_adopt(id.seq)
        {
            return Ok(None);
        }
        let instances = match self.resolve(
            &args.method,
            &args.path,
            &args.oauth_client,
            args.permits,
            0.0,
            now,
        )? {
            Ok(i) => i,
            Err(_) => return Ok(None),
        };
        let n = args.permits;
        let mut held = Vec::new();
        let mut ttl: Option<Duration> = None;
        for i in instances {
            let Some(x) = self.instances.get_mut(i) else {
                continue;
            };
            let Some(s) = x.slots.as_mut() else {
                continue;
            };
            let from_phantom = x.phantom.min(n);
            x.phantom -= from_phantom;
            // More than the phantoms cover (the limit was lowered, or the
            // holder's count is off): the slots are in use all the same.
            s.take(n - from_phantom);
            held.push(i);
            let bucket_ttl = self.buckets[x.bucket].settings.lease_ttl;
            ttl = Some(ttl.map_or(bucket_ttl, |t| t.min(bucket_ttl)));
        }
        let Some(ttl) = ttl else {
            return Ok(None);
        };
        for &i in &held {
            self.touch(i);
        }
        let extend = extend.unwrap_or(ttl);
        let expires_at = now + extend;
        self.expires_at(expires_at);
        self.leases.take_in(
            id.seq,
            Lease {
                nonce: id.nonce,
                instances: held,
                permits: n,
                expires_at,
                ttl,
                client_id: args.client_id.clone(),
            },
        );
        tracing::info!(tenant = %self.id, lease = %id, client_id = %args.client_id,
            "adopted a lease granted before the restart");
        Ok(Some((expires_at, extend)))
    }

    /// Releases lease `id`; one this broker does not know, granted before
    /// the restart (or by the last leader) to `args`, frees the slots
    /// counted as held for unknown leases at once rather than at the end
    /// of the learning window (its holder let go before any renewal
    /// claimed it).
    pub fn release_or_adopt(
        &mut self,
        id: LeaseId,
        args: &AcquireArgs,
        now: Instant,
    ) -> Result<bool, BrokerError> {
        if self.release(id) {
            return Ok(true);
        }
        let now = self.monotonic(now);
        if self.adopt(id, args, None, now)?.is_none() {
            return Ok(false);
        }
        tracing::info!(tenant = %self.id, lease = %id,
            "released a lease granted before the restart: its slots are free at once");
        Ok(self.release(id))
    }

    /// The token level of every rate bucket instance at `now`: (bucket,
    /// OAuth client, permits available). Exact once nothing is granted any
    /// more (a cluster leader handing the tenant over).
    pub fn levels(&self, now: Instant) -> Vec<(String, Option<String>, f64)> {
        self.instances
            .iter()
            .filter_map(|(_, x)| {
                let t = x.tokens.as_ref()?;
                let b = &self.buckets[x.bucket].settings;
                let client = x.oauth_client.as_deref().map(str::to_owned);
                Some((b.name.clone(), client, t.available(now)))
            })
            .collect()
    }

    /// How long before `now` the level of an instance not seen since
    /// became unknown, while that still matters (within the longest rate
    /// window): what a hand-over passes on with [`TenantState::levels`].
    /// `None`: every instance not seen is full.
    pub fn levels_unknown_for(&self, now: Instant) -> Option<Duration> {
        let since = self.levels_unknown_since?;
        let longest = self
            .buckets
            .iter()
            .filter_map(|b| b.settings.rate.map(|r| r.window))
            .max()?;
        (since + longest > now).then(|| now.saturating_duration_since(since))
    }

    /// Resumes token levels the last leader handed over (instead of the
    /// learning mode's empty bucket), as they were: nothing is credited for
    /// the refill in between, which could only be measured between two
    /// hosts' wall clocks (their offset would become extra permits); the
    /// gap is a cluster tick at most, so a bucket is short by at most that.
    /// An instance not among them (an OAuth client the last leader had not
    /// seen, or dropped when full) is as full here as it was there, unless
    /// that leader did not know its level either (`unknown_for`, from
    /// [`TenantState::levels_unknown_for`]): then it starts empty if first
    /// seen within its window of when that began, as after a restart.
    pub fn resume_levels(
        &mut self,
        levels: &[(String, Option<String>, f64)],
        unknown_for: Option<Duration>,
        now: Instant,
    ) {
        let now = self.monotonic(now);
        self.levels_unknown_since = unknown_for.map(|d| now.checked_sub(d).unwrap_or(now));
        for (bucket, client, level) in levels {
            let Some(t) = self
                .instance_of(bucket, client.as_deref(), now)
                .and_then(|i| self.instances.get_mut(i))
                .and_then(|x| x.tokens.as_mut())
            else {
                continue;
            };
            t.set_level(*level, now);
        }
    }

    /// Resumes this state after a lapse of its lead (cluster mode: etcd
    /// away for a moment, no other broker leading since): nothing expired
    /// or ended while it did not lead, so every lease, phantom and the
    /// learning window get the time they had left when it stopped, and
    /// every token bucket the level it had (the fleet ran on its fallback
    /// meanwhile, spending what the upstream refilled).
    pub(crate) fn resume_lapsed(&mut self, now: Instant) {
        let now = self.monotonic(now);
        let Some(ended) = self.lead_until else {
            return;
        };
        let lapse = now.saturating_duration_since(ended);
        // Counted once: a second resume (the save after this one failed)
        // credits only the time since this one.
        self.lead_until = Some(now);
        self.leases.postpone_all(lapse);
        for (_, x) in self.instances.iter_mut() {
            if let Some(until) = x.phantom_until.as_mut() {
                *until += lapse;
            }
            if let Some(t) = x.tokens.as_mut() {
                t.postpone(ended, lapse);
            }
            // The fleet spent on its fallback meanwhile: the next header
            // says what is left.
            x.kept = None;
        }
        if let Some(at) = self.restarted_at.as_mut() {
            *at += lapse;
        }
        if let Some(at) = self.levels_unknown_since.as_mut() {
            *at += lapse;
        }
    }

    /// Every live lease that holds slots, for a hand-over (call it once
    /// nothing is granted any more), or `None` while this state is still
    /// learning after a restart or take-over: unknown leases of an earlier
    /// leader may hold slots (of instances not even seen yet, per OAuth
    /// client), and those cannot be handed over, so the next leader runs
    /// the learning mode instead.
    pub(crate) fn live_leases(&self, now: Instant) -> Option<Vec<HandedLease>> {
        // Until the longest lease TTL of a slot bucket has passed since the
        // restart, an earlier run's lease may hold a slot of an instance
        // not seen yet. (Token levels are handed over apart: a rate window
        // does not make the leases unknown.)
        if self.unknown_leases && self.restart_window(now).is_some() {
            return None;
        }
        if self.instances.iter().any(|(_, x)| x.phantom > 0) {
            return None;
        }
        let keys: std::collections::HashMap<u64, &str> = self
            .acquire_keys
            .iter()
            .flat_map(|(key, ids)| ids.iter().map(move |id| (id.seq, &**key)))
            .collect();
        let leases = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires_at > now)
            .map(|(seq, l)| HandedLease {
                seq,
                nonce: l.nonce,
                slots: l
                    .instances
                    .iter()
                    .filter_map(|&i| self.instances.get(i))
                    .map(|x| {
                        let bucket = &self.buckets[x.bucket].settings.name;
                        (bucket.clone(), x.oauth_client.as_deref().map(str::to_owned))
                    })
                    .collect(),
                permits: l.permits,
                left_ms: crate::clock::millis(l.expires_at - now),
                ttl_ms: crate::clock::millis(l.ttl),
                client_id: l.client_id.clone(),
                acquire_key: keys.get(&seq).map(|&k| k.to_owned()),
            })
            .collect();
        Some(leases)
    }

    /// Takes in the leases the last leader handed over, as they were: their
    /// slots held, each until the time it had left from `now` (later than
    /// when the last leader counted it, so never sooner than there), and no
    /// longer than `max_left` (a snapshot is input). `false` if some slot
    /// has no place here (this broker's config differs: a bucket gone, no
    /// longer per-client or no longer with slots, no room for another
    /// OAuth client): the caller then runs the learning mode on top, so
    /// that slot's holder is not forgotten.
    pub(crate) fn resume_leases(
        &mut self,
        leases: &[HandedLease],
        max_left: Duration,
        now: Instant,
    ) -> bool {
        let now = self.monotonic(now);
        let mut all_placed = true;
        for h in leases {
            let mut held = Vec::new();
            for (bucket, client) in &h.slots {
                let placed = self
                    .instance_of(bucket, client.as_deref(), now)
                    .filter(|&i| {
                        self.instances
                            .get(i)
                            .is_some_and(|x| x.oauth_client.as_deref() == client.as_deref())
                    })
                    .and_then(|i| Some((i, self.instances.get_mut(i)?.slots.as_mut()?)));
                let Some((i, s)) = placed else {
                    all_placed = false;
                    continue;
                };
                s.take(h.permits);
                held.push(i);
            }
            if held.is_empty() {
                continue;
            }
            let ttl = held
                .iter()
                .filter_map(|&i| self.instances.get(i))
                .map(|x| self.buckets[x.bucket].settings.lease_ttl)
                .min()
                .unwrap_or_default();
            let lease = Lease {
                nonce: h.nonce,
                instances: held.clone(),
                permits: h.permits,
                expires_at: now + Duration::from_millis(h.left_ms).min(max_left),
                ttl: Duration::from_millis(h.ttl_ms).min(ttl),
                client_id: h.client_id.clone(),
            };
            let taken = self.leases.take_in(h.seq, lease);
            if let Some(key) = h
                .acquire_key
                .as_deref()
                .filter(|k| taken && k.len() <= MAX_HANDED_KEY)
            {
                let id = LeaseId {
                    tenant: self.tag,
                    seq: h.seq,
                    nonce: h.nonce,
                };
                self.granted_with_key(key, id);
            }
            for i in held {
                if !taken {
                    // A number listed twice: its slots are held once.
                    if let Some(s) = self.instances.get_mut(i).and_then(|x| x.slots.as_mut()) {
                        s.give_back(h.permits);
                    }
                }
                self.touch(i);
            }
        }
        all_placed
    }
}
