//! Cluster mode against a real etcd (installed and started by the test on
//! 127.0.0.1) and three broker processes: a leader killed with SIGKILL under
//! load is replaced, and across the hand-over no window grants more than the
//! bucket allows and no more slots are held than the limit; learned state
//! and operators' changes reach the new leader; a joining broker takes only
//! its share of tenants; without etcd no broker grants past its margin, and
//! with etcd back a leader is elected again.

use crate::child::{temp_config, Broker};
use crate::invariants::{Event, GrantLog};
use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{
    AcquireRequest, ListBucketsRequest, QuotaStatus, ReleaseRequest, RenewRequest, ReportRequest,
    SetBucketLimitRequest, WatchRequest,
};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;

const TTL_MS: u64 = 2_000;
const MARGIN_MS: u64 = 500;

/// Node `node` of a cluster on `etcd` under `prefix`, serving `tenants`
/// (each: 10 permits per second, burst 5; 3 slots; and a slow bucket of 1
/// per second, burst 20).
fn config(node: &str, port: u16, etcd: &str, prefix: &str, tenants: &[String]) -> String {
    let mut toml = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
http_listen = ""
state_dir = ""
shutdown_grace_ms = 1000
[cluster]
etcd = ["{etcd}"]
node = "{node}"
advertise = "http://127.0.0.1:{port}"
prefix = "{prefix}"
lease_ttl_ms = {TTL_MS}
safety_margin_ms = {MARGIN_MS}
"#
    );
    for t in tenants {
        toml.push_str(&format!(
            r#"[[tenants]]
id = "{t}"
[[tenants.buckets]]
name = "rate"
routes = ["GET /api/v2/users/**"]
permits = 10
window_ms = 1000
burst = 5
[[tenants.buckets]]
name = "slots"
routes = ["POST /api/v2/analytics/**"]
max_in_flight = 3
lease_ttl_ms = 3000
[[tenants.buckets]]
name = "slow"
routes = ["GET /api/v2/slow/**"]
permits = 60
window_ms = 60000
burst = 20
"#
        ));
    }
    toml
}

struct Cluster {
    /// What etcd reports of the cluster's keys (declared before `etcd`:
    /// its watches end first).
    keys: EtcdKeys,
    etcd: testsvc::Etcd,
    etcd_url: String,
    prefix: String,
    tenants: Vec<String>,
    brokers: HashMap<String, Broker>,
    /// Each node's HTTP port (the dashboard's feed), open mode.
    http: HashMap<String, u16>,
}

impl Cluster {
    async fn start(etcd: testsvc::Etcd, name: &str, nodes: &[&str], tenants: usize) -> Cluster {
        let prefix = format!("/qb-test-{name}");
        let mut c = Cluster {
            keys: EtcdKeys::watch(&[&etcd], &prefix),
            etcd_url: etcd.url(),
            etcd,
            prefix,
            tenants: (0..tenants).map(|i| format!("t{i}")).collect(),
            brokers: HashMap::new(),
            http: HashMap::new(),
        };
        for n in nodes {
            c.add(n).await;
        }
        c
    }

    async fn add(&mut self, node: &str) {
        let port = testsvc::free_port().unwrap();
        let http = testsvc::free_port().unwrap();
        let toml = config(node, port, &self.etcd_url, &self.prefix, &self.tenants).replacen(
            "http_listen = \"\"",
            &format!("http_listen = \"127.0.0.1:{http}\""),
            1,
        );
        let path = temp_config(&format!("cluster-{node}-{port}"), &toml);
        self.http.insert(node.to_owned(), http);
        self.brokers
            .insert(node.to_owned(), Broker::start(&path).await);
    }

    fn urls(&self) -> Vec<String> {
        let mut urls: Vec<String> = self.brokers.values().map(Broker::url).collect();
        urls.sort();
        urls
    }

    /// What its waits wake on: its brokers' logs and etcd's changes.
    fn feed(&self) -> Feed {
        self.feed_with(&[])
    }

    /// [`Cluster::feed`], with the logs of brokers started outside it.
    fn feed_with(&self, more: &[&Broker]) -> Feed {
        Feed::of(
            self.brokers.values().chain(more.iter().copied()),
            Some(&self.keys),
        )
    }

    fn node_of(&self, url: &str) -> String {
        self.brokers
            .iter()
            .find(|(_, b)| b.url() == url)
            .map(|(n, _)| n.clone())
            .unwrap_or_default()
    }
}

/// What etcd reports of a cluster's leader and member keys
/// (`<prefix>/leaders/…`, `<prefix>/members/…`), each change appended as
/// etcd reports it (a lease's expiry deleting its keys included). The
/// watches end when it is dropped, or with their etcd member.
struct EtcdKeys {
    changes: tokio::sync::watch::Receiver<Vec<testsvc::Change>>,
    closers: Vec<testsvc::WatchCloser>,
}

impl EtcdKeys {
    /// Watches `prefix`'s keys through each of `members` (one that stops
    /// ends its own watch; the others go on).
    fn watch(members: &[&testsvc::Etcd], prefix: &str) -> EtcdKeys {
        let (tx, changes) = tokio::sync::watch::channel(Vec::new());
        let wanted = [format!("{prefix}/leaders/"), format!("{prefix}/members/")];
        let mut closers = Vec::new();
        for m in members {
            let w = m
                .watch(&format!("{prefix}/"))
                .unwrap_or_else(|e| panic!("{e}"));
            closers.push(w.closer().unwrap_or_else(|e| panic!("{e}")));
            let (tx, wanted) = (tx.clone(), wanted.clone());
            std::thread::spawn(move || {
                for all in w {
                    let kept: Vec<testsvc::Change> = all
                        .into_iter()
                        .filter(|c| wanted.iter().any(|w| c.key.starts_with(w.as_str())))
                        .collect();
                    if !kept.is_empty() {
                        tx.send_modify(|seen| seen.extend(kept));
                    }
                }
            });
        }
        EtcdKeys { changes, closers }
    }

