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

//!
//! | file      | owns                                                          |
//! |-----------|---------------------------------------------------------------|
//! | `mod`     | the handle, the tenant registry, Release / Renew / Report     |
//! | `acquire` | Acquire: the decision, then the wait and its clean-up         |
//! | `driver`  | one task per tenant: grants on time, expiry, change announcements |
//! | `watch`   | ListBuckets and the Watch feed                                |
//! | `admin`   | operators' changes, saved to and restored from `admin.toml`   |
//! | `persist` | learned state, saved to and restored from `learned.toml`      |
//! | `files`   | the state files and their atomic writes                       |
//! | `lead`    | cluster mode: leading a tenant, take-over, hand-over, snapshots |

mod acquire;
mod admin;
mod driver;
mod files;
mod lead;
mod persist;
mod watch;

pub(crate) use acquire::AcquireOutcome;
pub(crate) use driver::Drivers;
pub(crate) use watch::{BucketState, Seen, TenantBucketStatus};

use crate::clock::{millis, Clock};
use crate::config::{ServerSettings, Settings};
use crate::error::{clip, BrokerError};
use crate::learning::RateLimitInfo;
use crate::limits::LeaseId;
use crate::metrics::Metrics;
use crate::tenant::{AcquireArgs, ReportOutcome, TenantState};
use admin::AdminKey;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
    /// The whole config: a tenant taken over in cluster mode is rebuilt
    /// from it.
    settings: Settings,
    /// Cluster mode: where snapshots are saved (set once the task starts).
    cluster: std::sync::OnceLock<crate::cluster::Store>,
    tenants: Vec<Tenant>,
    by_id: HashMap<String, usize>,
    /// Tenants by the tag their lease ids carry.
    by_tag: HashMap<u32, usize>,
    clock: Clock,
    /// Broker-wide change counter; bucket instances remember the value of
    /// their last change.
    version: Arc<AtomicU64>,
    /// The counter value last announced on `changes`.
    announced: AtomicU64,
    /// Tells Watch streams that something changed.
    changes: tokio::sync::watch::Sender<()>,
    shutdown: CancellationToken,
    /// Every admin change so far (std `Mutex`: never held across `.await`).
    admin_changes: Mutex<BTreeSet<(usize, AdminKey)>>,
    /// One save of admin changes at a time, its snapshot taken under it:
    /// saves share a temporary file, and the last one must hold the last
    /// change.
    admin_saves: Arc<tokio::sync::Mutex<()>>,
    /// Counters on the request path (`None`: metrics are off).
    metrics: Option<Arc<Metrics>>,
    /// This run, drawn at start (see `files::StopRecord`).
    run: u64,
    /// Cluster mode: until when this broker's etcd lease is known valid
    /// (`None`: not in the cluster now). Read by `/readyz`.
    in_cluster_until: Mutex<Option<Instant>>,
    /// Cluster mode: why the last session failed, until one joins (for
    /// `/readyz`).
    cluster_trouble: Mutex<Option<String>>,
    /// Cluster mode: why `cluster.advertise` does not reach this broker,
    /// while its self-check finds so (`/readyz` says it).
    advertise_trouble: Mutex<Option<String>>,
    /// The gRPC health name only this broker's port answers SERVING for
    /// (set once its server registered it): how the advertise self-check
    /// tells this broker from another at the URL.
    instance_name: std::sync::OnceLock<String>,
    /// The last write of learned state failed (for `/metrics`).
    state_failing: std::sync::atomic::AtomicBool,
    /// An operator's change is in force but not in `admin.toml` (its write
    /// failed, or the file vanished): written again each second until it is.
    admin_unsaved: std::sync::atomic::AtomicBool,
}

/// The broker: cheap to clone, shared by the gRPC services.
#[derive(Clone)]
pub(crate) struct Broker {
    inner: Arc<Inner>,
}

impl Broker {
    /// Builds the broker from validated settings and starts one driver task
    /// per tenant; they stop when `shutdown` is cancelled. `metrics` counts
    /// grants, denials, waits and reports.
    #[cfg(test)]
    pub(crate) fn start(
        settings: &Settings,
        shutdown: CancellationToken,
        metrics: Option<Arc<Metrics>>,
    ) -> (Broker, Drivers) {
        Self::start_telling(settings, shutdown, metrics, &|_| {})
    }

