//! The whole quota state of one tenant and the decision on every request.
//! Pure: the clock is passed in, nothing here awaits or does I/O.
//!
//! Everything a grant touches lives behind one lock (held by the broker,
//! never across an `.await`), which is what makes a grant atomic across
//! buckets: it checks every bucket and takes from all of them, or from none,
//! with no window in which another request can slip between check and take.
//! Replies to waiters are sent on the oneshot channels they left, while the
//! lock is held, so a waiter that gives up can always tell whether it was
//! granted. Bucket instances are slab indices that never leave this module.
//!
//! The type is one, its concerns are split along the call path:
//!
//! | file          | owns                                                              |
//! |---------------|-------------------------------------------------------------------|
//! | `instance`    | one bucket instance: tokens, slots, learner, freeze, budget view  |
//! | `registry`    | route → instances, per-OAuth-client instances and their eviction  |
//! | `classes`     | priority classes, reserves, what a class may take                 |
//! | `decide`      | [`TenantState::acquire`]: grant, deny (and why), or queue         |
//! | `waiting`     | the queue: enqueue, withdraw, and the driver's [`TenantState::tick`] |
//! | `leases`      | release, renew and expiry of slot-holding leases                  |
//! | `learn`       | [`TenantState::report`]: attribution and the learning rules       |
//! | `recent`      | recent Reports' idempotency keys, so a Report sent again counts once |
//! | `operate`     | operators' changes: limits, pause, clearing what was learned      |
//! | `restart`     | the learning mode after a restart: empty buckets, phantom slots, adoption |
//! | `status`      | [`BucketStatus`] for Watch and ListBuckets                        |

mod classes;
#[cfg(test)]
mod convergence_tests;
mod decide;
#[cfg(test)]
mod freeze_tests;
#[cfg(test)]
mod headroom_tests;
#[cfg(test)]
mod holds_tests;
mod instance;
#[cfg(test)]
mod kept_tests;
#[cfg(test)]
mod keyed_tests;
mod learn;
mod leases;
mod operate;
#[cfg(test)]
mod per_client_tests;
mod recent;
mod registry;
mod restart;
#[cfg(test)]
mod restart_tests;
#[cfg(test)]
mod stated_tests;
mod status;
#[cfg(test)]
pub(crate) mod tests;
mod waiting;

pub(crate) use learn::ReportOutcome;
pub(crate) use registry::Retired;
pub(crate) use restart::HandedLease;
pub(crate) use status::BucketStatus;

use crate::config::{ClassSettings, Scope, Settings, TenantSettings};
use crate::learning::LearnSettings;
use crate::limits::{ClassShape, LeaseId, LeaseTable, Queue, RouteCache};
use instance::Instance;
use registry::BucketDef;
use slab::Slab;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How often idle per-OAuth-client instances are looked for and dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// An operator's change to a bucket's limits (`None`: unchanged).
#[derive(Debug, Clone, Copy, Default)]
pub struct LimitChange {
    /// Permits per window.
    pub permits: Option<u32>,
    /// The window.
    pub window: Option<Duration>,
    /// Burst.
    pub burst: Option<u32>,
    /// Concurrency limit.
    pub max_in_flight: Option<u32>,
}

/// Where a waiter's answer goes (a grant, or why not: the bucket was
/// paused), and the idempotency key its grant is noted under.
#[derive(Debug)]
pub(crate) struct Reply {
    /// The waiting Acquire's end of the answer.
    pub tx: oneshot::Sender<Result<Grant, Denial>>,
    /// The Acquire's idempotency key ("" for none).
    pub key: Box<str>,
}

/// What an Acquire asks for, validated.
#[derive(Debug, Clone)]
pub struct AcquireArgs {
    /// Calling client instance.
    pub client_id: String,
    /// Priority class ("" for the default class).
    pub class: String,
    /// Upper-case HTTP method.
    pub method: String,
    /// Path without query string.
    pub path: String,
    /// OAuth client ("" when not named).
    pub oauth_client: String,
    /// Permits, at least 1.
    pub permits: u32,
    /// The Acquire's idempotency key ("" for none): a slot-holding lease
    /// granted to it is noted under it, in the same step as the grant, for
    /// [`TenantState::release_by_key`].
    pub idempotency_key: String,
}

/// A granted request.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The lease.
    pub lease_id: LeaseId,
    /// Permits taken.
    pub permits: u32,
    /// Slot expiry and TTL, when slots are held.
    pub slot: Option<(Instant, Duration)>,
    /// Buckets drawn on.
    pub buckets: Vec<String>,
}

