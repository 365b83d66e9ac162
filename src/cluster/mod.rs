//! Cluster mode: brokers sharing tenants through etcd, one leader per
//! tenant, so no broker is a single point of failure and no two brokers
//! grant one budget at once.
//!
//! | file        | owns                                                      |
//! |-------------|-----------------------------------------------------------|
//! | `mod`       | the cluster task, its keys and state                      |
//! | `membership`| one etcd lease's session: join, keep-alive, the tick loop |
//! | `leading`   | elections, take-over, hand-over, snapshot saves           |
//! | `placement` | which member should lead a tenant (rendezvous hashing)    |
//! | `rejoins`   | members back on a new lease, and how long they wait        |
//! | `fingerprint`| what a member publishes of its tenants' config, compared |
//! | `self_check`| whether `cluster.advertise` reaches this broker          |
//! | `etcd`      | the etcd v3 calls made, on the generated client           |
//! | `connect`   | connections to etcd members, bounded up to HTTP/2's start |
//! | `proto`     | the generated etcd API                                     |
//!
//! Keys, under `cluster.prefix`:
//! - `members/<node>` = the node's advertised URL, on its etcd lease: the
//!   live members; created only if absent (or on an earlier lease of the
//!   same process), so two processes configured with one node name cannot
//!   both join.
//! - `serves/<node>` = the tenant ids of the node's config, one a line, each
//!   followed by a line with the fingerprint of its config (`fingerprint`),
//!   on its etcd lease: a tenant is placed only among the members that
//!   serve it (a node without this key, of an older build, counts as
//!   serving every tenant), so a member whose config lacks a tenant is
//!   never elected to lead it, and one that alone has a tenant leads it;
//!   a member whose tenant sets or fingerprints differ is warned of.
//! - `leaders/<tenant>` = the leading node's name, on its etcd lease:
//!   created only if absent, so at most one node holds it; it vanishes when
//!   the holder's lease expires. A node leads a tenant only while the key
//!   is on its *current lease*, not merely while it holds its name.
//! - `state/<tenant>` = the leader's snapshot (learned state, operators'
//!   changes), written only while the writer's lease holds
//!   `leaders/<tenant>`.
//!
//! Safety: a leader grants only until `t + TTL − safety_margin`, where `t`
//! is when it *sent* the keep-alive etcd last answered. etcd expires the
//! lease no earlier than TTL after it *received* that keep-alive (later than
//! `t`), and only then can another node create `leaders/<tenant>`. So as
//! long as the two clocks advance at rates within `safety_margin / TTL` of
//! each other (NTP-disciplined clocks differ by parts per million), the old
//! leader has stopped before the new one starts.
//!
//! Every tick (a fifth of the TTL, at most a second) the task refreshes the
//! lease, reads members, their `serves` keys and leaders (three range
//! reads, whatever the number of tenants), and for each tenant: the member rendezvous hashing prefers
//! creates the leader key when it is free and takes the tenant over; a
//! leader that is no longer preferred (a member joined) saves, steps down
//! and deletes its key, so the preferred member takes over on its next
//! tick; everyone else records who leads, to send callers there. A broker
//! joining again after etcd was away leaves, for a grace, the tenants of
//! the members it saw before to them (`Node::await_earlier_members`). A
//! member back on a new lease gets its tenants back from their live leader
//! only after a hold-down (`rejoins`).

mod connect;
mod etcd;
mod fingerprint;
mod leading;
mod membership;
mod placement;
mod proto;
mod rejoins;
mod self_check;

use crate::broker::Broker;
use crate::config::ClusterSettings;
use etcd::{Etcd, EtcdError};
use fingerprint::{Fingerprint, Served};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Where a leader saves tenant snapshots.
#[derive(Clone)]
pub(crate) struct Store {
    etcd: Etcd,
    keys: Keys,
    /// The etcd lease this process is a member on (0: none).
    lease: Arc<AtomicI64>,
}

impl Store {
    /// Saves `snapshot` as `tenant`'s state if this process's lease holds
    /// its leader key; false if it does not (nothing written).
    pub(crate) async fn save(&self, tenant: &str, snapshot: Vec<u8>) -> Result<bool, EtcdError> {
        let lease = self.lease.load(Ordering::Acquire);
        let saved = lease != 0
            && self
                .etcd
                .put_if(
                    (&self.keys.leader(tenant), lease),
                    &self.keys.state(tenant),
                    snapshot,
                )
                .await?;
        if !saved {
            tracing::warn!(%tenant, "state not saved: this broker no longer holds the tenant's leader key");
        }
        Ok(saved)
    }
}

