//! Cluster mode: brokers sharing tenants through etcd, one leader per
//! tenant, so no broker is a single point of failure and no two brokers
//! grant one budget at once.
//!
//! | file        | owns                                                      |
//! |-------------|-----------------------------------------------------------|
//! | `mod`       | the cluster task: membership, elections, hand-over, saves |
//! | `placement` | which member should lead a tenant (rendezvous hashing)    |
//! | `etcd`      | the etcd v3 calls made, on the generated client           |
//! | `connect`   | connections to etcd members, bounded up to HTTP/2's start |
//! | `proto`     | the generated etcd API                                     |
//!
//! Keys, under `cluster.prefix`:
//! - `members/<node>` = the node's advertised URL, on its etcd lease: the
//!   live members; created only if absent (or on an earlier lease of the
//!   same process), so two processes configured with one node name cannot
//!   both join.
//! - `serves/<node>` = the tenant ids of the node's config, one a line, on
//!   its etcd lease: a tenant is placed only among the members that serve
//!   it (a node without this key, of an older build, counts as serving
//!   every tenant), so a member whose config lacks a tenant is never
//!   elected to lead it, and one that alone has a tenant leads it.
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
//! lease, reads members and leaders (two range reads, whatever the number
//! of tenants), and for each tenant: the member rendezvous hashing prefers
//! creates the leader key when it is free and takes the tenant over; a
//! leader that is no longer preferred (a member joined) saves, steps down
//! and deletes its key, so the preferred member takes over on its next
//! tick; everyone else records who leads, to send callers there. A broker
//! joining again after etcd was away leaves, for a grace, the tenants of
//! the members it saw before to them (`Node::await_earlier_members`).

mod connect;
mod etcd;
mod placement;
mod proto;

