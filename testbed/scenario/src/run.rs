//! One mode, start to finish: a fresh simulator (and broker), the fleet
//! on a clock aligned to the simulator's, then the simulator's own
//! accounting read back and turned into the mode's figures.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Serialize;
use tokio::time::Instant;

use crate::chaos::{self, ChaosResult};
use crate::children::{BrokerServer, Simulator, WorkDir};
use crate::cli::{BrokerSource, ModeName, Spec};
use crate::clock::SimClock;
use crate::cluster::{self, BrokerCluster, ClusterResult};
use crate::confgen::{Plan, ANALYTICS, ORG, WRITES};
use crate::error::Error;
use crate::fleet::{self, FleetOutcome};
use crate::ingest::GcIngest;
use crate::measure::{
    self, Convergence, Counters, Goodput, LimitCheck, Metrics, Records, WaitStats,
};
use crate::modes::Ctx;
use crate::relay::RelayServer;
use crate::trace::{Sample, Tracer};
use crate::upstream::{SimStats, Upstream, WindowStats};

/// Upstream requests of one family, client side.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct RequestCount {
    /// Sent.
    pub(crate) sent: u64,
    /// Answered 429.
    pub(crate) refused: u64,
    /// Failed otherwise.
    pub(crate) errors: u64,
}

impl From<&Counters> for RequestCount {
    fn from(c: &Counters) -> Self {
        RequestCount {
            sent: c.sent.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }
}

/// Every upstream request of the fleet.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Requests {
    /// All families, client side.
    pub(crate) sent: u64,
    /// 429s, client side.
    pub(crate) refused: u64,
    /// refused / sent.
    pub(crate) ratio: f64,
    /// Analytics queries.
    pub(crate) analytics: RequestCount,
    /// Writes.
    pub(crate) writes: RequestCount,
    /// The simulator's count of fleet requests (Σ over tokens).
    pub(crate) sim_total: u64,
    /// The simulator's count of fleet refusals (Σ over tokens).
    pub(crate) sim_refused: u64,
    /// The simulator's refusals by reason (the unmanaged consumer's included).
    pub(crate) sim_refused_by_reason: BTreeMap<String, u64>,
}

/// Broker mode's lease counters.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct LeaseCounts {
    /// Leases granted.
    pub(crate) granted: u64,
    /// Acquires answered "not granted" (asked again).
    pub(crate) not_granted: u64,
    /// Leases from the client's local fallback.
    pub(crate) fallback: u64,
    /// Reports the broker refused.
    pub(crate) report_errors: u64,
}

/// Both kinds of records.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct AllRecords {
    /// Ingested conversations.
    pub(crate) ingest: Records,
    /// Wrap-up writes.
    pub(crate) writes: Records,
}

/// What one mode measured.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ModeResult {
    /// Which mode.
    pub(crate) mode: ModeName,
    /// Real seconds it took, start of the simulator to the end of the drain.
    pub(crate) real_s: f64,
    /// Simulated time the fleet started (the simulator started at 0).
    pub(crate) started_ms: f64,
    /// Upstream requests and 429s.
    pub(crate) requests: Requests,
    /// Analytics goodput over the whole windows.
    pub(crate) analytics: Goodput,
    /// Writes goodput over the whole windows (demand-bound: the trunks ask
    /// for less than the family allows).
    pub(crate) writes: Goodput,
    /// Wait per class, simulated ms.
    pub(crate) wait: BTreeMap<&'static str, WaitStats>,
    /// Critical waits outside the windows where the fleet took a 429.
    pub(crate) critical_quiet: measure::QuietWaits,
    /// Records expected vs stored.
    pub(crate) records: AllRecords,
    /// After each hidden-limit change.
    pub(crate) convergence: Vec<Convergence>,
    /// The analytics family's windows, as the simulator counted them.
    pub(crate) analytics_windows: Vec<WindowStats>,
    /// The fleet's own view of the run.
    pub(crate) fleet: FleetOutcome,
    /// Wallboard polls made.
    pub(crate) polls: u64,
    /// Wallboard polls due but not made (the previous one was still
    /// retrying, or never answered).
    pub(crate) polls_skipped: u64,
    /// Broker mode only.
    pub(crate) leases: Option<LeaseCounts>,
    /// Local mode only: refill-rate cuts (more than 1% of a process's calls
    /// refused over 60 simulated s → its rate × 0.8 for an hour).
    pub(crate) rate_cuts: Option<u64>,
    /// Per family: whether the upstream ever served beyond its limit.
    pub(crate) limits: Vec<LimitCheck>,
    /// Broker mode with `--chaos-kill-at` only: the outage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) chaos: Option<ChaosResult>,
    /// Broker modes with `--cluster` only: the cluster (and the leader
    /// kill's take-over).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cluster: Option<ClusterResult>,
    /// Broker mode only: its analytics bucket sampled over the run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) broker_trace: Vec<Sample>,
}

