//! What the broker shows: ListBuckets (every visible bucket instance now)
//! and the Watch feed (a snapshot, then each instance again when it
//! changes, coalesced).

use super::Broker;
use crate::config::Rate;
use crate::error::BrokerError;
use crate::tenant::{BucketStatus, Retired};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Shortest time between two Watch updates of the same stream, so a busy
/// bucket sends at most about ten updates a second.
pub(super) const WATCH_COALESCE: Duration = Duration::from_millis(100);

/// What a Watch stream carries: a bucket's status, or why it ends.
pub(crate) type Watched = Result<TenantBucketStatus, BrokerError>;

/// What a reader of changes last read, per tenant index: the tenant's lead
/// term then, and each instance's version.
pub(crate) type Seen = HashMap<usize, (u64, HashMap<usize, u64>)>;

/// `seen`'s versions of tenant `t` now in lead term `term`: none if the
/// tenant was taken over anew since (rebuilt, its versions from 0), so it
/// is read whole.
fn read_of(seen: &mut Seen, t: usize, term: u64) -> &mut HashMap<usize, u64> {
    let (seen_term, since) = seen.entry(t).or_insert((term, HashMap::new()));
    if *seen_term != term {
        (*seen_term, *since) = (term, HashMap::new());
    }
    since
}

/// One bucket's status, with its tenant and time.
#[derive(Debug, Clone)]
pub(crate) struct TenantBucketStatus {
    /// Tenant id.
    pub tenant: String,
    /// When the status was taken.
    pub at: Instant,
    /// The status.
    pub status: BucketStatus,
}

/// What holds for a configured bucket whatever its instances (a per-client
/// bucket has none until its first client, and none again once they are
/// dropped for idleness): for `/metrics`.
#[derive(Debug, Clone)]
pub(crate) struct BucketState {
    pub tenant: String,
    pub bucket: String,
    /// As set now (the config's, or an operator's).
    pub rate: Option<Rate>,
    /// As set now (0 without a slot limit).
    pub max_in_flight: u32,
    pub paused: bool,
    /// What its dropped per-client instances had counted.
    pub retired: Retired,
}

impl Broker {
    /// Every bucket instance of `tenant` (all tenants when `None`).
    /// (Only tenants `sees` accepts, when no tenant is named; in cluster
    /// mode only tenants this broker leads.)
    pub(crate) fn list(
        &self,
        tenant: Option<&str>,
        sees: impl Fn(&str) -> bool,
    ) -> Result<Vec<TenantBucketStatus>, BrokerError> {
        let now = Instant::now();
        let mut out = Vec::new();
        for t in self.visible(tenant, sees)? {
            out.extend(statuses_of(&self.inner.tenants[t].lock(), now));
        }
        Ok(out)
    }

    /// [`Broker::list`] of every tenant, and per tenant and bucket what its
    /// dropped per-client instances had counted, each tenant read under one
    /// lock (so no instance is in both or neither): for totals that never
    /// go down.
    pub(crate) fn list_with_retired(
        &self,
    ) -> (
        Vec<TenantBucketStatus>,
        Vec<(String, String, crate::tenant::Retired)>,
    ) {
        let now = Instant::now();
        let (mut live, mut retired) = (Vec::new(), Vec::new());
        for t in self.visible(None, |_| true).unwrap_or_default() {
            let state = self.inner.tenants[t].lock();
            live.extend(statuses_of(&state, now));
            for (bucket, r) in state.retired() {
                retired.push((state.id().to_owned(), bucket, r));
            }
        }
        (live, retired)
    }

