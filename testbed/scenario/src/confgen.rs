//! The run's plan (the simulated org, its hidden limit changes, the
//! unmanaged consumer) and the two config files generated from it: the
//! simulator's (simulated milliseconds; the simulator scales them itself)
//! and the broker's (real milliseconds: every `*_ms` divided by the time
//! scale, so the broker lives at the same pace as the simulated org).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use crate::cli::Spec;
use crate::error::Error;
use crate::fleet::{wrapup_path, DETAILS_PATH, OBSERVATIONS_PATH};
use crate::relay::OAUTH_SECRET;

/// The org every mode runs against.
pub(crate) const ORG: &str = "org-a";
/// The day of analytics history the ingestion pages through.
pub(crate) const DAY: &str = "2026-11-01";
/// The analytics family's name in the simulator.
pub(crate) const ANALYTICS: &str = "analytics-query";
/// The writes family's name in the simulator.
pub(crate) const WRITES: &str = "conversation-writes";
/// Every family's window, and the token window, simulated ms.
pub(crate) const WINDOW_MS: u64 = 60_000;
/// Documented (and broker-configured) analytics permits per window.
pub(crate) const ANALYTICS_DOCUMENTED: u64 = 60;
/// What the simulator really enforces on analytics queries at first.
pub(crate) const ANALYTICS_HIDDEN: u64 = 45;
/// What it drops to at 40% of the run.
pub(crate) const ANALYTICS_HIDDEN_LOW: u64 = 30;
/// Analytics queries in flight at once, org-wide.
pub(crate) const ANALYTICS_MAX_CONCURRENT: u64 = 10;
/// Documented (and enforced) writes per window, org-wide.
pub(crate) const WRITES_PERMITS: u64 = 300;
/// Per OAuth client token, per window.
pub(crate) const TOKEN_PERMITS: u64 = 300;
/// Unmanaged analytics requests per window, before and after 60% of the run.
pub(crate) const UNMANAGED: (u64, u64) = (5, 10);

/// A change of the analytics family's hidden limit.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub(crate) struct LimitChange {
    /// Simulated time of the change.
    pub(crate) at_ms: u64,
    /// Enforced permits before.
    pub(crate) from: u64,
    /// Enforced permits after.
    pub(crate) to: u64,
}

/// What happens to the org during a run (the same in every mode).
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// Simulated ms the fleet produces work.
    pub(crate) duration_ms: u64,
    /// Hidden-limit changes of the analytics family.
    pub(crate) changes: Vec<LimitChange>,
    /// (from simulated ms, unmanaged requests per window).
    pub(crate) unmanaged: Vec<(u64, u64)>,
    /// Conversations per day of history: enough that the ingestion cannot
    /// finish the day within the run, so its demand exceeds capacity all run.
    pub(crate) conversations_per_day: u64,
    /// `--upstream FILE`: the org it describes replaces the generated one
    /// (then `changes` and `unmanaged` are the file's).
    pub(crate) upstream: Option<UpstreamFile>,
}

/// An org file of `--upstream`: a gcsim config (testbed/gcsim/README.md)
/// whose org `org-a` the fleet runs against instead of the generated one.
#[derive(Clone, Debug)]
pub(crate) struct UpstreamFile {
    /// The file's name without `.toml` (the matrix's row label).
    pub(crate) name: String,
    /// The file as TOML.
    table: toml::Table,
    /// Its analytics family in a line (the report's header).
    pub(crate) summary: String,
    /// Its analytics family's hidden-limit changes.
    changes: Vec<LimitChange>,
    /// Its analytics family's unmanaged steps (from ms, per window).
    unmanaged: Vec<(u64, u64)>,
    /// Whether the unmanaged consumer ramps between its steps (else it
    /// keeps each step's count until the next).
    pub(crate) ramping: bool,
    /// `conversations_per_day` of org-a as the file sets it.
    conversations_per_day: u64,
}

impl UpstreamFile {
    /// The file's simulator config as it is (the time scale and seed it
    /// sets, if any, left as they are).
    pub(crate) fn sim_config(&self) -> Result<gcsim::SimConfig, Error> {
        let text = toml::to_string(&self.table)
            .map_err(|e| Error::Usage(format!("--upstream {}: {e}", self.name)))?;
        gcsim::SimConfig::from_toml(&text)
            .map_err(|e| Error::Usage(format!("--upstream {}: {e}", self.name)))
    }

