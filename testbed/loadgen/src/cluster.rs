//! `loadgen cluster`: the scale-out figure. For each broker count (1, 2, 3
//! by default) a fresh etcd (testsvc's, on loopback) and that many
//! `quota-broker` child processes in cluster mode share `--tenants`
//! tenants (1,000 by default; rendezvous hashing spreads the leaders), and
//! closed-loop Acquire→Release pairs go to every tenant in turn through
//! the client crate: one `BrokerClient` per tenant (an integration serves
//! one org), each given every broker's URL, so it follows its tenant's
//! leader. Pairs/s counts granted pairs (a lease from the client's local
//! fallback counts as an error), over the measured window; CPU is read
//! from `/proc` around the window: the brokers' (summed), loadgen's own,
//! and the whole machine's busy share (etcd and everything else included).
//!
//! Before measuring, the cluster must be settled: every tenant led by
//! exactly one broker (each broker's `ListBuckets` with no tenant names
//! the tenants it leads), unchanged for two cluster ticks, then one pair
//! per tenant so every client has found its leader. A tenant's new leader
//! counts its concurrency slots as held for one lease TTL (its restart
//! learning mode), so the generated buckets' lease TTL is 1 s here.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::ListBucketsRequest;
use quota_broker_client::{BrokerClient, Call};
use tonic::transport::Endpoint;

use crate::brokerconf::{BrokerConfig, ClusterNode};
use crate::child::{Child, Program};
use crate::drive::{Tally, Window};
use crate::error::Error;
use crate::parse_secs;
use crate::peer::cpu_time;
use crate::server::READY_TIMEOUT;

/// The concurrency bucket's lease TTL, ms: a tenant taken over grants
/// again after it (the restart learning mode holds every slot that long).
const SLOT_TTL_MS: u64 = 1_000;
/// Longest wait for every tenant to have one settled leader.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Flags of `loadgen cluster`.
#[derive(Args, Debug)]
pub(crate) struct ClusterArgs {
    /// Broker counts to measure, in order; the first is the ratios' base.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    brokers: Vec<usize>,
    /// Tenants `t0…`, shared by the brokers (one client per tenant).
    #[arg(long, default_value_t = 1000, value_parser = crate::at_least_one)]
    tenants: usize,
    /// Pairs in flight in total (closed loops, each over every tenant in
    /// turn).
    #[arg(long, default_value_t = 64, value_parser = crate::at_least_one)]
    concurrency: usize,
    /// Measured seconds per broker count [default: 5, --quick 0.5].
    #[arg(long, value_parser = parse_secs)]
    duration: Option<Duration>,
    /// Warm-up seconds per broker count [default: 1, --quick 0.2].
    #[arg(long, value_parser = parse_secs)]
    warmup: Option<Duration>,
    /// Each broker's etcd lease TTL, ms (whole seconds, at least 2000).
    #[arg(long, default_value_t = 5000)]
    lease_ttl_ms: u64,
    /// A tiny run (tests): 1 and 2 brokers, 20 tenants, 0.5 s.
    #[arg(long)]
    quick: bool,
    /// The quota-broker binary [default: next to loadgen's own executable].
    #[arg(long, value_name = "PATH")]
    broker_bin: Option<PathBuf>,
    /// Also print the rows as JSON lines.
    #[arg(long)]
    json: bool,
}

/// One broker count's figures.
#[derive(Debug)]
struct Row {
    brokers: usize,
    pairs_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
    /// Tenants each broker led while measured.
    led: Vec<usize>,
    /// CPU seconds per second of the window: brokers (summed), loadgen.
    brokers_cpu: Option<f64>,
    loadgen_cpu: Option<f64>,
    /// Busy share of all the machine's cores over the window.
    machine_busy: Option<f64>,
}