    /// [`Broker::list_with_retired`], with every configured bucket's own
    /// state in config order (each tenant read under one lock).
    pub(crate) fn list_with_buckets(&self) -> (Vec<TenantBucketStatus>, Vec<BucketState>) {
        let now = Instant::now();
        let (mut live, mut buckets) = (Vec::new(), Vec::new());
        for t in self.visible(None, |_| true).unwrap_or_default() {
            let state = self.inner.tenants[t].lock();
            live.extend(statuses_of(&state, now));
            let mut retired = state.retired();
            for name in self.inner.settings.tenants[t]
                .buckets
                .iter()
                .map(|b| &b.name)
            {
                let Some((settings, paused)) = state.bucket_admin_view(name) else {
                    continue;
                };
                buckets.push(BucketState {
                    tenant: state.id().to_owned(),
                    bucket: name.clone(),
                    rate: settings.rate,
                    max_in_flight: settings.max_in_flight.map_or(0, |m| m.get()),
                    paused: paused.is_some(),
                    retired: retired
                        .iter()
                        .position(|(b, _)| b == name)
                        .map(|i| retired.swap_remove(i).1)
                        .unwrap_or_default(),
                });
            }
        }
        (live, buckets)
    }

    pub(super) fn visible(
        &self,
        tenant: Option<&str>,
        sees: impl Fn(&str) -> bool,
    ) -> Result<Vec<usize>, BrokerError> {
        Ok(match tenant {
            Some(t) => {
                let t = self.tenant_index(t)?;
                self.leading(t)?;
                vec![t]
            }
            // Cluster mode: the tenants this broker leads.
            None => {
                let mut seen: Vec<usize> = self
                    .inner
                    .by_id
                    .iter()
                    .filter(|(id, &i)| sees(id) && self.leads(i))
                    .map(|(_, &i)| i)
                    .collect();
                // Config order, not the map's.
                seen.sort_unstable();
                seen
            }
        })
    }

    /// Starts a Watch: a snapshot of every visible bucket at once, then each
    /// bucket again when it changes, at most once per [`WATCH_COALESCE`].
    /// The stream ends when the receiver is dropped, or at shutdown with
    /// [`BrokerError::ShuttingDown`] (a caller can tell it from a normal
    /// end and look again later); in cluster mode see
    /// [`Broker::watch_every`].
    pub(crate) fn watch(
        &self,
        tenant: Option<&str>,
        sees: impl Fn(&str) -> bool,
    ) -> Result<mpsc::Receiver<Watched>, BrokerError> {
        self.watch_every(tenant, sees, WATCH_COALESCE)
    }

