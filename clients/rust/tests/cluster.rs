//! The client against a cluster of three in-process brokers on a real etcd
//! (installed and started by the test on 127.0.0.1): given any one broker it
//! finds the tenant's leader; given all three it keeps leasing while the
//! leader shuts down, without an error reaching the caller.

use quota_broker::{Embedded, Settings};
use quota_broker_client::{BrokerClient, Call};
use std::time::Duration;
use tokio::time::Instant;

async fn node(etcd: &str, name: &str, prefix: &str) -> Embedded {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let toml = format!(
        r#"[server]
state_dir = ""
http_listen = ""
shutdown_grace_ms = 1000
[cluster]
etcd = ["{etcd}"]
node = "{name}"
advertise = "http://{addr}"
prefix = "{prefix}"
lease_ttl_ms = 2000
safety_margin_ms = 500
[[tenants]]
id = "t"
[[tenants.buckets]]
name = "org"
routes = ["* /**"]
permits = 100
window_ms = 1000
burst = 20
"#
    );
    let broker = Embedded::spawn(listener, Settings::from_toml(&toml).unwrap()).unwrap();
    assert!(broker.started().await, "the broker started");
    broker
}

fn call() -> Call {
    Call::new("t", "GET", "/api/v2/users/me")
        .client_id("c")
        .class("critical")
}

/// Counts the changes etcd reports of the cluster's leader and member keys
/// under `prefix` (a tenant taken over or handed over, a broker joining or
/// leaving), from now on; the watch ends when its closer closes it, or
/// with etcd.
fn key_changes(
    etcd: &testsvc::Etcd,
    prefix: &str,
) -> (tokio::sync::watch::Receiver<u64>, testsvc::WatchCloser) {
    let w = etcd
        .watch(&format!("{prefix}/"))
        .unwrap_or_else(|e| panic!("{e}"));
    let closer = w.closer().unwrap_or_else(|e| panic!("{e}"));
    let (tx, rx) = tokio::sync::watch::channel(0);
    let wanted = [format!("{prefix}/leaders/"), format!("{prefix}/members/")];
    std::thread::spawn(move || {
        for changes in w {
            if changes
                .iter()
                .any(|c| wanted.iter().any(|w| c.key.starts_with(w.as_str())))
            {
                tx.send_modify(|n| *n += 1);
            }
        }
    });
    (rx, closer)
}

/// Leases until one comes from a broker (not the fallback); its URL.
async fn leased_by_broker(client: &BrokerClient) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lease = client.acquire(&call()).await.unwrap();
        if !lease.is_fallback() {
            return client.current_url();
        }
        assert!(Instant::now() < deadline, "no broker granted within 20 s");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_follows_the_leader_and_rides_out_a_hand_over() {
    let etcd = testsvc::Etcd::start().unwrap();
    let prefix = "/qb-client-test";
    let (mut changes, watch) = key_changes(&etcd, prefix);
    let mut nodes = Vec::new();
    for name in ["b1", "b2", "b3"] {
        nodes.push(node(&etcd.url(), name, prefix).await);
    }
    let urls: Vec<String> = nodes.iter().map(Embedded::url).collect();
    let all = BrokerClient::connect(&urls.join(","), None).unwrap();
    // Settled: the same leader after a second in which etcd reported no
    // change of the leader and member keys (a broker that just joined may
    // take the tenant on its next tick: etcd reports it).
    let mut leader = leased_by_broker(&all).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no settled leader within 20 s");
        let quiet = match tokio::time::timeout(Duration::from_secs(1), changes.changed()).await {
            Ok(watching) => {
                watching.expect("etcd's watch goes on");
                false
            }
            Err(_) => true,
        };
        let now = leased_by_broker(&all).await;
        if quiet && now == leader {
            break;
        }
        leader = now;
    }
    // A client given only a follower finds the leader by itself.
    let follower = urls.iter().find(|u| **u != leader).unwrap();
    let one = BrokerClient::connect(follower, None).unwrap();
    assert_eq!(leased_by_broker(&one).await, leader);

    // The leader shuts down (hands the tenant over) while the client leases.
    let i = urls.iter().position(|u| *u == leader).unwrap();
    let stopping = nodes.remove(i);
    let lessee = all.clone();
    // (broker leases, fallback leases) so far; the load runs until told.
    let (count, mut counted) = tokio::sync::watch::channel((0u64, 0u64));
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(async move {
        while !*stopped.borrow_and_update() {
            // Every call answers: granted by a broker, or by the fallback
            // while no broker leads.
            let lease = lessee
                .acquire(&call())
                .await
                .expect("no error reaches the caller");
            count.send_modify(|(broker, fallback)| {
                *if lease.is_fallback() {
                    fallback
                } else {
                    broker
                } += 1
            });
            let report = lease.report(200, &http::HeaderMap::new()).await;
            assert!(report.is_ok(), "{report:?}");
        }
    });
    let bound = Duration::from_secs(30);
    let leases = |n: u64| move |c: &(u64, u64)| c.0 >= n;
    tokio::time::timeout(bound, counted.wait_for(leases(50)))
        .await
        .expect("50 leases before the hand-over")
        .unwrap();
    stopping.stop().await.unwrap();
    let at_stop = counted.borrow().0;
    // 50 more broker leases: from the new leader.
    tokio::time::timeout(bound, counted.wait_for(leases(at_stop + 50)))
        .await
        .expect("50 leases from the new leader")
        .unwrap();
    stop.send(true).unwrap();
    load.await.unwrap();
    let (broker, fallback) = *counted.borrow();
    let next = leased_by_broker(&all).await;
    assert_ne!(next, leader, "the stopped broker cannot lead");
    eprintln!("hand-over: {broker} broker leases, {fallback} fallback leases, now led by {next}");
    for n in nodes {
        n.stop().await.unwrap();
    }
    watch.close();
}
