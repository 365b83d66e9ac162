//! A cluster on three etcd members under load: one member down or frozen
//! leaves the leader leading and granting unbroken; with the quorum lost
//! no broker leads, and the quorum back brings a leader back within about
//! a tick.

use super::{config, leader, leads, settled_leader, EtcdKeys, Feed, Grants, Spenders, TTL_MS};
use crate::child::{temp_config, Broker};
use std::time::Duration;
use tokio::time::Instant;

/// Starts broker `node` on the etcd endpoints `etcd` (in that order), under
/// `prefix`, serving `tenants`.
async fn broker_on(node: &str, etcd: &[String], prefix: &str, tenants: &[String]) -> Broker {
    let port = testsvc::free_port().unwrap();
    let listed: Vec<String> = etcd.iter().map(|u| format!("{u:?}")).collect();
    let toml = config(node, port, &etcd[0], prefix, tenants).replacen(
        &format!("etcd = [\"{}\"]", etcd[0]),
        &format!("etcd = [{}]", listed.join(", ")),
        1,
    );
    Broker::start(&temp_config(&format!("cluster-{node}-{port}"), &toml)).await
}

/// Three etcd members, a follower listed first (the member the brokers'
/// calls go to first, and one whose loss costs etcd no election: during
/// one every member stalls); two brokers on them, `first` leading tenant
/// t0 and `other` sending callers to it; a spender on each granting until
/// [`MembersUnderLoad::finish`].
struct MembersUnderLoad {
    /// What the etcd members report of the brokers' keys (declared
    /// before `members`: its watches end first).
    keys: EtcdKeys,
    members: Vec<testsvc::Etcd>,
    /// The follower listed first.
    follower: usize,
    endpoints: Vec<String>,
    tenants: Vec<String>,
    brokers: Vec<Broker>,
    urls: Vec<String>,
    first: String,
    other: String,
    grants: Grants,
    spenders: Spenders,
}

impl MembersUnderLoad {
    async fn start(prefix: &str) -> MembersUnderLoad {
        let members = testsvc::Etcd::start_members(3).unwrap();
        let follower = members
            .iter()
            .position(|m| !m.is_leader())
            .expect("two of three members follow");
        let mut endpoints: Vec<String> = members.iter().map(testsvc::Etcd::url).collect();
        endpoints.swap(0, follower);
        let tenants = vec!["t0".to_owned()];
        let mut brokers = Vec::new();
        for node in ["b1", "b2"] {
            brokers.push(broker_on(node, &endpoints, prefix, &tenants).await);
        }
        let urls: Vec<String> = brokers.iter().map(Broker::url).collect();
        let keys = EtcdKeys::watch(&members.iter().collect::<Vec<_>>(), prefix);
        let feed = Feed::of(&brokers, Some(&keys));
        let first = settled_leader(&feed, &urls, "t0").await;
        let other = urls.iter().find(|u| **u != first).cloned().unwrap();
        let grants = Grants::default();
        let spenders = Spenders::start(&urls, &grants, &feed);
        grants.until(&first, 5, Instant::now()).await;
        MembersUnderLoad {
            keys,
            members,
            follower,
            endpoints,
            tenants,
            brokers,
            urls,
            first,
            other,
            grants,
            spenders,
        }
    }

    /// What its waits wake on: the brokers' logs, etcd's changes.
    fn feed(&self) -> Feed {
        Feed::of(&self.brokers, Some(&self.keys))
    }

    /// The longest time between grants from `from` to `until`, each from
    /// the leader.
    fn longest_gap(&self, from: Instant, until: Instant) -> Duration {
        let mut last = from;
        let mut gap = Duration::ZERO;
        for (t, u) in self.grants.all() {
            if t > from && t <= until {
                assert_eq!(u, self.first, "granted by {u}, not the leader");
                gap = gap.max(t - last);
                last = t;
            }
        }
        gap.max(until - last)
    }

