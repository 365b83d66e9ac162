//! Leading tenants: each tick's elections (take over a free tenant this
//! member is preferred for, step down from one it no longer is), the
//! hand-over at shutdown, the grace for members seen before etcd was away,
//! the leaders' snapshot saves, and what the members' keys tell about the
//! others (config drift, a shared URL, leaders that changed).

use super::etcd::{self, EtcdError};
use super::fingerprint::{Part, Served};
use super::{placement, Node, Seen, SAVE_EVERY};
use crate::clock::millis;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

impl Node {
    /// One tick with the lease valid until `valid_until`.
    pub(super) async fn step(&mut self, lease: i64, valid_until: Instant) -> Result<(), EtcdError> {
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
        let serves: HashMap<String, Served> = self
            .listed(&self.keys.serving(), |e| Served::parse(&text(&e.value)))
            .await?;
        self.warn_of_other_tenants(&members, &serves);
        self.warn_of_other_configs(&members, &serves);
        self.warn_of_shared_urls(&members);
        self.members = members.clone();
        self.member_leases = member_keys
            .iter()
            .map(|(n, (_, l))| (n.clone(), *l))
            .collect();
        self.serves = serves.clone();
        let me = self.settings.node.clone();
        let now = Instant::now();
        self.rejoins.saw(
            member_keys
                .iter()
                .filter(|(n, _)| **n != me)
                .map(|(n, (_, l))| (n.as_str(), *l)),
            now,
        );
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
        if self.seen.len() != self.tenants.len() {
            self.seen = vec![Seen::default(); self.tenants.len()];
        }
        let mut changes = Vec::new();
        // Members back on a new lease whose tenants stay here meanwhile,
        // with how many.
        let mut holding: HashMap<String, usize> = HashMap::new();
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
                    let next = preferred.as_deref().filter(|p| *p != me && !absent);
                    let held = next.filter(|p| self.rejoins.held(p, now));
                    if let Some(p) = held {
                        *holding.entry(p.to_owned()).or_default() += 1;
                    }
                    if next.is_some() && held.is_none() {
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
                        self.observe(t, Some(&me), now, &mut changes);
                        continue;
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
            self.observe(t, holder, now, &mut changes);
        }
        self.say_leaders_changed(&changes);
        self.say_held(&holding, now);
        if self.last_save.elapsed() >= SAVE_EVERY {
            self.last_save = Instant::now();
            self.save_dirty().await?;
        }
        Ok(())
    }

    /// The keys under `prefix`, by what follows it, each read by `read`.
    pub(super) async fn listed<T>(
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

    pub(super) async fn take_over(
        &mut self,
        t: usize,
        valid_until: Instant,
    ) -> Result<(), EtcdError> {
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
            // From whom, and for how long no one held it, as this
            // broker's ticks saw it: since the last tick that saw the
            // member lead it, so up to a tick more than the key was free
            // (a leader that crashed stopped granting up to a lease TTL
            // before its key expired).
            match self.seen.get(t).and_then(|s| s.last_led.as_ref()) {
                Some((from, at)) => tracing::info!(%tenant, from = %from,
                    no_leader_for_ms = millis(at.elapsed()),
                    "took the tenant over: leading it"),
                None => {
                    tracing::info!(%tenant, from = "unknown (no leader seen since this broker joined)",
                    "took the tenant over: leading it")
                }
            }
        }
        Ok(())
    }

