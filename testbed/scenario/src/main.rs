//! `scenario`: the fleet-scenario benchmark. Runs, in one process run, the
//! same fleet against fresh simulated Genesys Cloud orgs four ways (naive
//! clients, clients with a local token bucket, clients leased by the quota
//! broker, and leased with the writes through gc-relay) and prints one table
//! (or JSON).
//!
//! # Layout
//!
//! - `cli`: flags and presets → a [`cli::Spec`].
//! - `confgen`: the run's [`confgen::Plan`] (hidden-limit changes, unmanaged
//!   consumer) and the simulator's and broker's config files.
//! - `children`: the fresh simulator (gcsim) and broker of each mode, each
//!   in this process or as a child process (which chaos kills and restarts).
//! - `chaos`: `--chaos-kill-at`: the broker SIGKILLed and restarted mid-run,
//!   and the outage's figures.
//! - `cluster`: `--cluster N`: the broker modes against N brokers on etcd,
//!   and with `--chaos-kill-at` the tenant's leader SIGKILLed mid-run and
//!   the take-over's figures.
//! - `clock`: simulated time, aligned to the simulator's start.
//! - `upstream`: HTTP to the simulator, and its control plane's types.
//! - `modes`: how a client process calls upstream in each mode.
//! - `fleet`: the workload (ingestion, wallboards, trunks) and its drain.
//! - `measure`: counters, wait histograms, goodput and convergence.
//! - `run`: one mode start to finish → a [`run::ModeResult`].
//! - `trace`: broker mode's samples of the broker's analytics bucket.
//! - `report`: the table, the JSON, the broker's targets.
//! - `matrix`: `--matrix`: upstream files × seeds, a few figures per cell.
//! - `paced`: `--paced`: each upstream file against calls at an even pace, no
//!   broker (the yardstick of what a pacing broker could be served).
//!
//! Stopping: SIGINT or SIGTERM drops the run (every child process is
//! killed, the temporary directory removed) and exits 130 or 143.
//!
//! Time: everything the table shows is simulated time; real time is
//! simulated time divided by `--time-scale`, in the simulator and in the
//! broker's config alike, so the dynamics do not depend on the scale.

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod chaos;
mod children;
mod cli;
mod clock;
mod cluster;
mod confgen;
mod error;
mod fleet;
mod ingest;
mod matrix;
mod measure;
mod modes;
mod paced;
mod relay;
mod report;
mod run;
mod trace;
mod upstream;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::children::WorkDir;
use crate::cli::{Args, Spec};
use crate::confgen::Plan;
use crate::error::Error;
use crate::matrix::Matrix;
use crate::report::Report;

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            // sqlx's slow-statement warnings (gc-ingest's 500-row inserts
            // on a busy machine) are noise here.
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("warn,sqlx::query=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let spec = match args.resolve() {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("scenario: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("scenario: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The matrix's table of the cells finished so far, printed if a signal
    // stops it.
    let finished = std::sync::Mutex::new(None::<String>);
    let outcome = runtime.block_on(until_stopped(output(&spec, &finished)));
    // A stop drops the run's future (its children's handles kill them,
    // its temporary directory goes); tasks still holding a child are
    // dropped here, and a blocking start (etcd) is waited for, bounded.
    runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
    if matches!(outcome, Stopped::Signal(_)) {
        sweep();
    }
    match outcome {
        Stopped::Finished(Ok(Output { text, failed })) => {
            print!("{text}");
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                eprintln!("scenario: {failed} run(s) failed (reported with the others)");
                ExitCode::FAILURE
            }
        }
        Stopped::Finished(Err(e)) => {
            eprintln!("scenario: {e}");
            ExitCode::FAILURE
        }
        Stopped::Signal(signal) => {
            let finished = finished
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(table) = finished {
                print!("{table}");
            }
            eprintln!(
                "scenario: stopped by {}; its children are stopped and its temporary \
                 directory removed",
                signal.name()
            );
            ExitCode::from(signal.exit_code())
        }
        Stopped::NoSignalHandler(e) => {
            eprintln!("scenario: cannot handle SIGINT/SIGTERM: {e}");
            ExitCode::FAILURE
        }
    }
}

