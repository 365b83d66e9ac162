//! `--cluster N`: the broker modes run against N broker processes in
//! cluster mode on a real etcd (testsvc's, on loopback), the fleet's
//! clients given every broker's URL (they follow the tenant's leader). With
//! `--chaos-kill-at`, in broker mode, the leader of the org's tenant is
//! SIGKILLed at that simulated time and the take-over is measured.
//!
//! The cluster starts before the mode's simulator (whose clock the plan's
//! times count from): etcd, the nodes, one leader named by every node for
//! a while, then one window (scaled), since a tenant's first leader runs
//! the restart learning mode as any take-over does (token buckets start
//! empty and fill over a window).
//!
//! The leader is found by asking every broker `ListBuckets` for the org's
//! tenant: the leader answers it, the others answer UNAVAILABLE (with the
//! leader's URL when they know it). After the kill the survivors are asked
//! every [`POLL`] (real) until one answers as the leader.
//!
//! The figures (simulated ms, the fleet's clock):
//! - **take-over time**: from the kill to the first lease a broker granted
//!   on an Acquire sent after the kill (the killed leader cannot have
//!   answered it, so the new leader did);
//! - **grants during the gap**: leases granted on Acquires sent after the
//!   kill and answered before the new leader's last "not the leader"
//!   answer: the dead leader cannot have granted them and no survivor
//!   led yet, so each one is a double grant (must be 0). Leases granted on
//!   Acquires sent before the kill and answered after it (the dead
//!   leader's answers still in the socket) are counted apart;
//! - the fleet's fallback leases in between (its clients' local limiter);
//! - optionally the killed broker started again (`--chaos-down-for`): as
//!   the rendezvous-preferred member it takes the tenant back.
//!
//! The etcd lease TTL is real time (etcd counts whole seconds; 2 s is the
//! shortest the broker accepts): at `--time-scale 20` the take-over takes
//! about 2 s real, i.e. some 40 simulated seconds, during which the fleet
//! runs on its clients' local fallback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::ListBucketsRequest;
use serde::Serialize;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::children::{free_addr, BrokerServer, WorkDir};
use crate::cli::{Chaos, ClusterSpec, Spec};
use crate::clock::SimClock;
use crate::confgen::{cluster_node_toml, ANALYTICS, ORG, WINDOW_MS, WRITES};
use crate::error::Error;
use crate::measure::Metrics;

/// The etcd lease TTL of every node, real ms (the shortest allowed); the
/// safety margin is half of it.
pub(crate) const LEASE_TTL_MS: u64 = 2_000;
/// How often the survivors are asked who leads after the kill, real.
const POLL: Duration = Duration::from_millis(10);
/// Longest wait for a leader (at start, after the kill), real.
const LEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// At start: the same leader, seen by every node, for this long (a node
/// that joined last may be preferred and get the tenant handed over).
const STABLE_FOR: Duration = Duration::from_millis(1_500);
/// Each node's log: warnings, the cluster's elections and hand-overs, and
/// the restart learning mode a take-over runs.
const NODE_LOG_FILTER: &str = "warn,quota_broker::cluster=info,quota_broker::tenant::restart=info";

/// One broker of the cluster.
struct Node {
    name: String,
    url: String,
    server: BrokerServer,
    admin: QuotaAdminClient<Channel>,
    up: bool,
}

/// What a broker answered about the org's tenant.
#[derive(Clone, Debug, PartialEq)]
enum Answer {
    /// It leads it: its org-wide buckets' `granted_total`.
    Leads(u64),
    /// It does not (the leader's URL if it named one).
    Follows(Option<String>),
    /// No answer.
    Down,
}

/// A running etcd and its brokers.
pub(crate) struct BrokerCluster {
    nodes: Vec<Node>,
    /// Dropped (killed) last, after the brokers.
    etcd: testsvc::Etcd,
}