/// Runs every broker count and prints the table.
pub(crate) async fn run(args: ClusterArgs) -> Result<(), Error> {
    let bin = match &args.broker_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()
            .map_err(Error::io("find loadgen's own path"))?
            .with_file_name(format!("quota-broker{}", std::env::consts::EXE_SUFFIX)),
    };
    if !bin.is_file() {
        return Err(Error::MissingBinary(bin));
    }
    let (counts, tenants, duration, warmup) = if args.quick {
        (vec![1, 2], 20, 0.5, 0.2)
    } else {
        (args.brokers.clone(), args.tenants, 5.0, 1.0)
    };
    let duration = args.duration.unwrap_or(Duration::from_secs_f64(duration));
    let warmup = args.warmup.unwrap_or(Duration::from_secs_f64(warmup));
    let tenants = tenants.max(1);
    eprintln!(
        "loadgen cluster: brokers {counts:?}, {tenants} tenants (one client each, all broker \
         URLs), {} pairs in flight, {warmup:?} warm-up + {duration:?} per run, etcd lease TTL \
         {} ms, {} cores",
        args.concurrency.max(1),
        args.lease_ttl_ms,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut rows = Vec::new();
    for &n in &counts {
        let row = measure(&bin, n.max(1), tenants, &args, warmup, duration).await?;
        eprintln!(
            "loadgen cluster: {} broker(s): {:.0} pairs/s, tenants led {:?}",
            row.brokers, row.pairs_per_sec, row.led
        );
        rows.push(row);
    }
    print(&rows, tenants);
    if args.json {
        outln!();
        print_json(&rows);
    }
    Ok(())
}