/// Runs `mode` against fresh processes.
pub(crate) async fn run_mode(
    spec: &Spec,
    plan: &Plan,
    dir: &WorkDir,
    mode: ModeName,
) -> Result<ModeResult, Error> {
    let real_start = std::time::Instant::now();
    let brokered = matches!(mode, ModeName::Broker | ModeName::Relay);
    let mut cluster = match (brokered, spec.cluster, &spec.broker) {
        (true, Some(c), BrokerSource::Binary(bin)) => {
            Some(BrokerCluster::start(spec, c, bin, dir).await?)
        }
        (true, Some(_), BrokerSource::InProcess) => {
            return Err(Error::Usage(
                "--cluster needs the quota-broker binary".into(),
            ))
        }
        _ => None,
    };
    // After the cluster, which takes seconds to elect and settle: the
    // simulator's clock (and the plan's times) start here.
    let sim = Simulator::start(spec, plan, dir, mode.as_str()).await?;
    let mut broker = if brokered && cluster.is_none() {
        Some(BrokerServer::start(spec, dir).await?)
    } else {
        None
    };
    let upstream = Upstream::new(sim.addr());
    let first = upstream.stats().await?;
    let clock = SimClock::aligned(Instant::now(), first.sim_ms, spec.scale);
    let metrics = Arc::new(Metrics::new());
    let ctx = Arc::new(Ctx {
        upstream: upstream.clone(),
        clock,
        metrics: metrics.clone(),
    });
    let started_ms = clock.now_ms();
    let broker_url = match (&broker, &cluster) {
        (Some(b), _) => Some(format!("http://{}", b.addr())),
        (None, Some(c)) => Some(c.urls()),
        (None, None) => None,
    };
    let relay = match (mode, &broker_url) {
        (ModeName::Relay, Some(url)) => Some(RelayServer::start(sim.addr(), url, dir).await?),
        _ => None,
    };
    let tracer = broker.as_ref().map(|b| Tracer::start(b.addr(), clock));
    // Chaos: the broker is killed and restarted while the fleet runs.
    let strike = async {
        match (
            spec.chaos.filter(|_| mode == ModeName::Broker),
            broker.as_mut(),
        ) {
            (Some(c), Some(b)) => Some(chaos::strike(b, c, clock).await),
            _ => None,
        }
    };
    // --cluster with chaos: the tenant's leader is killed instead.
    let cluster_strike = async {
        match (
            spec.chaos.filter(|_| mode == ModeName::Broker),
            spec.cluster,
            cluster.as_mut(),
        ) {
            (Some(c), Some(cs), Some(cl)) => {
                Some(cluster::strike(cl, c, cs.restart_after_ms, clock).await)
            }
            _ => None,
        }
    };
    let intake = relay.as_ref().map(RelayServer::intake);
    // The modes through the broker ingest with gc-ingest.
    let gc_ingest = match &broker_url {
        Some(url) => Some(GcIngest::start(sim.addr(), url, dir, mode.as_str(), spec.scale).await?),
        None => None,
    };
    let work = async {
        tokio::join!(
            fleet::run(mode, ctx, plan, spec.seed, broker_url, intake, gc_ingest),
            strike,
            cluster_strike
        )
    };
    let (outcome, struck, cluster_struck) = tokio::select! {
        done = work => done,
        never = progress(mode, clock, plan.duration_ms) => match never {},
    };
    let relay_queued = match relay {
        Some(relay) => relay.finish(clock, &metrics).await,
        None => 0,
    };
    let broker_trace = match tracer {
        Some(t) => t.finish().await,
        None => Vec::new(),
    };
    // Writes aborted at the drain deadline may still be landing.
    tokio::time::sleep(clock.real(100.0)).await;
    let read = async {
        let stats = upstream.stats().await?;
        let writes = upstream.writes(ORG).await?;
        if let Some(dir) = &spec.keep_logs {
            keep(dir, mode, &stats, &upstream).await?;
        }
        // The chaos phases are cut from the simulator's log.
        let log = match struck {
            Some(Ok(_)) => upstream.log().await?,
            _ => Vec::new(),
        };
        Ok::<_, Error>((stats, writes, log))
    }
    .await;
    let mut granted_after_restart = None;
    let mut broker_logs = Vec::new();
    let mut kept = Ok(());
    if let Some(broker) = broker {
        if matches!(struck, Some(Ok(_))) {
            granted_after_restart = chaos::granted_by(broker.addr()).await;
        }
        broker_logs = broker.logs().to_vec();
        broker.stop().await;
        if let Some(dir) = &spec.keep_logs {
            kept = keep_broker_logs(dir, &broker_logs);
        }
    }
    let mut cluster_figures = None;
    if let Some(cluster) = cluster {
        let end = cluster.at_end().await;
        let logs = cluster.logs();
        cluster.stop().await;
        if let Some(dir) = &spec.keep_logs {
            kept = kept.and(keep_logs_as_named(dir, &logs));
        }
        if let Some(cs) = spec.cluster {
            let struck = match cluster_struck {
                Some(Ok(s)) => Some(s),
                Some(Err(e)) => {
                    sim.stop().await;
                    return Err(e);
                }
                None => None,
            };
            cluster_figures = Some(ClusterResult::new(cs, end, struck, &metrics, spec.scale));
        }
    }
    sim.stop().await;
    let outcome = outcome?;
    let struck = struck.transpose()?;
    let (stats, writes, log) = read?;
    kept?;
    let mut result = figures(
        mode,
        plan,
        &metrics,
        outcome,
        &stats,
        &writes,
        started_ms,
        real_start.elapsed().as_secs_f64(),
    );
    result.broker_trace = broker_trace;
    result.cluster = cluster_figures;
    // What the relay still had queued is on disk for its next start.
    let w = result.records.writes;
    result.records.writes =
        Records::with_unfinished(w.expected, w.stored, w.duplicates, relay_queued);
    if let Some(struck) = struck {
        result.chaos = Some(ChaosResult::new(
            struck,
            &metrics,
            &log,
            &broker_logs,
            granted_after_restart,
        )?);
    }
    Ok(result)
}

