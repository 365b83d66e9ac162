//! A tenant's lead moving to another broker: a leader killed with SIGKILL
//! under load is replaced, and across the hand-over no window grants more
//! than the bucket allows and no more slots are held than the limit, while
//! learned state and operators' changes reach the new leader; a joining
//! broker takes only its share of tenants; a leader that shuts down hands
//! its token levels and leases over; and a Watch follows its tenant's move.

use super::{
    away, bucket, client, leader, rate_call, settled_leader, Cluster, Feed, Grants, MARGIN_MS,
    TTL_MS,
};
use crate::invariants::{Event, GrantLog};
use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::{
    AcquireRequest, ReleaseRequest, RenewRequest, ReportRequest, SetBucketLimitRequest,
    WatchRequest,
};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;

fn slot_call(tenant: &str, client: &str, max_wait_ms: u64) -> AcquireRequest {
    AcquireRequest {
        method: "POST".into(),
        path: "/api/v2/analytics/conversations/details/query".into(),
        ..rate_call(tenant, client, max_wait_ms)
    }
}

/// How long a renewal or release is tried again after a refusal before
/// the lease counts as lost (as long as 60 tries 20 ms apart took).
const RETRYING: Duration = Duration::from_millis(1_200);

/// A client that follows the cluster: after a refusal (UNAVAILABLE, or the
/// broker gone) it asks at once the leader the answer names, else the next
/// broker, each broker once; when every broker has refused since the last
/// event of its [`Feed`] (a broker begins leading only with a line in its
/// log), it waits for the next one before asking again.
struct Follower {
    urls: Vec<String>,
    at: String,
    /// The brokers that refused since the last event.
    refused: HashSet<String>,
    events: Feed,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Follower {
    fn new(urls: Vec<String>, feed: &Feed, stop: &tokio::sync::watch::Receiver<bool>) -> Follower {
        Follower {
            at: urls[0].clone(),
            urls,
            refused: HashSet::new(),
            events: feed.fresh(),
            stop: stop.clone(),
        }
    }

    fn url(&self) -> String {
        self.at.clone()
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// The current broker answered.
    fn served(&mut self) {
        self.refused.clear();
    }

    /// After an UNAVAILABLE `s` from the current broker: goes where it
    /// sends the caller, else to the next broker that has not refused
    /// since the last event; with none left, waits for the next event
    /// (false if `deadline` passed first; without one, if the load was
    /// stopped).
    async fn follow(&mut self, s: &tonic::Status, deadline: Option<Instant>) -> bool {
        self.refused.insert(self.at.clone());
        let named = s
            .metadata()
            .get(quota_broker::LEADER_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let i = self.urls.iter().position(|u| *u == self.at).unwrap_or(0);
        let next = named
            .into_iter()
            .chain((1..=self.urls.len()).map(|k| self.urls[(i + k) % self.urls.len()].clone()))
            .find(|u| !self.refused.contains(u));
        if let Some(next) = next {
            self.at = next;
            return true;
        }
        let woke = match deadline {
            Some(d) => self.events.next_before(d).await,
            None => tokio::select! {
                () = self.events.next() => true,
                _ = self.stop.changed() => false,
            },
        };
        self.refused.clear();
        self.at = self.urls[(i + 1) % self.urls.len()].clone();
        woke
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_no_budget_is_granted_twice() {
    let etcd = testsvc::Etcd::start().unwrap();
    let mut cluster = Cluster::start(etcd, "kill", &["b1", "b2", "b3"], 1).await;
    let urls = cluster.urls();
    let first = settled_leader(&cluster.feed(), &urls, "t0").await;

    // An operator's change and a learned 429 on the first leader.
    let mut admin =
        QuotaAdminClient::new(Channel::from_shared(first.clone()).unwrap().connect_lazy());
    admin
        .set_bucket_limit(SetBucketLimitRequest {
            tenant: "t0".into(),
            bucket: "rate".into(),
            permits: 8,
            ..Default::default()
        })
        .await
        .unwrap();
    client(&first)
        .report(ReportRequest {
            tenant: "t0".into(),
            method: "GET".into(),
            path: "/api/v2/users/me".into(),
            http_status: 429,
            retry_after_ms: 300,
            ..Default::default()
        })
        .await
        .unwrap();

    let log = Arc::new(Mutex::new(GrantLog::default()));
    let by_node = Grants::default();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let feed = cluster.feed();
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let lease_seq = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut load = Vec::new();
    // A spender of the rate bucket and three slot holders, all following
    // the cluster.
    {
        let (mut f, log, by_node, seq) = (
            Follower::new(urls.clone(), &feed, &stopped),
            log.clone(),
            by_node.clone(),
            lease_seq.clone(),
        );
        load.push(tokio::spawn(async move {
            while !f.stopped() {
                let url = f.url();
                match client(&url).acquire(rate_call("t0", "spender", 200)).await {
                    Ok(r) if r.get_ref().granted => {
                        f.served();
                        let lease = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        log.lock().unwrap().record(Event::Granted {
                            lease,
                            permits: 1,
                            slot: false,
                        });
                        by_node.push(&url);
                    }
                    Ok(_) => f.served(),
                    Err(s) if away(&s) => {
                        f.follow(&s, None).await;
                    }
                    Err(s) => panic!("spender: {s}"),
                }
            }
        }));
    }
    let slot_log = Arc::new(Mutex::new(GrantLog::default()));
    for k in 0..4 {
        let (mut f, log, seq, errors) = (
            Follower::new(urls.clone(), &feed, &stopped),
            slot_log.clone(),
            lease_seq.clone(),
            errors.clone(),
        );
        load.push(tokio::spawn(async move {
            let me = format!("holder-{k}");
            while !f.stopped() {
                let req = slot_call("t0", &me, 500);
                let r = match client(&f.url()).acquire(req.clone()).await {
                    Ok(r) => r.into_inner(),
                    Err(s) if away(&s) => {
                        f.follow(&s, None).await;
                        continue;
                    }
                    Err(s) => panic!("{me}: {s}"),
                };
                f.served();
                if !r.granted {
                    continue;
                }
                let lease = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                log.lock().unwrap().record(Event::Granted {
                    lease,
                    permits: 1,
                    slot: true,
                });
                // Hold it 1.5 s (the upstream call it stands for runs in
                // real time), renewing every 500 ms wherever the tenant is
                // led by then.
                let until = Instant::now() + Duration::from_millis(1_500);
                let every = Duration::from_millis(500);
                let mut renewals = tokio::time::interval_at(Instant::now() + every, every);
                let mut held = true;
                while Instant::now() < until && held {
                    renewals.tick().await;
                    let renew = RenewRequest {
                        lease_id: r.lease_id.clone(),
                        extend_ms: 0,
                        acquired_with: Some(req.clone()),
                    };
                    let mut answered = false;
                    let give_up = Instant::now() + RETRYING;
                    loop {
                        match client(&f.url()).renew(renew.clone()).await {
                            Ok(_) => {
                                f.served();
                                answered = true;
                                break;
                            }
                            Err(s) if away(&s) => {
                                if !f.follow(&s, Some(give_up)).await {
                                    break;
                                }
                            }
                            Err(s) => {
                                errors.lock().unwrap().push(format!("{me} renew: {s}"));
                                break;
                            }
                        }
                        if Instant::now() >= give_up {
                            break;
                        }
                    }
                    if !answered {
                        // Not renewed: from the broker's side it expires.
                        log.lock().unwrap().record(Event::Expired { lease });
                        held = false;
                    }
                }
                if held {
                    log.lock().unwrap().record(Event::Released { lease });
                    let release = ReleaseRequest {
                        lease_id: r.lease_id.clone(),
                        ..Default::default()
                    };
                    let give_up = Instant::now() + RETRYING;
                    loop {
                        match client(&f.url()).release(release.clone()).await {
                            Err(s) if away(&s) => {
                                if !f.follow(&s, Some(give_up)).await {
                                    break;
                                }
                            }
                            _ => {
                                f.served();
                                break;
                            }
                        }
                        if Instant::now() >= give_up {
                            break;
                        }
                    }
                }
            }
        }));
    }

    // The first leader under load: 15 grants (1.5 s at 10 a second).
    by_node.until(&first, 15, Instant::now()).await;
    let first_node = cluster.node_of(&first);
    let killed_at = Instant::now();
    let old = cluster.brokers.remove(&first_node).unwrap();
    old.kill().await;
    let rest: Vec<String> = urls.iter().filter(|u| **u != first).cloned().collect();
    let second = leader(&cluster.feed(), &rest, "t0").await;
    // Load goes on under the new leader: 20 grants.
    by_node.until(&second, 20, killed_at).await;
    stop.send_replace(true);
    for l in load {
        tokio::time::timeout(Duration::from_secs(30), l)
            .await
            .expect("load stops")
            .unwrap();
    }

    let grants = by_node.all();
    let after: Vec<&(Instant, String)> = grants.iter().filter(|(t, _)| *t > killed_at).collect();
    let taken_over = after
        .iter()
        .find(|(_, u)| *u == second)
        .map(|(t, _)| *t - killed_at)
        .expect("the new leader granted");
    assert!(
        grants
            .iter()
            .any(|(t, u)| *u == first && *t + Duration::from_secs(1) > killed_at),
        "the killed broker was the leader under load"
    );
    assert!(
        after.iter().all(|(_, u)| *u == second),
        "only the new leader grants after the kill"
    );
    // Nobody may grant before the dead leader's lease could have expired.
    assert!(
        taken_over >= Duration::from_millis(TTL_MS - MARGIN_MS),
        "{taken_over:?}"
    );
    eprintln!(
        "takeover after kill -9: first grant by the new leader {:?} later (lease TTL {TTL_MS} ms)",
        taken_over
    );
    assert!(taken_over < Duration::from_secs(10), "{taken_over:?}");
    // Burst 5, at most 10 per second (8 after the operator's change): the
    // configured bound holds across the hand-over.
    log.lock()
        .unwrap()
        .check_rate(5, Duration::from_secs(1), 10)
        .unwrap();
    slot_log.lock().unwrap().check_slots(3).unwrap();
    let errors = errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "{errors:?}");

    // The operator's change and the learned cut are on the new leader.
    let rate = bucket(&second, "t0", "rate").await;
    assert_eq!(rate.configured_rate_per_min, 480.0, "{rate:?}");
    assert!(
        rate.effective_rate_per_min < 480.0,
        "the learned cut is carried over: {rate:?}"
    );

    // The failover is in the logs: the new leader names the member it took
    // t0 over from and how long t0 had no leader; the third broker, a
    // follower, says t0's leader changed.
    let second_node = cluster.node_of(&second);
    let new_leader = &cluster.brokers[&second_node];
    let from = format!("from={first_node} no_leader_for_ms=");
    new_leader.until_logged(&from).await;
    let logged = new_leader.logged();
    let line = logged
        .lines()
        .find(|l| l.contains("took the tenant over") && l.contains(&from))
        .unwrap_or_else(|| panic!("no take-over line from {first_node}:\n{logged}"));
    let gap: u64 = line
        .split("no_leader_for_ms=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    // Since the last tick that saw the dead leader's key: about a tick.
    assert!(gap < TTL_MS, "{line}");
    let third = cluster
        .brokers
        .iter()
        .find(|(n, _)| **n != second_node)
        .map(|(_, b)| b)
        .unwrap();
    // The third member says the change: at once, or through no leader
    // when one of its ticks fell between the key's expiry and the take-over.
    let direct = format!("leaders changed for 1 tenant: t0 {first_node}→{second_node}");
    let to_none = format!("leaders changed for 1 tenant: t0 {first_node}→(none)");
    let from_none = format!("leaders changed for 1 tenant: t0 (none)→{second_node}");
    let mut feed = third.log_feed();
    let said = tokio::time::timeout(
        Duration::from_secs(30),
        feed.wait_for(|l| l.contains(&direct) || l.contains(&from_none)),
    )
    .await
    .is_ok_and(|seen| seen.is_ok());
    assert!(said, "{}", third.logged());
    let logged = third.logged();
    assert!(
        logged.contains(&direct) || logged.contains(&to_none),
        "{logged}"
    );
}

/// A Watch follows what its broker leads: a Watch of one tenant ends with
/// UNAVAILABLE naming the new leader when the tenant moves (it does not go
/// silent on figures no longer true), one of a tenant that stays goes on,
/// and a Watch of every tenant on the joining broker sends each tenant it
/// takes over. The dashboard's feed of a moved tenant on the old broker
/// names the leader and says to open its dashboard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_when_its_tenant_moves_and_a_watch_of_all_follows_what_is_led() {
    let etcd = testsvc::Etcd::start().unwrap();
    let mut cluster = Cluster::start(etcd, "watch-moves", &["b1"], 8).await;
    let tenants = cluster.tenants.clone();
    let b1 = cluster.brokers["b1"].url();
    for t in &tenants {
        leader(&cluster.feed(), std::slice::from_ref(&b1), t).await;
    }
    const BOUND: Duration = Duration::from_secs(20);
    let mut named = Vec::new();
    for t in &tenants {
        let mut s = client(&b1)
            .watch(WatchRequest { tenant: t.clone() })
            .await
            .unwrap()
            .into_inner();
        let first = tokio::time::timeout(BOUND, s.message())
            .await
            .expect("a snapshot within 20 s")
            .unwrap()
            .expect("a snapshot");
        assert_eq!(&first.tenant, t);
        named.push((t.clone(), s));
    }
    cluster.add("b2").await;
    let b2 = cluster.brokers["b2"].url();
    let mut all_on_b2 = client(&b2)
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let urls = cluster.urls();
    let mut moved = HashSet::new();
    for t in &tenants {
        if settled_leader(&cluster.feed(), &urls, t).await == b2 {
            moved.insert(t.clone());
        }
    }
    assert!(
        !moved.is_empty() && moved.len() < tenants.len(),
        "{moved:?}"
    );
    for (t, s) in &mut named {
        if moved.contains(t) {
            let end = tokio::time::timeout(BOUND, async {
                loop {
                    match s.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => return None,
                        Err(e) => return Some(e),
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{t} moved to b2, and its Watch on b1 went on"));
            let e = end.unwrap_or_else(|| panic!("{t}'s Watch on b1 ended without saying why"));
            assert_eq!(e.code(), tonic::Code::Unavailable, "{t}: {e}");
            let named_leader = e
                .metadata()
                .get(quota_broker::LEADER_METADATA)
                .and_then(|v| v.to_str().ok());
            assert_eq!(named_leader, Some(b2.as_str()), "{t}: {e}");
        } else {
            // What has arrived on a tenant that stayed: updates, no end.
            while let Some(r) = futures_util::FutureExt::now_or_never(s.message()) {
                match r {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("{t} stayed on b1, and its Watch ended"),
                    Err(e) => panic!("{t} stayed on b1, and its Watch ended: {e}"),
                }
            }
        }
    }
    // The dashboard's feed of a moved tenant on b1 sends its reader to the
    // leader's dashboard, not to a gRPC call there.
    let t = moved.iter().next().unwrap();
    let b1_http = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.http["b1"]));
    let feed = crate::observe::get(b1_http, &format!("/events?tenant={t}"), &[]).await;
    assert_eq!(feed.status, 503, "{}", feed.body);
    assert!(
        feed.body.contains(&format!(
            "does not lead tenant \"{t}\"; its leader is the broker at {b2:?} (its gRPC \
             address): open the dashboard on that broker's HTTP port"
        )),
        "{}",
        feed.body
    );
    let mut heard = HashSet::new();
    tokio::time::timeout(BOUND, async {
        while !moved.is_subset(&heard) {
            let m = all_on_b2
                .message()
                .await
                .unwrap()
                .expect("b2's Watch went on");
            heard.insert(m.tenant);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("b2's Watch of every tenant sent {heard:?} of {moved:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_broker_takes_only_its_share_of_tenants() {
    let etcd = testsvc::Etcd::start().unwrap();
    let mut cluster = Cluster::start(etcd, "join", &["b1", "b2"], 12).await;
    let tenants = cluster.tenants.clone();
    let urls = cluster.urls();
    let mut before = HashMap::new();
    for t in &tenants {
        before.insert(t.clone(), settled_leader(&cluster.feed(), &urls, t).await);
    }
    // Every tenant spent as fast as it grants, through the join (b3's
    // log is not in the feed: a take-over of b3's is seen in etcd).
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let feed = cluster.feed();
    let mut load = Vec::new();
    for t in tenants.clone() {
        let mut f = Follower::new(urls.clone(), &feed, &stopped);
        load.push(tokio::spawn(async move {
            let mut log = GrantLog::default();
            let mut lease = 0;
            while !f.stopped() {
                match client(&f.url())
                    .acquire(rate_call(&t, "spender", 100))
                    .await
                {
                    Ok(r) if r.get_ref().granted => {
                        f.served();
                        log.record(Event::Granted {
                            lease,
                            permits: 1,
                            slot: false,
                        });
                        lease += 1;
                    }
                    Ok(_) => f.served(),
                    Err(s) if away(&s) => {
                        f.follow(&s, None).await;
                    }
                    Err(s) => panic!("{t}: {s}"),
                }
            }
            (t, log)
        }));
    }
    cluster.add("b3").await;
    let urls = cluster.urls();
    let new = urls
        .iter()
        .find(|u| !before.values().any(|b| b == *u))
        .cloned()
        .unwrap();
    let mut moved = 0;
    for t in &tenants {
        let after = settled_leader(&cluster.feed(), &urls, t).await;
        if after != before[t] {
            assert_eq!(after, new, "{t} moved between the old brokers");
            moved += 1;
        }
    }
    stop.send_replace(true);
    let mut grants = 0;
    for l in load {
        let (t, log) = tokio::time::timeout(Duration::from_secs(30), l)
            .await
            .expect("load stops")
            .unwrap();
        // Burst 5, 10 a second, whoever granted: the hand-over carried the
        // level, it did not refill the bucket.
        log.check_rate(5, Duration::from_secs(1), 10)
            .unwrap_or_else(|e| panic!("{t}: {e}"));
        grants += log.granted();
    }
    eprintln!(
        "b3 joined: {moved} of {} tenants moved to it; {grants} grants under way, every tenant within its rate",
        tenants.len()
    );
    assert!(moved > 0 && moved < tenants.len(), "{moved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_shuts_down_hands_its_token_levels_and_leases_over() {
    let etcd = testsvc::Etcd::start().unwrap();
    let mut cluster = Cluster::start(etcd, "handover", &["b1", "b2"], 1).await;
    let urls = cluster.urls();
    let first = settled_leader(&cluster.feed(), &urls, "t0").await;
    let slow = AcquireRequest {
        path: "/api/v2/slow/x".into(),
        ..rate_call("t0", "spender", 0)
    };
    for _ in 0..8 {
        let r = client(&first)
            .acquire(slow.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(r.granted, "{}", r.reason);
    }
    // A slot held through the hand-over, of the bucket's 3.
    let held = client(&first)
        .acquire(slot_call("t0", "holder", 0))
        .await
        .unwrap()
        .into_inner();
    assert!(held.granted, "{}", held.reason);
    let spent_at = Instant::now();
    let node = cluster.node_of(&first);
    let (status, log) = cluster.brokers.remove(&node).unwrap().terminate().await;
    assert!(status.success(), "{log}");
    assert!(log.contains("handed the tenant over"), "{log}");
    let rest: Vec<String> = urls.iter().filter(|u| **u != first).cloned().collect();
    // It named the broker that takes the tenant (its callers are sent there).
    assert!(log.contains(&format!("next={}", rest[0])), "{log}");
    let second = leader(&cluster.feed(), &rest, "t0").await;
    let level = bucket(&second, "t0", "slow").await.tokens_available;
    // 20 − 8 spent, plus 1 a second since: not empty (a crash's learning
    // mode) and not full.
    let most = 12.0 + spent_at.elapsed().as_secs_f64() + 0.5;
    eprintln!("hand-over: the new leader holds {level:.1} of 20 (at most {most:.1})");
    assert!((11.5..=most).contains(&level), "{level}");
    // The held lease came along: the other two slots are free at once (not
    // counted as held for the bucket's 3 s lease TTL), the third is its,
    // and the new leader knows it by its id.
    for n in 0..2 {
        let r = client(&second)
            .acquire(slot_call("t0", "newcomer", 0))
            .await
            .unwrap()
            .into_inner();
        assert!(r.granted, "slot {n} at the new leader: {}", r.reason);
    }
    let r = client(&second)
        .acquire(slot_call("t0", "newcomer", 0))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.granted, "the handed-over lease's slot was granted again");
    let released = client(&second)
        .release(ReleaseRequest {
            lease_id: held.lease_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(released.released, "the new leader does not know the lease");
}