/// One broker count: etcd, the brokers, settle, drive, stop.
async fn measure(
    bin: &std::path::Path,
    n: usize,
    tenants: usize,
    args: &ClusterArgs,
    warmup: Duration,
    duration: Duration,
) -> Result<Row, Error> {
    let etcd = tokio::task::spawn_blocking(testsvc::Etcd::start)
        .await
        .map_err(Error::Task)?
        .map_err(|e| Error::Cluster(format!("etcd did not start: {e}")))?;
    // A take-over counts every slot as held for one lease TTL (the restart
    // learning mode): a short TTL, not the 10 minutes held-lease runs need.
    let config = BrokerConfig {
        lease_ttl_ms: SLOT_TTL_MS,
        ..BrokerConfig::new(tenants, 1)
    };
    let mut nodes = Vec::new();
    for i in 0..n {
        let node = ClusterNode {
            etcd: etcd.url(),
            node: format!("b{}", i + 1),
            lease_ttl_ms: args.lease_ttl_ms,
        };
        let program = Program::Broker {
            bin,
            config,
            cluster: Some(&node),
        };
        nodes.push(Child::spawn(&format!("cluster{n}-b{}", i + 1), program, READY_TIMEOUT).await?);
    }
    let addrs: Vec<SocketAddr> = nodes.iter().map(Child::addr).collect();
    let led = settle(&addrs, tenants, Duration::from_millis(args.lease_ttl_ms)).await?;
    let urls = addrs
        .iter()
        .map(|a| format!("http://{a}"))
        .collect::<Vec<_>>()
        .join(",");
    let ids = config.tenant_ids();
    let mut clients = Vec::with_capacity(ids.len());
    for t in &ids {
        clients.push((
            BrokerClient::connect(&urls, None).map_err(|e| Error::Cluster(e.to_string()))?,
            Call::new(t.clone(), "GET", "/api/v2/users")
                .client_id("loadgen")
                .class("critical")
                .max_wait(Duration::from_millis(100)),
        ));
    }
    let clients = Arc::new(clients);
    // Every client finds its tenant's leader (and connects) before timing.
    for ((client, call), tenant) in clients.iter().zip(&ids) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while let Err(why) = try_pair(client, call).await {
            if Instant::now() >= deadline {
                return Err(Error::Cluster(format!(
                    "no lease for {tenant} through {urls}: {why}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let pids: Vec<u32> = nodes.iter().map(Child::pid).collect();
    let start = Instant::now();
    let window = Window {
        start,
        measure_from: start + warmup,
        end: start + warmup + duration,
    };
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(window.measure_from.into()).await;
        let from = Cpu::read(&pids);
        tokio::time::sleep_until(window.end.into()).await;
        let to = Cpu::read(&pids);
        (from, to)
    });
    let loops = args.concurrency.max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..loops {
        let clients = clients.clone();
        tasks.spawn(async move {
            let mut tally = Tally::new();
            let mut next = i % clients.len();
            loop {
                let begin = Instant::now();
                if begin >= window.end {
                    break;
                }
                let (client, call) = &clients[next];
                next = (next + loops) % clients.len();
                let ok = pair(client, call).await;
                tally.record(&window, begin, ok);
            }
            tally
        });
    }
    let mut tally = Tally::new();
    while let Some(t) = tasks.join_next().await {
        tally.merge(&t.map_err(Error::Task)?)?;
    }
    let (from, to) = cpu.await.map_err(Error::Task)?;
    let secs = duration.as_secs_f64();
    let row = Row {
        brokers: n,
        pairs_per_sec: tally.pairs as f64 / secs.max(f64::MIN_POSITIVE),
        p50_us: tally.hist.value_at_quantile(0.50),
        p99_us: tally.hist.value_at_quantile(0.99),
        errors: tally.errors,
        led,
        brokers_cpu: from.brokers.zip(to.brokers).map(|(a, b)| (b - a) / secs),
        loadgen_cpu: from.loadgen.zip(to.loadgen).map(|(a, b)| (b - a) / secs),
        machine_busy: from.machine.zip(to.machine).map(|((b0, t0), (b1, t1))| {
            let total = t1.saturating_sub(t0).max(1);
            b1.saturating_sub(b0) as f64 / total as f64
        }),
    };
    drop(clients);
    for node in nodes {
        node.kill().await;
    }
    let _ = tokio::task::spawn_blocking(move || drop(etcd)).await;
    Ok(row)
}

/// One Acquire→Release pair; true if a broker granted it.
async fn pair(client: &BrokerClient, call: &Call) -> bool {
    try_pair(client, call).await.is_ok()
}

/// One Acquire→Release pair; why not, if a broker did not grant it.
async fn try_pair(client: &BrokerClient, call: &Call) -> Result<(), String> {
    match client.acquire(call).await {
        Ok(lease) if !lease.is_fallback() => {
            lease.release().await;
            Ok(())
        }
        // A fallback lease is not the broker's: not a pair.
        Ok(_) => Err("a lease from the client's local fallback".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Waits until every tenant is led by exactly one broker and the split has
/// not changed for two cluster ticks; the number each broker leads.
async fn settle(addrs: &[SocketAddr], tenants: usize, ttl: Duration) -> Result<Vec<usize>, Error> {
    let mut admins = Vec::new();
    for a in addrs {
        let endpoint = Endpoint::from_shared(format!("http://{a}"))
            .map_err(Error::Transport)?
            .timeout(Duration::from_secs(5));
        admins.push(QuotaAdminClient::new(endpoint.connect_lazy()));
    }
    // A tick is a fifth of the TTL, at most a second.
    let stable_for = (ttl / 5).min(Duration::from_secs(1)) * 2 + Duration::from_millis(200);
    let started = Instant::now();
    let mut last: Option<(Vec<BTreeSet<String>>, Instant)> = None;
    loop {
        let mut sets = Vec::new();
        for admin in &mut admins {
            let led: BTreeSet<String> = match admin
                .list_buckets(ListBucketsRequest {
                    tenant: String::new(),
                })
                .await
            {
                Ok(r) => r
                    .into_inner()
                    .buckets
                    .into_iter()
                    .map(|b| b.tenant)
                    .collect(),
                Err(_) => BTreeSet::new(),
            };
            sets.push(led);
        }
        let total: usize = sets.iter().map(BTreeSet::len).sum();
        let union: BTreeSet<&String> = sets.iter().flatten().collect();
        let complete = total == tenants && union.len() == tenants;
        let now = Instant::now();
        match &last {
            Some((prev, since)) if complete && *prev == sets => {
                if now.duration_since(*since) >= stable_for {
                    return Ok(sets.iter().map(BTreeSet::len).collect());
                }
            }
            _ if complete => last = Some((sets, now)),
            _ => last = None,
        }
        if started.elapsed() >= SETTLE_TIMEOUT {
            return Err(Error::Cluster(format!(
                "the tenants' leaders did not settle within {SETTLE_TIMEOUT:?} \
                 ({total} of {tenants} led)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// CPU readings at one moment.
struct Cpu {
    /// The brokers' user + system seconds, summed.
    brokers: Option<f64>,
    /// loadgen's own.
    loadgen: Option<f64>,
    /// The machine's (busy, total) jiffies from /proc/stat.
    machine: Option<(u64, u64)>,
}

impl Cpu {
    fn read(pids: &[u32]) -> Cpu {
        let brokers = pids
            .iter()
            .map(|&p| cpu_time(p).map(|d| d.as_secs_f64()))
            .sum::<Option<f64>>();
        Cpu {
            brokers,
            loadgen: cpu_time(std::process::id()).map(|d| d.as_secs_f64()),
            machine: machine_jiffies(),
        }
    }
}

/// (busy, total) jiffies of all cores, from the `cpu` line of /proc/stat.
fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_line(stat.lines().next()?)
}

/// (busy, total) of a `/proc/stat` `cpu` line: idle and iowait are not busy.
fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest counted in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Prints the table: one row per broker count.
fn print(rows: &[Row], tenants: usize) {
    let base = rows.first().map_or(0.0, |r| r.pairs_per_sec);
    let cores = |v: Option<f64>| v.map_or("n/a".into(), |c| format!("{c:.2}"));
    outln!(
        "| brokers | pairs/s | vs {} broker(s) | p50 ms | p99 ms | errors | brokers CPU (cores) | loadgen CPU (cores) | machine busy | tenants led per broker ({tenants}) |",
        rows.first().map_or(1, |r| r.brokers)
    );
    outln!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        outln!(
            "| {} | {:.0} | {:.2}× | {:.3} | {:.3} | {} | {} | {} | {} | {} |",
            r.brokers,
            r.pairs_per_sec,
            r.pairs_per_sec / base.max(f64::MIN_POSITIVE),
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.errors,
            cores(r.brokers_cpu),
            cores(r.loadgen_cpu),
            r.machine_busy
                .map_or("n/a".into(), |b| format!("{:.0}%", 100.0 * b)),
            r.led
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
}

/// Prints the rows as JSON lines.
fn print_json(rows: &[Row]) {
    let base = rows.first().map_or(0.0, |r| r.pairs_per_sec);
    let num = |v: Option<f64>| v.map_or("null".into(), |v| format!("{v:.3}"));
    for r in rows {
        outln!(
            "{{\"brokers\":{},\"pairs_per_sec\":{:.1},\"ratio\":{:.3},\"p50_us\":{},\"p99_us\":{},\
             \"errors\":{},\"brokers_cpu_cores\":{},\"loadgen_cpu_cores\":{},\"machine_busy\":{},\
             \"tenants_led\":[{}]}}",
            r.brokers,
            r.pairs_per_sec,
            r.pairs_per_sec / base.max(f64::MIN_POSITIVE),
            r.p50_us,
            r.p99_us,
            r.errors,
            num(r.brokers_cpu),
            num(r.loadgen_cpu),
            num(r.machine_busy),
            r.led
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_machines_cpu_line() {
        let line = "cpu  100 5 50 800 20 3 2 0 0 0";
        assert_eq!(parse_cpu_line(line), Some((160, 980)));
        assert_eq!(parse_cpu_line("cpu0 1 2 3 4"), None);
        assert!(machine_jiffies().is_some());
    }
}