/// Real time between two progress lines.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Prints a progress line on stderr every [`PROGRESS_EVERY`]: the
/// simulated time reached, of the run's production; never returns.
async fn progress(mode: ModeName, clock: SimClock, duration_ms: u64) -> std::convert::Infallible {
    let mut tick = tokio::time::interval_at(Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    loop {
        tick.tick().await;
        eprintln!(
            "scenario: {}",
            progress_line(mode, clock.now_ms(), duration_ms)
        );
    }
}

/// One progress line: where simulated time is, in production or the drain.
fn progress_line(mode: ModeName, now_ms: f64, duration_ms: u64) -> String {
    let (now_s, total_s) = (now_ms / 1000.0, duration_ms as f64 / 1000.0);
    if now_s < total_s {
        format!(
            "{}: simulated {now_s:.0} s of {total_s:.0} s ({:.0}%)",
            mode.as_str(),
            100.0 * now_s / total_s
        )
    } else {
        format!(
            "{}: simulated {now_s:.0} s, production over at {total_s:.0} s: draining",
            mode.as_str()
        )
    }
}

/// Writes the simulator's stats and log for `mode` into `dir`.
async fn keep(
    dir: &std::path::Path,
    mode: ModeName,
    stats: &SimStats,
    upstream: &Upstream,
) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    let log = upstream.log().await?;
    for (name, value) in [
        ("stats", serde_json::to_value(stats)),
        ("log", serde_json::to_value(log)),
    ] {
        let path = dir.join(format!("{}-{name}.json", mode.as_str()));
        let text = value
            .and_then(|v| serde_json::to_string(&v))
            .map_err(|e| Error::sim(format!("encode {name}"), e))?;
        std::fs::write(&path, text).map_err(Error::io(format!("write {}", path.display())))?;
    }
    Ok(())
}

/// Copies the logs of the broker processes (the first, then each restart)
/// into `dir` as `broker-0.log`, `broker-1.log`, ...
fn keep_broker_logs(dir: &std::path::Path, logs: &[std::path::PathBuf]) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    for (i, log) in logs.iter().enumerate() {
        let to = dir.join(format!("broker-{i}.log"));
        std::fs::copy(log, &to).map_err(Error::io(format!(
            "copy {} to {}",
            log.display(),
            to.display()
        )))?;
    }
    Ok(())
}