impl BrokerCluster {
    /// Starts etcd and `spec.nodes` brokers, and waits until one leads the
    /// org's tenant and every other names it.
    pub(crate) async fn start(
        spec: &Spec,
        cluster: ClusterSpec,
        bin: &Path,
        dir: &WorkDir,
    ) -> Result<BrokerCluster, Error> {
        let etcd = tokio::task::spawn_blocking(testsvc::Etcd::start)
            .await?
            .map_err(|e| Error::Cluster(format!("etcd did not start: {e}")))?;
        // Each run's keys apart (modes run one after another on one etcd
        // each, but a prefix of its own costs nothing).
        let mut nodes = Vec::new();
        for i in 0..cluster.nodes {
            let name = format!("b{}", i + 1);
            let addr = free_addr()?;
            let toml = cluster_node_toml(spec.scale, addr, &etcd.url(), &name, LEASE_TTL_MS);
            quota_broker::Settings::from_toml(&toml)?;
            let config = dir.file(&format!("broker-{name}.toml"));
            let server = BrokerServer::process(bin, addr, &config, &toml, NODE_LOG_FILTER).await?;
            nodes.push(Node {
                url: format!("http://{addr}"),
                admin: admin(addr)?,
                name,
                server,
                up: true,
            });
        }
        let cluster = BrokerCluster { nodes, etcd };
        let leader = cluster.wait_stable().await?;
        // A tenant's first leader runs the restart learning mode too (it
        // cannot tell a fresh cluster from a take-over): its token buckets
        // start empty and fill over one window. The fleet starts after it,
        // as it would against a cluster up for a while.
        tokio::time::sleep(Duration::from_secs_f64(
            WINDOW_MS as f64 / spec.scale / 1000.0,
        ))
        .await;
        eprintln!(
            "scenario: cluster of {} brokers on etcd {}: {} leads {ORG}",
            cluster.nodes.len(),
            cluster.etcd.url(),
            cluster.nodes[leader].name
        );
        Ok(cluster)
    }