    /// [`Broker::watch`], each bucket at most once per `coalesce`.
    ///
    /// In cluster mode the stream follows what this broker leads: a Watch
    /// of one tenant ends with [`BrokerError::NotLeader`] (naming the next
    /// leader where known) once this broker stops granting for it (handed
    /// over, stepped down, or its lead ran out with etcd away), rather
    /// than going silent on figures no longer true; a Watch of every
    /// tenant sends the whole state of each tenant this broker takes over,
    /// and nothing more of those it no longer leads. A broker shutting
    /// down opens none.
    ///
    /// Each stream keeps what it last sent of every instance it shows (as
    /// much memory as the instances' versions), and opens no matter how
    /// many are open: its callers count it against the Watch caps first
    /// (`grpc::Overload::open_watch`: the caller's, and
    /// `server.max_watch_streams` for every caller together).
    pub(crate) fn watch_every(
        &self,
        tenant: Option<&str>,
        sees: impl Fn(&str) -> bool,
        coalesce: Duration,
    ) -> Result<mpsc::Receiver<Watched>, BrokerError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(BrokerError::ShuttingDown);
        }
        let named = tenant.is_some();
        // The tenants the caller may see, led here or not.
        let shown: Vec<usize> = match tenant {
            Some(_) => self.visible(tenant, sees)?,
            None => {
                let mut all: Vec<usize> = self
                    .inner
                    .by_id
                    .iter()
                    .filter(|(id, _)| sees(id))
                    .map(|(_, &i)| i)
                    .collect();
                all.sort_unstable();
                all
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let mut changes = self.inner.changes.subscribe();
        let broker = self.clone();
        let open = self.inner.metrics.as_ref().map(|m| m.watch_opened());
        // Owned by the shutdown token and by the receiver: it ends when
        // either goes.
        tokio::spawn(async move {
            let _open = open;
            let shutdown = broker.inner.shutdown.clone();
            // Per tenant led, its lead term and what was last sent of each
            // instance; a tenant no longer led is forgotten, and one taken
            // over anew (a new term: rebuilt, its versions from 0), so it
            // is sent whole.
            let mut seen = Seen::new();
            loop {
                changes.borrow_and_update();
                let now = Instant::now();
                let mut batch = Vec::new();
                // A Watch of one tenant looks again when its lead would run
                // out (refreshed leads move it on): a lead that lapses,
                // etcd away, is announced by no change.
                let mut lapses = None;
                for &t in &shown {
                    let state = broker.inner.tenants[t].lock();
                    if let Some(e) = state.not_leading(now) {
                        seen.remove(&t);
                        if named {
                            batch.push(Err(e));
                        }
                        continue;
                    }
                    if named {
                        lapses = state.lead_until();
                    }
                    let since = read_of(&mut seen, t, state.lead_term());
                    batch.extend(state.statuses_since(since, now).into_iter().map(|status| {
                        Ok(TenantBucketStatus {
                            tenant: state.id().to_owned(),
                            at: now,
                            status,
                        })
                    }));
                }
                for s in batch {
                    let last = s.is_err();
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return said_shutting_down(&tx),
                        r = tx.send(s) => if r.is_err() || last { return },
                    }
                }
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return said_shutting_down(&tx),
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(coalesce) => {}
                }
                let lapse = async {
                    match lapses {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return said_shutting_down(&tx),
                    _ = tx.closed() => return,
                    r = changes.changed() => if r.is_err() { return },
                    () = lapse => {}
                }
            }
        });
        Ok(rx)
    }

    /// The broker-wide change counter: it moves whenever any bucket
    /// instance changes (a read of it takes no lock).
    pub(crate) fn change_version(&self) -> u64 {
        self.inner
            .version
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The bucket instances, of every tenant this broker leads now, that
    /// changed since `seen` (per tenant index, what was last read of it;
    /// updated). Tenants no longer led are forgotten, and a tenant taken
    /// over anew is read in full.
    pub(crate) fn changed_since(&self, seen: &mut Seen) -> Vec<TenantBucketStatus> {
        let now = Instant::now();
        let tenants = self.visible(None, |_| true).unwrap_or_default();
        // (`visible` returns them sorted.)
        seen.retain(|t, _| tenants.binary_search(t).is_ok());
        let mut out = Vec::new();
        for t in tenants {
            let state = self.inner.tenants[t].lock();
            let since = read_of(seen, t, state.lead_term());
            out.extend(state.statuses_since(since, now).into_iter().map(|status| {
                TenantBucketStatus {
                    tenant: state.id().to_owned(),
                    at: now,
                    status,
                }
            }));
        }
        out
    }

    /// Leases holding slots, per tenant (config order).
    pub(crate) fn leases_held(&self) -> Vec<(String, usize)> {
        self.inner
            .tenants
            .iter()
            .map(|t| {
                let state = t.lock();
                (state.id().to_owned(), state.leases_held())
            })
            .collect()
    }

    pub(super) fn bucket_status(
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
}

/// Every bucket instance of one tenant's state, at `now`.
fn statuses_of(
    state: &crate::tenant::TenantState,
    now: Instant,
) -> impl Iterator<Item = TenantBucketStatus> + '_ {
    state
        .statuses(now)
        .into_iter()
        .map(move |status| TenantBucketStatus {
            tenant: state.id().to_owned(),
            at: now,
            status,
        })
}

/// Ends a Watch at shutdown saying so, when the receiver has room (a
/// receiver that far behind sees the stream end without it).
fn said_shutting_down(tx: &mpsc::Sender<Watched>) {
    let _ = tx.try_send(Err(BrokerError::ShuttingDown));
}