    /// How many changes etcd reported so far (for [`EtcdKeys::deleted`]).
    fn seen(&self) -> usize {
        self.changes.borrow().len()
    }

    /// Whether etcd reported `key` deleted after the first `seen` changes.
    fn deleted(&self, seen: usize, key: &str) -> bool {
        self.changes
            .borrow()
            .iter()
            .skip(seen)
            .any(|c| c.deleted && c.key == key)
    }
}

impl Drop for EtcdKeys {
    fn drop(&mut self) {
        for c in &self.closers {
            c.close();
        }
    }
}

/// What a cluster test waits on instead of the clock: a line logged by any
/// of its brokers (a take-over, a hand-over, a step down, a leader change a
/// follower saw, a join, a lease lost, health turning), and a change etcd
/// reports of the leader and member keys. A broker begins or stops leading
/// only with a line in its log (a lead that runs out with etcd away: its
/// health turns NOT_SERVING, said within 250 ms).
#[derive(Clone, Default)]
struct Feed {
    logs: Vec<tokio::sync::watch::Receiver<String>>,
    etcd: Vec<tokio::sync::watch::Receiver<Vec<testsvc::Change>>>,
}

impl Feed {
    /// The logs of `brokers` and `etcd`'s changes, from now on.
    fn of<'a>(brokers: impl IntoIterator<Item = &'a Broker>, etcd: Option<&EtcdKeys>) -> Feed {
        let mut feed = Feed {
            logs: brokers.into_iter().map(Broker::log_feed).collect(),
            etcd: etcd.map(|k| k.changes.clone()).into_iter().collect(),
        };
        for e in &mut feed.etcd {
            e.mark_unchanged();
        }
        feed
    }

    /// The same sources, what they said so far taken as seen: made before
    /// a state is checked, its [`Feed::next`] wakes on anything after.
    fn fresh(&self) -> Feed {
        let mut feed = self.clone();
        for l in &mut feed.logs {
            l.mark_unchanged();
        }
        for e in &mut feed.etcd {
            e.mark_unchanged();
        }
        feed
    }

    /// Waits for the next line or etcd change (at once if one came since
    /// the last call); never, once every source has ended.
    async fn next(&mut self) {
        use std::future::Future;
        use std::pin::Pin;
        type Wait<'a> = Pin<Box<dyn Future<Output = (usize, bool)> + Send + 'a>>;
        loop {
            let logs = self.logs.len();
            let mut waits: Vec<Wait<'_>> = Vec::new();
            for (i, l) in self.logs.iter_mut().enumerate() {
                waits.push(Box::pin(async move { (i, l.changed().await.is_ok()) }));
            }
            for (i, e) in self.etcd.iter_mut().enumerate() {
                waits.push(Box::pin(
                    async move { (logs + i, e.changed().await.is_ok()) },
                ));
            }
            if waits.is_empty() {
                return std::future::pending().await;
            }
            let ((i, open), _, rest) = futures_util::future::select_all(waits).await;
            drop(rest);
            if open {
                return;
            }
            // That source ended (its broker gone, its etcd stopped).
            if i < logs {
                self.logs.remove(i);
            } else {
                self.etcd.remove(i - logs);
            }
        }
    }

    /// [`Feed::next`]; false if `deadline` passed first.
    async fn next_before(&mut self, deadline: Instant) -> bool {
        tokio::time::timeout_at(deadline, self.next()).await.is_ok()
    }
}

fn client(url: &str) -> QuotaBrokerClient<Channel> {
    QuotaBrokerClient::new(Channel::from_shared(url.to_owned()).unwrap().connect_lazy())
}

fn rate_call(tenant: &str, client: &str, max_wait_ms: u64) -> AcquireRequest {
    AcquireRequest {
        tenant: tenant.into(),
        client_id: client.into(),
        priority_class: "critical".into(),
        method: "GET".into(),
        path: "/api/v2/users/me".into(),
        max_wait_ms: Some(max_wait_ms),
        ..Default::default()
    }
}

fn slot_call(tenant: &str, client: &str, max_wait_ms: u64) -> AcquireRequest {
    AcquireRequest {
        method: "POST".into(),
        path: "/api/v2/analytics/conversations/details/query".into(),
        ..rate_call(tenant, client, max_wait_ms)
    }
}

/// Who leads `tenant` as `url` sees it: `Ok(())` it does; `Err(Some(u))`
/// it says `u` does; `Err(None)` it does not know (or did not answer).
async fn leads(url: &str, tenant: &str) -> Result<(), Option<String>> {
    let report = ReportRequest {
        tenant: tenant.into(),
        method: "GET".into(),
        path: "/api/v2/users/me".into(),
        http_status: 200,
        ..Default::default()
    };
    match client(url).report(report).await {
        Ok(_) => Ok(()),
        Err(s) if away(&s) => Err(s
            .metadata()
            .get(quota_broker::LEADER_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)),
        Err(s) => panic!("{url}: {s}"),
    }
}

/// Grants seen by the load, by broker URL; waiters are woken on each.
#[derive(Clone, Default)]
struct Grants(Arc<(Mutex<Vec<Grant>>, tokio::sync::Notify)>);