#[derive(Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn members(&self) -> String {
        format!("{}/members/", self.prefix)
    }
    fn member(&self, node: &str) -> String {
        format!("{}/members/{node}", self.prefix)
    }
    fn serving(&self) -> String {
        format!("{}/serves/", self.prefix)
    }
    fn serves(&self, node: &str) -> String {
        format!("{}/serves/{node}", self.prefix)
    }
    fn leaders(&self) -> String {
        format!("{}/leaders/", self.prefix)
    }
    fn leader(&self, tenant: &str) -> String {
        format!("{}/leaders/{tenant}", self.prefix)
    }
    fn state(&self, tenant: &str) -> String {
        format!("{}/state/{tenant}", self.prefix)
    }
}

/// How often learned state is saved, at most.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// A session that keeps failing the same way (etcd away, this node's name
/// taken) is retried every tick; its warning is logged at most this often,
/// with how many failed since (each one at debug).
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// The cluster task: runs until the broker shuts down, then hands every
/// tenant it leads over (saved, keys deleted, lease revoked) so the next
/// leader need not wait for the lease to expire.
pub(crate) async fn run(broker: Broker, settings: ClusterSettings) {
    let tick = (settings.lease_ttl / 5).min(Duration::from_secs(1));
    let etcd = match Etcd::connect(
        &settings.etcd,
        settings.etcd_tls.as_ref(),
        tick.max(Duration::from_millis(500)),
    ) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cluster mode cannot start: no tenant will be led");
            return;
        }
    };
    let keys = Keys {
        prefix: settings.prefix.clone(),
    };
    let store = Store {
        etcd: etcd.clone(),
        keys: keys.clone(),
        lease: Arc::new(AtomicI64::new(0)),
    };
    // Only `run` sets it, once.
    let _ = broker.cluster_store().set(store.clone());
    let configs = fingerprint::of_tenants(broker.settings());
    let lease_ttl = settings.lease_ttl;
    let mut node = Node {
        broker: broker.clone(),
        store,
        etcd,
        keys,
        settings,
        tenants: broker.tenant_ids(),
        serves_value: fingerprint::serves_value(&configs),
        configs: configs.into_iter().map(|(_, f)| f).collect(),
        led: HashSet::new(),
        last_save: Instant::now(),
        own_leases: Vec::new(),
        spare: None,
        members: HashMap::new(),
        serves: HashMap::new(),
        warned: HashSet::new(),
        warned_configs: HashMap::new(),
        warned_urls: HashSet::new(),
        seen: Vec::new(),
        awaited: HashMap::new(),
        awaited_since: Instant::now(),
        member_leases: HashMap::new(),
        rejoins: rejoins::Rejoins::new(lease_ttl),
        etcd_was_away: false,
        refresh_failed: false,
        failing: None,
        self_check: None,
    };
    let shutdown = broker.shutdown_token().clone();
    loop {
        // A session ends by itself at shutdown (every etcd call is bounded).
        match node.session(tick).await {
            Ok(Some(lease)) => {
                node.hand_over_all(lease).await;
                break;
            }
            Ok(None) => {
                // The lease found expired: etcd had stopped answering first
                // (a hang: every lease expired), or it answered at once
                // (this broker alone was away, paused: the others kept
                // theirs).
                node.etcd_was_away = node.refresh_failed;
            }
            Err(e) => {
                node.etcd_was_away = true;
                node.session_failed(&e);
                node.lose_all();
                // One tick, not a growing backoff: a session that fails
                // costs etcd one bounded call, and a broker must be back
                // within a tick of etcd (its quorum) answering again, not
                // after a pause that grew while etcd was away.
                tokio::select! {
                    () = tokio::time::sleep(tick) => {}
                    () = shutdown.cancelled() => break,
                }
            }
        }
    }
    if let Some(check) = node.self_check.take() {
        check.abort();
    }
    // A lease granted to a session that failed before it joined: nothing
    // will join on it now, and a join applied whose answer was lost would
    // keep this node counted as a member until its TTL.
    if let Some(id) = node.spare.take() {
        if let Err(e) = node.etcd.revoke(id).await {
            tracing::warn!(error = %e, lease = %format_args!("{id:x}"),
                "could not revoke a lease no session joined on; its expiry will");
        }
    }
}

