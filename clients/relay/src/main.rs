//! `gc-relay`: `serve` runs the relay; `status` and `dlq list|replay|drop`
//! read and settle its queue directly (they work while it runs, and on a
//! PostgreSQL queue from any host that reaches it). Exit 0: done; 1: a
//! failure that may pass if run again (the queue database unreachable,
//! another relay on the SQLite queue, ids that are not dead letters); 2:
//! bad arguments or settings, or a start-up check every record would fail
//! (see [`RelayError::exit_code`]).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use gc_relay::{
    Access, Auth, DrainSettings, Limits, Queue, RelayError, Settings, UpstreamSettings,
};

/// Largest `--max-record-bytes`: intake reads up to twice that per request.
const MAX_RECORD_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Parser)]
#[command(
    name = "gc-relay",
    version,
    about = "Architect call-flow relay: HTTP intake, durable queue, drained through quota-broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, global = true, env = "GC_RELAY_LOG", default_value = "info")]
    log: String,
}

#[derive(Subcommand)]
enum Command {
    /// Take records over HTTP and drain them upstream.
    Serve(Box<Serve>),
    /// The queue's depth, oldest record, drain rate and dead letters.
    Status {
        #[command(flatten)]
        queue: QueueArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The dead letters (records the upstream refused with a 4xx).
    Dlq {
        #[command(subcommand)]
        action: Dlq,
    },
}

#[derive(Args)]
struct QueueArg {
    /// `sqlite:PATH` (or a path) or `postgres://user@host/db`.
    #[arg(long, env = "GC_RELAY_QUEUE", default_value = "sqlite:gc-relay.db")]
    queue: String,
}

#[derive(Subcommand)]
enum Dlq {
    /// List them, oldest first.
    List {
        #[command(flatten)]
        queue: QueueArg,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Put them back in the queue.
    Replay(Pick),
    /// Drop them for good (their keys stay known).
    Drop(Pick),
}

#[derive(Args)]
struct Pick {
    #[command(flatten)]
    queue: QueueArg,
    /// Every dead letter.
    #[arg(long, conflicts_with = "ids")]
    all: bool,
    /// Record ids.
    #[arg(required_unless_present = "all")]
    ids: Vec<i64>,
}

#[derive(Args)]
struct Serve {
    #[command(flatten)]
    queue: QueueArg,
    /// Where to listen.
    #[arg(long, env = "GC_RELAY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Genesys Cloud region host (mypurecloud.com) or base URL (gcsim).
    #[arg(long, env = "GC_RELAY_REGION")]
    region: String,
    /// OAuth client-credentials client id.
    #[arg(long, env = "GC_RELAY_CLIENT_ID")]
    client_id: String,
    /// Its secret.
    #[arg(long, env = "GC_RELAY_CLIENT_SECRET", hide_env_values = true)]
    client_secret: String,
    /// The quota broker.
    #[arg(
        long,
        env = "GC_RELAY_BROKER",
        default_value = "http://127.0.0.1:50051"
    )]
    broker: String,
    /// The broker's bearer token.
    #[arg(long, env = "GC_RELAY_BROKER_TOKEN", hide_env_values = true)]
    broker_token: Option<String>,
    /// The broker tenant (the org).
    #[arg(long, env = "GC_RELAY_TENANT")]
    tenant: String,
    /// This relay's name (broker client id).
    #[arg(long, env = "GC_RELAY_NAME", default_value = "gc-relay")]
    name: String,
    /// Basic-auth user the Data Action sends.
    #[arg(long, env = "GC_RELAY_BASIC_USER", requires = "basic_password")]
    basic_user: Option<String>,
    /// Basic-auth password the Data Action sends.
    #[arg(
        long,
        env = "GC_RELAY_BASIC_PASSWORD",
        hide_env_values = true,
        requires = "basic_user"
    )]
    basic_password: Option<String>,
    /// Shared secret the Data Action sends in `X-Relay-Secret`.
    #[arg(long, env = "GC_RELAY_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Records pending or in flight before intake answers 503.
    #[arg(long, env = "GC_RELAY_MAX_RECORDS", default_value_t = Limits::default().max_records)]
    max_records: u64,
    /// Their bytes before intake answers 503.
    #[arg(long, env = "GC_RELAY_MAX_BYTES", default_value_t = Limits::default().max_bytes)]
    max_bytes: u64,
    /// Largest record, bytes (at most 16 MiB).
    #[arg(
        long,
        env = "GC_RELAY_MAX_RECORD_BYTES",
        default_value_t = 64 * 1024,
        value_parser = clap::value_parser!(u64).range(1..=MAX_RECORD_BYTES)
    )]
    max_record_bytes: u64,
    /// Records being delivered at once (1–1024).
    #[arg(
        long,
        env = "GC_RELAY_CONCURRENCY",
        default_value_t = DrainSettings::default().concurrency as u64,
        value_parser = clap::value_parser!(u64).range(1..=1024)
    )]
    concurrency: u64,
    /// Seconds a claim holds a record (a dead relay's come back after it;
    /// 1 to 86400).
    #[arg(
        long,
        env = "GC_RELAY_CLAIM_SECS",
        default_value_t = DrainSettings::default().claim.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    claim_secs: u64,
    /// Days a dead letter is kept before it is dropped (1 to 3650); one
    /// that holds later records of its order key back is kept until it is
    /// replayed or dropped.
    #[arg(
        long,
        env = "GC_RELAY_DEAD_LETTER_DAYS",
        default_value_t = DrainSettings::default().keep_dead.as_secs() / 86_400,
        value_parser = clap::value_parser!(u64).range(1..=3650)
    )]
    dead_letter_days: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line stderr no longer takes is dropped, not reported with
        // `eprintln!` (which panics on that closed stderr).
        .log_internal_errors(false)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gc-relay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gc-relay: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run(command: Command) -> Result<(), RelayError> {
    match command {
        Command::Serve(s) => serve(*s).await,
        Command::Status { queue, json } => {
            let depth = open(&queue, Access::Read).await?.depth().await?;
            if json {
                out(&format!(
                    "{}\n",
                    serde_json::to_string(&depth).unwrap_or_default()
                ))
            } else {
                out(&format!(
                    "records pending or in flight  {}\n\
                     \x20 of which in flight          {}\n\
                     \x20 bytes                       {}\n\
                     oldest record age             {:.1} s\n\
                     drain rate (last minute)      {:.2} records/s\n\
                     delivered (kept)              {}\n\
                     dead letters                  {}\n\
                     oldest dead letter age        {:.1} s\n\
                     records behind dead letters   {}\n",
                    depth.records,
                    depth.inflight,
                    depth.bytes,
                    depth.oldest_age_s,
                    depth.done_last_minute as f64 / 60.0,
                    depth.done,
                    depth.dead,
                    depth.oldest_dead_age_s,
                    depth.blocked
                ))
            }
        }
        Command::Dlq { action } => match action {
            Dlq::List { queue, limit } => {
                let queue = open(&queue, Access::Read).await?;
                let letters = queue.dead_letters(limit).await?;
                for d in &letters {
                    out(&format!(
                        "{}\n",
                        serde_json::to_string(d).unwrap_or_default()
                    ))?;
                }
                // Cut at the limit: how many more, on stderr (stdout stays
                // one JSON object a line).
                if letters.len() as u64 >= u64::from(limit) {
                    let shown = letters.len() as i64;
                    let more = queue.depth().await?.dead.saturating_sub(shown);
                    if more > 0 {
                        eprintln!(
                            "gc-relay: … and {more} more {}: raise --limit (now {limit})",
                            dead_letters(more as u64)
                        );
                    }
                }
                Ok(())
            }
            Dlq::Replay(p) => {
                let settled = open(&p.queue, Access::Settle)
                    .await?
                    .replay_which(ids(&p))
                    .await?;
                out(&format!(
                    "{} {} back in the queue\n",
                    settled.len(),
                    dead_letters(settled.len() as u64)
                ))?;
                all_named(&p, &settled)
            }
            Dlq::Drop(p) => {
                let settled = open(&p.queue, Access::Settle)
                    .await?
                    .drop_dead_which(ids(&p))
                    .await?;
                out(&format!(
                    "{} {} dropped\n",
                    settled.len(),
                    dead_letters(settled.len() as u64)
                ))?;
                all_named(&p, &settled)
            }
        },
    }
}

