//! The command line: flags, presets, and the resolved [`Spec`] of one run
//! (what every other module reads; nothing else looks at the flags).

use std::path::{Path, PathBuf};

use clap::{Parser, ValueEnum};

use crate::confgen::UpstreamFile;
use crate::error::Error;

/// Runs the same fleet against fresh simulated Genesys Cloud orgs four ways
/// (naive clients, clients with a local token bucket, clients leased by the
/// quota broker, and leased with the call-flow writes through gc-relay) and
/// prints one table.
#[derive(Debug, Parser)]
#[command(name = "scenario", version)]
pub(crate) struct Args {
    /// Simulated seconds the fleet produces work (then it drains); at least
    /// 60. Goodput leaves out the first window (the fleet starting), so it
    /// needs 120 or more.
    #[arg(long, value_name = "SIM_SECONDS")]
    pub(crate) duration: Option<u64>,
    /// Every window, latency and Retry-After lasts 1/N as long in real time,
    /// in the simulator and the broker config alike; at most 60.
    #[arg(long, value_name = "N")]
    pub(crate) time_scale: Option<f64>,
    /// Seed of the simulator's data and of the fleet's random arrivals.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// `ci`: 120 s at scale 20 (about 6 s real per mode); `full`: 300 s at
    /// scale 10. `--duration` / `--time-scale` override a preset.
    #[arg(long, value_enum)]
    pub(crate) preset: Option<Preset>,
    /// Modes to run, in this order (default: naive,local,broker,relay; with
    /// `--matrix`, broker).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(crate) modes: Option<Vec<ModeName>>,
    /// Run against the org in this gcsim config file instead of the
    /// generated one (testbed/scenario/README.md says what it must
    /// document); repeat it to run against each in turn.
    #[arg(long, value_name = "FILE")]
    pub(crate) upstream: Vec<PathBuf>,
    /// Run every `--upstream` file × every seed of `--seeds` and print one
    /// table (or `--json`) of a few figures per cell.
    #[arg(long, requires = "upstream")]
    pub(crate) matrix: bool,
    /// With `--matrix`: the seeds (default: `--seed`).
    #[arg(long, value_delimiter = ',', requires = "matrix")]
    pub(crate) seeds: Vec<u64>,
    /// Instead of running the fleet: play each `--upstream` file's
    /// analytics family in process against calls sent evenly at each of
    /// these percentages of what is left for the fleet (the enforced
    /// permits less the unmanaged consumer's demand, as they change), with
    /// no broker, and print what each was served as the matrix counts it:
    /// what a broker that had learned what is left exactly, and not when
    /// the consumer sends, could get. Takes milliseconds.
    #[arg(
        long,
        value_name = "PERCENT",
        value_delimiter = ',',
        requires = "upstream"
    )]
    pub(crate) paced: Vec<f64>,
    /// With `--paced`: the pace follows a rise of what is left this many
    /// of the family's windows after it (a drop at once), each in turn:
    /// what a broker that finds a rise that late could be served.
    #[arg(
        long,
        value_name = "WINDOWS",
        value_delimiter = ',',
        requires = "paced"
    )]
    pub(crate) rise_late: Vec<f64>,
    /// Run this `gcsim` binary as the simulator (default: the gcsim library
    /// in this process, on its own socket).
    #[arg(long, value_name = "PATH")]
    pub(crate) gcsim_bin: Option<PathBuf>,
    /// The `quota-broker` binary (default: next to this one; else in process).
    #[arg(long, value_name = "PATH")]
    pub(crate) broker_bin: Option<PathBuf>,
    /// Run the broker inside this process (the quota-broker library) even if
    /// a binary is there: no stale binary can be picked up.
    #[arg(long)]
    pub(crate) broker_in_process: bool,
    /// Write each mode's `/_sim/stats` and `/_sim/log` to this directory
    /// (and a child broker's logs, `broker-0.log`, then one per restart);
    /// with several `--upstream` files one folder each (`DIR/<file>/`), with
    /// `--matrix` one per cell (`DIR/<file>-seed<N>/`).
    #[arg(long, value_name = "DIR")]
    pub(crate) keep_logs: Option<PathBuf>,
    /// Chaos, in broker mode: SIGKILL the broker (a child process) at this
    /// simulated second and restart it on the same port and state
    /// directory; the table gains the outage's figures.
    #[arg(long, value_name = "SIM_SECONDS")]
    pub(crate) chaos_kill_at: Option<f64>,
    /// With `--chaos-kill-at`: simulated seconds the broker stays down
    /// before it is started again (default 0: at once, as a supervisor
    /// would).
    #[arg(long, value_name = "SIM_SECONDS", requires = "chaos_kill_at")]
    pub(crate) chaos_down_for: Option<f64>,
    /// Broker modes run against a cluster of N broker processes on a real
    /// etcd (installed as Debian `etcd-server` if missing) instead of one
    /// broker; the fleet's clients get every broker's URL and follow the
    /// tenant's leader. With `--chaos-kill-at` the leader of the org's
    /// tenant is SIGKILLed then (and started again after `--chaos-down-for`
    /// if given; without it, it stays down) and the table gains the
    /// take-over's figures.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(2..=9))]
    pub(crate) cluster: Option<u8>,
}