/// When, and which broker.
type Grant = (Instant, String);

impl Grants {
    fn push(&self, url: &str) {
        self.0
             .0
            .lock()
            .unwrap()
            .push((Instant::now(), url.to_owned()));
        self.0 .1.notify_waiters();
    }

    fn all(&self) -> Vec<Grant> {
        self.0 .0.lock().unwrap().clone()
    }

    /// Waits (at most 30 s) until `url` has granted `n` since `since`.
    async fn until(&self, url: &str, n: usize, since: Instant) {
        let count = || {
            self.all()
                .iter()
                .filter(|(t, u)| u == url && *t > since)
                .count()
        };
        let waited = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let notified = self.0 .1.notified();
                if count() >= n {
                    return;
                }
                notified.await;
            }
        });
        waited
            .await
            .unwrap_or_else(|_| panic!("{url} did not grant {n} within 30 s"));
    }
}

/// The URL of `tenant`'s leader once exactly one of `urls` leads it and
/// every other one says so (at most 20 s), asked again at each event of
/// `feed`.
async fn leader(feed: &Feed, urls: &[String], tenant: &str) -> String {
    let mut events = feed.fresh();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut leading = Vec::new();
        let mut pointed = Vec::new();
        for u in urls {
            match leads(u, tenant).await {
                Ok(()) => leading.push(u.clone()),
                Err(to) => pointed.push(to),
            }
        }
        assert!(leading.len() <= 1, "{tenant} led by {leading:?} at once");
        if let [one] = &leading[..] {
            if pointed.iter().all(|to| to.as_deref() == Some(one.as_str())) {
                return one.clone();
            }
        }
        assert!(
            events.next_before(deadline).await,
            "no settled leader for {tenant} within 20 s"
        );
    }
}

/// The URL of `tenant`'s leader once the cluster settled: the same leader
/// at every event of `feed` for a second, and at its end (a member that
/// just joined may still take it over on its next tick).
async fn settled_leader(feed: &Feed, urls: &[String], tenant: &str) -> String {
    let mut events = feed.fresh();
    let mut last = leader(feed, urls, tenant).await;
    let mut since = Instant::now();
    loop {
        let changed = events.next_before(since + Duration::from_secs(1)).await;
        let now = leader(feed, urls, tenant).await;
        if now != last {
            (last, since) = (now, Instant::now());
        } else if !changed {
            return last;
        }
    }
}

