//! `gc-ingest`: the command line over the library: arguments → an
//! upstream leased through the broker, a sink, a plan → the run → a
//! summary (`--json`) and an exit code (0: every block stored; 1: some
//! failed, the sink failed or a worker panicked, run again to finish; 2:
//! bad arguments or set-up; 3: none failed, but some were held by other
//! workers, whose runs must finish them; 130 / 143: stopped by SIGINT /
//! SIGTERM, run again to finish). A run that ends on an error once its
//! blocks were planned still prints its summary, the error in it, before
//! the sink is closed.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use gc_ingest::{
    parse_time, run_reporting, BlockSize, Console, Display, IngestError, JobOptions, Plan,
    RunFailed, Sink, Source, SourceKind, Summary, QUERY_PATH,
};
use gc_upstream::{client_id_problem, Credentials, Region, Upstream};
use quota_broker_client::{BrokerClient, Call};
use tokio_util::sync::CancellationToken;

/// Pull Genesys Cloud conversation details for a time range into SQLite or
/// PostgreSQL, leased through quota-broker.
#[derive(Parser, Debug)]
#[command(name = "gc-ingest", version)]
struct Args {
    /// Region host (mypurecloud.com, mypurecloud.ie, …) or a base URL
    /// (http://127.0.0.1:PORT for gcsim).
    #[arg(long)]
    region: String,
    /// OAuth client id (client credentials grant).
    #[arg(long, env = "GC_CLIENT_ID")]
    client_id: String,
    /// OAuth client secret.
    #[arg(long, env = "GC_CLIENT_SECRET", hide_env_values = true)]
    client_secret: String,
    /// The broker.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    broker: String,
    /// Bearer token for the broker.
    #[arg(long, env = "QUOTA_BROKER_TOKEN", hide_env_values = true)]
    broker_token: Option<String>,
    /// The broker tenant of the org.
    #[arg(long)]
    tenant: String,
    /// `query` (synchronous details query) or `jobs` (asynchronous jobs).
    #[arg(long, default_value = "query")]
    source: SourceKind,
    /// Start of the range (YYYY-MM-DD or RFC 3339), included.
    #[arg(long)]
    from: String,
    /// End of the range, excluded.
    #[arg(long)]
    to: String,
    /// Block length, `hour` or `day` (default: hour for query, day for jobs).
    #[arg(long)]
    block: Option<BlockSize>,
    /// Blocks ending less than this before now are fetched again next run
    /// (`90m`, `4h`, `2d`).
    #[arg(long, default_value = "4h", value_parser = parse_duration)]
    watermark: Duration,
    /// "Now" for the watermark (RFC 3339; default: the clock).
    #[arg(long)]
    now: Option<String>,
    /// SQLite file or postgres:// URL.
    #[arg(long, default_value = "gc-ingest.db")]
    sink: String,
    /// This worker's name in block claims (one per concurrent worker).
    #[arg(long, default_value = "gc-ingest")]
    worker: String,
    /// Blocks fetched at once (1–256).
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    parallel: usize,
    /// Jobs running at once (jobs source; 1–256).
    #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    max_jobs: usize,
    /// First pause before polling a job (100ms–30s; doubles up to 30 s).
    #[arg(long, default_value = "1s", value_parser = parse_poll)]
    poll: Duration,
    /// Longest a job may take to be fulfilled (1m–7d): past it the job is
    /// deleted upstream and its block fails, left for the next run.
    #[arg(long, default_value = "2h", value_parser = parse_job_wait)]
    job_wait: Duration,
    /// Longest one block's store in the sink may take (1s–1d): past it the
    /// run ends with its summary, as on any sink error, instead of waiting
    /// for a database that holds the store (a lock, a server or link that
    /// stopped answering); the next run stores the block again. Every other
    /// database call (the tables' creation, a claim, the checkpoints, the
    /// worker name's) is bounded by the lesser of it and a minute.
    #[arg(long, default_value = "10m", value_parser = parse_store_timeout)]
    store_timeout: Duration,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar or lines.
    #[arg(long)]
    quiet: bool,
}