/// A named set of defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Preset {
    /// Short: runs in CI as a test.
    Ci,
    /// The benchmark run.
    Full,
}

/// One way of running the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ModeName {
    /// Send; on a 429 sleep the Retry-After and send again.
    Naive,
    /// A local token bucket per client process at the documented rate, cut
    /// by 20% for an hour whenever more than 1% of its calls over a minute
    /// were refused.
    Local,
    /// Every call leased by the quota broker.
    Broker,
    /// As broker, but the trunks' writes go through gc-relay (the
    /// Architect call-flow relay).
    Relay,
}

impl ModeName {
    /// The name on the command line and in the output.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ModeName::Naive => "naive",
            ModeName::Local => "local",
            ModeName::Broker => "broker",
            ModeName::Relay => "broker+relay",
        }
    }
}

/// Where the broker of broker mode comes from.
#[derive(Clone, Debug)]
pub(crate) enum BrokerSource {
    /// A child process running this binary.
    Binary(PathBuf),
    /// The quota-broker library, in this process.
    InProcess,
}

/// Broker mode's chaos: when the broker is killed, how long it stays down.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Chaos {
    /// Simulated ms of the SIGKILL.
    pub(crate) kill_at_ms: f64,
    /// Simulated ms between the kill and the restart.
    pub(crate) down_for_ms: f64,
}

/// `--cluster`: how many brokers, and the leader kill's restart.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ClusterSpec {
    /// Broker processes.
    pub(crate) nodes: usize,
    /// With `--chaos-kill-at`: simulated ms from the kill to the killed
    /// leader's restart (None: it stays down).
    pub(crate) restart_after_ms: Option<f64>,
}

/// Everything a run needs, resolved from the flags.
#[derive(Clone, Debug)]
pub(crate) struct Spec {
    /// Simulated seconds of production.
    pub(crate) duration_s: u64,
    /// One real second is `scale` simulated seconds.
    pub(crate) scale: f64,
    /// Seed of everything random.
    pub(crate) seed: u64,
    /// Output format.
    pub(crate) json: bool,
    /// Modes, in order.
    pub(crate) modes: Vec<ModeName>,
    /// `--upstream` files, in order (empty: the generated org).
    pub(crate) upstreams: Vec<UpstreamFile>,
    /// `--matrix`: its seeds.
    pub(crate) matrix: Option<Vec<u64>>,
    /// `--paced`: its percentages of what is left.
    pub(crate) paced: Option<Vec<f64>>,
    /// `--rise-late`: how many windows late the pace follows a rise (`[0]`
    /// when not given).
    pub(crate) rise_late: Vec<f64>,
    /// The simulator binary, if there is one to run.
    pub(crate) gcsim_bin: Option<PathBuf>,
    /// Where the broker comes from.
    pub(crate) broker: BrokerSource,
    /// Where to keep each mode's simulator stats and log.
    pub(crate) keep_logs: Option<PathBuf>,
    /// Kill and restart the broker mid-run (broker mode only); with
    /// `cluster`, the tenant's leader.
    pub(crate) chaos: Option<Chaos>,
    /// Broker modes against a cluster of brokers on etcd.
    pub(crate) cluster: Option<ClusterSpec>,
    /// The command line, for the report.
    pub(crate) command: String,
}