/// Copies the cluster's broker logs into `dir` under their own names
/// (`broker-b1.log`, `broker-b1-1.log` after a restart, ...).
fn keep_logs_as_named(dir: &std::path::Path, logs: &[std::path::PathBuf]) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    for log in logs {
        let Some(name) = log.file_name() else {
            continue;
        };
        let to = dir.join(name);
        std::fs::copy(log, &to).map_err(Error::io(format!(
            "copy {} to {}",
            log.display(),
            to.display()
        )))?;
    }
    Ok(())
}

/// The mode's figures from what the fleet and the simulator counted.
#[allow(clippy::too_many_arguments)]
fn figures(
    mode: ModeName,
    plan: &Plan,
    metrics: &Metrics,
    fleet: FleetOutcome,
    stats: &SimStats,
    writes: &BTreeMap<String, u64>,
    started_ms: f64,
    real_s: f64,
) -> ModeResult {
    let org = stats.org(ORG);
    let analytics_family = org.and_then(|o| o.family(ANALYTICS));
    let writes_family = org.and_then(|o| o.family(WRITES));
    let analytics = RequestCount::from(&metrics.analytics);
    let write_count = RequestCount::from(&metrics.writes);
    let sent = analytics.sent + write_count.sent;
    let refused = analytics.refused + write_count.refused;
    let (sim_served, sim_refused) = org.map_or((0, 0), |o| {
        o.tokens
            .iter()
            .fold((0, 0), |(s, r), t| (s + t.served, r + t.refused))
    });
    // Every conversation the trunks write is named t{trunk}-{n}.
    let (stored, total) = writes
        .iter()
        .filter(|(id, _)| id.starts_with('t'))
        .fold((0u64, 0u64), |(d, t), (_, &n)| {
            (d + u64::from(n > 0), t + n)
        });
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    ModeResult {
        mode,
        real_s,
        started_ms,
        requests: Requests {
            sent,
            refused,
            ratio: if sent > 0 {
                refused as f64 / sent as f64
            } else {
                0.0
            },
            analytics,
            writes: write_count,
            sim_total: sim_served + sim_refused,
            sim_refused,
            sim_refused_by_reason: org.map(|o| o.refused_by_reason.clone()).unwrap_or_default(),
        },
        analytics: measure::goodput(analytics_family, plan.duration_ms),
        writes: measure::goodput(writes_family, plan.duration_ms),
        wait: metrics.waits(),
        critical_quiet: measure::quiet_critical(&metrics.critical_calls(), analytics_family),
        records: AllRecords {
            ingest: fleet.ingest,
            writes: Records::new(fleet.writes_generated, stored, total.saturating_sub(stored)),
        },
        convergence: measure::convergence(analytics_family, &plan.changes, plan.duration_ms),
        analytics_windows: analytics_family
            .map(|f| f.windows.clone())
            .unwrap_or_default(),
        fleet,
        polls: load(&metrics.polls),
        polls_skipped: load(&metrics.polls_due).saturating_sub(load(&metrics.polls)),
        leases: (mode == ModeName::Broker).then(|| LeaseCounts {
            granted: load(&metrics.granted),
            not_granted: load(&metrics.not_granted),
            fallback: load(&metrics.fallback_leases),
            report_errors: load(&metrics.report_errors),
        }),
        rate_cuts: (mode == ModeName::Local).then(|| load(&metrics.rate_cuts)),
        limits: org
            .map(|o| {
                o.families
                    .iter()
                    .map(|f| {
                        // The plan's hidden-limit changes are the analytics family's.
                        let changes = if f.name == ANALYTICS {
                            &plan.changes[..]
                        } else {
                            &[]
                        };
                        measure::limit_check(f, changes)
                    })
                    .collect()
            })
            .unwrap_or_default(),
        chaos: None,
        cluster: None,
        broker_trace: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_say_where_simulated_time_is() {
        assert_eq!(
            progress_line(ModeName::Broker, 90_400.0, 300_000),
            "broker: simulated 90 s of 300 s (30%)"
        );
        assert_eq!(
            progress_line(ModeName::Naive, 305_000.0, 300_000),
            "naive: simulated 305 s, production over at 300 s: draining"
        );
    }
}