/// A request that cannot be granted now.
#[derive(Debug, Clone)]
pub struct Denial {
    /// Earliest it could be granted, from now.
    pub retry_after: Duration,
    /// Why, for people.
    pub reason: String,
    /// Buckets considered.
    pub buckets: Vec<String>,
}

/// The answer to an Acquire, decided under the tenant's lock.
#[derive(Debug)]
pub enum Decision {
    /// Granted at once.
    Granted(Grant),
    /// Not granted, and not waiting: the wait is zero, the queue is full,
    /// the bucket is paused or the request may not queue.
    Denied(Denial),
    /// Waiting in the queue; the answer comes on [`Queued::reply`].
    Queued(Queued),
}

/// A request waiting in the tenant's queue.
#[derive(Debug)]
pub struct Queued {
    /// Ticket to [`TenantState::withdraw`] the request when its wait ends.
    pub waiter: u64,
    /// When the wait ends.
    pub deadline: Instant,
    /// Where the grant (or a pause's denial) arrives.
    pub reply: oneshot::Receiver<Result<Grant, Denial>>,
}

/// Quota state of one tenant.
pub struct TenantState {
    /// The tenant's tag in lease ids.
    tag: u32,
    id: String,
    learning: LearnSettings,
    /// Jitter draws. Seeded per tenant, so runs are reproducible: jitter
    /// needs spread, not secrecy (lease nonces use the global generator).
    rng: fastrand::Rng,
    /// Learned state changed since the last [`TenantState::take_learned_dirty`].
    learned_dirty: bool,
    buckets: Vec<BucketDef>,
    instances: Slab<Instance>,
    /// Which buckets a (method, path) matches; routes never change at run time.
    routes: RouteCache,
    leases: LeaseTable,
    queue: Queue<Reply>,
    classes: Vec<ClassSettings>,
    /// Indices of `classes` an operator removed (see `reset_class`).
    removed_classes: Vec<usize>,
    default_class: usize,
    max_waiters: u32,
    /// Cap on any request's wait (the server's `max_wait_ms`).
    max_wait: Duration,
    version: Arc<std::sync::atomic::AtomicU64>,
    next_sweep: Instant,
    /// The latest instant any call brought. A caller that read the clock
    /// before another's call (a thread delayed on its way to the lock) is
    /// decided at this instant instead, never at a stale one.
    latest: Instant,
    /// When the broker started with state (see `restart`).
    restarted_at: Option<Instant>,
    /// From when the token level of an instance not seen since is unknown
    /// (a restart, or a take-over whose last leader did not know it
    /// either): one first seen within its bucket's window of this starts
    /// empty (see `restart`).
    levels_unknown_since: Option<Instant>,
    /// Recent Reports' idempotency keys and answers.
    recent_reports: recent::Recent,
    /// The idempotency keys of Acquires granted a slot-holding lease (see
    /// `leases`).
    acquire_keys: HashMap<Box<str>, Vec<LeaseId>>,
    /// Keys released before any lease was granted under them, until when
    /// they are remembered (see `release_by_key`).
    released_early: HashMap<Box<str>, Instant>,
    /// When the driver last planned to run `tick` again (`None`: only when
    /// woken): a lease granted to expire before that must wake it.
    driver_next: Option<Instant>,
    /// Set when such a lease was granted; the caller wakes the driver.
    wake_driver: bool,
    /// Whether the restart may have left leases this state does not know
    /// (a crash): their slots count as phantoms. `false` after a stop that
    /// recorded every live lease (see `resume_after_stop`).
    unknown_leases: bool,
    /// Cluster mode: this broker grants for the tenant only before this
    /// instant (its leadership, kept current by the cluster task); `None`:
    /// always (a single broker).
    lead_until: Option<Instant>,
    /// Cluster mode: the URL of the broker that leads the tenant, when this
    /// one does not (and knows it).
    leader: Option<String>,
    /// Cluster mode: a random number drawn when this state was built to
    /// lead the tenant, saved in every snapshot of it (0: not drawn).
    lead_term: u64,
}