/// After a stop: kills any child process still running (one started by a
/// blocking start the shutdown did not wait out, such as etcd's, has no
/// handle that kills it when dropped) and removes the temporary directory
/// if a task still writing into it kept it.
fn sweep() {
    let me = std::process::id();
    let children: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{name}/stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces and ')'.
            let mut after = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
            let (state, ppid) = (after.next()?, after.next()?.parse::<u32>().ok()?);
            (ppid == me && state != "Z").then_some(name)
        })
        .collect();
    if !children.is_empty() {
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .args(&children)
            .status();
    }
    let dir = std::env::temp_dir().join(format!("scenario-{me}"));
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// How long, after a stop, tasks and blocking starts may take to finish.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// A signal that stops a run.
#[derive(Clone, Copy, Debug)]
enum StopSignal {
    Interrupt,
    Terminate,
}

impl StopSignal {
    fn name(self) -> &'static str {
        match self {
            StopSignal::Interrupt => "SIGINT",
            StopSignal::Terminate => "SIGTERM",
        }
    }

    /// 128 + the signal's number, as a shell reports it.
    fn exit_code(self) -> u8 {
        match self {
            StopSignal::Interrupt => 130,
            StopSignal::Terminate => 143,
        }
    }
}

/// How a run ended.
enum Stopped<T> {
    Finished(T),
    Signal(StopSignal),
    NoSignalHandler(std::io::Error),
}

/// Runs `work` until it finishes or SIGINT/SIGTERM arrives; on a signal
/// `work` is dropped.
async fn until_stopped<T>(work: impl std::future::Future<Output = T>) -> Stopped<T> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut interrupt, mut terminate) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        (Err(e), _) | (_, Err(e)) => return Stopped::NoSignalHandler(e),
    };
    tokio::select! {
        out = work => Stopped::Finished(out),
        _ = interrupt.recv() => Stopped::Signal(StopSignal::Interrupt),
        _ = terminate.recv() => Stopped::Signal(StopSignal::Terminate),
    }
}

/// What the run prints, and how many runs failed (a failed run is
/// reported with its error; the others are still printed).
struct Output {
    text: String,
    failed: usize,
}

/// What the run prints: the matrix; or one report per upstream (the
/// generated org when no `--upstream` is given), as tables or as JSON (an
/// object, or an array of them for several upstreams). Only a lone run's
/// failure is an `Err`. After each matrix cell, `finished` holds the
/// output of the cells run so far.
async fn output(spec: &Spec, finished: &std::sync::Mutex<Option<String>>) -> Result<Output, Error> {
    if let Some(percents) = &spec.paced {
        let rows = paced::rows(spec, percents)?;
        let text = if spec.json {
            format!(
                "{}\n",
                serde_json::to_string_pretty(&rows)
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
            )
        } else {
            paced::table(spec, &rows)
        };
        return Ok(Output { text, failed: 0 });
    }
    if let Some(seeds) = &spec.matrix {
        let mut matrix = Matrix::new(spec);
        let total = spec.upstreams.len() * seeds.len();
        let started = std::time::Instant::now();
        let mut i = 0;
        for file in &spec.upstreams {
            // The yardstick beside its cells (milliseconds, in process; the
            // same for every seed).
            let until_ms = spec.duration_s * 1000;
            let exact = paced::alone(file, until_ms)
                .and_then(|alone| paced::row(file, 100.0, 0.0, until_ms, alone))
                .map_err(|e| eprintln!("scenario: the exact pace of {}: {e}", file.name))
                .ok();
            for &seed in seeds {
                i += 1;
                // Each cell keeps its logs in its own directory.
                let spec = Spec {
                    seed,
                    keep_logs: spec
                        .keep_logs
                        .as_ref()
                        .map(|d| d.join(format!("{}-seed{seed}", file.name))),
                    ..spec.clone()
                };
                eprintln!(
                    "scenario: matrix cell {i} of {total}: {} seed {seed} ({:.0} real s elapsed)",
                    file.name,
                    started.elapsed().as_secs_f64()
                );
                let plan = Plan::with_upstream(spec.duration_s, file.clone());
                match run(&spec, &plan).await {
                    Ok(report) => matrix.add(&file.name, seed, &report, exact.as_ref()),
                    Err(e) => {
                        eprintln!("scenario: matrix cell {i} of {total} failed: {e}");
                        matrix.fail(&file.name, seed, e.to_string());
                    }
                }
                let so_far = if spec.json {
                    format!("{}\n", matrix.json())
                } else {
                    matrix.table()
                };
                *finished
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(so_far);
            }
        }
        let text = if spec.json {
            format!("{}\n", matrix.json())
        } else {
            matrix.table()
        };
        return Ok(Output {
            text,
            failed: matrix.failed.len(),
        });
    }
    if spec.upstreams.is_empty() {
        let report = run(spec, &Plan::new(spec.duration_s)).await?;
        let text = if spec.json {
            format!("{}\n", report.json())
        } else {
            report.table()
        };
        return Ok(Output { text, failed: 0 });
    }
    let mut reports = Vec::new();
    let n = spec.upstreams.len();
    for (i, file) in spec.upstreams.iter().enumerate() {
        // With several files, each keeps its logs in a folder of its own.
        let spec = &Spec {
            keep_logs: match &spec.keep_logs {
                Some(d) if n > 1 => Some(d.join(&file.name)),
                kept => kept.clone(),
            },
            ..spec.clone()
        };
        if n > 1 {
            eprintln!("scenario: upstream {} of {n}: {}", i + 1, file.name);
        }
        let plan = Plan::with_upstream(spec.duration_s, file.clone());
        let report = run(spec, &plan).await.map_err(|e| {
            eprintln!("scenario: upstream {} failed: {e}", file.name);
            (file.name.clone(), e.to_string())
        });
        reports.push(report);
    }
    Ok(several(spec.json, &reports))
}