/// Largest time scale: the broker's `learning.ratio_window_ms` must stay at
/// least 1000 ms, i.e. a 60 s window shrunk at most 60 times.
pub(crate) const MAX_SCALE: f64 = 60.0;

impl Args {
    /// Resolves presets, defaults and binary paths.
    pub(crate) fn resolve(self) -> Result<Spec, Error> {
        let (duration, scale) = match self.preset {
            Some(Preset::Ci) => (120, 20.0),
            Some(Preset::Full) | None => (300, 10.0),
        };
        let duration_s = self.duration.unwrap_or(duration);
        let scale = self.time_scale.unwrap_or(scale);
        if !(scale.is_finite() && (1.0..=MAX_SCALE).contains(&scale)) {
            return Err(Error::Usage(format!(
                "--time-scale {scale} must be between 1 and {MAX_SCALE}"
            )));
        }
        if duration_s < 60 {
            return Err(Error::Usage(format!(
                "--duration {duration_s} must be at least 60 (one window)"
            )));
        }
        let default_modes = if self.matrix {
            vec![ModeName::Broker]
        } else {
            vec![
                ModeName::Naive,
                ModeName::Local,
                ModeName::Broker,
                ModeName::Relay,
            ]
        };
        let mut modes = Vec::new();
        for m in self.modes.unwrap_or(default_modes) {
            if !modes.contains(&m) {
                modes.push(m);
            }
        }
        if modes.is_empty() {
            return Err(Error::Usage("--modes names no mode".into()));
        }
        // None: in process, not a sibling binary, which may be stale
        // (`cargo run -p scenario` rebuilds only this one).
        let gcsim_bin = self
            .gcsim_bin
            .map(|p| {
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(Error::MissingBinary(p))
                }
            })
            .transpose()?;
        let chaos = self
            .chaos_kill_at
            .map(|at| chaos(at, self.chaos_down_for.unwrap_or(0.0), duration_s, &modes))
            .transpose()?;
        let kills_a_process = chaos.is_some() || self.cluster.is_some();
        let broker = match (self.broker_in_process, self.broker_bin) {
            (true, _) if self.cluster.is_some() => {
                return Err(Error::Usage(
                    "--cluster runs broker processes: drop --broker-in-process".into(),
                ))
            }
            (true, _) if chaos.is_some() => {
                return Err(Error::Usage(
                    "--chaos-kill-at kills the broker process: it cannot run in process \
                     (drop --broker-in-process)"
                        .into(),
                ))
            }
            (true, _) => BrokerSource::InProcess,
            (false, Some(p)) if p.is_file() => BrokerSource::Binary(p),
            (false, Some(p)) => return Err(Error::MissingBinary(p)),
            (false, None) => match sibling("quota-broker") {
                Some(p) => BrokerSource::Binary(p),
                None if kills_a_process => {
                    return Err(Error::Usage(format!(
                        "--chaos-kill-at and --cluster run the broker as a child process, and there is no \
                         quota-broker next to this binary ({}): build it (`cargo build \
                         --release -p quota-broker` for a release scenario) or pass \
                         --broker-bin PATH",
                        sibling_path("quota-broker")
                            .map_or_else(|| "?".into(), |p| p.display().to_string())
                    )))
                }
                None => BrokerSource::InProcess,
            },
        };
        if self.cluster.is_some() && self.matrix {
            return Err(Error::Usage(
                "--cluster and --matrix do not go together".into(),
            ));
        }
        if self.cluster.is_some()
            && !modes
                .iter()
                .any(|m| matches!(m, ModeName::Broker | ModeName::Relay))
        {
            return Err(Error::Usage(
                "--cluster runs the broker modes against a cluster: add broker to --modes".into(),
            ));
        }
        let cluster = self.cluster.map(|n| ClusterSpec {
            nodes: usize::from(n),
            restart_after_ms: chaos.and(self.chaos_down_for).map(|s| s * 1000.0),
        });
        if chaos.is_some() && self.matrix {
            return Err(Error::Usage(
                "--chaos-kill-at and --matrix do not go together".into(),
            ));
        }
        let upstreams = self
            .upstream
            .iter()
            .map(|p| UpstreamFile::load(p))
            .collect::<Result<Vec<_>, _>>()?;
        // The name labels the matrix's rows and the kept logs' folders.
        for (i, file) in upstreams.iter().enumerate() {
            if let Some(j) = upstreams[..i].iter().position(|f| f.name == file.name) {
                return Err(Error::Usage(format!(
                    "--upstream {} and --upstream {} have the same name {:?} (the file \
                     name without .toml labels the rows and the kept logs): rename one",
                    self.upstream[j].display(),
                    self.upstream[i].display(),
                    file.name
                )));
            }
        }
        let matrix = self.matrix.then(|| {
            let mut seeds = Vec::new();
            for &seed in &self.seeds {
                if !seeds.contains(&seed) {
                    seeds.push(seed);
                }
            }
            if seeds.is_empty() {
                seeds.push(self.seed);
            }
            seeds
        });
        let paced = if self.paced.is_empty() {
            None
        } else {
            if self.matrix || self.cluster.is_some() || chaos.is_some() {
                return Err(Error::Usage(
                    "--paced runs no fleet: drop --matrix, --cluster and --chaos-kill-at".into(),
                ));
            }
            if let Some(bad) = self
                .paced
                .iter()
                .find(|p| !(p.is_finite() && **p > 0.0 && **p <= 1000.0))
            {
                return Err(Error::Usage(format!(
                    "--paced {bad}: each must be a percentage of what is left above 0 and at \
                     most 1000"
                )));
            }
            Some(self.paced)
        };
        if let Some(bad) = self
            .rise_late
            .iter()
            .find(|w| !(w.is_finite() && **w >= 0.0 && **w <= 100.0))
        {
            return Err(Error::Usage(format!(
                "--rise-late {bad}: each must be a number of windows from 0 to 100"
            )));
        }
        let rise_late = if self.rise_late.is_empty() {
            vec![0.0]
        } else {
            self.rise_late
        };
        if let Some(dir) = &self.keep_logs {
            writable_dir(dir)?;
        }
        Ok(Spec {
            duration_s,
            scale,
            seed: self.seed,
            json: self.json,
            modes,
            upstreams,
            matrix,
            paced,
            rise_late,
            gcsim_bin,
            broker,
            keep_logs: self.keep_logs,
            chaos,
            cluster,
            command: std::env::args().collect::<Vec<_>>().join(" "),
        })
    }
}