/// `90s`, `15m`, `4h`, `2d`, or a number of ms (`250ms`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| "a duration is a number and a unit: 250ms, 90s, 15m, 4h, 2d".to_owned())?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err("a duration's unit is ms, s, m, h or d".into()),
    };
    let ms = n.saturating_mul(ms);
    if ms > MAX_DURATION_MS {
        return Err("a duration is at most 36500d (100 years)".into());
    }
    Ok(Duration::from_millis(ms))
}

/// A job's first poll pause: [`parse_duration`], from 100 ms (each poll
/// takes a lease on the org's budget; 0 would poll in a tight loop) to the
/// 30 s the pause doubles up to.
fn parse_poll(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if !(Duration::from_millis(100)..=Duration::from_secs(30)).contains(&d) {
        return Err("the first poll pause is 100ms to 30s (it doubles up to 30s)".into());
    }
    Ok(d)
}

/// A job's longest wait: [`parse_duration`], from a minute (a day's job
/// takes minutes) to a week (jobs' results expire before).
fn parse_job_wait(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if !(Duration::from_secs(60)..=Duration::from_secs(7 * 86_400)).contains(&d) {
        return Err("a job's wait is 1m to 7d".into());
    }
    Ok(d)
}

/// A block's longest store: [`parse_duration`], from a second to a day.
fn parse_store_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&d) {
        return Err("a block's store timeout is 1s to 1d".into());
    }
    Ok(d)
}

/// 100 years, in ms: more than any watermark means.
const MAX_DURATION_MS: u64 = 36_500 * 86_400_000;

/// Most blocks one run plans (114 years of hours): a range beyond it is a
/// typo, and would take gigabytes before the first request.
const MAX_BLOCKS: i64 = 1_000_000;

/// `parse_time` of the value of `flag`, its error naming the flag.
fn time_of(flag: &str, value: &str) -> Result<i64, IngestError> {
    parse_time(value).map_err(|e| IngestError::Usage(format!("{flag}: {e}")))
}

fn setup(args: &Args) -> Result<(Plan, Source), IngestError> {
    check_sink(&args.sink)?;
    // The broker's client id: refused by the broker on every call, after
    // the blocks were claimed, were it not refused here.
    if let Some(why) = client_id_problem(&args.worker) {
        return Err(IngestError::Usage(format!(
            "--worker: {why}: give a shorter worker name"
        )));
    }
    let from = time_of("--from", &args.from)?;
    let to = time_of("--to", &args.to)?;
    let block = args.block.unwrap_or(match args.source {
        SourceKind::Query => BlockSize::Hour,
        SourceKind::Jobs => BlockSize::Day,
    });
    if from >= to {
        return Err(IngestError::Usage(
            "the range is empty: --from must be before --to".into(),
        ));
    }
    let count = (to - from).saturating_add(block.ms() - 1) / block.ms();
    if count > MAX_BLOCKS {
        return Err(IngestError::Usage(format!(
            "--from {} --to {} is {count} blocks; at most {MAX_BLOCKS} a run: \
             use --block day, or a shorter range per run",
            args.from.chars().take(40).collect::<String>(),
            args.to.chars().take(40).collect::<String>()
        )));
    }
    let mut plan = Plan::new(from, to, block);
    plan.watermark = args.watermark;
    if let Some(now) = &args.now {
        plan.now_ms = time_of("--now", now)?;
    }
    plan.owner = args.worker.clone();
    plan.parallel = args.parallel;
    plan.display = if args.quiet {
        Display::Quiet
    } else {
        Display::Auto
    };
    let broker = BrokerClient::connect(&args.broker, args.broker_token.as_deref())
        .map_err(|e| IngestError::Usage(format!("--broker: {e}")))?;
    let template = Call::new(&args.tenant, "POST", QUERY_PATH)
        .client_id(&args.worker)
        .oauth_client(&args.client_id)
        .class("batch");
    let upstream = Upstream::new(
        Region::new(&args.region)?,
        Credentials {
            client_id: args.client_id.clone(),
            client_secret: args.client_secret.clone(),
        },
        broker.clone(),
        template.clone(),
    )?;
    let source = Source::new(
        args.source,
        upstream,
        Some((broker, template)),
        JobOptions {
            max_running: args.max_jobs,
            first_poll: args.poll,
            max_wait: args.job_wait,
        },
    );
    Ok((plan, source))
}