    /// Reads and checks `path`: a valid gcsim config with org `org-a`
    /// documenting what the broker's config and local mode are set up
    /// with (token 300, analytics 60, writes 300, each per 60 s), and the
    /// two families by their names. What it enforces, and how, is free.
    pub(crate) fn load(path: &Path) -> Result<UpstreamFile, Error> {
        let bad = |why: String| Error::Usage(format!("--upstream {}: {why}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        // gcsim's parse first: its errors say which key and what it must be.
        let config = gcsim::SimConfig::from_toml(&text).map_err(|e| bad(e.to_string()))?;
        config.check().map_err(|e| bad(e.to_string()))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e| bad(format!("bad simulator config: {e}")))?;
        // Left out, gcsim's built-in org and families would run silently.
        let org_table = table
            .get("orgs")
            .and_then(toml::Value::as_array)
            .and_then(|orgs| {
                orgs.iter()
                    .filter_map(toml::Value::as_table)
                    .find(|o| o.get("id").and_then(toml::Value::as_str) == Some(ORG))
            })
            .ok_or_else(|| {
                bad(format!(
                    "no [[orgs]] with id = \"{ORG}\": the file must describe the org the fleet \
                     runs against itself"
                ))
            })?;
        if !org_table.contains_key("families") {
            return Err(bad(format!(
                "[[orgs]] id = \"{ORG}\" has no [[orgs.families]]: the file must describe \
                 families {ANALYTICS} and {WRITES} itself"
            )));
        }
        let org = config
            .orgs
            .iter()
            .find(|o| o.id == ORG)
            .ok_or_else(|| bad(format!("no [[orgs]] with id = \"{ORG}\"")))?;
        if org.day != DAY {
            return Err(bad(format!(
                "[[orgs]] id = \"{ORG}\": day must be \"{DAY}\", the day the ingestion pages \
                 through (left out, it is)"
            )));
        }
        if org.oauth_secret != OAUTH_SECRET {
            return Err(bad(format!(
                "[[orgs]] id = \"{ORG}\": oauth_secret must be \"{OAUTH_SECRET}\", the secret \
                 the scenario's clients log in with (left out, it is)"
            )));
        }
        for (family, path) in [
            (ANALYTICS, DETAILS_PATH.to_owned()),
            (ANALYTICS, OBSERVATIONS_PATH.to_owned()),
            (WRITES, wrapup_path("c1")),
        ] {
            let covered = org
                .families
                .iter()
                .any(|f| f.name == family && f.covers("POST", &path));
            if !covered {
                return Err(bad(format!(
                    "family {family}: its routes must cover POST {path}, which the fleet calls \
                     and the broker meters as {family} (else the fleet's calls are unlimited)"
                )));
            }
        }
        let documented = format!(
            "the broker and local mode are set up with the documented limits (token \
             {TOKEN_PERMITS}, {ANALYTICS} {ANALYTICS_DOCUMENTED}, {WRITES} {WRITES_PERMITS}, \
             each per {WINDOW_MS} ms): the file must document those (what it enforces is free)"
        );
        if (org.token_permits, org.token_window_ms) != (TOKEN_PERMITS, WINDOW_MS) {
            return Err(bad(format!(
                "[[orgs]] id = \"{ORG}\": token_permits = {}, token_window_ms = {} must be \
                 {TOKEN_PERMITS} and {WINDOW_MS}: {documented}",
                org.token_permits, org.token_window_ms
            )));
        }
        // Each key that differs is named with what it must be.
        let family = |name: &str, permits: u64| {
            let Some(f) = org.families.iter().find(|f| f.name == name) else {
                return Err(bad(format!(
                    "needs families {ANALYTICS} and {WRITES} (no {name}); {documented}"
                )));
            };
            if (f.documented_permits, f.window_ms) != (permits, WINDOW_MS) {
                return Err(bad(format!(
                    "family {name}: documented_permits = {}, window_ms = {} must be {permits} \
                     and {WINDOW_MS}: {documented}",
                    f.documented_permits, f.window_ms
                )));
            }
            Ok(f)
        };
        let analytics = family(ANALYTICS, ANALYTICS_DOCUMENTED)?;
        family(WRITES, WRITES_PERMITS)?;
        let mut steps = analytics.schedule.clone();
        steps.sort_by_key(|s| s.at_ms);
        let mut from = analytics
            .hidden_permits
            .unwrap_or(analytics.documented_permits);
        let first = from;
        let changes = steps
            .iter()
            .map(|s| {
                let c = LimitChange {
                    at_ms: s.at_ms,
                    from,
                    to: s.hidden_permits,
                };
                from = s.hidden_permits;
                c
            })
            .collect();
        let mut unmanaged: Vec<(u64, u64)> = analytics
            .unmanaged
            .iter()
            .map(|s| (s.at_ms, s.per_window))
            .collect();
        unmanaged.sort_unstable();
        let mut summary = format!(
            "{} (file {}): {ANALYTICS} {}",
            path.file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned()),
            path.display(),
            analytics.kind.as_str()
        );
        if analytics.kind == gcsim::LimitKind::TokenBucket {
            let _ = write!(summary, " (burst {})", analytics.burst.unwrap_or(first));
        }
        let _ = write!(
            summary,
            ", documented {}, hidden {first}, max concurrent {}, {}, Retry-After {}; unmanaged {}",
            analytics.documented_permits,
            analytics
                .max_concurrent
                .map_or_else(|| "none".into(), |n| n.to_string()),
            match (org.token_tell, analytics.tell) {
                (_, true) => "tells its limit in headers",
                (true, false) => "headers tell the token limit only",
                (false, false) => "silent (no rate-limit headers)",
            },
            match analytics.retry_after {
                gcsim::RetryAfter::Exact => "exact",
                gcsim::RetryAfter::WholeSeconds => "whole seconds",
            },
            match analytics.unmanaged_pattern {
                gcsim::UnmanagedPattern::Steady => "steady",
                gcsim::UnmanagedPattern::Bursty => "bursty",
                gcsim::UnmanagedPattern::Ramping => "ramping",
            }
        );
        Ok(UpstreamFile {
            name: path.file_stem().map_or_else(
                || path.display().to_string(),
                |s| s.to_string_lossy().into_owned(),
            ),
            table,
            summary,
            changes,
            unmanaged,
            ramping: analytics.unmanaged_pattern == gcsim::UnmanagedPattern::Ramping,
            conversations_per_day: org.conversations_per_day,
        })
    }
}

