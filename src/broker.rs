//! The broker handle: every tenant's state behind its lock, the per-tenant
//! driver task that wakes waiters and expires leases on time, and the change
//! feed behind Watch. Cheap to clone; the gRPC services hold one.
//!
//! A request locks its tenant once, decides, and unlocks before any
//! `.await`. A request that must wait leaves a oneshot sender in the queue
//! and awaits the receiver; the driver (woken by a `Notify` on every release
//! and enqueue, and by a timer at the next instant anything can change) sends
//! the grant under the lock. Waiting is therefore answered the moment capacity
//! frees, with no polling.

use crate::adaptive::Persisted;
use crate::config::{ClassSettings, ServerSettings, Settings};
use crate::error::BrokerError;
use crate::headers::RateLimitInfo;
use crate::lease::LeaseId;
use crate::state::{AdminBucket, AdminClass, AdminFile, LearnedEntry, LearnedFile};
use crate::tenant::{
    AcquireArgs, Attempt, BucketStatus, Denial, Grant, LimitChange, ReportOutcome, TenantState,
};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Shortest time between two Watch updates of the same stream, so a busy
/// bucket sends at most about ten updates a second.
pub const WATCH_COALESCE: Duration = Duration::from_millis(100);

/// Maps the broker's monotonic clock to unix milliseconds for the wire.
/// Anchored once at start, so paused test time and wire times agree.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
    origin_unix_ms: u64,
}

impl Clock {
    fn new() -> Clock {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Clock {
            origin: Instant::now(),
            origin_unix_ms: u64::try_from(unix.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The instant of a unix-ms time, if it is still in the future.
    pub fn instant_of(&self, unix_ms: u64, now: Instant) -> Option<Instant> {
        let now_ms = self.unix_ms(now);
        (unix_ms > now_ms).then(|| now + Duration::from_millis(unix_ms - now_ms))
    }

    /// `at` in unix milliseconds.
    pub fn unix_ms(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.origin).as_millis();
        self.origin_unix_ms
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }
}

/// The answer to an Acquire.
#[derive(Debug)]
pub enum AcquireOutcome {
    /// Granted.
    Granted(Grant),
    /// Not granted within the wait.
    Denied(Denial),
}

/// One bucket's status, with its tenant and time.
#[derive(Debug, Clone)]
pub struct TenantBucketStatus {
    /// Tenant id.
    pub tenant: String,
    /// When the status was taken.
    pub at: Instant,
    /// The status.
    pub status: BucketStatus,
}

/// A tenant: its state and the bell of its driver.
struct Tenant {
    /// std `Mutex`: held only for the decision, never across `.await`, so
    /// an async mutex would only add cost.
    state: Mutex<TenantState>,
    /// Wakes the driver after a release or an enqueue; `notify_one` keeps a
    /// permit, so a wake-up that arrives while the driver works is not lost.
    wake: Notify,
}

impl Tenant {
    fn lock(&self) -> MutexGuard<'_, TenantState> {
        // A panic while holding the lock leaves counts that are still
        // consistent bucket by bucket; serving on beats failing every tenant
        // request from then on.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Inner {
    server: ServerSettings,
    tenants: Vec<Tenant>,
    by_id: HashMap<String, usize>,
    clock: Clock,
    /// Broker-wide change counter; bucket instances remember the value of
    /// their last change.
    version: Arc<AtomicU64>,
    /// The counter value last announced on `changes`.
    announced: AtomicU64,
    /// Tells Watch streams that something changed.
    changes: watch::Sender<()>,
    shutdown: CancellationToken,
    /// Every admin change so far (std `Mutex`: never held across `.await`).
    admin_changes: Mutex<BTreeSet<(usize, AdminKey)>>,
}

/// The broker: cheap to clone, shared by the gRPC services.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

/// The driver tasks of a started broker.
pub struct Drivers(Vec<JoinHandle<()>>);

/// How often learned state is written, at most.
const PERSIST_EVERY: Duration = Duration::from_secs(1);

impl Drivers {
    /// Waits until every driver stopped (after the shutdown token fired).
    pub async fn join(self) {
        for d in self.0 {
            if let Err(e) = d.await {
                tracing::error!(error = %e, "a tenant driver task failed");
            }
        }
    }
}

impl Broker {
    /// Builds the broker from validated settings and starts one driver task
    /// per tenant; they stop when `shutdown` is cancelled.
    pub fn start(settings: &Settings, shutdown: CancellationToken) -> (Broker, Drivers) {
        let now = Instant::now();
        let version = Arc::new(AtomicU64::new(0));
        let tenants: Vec<Tenant> = settings
            .tenants
            .iter()
            .enumerate()
            .map(|(i, t)| Tenant {
                state: Mutex::new(TenantState::new(
                    u32::try_from(i).unwrap_or(u32::MAX),
                    t,
                    settings,
                    version.clone(),
                    now,
                )),
                wake: Notify::new(),
            })
            .collect();
        let by_id = settings
            .tenants
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id.clone(), i))
            .collect();
        let broker = Broker {
            inner: Arc::new(Inner {
                server: settings.server.clone(),
                tenants,
                by_id,
                clock: Clock::new(),
                version,
                announced: AtomicU64::new(0),
                changes: watch::Sender::new(()),
                shutdown,
                admin_changes: Mutex::new(BTreeSet::new()),
            }),
        };
        if let Some(dir) = &settings.server.state_dir {
            broker.restore_admin(dir, now);
            broker.restore(dir, now);
        }
        let mut drivers: Vec<_> = (0..broker.inner.tenants.len())
            .map(|t| tokio::spawn(broker.clone().drive(t)))
            .collect();
        if let Some(dir) = settings.server.state_dir.clone() {
            drivers.push(tokio::spawn(broker.clone().persist(dir)));
        }
        (broker, Drivers(drivers))
    }

