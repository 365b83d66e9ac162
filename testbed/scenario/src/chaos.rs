//! Broker mode's chaos (`--chaos-kill-at`): the broker, a child process,
//! is SIGKILLed at a simulated time while the fleet runs and started again
//! on the same port, config and state directory (so it starts in its
//! restart learning mode), and the outage is measured: how long the broker
//! was down, how long and how much the fleet ran on its clients' local
//! fallback, the fleet's requests and 429s before, during and after the
//! outage (from the simulator's log), and what the restarted broker did.
//!
//! The phases, in simulated time: **before** the kill; **during** = the
//! broker's outage, from the kill until the restarted broker listens;
//! **after** = the first window from then (the restarted broker's tokens
//! start empty for one window and its slots count as held for one lease
//! TTL: its learning mode); **later** = the rest of the run, drain
//! included. The fleet's own outage can outlast the broker's: a client goes
//! back to the broker at its next probe, and a call already waiting on the
//! local limiter keeps waiting on it; it ends with the answer to the last
//! request sent on a fallback lease.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::ListBucketsRequest;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::transport::Endpoint;

use crate::children::BrokerServer;
use crate::cli::Chaos;
use crate::clock::SimClock;
use crate::confgen::{ANALYTICS, ORG, WINDOW_MS, WRITES};
use crate::error::Error;
#[cfg(test)]
use crate::measure::FallbackCall;
use crate::measure::Metrics;

/// In the restarted broker's log (`quota_broker::tenant::restart`, info):
/// it found state and entered the learning mode.
const LOG_LEARNING: &str = "started with state";
/// ... it adopted a lease granted before the restart.
const LOG_ADOPTED: &str = "adopted a lease granted before the restart";
/// ... slots nobody claimed came back after one lease TTL.
const LOG_OVER: &str = "restart learning over";

/// What the strike did, as it happened.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Struck {
    /// Asked-for kill time, simulated ms.
    planned_ms: f64,
    /// When the SIGKILL was sent, simulated ms.
    killed_ms: f64,
    /// When the restarted broker accepted a connection, simulated ms.
    back_ms: f64,
    /// The same outage in real ms.
    down_real_ms: f64,
    /// Processes started until one listened.
    attempts: u32,
}

/// Waits for the kill time, SIGKILLs the broker, waits `down_for`, and
/// starts it again (retrying a bounded number of times).
pub(crate) async fn strike(
    broker: &mut BrokerServer,
    chaos: Chaos,
    clock: SimClock,
) -> Result<Struck, Error> {
    clock.sleep_until(chaos.kill_at_ms).await;
    let killed = Instant::now();
    broker.kill().await?;
    tokio::time::sleep_until(killed + clock.real(chaos.down_for_ms)).await;
    let restarted = broker.restart().await?;
    let back = Instant::now();
    let struck = Struck {
        planned_ms: chaos.kill_at_ms,
        killed_ms: clock.sim_ms_at(killed),
        back_ms: clock.sim_ms_at(back),
        down_real_ms: back.duration_since(killed).as_secs_f64() * 1000.0,
        attempts: restarted.attempts,
    };
    eprintln!(
        "scenario: chaos: broker SIGKILLed at {:.1} sim s, listening again at {:.1} sim s \
         ({:.0} real ms, {} start attempt(s))",
        struck.killed_ms / 1000.0,
        struck.back_ms / 1000.0,
        struck.down_real_ms,
        struck.attempts
    );
    Ok(struck)
}

/// Permits the running broker process granted since it started, from its
/// org-wide buckets (every fleet call draws on exactly one of them);
/// `None` if it did not answer.
pub(crate) async fn granted_by(addr: SocketAddr) -> Option<u64> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    let mut admin = QuotaAdminClient::new(endpoint.connect().await.ok()?);
    let resp = admin
        .list_buckets(ListBucketsRequest {
            tenant: ORG.to_owned(),
        })
        .await
        .ok()?;
    Some(
        resp.into_inner()
            .buckets
            .iter()
            .filter(|b| b.bucket == ANALYTICS || b.bucket == WRITES)
            .map(|b| b.granted_total)
            .sum(),
    )
}