impl Plan {
    /// The plan for a run of `duration_s` simulated seconds: the hidden
    /// limit drops 45 → 30 at 40% of the run and comes back at 75% when that
    /// leaves at least 4 windows after the drop; the unmanaged consumer
    /// doubles at 60%.
    pub(crate) fn new(duration_s: u64) -> Plan {
        let duration_ms = duration_s * 1000;
        let drop_at = duration_ms * 2 / 5;
        let back_at = duration_ms * 3 / 4;
        let mut changes = vec![LimitChange {
            at_ms: drop_at,
            from: ANALYTICS_HIDDEN,
            to: ANALYTICS_HIDDEN_LOW,
        }];
        if back_at - drop_at >= 4 * WINDOW_MS {
            changes.push(LimitChange {
                at_ms: back_at,
                from: ANALYTICS_HIDDEN_LOW,
                to: ANALYTICS_HIDDEN,
            });
        }
        Plan {
            duration_ms,
            changes,
            unmanaged: vec![(0, UNMANAGED.0), (duration_ms * 3 / 5, UNMANAGED.1)],
            // At most the documented 60 pages of 100 per minute could be
            // fetched: 100 conversations per second of run is more than that.
            conversations_per_day: (100 * duration_s).max(20_000),
            upstream: None,
        }
    }

    /// The plan of a run of `duration_s` against `file`'s org: its own
    /// hidden-limit changes (those within the run) and unmanaged consumer.
    pub(crate) fn with_upstream(duration_s: u64, file: UpstreamFile) -> Plan {
        let mut plan = Plan::new(duration_s);
        plan.changes = file
            .changes
            .iter()
            .copied()
            .filter(|c| c.at_ms < plan.duration_ms)
            .collect();
        plan.unmanaged = file.unmanaged.clone();
        plan.conversations_per_day = plan.conversations_per_day.max(file.conversations_per_day);
        plan.upstream = Some(file);
        plan
    }