    /// Hands tenant `t` to `next`: stops granting first, then saves and
    /// frees the leader key.
    pub(super) async fn hand_over(
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
        // Only a state this broker rebuilt and led in this session is the
        // tenant's: after a take-over that failed (etcd timed out reading
        // the saved state) it is a fresh or an old one, and saved as exact
        // it would overwrite the last leader's snapshot with full buckets
        // and no leases. Without a save the next leader rebuilds from that
        // snapshot, in the learning mode.
        if self.led.remove(&t) {
            self.store
                .save(&tenant, self.broker.final_snapshot(t))
                .await?;
        }
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
    pub(super) async fn hand_over_all(&mut self, lease: i64) {
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
    pub(super) fn warn_of_other_tenants(
        &mut self,
        members: &HashMap<String, String>,
        serves: &HashMap<String, Served>,
    ) {
        self.warned.retain(|m| members.contains_key(m));
        let ours: HashSet<&str> = self.tenants.iter().map(String::as_str).collect();
        for (node, theirs) in serves {
            if *node == self.settings.node || !members.contains_key(node) {
                continue;
            }
            let theirs: HashSet<&str> = theirs.tenants.iter().map(String::as_str).collect();
            if theirs != ours && self.warned.insert(node.clone()) {
                let lacks: Vec<&str> = ours.difference(&theirs).copied().take(5).collect();
                let extra: Vec<&str> = theirs.difference(&ours).copied().take(5).collect();
                tracing::warn!(member = %node, lacks = ?lacks, only_it_has = ?extra,
                    "a member of the cluster serves other tenants than this broker: every broker \
                     should have the same [[tenants]]; a tenant is led only by members that serve it");
            }
        }
    }

    /// Warns once per member and tenant that member serves with another
    /// config than this broker's (another fingerprint, see `fingerprint`):
    /// whichever leads the tenant grants by its own config. One line per
    /// member and tick, naming the first few tenants. A member of an
    /// earlier build publishes no fingerprints: compared on ids only.
    pub(super) fn warn_of_other_configs(
        &mut self,
        members: &HashMap<String, String>,
        serves: &HashMap<String, Served>,
    ) {
        self.warned_configs.retain(|m, _| members.contains_key(m));
        for (node, served) in serves {
            if *node == self.settings.node || !members.contains_key(node) {
                continue;
            }
            let Some(theirs) = &served.configs else {
                continue;
            };
            let warned = self.warned_configs.entry(node.clone()).or_default();
            let mut new: Vec<(usize, Vec<Part>)> = Vec::new();
            for (t, tenant) in self.tenants.iter().enumerate() {
                let differ = theirs
                    .get(tenant)
                    .map(|f| self.configs[t].differing(f))
                    .unwrap_or_default();
                if differ.is_empty() {
                    // The same again (or not served there): a later drift
                    // is said again.
                    warned.remove(&t);
                } else if warned.insert(t) {
                    new.push((t, differ));
                }
            }
            if new.is_empty() {
                continue;
            }
            // What differs, and the config sections that set it.
            let named = |parts: &[Part]| -> String {
                let names: Vec<&str> = parts.iter().map(|p| p.name()).collect();
                names.join("/")
            };
            let mut parts: Vec<Part> = new.iter().flat_map(|(_, d)| d.iter().copied()).collect();
            parts.sort_unstable();
            parts.dedup();
            let keys: Vec<&str> = parts.iter().map(|p| p.section()).collect();
            let keys = keys.join(", ");
            let member = crate::error::cut(node, 64);
            if let [(t, differ)] = &new[..] {
                let tenant = crate::error::cut(&self.tenants[*t], 64);
                let differ = named(differ);
                tracing::warn!(%member, %tenant, %differ,
                    "member {member} serves tenant {tenant} with another config than this \
                     broker's: {differ} differ; every member should have the same {keys} (the \
                     tenant's leader grants by its own)");
            } else {
                let shown: Vec<String> = new
                    .iter()
                    .take(5)
                    .map(|(t, d)| {
                        format!(
                            "{} ({})",
                            crate::error::cut(&self.tenants[*t], 64),
                            named(d)
                        )
                    })
                    .collect();
                tracing::warn!(%member, tenants = new.len(),
                    "member {member} serves {} tenants with another config than this broker's: \
                     {}{}; every member should have the same {keys} (a tenant's leader grants \
                     by its own)",
                    new.len(), shown.join(", "), if new.len() > 5 { " (the first 5)" } else { "" });
            }
        }
    }

    /// Says once per other member that advertises this broker's URL: the
    /// callers sent to either reach only the one at that address (the
    /// self-check of `cluster.advertise` cannot tell two brokers apart).
    pub(super) fn warn_of_shared_urls(&mut self, members: &HashMap<String, String>) {
        let same = |url: &str| {
            url.trim_end_matches('/')
                .eq_ignore_ascii_case(self.settings.advertise.trim_end_matches('/'))
        };
        let sharing: HashSet<&String> = members
            .iter()
            .filter(|(node, url)| **node != self.settings.node && same(url))
            .map(|(node, _)| node)
            .collect();
        self.warned_urls.retain(|m| sharing.contains(m));
        for node in sharing {
            if self.warned_urls.insert(node.clone()) {
                let member = crate::error::cut(node, 64);
                let url = crate::error::clip(&self.settings.advertise);
                tracing::error!(%member, advertise = %url,
                    "member {member} advertises this broker's cluster.advertise {url} too: \
                     callers redirected to either reach only the broker at that address; each \
                     member needs its own cluster.advertise, the URL clients reach it at");
            }
        }
    }

    /// Records who holds tenant `t`'s leader key at this tick (`holder`),
    /// adding to `changes` a change since the last tick of this session
    /// that this broker's own take-over or hand-over does not say: between
    /// two other members, or from or to no one.
    fn observe(
        &mut self,
        t: usize,
        holder: Option<&str>,
        now: Instant,
        changes: &mut Vec<(usize, String, String)>,
    ) {
        let me = self.settings.node.as_str();
        let Some(seen) = self.seen.get_mut(t) else {
            return;
        };
        if let Some(was) = seen.holder.replace(holder.map(str::to_owned)) {
            if was.as_deref() != holder && was.as_deref() != Some(me) && holder != Some(me) {
                let name = |n: Option<&str>| n.unwrap_or("(none)").to_owned();
                changes.push((t, name(was.as_deref()), name(holder)));
            }
        }
        if let Some(h) = holder {
            seen.last_led = Some((h.to_owned(), now));
        }
    }

    /// Says, in one line a tick, which tenants another member (or no one:
    /// `(none)`, its callers sent to the member preferred for it) leads now
    /// than at the tick before (its own take-overs and hand-overs say so
    /// themselves).
    fn say_leaders_changed(&self, changes: &[(usize, String, String)]) {
        if changes.is_empty() {
            return;
        }
        let shown: Vec<String> = changes
            .iter()
            .take(5)
            .map(|(t, was, now)| {
                format!(
                    "{} {}→{}",
                    crate::error::cut(&self.tenants[*t], 64),
                    crate::error::cut(was, 64),
                    crate::error::cut(now, 64)
                )
            })
            .collect();
        tracing::info!(
            tenants = changes.len(),
            "leaders changed for {} tenant{}: {}{}",
            changes.len(),
            if changes.len() == 1 { "" } else { "s" },
            shown.join(", "),
            if changes.len() > 5 {
                " (the first 5)"
            } else {
                ""
            }
        );
    }

    /// Says, once per return, that the tenants of a member back on a new
    /// lease stay with this broker for a while (`rejoins`).
    fn say_held(&mut self, holding: &HashMap<String, usize>, now: Instant) {
        for (node, tenants) in holding {
            let Some(held) = self.rejoins.unsaid(node, now) else {
                continue;
            };
            let member = crate::error::cut(node, 64);
            tracing::info!(%member, tenants, stay_for_ms = millis(held.left), returns = held.returns,
                "member {member} is back on a new etcd lease: the {tenants} tenant{} it is \
                 preferred for stay{} with this broker for {} ms before moving to it (a hold-down \
                 of two lease TTLs, doubled for each return within 10 minutes: this is its {}), so a \
                 member that fails again soon takes none of them down with it",
                if *tenants == 1 { "" } else { "s" },
                if *tenants == 1 { "s" } else { "" },
                millis(held.left), ordinal(held.returns));
        }
    }

    /// The lease is gone or etcd unreachable: lead nothing.
    pub(super) fn lose_all(&mut self) {
        self.store.lease.store(0, Ordering::Release);
        // Who led what is known again from the next session's ticks.
        self.seen.clear();
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
    pub(super) fn await_earlier_members(&mut self) {
        let me = &self.settings.node;
        self.awaited = self
            .members
            .keys()
            .filter(|m| *m != me)
            .map(|m| {
                let lease = self.member_leases.get(m).copied().unwrap_or_default();
                let served = self.serves.get(m).map(|s| s.tenants.clone());
                (m.clone(), (lease, served))
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
    pub(super) async fn save_dirty(&mut self) -> Result<(), EtcdError> {
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

/// "1st", "2nd", "3rd", "4th", ...
fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}
