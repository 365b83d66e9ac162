//! The whole quota state of one tenant and the decision on every request:
//! its bucket instances (one per org-wide bucket, one per OAuth client seen
//! for per-client buckets), the lease table and the waiting queue.
//!
//! Everything a grant touches lives behind one lock (held by `broker.rs`,
//! never across an `.await`), which is what makes a grant atomic across
//! buckets: it checks every bucket and takes from all of them, or from none,
//! with no window in which another request can slip between check and take.
//! Pure: the clock is passed in; replies to waiters are sent on the oneshot
//! channels they left, while the lock is held, so a waiter that gives up can
//! always tell whether it was granted.

use crate::adaptive::{LearnSettings, Learned, Learner, Persisted, UpstreamBudget};
use crate::bucket::{Slots, TokenBucket};
use crate::config::{BucketSettings, ClassSettings, Scope, Settings, TenantSettings};
use crate::error::BrokerError;
use crate::headers::RateLimitInfo;
use crate::lease::{Lease, LeaseId, LeaseTable};
use crate::route::RouteCache;
use crate::scheduler::{ClassShape, Offer, Queue, Waiter};
use slab::Slab;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
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

/// A waiter's answer: a grant, or why not (the bucket was paused).
pub type Reply = oneshot::Sender<Result<Grant, Denial>>;

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

/// The outcome of trying to grant at once.
#[derive(Debug)]
pub enum Attempt {
    /// Granted.
    Granted(Grant),
    /// Not now; the request may wait in the queue on these instances
    /// (none: it may not wait, e.g. the waiter cap is reached).
    Blocked {
        /// The instances the request needs.
        instances: Vec<usize>,
        /// The answer if it does not wait.
        denial: Denial,
        /// The request's class.
        class: usize,
        /// The class's default wait.
        default_wait: Duration,
    },
}

/// Live state of one bucket instance, for Watch and ListBuckets.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketStatus {
    /// Bucket name.
    pub bucket: String,
    /// Scope.
    pub scope: Scope,
    /// OAuth client of a per-client instance.
    pub oauth_client: Option<String>,
    /// Configured rate per minute (0 without a rate).
    pub configured_rate_per_min: f64,
    /// Effective rate per minute (0 without a rate).
    pub effective_rate_per_min: f64,
    /// Burst (0 without a rate).
    pub burst: u32,
    /// Permits available now.
    pub tokens_available: f64,
    /// Slots held.
    pub in_flight: u32,
    /// Slot limit (0 without one).
    pub max_in_flight: u32,
    /// Waiters per class.
    pub waiting: BTreeMap<String, u32>,
    /// Operator's reason, when the bucket is paused.
    pub paused: Option<String>,
    /// Permits granted.
    pub granted_total: u64,
    /// 429s reported.
    pub throttled_total: u64,
    /// Reports received.
    pub reports_total: u64,
    /// Frozen until (after a reported 429).
    pub frozen_until: Option<Instant>,
    /// Limit learned from rate-limit headers, per minute.
    pub learned_limit_per_min: Option<f64>,
    /// 429 ratio over the ratio window.
    pub throttle_ratio: f64,
    /// The ratio backstop holds the rate until then.
    pub cooldown_until: Option<Instant>,
    /// What the upstream last said is left of its budget (until its reset).
    pub upstream_remaining: Option<u32>,
}

/// What a report did.
#[derive(Debug, Clone, Default)]
pub struct ReportOutcome {
    /// Buckets it was counted on.
    pub buckets: Vec<String>,
    /// The bucket a 429 or the rate-limit headers were attributed to.
    pub attributed_to: Option<String>,
}

/// One instance of a bucket.
#[derive(Debug)]
struct Instance {
    bucket: usize,
    oauth_client: Option<Arc<str>>,
    tokens: Option<TokenBucket>,
    slots: Option<Slots>,
    /// Waiters per class index.
    waiting: BTreeMap<usize, u32>,
    queued: u32,
    granted_total: u64,
    throttled_total: u64,
    reports_total: u64,
    learner: Learner,
    /// Grants resume no earlier than this (freeze end plus jitter).
    resume_at: Option<Instant>,
    upstream: Option<UpstreamBudget>,
    /// Bumped on every change; Watch sends instances whose version moved.
    version: u64,
}

impl Instance {
    fn new(
        bucket: usize,
        settings: &BucketSettings,
        client: Option<Arc<str>>,
        now: Instant,
    ) -> Self {
        Instance {
            bucket,
            oauth_client: client,
            tokens: settings
                .rate
                .map(|r| TokenBucket::new(r.permits.get(), r.window, r.burst.get(), now)),
            slots: settings.max_in_flight.map(|m| Slots::new(m.get())),
            waiting: BTreeMap::new(),
            queued: 0,
            granted_total: 0,
            throttled_total: 0,
            reports_total: 0,
            learner: Learner::new(
                settings.rate.map_or(0.0, |r| r.per_minute()),
                settings.rate.map_or(Duration::from_secs(60), |r| r.window),
                now,
            ),
            resume_at: None,
            upstream: None,
            version: 0,
        }
    }

    fn idle(&self, now: Instant) -> bool {
        self.queued == 0
            && self.slots.is_none_or(|s| s.in_flight() == 0)
            && self.tokens.as_ref().is_none_or(|t| t.is_full(now))
            && self.resume_at.is_none_or(|t| t <= now)
            && self.learner.is_pristine(now)
    }

    /// When `n` permits could be taken, ignoring the queue: `Ok` with the
    /// token-ready instant if slots are free, `Err` if slots are the limit.
    /// `reserve` is the share of the bucket held back for higher classes.
    fn ready_at(&self, n: u32, reserve: f64, now: Instant) -> Result<Instant, ()> {
        if let Some(s) = self.slots {
            if !s.has_room(n.saturating_add(held_back(s.max(), reserve))) {
                return Err(());
            }
        }
        let mut at = match self.tokens.as_ref() {
            Some(t) => t
                .ready_at_reserved(n, token_reserve(t.burst(), reserve), now)
                .ok_or(())?,
            None => now,
        };
        if let Some(resume) = self.resume_at {
            at = at.max(resume);
        }
        if let Some(u) = self.upstream.and_then(|u| u.ready_at(n, now)) {
            at = at.max(u);
        }
        Ok(at)
    }

    /// Puts the rate the learner says into the token bucket.
    fn apply_rate(&mut self, now: Instant, s: &LearnSettings) {
        let rate = self.learner.rate(now, s);
        if let Some(t) = self.tokens.as_mut() {
            if (t.rate_per_min() - rate).abs() > 1e-9 * rate.max(1.0) {
                t.set_rate_per_min(rate, now);
            }
        }
    }