/// Bucket `name` of `tenant` as the broker at `url` lists it.
async fn bucket(url: &str, tenant: &str, name: &str) -> QuotaStatus {
    QuotaAdminClient::new(Channel::from_shared(url.to_owned()).unwrap().connect_lazy())
        .list_buckets(ListBucketsRequest {
            tenant: tenant.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .buckets
        .into_iter()
        .find(|b| b.bucket == name)
        .unwrap_or_else(|| panic!("{url} lists no bucket {name}"))
}

/// The broker did not serve the call: not the leader, down, or gone
/// mid-call (a transport error).
fn away(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable || std::error::Error::source(s).is_some()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_under_a_members_node_name_leads_nothing() {
    let etcd = testsvc::Etcd::start().unwrap();
    let cluster = Cluster::start(etcd, "same-name", &["b1"], 1).await;
    let first = settled_leader(&cluster.feed(), &cluster.urls(), "t0").await;
    // Another process configured as b1 too (a copied config, an overlapping
    // deploy): it must not take b1's tenants while b1 lives.
    let port = testsvc::free_port().unwrap();
    let http = testsvc::free_port().unwrap();
    let toml = config(
        "b1",
        port,
        &cluster.etcd_url,
        &cluster.prefix,
        &cluster.tenants,
    )
    .replacen(
        "http_listen = \"\"",
        &format!("http_listen = \"127.0.0.1:{http}\""),
        1,
    );
    let dup = Broker::start(&temp_config(&format!("cluster-dup-{port}"), &toml)).await;
    // For two lease TTLs, at every event and at their end.
    let mut events = cluster.feed_with(&[&dup]);
    let watch_until = Instant::now() + Duration::from_millis(2 * TTL_MS);
    loop {
        assert_eq!(
            leads(&first, "t0").await,
            Ok(()),
            "the first b1 stopped leading"
        );
        assert!(
            leads(&dup.url(), "t0").await.is_err(),
            "the second b1 leads too"
        );
        if !events.next_before(watch_until).await {
            break;
        }
    }
    // Its readiness probe says why, not only that etcd may be away.
    let ready = crate::observe::get(
        std::net::SocketAddr::from(([127, 0, 0, 1], http)),
        "/readyz",
        &[],
    )
    .await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(
        ready
            .body
            .contains("another broker is a member as node \"b1\""),
        "{}",
        ready.body
    );
    let (_, log) = dup.terminate().await;
    assert!(
        log.contains("another broker is a member as node \"b1\""),
        "{log}"
    );
    // The lease it names is the one the first b1 said it joined on, both
    // in hex.
    let theirs = log
        .split("(etcd lease ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("{log}"));
    let first_log = cluster.brokers["b1"].logged();
    assert!(
        first_log
            .lines()
            .any(|l| l.contains("joined the cluster") && l.contains(&format!("lease={theirs}"))),
        "lease {theirs} not in the first b1's join line:\n{first_log}"
    );
    // Failing each tick for 2 lease TTLs, said once (at most once a minute).
    assert_eq!(log.matches("cluster session failed").count(), 1, "{log}");
}

/// A member whose config lacks some tenants is never elected to lead them
/// (they would go unled), a tenant only one member has is led by it, and
/// the others warn that the members' tenants differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_is_led_only_by_members_that_serve_it() {
    let etcd = testsvc::Etcd::start().unwrap();
    let mut cluster = Cluster::start(etcd, "other-tenants", &["b1"], 8).await;
    let all = cluster.tenants.clone();
    let b1 = cluster.brokers["b1"].url();
    // b1 leads every tenant before b2 comes (it takes them one by one).
    let mut events = cluster.feed();
    let deadline = Instant::now() + Duration::from_secs(20);
    for t in &all {
        while leads(&b1, t).await.is_err() {
            assert!(
                events.next_before(deadline).await,
                "{t} is not led by b1 alone"
            );
        }
    }
    // b2 serves t0–t3 and a tenant of its own, not t4–t7.
    let mut some: Vec<String> = all[..4].to_vec();
    some.push("only-b2".into());
    let port = testsvc::free_port().unwrap();
    let toml = config("b2", port, &cluster.etcd_url, &cluster.prefix, &some);
    let b2 = Broker::start(&temp_config(&format!("cluster-b2-{port}"), &toml)).await;
    let feed = cluster.feed_with(&[&b2]);
    // b2 has joined once it leads its own tenant.
    let mut events = feed.fresh();
    let deadline = Instant::now() + Duration::from_secs(20);
    while leads(&b2.url(), "only-b2").await.is_err() {
        assert!(
            events.next_before(deadline).await,
            "only-b2 is not led by b2"
        );
    }
    // Then, for a lease TTL and more (ticks of both, hand-overs done):
    // t4–t7 stay led by b1 whatever the hashing prefers, at every event
    // and at the end; and each of t0–t3 is led by one of the two.
    let urls = vec![b1.clone(), b2.url()];
    let mut events = feed.fresh();
    let watch_until = Instant::now() + Duration::from_millis(2 * TTL_MS);
    let mut lapse = None;
    'watch: loop {
        for t in &all[4..] {
            if let Err(leader) = leads(&b1, t).await {
                lapse = Some(format!(
                    "{t}, which b2 lacks, is not led by b1 (leader: {leader:?})"
                ));
                break 'watch;
            }
        }
        if !events.next_before(watch_until).await {
            break;
        }
    }
    if let Some(lapse) = lapse {
        let (_, b2_log) = b2.terminate().await;
        let b1_log = match cluster.brokers.remove("b1") {
            Some(b1) => b1.terminate().await.1,
            None => String::new(),
        };
        panic!("{lapse}\nb1's log:\n{b1_log}\nb2's log:\n{b2_log}");
    }
    for t in &all[..4] {
        leader(&feed, &urls, t).await;
    }
    let (_, log) = b2.terminate().await;
    assert!(
        log.contains("serves other tenants than this broker"),
        "{log}"
    );
    cluster.brokers.clear();
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

/// Two processes configured with one node name that reach etcd at the
/// same moment (both started while it hung): one joins, the other waits;
/// never do both lead a tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_started_at_once_under_one_name_do_not_both_lead() {
    let etcd = testsvc::Etcd::start().unwrap();
    let cluster = Cluster::start(etcd, "same-name-at-once", &[], 1).await;
    cluster.etcd.freeze().unwrap();
    let mut twins = Vec::new();
    for _ in 0..2 {
        let port = testsvc::free_port().unwrap();
        let toml = config(
            "b9",
            port,
            &cluster.etcd_url,
            &cluster.prefix,
            &cluster.tenants,
        );
        twins.push(Broker::start(&temp_config(&format!("cluster-twin-{port}"), &toml)).await);
    }
    // Both asked etcd for a lease while it hung; it answers both at once.
    cluster.etcd.thaw().unwrap();
    // (The twin that did not join knows no leader to send callers to:
    // `leader()`'s settled cluster never comes.)
    let urls: Vec<String> = twins.iter().map(Broker::url).collect();
    let mut events = cluster.feed_with(&twins.iter().collect::<Vec<_>>());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut first: Option<String> = None;
    let mut watch_until = deadline;
    // At every event until one leads, then for two lease TTLs more.
    loop {
        let mut leading = Vec::new();
        for url in &urls {
            if leads(url, "t0").await.is_ok() {
                leading.push(url.clone());
            }
        }
        assert!(leading.len() <= 1, "both b9s lead t0: {leading:?}");
        if first.is_none() {
            if let [one] = &leading[..] {
                first = Some(one.clone());
                watch_until = Instant::now() + Duration::from_millis(2 * TTL_MS);
            }
        }
        if !events.next_before(watch_until).await {
            break;
        }
    }
    let first = first.expect("one b9 leads t0 within 20 s");
    assert_eq!(
        leads(&first, "t0").await,
        Ok(()),
        "the leader stopped leading"
    );
    let mut logs = String::new();
    for twin in twins {
        logs.push_str(&twin.terminate().await.1);
    }
    assert!(
        logs.contains("another broker is a member as node \"b9\"")
            || logs.contains("changed while joining"),
        "{logs}"
    );
}

/// A single node of tenant `t0` on `etcd` under `prefix`, with `tls`
/// (lines of `[cluster]`: `etcd_ca = …`).
fn tls_node(etcd: &str, prefix: &str, tls: &str) -> PathBuf {
    let port = testsvc::free_port().unwrap();
    let toml = config("b1", port, etcd, prefix, &["t0".to_owned()]).replacen(
        "[[tenants]]",
        &format!("{tls}\n[[tenants]]"),
        1,
    );
    temp_config(&format!("cluster-tls-{port}"), &toml)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_leads_over_etcd_with_tls_and_client_certificates_and_refuses_an_unknown_etcd() {
    let pki = testpki::Pki::new("etcd-tls");
    let etcd = testsvc::Etcd::start_tls(testsvc::EtcdTls {
        cert: pki.path("server.pem"),
        key: pki.path("server.key"),
        client_ca: Some(pki.path("ca.pem")),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(etcd.url().starts_with("https://"), "{}", etcd.url());
    let files = |ca: &testpki::Pki| {
        format!(
            "etcd_ca = {:?}\netcd_cert = {:?}\netcd_key = {:?}",
            ca.arg("ca.pem"),
            pki.arg("client.pem"),
            pki.arg("client.key")
        )
    };
    // It trusts etcd's CA and presents a certificate etcd trusts: it leads
    // (etcd refuses a client without one, so leading shows it was sent).
    let good = Broker::start(&tls_node(&etcd.url(), "/qb-test-tls", &files(&pki))).await;
    // (No etcd watch over TLS: the one broker's log is what changes.)
    let feed = Feed::of([&good], None);
    assert_eq!(settled_leader(&feed, &[good.url()], "t0").await, good.url());
    let granted = client(&good.url())
        .acquire(rate_call("t0", "c", 0))
        .await
        .unwrap()
        .into_inner();
    assert!(granted.granted, "{granted:?}");
    // The same, but trusting another CA than the one that signed etcd's
    // certificate: it must not take that etcd's word for anything.
    let other = testpki::Pki::new("etcd-tls-other");
    let doubting =
        Broker::start(&tls_node(&etcd.url(), "/qb-test-tls-other", &files(&other))).await;
    // For two lease TTLs: at every line it logs, and at their end.
    let mut events = Feed::of([&doubting], None);
    let watch_until = Instant::now() + Duration::from_millis(2 * TTL_MS);
    loop {
        assert!(
            leads(&doubting.url(), "t0").await.is_err(),
            "a broker that does not trust etcd's certificate leads"
        );
        if !events.next_before(watch_until).await {
            break;
        }
    }
    let (_, log) = doubting.terminate().await;
    // The cause is named, not only "transport error".
    assert!(
        log.contains("cluster session failed") && log.contains("UnknownIssuer"),
        "{log}"
    );
    let (_, log) = good.terminate().await;
    assert!(!log.contains("cluster session failed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_with_etcd_hanging_waits_for_one_etcd_timeout_not_one_per_tenant() {
    let etcd = testsvc::Etcd::start().unwrap();
    let mut cluster = Cluster::start(etcd, "hanging", &["b1"], 10).await;
    let urls = cluster.urls();
    for t in cluster.tenants.clone() {
        leader(&cluster.feed(), &urls, &t).await;
    }
    // etcd hangs (a frozen host: nothing refused, nothing answered), and
    // the broker is told to stop before its keep-alive could notice.
    cluster.etcd.freeze().unwrap();
    let (status, log) = cluster.brokers.remove("b1").unwrap().terminate().await;
    cluster.etcd.thaw().unwrap();
    assert!(status.success(), "{log}");
    let failed = log.matches("hand-over at shutdown failed").count();
    // (None, if the freeze caught the session mid-call first: it then
    // stepped down from every tenant before the shutdown began.)
    let lapsed_first = failed == 0 && log.contains("cluster session failed");
    assert!(
        failed == 1 || lapsed_first,
        "one etcd timeout per tenant led: {log}"
    );
    assert!(lapsed_first || log.contains("tenants_left=9"), "{log}");
}

/// etcd hangs until no broker leads anything, and one broker (b3) hangs
/// with it; etcd answers again, then b3 comes back a moment after the
/// others: b3's tenants wait for it rather than going to b1 or b2 (and
/// moving back when b3 returns), and every tenant goes back to the broker
/// that led it, which resumes it as it left it (its grant count goes on;
/// a tenant another broker led in between is rebuilt in the restart
/// learning mode, its count from 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_etcd_hung_every_tenant_waits_for_its_leader_and_resumes_as_it_left_it() {
    let etcd = testsvc::Etcd::start().unwrap();
    let cluster = Cluster::start(etcd, "hung-rejoin", &["b1", "b2", "b3"], 9).await;
    let tenants = cluster.tenants.clone();
    let urls = cluster.urls();
    let mut before = HashMap::new();
    for t in &tenants {
        let url = settled_leader(&cluster.feed(), &urls, t).await;
        let granted = client(&url)
            .acquire(rate_call(t, "spender", 1_000))
            .await
            .unwrap()
            .into_inner()
            .granted;
        assert!(granted, "{t} at {url}");
        let count = bucket(&url, t, "rate").await.granted_total;
        before.insert(t.clone(), (url, count));
    }
    let b3 = cluster.brokers["b3"].url();
    let others: Vec<String> = urls.iter().filter(|u| **u != b3).cloned().collect();
    let of_b3: Vec<&String> = tenants.iter().filter(|t| before[*t].0 == b3).collect();
    assert!(!of_b3.is_empty(), "b3 leads none of {before:?}");
    let mut events = cluster.feed();
    let frozen_at = cluster.keys.seen();
    cluster.etcd.freeze().unwrap();
    cluster.brokers["b3"].signal("-STOP");
    let deadline = Instant::now() + Duration::from_secs(20);
    for u in &others {
        for t in &tenants {
            while leads(u, t).await.is_ok() {
                assert!(
                    events.next_before(deadline).await,
                    "{u} still leads {t} with etcd hung"
                );
            }
        }
    }
    let mut events = cluster.feed();
    cluster.etcd.thaw().unwrap();
    // Once a broker is back in the cluster (it leads one of its tenants
    // again), b3's tenants stay unled (its keys gone with its lease, no
    // broker leads them) while b3 is away: the members back wait for it for
    // two lease TTLs from their own return. b3 comes back at once after
    // that, within those TTLs; the other broker's return is not waited for
    // (under load it may come later than the first one's wait ends).
    let deadline = Instant::now() + Duration::from_secs(20);
    'back: loop {
        for t in tenants.iter().filter(|t| before[*t].0 != b3) {
            if leads(&before[t].0, t).await.is_ok() {
                break 'back;
            }
        }
        assert!(
            events.next_before(deadline).await,
            "no broker led its tenants again with etcd back"
        );
    }
    // b3's etcd lease, frozen with etcd, runs out after the thaw: etcd
    // deletes its keys (its member key and the leader keys of its
    // tenants). Until then no other broker leads b3's tenants (at every
    // event: a take-over is logged).
    let gone = |key: String| {
        let key = format!("{}/{key}", cluster.prefix);
        cluster.keys.deleted(frozen_at, &key)
    };
    loop {
        for t in &of_b3 {
            for u in &others {
                if leads(u, t).await.is_ok() {
                    panic!("{u} took {t} over while b3, its leader, was coming back");
                }
            }
        }
        if gone("members/b3".into()) && of_b3.iter().all(|t| gone(format!("leaders/{t}"))) {
            break;
        }
        assert!(
            events.next_before(deadline).await,
            "b3's etcd lease did not run out with etcd back"
        );
    }
    cluster.brokers["b3"].signal("-CONT");
    for t in &tenants {
        let (url, count) = &before[t];
        let after = settled_leader(&cluster.feed(), &urls, t).await;
        assert_eq!(&after, url, "{t} moved to another broker");
        let now = bucket(url, t, "rate").await.granted_total;
        assert!(
            now >= *count,
            "{t} was rebuilt at {url} (granted {now}, {count} before): another broker led it in between"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_no_broker_grants_past_its_lease_and_a_leader_returns_with_it() {
    let etcd = testsvc::Etcd::start().unwrap();
    let mut cluster = Cluster::start(etcd, "etcd-down", &["b1", "b2"], 1).await;
    let urls = cluster.urls();
    let first = settled_leader(&cluster.feed(), &urls, "t0").await;
    let grants = Grants::default();
    let spenders = Spenders::start(&urls, &grants, &cluster.feed());
    grants.until(&first, 5, Instant::now()).await;
    let mut events = cluster.feed();
    let stopped_at = Instant::now();
    cluster.etcd.stop();
    // Every broker must stop leading within the lease TTL and a second
    // more: poll them until none leads (then none can grant, etcd being
    // gone), failing at that deadline.
    let deadline = stopped_at + Duration::from_millis(TTL_MS + 1_000);
    let mut leading = urls.clone();
    loop {
        let mut still = Vec::new();
        for u in leading {
            if leads(&u, "t0").await.is_ok() {
                still.push(u);
            }
        }
        leading = still;
        if leading.is_empty() {
            break;
        }
        assert!(
            events.next_before(deadline).await,
            "{leading:?} still lead {TTL_MS} + 1000 ms after etcd stopped"
        );
    }
    let during: Vec<(Instant, String)> = grants
        .all()
        .iter()
        .filter(|(t, _)| *t > stopped_at)
        .cloned()
        .collect();
    let last = during.last().map(|(t, _)| *t - stopped_at);
    eprintln!(
        "etcd stopped: {} grants after, the last {last:?} after (lease TTL {TTL_MS} ms, margin {MARGIN_MS} ms)",
        during.len()
    );
    assert!(
        during
            .iter()
            .all(|(t, u)| *u == first && *t < stopped_at + Duration::from_millis(TTL_MS)),
        "grants past the lease: {during:?}"
    );
    for u in &urls {
        assert!(
            leads(u, "t0").await.is_err(),
            "{u} still leads without etcd"
        );
    }
    let resumed_at = Instant::now();
    let feed = cluster.feed();
    cluster.etcd.resume().unwrap();
    let again = leader(&feed, &urls, "t0").await;
    grants.until(&again, 1, resumed_at).await;
    let back = grants
        .all()
        .iter()
        .find(|(t, _)| *t > resumed_at)
        .map(|(t, _)| *t - resumed_at);
    eprintln!("etcd back: {again} leads, first grant {back:?} after");
    spenders.stop().await;
}

/// A spender on each broker of `urls`: Acquires of tenant t0's rate
/// bucket in a loop, each grant noted in `grants` (a caller sent away asks
/// again at the next event of `feed`), until [`Spenders::stop`].
struct Spenders {
    stop: tokio::sync::watch::Sender<bool>,
    load: Vec<tokio::task::JoinHandle<()>>,
}

impl Spenders {
    fn start(urls: &[String], grants: &Grants, feed: &Feed) -> Spenders {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let load = urls
            .iter()
            .map(|url| {
                let (url, grants) = (url.clone(), grants.clone());
                let (mut events, mut stopped) = (feed.fresh(), stopped.clone());
                tokio::spawn(async move {
                    while !*stopped.borrow() {
                        match client(&url).acquire(rate_call("t0", "spender", 100)).await {
                            Ok(r) if r.get_ref().granted => grants.push(&url),
                            Ok(_) => {}
                            Err(s) if away(&s) => tokio::select! {
                                () = events.next() => {}
                                _ = stopped.changed() => {}
                            },
                            Err(s) => panic!("{url}: {s}"),
                        }
                    }
                })
            })
            .collect();
        Spenders { stop, load }
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        for l in self.load {
            tokio::time::timeout(Duration::from_secs(30), l)
                .await
                .expect("load stops")
                .unwrap();
        }
    }
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

/// A session that fails after its etcd lease was granted (here every join:
/// an etcd that takes no transaction of two operations) joins on that same
/// lease at its next try, rather than leaving it to live out its TTL and
/// taking another each tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_fails_after_its_lease_was_granted_does_not_leak_leases() {
    let etcd = testsvc::Etcd::start_with_flags(&["--max-txn-ops=1"]).unwrap();
    let mut cluster = Cluster::start(etcd, "lease-leak", &[], 1).await;
    // At debug, each failed session is logged ("cluster session failed
    // again"), after etcd refused its join.
    let port = testsvc::free_port().unwrap();
    let toml = config(
        "b1",
        port,
        &cluster.etcd_url,
        &cluster.prefix,
        &cluster.tenants,
    );
    let b1 = Broker::start_logging(
        &temp_config(&format!("cluster-b1-{port}"), &toml),
        "info,quota_broker::cluster=debug",
    )
    .await;
    cluster.brokers.insert("b1".into(), b1);
    // Joins refused, one a session (a tick apart): wait for eight, more
    // than the sessions of one lease TTL.
    let refused = "grpc_server_handled_total{grpc_code=\"InvalidArgument\",\
                   grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"}";
    let mut events = cluster.feed();
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.etcd.metric(refused) < 8.0 {
        assert!(
            events.next_before(deadline).await,
            "fewer than 8 joins in 20 s"
        );
    }
    let leases = cluster.etcd.leases().unwrap();
    let (_, log) = cluster
        .brokers
        .into_values()
        .next()
        .unwrap()
        .terminate()
        .await;
    assert!(
        log.contains("too many operations in txn request"),
        "the joins failed otherwise: {log}"
    );
    assert_eq!(leases.len(), 1, "leases held: {leases:?}");
    // Stopped, it revokes the lease no session joined on (else it lived
    // out its TTL).
    let left = cluster.etcd.leases().unwrap();
    assert!(left.is_empty(), "leases left after the stop: {left:?}");
}

/// Node `node`'s config as [`config`] writes it, with its HTTP port on
/// `http` and `advertise` as its advertised URL.
fn config_advertising(
    node: &str,
    port: u16,
    http: u16,
    advertise: &str,
    cluster: &Cluster,
    tenants: &[String],
) -> String {
    config(node, port, &cluster.etcd_url, &cluster.prefix, tenants)
        .replacen(
            "http_listen = \"\"",
            &format!("http_listen = \"127.0.0.1:{http}\""),
            1,
        )
        .replacen(
            &format!("advertise = \"http://127.0.0.1:{port}\""),
            &format!("advertise = \"{advertise}\""),
            1,
        )
}

/// A broker whose `cluster.advertise` names a port where nothing answers
/// (the user trial: 40099 advertised, 40052 listened on) says so at ERROR,
/// naming the setting, the URL and what the dial got, once, and its
/// /readyz says it after "ready"; when the port comes up (a proxy started
/// late, forwarding to it) it says it reaches it and is ready. A broker
/// advertising its own port says it reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_advertise_is_said_until_it_reaches_the_broker() {
    let etcd = testsvc::Etcd::start().unwrap();
    let cluster = Cluster::start(etcd, "advertise", &["b1"], 2).await;
    cluster.brokers["b1"]
        .until_logged("cluster.advertise reaches a broker")
        .await;
    let port = testsvc::free_port().unwrap();
    let http = testsvc::free_port().unwrap();
    let nowhere = testsvc::free_port().unwrap();
    let wrong = format!("http://127.0.0.1:{nowhere}");
    let toml = config_advertising("b2", port, http, &wrong, &cluster, &cluster.tenants);
    let b2 = Broker::start(&temp_config(&format!("cluster-b2-{port}"), &toml)).await;
    b2.until_logged("does not reach this broker").await;
    let log = b2.logged();
    let line = log
        .lines()
        .find(|l| l.contains("does not reach this broker"))
        .unwrap();
    for said in [
        "ERROR",
        "cluster.advertise",
        wrong.as_str(),
        "callers redirected here cannot reach it",
    ] {
        assert!(line.contains(said), "{said:?} not in: {line}");
    }
    assert!(line.to_lowercase().contains("connection refused"), "{line}");
    // Set before it is logged: /readyz says it already, still ready (gRPC
    // health follows /readyz, and clients that reach b2 by their own list
    // of URLs are served).
    let http_addr = std::net::SocketAddr::from(([127, 0, 0, 1], http));
    let ready = crate::observe::get(http_addr, "/readyz", &[]).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert!(
        ready.body.starts_with("ready, but cluster.advertise")
            && ready.body.contains(&wrong)
            && ready
                .body
                .contains("callers redirected here cannot reach it"),
        "{}",
        ready.body
    );
    assert!(
        ready.body.to_lowercase().contains("connection refused"),
        "{}",
        ready.body
    );

    // The port comes up: a proxy to b2's gRPC port.
    let proxy = tokio::net::TcpListener::bind(("127.0.0.1", nowhere))
        .await
        .unwrap();
    let target = b2.addr.clone();
    let forward = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = proxy.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    b2.until_logged("cluster.advertise reaches this broker now")
        .await;
    let ready = crate::observe::get(http_addr, "/readyz", &[]).await;
    assert_eq!((ready.status, &ready.body[..]), (200, "ready\n"));
    // Leading was never held up: b2 leads what it is preferred for (b1
    // sends its callers to the advertised URL, the proxy).
    let urls = vec![cluster.brokers["b1"].url(), wrong.clone()];
    for t in &cluster.tenants {
        leader(&cluster.feed_with(&[&b2]), &urls, t).await;
    }
    forward.abort();
    let (_, log) = b2.terminate().await;
    // Checked every 2 s; said once (at most once a minute).
    assert_eq!(
        log.matches("does not reach this broker").count(),
        1,
        "{log}"
    );

    // A member advertising b1's URL: b1 answers b3's check, but not for
    // b3's own health name, so b3 says another quota-broker is there; and
    // the members' keys say it, on both.
    let port = testsvc::free_port().unwrap();
    let http = testsvc::free_port().unwrap();
    let b1 = cluster.brokers["b1"].url();
    let toml = config_advertising("b3", port, http, &b1, &cluster, &cluster.tenants);
    let b3 = Broker::start(&temp_config(&format!("cluster-b3-{port}"), &toml)).await;
    b3.until_logged("another quota-broker answers there, not this one")
        .await;
    let line = b3
        .logged()
        .lines()
        .find(|l| l.contains("another quota-broker answers there"))
        .unwrap()
        .to_owned();
    assert!(line.contains("ERROR") && line.contains(&b1), "{line}");
    let shared = |of: &str| format!("member {of} advertises this broker's cluster.advertise");
    cluster.brokers["b1"].until_logged(&shared("b3")).await;
    b3.until_logged(&shared("b1")).await;
}

/// A member whose buckets differ from this broker's for a tenant (10 times
/// the permits) is warned of by both, naming the member, the tenant and
/// what differs, once; a tenant configured alike is not named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_another_config_for_a_tenant_is_warned_of_once() {
    let etcd = testsvc::Etcd::start().unwrap();
    let mut cluster = Cluster::start(etcd, "drift", &["b1"], 2).await;
    let port = testsvc::free_port().unwrap();
    // t0's rate bucket: 100 permits a second, not 10 (the first tenant's
    // block comes first).
    let toml = config(
        "b2",
        port,
        &cluster.etcd_url,
        &cluster.prefix,
        &cluster.tenants,
    )
    .replacen("permits = 10\n", "permits = 100\n", 1);
    assert!(toml.contains("permits = 100\n"));
    let b2 = Broker::start(&temp_config(&format!("cluster-b2-{port}"), &toml)).await;
    let said = |of: &str| {
        format!(
            "member {of} serves tenant t0 with another config than this broker's: buckets \
             differ; every member should have the same [[tenants]]"
        )
    };
    let b1 = &cluster.brokers["b1"];
    b1.until_logged(&said("b2")).await;
    b2.until_logged(&said("b1")).await;
    // Ticks later (each tenant's leader the same for a second), still
    // said once.
    let urls = vec![b1.url(), b2.url()];
    for t in &cluster.tenants {
        settled_leader(&cluster.feed_with(&[&b2]), &urls, t).await;
    }
    let (_, log2) = b2.terminate().await;
    let log1 = cluster.brokers.remove("b1").unwrap().terminate().await.1;
    for (log, of) in [(&log1, "b2"), (&log2, "b1")] {
        assert_eq!(log.matches(&said(of)).count(), 1, "{log}");
        assert!(!log.contains("tenant t1 with another config"), "{log}");
        assert!(!log.contains("serves other tenants"), "{log}");
    }
}

/// Over TLS the check dials the `https://` URL (the certificate is not
/// verified: what the clients trust is not in the broker's config) and
/// reaches the broker; under mutual TLS a port that asks for a client
/// certificate is as far as it can check, and it says so rather than
/// calling the URL wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_advertise_is_checked_over_tls_as_far_as_mutual_tls_lets_it() {
    let pki = testpki::Pki::new("cluster-advertise-tls");
    let etcd = testsvc::Etcd::start().unwrap();
    let tenants = vec!["t0".to_owned()];
    let mut brokers = Vec::new();
    for (node, mutual) in [("b1", false), ("b2", true)] {
        let port = testsvc::free_port().unwrap();
        let client_ca = if mutual {
            format!("client_ca = {:?}\n", pki.arg("ca.pem"))
        } else {
            String::new()
        };
        let toml = config(node, port, &etcd.url(), "/qb-test-advertise-tls", &tenants)
            .replacen("advertise = \"http://", "advertise = \"https://", 1)
            .replacen(
                "[cluster]",
                &format!(
                    "[server.tls]\ncert = {:?}\nkey = {:?}\n{client_ca}[cluster]",
                    pki.arg("server.pem"),
                    pki.arg("server.key")
                ),
                1,
            );
        let path = temp_config(&format!("cluster-advertise-tls-{port}"), &toml);
        brokers.push(Broker::start(&path).await);
    }
    brokers[0]
        .until_logged(
            "cluster.advertise reaches a broker: a health check of quota.v1.QuotaBroker there \
             answers SERVING",
        )
        .await;
    brokers[1]
        .until_logged(
            "cluster.advertise reaches a broker: its TLS port asks for a client certificate",
        )
        .await;
    for b in brokers {
        let (_, log) = b.terminate().await;
        assert!(!log.contains("does not reach this broker"), "{log}");
    }
}