    /// Every broker's URL, comma-separated (what the clients connect to).
    pub(crate) fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// What node `i` says about the org's tenant.
    async fn ask(&self, i: usize) -> Answer {
        let node = &self.nodes[i];
        if !node.up {
            return Answer::Down;
        }
        let mut admin = node.admin.clone();
        match admin
            .list_buckets(ListBucketsRequest {
                tenant: ORG.to_owned(),
            })
            .await
        {
            Ok(r) => Answer::Leads(
                r.into_inner()
                    .buckets
                    .iter()
                    .filter(|b| b.bucket == ANALYTICS || b.bucket == WRITES)
                    .map(|b| b.granted_total)
                    .sum(),
            ),
            // From the server, not the transport (a dead node's refused connection).
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && std::error::Error::source(&s).is_none() =>
            {
                Answer::Follows(
                    s.metadata()
                        .get(quota_broker::LEADER_METADATA)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned),
                )
            }
            Err(_) => Answer::Down,
        }
    }

    /// Every node's answer, in order.
    async fn ask_all(&self) -> Vec<Answer> {
        let mut answers = Vec::new();
        for i in 0..self.nodes.len() {
            answers.push(self.ask(i).await);
        }
        answers
    }

    /// The one node that leads, if exactly one does and every other live
    /// node names it.
    async fn agreed_leader(&self) -> Option<usize> {
        let answers = self.ask_all().await;
        let leaders: Vec<usize> = (0..answers.len())
            .filter(|&i| matches!(answers[i], Answer::Leads(_)))
            .collect();
        let &[leader] = &leaders[..] else {
            return None;
        };
        let url = &self.nodes[leader].url;
        answers
            .iter()
            .enumerate()
            .all(|(i, a)| {
                i == leader
                    || !self.nodes[i].up
                    || matches!(a, Answer::Follows(Some(u)) if u == url)
            })
            .then_some(leader)
    }

    /// Waits until the same node has led, named by all, for [`STABLE_FOR`].
    async fn wait_stable(&self) -> Result<usize, Error> {
        let deadline = Instant::now() + LEADER_TIMEOUT;
        let mut since: Option<(usize, Instant)> = None;
        loop {
            let now = Instant::now();
            match (self.agreed_leader().await, since) {
                (Some(l), Some((s, at))) if l == s => {
                    if now.duration_since(at) >= STABLE_FOR {
                        return Ok(l);
                    }
                }
                (Some(l), _) => since = Some((l, now)),
                (None, _) => since = None,
            }
            if now >= deadline {
                return Err(Error::Cluster(format!(
                    "no broker led {ORG} for {STABLE_FOR:?} within {LEADER_TIMEOUT:?}: {:?}",
                    self.ask_all().await
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Who leads the org's tenant now and what each live node granted (only
    /// a leader answers its buckets).
    pub(crate) async fn at_end(&self) -> ClusterEnd {
        let answers = self.ask_all().await;
        ClusterEnd {
            leader: answers
                .iter()
                .position(|a| matches!(a, Answer::Leads(_)))
                .map(|i| self.nodes[i].name.clone()),
            granted_by_leader: answers.iter().find_map(|a| match a {
                Answer::Leads(n) => Some(*n),
                _ => None,
            }),
        }
    }

    /// Every broker process's log, in order (node by node, restarts after).
    pub(crate) fn logs(&self) -> Vec<PathBuf> {
        self.nodes
            .iter()
            .flat_map(|n| n.server.logs().iter().cloned())
            .collect()
    }

    /// Stops every broker, then etcd.
    pub(crate) async fn stop(self) {
        for node in self.nodes {
            node.server.stop().await;
        }
        let etcd = self.etcd;
        let _ = tokio::task::spawn_blocking(move || drop(etcd)).await;
    }
}

/// A `QuotaAdmin` client of the broker at `addr`, connected lazily (kept
/// for the polls; short timeouts: a killed node must not hold a poll up).
fn admin(addr: SocketAddr) -> Result<QuotaAdminClient<Channel>, Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Error::Cluster(format!("endpoint {addr}: {e}")))?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(2));
    Ok(QuotaAdminClient::new(endpoint.connect_lazy()))
}

/// The end of the run: who leads, and what it granted since it took the
/// tenant.
#[derive(Clone, Debug, Default)]
pub(crate) struct ClusterEnd {
    leader: Option<String>,
    granted_by_leader: Option<u64>,
}

/// What the strike did, as it happened.
#[derive(Clone, Debug)]
pub(crate) struct ClusterStruck {
    killed: String,
    new_leader: String,
    /// SIGKILL sent and the process reaped, simulated ms.
    killed_ms: f64,
    /// The new leader's first answer as the leader, simulated ms.
    leader_seen_ms: f64,
    /// Its last answer as not the leader before that, simulated ms.
    gap_end_ms: f64,
    /// The same take-over, real ms (kill → first answer as the leader).
    leader_seen_real_ms: f64,
    /// The killed broker started again, simulated ms.
    restarted_ms: Option<f64>,
}

/// Waits for the kill time, finds the leader, SIGKILLs it, watches the
/// survivors until one leads, and restarts the killed one if asked.
pub(crate) async fn strike(
    cluster: &mut BrokerCluster,
    chaos: Chaos,
    restart_after_ms: Option<f64>,
    clock: SimClock,
) -> Result<ClusterStruck, Error> {
    clock.sleep_until(chaos.kill_at_ms).await;
    let deadline = Instant::now() + LEADER_TIMEOUT;
    let old = loop {
        let answers = cluster.ask_all().await;
        if let Some(i) = answers.iter().position(|a| matches!(a, Answer::Leads(_))) {
            break i;
        }
        if Instant::now() >= deadline {
            return Err(Error::Cluster(format!(
                "no broker leads {ORG} at the kill time: {answers:?}"
            )));
        }
        tokio::time::sleep(POLL).await;
    };
    cluster.nodes[old].server.kill().await?;
    cluster.nodes[old].up = false;
    let killed = Instant::now();
    // The survivors' last "not the leader" answers, until one leads.
    let mut last_not: Vec<Option<Instant>> = vec![None; cluster.nodes.len()];
    let deadline = killed + LEADER_TIMEOUT;
    let (new, seen) = 'poll: loop {
        for i in (0..cluster.nodes.len()).filter(|&i| i != old) {
            let answer = cluster.ask(i).await;
            let at = Instant::now();
            match answer {
                Answer::Leads(_) => break 'poll (i, at),
                _ => last_not[i] = Some(at),
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Cluster(format!(
                "no broker took {ORG} over within {LEADER_TIMEOUT:?} of the kill"
            )));
        }
        tokio::time::sleep(POLL).await;
    };
    let struck_so_far = ClusterStruck {
        killed: cluster.nodes[old].name.clone(),
        new_leader: cluster.nodes[new].name.clone(),
        killed_ms: clock.sim_ms_at(killed),
        leader_seen_ms: clock.sim_ms_at(seen),
        gap_end_ms: clock.sim_ms_at(last_not[new].unwrap_or(killed)),
        leader_seen_real_ms: seen.duration_since(killed).as_secs_f64() * 1000.0,
        restarted_ms: None,
    };
    eprintln!(
        "scenario: cluster: leader {} SIGKILLed at {:.1} sim s; {} leads from {:.1} sim s \
         ({:.0} real ms later)",
        struck_so_far.killed,
        struck_so_far.killed_ms / 1000.0,
        struck_so_far.new_leader,
        struck_so_far.leader_seen_ms / 1000.0,
        struck_so_far.leader_seen_real_ms
    );
    let Some(after) = restart_after_ms else {
        return Ok(struck_so_far);
    };
    tokio::time::sleep_until(killed + clock.real(after)).await;
    cluster.nodes[old].server.restart().await?;
    cluster.nodes[old].up = true;
    let restarted_ms = clock.now_ms();
    eprintln!(
        "scenario: cluster: {} started again at {:.1} sim s",
        struck_so_far.killed,
        restarted_ms / 1000.0
    );
    Ok(ClusterStruck {
        restarted_ms: Some(restarted_ms),
        ..struck_so_far
    })
}

/// The cluster's figures of a broker-mode run.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ClusterResult {
    /// Broker processes.
    pub(crate) nodes: usize,
    /// Their etcd lease TTL, real ms (the safety margin is half).
    pub(crate) lease_ttl_real_ms: u64,
    /// Who leads the org's tenant at the end of the run.
    pub(crate) leader_at_end: Option<String>,
    /// What it granted since it took the tenant (org-wide buckets).
    pub(crate) granted_by_leader_at_end: Option<u64>,
    /// With `--chaos-kill-at`: the leader kill.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) kill: Option<Takeover>,
}

