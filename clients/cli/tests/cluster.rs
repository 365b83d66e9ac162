//! `quotactl` against a cluster: a real etcd on 127.0.0.1 (installed and
//! started by `testsvc`) and two brokers in process. A command for one
//! tenant given a follower (or a dead address) first reaches the leader;
//! `status` and `watch` over every tenant merge what every broker leads;
//! errors name every broker tried. Every wait is bounded in time.

use quota_broker::hash_token;
use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::ListBucketsRequest;
use quota_broker::{Embedded, Settings};
use serde_json::Value;
use std::collections::BTreeSet;
use std::process::{Output, Stdio};
use std::time::Duration;
use tokio::process::Command;
use tokio::time::{timeout, Instant};

const ADMIN: &str = "secret-ops";
/// Bound on any one quotactl run.
const LIMIT: Duration = Duration::from_secs(30);
const TENANTS: [&str; 4] = ["t0", "t1", "t2", "t3"];

/// Node `node` of the cluster under `prefix`, advertised at `url`: tenants
/// t0..t3, each with one rate bucket "rate" (60 per minute); an admin
/// token.
fn config(node: &str, url: &str, etcd: &str, prefix: &str) -> String {
    let mut toml = format!(
        r#"[server]
state_dir = ""
http_listen = ""
shutdown_grace_ms = 500
[cluster]
etcd = ["{etcd}"]
node = "{node}"
advertise = "{url}"
prefix = "{prefix}"
lease_ttl_ms = 2000
safety_margin_ms = 500
[[auth.tokens]]
name = "ops"
sha256 = "{admin}"
role = "admin"
tenants = ["*"]
"#,
        admin = hash_token(ADMIN),
    );
    for t in TENANTS {
        toml.push_str(&format!(
            r#"[[tenants]]
id = "{t}"
[[tenants.buckets]]
name = "rate"
routes = ["* /**"]
permits = 60
window_ms = 60000
"#
        ));
    }
    toml
}

/// An etcd and two brokers of one cluster.
struct Cluster {
    brokers: Vec<Embedded>,
    etcd: testsvc::Etcd,
}