    /// [`Broker::start`], telling `stage` what it does as it goes (the
    /// HTTP port's `/readyz` says it while the broker starts). Synchronous
    /// and possibly long (many tenants, a large state directory): the
    /// server runs it off the async threads.
    pub(crate) fn start_telling(
        settings: &Settings,
        shutdown: CancellationToken,
        metrics: Option<Arc<Metrics>>,
        stage: &dyn Fn(&str),
    ) -> (Broker, Drivers) {
        let count = settings.tenants.len();
        stage(&format!("building {count} tenants' buckets"));
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
        let by_tag = settings
            .tenants
            .iter()
            .enumerate()
            .map(|(i, t)| (crate::limits::tenant_tag(&t.id), i))
            .collect();
        let broker = Broker {
            inner: Arc::new(Inner {
                server: settings.server.clone(),
                settings: settings.clone(),
                cluster: std::sync::OnceLock::new(),
                tenants,
                by_id,
                by_tag,
                clock: Clock::new(),
                version,
                announced: AtomicU64::new(0),
                changes: tokio::sync::watch::Sender::new(()),
                shutdown,
                admin_changes: Mutex::new(BTreeSet::new()),
                admin_saves: Arc::default(),
                metrics,
                run: fastrand::u64(..),
                in_cluster_until: Mutex::new(None),
                cluster_trouble: Mutex::new(None),
                advertise_trouble: Mutex::new(None),
                instance_name: std::sync::OnceLock::new(),
                state_failing: std::sync::atomic::AtomicBool::new(false),
                admin_unsaved: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        // Lease ids of this run start above any of an earlier run: the
        // base grows by 2^20 a millisecond, more than grants can.
        let seq_base = broker.inner.clock.unix_ms(now) << 20;
        for t in &broker.inner.tenants {
            t.lock().start_leases_after(seq_base);
        }
        let state_dir = match &settings.cluster {
            // Cluster mode: nothing is led until etcd says so, and the
            // state lives in etcd.
            Some(_) => {
                for t in &broker.inner.tenants {
                    t.lock().set_lead(None, None, now);
                }
                None
            }
            None => settings.server.state_dir.as_ref(),
        };
        if let Some(dir) = state_dir {
            stage(
                "reading the state directory (operators' changes, learned state, the last \
                 stop's leases)",
            );
            broker.restore_admin(dir, now);
            if let Some(last_run) = broker.restore(dir, now) {
                broker.resume(dir, last_run, now);
            }
            // Before serving: once a grant is out, the state directory says
            // so, and a start after a crash knows it is a restart.
            stage("writing learned state to the state directory");
            if let Err(e) = broker.learned_file().write(dir) {
                tracing::error!(error = %e, "cannot write learned state");
                broker
                    .inner
                    .state_failing
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        stage(&format!("starting {count} tenants' tasks"));
        let mut drivers: Vec<_> = (0..broker.inner.tenants.len())
            .map(|t| tokio::spawn(broker.clone().drive(t)))
            .collect();
        if let Some(dir) = state_dir.cloned() {
            drivers.push(tokio::spawn(broker.clone().persist(dir)));
        }
        if let Some(c) = &settings.cluster {
            drivers.push(tokio::spawn(crate::cluster::run(broker.clone(), c.clone())));
        }
        (broker, Drivers(drivers))
    }

    /// Cancelled when the broker shuts down; long-lived streams end on it.
    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// The metrics counted, if the HTTP port is on.
    pub(crate) fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.inner.metrics.as_ref()
    }

    /// The clock mapping used for wire times.
    pub(crate) fn clock(&self) -> Clock {
        self.inner.clock
    }

    /// `server.state_dir`, if set.
    pub(crate) fn state_dir(&self) -> Option<&std::path::Path> {
        self.inner.server.state_dir.as_deref()
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
    pub(crate) fn tenant_ids(&self) -> Vec<String> {
        self.inner
            .tenants
            .iter()
            .map(|t| t.lock().id().to_owned())
            .collect()
    }

    /// The tenant id a lease id belongs to (`None` if it names no tenant).
    pub(crate) fn lease_tenant_id(&self, lease_id: &str) -> Result<Option<String>, BrokerError> {
        let id = parse_lease(lease_id)?;
        Ok(self.lease_tenant(id).map(|t| t.lock().id().to_owned()))
    }

    fn lease_tenant(&self, id: LeaseId) -> Option<&Tenant> {
        match self.inner.by_tag.get(&id.tenant) {
            Some(&t) => self.inner.tenants.get(t),
            // An id from a build that named tenants by their place in the
            // config (its leases are still held across the upgrade).
            None => self.inner.tenants.get(usize::try_from(id.tenant).ok()?),
        }
    }

    /// Returns a lease's slots. True if it held some.
    pub(crate) fn release(
        &self,
        lease_id: &str,
        acquired_with: Option<(&str, &AcquireArgs)>,
    ) -> Result<bool, BrokerError> {
        let id = parse_lease(lease_id)?;
        let Some(tenant) = self.lease_tenant(id) else {
            return Ok(false);
        };
        let released = {
            let mut state = tenant.lock();
            let now = Instant::now();
            if let Some(e) = state.not_leading(now) {
                return Err(e);
            }
            // A live lease is released whatever the Acquire says: it is
            // of use only to adopt one this run does not know.
            if state.release(id) {
                true
            } else {
                match acquired_with {
                    // The Acquire must be for the lease's own tenant.
                    Some((name, _)) if name != state.id() => {
                        return Err(BrokerError::invalid(
                            "acquired_with",
                            "names another tenant than the lease's",
                        ))
                    }
                    Some((_, args)) => state.release_or_adopt(id, args, now)?,
                    None => false,
                }
            }
        };
        if released {
            tenant.wake.notify_one();
            self.announce();
        }
        Ok(released)
    }

    /// Returns the slots of the lease granted to `tenant`'s Acquire with
    /// idempotency key `key`, whose answer never reached its client. True
    /// if it held some.
    pub(crate) fn release_by_key(&self, tenant: &str, key: &str) -> Result<bool, BrokerError> {
        let t = self.tenant_index(tenant)?;
        let tenant = &self.inner.tenants[t];
        let released = {
            let mut state = tenant.lock();
            if let Some(e) = state.not_leading(Instant::now()) {
                return Err(e);
            }
            state.release_by_key(key)
        };
        if released {
            tracing::info!(tenant = %self.inner.settings.tenants[t].id,
                "released the lease of an Acquire whose answer did not reach its client");
            tenant.wake.notify_one();
            self.announce();
        }
        Ok(released)
    }

    /// Extends a lease's slots by `extend` from now (0: its default TTL).
    /// Returns the new expiry and TTL.
    /// `acquired_with` (tenant, Acquire) lets a lease granted before a
    /// restart be adopted (see the tenant's `restart` module).
    pub(crate) fn renew(
        &self,
        lease_id: &str,
        extend: Duration,
        acquired_with: Option<(&str, &AcquireArgs)>,
    ) -> Result<(Instant, Duration), BrokerError> {
        let id = parse_lease(lease_id)?;
        let max = self.inner.server.max_lease_ttl;
        if extend > max {
            return Err(BrokerError::invalid(
                "extend_ms",
                format!(
                    "{} ms is above the broker's max_lease_ttl_ms of {} ms; renew again later instead",
                    millis(extend),
                    millis(max)
                ),
            ));
        }
        let tenant = self.lease_tenant(id).ok_or(BrokerError::LeaseNotFound {
            lease_id: lease_id.to_owned(),
        })?;
        let extend = (!extend.is_zero()).then_some(extend);
        let renewed = {
            let mut state = tenant.lock();
            if let Some(e) = state.not_leading(Instant::now()) {
                return Err(e);
            }
            // The Acquire must be for the lease's own tenant.
            if acquired_with.is_some_and(|(name, _)| name != state.id()) {
                return Err(BrokerError::invalid(
                    "acquired_with",
                    "names another tenant than the lease's",
                ));
            }
            let renewed = state.renew(id, extend, acquired_with.map(|(_, a)| a), Instant::now())?;
            (renewed, state.take_wake_driver())
        };
        let (renewed, wake) = renewed;
        // A shorter TTL may move the next expiry earlier than the driver's timer.
        if wake {
            tenant.wake.notify_one();
        }
        Ok(renewed)
    }

    /// Learns from an upstream outcome (see [`TenantState::report`]; a 429
    /// `concurrency_limited`: [`TenantState::report_in_flight_refusal`]).
    /// `call` is (method, path, OAuth client).
    pub(crate) fn report(
        &self,
        tenant: &str,
        call: (&str, &str, &str),
        (http_status, concurrency_limited): (u32, bool),
        retry_after: Option<Duration>,
        info: &RateLimitInfo,
        idempotency_key: &str,
    ) -> Result<ReportOutcome, BrokerError> {
        let t = self.tenant_index(tenant)?;
        let tenant = &self.inner.tenants[t];
        let now = Instant::now();
        let key = (!idempotency_key.is_empty()).then_some(idempotency_key);
        let outcome = {
            let mut state = tenant.lock();
            // Under the lock, as Renew and Release check it: a hand-over's
            // final snapshot taken between a check and the lock would not
            // hold this report (a freeze the next leader never hears of).
            if let Some(e) = state.not_leading(now) {
                return Err(e);
            }
            if let Some(before) = key.and_then(|k| state.reported_before(k, now)) {
                tracing::debug!(tenant = %state.id(), "a Report sent again: answered, not counted twice");
                return Ok(before);
            }
            let outcome = if http_status == 429 && concurrency_limited {
                state.report_in_flight_refusal(call, retry_after, info, now)?
            } else {
                state.report(call, http_status, retry_after, info, now)?
            };
            if let Some(k) = key {
                state.counted_report(k, &outcome, now);
            }
            outcome
        };
        if let Some(m) = &self.inner.metrics {
            m.reported(t, &outcome.buckets, http_status);
        }
        // A freeze or a shrunk budget moves waiters' ready times.
        tenant.wake.notify_one();
        self.announce();
        Ok(outcome)
    }
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
            format!("{} is not a lease id this broker issued", clip(lease_id)),
        )
    })
}