struct Node {
    broker: Broker,
    store: Store,
    etcd: Etcd,
    keys: Keys,
    settings: ClusterSettings,
    tenants: Vec<String>,
    /// Each tenant's config fingerprint, as `tenants` (published in the
    /// `serves` key, compared with the other members').
    configs: Vec<Fingerprint>,
    /// The `serves` key's value: `tenants` with `configs`.
    serves_value: String,
    /// Tenants this node took over and has not stepped down from.
    led: HashSet<usize>,
    last_save: Instant,
    /// The etcd leases this process joined on, latest last (a few): keys on
    /// them are this process's own, on any other lease another process's.
    own_leases: Vec<i64>,
    /// A lease granted to a session that failed before it joined on it,
    /// for the next session to join on (see [`Node::lease`]).
    spare: Option<i64>,
    /// The members (node → URL) the last tick read: at shutdown, where
    /// each tenant goes next.
    members: HashMap<String, String>,
    /// The tenants each member serves (and their configs' fingerprints),
    /// as the last tick read (a member missing here serves every tenant).
    serves: HashMap<String, Served>,
    /// Members already warned about for serving other tenants.
    warned: HashSet<String>,
    /// The tenants each member was already warned about for serving
    /// them with another config.
    warned_configs: HashMap<String, HashSet<usize>>,
    /// Members already warned about for advertising this broker's URL.
    warned_urls: HashSet<String>,
    /// Who leads each tenant as the ticks of this session saw it (empty
    /// until the first tick; see [`Seen`]).
    seen: Vec<Seen>,
    /// The other members this broker saw before it joined again (etcd was
    /// away), with the etcd lease they were on and what they serve, and
    /// since when their tenants wait for them: see
    /// [`Node::await_earlier_members`].
    awaited: HashMap<String, (i64, Option<HashSet<String>>)>,
    awaited_since: Instant,
    /// The etcd lease of each member's key, as the last tick read.
    member_leases: HashMap<String, i64>,
    /// The other members seen and their returns on new leases.
    rejoins: rejoins::Rejoins,
    /// The last session ended with etcd not answering (rather than with
    /// the lease found expired by a broker that alone was away).
    etcd_was_away: bool,
    /// A keep-alive of this session went unanswered.
    refresh_failed: bool,
    /// Sessions failing in a row: the error last logged, when, and how
    /// many failed the same way since (see [`FAILURE_LOG_EVERY`]).
    failing: Option<(String, Instant, u32)>,
    /// The check of `cluster.advertise`, started at the first join.
    self_check: Option<tokio::task::JoinHandle<()>>,
}

/// A tenant's leader key as this broker's ticks saw it.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// The last member seen holding it, and the tick that last saw it so.
    last_led: Option<(String, Instant)>,
    /// Who held it at this session's last tick (`None`: no tick yet;
    /// `Some(None)`: no one).
    holder: Option<Option<String>>,
}

impl Node {
    /// A session failed with `e`: said on `/readyz` until one joins, and
    /// logged, the same failure again at most every [`FAILURE_LOG_EVERY`].
    fn session_failed(&mut self, e: &EtcdError) {
        let what = e.to_string();
        self.broker.set_cluster_trouble(Some(what.clone()));
        let now = Instant::now();
        match self.failing.as_mut() {
            Some((last, logged, since))
                if *last == what && now.duration_since(*logged) < FAILURE_LOG_EVERY =>
            {
                *since += 1;
                tracing::debug!(error = %e, "cluster session failed again");
            }
            _ => {
                let again = self
                    .failing
                    .as_ref()
                    .filter(|(last, _, _)| *last == what)
                    .map_or(0, |(_, _, since)| *since);
                tracing::warn!(error = %e, etcd = ?self.settings.etcd, failed_again_since_last_said = again,
                    "cluster session failed: leading nothing until one succeeds (retried every \
                     tick; the same failure is logged again at most once a minute)");
                self.failing = Some((what, now, 0));
            }
        }
    }
}
