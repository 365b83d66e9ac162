//! Load generator for quota-broker: drives Acquire→Release pairs at the
//! broker and at a no-op QuotaBroker service (same gRPC stack, no decision)
//! and prints throughput and latency.
//!
//! # Layout
//!
//! ```text
//!  main.rs       flags; `loadgen` (one run per target), `loadgen scale`
//!     │          (the suite), hidden `loadgen noop-server` (child process)
//!     ├─ cluster.rs    `loadgen cluster`: pairs/s with 1, 2, 3 brokers in
//!     │                cluster mode on etcd, clients following leaders
//!     ├─ peer.rs       `loadgen peer`: unary Acquire vs throttlecrab-server
//!     │   └─ raw.rs    its driver with requests encoded before the run
//!     ├─ scale.rs      the scale suite: tenants, open loop, stream vs unary,
//!     │                held leases, watchers; one table
//!     ├─ drive.rs      a Plan → pairs/s + latency histogram; unary loops
//!     │   └─ stream.rs the pipelined LeaseStream driver
//!     ├─ hold.rs       hold N leases, release them
//!     ├─ watchers.rs   N Watch streams that read and count updates
//!     ├─ server.rs     a server handle: in process or child; readiness
//!     │   ├─ child.rs  child processes, /proc RSS
//!     │   └─ noop.rs   the no-op service
//!     ├─ brokerconf.rs generated broker configs
//!     ├─ report.rs     tables and JSON lines
//!     └─ error.rs      the error type
//! ```
//!
//! A pair's latency runs from its start (closed loop: when it is sent; open
//! loop: when it was scheduled, so a stalled server is charged for the sends
//! it delayed) to the Release's answer. Pairs/s counts pairs that started in
//! the measured window, over the window's length.

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

/// `println!` for what loadgen prints on stdout. A reader that stops
/// reading (`loadgen … | head`) makes the rest of the output go nowhere,
/// as it would in any Unix filter, instead of a panic while child servers
/// may still be running; the program goes on and stops them as usual.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if !crate::STDOUT_GONE.load(std::sync::atomic::Ordering::Relaxed) {
            if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    crate::STDOUT_GONE.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }};
}

/// Set once stdout's reader has gone (see `outln!`).
static STDOUT_GONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

mod brokerconf;
mod child;
mod cluster;
mod drive;
mod error;
mod h2drive;
mod hold;
mod noop;
mod peer;
mod raw;
mod report;
mod scale;
mod server;
mod stream;
mod watchers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::brokerconf::BrokerConfig;
use crate::drive::{Mode, Plan, Schedule};
use crate::error::Error;
use crate::report::TargetRow;
use crate::server::Server;

/// Which services to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Broker,
    Noop,
    Both,
}

/// Acquire→Release load against the broker and a no-op baseline.
#[derive(Parser, Debug)]
#[command(name = "loadgen", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The scale suite: tenants, open loop at 50%, stream vs unary, held
    /// leases, Watch streams; one table.
    Scale(scale::ScaleArgs),
    /// Scale-out: pairs/s with 1, 2 and 3 brokers in cluster mode on a
    /// real etcd over 1,000 tenants, one client per tenant following its
    /// leader; one table.
    Cluster(cluster::ClusterArgs),
    /// Unary Acquire against a peer rate-limit server (throttlecrab-server):
    /// calls/s, latency and server CPU per call, metrics on and off.
    Peer(peer::PeerArgs),
    /// Serve the no-op service on ADDR until stdin closes (used by `scale`).
    #[command(hide = true)]
    NoopServer {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
    },
}

/// Flags of a plain run (no subcommand).
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Measured seconds per run (after the warm-up).
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    duration: Duration,
    /// Warm-up seconds per run (not measured).
    #[arg(long, default_value = "1", value_parser = parse_secs)]
    warmup: Duration,
    /// gRPC connections (HTTP/2) per target.
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    connections: usize,
    /// Pairs in flight per connection (unary: concurrent loops; stream:
    /// pipelined pairs on the connection's one LeaseStream).
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    concurrency: usize,
    /// Tenants in the broker config; pairs go to them round-robin.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    tenants: usize,
    /// Org-wide buckets per tenant, all matching `* /**`.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    buckets: usize,
    /// Also run open-loop at this many pairs/s (coordinated-omission corrected).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// Unary RPCs per pair, or pipelined on one LeaseStream per connection.
    #[arg(long, value_enum, default_value_t = Mode::Unary)]
    mode: Mode,
    /// Which service(s) to drive.
    #[arg(long, value_enum, default_value_t = Target::Both)]
    target: Target,
    /// Also print the results as JSON lines after the table.
    #[arg(long)]
    json: bool,
}