/// How long the start-up check waits for the broker and the login host.
const PREFLIGHT_WAIT: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GC_INGEST_LOG")
                // sqlx warns of a slow statement with its whole text (a
                // 500-row INSERT): a slow database is not news per batch.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line stderr no longer takes is dropped, not reported with
        // `eprintln!` (which panics on that closed stderr).
        .log_internal_errors(false)
        .init();
    let args = Args::parse();
    let (plan, source) = match setup(&args) {
        Ok(set) => set,
        Err(e) => {
            eprintln!("gc-ingest: {e}");
            return ExitCode::from(2);
        }
    };
    // A wrong broker token, tenant or client secret stops the run here,
    // before any block is planned or the sink opened.
    // So does a login host that refuses connections or whose name does not
    // exist (a wrong --region, which no block would get past).
    match source.upstream().preflight(PREFLIGHT_WAIT).await {
        Ok(warnings) => {
            for w in warnings {
                tracing::warn!("{w}");
            }
        }
        Err(e) => {
            eprintln!("gc-ingest: start-up check: {e}");
            return ExitCode::from(2);
        }
    }
    let sink_name = sink_shown(&args.sink);
    let sink = match Sink::open_with(&args.sink, args.store_timeout).await {
        Ok(sink) => sink,
        // Unreachable now (a database restarting): exit 1, which an
        // orchestrator retries; a refusal every run would meet: 2.
        Err(e) if e.may_pass_later() => {
            eprintln!("gc-ingest: cannot reach the sink {sink_name} (run again later): {e}");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("gc-ingest: cannot open the sink {sink_name}: {e}");
            return ExitCode::from(2);
        }
    };
    let stop = CancellationToken::new();
    let stopped_by = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(0));
    match watch_signals(
        stop.clone(),
        std::sync::Arc::clone(&stopped_by),
        plan.console.clone(),
    ) {
        Ok(watch) => drop(tokio::spawn(watch)),
        Err(e) => tracing::warn!(error = %e,
            "cannot watch for SIGINT/SIGTERM: a signal ends the run without giving its blocks back"),
    }
    let outcome = run_reporting(&plan, &source, &sink, &stop).await;
    // Jobs deleted, slots released: what the stopped blocks held comes
    // back now, not at the leases' expiry.
    let left = source.settle(SETTLE_WAIT).await;
    if left > 0 {
        tracing::warn!(
            left,
            "some jobs or slots of the stopped blocks were not let go of in time: \
            they end upstream, and come back at the broker at their lease's expiry"
        );
    }
    let code = finish(&args, outcome, &stopped_by, &sink_name);
    // After the summary: a sink that stops answering without refusing
    // would keep it from being printed until TCP gives up.
    if tokio::time::timeout(CLOSE_WAIT, sink.close())
        .await
        .is_err()
    {
        tracing::warn!(
            "the sink {sink_name} did not close within {} s: its connections are dropped",
            CLOSE_WAIT.as_secs()
        );
    }
    code
}