impl TenantState {
    /// A tenant with full buckets at `now`. `version` is the broker-wide
    /// change counter that Watch follows.
    pub fn new(
        idx: u32,
        settings: &TenantSettings,
        broker: &Settings,
        version: Arc<std::sync::atomic::AtomicU64>,
        now: Instant,
    ) -> TenantState {
        let mut instances = Slab::new();
        let buckets = settings
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| BucketDef {
                settings: b.clone(),
                paused: None,
                org: (b.scope == Scope::Org)
                    .then(|| instances.insert(Instance::new(i, b, None, now))),
                per_client: HashMap::new(),
                retired: Default::default(),
                version: 0,
            })
            .collect();
        let mut queue = Queue::default();
        for (k, c) in broker.classes.iter().enumerate() {
            queue.set_class(
                k,
                ClassShape {
                    order: c.order,
                    weight: c.weight,
                },
            );
        }
        TenantState {
            tag: crate::limits::tenant_tag(&settings.id),
            id: settings.id.clone(),
            learning: broker.learning,
            classes: broker.classes.clone(),
            removed_classes: Vec::new(),
            default_class: broker
                .classes
                .iter()
                .position(|c| c.name == broker.scheduling.default_class)
                .unwrap_or(0),
            max_waiters: broker.scheduling.max_waiters_per_bucket,
            max_wait: broker.server.max_wait,
            rng: fastrand::Rng::with_seed(u64::from(idx) ^ 0x9e37_79b9_7f4a_7c15),
            learned_dirty: false,
            buckets,
            instances,
            routes: RouteCache::default(),
            leases: LeaseTable::default(),
            queue,
            version,
            next_sweep: now + SWEEP_EVERY,
            latest: now,
            restarted_at: None,
            levels_unknown_since: None,
            recent_reports: recent::Recent::default(),
            acquire_keys: HashMap::new(),
            released_early: HashMap::new(),
            driver_next: None,
            wake_driver: false,
            unknown_leases: true,
            lead_until: None,
            leader: None,
            lead_term: 0,
        }
    }

    /// Cluster mode: grant only before `until` (`None`: not at all, until
    /// told again); `leader` is who to send callers to meanwhile.
    pub fn set_lead(&mut self, until: Option<Instant>, leader: Option<String>, now: Instant) {
        // Stepping down: the lead ended now, or at its deadline if that
        // passed first.
        let now = self.monotonic(now);
        let ended = self.lead_until.map_or(now, |u| u.min(now));
        self.lead_until = Some(until.unwrap_or(ended));
        self.leader = leader;
    }

    /// Whether this broker may grant for the tenant at `now`; if not, the
    /// error that sends the caller to the leader.
    pub fn not_leading(&self, now: Instant) -> Option<crate::error::BrokerError> {
        let until = self.lead_until?;
        (now >= until).then(|| crate::error::BrokerError::NotLeader {
            tenant: self.id.clone(),
            leader: self.leader.clone(),
        })
    }

    /// Cluster mode: the term this state leads in (see
    /// `Broker::take_over`); 0 before one is drawn.
    pub(crate) fn lead_term(&self) -> u64 {
        self.lead_term
    }

    /// Draws this state's lead term.
    pub(crate) fn new_lead_term(&mut self) {
        self.lead_term = fastrand::u64(1..);
    }

    /// Cluster mode: until when this broker grants for the tenant (`None`:
    /// not in a cluster, no end).
    pub(crate) fn lead_until(&self) -> Option<Instant> {
        self.lead_until
    }

    /// True if this broker grants for the tenant at `now`.
    pub fn leads(&self, now: Instant) -> bool {
        self.not_leading(now).is_none()
    }

    /// Issues lease sequence numbers above `base` (see the lease table in
    /// `crate::limits`): the broker passes a value that grows
    /// with wall time, so a restarted broker never reissues an id.
    pub fn start_leases_after(&mut self, base: u64) {
        self.leases.start_after(base);
    }

    /// The tenant id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `now`, or the latest instant seen if `now` is older: time in the
    /// tenant never runs backwards.
    #[inline]
    fn monotonic(&mut self, now: Instant) -> Instant {
        self.latest = self.latest.max(now);
        self.latest
    }

    #[inline]
    fn touch(&mut self, instance: usize) {
        let v = self
            .version
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if let Some(i) = self.instances.get_mut(instance) {
            i.version = v;
        }
    }

    /// A change to bucket `b` itself: with no instance (a per-client
    /// bucket no client uses) its row stands for it and changes, as
    /// [`Self::touch`] has an instance's.
    fn touch_if_unused(&mut self, b: usize) {
        let def = &mut self.buckets[b];
        if def.org.is_none() && def.per_client.is_empty() {
            def.version = self
                .version
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
        }
    }

    #[inline]
    fn name(&self, instance: usize) -> String {
        let Some(i) = self.instances.get(instance) else {
            return String::new();
        };
        self.buckets[i.bucket].settings.name.clone()
    }

    #[inline]
    fn names(&self, instances: &[usize]) -> Vec<String> {
        instances.iter().map(|&i| self.name(i)).collect()
    }
}