/// Parses a count that must be at least 1 (connections, calls in flight,
/// tenants, runs): 0 would measure nothing, or something else than asked.
pub(crate) fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?} is not a count: {e}")),
    }
}

/// Parses an open-loop rate, pairs a second: above 0, at most ten million.
fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not pairs a second: {e}"))?;
    if rate.is_finite() && rate > 0.0 && rate <= 1e7 {
        Ok(rate)
    } else {
        Err(format!(
            "{s} must be above 0 and at most 10000000 pairs a second"
        ))
    }
}

/// Parses seconds, fractions allowed ("0.5").
fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not seconds: {e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?} is not a duration: {e}"))
}

/// One run per target (and per rate), the servers in this process.
async fn run(args: RunArgs) -> Result<(), Error> {
    let config = BrokerConfig::new(args.tenants, args.buckets);
    let mut targets: Vec<(&'static str, Server)> = Vec::new();
    if matches!(args.target, Target::Broker | Target::Both) {
        targets.push(("broker", Server::broker_in_process(&config).await?));
    }
    if matches!(args.target, Target::Noop | Target::Both) {
        targets.push(("noop", Server::noop_in_process().await?));
    }
    eprintln!(
        "loadgen: {} connections x {} pairs in flight ({:?}), {} tenants x {} buckets, {:?} warm-up + {:?} per run",
        args.connections,
        args.concurrency,
        args.mode,
        config.tenants,
        config.buckets,
        args.warmup,
        args.duration
    );
    let mut schedules = vec![Schedule::Closed];
    if let Some(rate) = args.rate {
        schedules.push(Schedule::Open { rate });
    }
    let tenants: Arc<[String]> = config.tenant_ids().into();
    let mut rows = Vec::new();
    for schedule in schedules {
        let plan = Plan {
            connections: args.connections.max(1),
            concurrency: args.concurrency.max(1),
            tenants: tenants.clone(),
            warmup: args.warmup,
            duration: args.duration,
            mode: args.mode,
            schedule,
        };
        for (name, server) in &targets {
            let outcome = drive::drive(server.addr(), &plan).await?;
            eprintln!(
                "loadgen: {name} {}: {:.0} pairs/s",
                outcome.label,
                outcome.pairs_per_sec()
            );
            rows.push(TargetRow {
                target: name,
                outcome,
                rss_kib: child::rss_kib(std::process::id()).unwrap_or(0),
            });
        }
    }
    for (_, server) in targets {
        server.stop().await;
    }
    report::print_targets(&rows);
    if args.json {
        outln!();
        report::print_targets_json(&rows);
    }
    Ok(())
}

/// The hidden `noop-server`: serves until stdin reaches its end (the parent
/// closed it, or died).
async fn noop_server(listen: SocketAddr) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(Error::io(format!("bind {listen}")))?;
    let (closed_tx, closed) = tokio::sync::oneshot::channel::<()>();
    // A plain thread: a blocking read of stdin to its end.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = closed_tx.send(());
    });
    noop::serve(listener, async {
        let _ = closed.await;
    })
    .await?;
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("loadgen: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        let work = async {
            match cli.command {
                None => run(cli.run).await,
                Some(Command::Scale(args)) => scale::run(args).await,
                Some(Command::Peer(args)) => peer::run(args).await,
                Some(Command::Cluster(args)) => cluster::run(args).await,
                Some(Command::NoopServer { listen }) => noop_server(listen).await,
            }
        };
        // On SIGINT or SIGTERM the work is dropped: its child servers (and
        // etcd) are killed and their files removed, not left running.
        use tokio::signal::unix::{signal, SignalKind};
        let (mut interrupt, mut terminate) = match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(i), Ok(t)) => (i, t),
            (Err(e), _) | (_, Err(e)) => {
                return Err(Error::Io("install the signal handlers".into(), e))
            }
        };
        tokio::select! {
            out = work => out.map(|()| None),
            _ = interrupt.recv() => Ok(Some(("SIGINT", 130))),
            _ = terminate.recv() => Ok(Some(("SIGTERM", 143))),
        }
    });
    // Tasks still running (a stopped run's) drop their children with it.
    drop(runtime);
    match result {
        Ok(None) => {}
        Ok(Some((signal, code))) => {
            eprintln!("loadgen: stopped by {signal}; its child servers are stopped");
            std::process::exit(code);
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(1);
        }
    }
}