use crate::broker::Broker;
use crate::config::ClusterSettings;
use etcd::{Etcd, EtcdError, KeepAlive};
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
    let mut node = Node {
        broker: broker.clone(),
        store,
        etcd,
        keys,
        settings,
        tenants: broker.tenant_ids(),
        led: HashSet::new(),
        last_save: Instant::now(),
        own_leases: Vec::new(),
        spare: None,
        members: HashMap::new(),
        serves: HashMap::new(),
        warned: HashSet::new(),
        awaited: HashMap::new(),
        awaited_since: Instant::now(),
        member_leases: HashMap::new(),
        etcd_was_away: false,
        refresh_failed: false,
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
                tracing::warn!(error = %e, etcd = ?node.settings.etcd,
                    "cluster session failed: leading nothing until one succeeds");
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
    // A lease granted to a session that failed before it joined: nothing
    // will join on it now, and a join applied whose answer was lost would
    // keep this node counted as a member until its TTL.
    if let Some(id) = node.spare.take() {
        if let Err(e) = node.etcd.revoke(id).await {
            tracing::warn!(error = %e, lease = id,
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
    /// The tenants each member serves, as the last tick read (a member
    /// missing here serves every tenant).
    serves: HashMap<String, HashSet<String>>,
    /// Members already warned about for serving other tenants.
    warned: HashSet<String>,
    /// The other members this broker saw before it joined again (etcd was
    /// away), with the etcd lease they were on and what they serve, and
    /// since when their tenants wait for them: see
    /// [`Node::await_earlier_members`].
    awaited: HashMap<String, (i64, Option<HashSet<String>>)>,
    awaited_since: Instant,
    /// The etcd lease of each member's key, as the last tick read.
    member_leases: HashMap<String, i64>,
    /// The last session ended with etcd not answering (rather than with
    /// the lease found expired by a broker that alone was away).
    etcd_was_away: bool,
    /// A keep-alive of this session went unanswered.
    refresh_failed: bool,
}

impl Node {
    /// One etcd lease's life: registers, then ticks until the lease is lost
    /// (`Ok(None)`, start another), etcd fails (`Err`), or the broker shuts
    /// down (`Ok(Some(lease))`, to hand over).
    async fn session(&mut self, tick: Duration) -> Result<Option<i64>, EtcdError> {
        self.refresh_failed = false;
        let mut keep = self.lease().await?;
        let lease = keep.id();
        if let Err(e) = self.join(lease).await {
            self.spare = Some(lease);
            return Err(e);
        }
        let me = self.settings.node.clone();
        tracing::info!(node = %me, lease, "joined the cluster");
        if self.etcd_was_away {
            self.await_earlier_members();
        } else {
            self.awaited.clear();
        }
        let shutdown = self.broker.shutdown_token().clone();
        let mut next = Instant::now();
        loop {
            let Some(valid_until) = self.refresh(&mut keep).await? else {
                tracing::warn!(node = %me, "etcd lease expired: stepping down from every tenant");
                self.lose_all();
                return Ok(None);
            };
            self.broker.set_in_cluster(Some(valid_until));
            if let Err(e) = self.step(lease, valid_until).await {
                tracing::warn!(error = %e, "cluster step failed; tenants led stay led until their lease margin");
            }
            next += tick;
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = shutdown.cancelled() => return Ok(Some(lease)),
            }
            next = next.max(Instant::now());
        }
    }

    /// The lease a session joins on, with its keep-alive stream: the one
    /// an earlier session was granted and failed to join on, while etcd
    /// still has it, else a new one. Not a new lease at each try: each
    /// would outlive the failed session by its TTL, one more every tick
    /// while joining fails.
    async fn lease(&mut self) -> Result<KeepAlive, EtcdError> {
        if let Some(id) = self.spare.take() {
            let kept = async {
                let mut keep = self.etcd.keep_alive(id).await?;
                let (_, ttl) = keep.refresh().await?;
                Ok::<_, EtcdError>(ttl.map(|_| keep))
            };
            match kept.await {
                Ok(Some(keep)) => return Ok(keep),
                Ok(None) => {}
                Err(e) => {
                    self.spare = Some(id);
                    return Err(e);
                }
            }
        }
        let id = self.etcd.grant(self.settings.lease_ttl).await?;
        // Ours from now on, joined on or not: a key found on it later
        // (a join applied whose answer was lost) is this process's own.
        self.own_leases.push(id);
        if self.own_leases.len() > 8 {
            self.own_leases.remove(0);
        }
        match self.etcd.keep_alive(id).await {
            Ok(keep) => Ok(keep),
            Err(e) => {
                self.spare = Some(id);
                Err(e)
            }
        }
    }

    /// Registers this node on `lease`: its member and `serves` keys, and
    /// the leader keys of its earlier leases freed.
    async fn join(&mut self, lease: i64) -> Result<(), EtcdError> {
        let me = self.settings.node.clone();
        // The member key is created only if absent, or replaced only while
        // on an earlier lease of this process (etcd was away for less than
        // the TTL): on a lease this process never held, another broker
        // runs as this node (or one that crashed moments ago, whose lease
        // has not expired yet). Taking its name would make both lead its
        // tenants; wait for its lease to go instead. Atomic, so two
        // processes started at once under one name cannot both join.
        // The `serves` key is written with it, in one transaction: a member
        // seen without it would count as serving every tenant, and be
        // handed tenants it does not have.
        let member = self.keys.member(&me);
        let url = self.settings.advertise.as_bytes().to_vec();
        let serves = self.keys.serves(&me);
        let tenants = self.tenants.join("\n").into_bytes();
        let join = |was| {
            self.etcd.put_pair_if(
                (&member, url.clone()),
                (&serves, tenants.clone()),
                was,
                lease,
            )
        };
        let joined = if join(None).await? {
            true
        } else {
            match self.etcd.lease_of(&member).await? {
                Some(was) if was == 0 || self.own_leases.contains(&was) => join(Some(was)).await?,
                Some(theirs) => {
                    return Err(EtcdError::new(
                        "join",
                        format!(
                            "another broker is a member as node {me:?} (etcd lease {theirs:x}): \
                             each broker needs its own cluster.node; joining once that lease \
                             expires (a broker restarted within lease_ttl_ms waits for its \
                             earlier run's lease the same way)"
                        ),
                    ));
                }
                None => false,
            }
        };
        if !joined {
            return Err(EtcdError::new(
                "join",
                format!("the member key of node {me:?} changed while joining; trying again"),
            ));
        }
        self.store.lease.store(lease, Ordering::Release);
        // Leader keys of an earlier lease of ours would expire with a lease
        // no longer refreshed: free them and win them again on this one.
        for e in self.etcd.list(&self.keys.leaders()).await? {
            if e.lease != lease && self.own_leases.contains(&e.lease) {
                self.etcd.delete_if(&e.key, e.lease).await?;
            }
        }
        Ok(())
    }

    /// Refreshes the lease: until when this node may grant (`None`: the
    /// lease is gone). A failed refresh is retried on a new stream until
    /// the margin would pass; tenants stop being granted at it regardless.
    async fn refresh(&mut self, keep: &mut KeepAlive) -> Result<Option<Instant>, EtcdError> {
        // From when the answered request was sent, which for a new stream
        // is when it was opened (the registration's calls came since).
        let (sent, ttl) = match keep.refresh().await {
            Ok(answer) => answer,
            Err(e) => {
                self.refresh_failed = true;
                tracing::debug!(error = %e, "keep-alive failed; reopening the stream");
                *keep = self.etcd.reopen(keep).await?;
                keep.refresh().await?
            }
        };
        Ok(ttl.map(|ttl| sent + ttl.saturating_sub(self.settings.safety_margin)))
    }

    /// One tick with the lease valid until `valid_until`.
    async fn step(&mut self, lease: i64, valid_until: Instant) -> Result<(), EtcdError> {
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        // Node → (URL, its etcd lease).
        let member_keys = self
            .listed(&self.keys.members(), |e| (text(&e.value), e.lease))
            .await?;
        let members: HashMap<String, String> = member_keys
            .iter()
            .map(|(n, (url, _))| (n.clone(), url.clone()))
            .collect();
        // Tenant → (leading node, its lease).
        let leaders = self
            .listed(&self.keys.leaders(), |e| (text(&e.value), e.lease))
            .await?;
        let serves: HashMap<String, HashSet<String>> = self
            .listed(&self.keys.serving(), |e| {
                text(&e.value).lines().map(str::to_owned).collect()
            })
            .await?;
        self.warn_of_other_tenants(&members, &serves);
        self.members = members.clone();
        self.member_leases = member_keys
            .iter()
            .map(|(n, (_, l))| (n.clone(), *l))
            .collect();
        self.serves = serves.clone();
        let me = self.settings.node.clone();
        // Back: on another lease than before (the earlier one's key may
        // linger until etcd expires it).
        self.awaited
            .retain(|m, (was, _)| member_keys.get(m).is_none_or(|(_, l)| l == was));
        let waited = self.awaited_since.elapsed();
        let ttl = self.settings.lease_ttl;
        if waited >= 2 * ttl {
            self.awaited.clear();
        } else if waited >= ttl + (ttl / 5).min(Duration::from_secs(1))
            && self.awaited.keys().any(|m| member_keys.contains_key(m))
        {
            // A key on its earlier lease a TTL on: that lease is being
            // refreshed, so etcd was away for this broker alone (its
            // link), not for the cluster; no one else is coming back.
            tracing::info!("members seen before kept their etcd leases: no longer waiting for any");
            self.awaited.clear();
        }
        let awaited = self.awaited.clone();
        let serving = |tenant: &str| {
            let live = members
                .keys()
                .filter(|m| serves.get(*m).is_none_or(|s| s.contains(tenant)));
            let coming = awaited
                .iter()
                .filter(|(m, (_, s))| {
                    !members.contains_key(*m) && s.as_ref().is_none_or(|s| s.contains(tenant))
                })
                .map(|(m, _)| m);
            live.chain(coming).map(String::as_str).collect::<Vec<_>>()
        };
        let url = |node: Option<&str>| node.and_then(|n| members.get(n).cloned());
        // First extend every lead this node holds: an etcd error on one
        // tenant below must not let the others lapse.
        // Ours: on this lease. Our name on a lease of another process is
        // another broker configured with this node name.
        let ours = |t: &str| leaders.get(t).is_some_and(|(_, l)| *l == lease);
        for t in 0..self.tenants.len() {
            let mine = ours(&self.tenants[t]);
            if mine && self.led.contains(&t) && self.broker.leads(t) {
                self.broker.lead(t, valid_until);
            }
        }
        for t in 0..self.tenants.len() {
            let tenant = self.tenants[t].clone();
            let preferred = placement::leader_of(&tenant, serving(&tenant)).map(str::to_owned);
            let holder = leaders.get(&tenant).map(|(h, _)| h.as_str());
            // A member awaited back is preferred: no one takes the tenant
            // yet, and one held is kept until that member is back.
            let absent = preferred
                .as_deref()
                .is_some_and(|p| awaited.contains_key(p));
            match holder {
                Some(_) if ours(&tenant) => {
                    if preferred.as_deref().is_some_and(|p| p != me) && !absent {
                        self.hand_over(t, url(preferred.as_deref()), lease).await?;
                    } else if self.led.contains(&t) && self.broker.leads(t) {
                        self.broker.lead(t, valid_until);
                    } else {
                        // Ours from before a lapse (etcd slow, margin passed):
                        // rebuild from the saved state as any new leader would.
                        self.take_over(t, valid_until).await?;
                    }
                }
                None if preferred.as_deref() == Some(me.as_str()) => {
                    if self
                        .etcd
                        .create(&self.keys.leader(&tenant), me.as_bytes(), lease)
                        .await?
                    {
                        self.take_over(t, valid_until).await?;
                    }
                }
                Some(h) if h == me => {
                    // Never send callers to our own address for it.
                    tracing::error!(%tenant, node = %me,
                        "another process leads the tenant under this broker's cluster.node: \
                         each broker needs its own node name");
                    if self.led.remove(&t) {
                        self.broker.step_down(t, None);
                    } else {
                        self.broker.follow(t, None);
                    }
                }
                other => {
                    if self.led.remove(&t) {
                        tracing::warn!(%tenant, leader = ?other, "another broker leads the tenant now: stepped down");
                        self.broker
                            .step_down(t, url(other.or(preferred.as_deref())));
                    } else {
                        self.broker.follow(t, url(other.or(preferred.as_deref())));
                    }
                }
            }
        }
        if self.last_save.elapsed() >= SAVE_EVERY {
            self.last_save = Instant::now();
            self.save_dirty().await?;
        }
        Ok(())
    }

    /// The keys under `prefix`, by what follows it, each read by `read`.
    async fn listed<T>(
        &self,
        prefix: &str,
        read: impl Fn(&etcd::Entry) -> T,
    ) -> Result<HashMap<String, T>, EtcdError> {
        Ok(self
            .etcd
            .list(prefix)
            .await?
            .iter()
            .filter_map(|e| Some((e.key.strip_prefix(prefix)?.to_owned(), read(e))))
            .collect())
    }

    async fn take_over(&mut self, t: usize, valid_until: Instant) -> Result<(), EtcdError> {
        let tenant = self.tenants[t].clone();
        let saved = self.etcd.get(&self.keys.state(&tenant)).await?;
        let _in_order = self.broker.hold_saves().await;
        self.broker.take_over(t, saved.as_deref());
        // Saved before the first grant: a snapshot then always exists once
        // anyone granted (so the next leader knows to be careful), and the
        // levels a hand-over left do not outlive this lead.
        if self.store.save(&tenant, self.broker.snapshot(t)).await? {
            self.broker.lead(t, valid_until);
            self.led.insert(t);
            tracing::info!(%tenant, "took the tenant over: leading it");
        }
        Ok(())
    }

    /// Hands tenant `t` to `next`: stops granting first, then saves and
    /// frees the leader key.
    async fn hand_over(
        &mut self,
        t: usize,
        next: Option<String>,
        lease: i64,
    ) -> Result<(), EtcdError> {
        let tenant = self.tenants[t].clone();
        // Until the key is gone: an operator's change saved after the final
        // snapshot would be lost, so its save must find the key deleted.
        let _in_order = self.broker.hold_saves().await;
        self.broker.step_down(t, next.clone());
        self.led.remove(&t);
        self.store
            .save(&tenant, self.broker.final_snapshot(t))
            .await?;
        self.etcd
            .delete_if(&self.keys.leader(&tenant), lease)
            .await?;
        match &next {
            Some(next) => {
                tracing::info!(%tenant, %next, "handed the tenant over to its preferred broker")
            }
            None => {
                tracing::info!(%tenant, "handed the tenant over: the next leader takes it on its next tick")
            }
        }
        Ok(())
    }

    /// At shutdown: hands every tenant over and leaves the cluster. The
    /// first etcd failure ends the hand-overs (each further one would wait
    /// for its own timeout, so a broker leading many tenants would outlast
    /// any grace period): the rest stop being granted at once and are
    /// freed by the lease's expiry, as after a crash.
    async fn hand_over_all(&mut self, lease: i64) {
        let led: Vec<usize> = self.led.iter().copied().collect();
        let me = self.settings.node.clone();
        for t in led {
            // The member that wins the tenant once this one is gone: its
            // callers are sent there rather than told no one leads.
            let tenant = &self.tenants[t];
            let others = self
                .members
                .keys()
                .filter(|n| **n != me)
                .filter(|n| self.serves.get(*n).is_none_or(|s| s.contains(tenant)))
                .map(String::as_str);
            let next =
                placement::leader_of(tenant, others).and_then(|n| self.members.get(n).cloned());
            if let Err(e) = self.hand_over(t, next, lease).await {
                let left = self.led.len();
                self.lose_all();
                tracing::warn!(error = %e, tenants_left = left,
                    "hand-over at shutdown failed; the tenant and those not handed over yet \
                     are freed by the lease's expiry");
                return;
            }
        }
        if let Err(e) = self.etcd.revoke(lease).await {
            tracing::warn!(error = %e, "could not leave the cluster; the lease expiry will");
        }
    }

    /// Warns once per member whose config serves other tenants than this
    /// one's: every broker of a cluster should have the same tenants (a
    /// tenant only some serve is led only by them, and a broker without
    /// one answers its callers NOT_FOUND).
    fn warn_of_other_tenants(
        &mut self,
        members: &HashMap<String, String>,
        serves: &HashMap<String, HashSet<String>>,
    ) {
        self.warned.retain(|m| members.contains_key(m));
        let ours: HashSet<&str> = self.tenants.iter().map(String::as_str).collect();
        for (node, theirs) in serves {
            if *node == self.settings.node || !members.contains_key(node) {
                continue;
            }
            let theirs: HashSet<&str> = theirs.iter().map(String::as_str).collect();
            if theirs != ours && self.warned.insert(node.clone()) {
                let lacks: Vec<&str> = ours.difference(&theirs).copied().take(5).collect();
                let extra: Vec<&str> = theirs.difference(&ours).copied().take(5).collect();
                tracing::warn!(member = %node, lacks = ?lacks, only_it_has = ?extra,
                    "a member of the cluster serves other tenants than this broker: every broker \
                     should have the same [[tenants]]; a tenant is led only by members that serve it");
            }
        }
    }

    /// The lease is gone or etcd unreachable: lead nothing.
    fn lose_all(&mut self) {
        self.store.lease.store(0, Ordering::Release);
        self.broker.set_in_cluster(None);
        for t in self.led.drain() {
            self.broker.step_down(t, None);
        }
        // Cut off from etcd, this broker no longer knows who leads the
        // others either: callers are told no one does (and fall back)
        // rather than sent to a leader that may be gone.
        for t in 0..self.tenants.len() {
            self.broker.follow(t, None);
        }
    }

    /// On joining again after etcd did not answer (every lease expired,
    /// brokers coming back one by one): for up to two lease TTLs, or until
    /// they are back, placement still counts the members seen before (not
    /// after a lease found expired at the first keep-alive that asked:
    /// then this broker alone was away, paused; nor once a member seen
    /// before is still on its earlier lease a TTL on: etcd was away for
    /// this broker's link alone), so a tenant
    /// whose leader is not back yet waits for it rather than going to
    /// whichever broker is back first and moving again as the others
    /// return. Each tenant then goes back to the broker that led it, which
    /// resumes it as it left it (no other broker led it since): levels and
    /// leases exact, no restart learning mode. A member that does not come
    /// back within the grace is no longer counted. At a first start nothing
    /// is awaited.
    fn await_earlier_members(&mut self) {
        let me = &self.settings.node;
        self.awaited = self
            .members
            .keys()
            .filter(|m| *m != me)
            .map(|m| {
                let lease = self.member_leases.get(m).copied().unwrap_or_default();
                (m.clone(), (lease, self.serves.get(m).cloned()))
            })
            .collect();
        self.awaited_since = Instant::now();
        if !self.awaited.is_empty() {
            let mut names: Vec<&str> = self.awaited.keys().map(String::as_str).collect();
            names.sort_unstable();
            names.truncate(8);
            tracing::info!(members = ?names, for_ms = (2 * self.settings.lease_ttl).as_millis() as u64,
                "joined again: the tenants of the members seen before wait for them to come back");
        }
    }

    /// Saves the snapshot of every led tenant whose learned state changed.
    async fn save_dirty(&mut self) -> Result<(), EtcdError> {
        let led: Vec<usize> = self.led.iter().copied().collect();
        for t in led {
            if self.broker.take_dirty(t) {
                let _in_order = self.broker.hold_saves().await;
                let saved = self
                    .store
                    .save(&self.tenants[t], self.broker.snapshot(t))
                    .await;
                if saved.is_err() {
                    self.broker.still_dirty(t);
                }
                saved?;
            }
        }
        Ok(())
    }
}
