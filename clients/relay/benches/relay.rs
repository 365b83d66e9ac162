//! The relay's figures against gcsim (a hidden limit below the documented
//! one, an unmanaged consumer) and a real broker, the relay binary as a
//! child process on a SQLite queue:
//!
//! 1. **burst**: 15 trunks post wrap-up records at `--rate` records/s in
//!    all for `--secs` real seconds (open loop: each post is sent on its
//!    tick whatever the previous one is doing) while the upstream (gcsim
//!    at 10×, so the burst spans five windows) throttles; intake latency
//!    percentiles, records drained per window against what the upstream
//!    leaves the fleet, upstream 429 ratio.
//! 2. **kill**: a burst at gcsim 60× (a window per real second), the relay
//!    SIGKILLed halfway and restarted on its file, the flows re-posting
//!    what was not acknowledged; acknowledged records lost, records the
//!    upstream stored twice.
//! 3. **queue**: the SQLite queue alone (no relay) with a backlog of
//!    `--rows` records written straight into it: what one claim (run by
//!    the drain every 100 ms while records wait), one `/status` (the same
//!    as a `/metrics` scrape) and the writer's first commit cost, median
//!    and worst of several runs; and writes one after another for 3 s,
//!    across the queue's recounts of its depth (once a second).
//!
//! `cargo bench -p gc-relay --bench relay -- [--secs 30] [--rate 500]
//! [--rows 100000,1000000] [--phase burst|kill|queue]` (every phase when
//! none is named)

#[path = "../tests/it/common.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hdrhistogram::Histogram;
use serde_json::Value;

const TRUNKS: usize = 15;
/// Phase 1's writes family: documented 300 a minute, 240 enforced, 60 of
/// them the unmanaged consumer's: 180 a minute left to the fleet.
const HIDDEN: u64 = 240;
const UNMANAGED: u64 = 60;
/// Phase 1's gcsim time scale: a window is 6 real seconds, so the burst
/// spans whole windows and the drain rate is not one window's head start.
const SCALE: f64 = 10.0;
/// How long the queue phase writes one record after another, across the
/// queue's recounts.
const ACROSS_RECOUNTS: Duration = Duration::from_secs(3);

struct Args {
    secs: u64,
    rate: u64,
    kill_records: usize,
    rows: Vec<u64>,
    phases: Vec<String>,
}

impl Args {
    fn runs(&self, phase: &str) -> bool {
        self.phases.is_empty() || self.phases.iter().any(|p| p == phase)
    }
}

fn args() -> Args {
    let mut a = Args {
        secs: 30,
        rate: 500,
        kill_records: 3_000,
        rows: vec![100_000, 1_000_000],
        phases: Vec::new(),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().and_then(|v| v.parse::<u64>().ok());
        match flag.as_str() {
            "--secs" => a.secs = value().unwrap_or(a.secs),
            "--rate" => a.rate = value().unwrap_or(a.rate),
            "--kill-records" => a.kill_records = value().map_or(a.kill_records, |v| v as usize),
            "--rows" => {
                if let Some(rows) = it.next() {
                    a.rows = rows.split(',').filter_map(|n| n.parse().ok()).collect();
                }
            }
            "--phase" => a.phases.extend(it.next().cloned()),
            // cargo bench passes --bench.
            _ => {}
        }
    }
    a
}

fn main() {
    let args = args();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        println!("machine: {} cores, load average {}", cores(), load());
        if args.runs("burst") {
            burst(&args).await;
        }
        if args.runs("kill") {
            kill(&args).await;
        }
        if args.runs("queue") {
            queue(&args).await;
        }
    });
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