    /// Stops the load and the brokers (each must exit 0); their logs.
    async fn finish(self) -> String {
        self.spenders.stop().await;
        let mut logs = String::new();
        for b in self.brokers {
            let (status, log) = b.terminate().await;
            assert!(status.success(), "{log}");
            logs.push_str(&log);
        }
        logs
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_of_three_down_leaves_the_leader_leading_and_quorum_back_brings_one_back_at_once(
) {
    let mut m = MembersUnderLoad::start("/qb-test-member-down").await;
    let down = m.follower;
    let mut events = m.feed();
    m.members[down].stop();
    let stopped_at = Instant::now();
    // For three lease TTLs: the leader leads at every event and at their
    // end, the other broker sends callers to it, and its grants go on
    // unbroken.
    let window = stopped_at + Duration::from_millis(3 * TTL_MS);
    let (first, other) = (m.first.clone(), m.other.clone());
    loop {
        assert_eq!(
            leads(&first, "t0").await,
            Ok(()),
            "{first} stopped leading {:?} after an etcd member went down",
            stopped_at.elapsed()
        );
        assert_eq!(leads(&other, "t0").await, Err(Some(first.clone())));
        if !events.next_before(window).await {
            break;
        }
    }
    let gap = m.longest_gap(stopped_at, window);
    eprintln!("one etcd member down: the longest gap between grants {gap:?}");
    assert!(gap < Duration::from_secs(1), "grants stopped for {gap:?}");

    // Quorum lost (a second member down): no one leads; the first member
    // back restores it, and a broker leads and grants again within about
    // a tick of etcd serving, not after a backoff grown meanwhile.
    let second = (0..3).find(|i| *i != down).unwrap();
    let mut events = m.feed();
    m.members[second].stop();
    let lost_at = Instant::now();
    let deadline = lost_at + Duration::from_millis(TTL_MS + 1_000);
    loop {
        let mut led = false;
        for u in &m.urls {
            led |= leads(u, "t0").await.is_ok();
        }
        if !led {
            break;
        }
        assert!(
            events.next_before(deadline).await,
            "still led without an etcd quorum"
        );
    }
    let feed = m.feed();
    m.members[down].resume().unwrap();
    let serving_at = Instant::now();
    eprintln!("etcd quorum lost for {:?}", serving_at - lost_at);
    let again = leader(&feed, &m.urls, "t0").await;
    m.grants.until(&again, 1, serving_at).await;
    let back = m
        .grants
        .all()
        .iter()
        .find(|(t, _)| *t > serving_at)
        .map(|(t, _)| *t - serving_at)
        .unwrap_or_default();
    eprintln!("etcd quorum back: {again} leads, its first grant {back:?} after etcd served");
    assert!(
        back < Duration::from_millis(2 * TTL_MS),
        "first grant {back:?} after the quorum was back"
    );
    m.finish().await;
}

/// Lets a frozen etcd member run again when dropped, so a failing test
/// leaves no stopped process behind (etcd's own drop kills it after).
struct Frozen<'a>(&'a testsvc::Etcd);

impl Frozen<'_> {
    fn freeze(member: &testsvc::Etcd) -> Frozen<'_> {
        member.freeze().unwrap();
        Frozen(member)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let _ = self.0.thaw();
    }
}

/// An etcd member frozen (SIGSTOP: a paused VM, a long GC stall) while
/// the brokers' calls go to it: its kernel still completes TCP handshakes,
/// so nothing is refused and nothing answered. With the quorum intact the
/// leader keeps its tenant and grants on, unbroken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_etcd_member_leaves_the_leader_leading() {
    let m = MembersUnderLoad::start("/qb-test-member-frozen").await;
    let (first, other) = (m.first.clone(), m.other.clone());
    let mut events = m.feed();
    let frozen_member = Frozen::freeze(&m.members[m.follower]);
    let frozen_at = Instant::now();
    // For three lease TTLs, at every event and at their end.
    let window = frozen_at + Duration::from_millis(3 * TTL_MS);
    let mut lapses = Vec::new();
    loop {
        let (leader, pointed) = (leads(&first, "t0").await, leads(&other, "t0").await);
        if leader.is_err() || pointed != Err(Some(first.clone())) {
            lapses.push((frozen_at.elapsed(), leader, pointed));
        }
        if !events.next_before(window).await {
            break;
        }
    }
    // A broker started meanwhile (restarted during the stall) joins and
    // leads at its first try, its first call passed on from the frozen
    // member within the call's bound.
    let started_at = Instant::now();
    let late = broker_on(
        "b3",
        &m.endpoints,
        "/qb-test-member-frozen-late",
        &m.tenants,
    )
    .await;
    leader(&Feed::of([&late], None), &[late.url()], "t0").await;
    let late_lead = started_at.elapsed();
    drop(frozen_member);
    let (_, late_log) = late.terminate().await;
    eprintln!("a broker started with the member frozen led after {late_lead:?}");
    let gap = m.longest_gap(frozen_at, window);
    eprintln!("one etcd member frozen: the longest gap between grants {gap:?}");
    let logs = m.finish().await;
    assert!(
        lapses.is_empty(),
        "{first} stopped leading with an etcd member frozen: {lapses:?}\n{logs}"
    );
    assert!(
        gap < Duration::from_secs(1),
        "grants stopped for {gap:?}\n{logs}"
    );
    assert!(
        !late_log.contains("cluster session failed"),
        "a broker started with an etcd member frozen: {late_log}"
    );
}