/// Checks the chaos flags: the kill falls within production, and the
/// restart too, and there is a broker mode to kill the broker of.
fn chaos(
    kill_at_s: f64,
    down_for_s: f64,
    duration_s: u64,
    modes: &[ModeName],
) -> Result<Chaos, Error> {
    if !modes.contains(&ModeName::Broker) {
        return Err(Error::Usage(
            "--chaos-kill-at kills the broker of broker mode: add broker to --modes".into(),
        ));
    }
    if !(down_for_s.is_finite() && down_for_s >= 0.0) {
        return Err(Error::Usage(format!(
            "--chaos-down-for {down_for_s} must be a number of simulated seconds ≥ 0"
        )));
    }
    let end = duration_s as f64;
    if !(kill_at_s.is_finite() && kill_at_s > 0.0 && kill_at_s + down_for_s < end) {
        return Err(Error::Usage(format!(
            "--chaos-kill-at {kill_at_s} (+ --chaos-down-for {down_for_s}) must fall within \
             the {duration_s} simulated seconds of production"
        )));
    }
    Ok(Chaos {
        kill_at_ms: kill_at_s * 1000.0,
        down_for_ms: down_for_s * 1000.0,
    })
}

/// Creates `dir` (a `--keep-logs` folder) if needed and checks that a
/// file can be written in it, so that a bad folder fails before a run.
pub(crate) fn writable_dir(dir: &Path) -> Result<(), Error> {
    let bad = |e: std::io::Error| {
        Error::Usage(format!(
            "--keep-logs {}: not a folder this process can write ({e})",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(bad)?;
    let probe = dir.join(format!(".scenario-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(bad)?;
    std::fs::remove_file(&probe).map_err(bad)
}

/// Where `name` would be next to this executable.
fn sibling_path(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(
        exe.parent()?
            .join(format!("{name}{}", std::env::consts::EXE_SUFFIX)),
    )
}

/// `name` next to this executable, if it is there.
fn sibling(name: &str) -> Option<PathBuf> {
    sibling_path(name).filter(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Spec, Error> {
        let mut all = vec!["scenario"];
        all.extend_from_slice(args);
        Args::parse_from(all).resolve()
    }

    #[test]
    fn presets_and_overrides() {
        let ci = parse(&["--preset", "ci", "--broker-in-process"]).unwrap();
        assert_eq!((ci.duration_s, ci.scale), (120, 20.0));
        let full = parse(&["--broker-in-process"]).unwrap();
        assert_eq!((full.duration_s, full.scale), (300, 10.0));
        let custom =
            parse(&["--preset", "ci", "--duration", "600", "--broker-in-process"]).unwrap();
        assert_eq!((custom.duration_s, custom.scale), (600, 20.0));
        let modes = parse(&["--modes", "broker,naive,broker", "--broker-in-process"]).unwrap();
        assert_eq!(modes.modes, [ModeName::Broker, ModeName::Naive]);
    }

    #[test]
    fn upstream_files_and_the_matrix() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/upstreams/");
        let fixed = format!("{dir}genesys-fixed.toml");
        let silent = format!("{dir}sliding-log-bursty.toml");
        let two = parse(&[
            "--upstream",
            &fixed,
            "--upstream",
            &silent,
            "--broker-in-process",
        ])
        .unwrap();
        assert_eq!(two.upstreams.len(), 2);
        assert_eq!(two.modes.len(), 4);
        assert!(two.matrix.is_none());
        let m = parse(&[
            "--matrix",
            "--upstream",
            &fixed,
            "--seeds",
            "1,2",
            "--broker-in-process",
        ])
        .unwrap();
        assert_eq!(
            (m.matrix, m.modes),
            (Some(vec![1, 2]), vec![ModeName::Broker])
        );
        let m = parse(&[
            "--matrix",
            "--upstream",
            &fixed,
            "--seed",
            "5",
            "--broker-in-process",
        ])
        .unwrap();
        assert_eq!(m.matrix, Some(vec![5]));
        // The matrix needs files; a missing file is refused.
        assert!(Args::try_parse_from(["scenario", "--matrix"]).is_err());
        assert!(parse(&["--upstream", "/nonexistent.toml", "--broker-in-process"]).is_err());
        // Repeated seeds run once.
        let m = parse(&[
            "--matrix",
            "--upstream",
            &fixed,
            "--seeds",
            "1,2,1",
            "--broker-in-process",
        ])
        .unwrap();
        assert_eq!(m.matrix, Some(vec![1, 2]));
    }

    #[test]
    fn upstream_files_of_the_same_name_are_refused() {
        let dir = std::env::temp_dir().join(format!("scenario-stems-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("other")).unwrap();
        let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/upstreams/genesys-fixed.toml");
        let copy = dir.join("other/genesys-fixed.toml");
        std::fs::copy(shipped, &copy).unwrap();
        let err = parse(&[
            "--matrix",
            "--upstream",
            shipped,
            "--upstream",
            copy.to_str().unwrap(),
            "--broker-in-process",
        ])
        .unwrap_err()
        .to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(err.contains("the same name \"genesys-fixed\""), "{err}");
        assert!(err.contains("other/genesys-fixed.toml"), "{err}");
    }

    #[test]
    fn a_keep_logs_folder_is_checked_before_the_run() {
        let err = parse(&["--keep-logs", "/proc/nope", "--broker-in-process"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--keep-logs /proc/nope"), "{err}");
        let dir = std::env::temp_dir().join(format!("scenario-keep-{}", std::process::id()));
        let spec = parse(&["--keep-logs", dir.to_str().unwrap(), "--broker-in-process"]).unwrap();
        assert!(dir.is_dir());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        assert_eq!(spec.keep_logs.as_deref(), Some(dir.as_path()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rejects_bad_values() {
        assert!(parse(&["--time-scale", "0"]).is_err());
        assert!(parse(&["--time-scale", "100"]).is_err());
        assert!(parse(&["--duration", "10"]).is_err());
        assert!(parse(&["--gcsim-bin", "/nonexistent/gcsim"]).is_err());
    }

    #[test]
    fn chaos_needs_a_broker_process_and_a_time_within_the_run() {
        // Any existing file stands in for the broker binary here.
        let bin = std::env::current_exe().unwrap();
        let bin = bin.to_str().unwrap();
        let ok = parse(&[
            "--preset",
            "ci",
            "--broker-bin",
            bin,
            "--chaos-kill-at",
            "70",
        ])
        .unwrap();
        assert_eq!(
            ok.chaos,
            Some(Chaos {
                kill_at_ms: 70_000.0,
                down_for_ms: 0.0
            })
        );
        let down = parse(&[
            "--broker-bin",
            bin,
            "--chaos-kill-at",
            "150",
            "--chaos-down-for",
            "10",
        ])
        .unwrap();
        assert_eq!(down.chaos.unwrap().down_for_ms, 10_000.0);
        assert!(parse(&["--broker-bin", bin]).unwrap().chaos.is_none());
        // In process: nothing to kill.
        assert!(parse(&["--broker-in-process", "--chaos-kill-at", "70"]).is_err());
        // Outside production, or no broker mode.
        assert!(parse(&[
            "--preset",
            "ci",
            "--broker-bin",
            bin,
            "--chaos-kill-at",
            "120"
        ])
        .is_err());
        assert!(parse(&["--broker-bin", bin, "--chaos-kill-at", "0"]).is_err());
        assert!(parse(&[
            "--preset",
            "ci",
            "--broker-bin",
            bin,
            "--chaos-kill-at",
            "100",
            "--chaos-down-for",
            "30"
        ])
        .is_err());
        assert!(parse(&[
            "--broker-bin",
            bin,
            "--modes",
            "naive",
            "--chaos-kill-at",
            "70"
        ])
        .is_err());
        // A cluster: the leader stays down unless --chaos-down-for says.
        let c = parse(&[
            "--preset",
            "ci",
            "--broker-bin",
            bin,
            "--modes",
            "broker",
            "--cluster",
            "3",
            "--chaos-kill-at",
            "50",
        ])
        .unwrap();
        assert_eq!(
            c.cluster,
            Some(ClusterSpec {
                nodes: 3,
                restart_after_ms: None
            })
        );
        let c = parse(&[
            "--broker-bin",
            bin,
            "--cluster",
            "3",
            "--chaos-kill-at",
            "50",
            "--chaos-down-for",
            "20",
        ])
        .unwrap();
        assert_eq!(c.cluster.unwrap().restart_after_ms, Some(20_000.0));
        assert!(parse(&["--broker-in-process", "--cluster", "3"]).is_err());
        assert!(Args::try_parse_from(["scenario", "--broker-bin", bin, "--cluster", "1"]).is_err());
        assert!(parse(&["--broker-bin", bin, "--modes", "naive", "--cluster", "3"]).is_err());
        // --chaos-down-for alone is refused by clap.
        let mut all = vec!["scenario", "--chaos-down-for", "5"];
        all.push("--broker-in-process");
        assert!(Args::try_parse_from(all).is_err());
    }
}