async fn status(url: &str) -> Value {
    reqwest::get(format!("{url}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn burst(args: &Args) {
    let dir = TempDir::new("bench");
    let sim = gcsim(sim_config(SCALE, HIDDEN, UNMANAGED)).await;
    let broker = broker((60_000.0 / SCALE) as u64).await;
    let child = Child::start(&serve_args(&dir.sqlite(), &sim, &broker.url)).await;
    let flow = Flow::new(&child.url);
    let latencies = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let refused = Arc::new(AtomicUsize::new(0));
    let per_trunk = Duration::from_secs_f64(TRUNKS as f64 / args.rate as f64);
    let end = tokio::time::Instant::now() + Duration::from_secs(args.secs);
    let started = Instant::now();
    let mut trunks = tokio::task::JoinSet::new();
    for t in 0..TRUNKS {
        let (flow, latencies, refused) = (flow.clone(), latencies.clone(), refused.clone());
        trunks.spawn(async move {
            let mut tick = tokio::time::interval(per_trunk);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut posts = tokio::task::JoinSet::new();
            let mut n = 0u64;
            while tokio::time::Instant::now() < end {
                tick.tick().await;
                let record = wrapup(&format!("t{t}-{n}"));
                n += 1;
                let (flow, latencies, refused) = (flow.clone(), latencies.clone(), refused.clone());
                posts.spawn(async move {
                    let sent = Instant::now();
                    let ok = matches!(flow.post(&record).await, Ok((202, _)));
                    let us = sent.elapsed().as_micros() as u64;
                    if ok {
                        let _ = latencies.lock().unwrap().record(us.max(1));
                    } else {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                });
                while posts.try_join_next().is_some() {}
            }
            while posts.join_next().await.is_some() {}
        });
    }
    while trunks.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let s = status(&child.url).await;
    let stats = sim_stats(&sim).await;
    let h = latencies.lock().unwrap().clone();
    let accepted = h.len();
    let delivered = s["queue"]["done"].as_i64().unwrap_or(0);
    let calls = s["upstream"]["calls"].as_u64().unwrap_or(0);
    let throttled = s["upstream"]["throttled_429"].as_u64().unwrap_or(0);
    // Per simulated minute (one window).
    let fleet_limit = (HIDDEN - UNMANAGED) as f64;
    let drained_per_min = delivered as f64 / (elapsed * SCALE / 60.0);
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!();
    println!("burst: {TRUNKS} trunks, {} records/s for {} real s, gcsim at x{SCALE}, writes documented {DOCUMENTED}/min, enforced {HIDDEN}/min, unmanaged {UNMANAGED}/min", args.rate, args.secs);
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| records accepted (202) | {accepted} ({:.0}/s) |",
        accepted as f64 / elapsed
    );
    println!(
        "| records refused or failed | {} |",
        refused.load(Ordering::Relaxed)
    );
    println!(
        "| intake p50 / p99 / max | {:.2} / {:.2} / {:.2} ms |",
        ms(0.5),
        ms(0.99),
        h.max() as f64 / 1000.0
    );
    println!("| drained | {delivered} in {:.0} simulated s = {drained_per_min:.1}/min (the upstream leaves the fleet {fleet_limit:.0}/min) |", elapsed * SCALE);
    println!(
        "| upstream calls / 429s | {calls} / {throttled} ({:.2}%) |",
        100.0 * throttled as f64 / calls.max(1) as f64
    );
    println!(
        "| gcsim refused (fleet, by reason) | {} |",
        stats["refused_by_reason"]
    );
    println!(
        "| queue left | {} records, oldest {:.1} s |",
        s["queue"]["records"],
        s["queue"]["oldest_age_s"].as_f64().unwrap_or(0.0)
    );
    child.kill9().await;
    broker.stop().await;
    sim.shutdown().await;
}

async fn kill(args: &Args) {
    let dir = TempDir::new("bench-kill");
    let sim = gcsim(sim_config(60.0, 100, 20)).await;
    let broker = broker(1_000).await;
    let serve = serve_args(&dir.sqlite(), &sim, &broker.url);
    let total = args.kill_records;
    let before = burst_and_kill(Child::start(&serve).await, total, 32, total / 2).await;
    let child = Child::start(&serve).await;
    repost_and_drain(&child.url, total, &before).await;
    let w = writes(&sim).await;
    let lost = before.iter().filter(|c| !w.contains_key(*c)).count();
    let twice = w.values().filter(|&&n| n > 1).count();
    println!();
    println!("kill -9: {total} records posted by 32 flows, the relay SIGKILLed after {} acknowledged, restarted on its SQLite file", before.len());
    println!("| figure | value |");
    println!("|---|---|");
    println!("| acknowledged before the kill | {} |", before.len());
    println!("| acknowledged records lost | {lost} |");
    println!("| records written twice upstream | {twice} |");
    println!("| records written upstream | {} of {total} |", w.len());
    child.kill9().await;
    broker.stop().await;
    sim.shutdown().await;
}

/// A backlog the queue phase measures.
#[derive(Clone, Copy)]
enum Backlog {
    /// Every record due, each its own order key (the upstream was down,
    /// nothing tried yet).
    Due,
    /// Every record waiting for its retry (a throttled upstream's backoff).
    BackedOff,
    /// Every record behind one of 100 dead letters heading its order key.
    Blocked,
    /// 1,000 due records of 100 order keys whose history holds the rest of
    /// the rows, delivered (a day of deliveries kept).
    History,
}

impl Backlog {
    fn name(self) -> &'static str {
        match self {
            Backlog::Due => "all due, own keys",
            Backlog::BackedOff => "all backed off",
            Backlog::Blocked => "behind 100 dead letters",
            Backlog::History => "1k due, 100 keys, rest delivered",
        }
    }
}

async fn queue(args: &Args) {
    println!();
    println!("queue: SQLite, backlog written straight into the file; claim = 16 records (the drain's default concurrency)");
    println!("| rows | backlog | fill s | open ms, first / later p50 | claim p50 / max ms (claimed) | /status p50 / max ms | first write p50 / max ms | later write p50 ms | writes over {} s p50 / max ms (writes) |", ACROSS_RECOUNTS.as_secs());
    println!("|---|---|---|---|---|---|---|---|---|");
    for &rows in &args.rows {
        for backlog in [
            Backlog::Due,
            Backlog::BackedOff,
            Backlog::Blocked,
            Backlog::History,
        ] {
            queue_case(rows, backlog).await;
        }
    }
}

/// Milliseconds of `runs` runs of `f`: (median, worst, what the last
/// returned).
async fn time_runs<T, F, Fut>(runs: usize, mut f: F) -> (f64, f64, T)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut ms = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        last = Some(f().await);
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms[ms.len() - 1], last.unwrap())
}