/// "dead letter" or "dead letters", for `n` of them.
fn dead_letters(n: u64) -> &'static str {
    if n == 1 {
        "dead letter"
    } else {
        "dead letters"
    }
}

/// Writes `text` to stdout. A reader that went away (`gc-relay status |
/// head -1`) is not an error: the rest was not wanted.
fn out(text: &str) -> Result<(), RelayError> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(source) if source.kind() != std::io::ErrorKind::BrokenPipe => Err(RelayError::Io {
            what: "write to stdout".to_owned(),
            source,
        }),
        _ => Ok(()),
    }
}

/// An error when ids were named and fewer than them were dead letters
/// (a mistyped id is not a success), naming those that were not.
fn all_named(p: &Pick, settled: &[i64]) -> Result<(), RelayError> {
    match ids(p) {
        Some(ids) => not_dead_letters(ids, settled).map_or(Ok(()), |e| Err(RelayError::State(e))),
        None => Ok(()),
    }
}

/// Ids listed in a message at most.
const IDS_SHOWN: usize = 10;

/// What to say of the ids `named` that are not among those `settled`, if
/// any: the first [`IDS_SHOWN`] of them, and how many more.
fn not_dead_letters(named: &[i64], settled: &[i64]) -> Option<String> {
    let mut missing: Vec<i64> = named
        .iter()
        .copied()
        .filter(|id| !settled.contains(id))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return None;
    }
    let mut list: Vec<String> = missing.iter().take(IDS_SHOWN).map(i64::to_string).collect();
    if missing.len() > IDS_SHOWN {
        list.push(format!("and {} more", missing.len() - IDS_SHOWN));
    }
    let (n, all) = (missing.len(), named.len());
    let (are, letters) = if n == 1 {
        ("is not a dead letter", "id")
    } else {
        ("are not dead letters", "ids")
    };
    Some(format!(
        "{n} of the {all} ids named {are}: {} {}; see gc-relay dlq list",
        letters,
        list.join(", ")
    ))
}

