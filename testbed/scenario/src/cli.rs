//! The command line: flags, presets, and the resolved [`Spec`] of one run
//! (what every other module reads; nothing else looks at the flags).

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::error::Error;

/// Runs the same fleet against fresh simulated Genesys Cloud orgs three ways
/// (naive clients, clients with a local token bucket, clients leased by the
/// quota broker) and prints one table.
#[derive(Debug, Parser)]
#[command(name = "scenario", version)]
pub(crate) struct Args {
    /// Simulated seconds the fleet produces work (then it drains).
    #[arg(long, value_name = "SIM_SECONDS")]
    pub(crate) duration: Option<u64>,
    /// Every window, latency and Retry-After lasts 1/N as long in real time,
    /// in the simulator and the broker config alike.
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
    /// Modes to run, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "naive,local,broker"
    )]
    pub(crate) modes: Vec<ModeName>,
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
    /// Write each mode's `/_sim/stats` and `/_sim/log` to this directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) keep_logs: Option<PathBuf>,
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
}

impl ModeName {
    /// The name on the command line and in the output.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ModeName::Naive => "naive",
            ModeName::Local => "local",
            ModeName::Broker => "broker",
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
    /// The simulator binary, if there is one to run.
    pub(crate) gcsim_bin: Option<PathBuf>,
    /// Where the broker comes from.
    pub(crate) broker: BrokerSource,
    /// Where to keep each mode's simulator stats and log.
    pub(crate) keep_logs: Option<PathBuf>,
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
        let mut modes = Vec::new();
        for m in self.modes {
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
        let broker = match (self.broker_in_process, self.broker_bin) {
            (true, _) => BrokerSource::InProcess,
            (false, Some(p)) if p.is_file() => BrokerSource::Binary(p),
            (false, Some(p)) => return Err(Error::MissingBinary(p)),
            (false, None) => {
                sibling("quota-broker").map_or(BrokerSource::InProcess, BrokerSource::Binary)
            }
        };
        Ok(Spec {
            duration_s,
            scale,
            seed: self.seed,
            json: self.json,
            modes,
            gcsim_bin,
            broker,
            keep_logs: self.keep_logs,
            command: std::env::args().collect::<Vec<_>>().join(" "),
        })
    }
}

/// `name` next to this executable, if it is there.
fn sibling(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe
        .parent()?
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    path.is_file().then_some(path)
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
    fn rejects_bad_values() {
        assert!(parse(&["--time-scale", "0"]).is_err());
        assert!(parse(&["--time-scale", "100"]).is_err());
        assert!(parse(&["--duration", "10"]).is_err());
        assert!(parse(&["--gcsim-bin", "/nonexistent/gcsim"]).is_err());
    }
}