impl Cluster {
    /// Starts etcd and brokers b1 and b2 under a prefix of this test's own.
    async fn start(name: &str) -> Cluster {
        let etcd = tokio::task::spawn_blocking(testsvc::Etcd::start)
            .await
            .unwrap()
            .expect("etcd starts");
        let prefix = format!("/qb-cli-test-{name}");
        let mut brokers = Vec::new();
        for node in ["b1", "b2"] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let settings = Settings::from_toml(&config(node, &url, &etcd.url(), &prefix))
                .expect("test config is valid");
            let broker = Embedded::spawn(listener, settings).unwrap();
            assert!(broker.started().await, "the broker started");
            brokers.push(broker);
        }
        Cluster { brokers, etcd }
    }

    fn urls(&self) -> Vec<String> {
        self.brokers.iter().map(Embedded::url).collect()
    }

    /// Waits (at most 20 s) until every tenant has one leader that every
    /// broker agrees on, the same a second later; returns each tenant's.
    /// Polled: the brokers say who leads only when asked, and the answer
    /// settles on etcd's clock (leases run in real time), not the test's.
    async fn settled(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last: Option<Vec<String>> = None;
        loop {
            let mut now = Vec::new();
            for t in TENANTS {
                match leader(&self.urls(), t).await {
                    Some(l) => now.push(l),
                    None => break,
                }
            }
            if now.len() == TENANTS.len() && last.as_ref() == Some(&now) {
                return now;
            }
            assert!(Instant::now() < deadline, "no settled leaders within 20 s");
            let settled = now.len() == TENANTS.len();
            last = settled.then_some(now);
            let pause = if settled { 1000 } else { 100 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    async fn stop(mut self) {
        for b in self.brokers.drain(..) {
            let _ = timeout(Duration::from_secs(10), b.stop()).await;
        }
    }
}

/// The one broker of `urls` that serves `tenant` if every other one names
/// it as the leader.
async fn leader(urls: &[String], tenant: &str) -> Option<String> {
    let mut leading = Vec::new();
    let mut named = Vec::new();
    for url in urls {
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .ok()?;
        let mut req = tonic::Request::new(ListBucketsRequest {
            tenant: tenant.into(),
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
        match QuotaAdminClient::new(channel).list_buckets(req).await {
            Ok(_) => leading.push(url.clone()),
            Err(s) if s.code() == tonic::Code::Unavailable => named.push(
                s.metadata()
                    .get(quota_broker::LEADER_METADATA)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            ),
            Err(s) => panic!("{url}: {s}"),
        }
    }
    match &leading[..] {
        [one] if named.iter().all(|n| n.as_deref() == Some(one.as_str())) => Some(one.clone()),
        _ => None,
    }
}

/// quotactl with `args` against `brokers` (comma-joined), with the admin
/// token, isolated from the caller's environment.
fn command<S: AsRef<str>>(brokers: &[S], args: &[&str]) -> Command {
    let brokers: Vec<&str> = brokers.iter().map(AsRef::as_ref).collect();
    let mut c = Command::new(env!("CARGO_BIN_EXE_quotactl"));
    c.arg("--broker")
        .arg(brokers.join(","))
        .arg("--token")
        .arg(ADMIN)
        .args(args)
        .env_remove("QUOTA_BROKER_URL")
        .env_remove("QUOTA_BROKER_TOKEN")
        .env_remove("QUOTA_BROKER_TENANT")
        .env_remove("QUOTA_BROKER_CA_CERT")
        .env_remove("QUOTA_BROKER_CLIENT_CERT")
        .env_remove("QUOTA_BROKER_CLIENT_KEY")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// [`command`] run to its end within [`LIMIT`].
async fn quotactl(brokers: &[&str], args: &[&str]) -> Output {
    timeout(LIMIT, command(brokers, args).output())
        .await
        .expect("quotactl finished in time")
        .expect("quotactl started")
}

/// [`command`] started with its output piped (a `watch`, read as it goes).
fn spawn_piped(brokers: &[String], args: &[&str]) -> tokio::process::Child {
    command(brokers, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("quotactl started")
}

/// Runs quotactl, asserts success with nothing on stderr, returns stdout as JSON.
async fn ok_json(brokers: &[&str], args: &[&str]) -> Value {
    let out = quotactl(brokers, args).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.is_empty(),
        "quotactl {brokers:?} {args:?}: {:?}: {err}",
        out.status
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// The tenants of a JSON array of bucket states, each bucket at most once.
fn tenants_of(buckets: &Value) -> BTreeSet<String> {
    let list = buckets.as_array().expect("an array");
    let keys: BTreeSet<(String, String)> = list
        .iter()
        .map(|b| {
            (
                b["tenant"].as_str().unwrap().into(),
                b["bucket"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(keys.len(), list.len(), "a bucket shown twice: {buckets}");
    keys.into_iter().map(|(t, _)| t).collect()
}

/// An address where nothing listens (a port that was just free).
fn dead_url() -> String {
    format!("http://127.0.0.1:{}", testsvc::free_port().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_commands_reach_the_leader_from_a_follower_or_a_dead_address() {
    let cluster = Cluster::start("follow").await;
    let leaders = cluster.settled().await;
    let urls = cluster.urls();
    let leader = leaders[0].clone();
    let follower = urls.iter().find(|u| **u != leader).unwrap().clone();

    // The follower first: it names the leader, the change is made there.
    let set = ok_json(
        &[&follower, &leader],
        &[
            "bucket",
            "set-limit",
            "--tenant",
            "t0",
            "rate",
            "--permits",
            "45",
            "--json",
        ],
    )
    .await;
    assert_eq!(set["tenant"], "t0");
    assert_eq!(set["configured_rate_per_min"], 45.0);
    // Visible from the follower alone (it sends quotactl to the leader).
    let status = ok_json(&[&follower], &["status", "--tenant", "t0", "--json"]).await;
    assert_eq!(status[0]["bucket"], "rate");
    assert_eq!(status[0]["configured_rate_per_min"], 45.0);
    // And on the leader itself.
    let status = ok_json(&[&leader], &["status", "--tenant", "t0", "--json"]).await;
    assert_eq!(status[0]["configured_rate_per_min"], 45.0);

    // A dead address first: the next one given, then its leader.
    let dead = dead_url();
    let paused = ok_json(
        &[&dead, &follower],
        &[
            "pause", "--tenant", "t0", "rate", "--reason", "test", "--json",
        ],
    )
    .await;
    assert_eq!(paused["paused"], true);
    let resumed = ok_json(
        &[&dead, &follower],
        &["resume", "--tenant", "t0", "rate", "--json"],
    )
    .await;
    assert_eq!(resumed["paused"], false);

    // A tenant not configured is the broker's answer, not a hop.
    let out = quotactl(&[&follower, &leader], &["status", "--tenant", "nope"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("quotactl: NOT_FOUND: "), "{err}");
    cluster.stop().await;
}

/// `watch --tenant` follows its tenant when its leader stops: the new
/// leader's snapshot follows the old one's, with a note on stderr, and the
/// stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_of_a_tenant_follows_it_to_its_next_leader() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    let mut cluster = Cluster::start("follow").await;
    let leaders = cluster.settled().await;
    let urls = cluster.urls();
    let (tenant, first) = (TENANTS[0], leaders[0].clone());
    let other = urls.iter().find(|u| **u != first).unwrap().clone();
    let mut child = spawn_piped(
        &urls,
        &["watch", "--tenant", tenant, "--json", "--count", "2"],
    );
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut line = async || -> Value {
        let l = timeout(LIMIT, out.next_line())
            .await
            .expect("a line within 30 s")
            .unwrap()
            .expect("quotactl went on");
        serde_json::from_str(&l).unwrap()
    };
    assert_eq!(line().await["tenant"], tenant);
    let stopping = cluster
        .brokers
        .iter()
        .position(|b| b.url() == first)
        .unwrap();
    cluster.brokers.remove(stopping).stop().await.unwrap();
    assert_eq!(line().await["tenant"], tenant);
    let status = timeout(LIMIT, child.wait()).await.unwrap().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    assert!(status.success(), "{err}");
    assert!(
        err.starts_with(&format!(
            "quotactl: the Watch of tenant \"{tenant}\" on {first} ended ("
        )) && err
            .trim_end()
            .ends_with(&format!("; following it on {other}")),
        "{err}"
    );
    cluster.stop().await;
}

/// `watch --tenant` whose leader's lead runs out with etcd hung, so that
/// no broker leads the tenant, says at once that it is looking for its
/// leader (the figures on screen are from before), not only once found;
/// with etcd back it follows the tenant to its leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_of_a_tenant_says_at_once_that_no_broker_leads_it_for_now() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let cluster = Cluster::start("looking").await;
    let leaders = cluster.settled().await;
    let urls = cluster.urls();
    let (tenant, first) = (TENANTS[0], leaders[0].clone());
    let mut child = spawn_piped(
        &urls,
        &["watch", "--tenant", tenant, "--json", "--count", "2"],
    );
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut line = async || -> Value {
        let l = timeout(LIMIT, out.next_line())
            .await
            .expect("a line within 30 s")
            .unwrap()
            .expect("quotactl went on");
        serde_json::from_str(&l).unwrap()
    };
    assert_eq!(line().await["tenant"], tenant);
    // The leader's lead runs out (2 s) and no broker can take it over.
    cluster.etcd.freeze().unwrap();
    let note = timeout(LIMIT, err.next_line()).await;
    cluster.etcd.thaw().unwrap();
    let note = note
        .expect("a note on stderr within 30 s")
        .unwrap()
        .expect("quotactl went on");
    assert!(
        note.starts_with(&format!(
            "quotactl: the Watch of tenant \"{tenant}\" on {first} ended ("
        )) && note
            .contains("looking for its leader for up to 30 s (the figures shown are from before)"),
        "{note}"
    );
    assert_eq!(line().await["tenant"], tenant);
    let status = timeout(LIMIT, child.wait()).await.unwrap().unwrap();
    let mut rest = Vec::new();
    while let Ok(Some(l)) = err.next_line().await {
        rest.push(l);
    }
    assert!(status.success(), "{rest:?}");
    assert!(
        rest.last()
            .is_some_and(|l| l.contains("; following it on ")),
        "{rest:?}"
    );
    cluster.stop().await;
}

/// `watch` over every tenant whose one broker stops goes on with the
/// other's stream, tries the stopped one again, and watches it again once
/// it is back (before, it never did: a broker that restarted and led
/// tenants again was left out for the rest of the watch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_of_every_tenant_watches_a_restarted_broker_again() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut cluster = Cluster::start("reopen").await;
    cluster.settled().await;
    let urls = cluster.urls();
    let mut child = spawn_piped(&urls, &["watch", "--json"]);
    // Both streams are open before the first update is printed; then read
    // on, so quotactl never blocks on a full pipe.
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    timeout(LIMIT, out.next_line())
        .await
        .expect("an update within 30 s")
        .unwrap()
        .expect("quotactl went on");
    let reading = tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut note = async || -> String {
        timeout(LIMIT, err.next_line())
            .await
            .expect("a note on stderr within 30 s")
            .unwrap()
            .expect("quotactl went on")
    };
    let stopped = cluster.brokers.remove(0);
    let url = stopped.url();
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    stopped.stop().await.unwrap();
    let ended = note().await;
    assert!(
        ended.starts_with(&format!("quotactl: {url}: the Watch ended ("))
            && ended.ends_with("watching the other brokers, and this one again once it answers"),
        "{ended}"
    );
    // The same broker again, on its address.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let settings = Settings::from_toml(&config(
        "b1",
        &url,
        &cluster.etcd.url(),
        "/qb-cli-test-reopen",
    ))
    .expect("test config is valid");
    let again = Embedded::spawn(listener, settings).unwrap();
    assert!(again.started().await, "the broker started again");
    cluster.brokers.push(again);
    // (Tries while it was down are not noted.)
    assert_eq!(note().await, format!("quotactl: {url}: watching it again"));
    child.kill().await.unwrap();
    reading.abort();
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_watch_without_a_tenant_merge_every_broker() {
    let cluster = Cluster::start("merge").await;
    let leaders = cluster.settled().await;
    let urls = cluster.urls();
    let all: BTreeSet<String> = TENANTS.iter().map(|t| t.to_string()).collect();

    // Each broker alone: the tenants it leads.
    for url in &urls {
        let mine: BTreeSet<String> = TENANTS
            .iter()
            .zip(&leaders)
            .filter(|(_, l)| *l == url)
            .map(|(t, _)| t.to_string())
            .collect();
        if mine.is_empty() {
            // A member that leads nothing, asked alone: said, exit 1.
            let out = quotactl(&[url], &["status", "--json"]).await;
            assert_eq!(out.status.code(), Some(1));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("the broker given leads no tenant right now"),
                "{err}"
            );
            continue;
        }
        let shown = ok_json(&[url], &["status", "--json"]).await;
        assert_eq!(tenants_of(&shown), mine, "{url}");
    }
    // Both: every tenant, each bucket once.
    let both = [urls[0].as_str(), urls[1].as_str()];
    let shown = ok_json(&both, &["status", "--json"]).await;
    assert_eq!(tenants_of(&shown), all);

    // Watch: the snapshot of both brokers is one update per bucket.
    let count = TENANTS.len().to_string();
    let out = quotactl(&both, &["watch", "--json", "--count", &count]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(tenants_of(&Value::Array(lines)), all);

    // One broker away: what the others show, the missing one named, exit 1.
    let dead = dead_url();
    let out = quotactl(&[&urls[0], &dead], &["status", "--json"]).await;
    assert_eq!(out.status.code(), Some(1));
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(tenants_of(&shown).is_subset(&all));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        [
            format!("quotactl: {dead}: unreachable: connection refused"),
            "quotactl: 1 of 2 brokers did not answer (see above); the output lacks the tenants they lead, if they still lead any"
                .to_owned(),
        ],
        "{err}"
    );

    // etcd gone: once no broker leads anything, status says so, exit 1
    // (not an empty table and 0).
    let mut cluster = cluster;
    cluster.etcd.stop();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = quotactl(&both, &["status"]).await;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if err.contains("none of the 2 brokers given leads a tenant right now") {
            assert_eq!(out.status.code(), Some(1), "{err}");
            let shown = String::from_utf8_lossy(&out.stdout);
            assert!(shown.is_empty(), "an empty table before the error: {shown}");
            break;
        }
        assert!(Instant::now() < deadline, "status still says {err:?}");
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_brokers_are_named_in_one_line() {
    // The only address given: the same error as ever.
    let dead = dead_url();
    let out = quotactl(&[&dead], &["resume", "--tenant", "t0", "rate"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("quotactl: cannot reach the broker at {dead}: connection refused\n")
    );
    // Several: every one tried, in order.
    let other = dead_url();
    let out = quotactl(&[&dead, &other], &["resume", "--tenant", "t0", "rate"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "quotactl: no broker served tenant \"t0\"; tried {dead} (unreachable: connection refused), \
             {other} (unreachable: connection refused)\n"
        )
    );
    let out = quotactl(&[&dead, &other], &["status"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "quotactl: no broker answered; tried {dead} (unreachable: connection refused), \
             {other} (unreachable: connection refused)\n"
        )
    );
}

/// A broker whose host hangs (its port accepts connections, nothing is
/// ever answered) given first is passed over within seconds: a command for
/// one tenant reaches the leader through the next broker given, and
/// `status` over every tenant shows what the others lead and names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_broker_given_first_is_passed_over() {
    let cluster = Cluster::start("hung").await;
    cluster.settled().await;
    let urls = cluster.urls();
    // Never accepted: the kernel completes the handshakes, as for a process
    // that is stopped.
    let hung_socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung = format!("http://{}", hung_socket.local_addr().unwrap());

    let started = Instant::now();
    let paused = ok_json(
        &[&hung, &urls[0]],
        &[
            "pause", "--tenant", "t1", "rate", "--reason", "test", "--json",
        ],
    )
    .await;
    assert_eq!(paused["paused"], true);
    let out = quotactl(&[&hung, &urls[0], &urls[1]], &["status", "--json"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!("quotactl: {hung}: connection lost")),
        "{err}"
    );
    let buckets: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(tenants_of(&buckets), TENANTS.map(String::from).into());
    // Both within what a call may take (30 s), and far from it.
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
    drop(hung_socket);
    cluster.stop().await;
}