/// The leader kill and the take-over.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Takeover {
    /// The node killed (it led the tenant).
    pub(crate) killed: String,
    /// The node that led next.
    pub(crate) new_leader: String,
    /// Another node took over (not the killed one, restarted).
    pub(crate) new_leader_took_over: bool,
    /// SIGKILL, simulated ms.
    pub(crate) killed_ms: f64,
    /// The new leader's first answer as the leader, simulated ms.
    pub(crate) leader_seen_ms: f64,
    /// Kill → first answer as the leader, real ms.
    pub(crate) leader_seen_real_ms: f64,
    /// The first lease a broker granted on an Acquire sent after the kill,
    /// simulated ms.
    pub(crate) first_grant_ms: Option<f64>,
    /// Take-over time: kill → first grant by the new leader, simulated ms.
    pub(crate) takeover_ms: Option<f64>,
    /// The same in real ms.
    pub(crate) takeover_real_ms: Option<f64>,
    /// Leases granted on Acquires sent after the kill and answered before
    /// the new leader's last "not the leader": double grants (must be 0).
    pub(crate) grants_in_gap: u64,
    /// Leases granted on Acquires sent before the kill and answered after
    /// it (the dead leader's grants, still on the wire).
    pub(crate) grants_in_flight_at_kill: u64,
    /// Fallback leases' requests sent between the kill and the first grant.
    pub(crate) fallback_calls_in_gap: u64,
    /// The killed node started again, simulated ms.
    pub(crate) restarted_ms: Option<f64>,
}