async fn queue_case(rows: u64, backlog: Backlog) {
    use gc_relay::{Limits, NewRecord, Queue};
    let dir = TempDir::new("bench-queue");
    let url = dir.sqlite();
    let limits = Limits {
        max_records: u64::MAX,
        max_bytes: u64::MAX,
    };
    // Creates the tables.
    drop(Queue::open(&url, limits).await.unwrap());
    let filled = Instant::now();
    fill(&url, rows, backlog).await;
    let fill_s = filled.elapsed().as_secs_f64();
    let record = |n: u64| NewRecord {
        key: format!("new-{n}"),
        order_key: format!("new-{n}"),
        method: "POST".into(),
        path: "/api/v2/x".into(),
        body: None,
    };
    // The writer counts the queue at its first commit (then at most once a
    // second): a fresh handle per run.
    let mut n = 0;
    let mut firsts = Vec::new();
    // The first open after the fill sets the queue right (see
    // `hold_sqlite`); the later ones find it so.
    let mut opens = Vec::new();
    for _ in 0..5 {
        n += 1;
        let opening = Instant::now();
        let q = Queue::open(&url, limits).await.unwrap();
        opens.push(opening.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        q.enqueue(record(n)).await.unwrap();
        firsts.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    firsts.sort_by(f64::total_cmp);
    let mut later_opens = opens[1..].to_vec();
    later_opens.sort_by(f64::total_cmp);
    let q = Queue::open(&url, limits).await.unwrap();
    n += 1;
    q.enqueue(record(n)).await.unwrap();
    let (later, _, _) = time_runs(20, || {
        n += 1;
        q.enqueue(record(n))
    })
    .await;
    // Writes one after another for a few seconds, across the queue's
    // recounts (one a second): the worst is what a recount costs intake.
    let across = Queue::open(&url, limits).await.unwrap();
    let mut across_ms = Vec::new();
    let until = Instant::now() + ACROSS_RECOUNTS;
    while Instant::now() < until {
        n += 1;
        let started = Instant::now();
        across.enqueue(record(n)).await.unwrap();
        across_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    drop(across);
    across_ms.sort_by(f64::total_cmp);
    let (status_p50, status_max, _) = time_runs(5, || q.depth()).await;
    let (claim_p50, claim_max, claimed) =
        time_runs(10, || q.claim("bench", 16, Duration::from_secs(600))).await;
    let claimed = claimed.map(|c| c.len()).unwrap_or(0);
    println!(
        "| {rows} | {} | {fill_s:.1} | {:.0} / {:.0} | {claim_p50:.1} / {claim_max:.1} ({claimed}) | {status_p50:.1} / {status_max:.1} | {:.1} / {:.1} | {later:.1} | {:.1} / {:.1} ({}) |",
        backlog.name(),
        opens[0],
        later_opens[later_opens.len() / 2],
        firsts[firsts.len() / 2],
        firsts[firsts.len() - 1],
        across_ms[across_ms.len() / 2],
        across_ms[across_ms.len() - 1],
        across_ms.len(),
    );
}

/// Writes `rows` records of `backlog` into the SQLite queue at `url` in one
/// statement (the queue's writer would take minutes).
async fn fill(url: &str, rows: u64, backlog: Backlog) {
    let pool = sqlx::SqlitePool::connect(url).await.unwrap();
    let now = gc_relay::now_ms();
    // (order key, state, not_before_ms, done_ms) of record n.
    let (order, state, not_before, done) = match backlog {
        Backlog::Due => ("'c' || n", "'pending'", "?1 - ?2 + n", "NULL"),
        Backlog::BackedOff => ("'c' || n", "'pending'", "?1 + 3600000", "NULL"),
        Backlog::Blocked => ("'agent-' || (n % 100)", "'pending'", "?1 - ?2 + n", "NULL"),
        Backlog::History => (
            "'agent-' || (n % 100)",
            "CASE WHEN n > ?2 - 1000 THEN 'pending' ELSE 'done' END",
            "?1 - ?2 + n",
            "CASE WHEN n > ?2 - 1000 THEN NULL ELSE ?1 - ?2 + n END",
        ),
    };
    let sql = format!(
        "INSERT INTO relay_records (idem_key, order_key, method, path, body, bytes, state, \
           received_ms, not_before_ms, done_ms) \
         WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < ?2) \
         SELECT 'k' || n, {order}, 'POST', \
           '/api/v2/conversations/calls/c' || n || '/participants/p1/communications/m1/wrapup', \
           '{{\"code\":\"resolved\",\"notes\":\"bench\"}}', 120, {state}, ?1 - ?2 + n, \
           {not_before}, {done} FROM c"
    );
    sqlx::query(&sql)
        .bind(now)
        .bind(rows as i64)
        .execute(&pool)
        .await
        .unwrap();
    if let Backlog::Blocked = backlog {
        // The first record of each order key refused for good.
        sqlx::query("UPDATE relay_records SET state = 'dead' WHERE id <= 100")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO relay_dead_letters (record_id, status, answer, dead_ms) \
             SELECT id, 400, 'bench', ? FROM relay_records WHERE state = 'dead'",
        )
        .bind(now)
        .execute(&pool)
        .await
        .unwrap();
    }
    pool.close().await;
}