    /// Whether what is left for the fleet moves within the run: a hidden
    /// limit change, or the unmanaged consumer changing its pace in a
    /// window that starts before production ends (a step counts from the
    /// first window at or after it; a ramping one moves from the window
    /// after its step's).
    pub(crate) fn moves(&self) -> bool {
        let starts = |at: u64| at.div_ceil(WINDOW_MS) * WINDOW_MS;
        let ramping = self.upstream.as_ref().is_some_and(|f| f.ramping);
        let stepped = self
            .unmanaged
            .iter()
            .any(|&(at, _)| at > 0 && starts(at) < self.duration_ms);
        let ramps = ramping
            && self
                .unmanaged
                .windows(2)
                .any(|w| w[0].1 != w[1].1 && starts(w[0].0) + WINDOW_MS < self.duration_ms);
        !self.changes.is_empty() || stepped || ramps
    }

    /// The simulator's config file: generated, or the `--upstream` file
    /// with the run's scale and seed, and enough history for the run.
    pub(crate) fn sim_toml(&self, spec: &Spec) -> String {
        if let Some(file) = &self.upstream {
            let mut table = file.table.clone();
            table.insert("time_scale".into(), toml::Value::Float(spec.scale));
            table.insert("seed".into(), toml::Value::Integer(spec.seed as i64));
            if let Some(orgs) = table.get_mut("orgs").and_then(|o| o.as_array_mut()) {
                for org in orgs.iter_mut().filter_map(|o| o.as_table_mut()) {
                    if org.get("id").and_then(|v| v.as_str()) == Some(ORG) {
                        org.insert(
                            "conversations_per_day".into(),
                            toml::Value::Integer(self.conversations_per_day as i64),
                        );
                    }
                }
            }
            return toml::to_string(&table).unwrap_or_default();
        }
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(s, "time_scale = {:?}\nseed = {}\n", spec.scale, spec.seed);
        let _ = writeln!(
            s,
            "[[orgs]]\nid = \"{ORG}\"\ntoken_permits = {TOKEN_PERMITS}\ntoken_window_ms = {WINDOW_MS}\n\
             conversations_per_day = {}\nday = \"{DAY}\"\n",
            self.conversations_per_day
        );
        let schedule: Vec<String> = self
            .changes
            .iter()
            .map(|c| format!("{{ at_ms = {}, hidden_permits = {} }}", c.at_ms, c.to))
            .collect();
        let unmanaged: Vec<String> = self
            .unmanaged
            .iter()
            .map(|(at, n)| format!("{{ at_ms = {at}, per_window = {n} }}"))
            .collect();
        let _ = writeln!(
            s,
            "  [[orgs.families]]\n  name = \"{ANALYTICS}\"\n  routes = [\"POST /api/v2/analytics/**/query\"]\n  \
             documented_permits = {ANALYTICS_DOCUMENTED}\n  hidden_permits = {ANALYTICS_HIDDEN}\n  \
             window_ms = {WINDOW_MS}\n  max_concurrent = {ANALYTICS_MAX_CONCURRENT}\n  \
             schedule = [{}]\n  unmanaged = [{}]\n",
            schedule.join(", "),
            unmanaged.join(", ")
        );
        let _ = writeln!(
            s,
            "  [[orgs.families]]\n  name = \"{WRITES}\"\n  routes = [\"POST /api/v2/conversations/**\"]\n  \
             documented_permits = {WRITES_PERMITS}\n  window_ms = {WINDOW_MS}"
        );
        s
    }
}

/// A cluster node's config: [`broker_toml`] on `listen`, no state directory (the snapshot is
/// in etcd), and a `[cluster]` section: etcd at `etcd`, node name `node`,
/// advertised at its listen address, the shortest etcd lease (`ttl_ms`,
/// real) and half of it as the safety margin. The lease and margin are real
/// time, not scaled: etcd counts whole seconds.
pub(crate) fn cluster_node_toml(
    scale: f64,
    listen: SocketAddr,
    etcd: &str,
    node: &str,
    ttl_ms: u64,
) -> String {
    let mut s = broker_toml(scale, Some(listen), None);
    let _ = writeln!(
        s,
        "\n\n[cluster]\netcd = [\"{etcd}\"]\nnode = \"{node}\"\nadvertise = \"http://{listen}\"\n\
         prefix = \"/quota-broker\"\nlease_ttl_ms = {ttl_ms}\nsafety_margin_ms = {}",
        ttl_ms / 2
    );
    s
}

