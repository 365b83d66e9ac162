//! Cluster take-over after `kill -9`, measured: etcd (installed and started
//! on 127.0.0.1) and three broker processes in cluster mode (lease TTL 2 s,
//! margin 0.5 s); a client spends the tenant's rate bucket through whichever
//! broker leads; the leader is killed, the time until the next grant by the
//! new leader is recorded, the killed broker is started again (under a new
//! node name: a new member), and again.
//! Prints one table: take-over p50 / p99 / max, and the grants made after
//! the killed leader exited by any broker but the new leader (must be 0).
//!
//! `cargo bench --bench takeover` (ROUNDS=N to change the 10 rounds).

#[path = "../tests/it/child.rs"]
#[allow(dead_code)]
mod child;

use child::{temp_config, Broker};
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{AcquireRequest, ReportRequest};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;

const TTL_MS: u64 = 2_000;
const MARGIN_MS: u64 = 500;

fn config(node: &str, port: u16, etcd: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
http_listen = ""
state_dir = ""
[cluster]
etcd = ["{etcd}"]
node = "{node}"
advertise = "http://127.0.0.1:{port}"
prefix = "/qb-takeover-bench"
lease_ttl_ms = {TTL_MS}
safety_margin_ms = {MARGIN_MS}
[[tenants]]
id = "t0"
[[tenants.buckets]]
name = "rate"
routes = ["* /**"]
permits = 200
window_ms = 1000
burst = 10
"#
    )
}

fn client(url: &str) -> QuotaBrokerClient<Channel> {
    QuotaBrokerClient::new(Channel::from_shared(url.to_owned()).unwrap().connect_lazy())
}

/// Whether `url` leads t0 now.
async fn leads(url: &str) -> bool {
    let report = ReportRequest {
        tenant: "t0".into(),
        method: "GET".into(),
        path: "/x".into(),
        http_status: 200,
        ..Default::default()
    };
    client(url).report(report).await.is_ok()
}

/// The broker every other one agrees leads t0, twice 500 ms apart.
async fn settled(urls: &[String]) -> String {
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut leading = Vec::new();
        for u in urls {
            if leads(u).await {
                leading.push(u.clone());
            }
        }
        assert!(leading.len() <= 1, "two leaders at once: {leading:?}");
        if leading.len() == 1 && leading[0] == last {
            return last;
        }
        last = leading.pop().unwrap_or_default();
        assert!(Instant::now() < deadline, "no settled leader in 30 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("takeover: benchmark");
        return;
    }
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    let etcd = testsvc::Etcd::start().expect("etcd");
    let mut nodes: Vec<(String, u16)> = (1..=3)
        .map(|i| (format!("b{i}"), testsvc::free_port().unwrap()))
        .collect();
    let start = |(name, port): &(String, u16)| {
        let path = temp_config(
            &format!("takeover-{name}"),
            &config(name, *port, &etcd.url()),
        );
        async move { Broker::start(&path).await }
    };
    let mut brokers = Vec::new();
    for n in &nodes {
        brokers.push(Some(start(n).await));
    }
    let urls: Vec<String> = nodes
        .iter()
        .map(|(_, p)| format!("http://127.0.0.1:{p}"))
        .collect();
    let grants = Arc::new(Mutex::new(Vec::<(Instant, String)>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // One spender per broker, each asking only its own broker: a grant by a
    // broker that should not lead would show.
    let mut load = Vec::new();
    for url in urls.clone() {
        let (grants, stop) = (grants.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let req = AcquireRequest {
                tenant: "t0".into(),
                client_id: "spender".into(),
                priority_class: "critical".into(),
                method: "GET".into(),
                path: "/x".into(),
                max_wait_ms: Some(50),
                ..Default::default()
            };
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client(&url).acquire(req.clone()).await {
                    Ok(r) if r.get_ref().granted => {
                        grants.lock().unwrap().push((Instant::now(), url.clone()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }));
    }
    let mut takeovers = Vec::new();
    let mut gap_grants = 0;
    for round in 0..rounds {
        let leader = settled(&urls).await;
        let i = urls.iter().position(|u| *u == leader).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let killed_at = Instant::now();
        brokers[i].take().unwrap().kill().await;
        let exited = Instant::now();
        let first = loop {
            let seen = grants.lock().unwrap().clone();
            if let Some((t, u)) = seen.iter().find(|(t, u)| *t > killed_at && *u != leader) {
                // Anyone but the new leader granting once the old one is
                // dead would be a second leader.
                gap_grants += seen.iter().filter(|(g, by)| *g > exited && by != u).count();
                break (*t - killed_at, u.clone());
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(30),
                "round {round}: no take-over in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        eprintln!(
            "round {round}: {} killed, {} granted {:?} later",
            nodes[i].0, first.1, first.0
        );
        takeovers.push(first.0);
        // Started again under a new name, as a new member: one back under
        // its old name would get its tenants back only after a hold-down
        // (doubled at each return), and the next round would find the
        // leader moving.
        let base = nodes[i].0.split('-').next().unwrap_or("b").to_owned();
        nodes[i].0 = format!("{base}-r{}", round + 1);
        brokers[i] = Some(start(&nodes[i]).await);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        let _ = l.await;
    }
    takeovers.sort();
    println!("\ncluster take-over after kill -9 (3 brokers, lease TTL {TTL_MS} ms, margin {MARGIN_MS} ms)");
    println!("| rounds | p50 | p99 | max | grants by another broker |");
    println!("|---|---|---|---|---|");
    println!(
        "| {} | {} ms | {} ms | {} ms | {} |",
        takeovers.len(),
        percentile(&takeovers, 0.5).as_millis(),
        percentile(&takeovers, 0.99).as_millis(),
        takeovers.last().map_or(0, |d| d.as_millis()),
        gap_grants
    );
}