/// One entry of the simulator's `/_sim/log` (the fields used here).
#[derive(Debug, Deserialize)]
struct LogLine {
    sim_ms: f64,
    status: u16,
    #[serde(default)]
    reason: Option<String>,
}

/// The fleet's upstream requests in one phase, as the simulator logged them.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Phase {
    /// Start, simulated ms.
    pub(crate) from_ms: f64,
    /// End, simulated ms (None: the end of the run).
    pub(crate) to_ms: Option<f64>,
    /// Requests the simulator decided in it.
    pub(crate) requests: u64,
    /// Of them, answered 429.
    pub(crate) refused: u64,
    /// 429s by the simulator's reason (`family:…`, `concurrency:…`,
    /// `token`, `blocked:…`).
    pub(crate) refused_by_reason: BTreeMap<String, u64>,
    /// Of the 429s, those of requests sent on a fallback lease (counted by
    /// the fleet, by when they were sent); the others were sent on leases
    /// the broker granted.
    pub(crate) refused_on_fallback: u64,
}

impl Phase {
    fn new(from_ms: f64, to_ms: Option<f64>) -> Phase {
        Phase {
            from_ms,
            to_ms,
            ..Phase::default()
        }
    }

    fn holds(&self, ms: f64) -> bool {
        ms >= self.from_ms && self.to_ms.is_none_or(|to| ms < to)
    }

    fn count(&mut self, line: &LogLine) {
        self.requests += 1;
        if line.status == 429 {
            self.refused += 1;
            let reason = line.reason.clone().unwrap_or_else(|| "?".into());
            *self.refused_by_reason.entry(reason).or_default() += 1;
        }
    }
}

/// The fleet's requests before, during and after the outage.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Phases {
    /// Before the kill.
    pub(crate) before: Phase,
    /// From the kill to the end of the fleet's outage.
    pub(crate) during: Phase,
    /// The first window after the outage.
    pub(crate) after: Phase,
    /// The rest of the run (drain included).
    pub(crate) later: Phase,
}

impl Phases {
    /// `count` of each phase, in order, as "before / during / after / later".
    pub(crate) fn each(&self, count: impl Fn(&Phase) -> u64) -> String {
        [&self.before, &self.during, &self.after, &self.later]
            .map(count)
            .map(|n| n.to_string())
            .join(" / ")
    }
}

/// What the restarted broker's own log says (`--keep-logs DIR` keeps the
/// logs themselves).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct BrokerLog {
    /// The restarted process logged entering its restart learning mode.
    pub(crate) learning_mode: bool,
    /// ... and when it ended (slots nobody claimed free again).
    pub(crate) learning_over: bool,
    /// Leases granted before the restart that it adopted on renewal.
    pub(crate) leases_adopted: u64,
}

impl BrokerLog {
    /// Reads the logs of the processes (the first one's, the restarts').
    fn read(files: &[PathBuf]) -> BrokerLog {
        let restarts: String = files
            .iter()
            .skip(1)
            .map(|f| std::fs::read_to_string(f).unwrap_or_default())
            .collect();
        BrokerLog {
            learning_mode: restarts.contains(LOG_LEARNING),
            learning_over: restarts.contains(LOG_OVER),
            leases_adopted: restarts.matches(LOG_ADOPTED).count() as u64,
        }
    }
}

/// The requests the fleet sent on leases of its clients' local fallback.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Fallback {
    /// Fallback leases taken.
    pub(crate) leases: u64,
    /// Requests sent on them while the broker was down.
    pub(crate) while_down: u64,
    /// ... and after it listened again (clients not back yet).
    pub(crate) after_back: u64,
    /// Of all those requests, answered 429.
    pub(crate) refused: u64,
    /// The first sent, simulated ms.
    pub(crate) first_ms: Option<f64>,
    /// The last answered, simulated ms.
    pub(crate) last_ms: Option<f64>,
}