impl ClusterResult {
    /// The figures of a run against `cluster` (struck by `struck`), from
    /// the fleet's counters.
    pub(crate) fn new(
        cluster: ClusterSpec,
        end: ClusterEnd,
        struck: Option<ClusterStruck>,
        metrics: &Metrics,
        scale: f64,
    ) -> ClusterResult {
        let kill = struck.map(|s| {
            let grants = metrics.broker_grants();
            let after: Vec<_> = grants.iter().filter(|g| g.sent_ms >= s.killed_ms).collect();
            let first_grant_ms = after.iter().map(|g| g.answered_ms).reduce(f64::min);
            let takeover_ms = first_grant_ms.map(|f| f - s.killed_ms);
            let gap_to = first_grant_ms.unwrap_or(f64::INFINITY);
            Takeover {
                killed: s.killed.clone(),
                new_leader: s.new_leader.clone(),
                new_leader_took_over: s.new_leader != s.killed && first_grant_ms.is_some(),
                killed_ms: s.killed_ms,
                leader_seen_ms: s.leader_seen_ms,
                leader_seen_real_ms: s.leader_seen_real_ms,
                first_grant_ms,
                takeover_ms,
                takeover_real_ms: takeover_ms.map(|t| t / scale),
                grants_in_gap: after
                    .iter()
                    .filter(|g| g.answered_ms < s.gap_end_ms)
                    .count() as u64,
                grants_in_flight_at_kill: grants
                    .iter()
                    .filter(|g| g.sent_ms < s.killed_ms && g.answered_ms >= s.killed_ms)
                    .count() as u64,
                fallback_calls_in_gap: metrics
                    .fallback_calls()
                    .iter()
                    .filter(|c| c.sent_ms >= s.killed_ms && c.sent_ms < gap_to)
                    .count() as u64,
                restarted_ms: s.restarted_ms,
            }
        });
        ClusterResult {
            nodes: cluster.nodes,
            lease_ttl_real_ms: LEASE_TTL_MS,
            leader_at_end: end.leader,
            granted_by_leader_at_end: end.granted_by_leader,
            kill,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::{BrokerGrant, FallbackCall};

    #[test]
    fn takeover_and_gap_from_the_grants() {
        let m = Metrics::new();
        let grant = |sent_ms, answered_ms| BrokerGrant {
            sent_ms,
            answered_ms,
        };
        // Before the kill; in flight at it; after the take-over.
        m.record_grant(grant(49_000.0, 49_010.0));
        m.record_grant(grant(49_990.0, 50_020.0));
        m.record_grant(grant(60_000.0, 91_000.0));
        m.record_grant(grant(92_000.0, 92_010.0));
        m.record_fallback(FallbackCall {
            sent_ms: 55_000.0,
            answered_ms: 55_100.0,
            refused: false,
        });
        let struck = ClusterStruck {
            killed: "b2".into(),
            new_leader: "b1".into(),
            killed_ms: 50_000.0,
            leader_seen_ms: 90_500.0,
            gap_end_ms: 90_300.0,
            leader_seen_real_ms: 2_025.0,
            restarted_ms: None,
        };
        let spec = ClusterSpec {
            nodes: 3,
            restart_after_ms: None,
        };
        let r = ClusterResult::new(spec, ClusterEnd::default(), Some(struck.clone()), &m, 20.0);
        let k = r.kill.unwrap();
        assert_eq!(k.first_grant_ms, Some(91_000.0));
        assert_eq!(k.takeover_ms, Some(41_000.0));
        assert_eq!(k.takeover_real_ms, Some(2_050.0));
        assert_eq!((k.grants_in_gap, k.grants_in_flight_at_kill), (0, 1));
        assert_eq!(k.fallback_calls_in_gap, 1);
        assert!(k.new_leader_took_over);
        // A grant answered before the new leader led is a double grant.
        m.record_grant(grant(51_000.0, 52_000.0));
        let r = ClusterResult::new(spec, ClusterEnd::default(), Some(struck), &m, 20.0);
        assert_eq!(r.kill.unwrap().grants_in_gap, 1);
    }
}