    fn restore(&self, dir: &std::path::Path, now: Instant) {
        let file = match LearnedFile::read(dir) {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "learned state not restored; starting on the config alone");
                return;
            }
        };
        let clock = self.inner.clock;
        let mut restored = 0;
        for e in file.buckets {
            let Some(&t) = self.inner.by_id.get(&e.tenant) else {
                tracing::info!(tenant = %e.tenant, "learned state of a tenant no longer configured: dropped");
                continue;
            };
            let p = Persisted {
                effective_per_min: e.effective_per_min,
                learned_limit_per_min: e.learned_limit_per_min,
                frozen_until: e.frozen_until_ms.and_then(|ms| clock.instant_of(ms, now)),
                cooldown: e
                    .cooldown_until_ms
                    .and_then(|ms| clock.instant_of(ms, now))
                    .zip(e.cooldown_per_min),
            };
            if self.inner.tenants[t]
                .lock()
                .restore(&e.bucket, e.oauth_client.as_deref(), p, now)
            {
                restored += 1;
            }
        }
        tracing::info!(dir = %dir.display(), buckets = restored, "learned state restored");
    }

    /// Writes learned state when it changed, at most once per
    /// [`PERSIST_EVERY`], and once more at shutdown.
    async fn persist(self, dir: std::path::PathBuf) {
        loop {
            let stop = tokio::select! {
                _ = tokio::time::sleep(PERSIST_EVERY) => false,
                _ = self.inner.shutdown.cancelled() => true,
            };
            let mut dirty = false;
            for t in &self.inner.tenants {
                dirty |= t.lock().take_learned_dirty();
            }
            if dirty {
                let file = self.learned_file();
                let dir = dir.clone();
                let written = tokio::task::spawn_blocking(move || file.write(&dir)).await;
                match written {
                    Ok(Ok(())) => tracing::debug!("learned state written"),
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot write learned state"),
                    Err(e) => tracing::error!(error = %e, "learned-state writer failed"),
                }
            }
            if stop {
                break;
            }
        }
    }

    /// Every tenant's learned state, for the state file.
    pub fn learned_file(&self) -> LearnedFile {
        let now = Instant::now();
        let clock = self.inner.clock;
        let mut entries = Vec::new();
        for t in &self.inner.tenants {
            let state = t.lock();
            for (bucket, oauth_client, p) in state.learned(now) {
                entries.push(LearnedEntry {
                    tenant: state.id().to_owned(),
                    bucket,
                    oauth_client,
                    effective_per_min: p.effective_per_min,
                    learned_limit_per_min: p.learned_limit_per_min,
                    frozen_until_ms: p.frozen_until.map(|t| clock.unix_ms(t)),
                    cooldown_until_ms: p.cooldown.map(|c| clock.unix_ms(c.0)),
                    cooldown_per_min: p.cooldown.map(|c| c.1),
                });
            }
        }
        LearnedFile::new(entries)
    }

    /// Cancelled when the broker shuts down; long-lived streams end on it.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// The clock mapping used for wire times.
    pub fn clock(&self) -> Clock {
        self.inner.clock
    }

    /// The server settings.
    pub fn server_settings(&self) -> &ServerSettings {
        &self.inner.server
    }

    /// Expires leases and serves waiters of tenant `t` on time, until shutdown.
    async fn drive(self, t: usize) {
        let tenant = &self.inner.tenants[t];
        loop {
            let next = tenant.lock().tick(Instant::now());
            self.announce();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => break,
                _ = tenant.wake.notified() => {}
                _ = sleep => {}
            }
        }
        tenant.lock().drop_waiters();
        self.announce();
    }

    /// Tells Watch streams if any bucket changed since the last call.
    fn announce(&self) {
        let v = self.inner.version.load(Ordering::Relaxed);
        if self.inner.announced.swap(v, Ordering::Relaxed) != v {
            self.inner.changes.send_replace(());
        }
    }

    fn tenant_index(&self, tenant: &str) -> Result<usize, BrokerError> {
        self.inner
            .by_id
            .get(tenant)
            .copied()
            .ok_or_else(|| BrokerError::UnknownTenant {
                tenant: tenant.to_owned(),
                known: self.tenant_ids().join(", "),
            })
    }

    /// Configured tenant ids, in config order.
    pub fn tenant_ids(&self) -> Vec<String> {
        self.inner
            .tenants
            .iter()
            .map(|t| t.lock().id().to_owned())
            .collect()
    }

    /// The tenant id a lease id belongs to (`None` if it names no tenant).
    pub fn lease_tenant_id(&self, lease_id: &str) -> Result<Option<String>, BrokerError> {
        let id = parse_lease(lease_id)?;
        Ok(self.lease_tenant(id).map(|t| t.lock().id().to_owned()))
    }

    fn lease_tenant(&self, id: LeaseId) -> Option<&Tenant> {
        self.inner.tenants.get(usize::try_from(id.tenant).ok()?)
    }

    /// Grants `args` on `tenant`, waiting up to `max_wait` (`None`: the
    /// class's default; capped by the server's `max_wait`) for capacity.
    pub async fn acquire(
        &self,
        tenant: &str,
        args: AcquireArgs,
        max_wait: Option<Duration>,
    ) -> Result<AcquireOutcome, BrokerError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(BrokerError::ShuttingDown);
        }
        let t = self.tenant_index(tenant)?;
        let tenant = &self.inner.tenants[t];
        let now = Instant::now();
        let (waiter, rx, max_wait) = {
            let mut state = tenant.lock();
            match state.try_acquire(&args, now)? {
                Attempt::Granted(g) => {
                    drop(state);
                    self.announce();
                    return Ok(AcquireOutcome::Granted(g));
                }
                Attempt::Blocked {
                    instances,
                    denial,
                    class,
                    default_wait,
                } => {
                    let max_wait = max_wait
                        .unwrap_or(default_wait)
                        .min(self.inner.server.max_wait);
                    if max_wait.is_zero() || instances.is_empty() {
                        return Ok(AcquireOutcome::Denied(denial));
                    }
                    let (tx, rx) = oneshot::channel();
                    (state.enqueue(instances, class, &args, tx), rx, max_wait)
                }
            }
        };
        tenant.wake.notify_one();
        self.announce();
        let mut wait = Waiting {
            broker: self,
            tenant: t,
            waiter,
            rx,
            settled: false,
        };
        let deadline = now + max_wait;
        tokio::select! {
            r = &mut wait.rx => {
                wait.settled = true;
                match r {
                    Ok(Ok(g)) => Ok(AcquireOutcome::Granted(g)),
                    Ok(Err(d)) => Ok(AcquireOutcome::Denied(d)),
                    Err(_) => Err(BrokerError::ShuttingDown),
                }
            }
            _ = tokio::time::sleep_until(deadline) => Ok(wait.give_up()),
        }
    }

    /// Returns a lease's slots. True if it held some.
    pub fn release(&self, lease_id: &str) -> Result<bool, BrokerError> {
        let id = parse_lease(lease_id)?;
        let Some(tenant) = self.lease_tenant(id) else {
            return Ok(false);
        };
        let released = tenant.lock().release(id);
        if released {
            tenant.wake.notify_one();
            self.announce();
        }
        Ok(released)
    }

    /// Extends a lease's slots by `extend` from now (0: its default TTL).
    /// Returns the new expiry and TTL.
    pub fn renew(
        &self,
        lease_id: &str,
        extend: Duration,
    ) -> Result<(Instant, Duration), BrokerError> {
        let id = parse_lease(lease_id)?;
        let max = self.inner.server.max_lease_ttl;
        if extend > max {
            return Err(BrokerError::invalid(
                "extend_ms",
                format!(
                    "{} ms is above the broker's max_lease_ttl_ms of {} ms; renew again later instead",
                    extend.as_millis(),
                    max.as_millis()
                ),
            ));
        }
        let tenant = self.lease_tenant(id).ok_or(BrokerError::LeaseNotFound {
            lease_id: lease_id.to_owned(),
        })?;
        let extend = (!extend.is_zero()).then_some(extend);
        let renewed = tenant.lock().renew(id, extend, Instant::now())?;
        // A shorter TTL may move the next expiry earlier than the driver's timer.
        tenant.wake.notify_one();
        Ok(renewed)
    }

    /// Learns from an upstream outcome (see [`TenantState::report`]).
    /// `call` is (method, path, OAuth client).
    pub fn report(
        &self,
        tenant: &str,
        call: (&str, &str, &str),
        http_status: u32,
        retry_after: Option<Duration>,
        info: &RateLimitInfo,
    ) -> Result<ReportOutcome, BrokerError> {
        let t = self.tenant_index(tenant)?;
        let tenant = &self.inner.tenants[t];
        let outcome = tenant
            .lock()
            .report(call, http_status, retry_after, info, Instant::now())?;
        // A freeze or a shrunk budget moves waiters' ready times.
        tenant.wake.notify_one();
        self.announce();
        Ok(outcome)
    }

    /// Every bucket instance of `tenant` (all tenants when `None`).
    /// (Only tenants `sees` accepts, when no tenant is named.)
    pub fn list(
        &self,
        tenant: Option<&str>,
        sees: impl Fn(&str) -> bool,
    ) -> Result<Vec<TenantBucketStatus>, BrokerError> {
        let now = Instant::now();
        let mut out = Vec::new();
        for t in self.visible(tenant, sees)? {
            let state = self.inner.tenants[t].lock();
            out.extend(
                state
                    .statuses(now)
                    .into_iter()
                    .map(|status| TenantBucketStatus {
                        tenant: state.id().to_owned(),
                        at: now,
                        status,
                    }),
            );
        }
        Ok(out)
    }

    fn visible(
        &self,
        tenant: Option<&str>,
        sees: impl Fn(&str) -> bool,
    ) -> Result<Vec<usize>, BrokerError> {
        Ok(match tenant {
            Some(t) => vec![self.tenant_index(t)?],
            None => self
                .inner
                .by_id
                .iter()
                .filter(|(id, _)| sees(id))
                .map(|(_, &i)| i)
                .collect(),
        })
    }

    /// Starts a Watch: a snapshot of every visible bucket at once, then each
    /// bucket again when it changes, at most once per [`WATCH_COALESCE`].
    /// The stream ends at shutdown or when the receiver is dropped.
    pub fn watch(
        &self,
        tenant: Option<&str>,
        sees: impl Fn(&str) -> bool,
    ) -> Result<mpsc::Receiver<TenantBucketStatus>, BrokerError> {
        let tenants = self.visible(tenant, sees)?;
        let (tx, rx) = mpsc::channel(64);
        let mut changes = self.inner.changes.subscribe();
        let broker = self.clone();
        // Owned by the shutdown token and by the receiver: it ends when
        // either goes.
        tokio::spawn(async move {
            let shutdown = broker.inner.shutdown.clone();
            let mut seen: Vec<HashMap<usize, u64>> = vec![HashMap::new(); tenants.len()];
            loop {
                changes.borrow_and_update();
                let now = Instant::now();
                let mut batch = Vec::new();
                for (k, &t) in tenants.iter().enumerate() {
                    let state = broker.inner.tenants[t].lock();
                    batch.extend(state.statuses_since(&mut seen[k], now).into_iter().map(
                        |status| TenantBucketStatus {
                            tenant: state.id().to_owned(),
                            at: now,
                            status,
                        },
                    ));
                }
                for s in batch {
                    tokio::select! {
                        r = tx.send(s) => if r.is_err() { return },
                        _ = shutdown.cancelled() => return,
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_COALESCE) => {}
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                }
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(rx)
    }
}

/// Operators' changes.
impl Broker {
    /// Creates or changes a priority class of `tenant`; durable.
    pub async fn set_class(
        &self,
        tenant: &str,
        class: ClassSettings,
        who: &str,
    ) -> Result<ClassSettings, BrokerError> {
        let t = self.tenant_index(tenant)?;
        self.inner.tenants[t].lock().set_class(class.clone())?;
        tracing::info!(%tenant, class = %class.name, order = class.order, weight = class.weight,
            reserve = class.reserve, default_max_wait_ms = class.default_max_wait.as_millis() as u64,
            by = %who, "priority class set");
        self.changed_by_admin(t, AdminKey::Class(class.name.clone()))
            .await?;
        Ok(class)
    }

    /// Changes a bucket's limits; durable; returns its instances' status.
    pub async fn set_bucket_limit(
        &self,
        tenant: &str,
        bucket: &str,
        change: LimitChange,
        who: &str,
    ) -> Result<Vec<TenantBucketStatus>, BrokerError> {
        let t = self.tenant_index(tenant)?;
        {
            let mut state = self.inner.tenants[t].lock();
            let b = state.set_bucket_limit(bucket, change, Instant::now())?;
            tracing::info!(%tenant, %bucket, rate = ?b.rate, max_in_flight = ?b.max_in_flight,
                by = %who, "bucket limit set");
        }
        self.changed_by_admin(t, AdminKey::Bucket(bucket.to_owned()))
            .await?;
        self.bucket_status(t, bucket)
    }

    /// Pauses (`Some(reason)`) or resumes (`None`) a bucket; durable.
    pub async fn set_paused(
        &self,
        tenant: &str,
        bucket: &str,
        reason: Option<String>,
        who: &str,
    ) -> Result<Vec<TenantBucketStatus>, BrokerError> {
        let t = self.tenant_index(tenant)?;
        let paused = reason.is_some();
        self.inner.tenants[t]
            .lock()
            .set_paused(bucket, reason.clone(), Instant::now())?;
        if paused {
            tracing::info!(%tenant, %bucket, reason = reason.as_deref().unwrap_or(""), by = %who, "bucket paused");
        } else {
            tracing::info!(%tenant, %bucket, by = %who, "bucket resumed");
        }
        self.changed_by_admin(t, AdminKey::Bucket(bucket.to_owned()))
            .await?;
        self.bucket_status(t, bucket)
    }

    fn bucket_status(
        &self,
        t: usize,
        bucket: &str,
    ) -> Result<Vec<TenantBucketStatus>, BrokerError> {
        let now = Instant::now();
        let state = self.inner.tenants[t].lock();
        Ok(state
            .statuses(now)
            .into_iter()
            .filter(|s| s.bucket == bucket)
            .map(|status| TenantBucketStatus {
                tenant: state.id().to_owned(),
                at: now,
                status,
            })
            .collect())
    }

    /// After an admin change: wake the tenant's waiters, tell Watch, and
    /// write every admin change so far to the state directory.
    async fn changed_by_admin(&self, t: usize, key: AdminKey) -> Result<(), BrokerError> {
        self.inner.tenants[t].wake.notify_one();
        self.announce();
        let file = {
            let mut changed = self
                .inner
                .admin_changes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            changed.insert((t, key));
            self.admin_file(&changed)
        };
        let Some(dir) = self.inner.server.state_dir.clone() else {
            return Ok(());
        };
        match tokio::task::spawn_blocking(move || file.write(&dir)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "admin change applied but not saved");
                Err(BrokerError::Internal(
                    "the change is applied but could not be saved",
                ))
            }
            Err(e) => {
                tracing::error!(error = %e, "admin state writer failed");
                Err(BrokerError::Internal(
                    "the change is applied but could not be saved",
                ))
            }
        }
    }

    fn admin_file(&self, changed: &BTreeSet<(usize, AdminKey)>) -> AdminFile {
        let mut classes = Vec::new();
        let mut buckets = Vec::new();
        for (t, key) in changed {
            let state = self.inner.tenants[*t].lock();
            let tenant = state.id().to_owned();
            match key {
                AdminKey::Class(name) => {
                    if let Some(c) = state.classes().iter().find(|c| &c.name == name) {
                        classes.push(AdminClass {
                            tenant,
                            name: c.name.clone(),
                            order: c.order,
                            weight: c.weight,
                            reserve: c.reserve,
                            default_max_wait_ms: u64::try_from(c.default_max_wait.as_millis())
                                .unwrap_or(u64::MAX),
                        });
                    }
                }
                AdminKey::Bucket(name) => {
                    if let Some((b, paused)) = state.bucket_admin_view(name) {
                        buckets.push(AdminBucket {
                            tenant,
                            bucket: name.clone(),
                            permits: b.rate.map(|r| r.permits.get()),
                            window_ms: b
                                .rate
                                .map(|r| u64::try_from(r.window.as_millis()).unwrap_or(u64::MAX)),
                            burst: b.rate.map(|r| r.burst.get()),
                            max_in_flight: b.max_in_flight.map(|m| m.get()),
                            paused: paused.map(str::to_owned),
                        });
                    }
                }
            }
        }
        AdminFile::new(classes, buckets)
    }

    /// Re-applies operators' changes saved in `dir`.
    fn restore_admin(&self, dir: &std::path::Path, now: Instant) {
        let file = match AdminFile::read(dir) {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "operators' changes not restored; starting on the config alone");
                return;
            }
        };
        let mut changed = self
            .inner
            .admin_changes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for c in file.classes {
            let Some(&t) = self.inner.by_id.get(&c.tenant) else {
                continue;
            };
            let class = ClassSettings {
                name: c.name.clone(),
                order: c.order,
                weight: c.weight,
                reserve: c.reserve,
                default_max_wait: Duration::from_millis(c.default_max_wait_ms),
            };
            match self.inner.tenants[t].lock().set_class(class) {
                Ok(()) => {
                    changed.insert((t, AdminKey::Class(c.name)));
                }
                Err(e) => {
                    tracing::warn!(tenant = %c.tenant, error = %e, "saved class not restored")
                }
            }
        }
        for b in file.buckets {
            let Some(&t) = self.inner.by_id.get(&b.tenant) else {
                continue;
            };
            let mut state = self.inner.tenants[t].lock();
            let change = LimitChange {
                permits: b.permits,
                window: b.window_ms.map(Duration::from_millis),
                burst: b.burst,
                max_in_flight: b.max_in_flight,
            };
            let restored = state
                .set_bucket_limit(&b.bucket, change, now)
                .map(|_| ())
                .and_then(|()| state.set_paused(&b.bucket, b.paused.clone(), now));
            match restored {
                Ok(()) => {
                    changed.insert((t, AdminKey::Bucket(b.bucket)));
                }
                Err(e) => {
                    tracing::warn!(tenant = %b.tenant, error = %e, "saved bucket change not restored")
                }
            }
        }
        tracing::info!(dir = %dir.display(), changes = changed.len(), "operators' changes restored");
    }
}