    /// Freezes grants until `until`, plus up to `jitter` permit intervals
    /// (`draw` in 0..1), after which they resume paced from an empty bucket.
    fn freeze(&mut self, until: Instant, draw: f64, s: &LearnSettings) {
        let jitter = self
            .tokens
            .as_ref()
            .map_or(Duration::ZERO, |t| t.interval().mul_f64(s.jitter * draw));
        let resume = until + jitter;
        self.resume_at = Some(self.resume_at.map_or(resume, |r| r.max(resume)));
        if let Some(t) = self.tokens.as_mut() {
            t.empty_at(resume);
        }
    }

    /// Applies what the upstream says is left of the budget of `window`.
    fn sync_budget(&mut self, info: &RateLimitInfo, window: Duration, now: Instant) {
        let Some(remaining) = info.remaining else {
            return;
        };
        if let Some(t) = self.tokens.as_mut() {
            t.shrink_to(u32::try_from(remaining).unwrap_or(u32::MAX), now);
        }
        if let Some(reset) = info.reset {
            self.upstream = Some(UpstreamBudget::observe(
                self.upstream,
                info.limit,
                remaining,
                reset,
                window,
                now,
            ));
        }
    }
}

struct BucketDef {
    settings: BucketSettings,
    /// Operator's reason, while paused.
    paused: Option<String>,
    org: Option<usize>,
    per_client: HashMap<Arc<str>, usize>,
}