/// The output of several upstreams' runs, failed ones included.
fn several(json: bool, reports: &[Result<Report, (String, String)>]) -> Output {
    let failed = reports.iter().filter(|r| r.is_err()).count();
    let text = match (json, reports) {
        (true, [Ok(one)]) => format!("{}\n", one.json()),
        // One file: one object, as when it succeeds.
        (true, [Err((upstream, error))]) => format!(
            "{}\n",
            serde_json::to_string_pretty(
                &serde_json::json!({ "upstream": upstream, "error": error })
            )
            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        ),
        (true, _) => {
            let all: Vec<serde_json::Value> = reports
                .iter()
                .map(|r| match r {
                    Ok(report) => serde_json::to_value(report)
                        .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() })),
                    Err((upstream, error)) => {
                        serde_json::json!({ "upstream": upstream, "error": error })
                    }
                })
                .collect();
            format!(
                "{}\n",
                serde_json::to_string_pretty(&all)
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
            )
        }
        (false, _) => reports
            .iter()
            .map(|r| match r {
                Ok(report) => report.table(),
                Err((upstream, error)) => {
                    format!("scenario: upstream {upstream} failed: {error}\n")
                }
            })
            .collect::<Vec<_>>()
            .join("\n"),
    };
    Output { text, failed }
}

/// Every mode in turn, each against fresh processes.
async fn run(spec: &Spec, plan: &Plan) -> Result<Report, Error> {
    if let Some(dir) = &spec.keep_logs {
        cli::writable_dir(dir)?;
    }
    let dir = WorkDir::create()?;
    let mut results = Vec::new();
    let n = spec.modes.len();
    for (i, &mode) in spec.modes.iter().enumerate() {
        // Progress on stderr: a full run is minutes of silence otherwise.
        eprintln!(
            "scenario: mode {} of {n}: {} ({} simulated s at x{}) ...",
            i + 1,
            mode.as_str(),
            spec.duration_s,
            spec.scale
        );
        let result = run::run_mode(spec, plan, &dir, mode).await?;
        eprintln!(
            "scenario: {} done in {:.1} real s: {} requests, {} 429s, {} records lost",
            mode.as_str(),
            result.real_s,
            result.requests.sent,
            result.requests.refused,
            result.records.ingest.lost + result.records.writes.lost
        );
        results.push(result);
    }
    Ok(Report::new(spec, plan, results))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_upstream_is_reported_with_the_others() {
        let spec = Args::parse_from(["scenario", "--broker-in-process"])
            .resolve()
            .unwrap();
        let ok = || Ok(Report::new(&spec, &Plan::new(300), Vec::new()));
        let failed = || Err(("bad".to_owned(), "simulator stats: no answer".to_owned()));
        let out = several(false, &[ok(), failed()]);
        assert_eq!(out.failed, 1);
        let table = Report::new(&spec, &Plan::new(300), Vec::new()).table();
        assert!(out.text.starts_with(&table), "{}", out.text);
        assert!(
            out.text
                .contains("scenario: upstream bad failed: simulator stats: no answer"),
            "{}",
            out.text
        );
        let out = several(true, &[failed(), ok()]);
        let json: serde_json::Value = serde_json::from_str(&out.text).unwrap();
        assert_eq!(json[0]["upstream"], "bad");
        assert_eq!(json[0]["error"], "simulator stats: no answer");
        assert_eq!(json[1]["duration_s"], 300);
        assert_eq!(several(true, &[ok()]).failed, 0);
    }
}