/// What an operator changed, so only that is saved and restored.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum AdminKey {
    Class(String),
    Bucket(String),
}

fn parse_lease(lease_id: &str) -> Result<LeaseId, BrokerError> {
    if lease_id.is_empty() {
        return Err(BrokerError::invalid(
            "lease_id",
            "required: the lease_id an Acquire returned",
        ));
    }
    lease_id.parse().map_err(|_| {
        BrokerError::invalid(
            "lease_id",
            format!("{lease_id:?} is not a lease id this broker issued"),
        )
    })
}

/// A request waiting in a tenant's queue. If the caller goes away (the RPC
/// is cancelled and this is dropped), the waiter leaves the queue, and a
/// grant that raced with the cancellation is handed back.
struct Waiting<'a> {
    broker: &'a Broker,
    tenant: usize,
    waiter: u64,
    rx: oneshot::Receiver<Result<Grant, Denial>>,
    settled: bool,
}

impl Waiting<'_> {
    /// The wait is over: leave the queue and say why, unless a grant came in
    /// the meantime, which the caller then gets.
    fn give_up(&mut self) -> AcquireOutcome {
        self.settled = true;
        let tenant = &self.broker.inner.tenants[self.tenant];
        let mut state = tenant.lock();
        let outcome = match state.withdraw(self.waiter, Instant::now()) {
            Some(denial) => AcquireOutcome::Denied(denial),
            // Not in the queue: the driver granted it (under this lock, so
            // the grant is already in the channel).
            None => match self.rx.try_recv() {
                Ok(Ok(g)) => AcquireOutcome::Granted(g),
                Ok(Err(d)) => AcquireOutcome::Denied(d),
                Err(_) => AcquireOutcome::Denied(Denial {
                    retry_after: Duration::ZERO,
                    reason: "the broker is shutting down".into(),
                    buckets: Vec::new(),
                }),
            },
        };
        drop(state);
        tenant.wake.notify_one();
        self.broker.announce();
        outcome
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let tenant = &self.broker.inner.tenants[self.tenant];
        let mut state = tenant.lock();
        if state.withdraw(self.waiter, Instant::now()).is_none() {
            if let Ok(Ok(g)) = self.rx.try_recv() {
                state.undo(&g);
            }
        }
        drop(state);
        tenant.wake.notify_one();
        self.broker.announce();
    }
}