/// Prints what the run did (the summary, `--json`'s object, the error
/// that ended it) and gives its exit code.
fn finish(
    args: &Args,
    outcome: Result<Summary, RunFailed>,
    stopped_by: &std::sync::atomic::AtomicU8,
    sink_name: &str,
) -> ExitCode {
    match outcome {
        Ok(summary) if summary.stopped => {
            let code = stopped_by.load(std::sync::atomic::Ordering::Relaxed);
            if args.json {
                print_json(&summary);
            } else if !args.quiet {
                eprintln!(
                    "gc-ingest: stopped: {} stored from {}; {} in progress given back and {} not \
                     started: run again to finish",
                    counted(summary.records, "record"),
                    counted(summary.blocks_final + summary.blocks_provisional, "block"),
                    counted(summary.blocks_stopped, "block"),
                    not_started(&summary),
                );
            }
            ExitCode::from(if code == 0 { 130 } else { code })
        }
        Ok(summary) => {
            report(args, &summary);
            if summary.blocks_failed > 0 {
                ExitCode::FAILURE
            } else if summary.blocks_busy > 0 {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(RunFailed { error, summary }) => {
            if let Some(summary) = &summary {
                report(args, summary);
                if !args.json && !args.quiet {
                    eprintln!(
                        "  {} in progress dropped and {} not started: run again to finish",
                        counted(summary.blocks_stopped, "block"),
                        not_started(summary),
                    );
                }
            }
            match &error {
                IngestError::Sink(_) => eprintln!(
                    "gc-ingest: the sink {sink_name} failed: {error}; blocks stored so far are \
                     kept, run again once it is fixed"
                ),
                _ => eprintln!("gc-ingest: {error}"),
            }
            ExitCode::from(failed_exit(&error))
        }
    }
}

/// The exit code of a run that ended on `error`: 2 for what no run gets
/// past (a bad argument, a refusal every block meets), 3 for another run
/// holding the worker name, 1 (run again) for the rest, a worker's panic
/// too (a bug: exit 2 would tell an orchestrator not to retry).
fn failed_exit(error: &IngestError) -> u8 {
    match error {
        IngestError::Usage(_) => 2,
        IngestError::WorkerBusy(_) => 3,
        _ => 1,
    }
}

/// `n` and `thing`, plural unless `n` is 1: `1 block`, `2 blocks`.
fn counted(n: u64, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// Blocks of the range this run neither did nor had in hand.
fn not_started(summary: &Summary) -> u64 {
    let left = summary.blocks_total
        - summary.blocks_skipped
        - summary.blocks_final
        - summary.blocks_provisional
        - summary.blocks_failed
        - summary.blocks_busy;
    left.saturating_sub(summary.blocks_stopped)
}

/// The summary of a run that went to its end or failed: `--json`'s object,
/// or the closing lines unless `--quiet`.
fn report(args: &Args, summary: &Summary) {
    if args.json {
        print_json(summary);
    } else if !args.quiet {
        eprintln!(
            "gc-ingest: {} in {:.1}s ({:.0}/s) from {} ({} already done, {} provisional, {} failed, {} held by other workers); {}, {} 429s",
            counted(summary.records, "record"),
            summary.elapsed_s,
            summary.records_per_s,
            counted(summary.blocks_total, "block"),
            summary.blocks_skipped,
            summary.blocks_provisional,
            summary.blocks_failed,
            summary.blocks_busy,
            counted(summary.upstream_requests, "upstream request"),
            summary.upstream_429,
        );
        if summary.fallback_leases > 0 {
            eprintln!(
                "  {} on the local fallback rate: the broker was unreachable",
                match summary.fallback_leases {
                    1 => "1 call ran".to_owned(),
                    n => format!("{n} calls ran"),
                }
            );
        }
        for e in &summary.errors {
            eprintln!("  {e}");
        }
    }
}

/// A signal this soon after the first counts as the same one (see
/// `watch_signals`).
const SAME_SIGNAL: Duration = Duration::from_secs(1);

/// How long a stopped run waits for its jobs to be deleted and its slots
/// released before it exits.
const SETTLE_WAIT: Duration = Duration::from_secs(10);

/// How long the end of a run waits for the sink's connections to close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The first SIGINT or SIGTERM cancels `stop` (the run gives its blocks in
/// progress back) and notes its exit code in `stopped_by` (130 or 143); a
/// second exits at once. One that comes within [`SAME_SIGNAL`] of the first
/// is that signal delivered twice, not a second one: GNU `timeout` (a cron
/// job's limit) sends it to the process and then to its process group.
fn watch_signals(
    stop: CancellationToken,
    stopped_by: std::sync::Arc<std::sync::atomic::AtomicU8>,
    console: Console,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut int, mut term) = (
        signal(SignalKind::interrupt())?,
        signal(SignalKind::terminate())?,
    );
    Ok(async move {
        let code = tokio::select! {
            _ = int.recv() => 130,
            _ = term.recv() => 143,
        };
        stopped_by.store(code, std::sync::atomic::Ordering::Relaxed);
        // Above the progress bar, not into its line.
        console.say(
            "gc-ingest: stopping: the blocks in progress are given back for the next run \
             (a second signal exits at once)",
        );
        stop.cancel();
        let first = tokio::time::Instant::now();
        let code = loop {
            let code = tokio::select! {
                _ = int.recv() => 130,
                _ = term.recv() => 143,
            };
            if first.elapsed() >= SAME_SIGNAL {
                break code;
            }
        };
        console.say(
            "gc-ingest: stopped at once: blocks in progress stay claimed until their claim expires",
        );
        std::process::exit(code);
    })
}

/// The summary as one JSON line on stdout.
fn print_json(summary: &Summary) {
    match serde_json::to_string(summary) {
        Ok(line) => {
            use std::io::Write;
            // A reader that went away is not told anything more.
            if let Err(e) = writeln!(std::io::stdout().lock(), "{line}") {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    eprintln!("gc-ingest: the summary could not be written: {e}");
                }
            }
        }
        Err(e) => eprintln!("gc-ingest: the summary could not be encoded: {e}"),
    }
}

/// A `--sink` URL of a database gc-ingest does not write to (`mysql://…`):
/// read as a path, it would be a SQLite file of that odd name, or fail as
/// one. Refused as a usage error instead (the scheme clipped).
fn check_sink(sink: &str) -> Result<(), IngestError> {
    let ours = ["postgres://", "postgresql://", "sqlite:"];
    match sink.split_once("://") {
        Some((scheme, _)) if !ours.iter().any(|p| sink.starts_with(p)) => {
            Err(IngestError::Usage(format!(
                "--sink {:?}://…: not a database gc-ingest writes to: give a SQLite file (a \
                 path, sqlite:PATH or sqlite://PATH) or a postgres:// URL",
                scheme.chars().take(20).collect::<String>()
            )))
        }
        _ => Ok(()),
    }
}

/// A sink name for messages: a path or URL, its password hidden, clipped.
fn sink_shown(sink: &str) -> String {
    let shown = match (sink.find("://"), sink.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &sink[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &sink[..scheme + 3], &sink[at..]),
                None => sink.to_owned(),
            }
        }
        _ => sink.to_owned(),
    };
    // A password given as a query parameter (`?password=…`) too.
    let shown = match shown.find("password=") {
        Some(at) => {
            let value = at + "password=".len();
            let end = shown[value..].find('&').map_or(shown.len(), |e| value + e);
            format!("{}***{}", &shown[..value], &shown[end..])
        }
        None => shown,
    };
    let mut clipped: String = shown.chars().take(200).collect();
    if clipped.len() < shown.len() {
        clipped.push('…');
    }
    clipped
}