/// Quota state of one tenant.
pub struct TenantState {
    idx: u32,
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
    default_class: usize,
    max_waiters: u32,
    version: Arc<std::sync::atomic::AtomicU64>,
    next_sweep: Instant,
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
            idx,
            id: settings.id.clone(),
            learning: broker.learning,
            classes: broker.classes.clone(),
            default_class: broker
                .classes
                .iter()
                .position(|c| c.name == broker.scheduling.default_class)
                .unwrap_or(0),
            max_waiters: broker.scheduling.max_waiters_per_bucket,
            rng: fastrand::Rng::with_seed(u64::from(idx) ^ 0x9e37_79b9_7f4a_7c15),
            learned_dirty: false,
            buckets,
            instances,
            routes: RouteCache::default(),
            leases: LeaseTable::default(),
            queue,
            version,
            next_sweep: now + SWEEP_EVERY,
        }
    }

    /// The tenant id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn touch(&mut self, instance: usize) {
        let v = self
            .version
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if let Some(i) = self.instances.get_mut(instance) {
            i.version = v;
        }
    }

    fn name(&self, instance: usize) -> String {
        let Some(i) = self.instances.get(instance) else {
            return String::new();
        };
        self.buckets[i.bucket].settings.name.clone()
    }

    fn names(&self, instances: &[usize]) -> Vec<String> {
        instances.iter().map(|&i| self.name(i)).collect()
    }

    /// The instances a call draws on, creating per-client ones as needed.
    /// `Ok(Err(denial))` when a per-client bucket is at its instance limit.
    fn resolve(
        &mut self,
        method: &str,
        path: &str,
        oauth_client: &str,
        permits: u32,
        reserve: f64,
        now: Instant,
    ) -> Result<Result<Vec<usize>, Denial>, BrokerError> {
        let buckets = &self.buckets;
        let matched: Vec<usize> = self
            .routes
            .matches(method, path, || {
                (0..buckets.len())
                    .filter(|&b| {
                        buckets[b]
                            .settings
                            .routes
                            .iter()
                            .any(|r| r.matches(method, path))
                    })
                    .collect()
            })
            .to_vec();
        let mut out = Vec::with_capacity(matched.len());
        for b in matched {
            let def = &self.buckets[b];
            check_permits(&self.id, &def.settings, permits, reserve)?;
            let instance = match def.org {
                Some(i) => i,
                None => match def.per_client.get(oauth_client) {
                    Some(&i) => i,
                    None => match self.add_client_instance(b, oauth_client, now) {
                        Some(i) => i,
                        None => {
                            let def = &self.buckets[b].settings;
                            return Ok(Err(Denial {
                                retry_after: Duration::from_secs(1),
                                reason: format!(
                                    "bucket {:?} already tracks its limit of {} OAuth clients, all \
                                     busy; raise max_clients in the broker config",
                                    def.name, def.max_clients
                                ),
                                buckets: vec![def.name.clone()],
                            }));
                        }
                    },
                },
            };
            out.push(instance);
        }
        if out.is_empty() {
            return Err(BrokerError::NoBucketMatches {
                tenant: self.id.clone(),
                method: method.to_owned(),
                path: path.to_owned(),
            });
        }
        Ok(Ok(out))
    }

    fn add_client_instance(&mut self, bucket: usize, client: &str, now: Instant) -> Option<usize> {
        let max = self.buckets[bucket].settings.max_clients.get() as usize;
        if self.buckets[bucket].per_client.len() >= max {
            self.evict_idle(Some(bucket), now);
            if self.buckets[bucket].per_client.len() >= max {
                return None;
            }
        }
        let client: Arc<str> = Arc::from(client);
        let def = &mut self.buckets[bucket];
        let i = self.instances.insert(Instance::new(
            bucket,
            &def.settings,
            Some(client.clone()),
            now,
        ));
        def.per_client.insert(client, i);
        self.touch(i);
        Some(i)
    }

    /// Drops per-client instances nobody uses and that are full (a fresh one
    /// would be identical), in `only` bucket or in all.
    fn evict_idle(&mut self, only: Option<usize>, now: Instant) {
        for (b, def) in self.buckets.iter_mut().enumerate() {
            if only.is_some_and(|o| o != b) {
                continue;
            }
            let instances = &mut self.instances;
            def.per_client.retain(|_, &mut i| {
                let idle = instances.get(i).is_none_or(|x| x.idle(now));
                if idle {
                    instances.try_remove(i);
                }
                !idle
            });
        }
    }

    /// The index of class `name` ("" is the default class).
    pub fn class_index(&self, name: &str) -> Result<usize, BrokerError> {
        if name.is_empty() {
            return Ok(self.default_class);
        }
        self.classes
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self.classes.iter().map(|c| c.name.as_str()).collect();
                BrokerError::invalid(
                    "priority_class",
                    format!(
                        "{name:?} is not a class of tenant {:?}; use one of: {}",
                        self.id,
                        known.join(", ")
                    ),
                )
            })
    }

    /// The order of `class` (unknown: last).
    fn order(&self, class: usize) -> u32 {
        self.classes.get(class).map_or(u32::MAX, |c| c.order)
    }

    /// Share of every bucket that classes ordered before `order` hold back
    /// from it.
    fn reserve_before(&self, order: u32) -> f64 {
        self.classes
            .iter()
            .filter(|c| c.order < order)
            .map(|c| c.reserve)
            .sum()
    }

    /// Share of every bucket that classes above `class` hold back from it.
    fn reserve_above(&self, class: usize) -> f64 {
        self.reserve_before(self.order(class))
    }

    /// The share of the buckets of `instances` that `class` must leave to
    /// higher classes (positive), or may borrow below empty (negative): a
    /// class nothing is held back from (the highest) may take what the
    /// higher classes hold back from the lowest below empty while a lower
    /// class waits on the bucket, so that right after a freeze, when the
    /// bucket restarts empty, a critical call does not queue behind the
    /// pacing. The waiting lower class pays it back (it waits until the
    /// permits are earned again), so the total granted per window stays
    /// the same; with no lower class waiting nothing is borrowed.
    fn bucket_share(&self, class: usize, instances: &[usize]) -> f64 {
        let held = self.reserve_above(class);
        if held > 0.0 {
            return held;
        }
        let order = self.order(class);
        if !self.waiting_where(instances, |o| o > order) {
            return 0.0;
        }
        let lowest = self.classes.iter().map(|c| c.order).max().unwrap_or(0);
        -self.reserve_before(lowest)
    }

    /// Whether waiters of `class` or a higher one wait on any of `instances`.
    fn waiting_at_or_above(&self, instances: &[usize], class: usize) -> bool {
        let order = self.order(class);
        self.waiting_where(instances, |o| o <= order)
    }

    /// Whether waiters of a class whose order passes `keep` wait on any of
    /// `instances`.
    fn waiting_where(&self, instances: &[usize], keep: impl Fn(u32) -> bool) -> bool {
        instances.iter().any(|&i| {
            self.instances.get(i).is_some_and(|x| {
                x.waiting
                    .iter()
                    .any(|(&k, &n)| n > 0 && keep(self.order(k)))
            })
        })
    }

    /// Tries to grant at once. Never waits and never queues.
    pub fn try_acquire(
        &mut self,
        args: &AcquireArgs,
        now: Instant,
    ) -> Result<Attempt, BrokerError> {
        let class = self.class_index(&args.class)?;
        let reserve = self.reserve_above(class);
        let default_wait = self
            .classes
            .get(class)
            .map_or(Duration::ZERO, |c| c.default_max_wait);
        let blocked = |instances, denial| Attempt::Blocked {
            instances,
            denial,
            class,
            default_wait,
        };
        let instances = match self.resolve(
            &args.method,
            &args.path,
            &args.oauth_client,
            args.permits,
            reserve,
            now,
        )? {
            Ok(i) => i,
            Err(denial) => return Ok(blocked(Vec::new(), denial)),
        };
        if let Some(denial) = self.paused(&instances) {
            return Ok(blocked(Vec::new(), denial));
        }
        let share = self.bucket_share(class, &instances);
        if !self.waiting_at_or_above(&instances, class)
            && self.can_take(&instances, args.permits, share, now)
        {
            let grant = self.take(&instances, args.permits, &args.client_id, now);
            return Ok(Attempt::Granted(grant));
        }
        let denial = self.explain(&instances, args.permits, share, now);
        let full = instances.iter().find_map(|&i| {
            let x = self.instances.get(i)?;
            (x.queued >= self.max_waiters).then(|| self.buckets[x.bucket].settings.name.clone())
        });
        if let Some(bucket) = full {
            return Ok(blocked(
                Vec::new(),
                Denial {
                    reason: format!(
                        "{}; and {} requests already wait on bucket {bucket:?} \
                         (scheduling.max_waiters_per_bucket), so this one may not queue",
                        denial.reason, self.max_waiters
                    ),
                    ..denial
                },
            ));
        }
        Ok(blocked(instances, denial))
    }

    /// A denial if any of `instances` belongs to a paused bucket.
    fn paused(&self, instances: &[usize]) -> Option<Denial> {
        instances.iter().find_map(|&i| {
            let def = &self.buckets[self.instances.get(i)?.bucket];
            def.paused.as_ref().map(|why| Denial {
                retry_after: Duration::ZERO,
                reason: format!(
                    "bucket {:?} is paused by an operator: {why}",
                    def.settings.name
                ),
                buckets: self.names(instances),
            })
        })
    }

    fn can_take(&self, instances: &[usize], n: u32, reserve: f64, now: Instant) -> bool {
        instances.iter().all(|&i| {
            self.instances
                .get(i)
                .is_some_and(|x| x.ready_at(n, reserve, now).is_ok_and(|t| t <= now))
        })
    }

    /// Takes `n` from every instance; the caller has checked [`Self::can_take`].
    fn take(&mut self, instances: &[usize], n: u32, client_id: &str, now: Instant) -> Grant {
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
            (expires_at, ttl)
        });
        Grant {
            lease_id: LeaseId {
                tenant: self.idx,
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
    pub fn explain(&self, instances: &[usize], n: u32, reserve: f64, now: Instant) -> Denial {
        let mut retry = now;
        let mut reason = String::new();
        for &i in instances {
            let Some(x) = self.instances.get(i) else {
                continue;
            };
            let name = &self.buckets[x.bucket].settings.name;
            let sep = if reason.is_empty() { "" } else { "; " };
            if let Some(resume) = x.resume_at.filter(|&r| r > now) {
                retry = retry.max(x.ready_at(n, reserve, now).unwrap_or(resume));
                let _ = write!(
                    reason,
                    "{sep}bucket {name:?} is frozen for {} ms after the upstream answered 429",
                    resume.saturating_duration_since(now).as_millis()
                );
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
            let note = |capacity: u32| match held_back(capacity, reserve) {
                0 => String::new(),
                held => format!(" ({held} held back for higher classes)"),
            };
            if let Some(s) = x
                .slots
                .filter(|s| !s.has_room(n.saturating_add(held_back(s.max(), reserve))))
            {
                let at = self.leases.first_expiry_holding(i).unwrap_or(now);
                retry = retry.max(at);
                let _ = write!(
                    reason,
                    "{sep}bucket {name:?} has {} of {} concurrency slots in use{}",
                    s.in_flight(),
                    s.max(),
                    note(s.max())
                );
                continue;
            }
            if let Some(t) = x.tokens.as_ref() {
                let at = t
                    .ready_at_reserved(n, token_reserve(t.burst(), reserve), now)
                    .unwrap_or(now);
                if at > now {
                    retry = retry.max(at);
                    let _ = write!(
                        reason,
                        "{sep}bucket {name:?} has {:.2} permits for {n} asked (refills at \
                         {:.1}/min){}",
                        t.available(now),
                        t.rate_per_min(),
                        note(t.burst())
                    );
                    continue;
                }
            }
            if x.queued > 0 {
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

    /// Puts a blocked request in the queue; returns the waiter id.
    pub fn enqueue(
        &mut self,
        instances: Vec<usize>,
        class: usize,
        args: &AcquireArgs,
        reply: Reply,
    ) -> u64 {
        for &i in &instances {
            if let Some(x) = self.instances.get_mut(i) {
                x.queued += 1;
                *x.waiting.entry(class).or_default() += 1;
            }
            self.touch(i);
        }
        self.queue.push(
            instances,
            args.permits,
            class,
            Arc::from(args.client_id.as_str()),
            reply,
        )
    }

    fn unqueue(&mut self, w: &Waiter<Reply>) {
        for &i in &w.instances {
            if let Some(x) = self.instances.get_mut(i) {
                x.queued = x.queued.saturating_sub(1);
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
        let w = self.queue.remove(waiter)?;
        self.unqueue(&w);
        let share = self.bucket_share(w.class, &w.instances);
        Some(self.explain(&w.instances, w.permits, share, now))
    }

    /// Hands a grant back (its waiter was gone before it could take it).
    pub fn undo(&mut self, grant: &Grant) {
        self.release(grant.lease_id);
    }

    /// Returns a lease's slots; false if it holds none (unknown, released,
    /// expired, or a lease of rate buckets only).
    pub fn release(&mut self, id: LeaseId) -> bool {
        let Some(lease) = self.leases.remove(id.seq, id.nonce) else {
            return false;
        };
        self.give_back(&lease);
        true
    }

    fn give_back(&mut self, lease: &Lease) {
        for &i in &lease.instances {
            if let Some(s) = self.instances.get_mut(i).and_then(|x| x.slots.as_mut()) {
                s.give_back(lease.permits);
            }
            self.touch(i);
        }
    }

    /// Extends a lease's slots to `now + extend` (`None`: its default TTL).
    pub fn renew(
        &mut self,
        id: LeaseId,
        extend: Option<Duration>,
        now: Instant,
    ) -> Result<(Instant, Duration), BrokerError> {
        let not_found = || BrokerError::LeaseNotFound {
            lease_id: id.to_string(),
        };
        let ttl = extend
            .or_else(|| self.leases.get(id.seq, id.nonce).map(|l| l.ttl))
            .ok_or_else(not_found)?;
        let expires_at = now + ttl;
        self.leases
            .renew(id.seq, id.nonce, expires_at)
            .ok_or_else(not_found)?;
        Ok((expires_at, ttl))
    }

    /// Learns from an upstream outcome: counts it on every bucket of the
    /// call; a success regrows their rates; a 429 and the rate-limit headers
    /// are attributed to one bucket (see [`TenantState::attribute`]), which
    /// freezes, cuts its rate, and syncs to the upstream's remaining budget.
    pub fn report(
        &mut self,
        call: (&str, &str, &str),
        http_status: u32,
        retry_after: Option<Duration>,
        info: &RateLimitInfo,
        now: Instant,
    ) -> Result<ReportOutcome, BrokerError> {
        let (method, path, oauth_client) = call;
        let instances = match self.resolve(method, path, oauth_client, 1, 0.0, now)? {
            Ok(i) => i,
            Err(denial) => {
                return Ok(ReportOutcome {
                    buckets: denial.buckets,
                    attributed_to: None,
                })
            }
        };
        let throttled = http_status == 429;
        let (described, refused_by) = self.attribute_report(&instances, info, throttled);
        let s = self.learning;
        for &i in &instances {
            let Some(x) = self.instances.get_mut(i) else {
                continue;
            };
            x.reports_total += 1;
            if http_status < 400 {
                let before = x.learner.rate(now, &s);
                x.learner.on_success(now, &s);
                if x.learner.rate(now, &s) != before {
                    x.apply_rate(now, &s);
                    self.learned_dirty = true;
                }
            }
        }
        if let Some(i) = described.filter(|&d| refused_by != Some(d)) {
            self.learn(i, Some(info), None, now);
        }
        if let Some(i) = refused_by {
            // Headers that describe another budget say nothing of this one.
            let own = (described == Some(i)).then_some(info);
            self.learn(i, own, Some(retry_after), now);
        }
        let target = refused_by.or(described);
        for &i in &instances {
            self.touch(i);
        }
        Ok(ReportOutcome {
            buckets: self.names(&instances),
            attributed_to: target.map(|i| self.name(i)),
        })
    }

    /// Which bucket the rate-limit headers describe, and which bucket
    /// refused a 429. They differ when the headers describe a budget with
    /// requests left: Genesys sends its per-OAuth-client headers on every
    /// answer, also on a 429 from an org-wide endpoint-family limit, and
    /// that 429 must teach the family's bucket, not freeze the client's.
    fn attribute_report(
        &self,
        instances: &[usize],
        info: &RateLimitInfo,
        throttled: bool,
    ) -> (Option<usize>, Option<usize>) {
        let described = (!info.is_empty())
            .then(|| self.attribute(instances, info))
            .flatten();
        if !throttled {
            return (described, None);
        }
        let budget_left = info.remaining.is_some_and(|r| r > 0);
        let refused_by = match described {
            Some(d) if budget_left => {
                let others: Vec<usize> = instances.iter().copied().filter(|&i| i != d).collect();
                self.attribute(&others, &RateLimitInfo::default())
                    .or(Some(d))
            }
            Some(d) => Some(d),
            None => self.attribute(instances, info),
        };
        (described, refused_by)
    }

    /// Applies what a report says to instance `i`: `info` (the headers, when
    /// they describe this bucket's budget) and `throttled` (a 429 this bucket
    /// refused, with its Retry-After).
    fn learn(
        &mut self,
        i: usize,
        info: Option<&RateLimitInfo>,
        throttled: Option<Option<Duration>>,
        now: Instant,
    ) {
        let s = self.learning;
        let tenant = self.id.clone();
        let bucket = self.name(i);
        let Some(x) = self.instances.get_mut(i) else {
            return;
        };
        let mut learned = Vec::new();
        let empty = RateLimitInfo::default();
        let info = info.unwrap_or(&empty);
        let window = info
            .window
            .or(self.buckets[x.bucket].settings.rate.map(|r| r.window))
            .unwrap_or(Duration::from_secs(60));
        if let Some(limit) = info.limit {
            let per_min = limit as f64 * 60.0 / window.as_secs_f64().max(1e-3);
            learned.extend(x.learner.on_limit(per_min));
        }
        x.sync_budget(info, window, now);
        if let Some(retry_after) = throttled {
            x.throttled_total += 1;
            learned.extend(
                x.learner
                    .on_throttled(now, retry_after, info.exhausted(), &s),
            );
            // Jitter is drawn once per freeze end, not once per report.
            for change in &learned {
                if let Learned::Frozen { until } = change {
                    x.freeze(*until, self.rng.f64(), &s);
                }
            }
        }
        x.apply_rate(now, &s);
        for change in &learned {
            match change {
                Learned::Frozen { until } => tracing::info!(
                    %tenant, %bucket, oauth_client = x.oauth_client.as_deref().unwrap_or(""),
                    frozen_ms = until.saturating_duration_since(now).as_millis() as u64,
                    "upstream answered 429: bucket frozen for the whole tenant"
                ),
                Learned::Cut { from, to, why } => tracing::info!(
                    %tenant, %bucket, from_per_min = from, to_per_min = to,
                    "effective rate cut: {why}"
                ),
                Learned::Limit { per_min } => tracing::info!(
                    %tenant, %bucket, learned_per_min = per_min,
                    configured_per_min = x.learner.configured(),
                    "upstream reports a limit below the configured rate; adopting it"
                ),
            }
        }
        if !learned.is_empty() {
            self.learned_dirty = true;
        }
    }

    /// Which bucket of a call a 429 or rate-limit headers belong to.
    ///
    /// Headers that state a limit describe the budget of that size: the
    /// rate bucket whose configured permits per window is closest to it
    /// (Genesys's `inin-ratelimit-allowed: 300` is the per-OAuth-client
    /// budget; an analytics limit of 60 is the analytics bucket's). Without
    /// a stated limit: the narrowest org-wide bucket (lowest configured
    /// rate; concurrency-only ones last), else the OAuth client's bucket.
    pub fn attribute(&self, instances: &[usize], info: &RateLimitInfo) -> Option<usize> {
        let with = |i: &usize| {
            self.instances
                .get(*i)
                .map(|x| (*i, x, &self.buckets[x.bucket].settings))
        };
        if let Some(limit) = info.limit {
            let closest = instances
                .iter()
                .filter_map(with)
                .filter_map(|(i, _, b)| b.rate.map(|r| (i, r.permits.get())))
                .min_by_key(|&(_, permits)| (u64::from(permits).abs_diff(limit), permits));
            if let Some((i, _)) = closest {
                return Some(i);
            }
        }
        let org = instances
            .iter()
            .filter_map(with)
            .filter(|(_, _, b)| b.scope == Scope::Org)
            .min_by(|a, b| {
                let rate = |b: &BucketSettings| b.rate.map_or(f64::INFINITY, |r| r.per_minute());
                rate(a.2).total_cmp(&rate(b.2))
            })
            .map(|(i, _, _)| i);
        org.or_else(|| instances.first().copied())
    }

    /// The tenant's classes.
    pub fn classes(&self) -> &[ClassSettings] {
        &self.classes
    }

    /// Creates or changes a class (checked as in the config).
    pub fn set_class(&mut self, class: ClassSettings) -> Result<(), BrokerError> {
        let mut next = self.classes.clone();
        match next.iter_mut().find(|c| c.name == class.name) {
            Some(c) => *c = class.clone(),
            None => next.push(class.clone()),
        }
        let mut problems = Vec::new();
        class.check("class", &mut problems);
        crate::config::check_class_set(&next, &mut problems);
        if !problems.is_empty() {
            return Err(BrokerError::invalid("class", problems.join("; ")));
        }
        self.classes = next;
        for (k, c) in self.classes.iter().enumerate() {
            self.queue.set_class(
                k,
                ClassShape {
                    order: c.order,
                    weight: c.weight,
                },
            );
        }
        Ok(())
    }

    /// Every instance of bucket `b`.
    fn instances_of(&self, b: usize) -> Vec<usize> {
        self.instances
            .iter()
            .filter(|(_, x)| x.bucket == b)
            .map(|(i, _)| i)
            .collect()
    }

    fn bucket_index(&self, bucket: &str) -> Result<usize, BrokerError> {
        self.buckets
            .iter()
            .position(|b| b.settings.name == bucket)
            .ok_or_else(|| BrokerError::UnknownBucket {
                tenant: self.id.clone(),
                bucket: bucket.to_owned(),
                known: self
                    .buckets
                    .iter()
                    .map(|b| b.settings.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Changes a bucket's configured limits (`None`/0 fields unchanged);
    /// applies at once to every instance and to waiting requests.
    pub fn set_bucket_limit(
        &mut self,
        bucket: &str,
        change: LimitChange,
        now: Instant,
    ) -> Result<&BucketSettings, BrokerError> {
        let b = self.bucket_index(bucket)?;
        let old = self.buckets[b].settings.clone();
        let bad = |field, problem: String| BrokerError::invalid(field, problem);
        let rate = match (change.permits, change.window, old.rate) {
            (None, None, r) => r.map(|r| (r.permits.get(), r.window, r.burst.get())),
            (p, w, Some(r)) => Some((
                p.unwrap_or(r.permits.get()),
                w.unwrap_or(r.window),
                r.burst.get(),
            )),
            (Some(p), Some(w), None) => Some((p, w, p)),
            _ => {
                return Err(bad(
                    "permits",
                    format!("bucket {bucket:?} has no rate yet; give both permits and window_ms"),
                ))
            }
        }
        .map(|(p, w, burst)| (p, w, change.burst.unwrap_or(burst)));
        if let Some((p, w, burst)) = rate {
            if p == 0 || w.is_zero() || w > Duration::from_secs(86_400) {
                return Err(bad(
                    "window_ms",
                    "the rate needs permits > 0 and a window of 1 ms to 1 day".into(),
                ));
            }
            if burst == 0 || burst > 1_000_000 {
                return Err(bad(
                    "burst",
                    format!("{burst} must be between 1 and 1000000"),
                ));
            }
        } else if change.burst.is_some() {
            return Err(bad(
                "burst",
                format!("bucket {bucket:?} has no rate to burst"),
            ));
        }
        let settings = &mut self.buckets[b].settings;
        settings.rate = rate.and_then(|(p, w, burst)| {
            Some(crate::config::Rate {
                permits: std::num::NonZeroU32::new(p)?,
                window: w,
                burst: std::num::NonZeroU32::new(burst)?,
            })
        });
        if let Some(m) = change.max_in_flight {
            settings.max_in_flight = std::num::NonZeroU32::new(m);
        }
        let settings = settings.clone();
        let s = self.learning;
        for i in self.instances_of(b) {
            let Some(x) = self.instances.get_mut(i) else {
                continue;
            };
            if let Some(r) = settings.rate {
                x.learner.set_configured(r.per_minute(), r.window);
                match x.tokens.as_mut() {
                    Some(t) => t.set_burst(r.burst.get(), now),
                    None => {
                        x.tokens = Some(TokenBucket::new(
                            r.permits.get(),
                            r.window,
                            r.burst.get(),
                            now,
                        ))
                    }
                }
                x.apply_rate(now, &s);
            }
            if let Some(m) = settings.max_in_flight {
                match x.slots.as_mut() {
                    Some(sl) => sl.set_max(m.get()),
                    None => x.slots = Some(Slots::new(m.get())),
                }
            }
            self.touch(i);
        }
        Ok(&self.buckets[b].settings)
    }

    /// Pauses (`Some(reason)`) or resumes (`None`) a bucket. Pausing answers
    /// every request waiting on it at once, with the reason.
    pub fn set_paused(
        &mut self,
        bucket: &str,
        reason: Option<String>,
        now: Instant,
    ) -> Result<(), BrokerError> {
        let b = self.bucket_index(bucket)?;
        self.buckets[b].paused = reason;
        let on_bucket = self.instances_of(b);
        if self.buckets[b].paused.is_some() {
            let gone = self
                .queue
                .remove_where(|w| w.instances.iter().any(|i| on_bucket.contains(i)));
            for w in gone {
                self.unqueue(&w);
                let denial = self
                    .paused(&w.instances)
                    .unwrap_or_else(|| self.explain(&w.instances, w.permits, 0.0, now));
                let _ = w.reply.send(Err(denial));
            }
        }
        for i in on_bucket {
            self.touch(i);
        }
        Ok(())
    }

    /// The bucket's current limits and pause, for the admin state file.
    pub fn bucket_admin_view(&self, bucket: &str) -> Option<(&BucketSettings, Option<&str>)> {
        let b = self.bucket_index(bucket).ok()?;
        Some((&self.buckets[b].settings, self.buckets[b].paused.as_deref()))
    }

    /// Whether learned state changed since the last call.
    pub fn take_learned_dirty(&mut self) -> bool {
        std::mem::take(&mut self.learned_dirty)
    }

    /// Learned state of every instance that has any:
    /// (bucket, OAuth client, state).
    pub fn learned(&self, now: Instant) -> Vec<(String, Option<String>, Persisted)> {
        self.instances
            .iter()
            .filter(|(_, x)| !x.learner.is_pristine(now))
            .map(|(_, x)| {
                let b = &self.buckets[x.bucket].settings;
                let client = x.oauth_client.as_deref().map(str::to_owned);
                (b.name.clone(), client, x.learner.persisted())
            })
            .collect()
    }

    /// Restores learned state of one instance (creating a per-client one).
    /// False if the bucket no longer exists in the config.
    pub fn restore(
        &mut self,
        bucket: &str,
        oauth_client: Option<&str>,
        p: Persisted,
        now: Instant,
    ) -> bool {
        let Some(b) = self.buckets.iter().position(|d| d.settings.name == bucket) else {
            return false;
        };
        let i = match (self.buckets[b].org, oauth_client) {
            (Some(i), _) => Some(i),
            (None, Some(c)) => match self.buckets[b].per_client.get(c) {
                Some(&i) => Some(i),
                None => self.add_client_instance(b, c, now),
            },
            (None, None) => None,
        };
        let Some(x) = i.and_then(|i| self.instances.get_mut(i)) else {
            return false;
        };
        let s = &self.learning;
        x.learner.restore(p);
        if let Some(until) = x.learner.frozen_until(now) {
            x.freeze(until, self.rng.f64(), s);
        }
        x.apply_rate(now, s);
        true
    }

    /// Expires leases, serves waiters, drops idle instances; returns when to
    /// run again at the latest (`None`: only when something changes).
    pub fn tick(&mut self, now: Instant) -> Option<Instant> {
        while let Some((seq, lease)) = self.leases.pop_expired(now) {
            tracing::info!(
                tenant = %self.id,
                lease = %LeaseId { tenant: self.idx, seq, nonce: lease.nonce },
                client_id = %lease.client_id,
                "lease expired without release; its slots are back"
            );
            self.give_back(&lease);
        }
        let mut queue = std::mem::take(&mut self.queue);
        let mut grants = Vec::new();
        let (granted, next_ready) = queue.serve(|w| {
            let share = self.bucket_share(w.class, &w.instances);
            if self.paused(&w.instances).is_none()
                && self.can_take(&w.instances, w.permits, share, now)
            {
                grants.push(self.take(&w.instances, w.permits, &w.client_id, now));
                return Offer::Granted;
            }
            let ready: Result<Vec<Instant>, ()> = w
                .instances
                .iter()
                .map(|&i| {
                    self.instances
                        .get(i)
                        .map_or(Err(()), |x| x.ready_at(w.permits, share, now))
                })
                .collect();
            Offer::NotYet(ready.ok().and_then(|ts| ts.into_iter().max()))
        });
        self.queue = queue;
        for (w, grant) in granted.into_iter().zip(grants) {
            self.unqueue(&w);
            if let Err(Ok(grant)) = w.reply.send(Ok(grant)) {
                // The waiter's caller is gone and could not withdraw first
                // (it withdraws under this same lock): hand the grant back.
                self.undo(&grant);
            }
        }
        if now >= self.next_sweep {
            self.evict_idle(None, now);
            self.next_sweep = now + SWEEP_EVERY;
        }
        [next_ready, self.leases.next_expiry(), Some(self.next_sweep)]
            .into_iter()
            .flatten()
            .min()
    }

    /// Answers every waiter (shutdown): they leave the queue unanswered and
    /// their callers see the channel closed.
    pub fn drop_waiters(&mut self) {
        let waiters = self.queue.drain();
        for w in &waiters {
            self.unqueue(w);
        }
    }

    /// Status of instances whose version is above what `seen` holds for
    /// them (all instances when `seen` is empty); updates `seen`.
    pub fn statuses_since(
        &self,
        seen: &mut HashMap<usize, u64>,
        now: Instant,
    ) -> Vec<BucketStatus> {
        let mut out = Vec::new();
        for (i, x) in &self.instances {
            let last = seen.get(&i).copied();
            if last.is_some_and(|v| v >= x.version) {
                continue;
            }
            seen.insert(i, x.version);
            out.push(self.status_of(x, now));
        }
        seen.retain(|i, _| self.instances.contains(*i));
        out
    }

    /// Status of every instance.
    pub fn statuses(&self, now: Instant) -> Vec<BucketStatus> {
        self.instances
            .iter()
            .map(|(_, x)| self.status_of(x, now))
            .collect()
    }

    fn status_of(&self, x: &Instance, now: Instant) -> BucketStatus {
        let settings = &self.buckets[x.bucket].settings;
        BucketStatus {
            bucket: settings.name.clone(),
            scope: settings.scope,
            oauth_client: x.oauth_client.as_deref().map(str::to_owned),
            configured_rate_per_min: settings.rate.map_or(0.0, |r| r.per_minute()),
            effective_rate_per_min: x.tokens.as_ref().map_or(0.0, |t| t.rate_per_min()),
            burst: x.tokens.as_ref().map_or(0, |t| t.burst()),
            tokens_available: x.tokens.as_ref().map_or(0.0, |t| t.available(now)),
            in_flight: x.slots.map_or(0, |s| s.in_flight()),
            max_in_flight: x.slots.map_or(0, |s| s.max()),
            waiting: x
                .waiting
                .iter()
                .filter_map(|(&k, &n)| Some((self.classes.get(k)?.name.clone(), n)))
                .collect(),
            paused: self.buckets[x.bucket].paused.clone(),
            granted_total: x.granted_total,
            throttled_total: x.throttled_total,
            reports_total: x.reports_total,
            frozen_until: x.learner.frozen_until(now),
            learned_limit_per_min: x.learner.learned_limit(),
            throttle_ratio: x.learner.throttle_ratio(now, &self.learning),
            cooldown_until: x.learner.cooldown_until(now),
            upstream_remaining: x.upstream.and_then(|u| u.remaining(now)),
        }
    }

    /// Waiters in the queue.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// Leases holding slots.
    pub fn leases_held(&self) -> usize {
        self.leases.len()
    }
}

/// Permits of a token bucket of `burst` held back by a reserve `share`,
/// or, for a negative share, that may be borrowed below empty (see
/// `bucket_share`).
fn token_reserve(burst: u32, share: f64) -> f64 {
    if share >= 0.0 {
        f64::from(held_back(burst, share))
    } else {
        -f64::from(held_back(burst, -share))
    }
}

/// Whole permits or slots of `capacity` held back by a reserve `share`
/// (rounded down, so a small bucket keeps at least one for everyone; 0 for
/// a negative share).
fn held_back(capacity: u32, share: f64) -> u32 {
    ((f64::from(capacity) * share + 1e-9).floor() as u32).min(capacity.saturating_sub(1))
}

fn check_permits(
    tenant: &str,
    b: &BucketSettings,
    permits: u32,
    reserve: f64,
) -> Result<(), BrokerError> {
    let too_many = |max: u32, what| BrokerError::TooManyPermits {
        tenant: tenant.to_owned(),
        bucket: b.name.clone(),
        permits,
        max,
        what,
    };
    if let Some(r) = b.rate {
        let held = held_back(r.burst.get(), reserve);
        let max = r.burst.get() - held;
        if permits > max {
            let what = if held > 0 {
                "burst less the reserve of higher classes"
            } else {
                "burst"
            };
            return Err(too_many(max, what));
        }
    }
    if let Some(m) = b.max_in_flight {
        let held = held_back(m.get(), reserve);
        let max = m.get() - held;
        if permits > max {
            let what = if held > 0 {
                "max_in_flight less the reserve of higher classes"
            } else {
                "max_in_flight"
            };
            return Err(too_many(max, what));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use proptest::prelude::*;

    const SEC: Duration = Duration::from_secs(1);

    fn tenant(toml_buckets: &str, now: Instant) -> TenantState {
        let s = Settings::from_toml(&format!("[[tenants]]\nid = \"t\"\n{toml_buckets}")).unwrap();
        TenantState::new(0, &s.tenants[0], &s, Default::default(), now)
    }

    fn args(method: &str, path: &str, permits: u32) -> AcquireArgs {
        AcquireArgs {
            client_id: "c".into(),
            class: String::new(),
            method: method.into(),
            path: path.into(),
            oauth_client: "oa".into(),
            permits,
        }
    }

    const TWO: &str = r#"
        [[tenants.buckets]]
        name = "rate"
        routes = ["* /**"]
        permits = 2
        window_ms = 1000
        [[tenants.buckets]]
        name = "slots"
        routes = ["POST /q"]
        max_in_flight = 1
        lease_ttl_ms = 5000
    "#;

    fn granted(a: Attempt) -> Grant {
        match a {
            Attempt::Granted(g) => g,
            Attempt::Blocked { denial, .. } => panic!("not granted: {}", denial.reason),
        }
    }

    #[test]
    fn grant_draws_on_all_buckets_or_none() {
        let t0 = Instant::now();
        let mut t = tenant(TWO, t0);
        let g = granted(t.try_acquire(&args("POST", "/q", 1), t0).unwrap());
        assert_eq!(g.buckets, ["rate", "slots"]);
        assert_eq!(g.slot, Some((t0 + 5 * SEC, 5 * SEC)));
        // The slot is taken: the next POST takes nothing from "rate" either.
        let Attempt::Blocked { denial, .. } = t.try_acquire(&args("POST", "/q", 1), t0).unwrap()
        else {
            panic!("granted past the slot limit")
        };
        assert!(
            denial
                .reason
                .contains("\"slots\" has 1 of 1 concurrency slots in use"),
            "{}",
            denial.reason
        );
        assert_eq!(denial.retry_after, 5 * SEC);
        let rate = t
            .statuses(t0)
            .into_iter()
            .find(|s| s.bucket == "rate")
            .unwrap();
        assert_eq!(rate.tokens_available, 1.0);
        assert!(t.release(g.lease_id));
        assert!(!t.release(g.lease_id), "second release changes nothing");
        granted(t.try_acquire(&args("POST", "/q", 1), t0).unwrap());
    }

    #[test]
    fn expiry_returns_slots_and_serves_waiters() {
        let t0 = Instant::now();
        let mut t = tenant(TWO, t0);
        granted(t.try_acquire(&args("POST", "/q", 1), t0).unwrap());
        let Attempt::Blocked {
            instances, class, ..
        } = t.try_acquire(&args("POST", "/q", 1), t0).unwrap()
        else {
            panic!()
        };
        let (tx, mut rx) = oneshot::channel();
        t.enqueue(instances, class, &args("POST", "/q", 1), tx);
        assert_eq!(
            t.tick(t0),
            Some(t0 + 5 * SEC),
            "wakes at the lease's expiry"
        );
        assert!(rx.try_recv().is_err());
        t.tick(t0 + 5 * SEC);
        let g = rx
            .try_recv()
            .expect("answered once the slot expired")
            .expect("granted");
        assert_eq!(g.slot.map(|s| s.0), Some(t0 + 10 * SEC));
        assert_eq!(t.waiting(), 0);
        assert_eq!(t.leases_held(), 1);
    }

    #[test]
    fn critical_borrows_below_empty_only_while_a_lower_class_waits() {
        let t0 = Instant::now();
        // One permit a second, burst 10; the default classes hold 20% (2
        // permits) back from the lowest.
        let mut t = tenant(
            "[[tenants.buckets]]\nname = \"r\"\nroutes = [\"* /**\"]\npermits = 60\n\
             window_ms = 60000\nburst = 10",
            t0,
        );
        let call = |class: &str| AcquireArgs {
            class: class.into(),
            ..args("GET", "/x", 1)
        };
        for _ in 0..10 {
            granted(t.try_acquire(&call("critical"), t0).unwrap());
        }
        // Empty, nobody below waits: critical waits like anyone.
        assert!(matches!(
            t.try_acquire(&call("critical"), t0).unwrap(),
            Attempt::Blocked { .. }
        ));
        let Attempt::Blocked {
            instances, class, ..
        } = t.try_acquire(&call("batch"), t0).unwrap()
        else {
            panic!("batch granted from an empty bucket")
        };
        let (tx, mut rx) = oneshot::channel();
        t.enqueue(instances, class, &call("batch"), tx);
        // Batch waits: critical borrows the 2 held back from it, no more.
        granted(t.try_acquire(&call("critical"), t0).unwrap());
        granted(t.try_acquire(&call("critical"), t0).unwrap());
        let Attempt::Blocked { denial, .. } = t.try_acquire(&call("critical"), t0).unwrap() else {
            panic!("borrowed past the reserve")
        };
        assert_eq!(denial.retry_after, SEC);
        // Batch pays it back: 1 permit plus its 2 held back are 5 s away.
        t.tick(t0 + 4 * SEC);
        assert!(
            rx.try_recv().is_err(),
            "batch served before the debt was repaid"
        );
        t.tick(t0 + 5 * SEC);
        rx.try_recv().expect("answered").expect("granted");
    }

    #[test]
    fn renew_extends_and_unknown_is_not_found() {
        let t0 = Instant::now();
        let mut t = tenant(TWO, t0);
        let g = granted(t.try_acquire(&args("POST", "/q", 1), t0).unwrap());
        let (at, ttl) = t.renew(g.lease_id, Some(20 * SEC), t0 + 4 * SEC).unwrap();
        assert_eq!((at, ttl), (t0 + 24 * SEC, 20 * SEC));
        t.tick(t0 + 10 * SEC);
        assert_eq!(
            t.leases_held(),
            1,
            "renewed lease survives its first expiry"
        );
        let (at, _) = t.renew(g.lease_id, None, t0 + 10 * SEC).unwrap();
        assert_eq!(at, t0 + 15 * SEC, "default TTL");
        t.tick(t0 + 15 * SEC);
        assert!(matches!(
            t.renew(g.lease_id, None, t0 + 15 * SEC),
            Err(BrokerError::LeaseNotFound { .. })
        ));
        assert!(!t.release(g.lease_id), "release after expiry is a no-op");
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let t0 = Instant::now();
        let mut t = tenant(TWO, t0);
        assert!(matches!(
            t.try_acquire(&args("POST", "/q", 3), t0),
            Err(BrokerError::TooManyPermits {
                max: 2,
                what: "burst",
                ..
            })
        ));
        let mut t = tenant(
            "[[tenants.buckets]]\nname = \"only\"\nroutes = [\"GET /a\"]\nmax_in_flight = 1\n",
            t0,
        );
        assert!(matches!(
            t.try_acquire(&args("GET", "/b", 1), t0),
            Err(BrokerError::NoBucketMatches { .. })
        ));
    }

    #[test]
    fn per_client_instances_are_bounded_and_idle_ones_evicted() {
        let t0 = Instant::now();
        let mut t = tenant(
            r#"
            [[tenants.buckets]]
            name = "pc"
            scope = "oauth_client"
            routes = ["* /**"]
            permits = 1
            window_ms = 1000
            max_clients = 2
            "#,
            t0,
        );
        let mut a = args("GET", "/x", 1);
        for c in ["a", "b"] {
            a.oauth_client = c.into();
            granted(t.try_acquire(&a, t0).unwrap());
        }
        a.oauth_client = "c".into();
        let Attempt::Blocked { denial, .. } = t.try_acquire(&a, t0).unwrap() else {
            panic!()
        };
        assert!(
            denial.reason.contains("limit of 2 OAuth clients"),
            "{}",
            denial.reason
        );
        // Once a and b are full again they are idle and make room.
        granted(t.try_acquire(&a, t0 + SEC).unwrap());
        assert_eq!(t.statuses(t0 + SEC).len(), 1);
        // Each client has its own budget.
        a.oauth_client = "a".into();
        granted(t.try_acquire(&a, t0 + SEC).unwrap());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Acquire(u32),
        Release(usize),
        Advance(u64),
    }

    proptest! {
        /// No interleaving of acquires, releases, waits and expiries holds
        /// more slots than the limit, or grants more permits in any window
        /// than burst + rate × window.
        #[test]
        fn limits_hold_under_any_interleaving(
            ops in prop::collection::vec(prop_oneof![
                (1u32..3).prop_map(Op::Acquire),
                (0usize..8).prop_map(Op::Release),
                (0u64..3000).prop_map(Op::Advance),
            ], 1..150)
        ) {
            let t0 = Instant::now();
            let mut t = tenant(r#"
                [[tenants.buckets]]
                name = "both"
                routes = ["* /**"]
                permits = 5
                window_ms = 1000
                burst = 3
                max_in_flight = 3
                lease_ttl_ms = 2000
            "#, t0);
            let mut now = t0;
            let mut held: Vec<LeaseId> = Vec::new();
            let mut waiting = Vec::new();
            let mut grants: Vec<(Instant, u32)> = Vec::new();
            for op in ops {
                match op {
                    Op::Acquire(n) => match t.try_acquire(&args("GET", "/", n), now).unwrap() {
                        Attempt::Granted(g) => { grants.push((now, n)); held.push(g.lease_id); }
                        Attempt::Blocked { instances, class, .. } => {
                            let (tx, rx) = oneshot::channel();
                            t.enqueue(instances, class, &args("GET", "/", n), tx);
                            waiting.push((n, rx));
                        }
                    },
                    Op::Release(k) => if !held.is_empty() {
                        let id = held.remove(k % held.len());
                        t.release(id);
                    },
                    Op::Advance(ms) => now += Duration::from_millis(ms),
                }
                t.tick(now);
                waiting.retain_mut(|(n, rx)| match rx.try_recv() {
                    Ok(Ok(g)) => { grants.push((now, *n)); held.push(g.lease_id); false }
                    Ok(Err(_)) => false,
                    Err(_) => true,
                });
                let s = &t.statuses(now)[0];
                prop_assert!(s.in_flight <= 3, "{} slots held", s.in_flight);
            }
            for (i, &(start, _)) in grants.iter().enumerate() {
                for &(end, _) in &grants[i..] {
                    let w = (end - start).as_secs_f64();
                    let n: u32 = grants.iter().filter(|(t, _)| *t >= start && *t <= end).map(|(_, n)| n).sum();
                    prop_assert!(f64::from(n) <= 3.0 + w * 5.0 + 1e-9, "{n} in {w}s");
                }
            }
        }
    }
}
