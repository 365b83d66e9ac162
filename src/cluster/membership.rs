//! A broker's membership of the cluster: one etcd lease's session (join,
//! keep-alive, the tick loop), the lease it joins on, and its member and
//! `serves` keys. etcd lease ids are logged in hex, as `etcdctl lease
//! list` shows them.

use super::etcd::{EtcdError, KeepAlive};
use super::Node;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

impl Node {
    /// One etcd lease's life: registers, then ticks until the lease is lost
    /// (`Ok(None)`, start another), etcd fails (`Err`), or the broker shuts
    /// down (`Ok(Some(lease))`, to hand over).
    pub(super) async fn session(&mut self, tick: Duration) -> Result<Option<i64>, EtcdError> {
        self.refresh_failed = false;
        let mut keep = self.lease().await?;
        let lease = keep.id();
        if let Err(e) = self.join(lease).await {
            self.spare = Some(lease);
            return Err(e);
        }
        let me = self.settings.node.clone();
        tracing::info!(node = %me, lease = %format_args!("{lease:x}"), "joined the cluster");
        self.failing = None;
        self.broker.set_cluster_trouble(None);
        // Once joined, callers are sent to cluster.advertise: check it
        // reaches this broker (once per process; it ends once it does).
        if self.self_check.is_none() {
            self.self_check = Some(tokio::spawn(super::self_check::run(
                self.broker.clone(),
                self.settings.advertise.clone(),
            )));
        }
        self.seen.clear();
        if self.etcd_was_away {
            self.await_earlier_members();
        } else {
            self.awaited.clear();
        }
        let shutdown = self.broker.shutdown_token().clone();
        let mut next = Instant::now();
        let mut first_step = true;
        loop {
            let Some(valid_until) = self.refresh(&mut keep).await? else {
                tracing::warn!(node = %me, "etcd lease expired: stepping down from every tenant");
                self.lose_all();
                return Ok(None);
            };
            self.broker.set_in_cluster(Some(valid_until));
            match self.step(lease, valid_until).await {
                Err(e) => {
                    tracing::warn!(error = %e, "cluster step failed; tenants led stay led until their lease margin")
                }
                Ok(()) if first_step => {
                    first_step = false;
                    let (all, led) = self.broker.tenants_led();
                    tracing::info!(node = %me, leading = led, tenants = all,
                        "first tick in the cluster: leading {led} of {all} tenants");
                }
                Ok(()) => {}
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
    pub(super) async fn lease(&mut self) -> Result<KeepAlive, EtcdError> {
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
    pub(super) async fn join(&mut self, lease: i64) -> Result<(), EtcdError> {
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
        let tenants = self.serves_value.clone().into_bytes();
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
    pub(super) async fn refresh(
        &mut self,
        keep: &mut KeepAlive,
    ) -> Result<Option<Instant>, EtcdError> {
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
}