/// The broker's config file for a run at `scale`, listening on `listen`
/// (a child reads it; in process it is ignored), keeping its state in
/// `state_dir` (None: nothing kept; chaos runs keep it, so that the
/// restarted broker starts as after a crash), with no HTTP port (nothing
/// here reads it, and the default one belongs to a real broker). Tenant `org-a` is set up
/// with the documented limits only: the broker has to learn the hidden one.
pub(crate) fn broker_toml(
    scale: f64,
    listen: Option<SocketAddr>,
    state_dir: Option<&Path>,
) -> String {
    // A simulated duration in real ms, at least 1.
    let ms = |sim_ms: f64| (sim_ms / scale).round().max(1.0) as u64;
    // A JSON string is a TOML basic string (quotes and backslashes escaped).
    let state_dir = serde_json::to_string(
        &state_dir.map_or(String::new(), |p| p.to_string_lossy().into_owned()),
    )
    .unwrap_or_else(|_| "\"\"".into());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "[server]\nhttp_listen = \"\"\nmax_wait_ms = {}\nmax_lease_ttl_ms = {}\nshutdown_grace_ms = 1000\nstate_dir = {state_dir}",
        ms(60_000.0),
        ms(600_000.0)
    );
    if let Some(listen) = listen {
        let _ = writeln!(s, "listen = \"{listen}\"");
    }
    // The learning durations of examples/broker.toml, scaled; the ratio
    // window may not be shorter than 1 s (the CLI caps the scale at 60).
    let _ = writeln!(
        s,
        "\n[learning]\ndefault_freeze_ms = {}\nepisode_grace_ms = {}\nratio_window_ms = {}\ncooldown_ms = {}\n",
        ms(10_000.0),
        ms(2_000.0),
        ms(60_000.0).max(1000),
        ms(3_600_000.0)
    );
    for (name, order, weight, reserve, wait) in [
        ("critical", 0, 8, 0.1, 2_000.0),
        ("interactive", 1, 4, 0.1, 500.0),
        ("batch", 2, 2, 0.0, 30_000.0),
        ("best_effort", 3, 1, 0.0, 0.0),
    ] {
        let wait = if wait > 0.0 { ms(wait) } else { 0 };
        let _ = writeln!(
            s,
            "[[classes]]\nname = \"{name}\"\norder = {order}\nweight = {weight}\nreserve = {reserve:?}\n\
             default_max_wait_ms = {wait}\n"
        );
    }
    let window = ms(WINDOW_MS as f64);
    let _ = writeln!(
        s,
        "[[tenants]]\nid = \"{ORG}\"\n\n\
         [[tenants.buckets]]\nname = \"per-client\"\nscope = \"oauth_client\"\nroutes = [\"* /**\"]\n\
         permits = {TOKEN_PERMITS}\nwindow_ms = {window}\nburst = {TOKEN_PERMITS}\n\n\
         [[tenants.buckets]]\nname = \"{ANALYTICS}\"\nscope = \"org\"\nroutes = [\"POST /api/v2/analytics/**/query\"]\n\
         permits = {ANALYTICS_DOCUMENTED}\nwindow_ms = {window}\nburst = 10\n\
         max_in_flight = {ANALYTICS_MAX_CONCURRENT}\nlease_ttl_ms = {}\n\n\
         [[tenants.buckets]]\nname = \"{WRITES}\"\nscope = \"org\"\nroutes = [\"POST /api/v2/conversations/**\"]\n\
         permits = {WRITES_PERMITS}\nwindow_ms = {window}",
        ms(30_000.0)
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_changes() {
        let full = Plan::new(300);
        assert_eq!(full.changes.len(), 1);
        assert_eq!(full.changes[0].at_ms, 120_000);
        assert_eq!(full.unmanaged, [(0, 5), (180_000, 10)]);
        let long = Plan::new(1200);
        assert_eq!(long.changes.len(), 2);
        assert_eq!(long.changes[1].at_ms, 900_000);
        assert_eq!(long.changes[1].to, ANALYTICS_HIDDEN);
    }

    #[test]
    fn broker_accepts_its_config() {
        let listen = SocketAddr::from(([127, 0, 0, 1], 4321));
        let settings =
            quota_broker::Settings::from_toml(&broker_toml(20.0, Some(listen), None)).unwrap();
        assert_eq!(settings.server.listen, listen);
        assert!(settings.server.http_listen.is_none());
        assert_eq!(settings.server.state_dir, None);
        let dir = Path::new("/tmp/scenario \"x\"/broker-state");
        let kept =
            quota_broker::Settings::from_toml(&broker_toml(20.0, Some(listen), Some(dir))).unwrap();
        assert_eq!(kept.server.state_dir.as_deref(), Some(dir));
        assert_eq!(settings.server.max_wait.as_millis(), 3000);
        assert_eq!(settings.learning.default_freeze.as_millis(), 500);
        let tenant = &settings.tenants[0];
        assert_eq!(tenant.id, ORG);
        let analytics = tenant.buckets.iter().find(|b| b.name == ANALYTICS).unwrap();
        assert_eq!(analytics.rate.as_ref().unwrap().window.as_millis(), 3000);
        assert_eq!(analytics.lease_ttl.as_millis(), 1500);
        let critical = settings
            .classes
            .iter()
            .find(|c| c.name == "critical")
            .unwrap();
        assert_eq!(critical.default_max_wait.as_millis(), 100);
    }

    #[test]
    fn cluster_node_config_is_valid() {
        let listen: SocketAddr = "127.0.0.1:4321".parse().unwrap();
        let toml = cluster_node_toml(20.0, listen, "http://127.0.0.1:2379", "b1", 2000);
        let settings = quota_broker::Settings::from_toml(&toml).unwrap();
        assert_eq!(settings.server.listen, listen);
        assert!(settings.server.http_listen.is_none());
        let cluster = settings.cluster.expect("a [cluster] section");
        assert_eq!(cluster.node, "b1");
        assert_eq!(cluster.advertise, "http://127.0.0.1:4321");
        assert_eq!(cluster.lease_ttl.as_millis(), 2000);
        assert_eq!(cluster.safety_margin.as_millis(), 1000);
    }

    #[test]
    fn sim_config_is_toml() {
        let spec_toml = Plan::new(300).sim_toml(&test_spec());
        let value: toml::Table = spec_toml.parse().unwrap();
        let orgs = value["orgs"].as_array().unwrap();
        let families = orgs[0]["families"].as_array().unwrap();
        assert_eq!(families[0]["schedule"].as_array().unwrap().len(), 1);
        assert_eq!(families[0]["hidden_permits"].as_integer(), Some(45));
    }

    fn shipped(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("upstreams")
            .join(name)
    }

    #[test]
    fn genesys_fixed_file_is_the_generated_org_at_300_s() {
        let spec = test_spec();
        let file = UpstreamFile::load(&shipped("genesys-fixed.toml")).unwrap();
        assert_eq!(file.name, "genesys-fixed");
        let generated = Plan::new(300);
        let from_file = Plan::with_upstream(300, file);
        let parse = |t: &str| format!("{:?}", gcsim::SimConfig::from_toml(t).unwrap());
        assert_eq!(
            parse(&from_file.sim_toml(&spec)),
            parse(&generated.sim_toml(&spec))
        );
        assert_eq!(from_file.unmanaged, generated.unmanaged);
        assert_eq!(
            format!("{:?}", from_file.changes),
            format!("{:?}", generated.changes)
        );
    }

    /// Only what changes within the run makes it one whose limit moves
    /// (the 1 % target instead of 0.5 %): genesys-fixed's drop at 120 s and
    /// its consumer's step at 180 s are past a 120 s run's end.
    #[test]
    fn the_limit_moves_only_with_a_change_within_the_run() {
        let fixed = || UpstreamFile::load(&shipped("genesys-fixed.toml")).unwrap();
        assert!(!Plan::with_upstream(120, fixed()).moves());
        assert!(Plan::with_upstream(180, fixed()).moves());
        let silent = UpstreamFile::load(&shipped("token-bucket-silent.toml")).unwrap();
        assert!(!Plan::with_upstream(600, silent).moves());
        let ramping = UpstreamFile::load(&shipped("token-bucket-telling-ramping.toml")).unwrap();
        assert!(Plan::with_upstream(300, ramping).moves());
    }

    #[test]
    fn every_shipped_upstream_loads_and_gets_the_runs_scale_and_seed() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("upstreams");
        let mut n = 0;
        let files = std::fs::read_dir(&dir)
            .unwrap()
            .chain(std::fs::read_dir(dir.join("held-out")).unwrap())
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"));
        for path in files {
            let file = UpstreamFile::load(&path).unwrap_or_else(|e| panic!("{e}"));
            let text = Plan::with_upstream(120, file).sim_toml(&test_spec());
            let config = gcsim::SimConfig::from_toml(&text).unwrap();
            config.check().unwrap();
            assert_eq!((config.time_scale, config.seed), (10.0, 7));
            assert!(config.orgs[0].conversations_per_day >= 20_000);
            n += 1;
        }
        assert!(n >= 3);
        let silent = UpstreamFile::load(&shipped("token-bucket-silent.toml")).unwrap();
        assert!(
            silent.summary.contains("token_bucket"),
            "{}",
            silent.summary
        );
        assert!(silent.summary.contains("silent"), "{}", silent.summary);
        assert!(silent.changes.is_empty());
    }

    #[test]
    fn an_upstream_must_document_what_the_broker_is_told() {
        let dir = std::env::temp_dir().join(format!("scenario-upstream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        let text = std::fs::read_to_string(shipped("genesys-fixed.toml"))
            .unwrap()
            .replace("documented_permits = 60", "documented_permits = 50");
        std::fs::write(&path, text).unwrap();
        let err = UpstreamFile::load(&path).unwrap_err().to_string();
        assert!(err.contains("must document"), "{err}");
        // The key that differs, and what it must be.
        assert!(
            err.contains("family analytics-query: documented_permits = 50"),
            "{err}"
        );
        assert!(err.contains("must be 60 and 60000"), "{err}");
        std::fs::write(&path, "[[orgs]]\nid = \"org-b\"").unwrap();
        assert!(UpstreamFile::load(&path).is_err());
        let fixed = std::fs::read_to_string(shipped("genesys-fixed.toml")).unwrap();
        // Each: the file, and what the error must say.
        for (text, says) in [
            (String::new(), "no [[orgs]] with id = \"org-a\""),
            ("time_scale = 2.0".into(), "no [[orgs]] with id = \"org-a\""),
            (
                "[[orgs]]\nid = \"org-a\"".into(),
                "has no [[orgs.families]]",
            ),
            (
                fixed.replace("**/query", "**/querry"),
                "family analytics-query: its routes must cover POST /api/v2/analytics/conversations/details/query",
            ),
            (
                fixed.replace(
                    "POST /api/v2/analytics/**/query",
                    "POST /api/v2/analytics/conversations/**/query",
                ),
                "must cover POST /api/v2/analytics/queues/observations/query",
            ),
            (
                fixed.replace("POST /api/v2/conversations/**", "POST /api/v2/conversation/**"),
                "family conversation-writes: its routes must cover",
            ),
            (
                fixed.replace("[[orgs]]\nid = \"org-a\"", "[[orgs]]\nid = \"org-a\"\nday = \"2026-11-02\""),
                "day must be \"2026-11-01\"",
            ),
            (
                fixed.replace("[[orgs]]\nid = \"org-a\"", "[[orgs]]\nid = \"org-a\"\noauth_secret = \"other\""),
                "oauth_secret must be \"gcsim-secret\"",
            ),
            (
                fixed.replace("hidden_permits = 45", "hidden_permits = 99999999999999999999"),
                "bad simulator config",
            ),
        ] {
            std::fs::write(&path, &text).unwrap();
            let err = UpstreamFile::load(&path).unwrap_err().to_string();
            assert!(err.contains(&format!("--upstream {}", path.display())), "{err}");
            assert!(err.contains(says), "{says:?} not in {err}");
        }
        assert!(UpstreamFile::load(&dir.join("missing.toml")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn test_spec() -> Spec {
        Spec {
            duration_s: 300,
            scale: 10.0,
            seed: 7,
            json: false,
            modes: vec![],
            upstreams: vec![],
            matrix: None,
            paced: None,
            rise_late: vec![0.0],
            gcsim_bin: None,
            broker: crate::cli::BrokerSource::InProcess,
            keep_logs: None,
            chaos: None,
            cluster: None,
            command: String::new(),
        }
    }
}