/// Broker mode's chaos figures.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ChaosResult {
    /// Asked-for kill time, simulated ms.
    pub(crate) planned_kill_ms: f64,
    /// When the SIGKILL was sent, simulated ms.
    pub(crate) killed_ms: f64,
    /// When the restarted broker accepted connections, simulated ms.
    pub(crate) back_ms: f64,
    /// back − killed: the broker's outage, simulated ms.
    pub(crate) broker_down_ms: f64,
    /// The same in real ms.
    pub(crate) broker_down_real_ms: f64,
    /// The fleet's outage, simulated ms: from the kill to the later of
    /// `back_ms` and the answer to the last request sent on a fallback
    /// lease.
    pub(crate) fleet_outage_ms: f64,
    /// Processes started for the restart until one listened (1: at once).
    pub(crate) restart_attempts: u32,
    /// Permits the restarted process granted (its org-wide buckets'
    /// `granted_total` at the end of the run); None if it did not answer.
    pub(crate) granted_after_restart: Option<u64>,
    /// Whether the broker restarted and served again: it listened and
    /// granted at least one permit.
    pub(crate) restarted: bool,
    /// The fleet on its clients' local fallback.
    pub(crate) fallback: Fallback,
    /// The fleet's requests and 429s per phase.
    pub(crate) phases: Phases,
    /// The broker processes' logs.
    pub(crate) broker_log: BrokerLog,
}