#[cfg(test)]
mod tests {
    use super::{counted, failed_exit, time_of, IngestError};

    #[test]
    fn one_is_singular() {
        assert_eq!(counted(1, "block"), "1 block");
        assert_eq!(counted(0, "block"), "0 blocks");
        assert_eq!(counted(2, "upstream request"), "2 upstream requests");
    }

    /// A bad time names its flag, and quotes the value clipped.
    #[test]
    fn a_bad_time_names_its_flag() {
        let said = time_of("--from", "yesterday").unwrap_err().to_string();
        assert!(
            said.starts_with("--from: \"yesterday\" is not a date"),
            "{said}"
        );
        let said = time_of("--now", &"x".repeat(20_000))
            .unwrap_err()
            .to_string();
        assert!(said.starts_with("--now: ") && said.len() < 300, "{said}");
    }

    /// Exit 2 tells an orchestrator that running again will not help: a
    /// worker's panic is a bug that another run may well get past.
    #[test]
    fn a_worker_panic_exits_1_and_bad_arguments_2() {
        assert_eq!(failed_exit(&IngestError::WorkerPanicked("boom".into())), 1);
        assert_eq!(failed_exit(&IngestError::Usage("--from".into())), 2);
        assert_eq!(failed_exit(&IngestError::WorkerBusy("held".into())), 3);
    }
}
