//! Cluster mode against a real etcd (installed and started by the test on
//! 127.0.0.1) and three broker processes: a leader killed with SIGKILL under
//! load is replaced, and across the hand-over no window grants more than the
//! bucket allows and no more slots are held than the limit; learned state
//! and operators' changes reach the new leader; a joining broker takes only
//! its share of tenants; without etcd no broker grants past its margin, and
//! with etcd back a leader is elected again.

mod advertise;
mod etcd_members;
mod etcd_outage;
mod etcd_tls;
mod handover;
mod members;

use crate::child::{temp_config, Broker};
use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{AcquireRequest, ListBucketsRequest, QuotaStatus, ReportRequest};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;

pub(super) const TTL_MS: u64 = 2_000;
pub(super) const MARGIN_MS: u64 = 500;

/// Node `node` of a cluster on `etcd` under `prefix`, serving `tenants`
/// (each: 10 permits per second, burst 5; 3 slots; and a slow bucket of 1
/// per second, burst 20).
pub(super) fn config(
    node: &str,
    port: u16,
    etcd: &str,
    prefix: &str,
    tenants: &[String],
) -> String {
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

pub(super) struct Cluster {
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
pub(super) struct EtcdKeys {
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
pub(super) struct Feed {
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

pub(super) fn client(url: &str) -> QuotaBrokerClient<Channel> {
    QuotaBrokerClient::new(Channel::from_shared(url.to_owned()).unwrap().connect_lazy())
}

pub(super) fn rate_call(tenant: &str, client: &str, max_wait_ms: u64) -> AcquireRequest {
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

/// Who leads `tenant` as `url` sees it: `Ok(())` it does; `Err(Some(u))`
/// it says `u` does; `Err(None)` it does not know (or did not answer).
pub(super) async fn leads(url: &str, tenant: &str) -> Result<(), Option<String>> {
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
pub(super) struct Grants(Arc<(Mutex<Vec<Grant>>, tokio::sync::Notify)>);

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
pub(super) async fn leader(feed: &Feed, urls: &[String], tenant: &str) -> String {
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
pub(super) async fn settled_leader(feed: &Feed, urls: &[String], tenant: &str) -> String {
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
pub(super) async fn bucket(url: &str, tenant: &str, name: &str) -> QuotaStatus {
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
pub(super) fn away(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable || std::error::Error::source(s).is_some()
}

/// A spender on each broker of `urls`: Acquires of tenant t0's rate
/// bucket in a loop, each grant noted in `grants` (a caller sent away asks
/// again at the next event of `feed`), until [`Spenders::stop`].
pub(super) struct Spenders {
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