impl ChaosResult {
    /// The figures of a run struck by `struck`, from the fleet's counters,
    /// the simulator's log and the broker's.
    pub(crate) fn new(
        struck: Struck,
        metrics: &Metrics,
        sim_log: &[serde_json::Value],
        broker_logs: &[PathBuf],
        granted_after_restart: Option<u64>,
    ) -> Result<ChaosResult, Error> {
        let calls = metrics.fallback_calls();
        let fallback = Fallback {
            leases: metrics.fallback_leases.load(Ordering::Relaxed),
            while_down: calls.iter().filter(|c| c.sent_ms < struck.back_ms).count() as u64,
            after_back: calls.iter().filter(|c| c.sent_ms >= struck.back_ms).count() as u64,
            refused: calls.iter().filter(|c| c.refused).count() as u64,
            first_ms: calls.iter().map(|c| c.sent_ms).reduce(f64::min),
            last_ms: calls.iter().map(|c| c.answered_ms).reduce(f64::max),
        };
        let fleet_back_ms = fallback
            .last_ms
            .map_or(struck.back_ms, |l| l.max(struck.back_ms));
        let after_end = struck.back_ms + WINDOW_MS as f64;
        let mut phases = Phases {
            before: Phase::new(0.0, Some(struck.killed_ms)),
            during: Phase::new(struck.killed_ms, Some(struck.back_ms)),
            after: Phase::new(struck.back_ms, Some(after_end)),
            later: Phase::new(after_end, None),
        };
        for c in calls.iter().filter(|c| c.refused) {
            for phase in [
                &mut phases.before,
                &mut phases.during,
                &mut phases.after,
                &mut phases.later,
            ] {
                if phase.holds(c.sent_ms) {
                    phase.refused_on_fallback += 1;
                    break;
                }
            }
        }
        for value in sim_log {
            let line: LogLine = serde_json::from_value(value.clone())
                .map_err(|e| Error::sim("read /_sim/log", e))?;
            for phase in [
                &mut phases.before,
                &mut phases.during,
                &mut phases.after,
                &mut phases.later,
            ] {
                if phase.holds(line.sim_ms) {
                    phase.count(&line);
                    break;
                }
            }
        }
        Ok(ChaosResult {
            planned_kill_ms: struck.planned_ms,
            killed_ms: struck.killed_ms,
            back_ms: struck.back_ms,
            broker_down_ms: struck.back_ms - struck.killed_ms,
            broker_down_real_ms: struck.down_real_ms,
            fleet_outage_ms: fleet_back_ms - struck.killed_ms,
            restart_attempts: struck.attempts,
            granted_after_restart,
            restarted: granted_after_restart.is_some_and(|n| n > 0),
            fallback,
            phases,
            broker_log: BrokerLog::read(broker_logs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn struck() -> Struck {
        Struck {
            planned_ms: 70_000.0,
            killed_ms: 70_010.0,
            back_ms: 80_000.0,
            down_real_ms: 500.0,
            attempts: 1,
        }
    }

    fn line(sim_ms: f64, status: u16, reason: Option<&str>) -> serde_json::Value {
        serde_json::json!({"seq": 0, "sim_ms": sim_ms, "org": ORG, "client": "c",
            "method": "POST", "path": "/x", "status": status, "reason": reason})
    }

    #[test]
    fn phases_split_the_log_at_the_kill_the_restart_and_a_window_after() {
        let m = Metrics::new();
        let call = |sent_ms, answered_ms, refused| FallbackCall {
            sent_ms,
            answered_ms,
            refused,
        };
        m.record_fallback(call(71_000.0, 71_100.0, false));
        // Sent on the fallback after the broker is back.
        m.record_fallback(call(85_000.0, 86_000.0, true));
        m.fallback_leases.store(2, Ordering::Relaxed);
        let log = [
            line(1_000.0, 429, Some("family:analytics-query")),
            line(70_000.0, 200, None),
            line(70_010.0, 200, None),
            line(71_000.0, 200, None),
            line(80_000.0, 200, None),
            line(85_000.0, 429, Some("concurrency:analytics-query")),
            line(139_999.0, 200, None),
            line(140_000.0, 429, Some("token")),
        ];
        let c = ChaosResult::new(struck(), &m, &log, &[], Some(3)).unwrap();
        assert_eq!((c.broker_down_ms, c.fleet_outage_ms), (9_990.0, 15_990.0));
        let f = &c.fallback;
        assert_eq!(
            (f.leases, f.while_down, f.after_back, f.refused),
            (2, 1, 1, 1)
        );
        assert_eq!((f.first_ms, f.last_ms), (Some(71_000.0), Some(86_000.0)));
        let p = &c.phases;
        assert_eq!((p.before.requests, p.before.refused), (2, 1));
        assert_eq!((p.during.requests, p.during.refused), (2, 0));
        assert_eq!((p.after.requests, p.after.refused), (3, 1));
        assert_eq!(p.after.refused_by_reason["concurrency:analytics-query"], 1);
        assert_eq!(p.after.refused_on_fallback, 1);
        assert_eq!(
            p.before.refused_on_fallback + p.later.refused_on_fallback,
            0
        );
        assert_eq!((p.later.requests, p.later.refused), (1, 1));
        assert!(c.restarted);
    }

    #[test]
    fn without_fallback_the_fleets_outage_is_the_brokers() {
        let m = Metrics::new();
        let c = ChaosResult::new(struck(), &m, &[], &[], Some(0)).unwrap();
        assert_eq!(c.fleet_outage_ms, c.broker_down_ms);
        assert_eq!(c.fallback.last_ms, None);
        // Listening but granting nothing is not a restart that served.
        assert!(!c.restarted);
    }

    #[test]
    fn reads_the_learning_mode_from_the_restarted_brokers_log() {
        let dir = std::env::temp_dir().join(format!("scenario-chaos-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (first, second) = (dir.join("broker.log"), dir.join("broker-1.log"));
        std::fs::write(
            &first,
            "INFO started with state (a stale line of the first run)\n",
        )
        .unwrap();
        std::fs::write(
            &second,
            format!("INFO x: {LOG_LEARNING}: ...\nINFO {LOG_ADOPTED}\nINFO {LOG_ADOPTED}\n"),
        )
        .unwrap();
        let log = BrokerLog::read(&[first, second]);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(log.learning_mode);
        assert!(!log.learning_over);
        assert_eq!(log.leases_adopted, 2);
    }
}