fn ids(p: &Pick) -> Option<&[i64]> {
    (!p.all).then_some(p.ids.as_slice())
}

/// The queue `status` and `dlq` read: one that exists (a mistyped path
/// would otherwise be a new, empty queue reported as all zeros), as it is
/// (only `serve` migrates it), connected as `serve` connects (an
/// unreachable PostgreSQL is said at once, with its reason).
async fn open(q: &QueueArg, access: Access) -> Result<Queue, RelayError> {
    Queue::open_existing(&q.queue, access).await
}

async fn serve(s: Serve) -> Result<(), RelayError> {
    let upstream = UpstreamSettings {
        region: s.region,
        client_id: s.client_id,
        client_secret: s.client_secret,
        broker: s.broker,
        broker_token: s.broker_token,
        tenant: s.tenant,
    };
    let auth = Auth {
        basic: s.basic_user.zip(s.basic_password),
        secret: s.secret,
    };
    let mut settings = Settings::new(&s.queue.queue, upstream, auth);
    settings.limits = Limits {
        max_records: s.max_records,
        max_bytes: s.max_bytes,
    };
    // Both within the ranges clap checked, far below usize::MAX.
    settings.max_record_bytes = usize::try_from(s.max_record_bytes).unwrap_or(usize::MAX);
    settings.drain.concurrency = usize::try_from(s.concurrency).unwrap_or(1024);
    settings.drain.claim = Duration::from_secs(s.claim_secs);
    settings.drain.keep_dead = Duration::from_secs(s.dead_letter_days * 86_400);
    settings.name = s.name;
    let listener = tokio::net::TcpListener::bind(s.listen)
        .await
        .map_err(|source| RelayError::Io {
            what: format!("bind {}", s.listen),
            source,
        })?;
    let relay = gc_relay::start(settings, listener).await?;
    // One line on stdout once bound, for whoever started it.
    out(&format!("gc-relay listening on http://{}\n", relay.addr()))?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    relay.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::{not_dead_letters, Cli};
    use clap::{CommandFactory, Parser};

    /// The ids named that were not dead letters are listed, the first ten
    /// and how many more.
    #[test]
    fn the_ids_that_are_not_dead_letters_are_named() {
        assert_eq!(not_dead_letters(&[1, 2], &[1, 2]), None);
        assert_eq!(
            not_dead_letters(&[7, 3], &[3]).as_deref(),
            Some("1 of the 2 ids named is not a dead letter: id 7; see gc-relay dlq list")
        );
        let named: Vec<i64> = (1..=25).collect();
        assert_eq!(
            not_dead_letters(&named, &[1]).as_deref(),
            Some(
                "24 of the 25 ids named are not dead letters: ids 2, 3, 4, 5, 6, 7, 8, 9, 10, \
                 11, and 14 more; see gc-relay dlq list"
            )
        );
    }

    /// A relay deployed with environment variables only (a container) can
    /// set every option of `serve`, as its README says.
    #[test]
    fn every_option_of_serve_has_an_environment_variable() {
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").expect("the serve subcommand");
        let missing: Vec<String> = serve
            .get_arguments()
            .chain(cli.get_arguments())
            .filter(|a| !a.is_positional() && a.get_long().is_some())
            .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
            .filter(|a| a.get_env().is_none())
            .map(|a| a.get_id().to_string())
            .collect();
        assert!(
            missing.is_empty(),
            "options without an environment variable: {missing:?}"
        );
    }

    /// Sizes and times that would overflow (a body limit wrapping to a few
    /// bytes, a claim expiry past the end of time) or deliver nothing are
    /// usage errors at start, naming the option and the range.
    #[test]
    fn limits_out_of_range_are_usage_errors() {
        let serve = |extra: &[&str]| {
            let mut args = vec![
                "gc-relay",
                "serve",
                "--tenant",
                "t",
                "--region",
                "mypurecloud.com",
                "--client-id",
                "id",
                "--client-secret",
                "secret",
            ];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        assert!(serve(&[]).is_ok());
        for (flag, value) in [
            ("--max-record-bytes", "18446744073709551615"),
            ("--max-record-bytes", "0"),
            ("--claim-secs", "9223372036854775807"),
            ("--claim-secs", "0"),
            ("--concurrency", "0"),
            ("--concurrency", "100000"),
            ("--dead-letter-days", "0"),
            ("--dead-letter-days", "3651"),
        ] {
            let err = serve(&[flag, value]).map(|_| ()).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{flag} {value}"
            );
            let said = err.to_string();
            assert!(said.contains(flag) && said.contains("in "), "{said}");
        }
        assert!(serve(&["--max-record-bytes", "16777216", "--claim-secs", "86400"]).is_ok());
        assert!(serve(&["--dead-letter-days", "3650"]).is_ok());
    }
}
