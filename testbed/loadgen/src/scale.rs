//! The scale suite: a fixed list of scenarios, each against a fresh server,
//! printed as one table. Tenants (1 / 100 / 10,000: closed-loop max and
//! startup time), open loop at half the 1-tenant max, LeaseStream vs unary
//! (and both against the no-op service), 10,000 held leases (memory per
//! lease, and latency while they are held) and 1,000 Watch streams (memory
//! per stream, updates/s, and Acquire p99 with and without them). Memory is
//! the RSS of the server process only, so memory scenarios need the broker
//! as a child process; with `--in-process` they say so instead.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use crate::brokerconf::BrokerConfig;
use crate::child::{Child, Program};
use crate::drive::{self, Mode, Outcome, Plan, Schedule};
use crate::error::Error;
use crate::hold::Held;
use crate::parse_secs;
use crate::report::{self, ScaleRow};
use crate::server::{Server, READY_TIMEOUT};
use crate::watchers::Watchers;

/// Targets the suite checks its figures against.
const TARGET_OPEN_P99_MS: f64 = 5.0;
const TARGET_BYTES_PER_LEASE: f64 = 2048.0;
const TARGET_WATCH_P99_RATIO: f64 = 2.0;
const TARGET_STREAM_RATIO: f64 = 2.0;
/// How long 1,000 watchers may take to get their first snapshot.
const WATCH_OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Flags of `loadgen scale`.
#[derive(Args, Debug)]
pub(crate) struct ScaleArgs {
    /// A tiny suite (tests): tenants 1 and 10, 100 held leases, 10 watchers,
    /// 0.5 s runs.
    #[arg(long)]
    quick: bool,
    /// The quota-broker binary to run as a child process [default: next to
    /// loadgen's own executable].
    #[arg(long, value_name = "PATH")]
    broker_bin: Option<PathBuf>,
    /// Run the broker in this process (no memory figures; needs no binary).
    #[arg(long, conflicts_with = "broker_bin")]
    in_process: bool,
    /// Measured seconds per run [default: 5, --quick 0.5].
    #[arg(long, value_parser = parse_secs)]
    duration: Option<Duration>,
    /// Warm-up seconds per run [default: 1, --quick 0.2].
    #[arg(long, value_parser = parse_secs)]
    warmup: Option<Duration>,
    /// gRPC connections per run (one LeaseStream each in stream mode).
    #[arg(long, default_value_t = 4, value_parser = crate::at_least_one)]
    connections: usize,
    /// Pairs in flight per connection.
    #[arg(long, default_value_t = 16, value_parser = crate::at_least_one)]
    concurrency: usize,
    /// Also print the rows as JSON lines.
    #[arg(long)]
    json: bool,
}

/// The sizes of one suite.
struct Sizes {
    tenants: Vec<usize>,
    leases: usize,
    watchers: usize,
    watch_connections: usize,
    duration: Duration,
    warmup: Duration,
    connections: usize,
    concurrency: usize,
}

impl Sizes {
    fn of(args: &ScaleArgs) -> Self {
        let (tenants, leases, watchers, watch_connections, duration, warmup) = if args.quick {
            (vec![1, 10], 100, 10, 2, 0.5, 0.2)
        } else {
            (vec![1, 100, 10_000], 10_000, 1_000, 8, 5.0, 1.0)
        };
        Sizes {
            tenants,
            leases,
            watchers,
            watch_connections,
            duration: args.duration.unwrap_or(Duration::from_secs_f64(duration)),
            warmup: args.warmup.unwrap_or(Duration::from_secs_f64(warmup)),
            connections: args.connections.max(1),
            concurrency: args.concurrency.max(1),
        }
    }

    /// A closed-loop unary plan over `tenants` tenants.
    fn plan(&self, tenants: usize) -> Plan {
        Plan {
            connections: self.connections,
            concurrency: self.concurrency,
            tenants: Arc::from(BrokerConfig::new(tenants, 1).tenant_ids()),
            warmup: self.warmup,
            duration: self.duration,
            mode: Mode::Unary,
            schedule: Schedule::Closed,
        }
    }
}

/// Where servers run.
enum Launcher {
    /// Child processes; the broker from this binary.
    Child(PathBuf),
    /// Tasks in this process.
    InProcess,
}

impl Launcher {
    fn of(args: &ScaleArgs) -> Result<Self, Error> {
        if args.in_process {
            return Ok(Launcher::InProcess);
        }
        let bin = match &args.broker_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()
                .map_err(Error::io("find loadgen's own path"))?
                .with_file_name(format!("quota-broker{}", std::env::consts::EXE_SUFFIX)),
        };
        if bin.is_file() {
            Ok(Launcher::Child(bin))
        } else {
            Err(Error::MissingBinary(bin))
        }
    }

    fn in_process(&self) -> bool {
        matches!(self, Launcher::InProcess)
    }

    /// Starts a broker with `config`; returns it and how long it took to
    /// serve its first pair.
    async fn broker(&self, name: &str, config: BrokerConfig) -> Result<(Server, Duration), Error> {
        let started = Instant::now();
        let server = match self {
            Launcher::Child(bin) => Server::Child(Box::new(
                Child::spawn(
                    name,
                    Program::Broker {
                        bin,
                        config,
                        cluster: None,
                    },
                    READY_TIMEOUT,
                )
                .await?,
            )),
            Launcher::InProcess => Server::broker_in_process(&config).await?,
        };
        Ok((server, started.elapsed()))
    }

    async fn noop(&self) -> Result<Server, Error> {
        match self {
            Launcher::Child(_) => Ok(Server::Child(Box::new(
                Child::spawn("noop", Program::Noop, READY_TIMEOUT).await?,
            ))),
            Launcher::InProcess => Server::noop_in_process().await,
        }
    }

    /// Memory per item from RSS before and after, as a row note.
    fn per_item(
        &self,
        row: ScaleRow,
        before: Option<u64>,
        after: Option<u64>,
        items: usize,
        what: &str,
        key: &'static str,
    ) -> ScaleRow {
        match (before, after) {
            (Some(before), Some(after)) if items > 0 => {
                let delta_kib = after as f64 - before as f64;
                let bytes = delta_kib * 1024.0 / items as f64;
                row.note(format!(
                    "{bytes:.0} B/{what} (ΔRSS {delta_kib:.0} KiB over {items})"
                ))
                .figure(key, bytes)
                .figure("delta_rss_kib", delta_kib)
            }
            _ if self.in_process() => row.note(format!("B/{what} n/a (in-process)")),
            _ => row.note(format!("B/{what} n/a (RSS unreadable)")),
        }
    }
}

/// Runs the suite and prints its table.
pub(crate) async fn run(args: ScaleArgs) -> Result<(), Error> {
    let sizes = Sizes::of(&args);
    let launcher = Launcher::of(&args)?;
    eprintln!(
        "loadgen scale: {} connections x {} pairs in flight, {:?} warm-up + {:?} per run, servers {}",
        sizes.connections,
        sizes.concurrency,
        sizes.warmup,
        sizes.duration,
        match &launcher {
            Launcher::Child(bin) => format!("as child processes ({})", bin.display()),
            Launcher::InProcess => "in this process".into(),
        }
    );
    let mut rows = Vec::new();
    let mut unary = None;
    for &tenants in &sizes.tenants {
        let name = format!("tenants-{tenants}");
        let (server, startup) = launcher
            .broker(&name, BrokerConfig::new(tenants, 1))
            .await?;
        let plan = sizes.plan(tenants);
        let max = drive::drive(server.addr(), &plan).await?;
        progress(&name, &max);
        rows.push(
            ScaleRow::new(&name, &max, server.rss_kib())
                .note(format!("startup {} ms", startup.as_millis()))
                .figure("startup_ms", startup.as_secs_f64() * 1000.0),
        );
        if unary.is_none() {
            // On the first (1-tenant) broker: open loop at half its max, then
            // the same pairs over LeaseStream.
            let rate = max.pairs_per_sec() * 0.5;
            let open = drive::drive(
                server.addr(),
                &Plan {
                    schedule: Schedule::Open { rate },
                    ..plan.clone()
                },
            )
            .await?;
            progress("open-50%", &open);
            rows.push(
                ScaleRow::new("open-50%", &open, server.rss_kib())
                    .note(format!("at {rate:.0} pairs/s = 50% of {name} max"))
                    .figure("rate", rate)
                    .figure("open_p99_ms", open.quantile_us(0.99) as f64 / 1000.0),
            );
            let stream =
                stream_row("stream", server.addr(), &plan, max.pairs_per_sec(), &server).await;
            rows.push(stream);
            unary = Some(max.pairs_per_sec());
        }
        server.stop().await;
    }

    let noop = launcher.noop().await?;
    let plan = sizes.plan(1);
    let noop_unary = drive::drive(noop.addr(), &plan).await?;
    progress("noop-unary", &noop_unary);
    let broker_unary = unary.unwrap_or(f64::NAN);
    rows.push(
        ScaleRow::new("noop-unary", &noop_unary, noop.rss_kib())
            .note(format!(
                "broker/noop {:.2}",
                broker_unary / noop_unary.pairs_per_sec()
            ))
            .figure(
                "broker_noop_ratio",
                broker_unary / noop_unary.pairs_per_sec(),
            ),
    );
    let noop_stream = stream_row(
        "noop-stream",
        noop.addr(),
        &plan,
        noop_unary.pairs_per_sec(),
        &noop,
    )
    .await;
    let broker_stream = rows
        .iter()
        .find(|r| r.name == "stream")
        .and_then(|r| r.measured)
        .map(|m| m.pairs_per_sec);
    let noop_stream = match (broker_stream, noop_stream.measured) {
        (Some(b), Some(n)) => noop_stream
            .note(format!("broker/noop {:.2}", b / n.pairs_per_sec))
            .figure("broker_noop_ratio", b / n.pairs_per_sec),
        _ => noop_stream,
    };
    rows.push(noop_stream);
    noop.stop().await;

    rows.push(held_leases(&launcher, &sizes).await?);
    rows.extend(watchers(&launcher, &sizes).await?);

    report::print_scale(&rows);
    print_targets(&rows);
    if args.json {
        outln!();
        report::print_scale_json(&rows);
    }
    Ok(())
}

fn progress(name: &str, o: &Outcome) {
    eprintln!(
        "loadgen scale: {name}: {:.0} pairs/s, p99 {:.3} ms",
        o.pairs_per_sec(),
        o.quantile_us(0.99) as f64 / 1000.0
    );
}

/// The stream-mode run of `plan` on `server`, compared with `unary`
/// pairs/s; a failure (a server without LeaseStream) becomes the row.
async fn stream_row(
    name: &str,
    addr: std::net::SocketAddr,
    plan: &Plan,
    unary: f64,
    server: &Server,
) -> ScaleRow {
    let plan = Plan {
        mode: Mode::Stream,
        ..plan.clone()
    };
    match drive::drive(addr, &plan).await {
        Ok(o) => {
            progress(name, &o);
            let ratio = o.pairs_per_sec() / unary;
            ScaleRow::new(name, &o, server.rss_kib())
                .note(format!("stream/unary {ratio:.2}x"))
                .figure("stream_unary_ratio", ratio)
        }
        Err(e) => ScaleRow::failed(name, &e.to_string()),
    }
}

/// held-leases-N: memory per held lease, then pairs while they are held.
async fn held_leases(launcher: &Launcher, sizes: &Sizes) -> Result<ScaleRow, Error> {
    let name = format!("held-leases-{}", sizes.leases);
    let (server, _) = launcher.broker(&name, BrokerConfig::new(1, 1)).await?;
    let plan = sizes.plan(1);
    let channels = drive::connect(server.addr(), sizes.connections).await?;
    // Warm up on the same connections first, so the baseline already holds
    // their buffers and the runtime's working set.
    drive::drive_on(
        &channels,
        &Plan {
            warmup: Duration::ZERO,
            duration: sizes.warmup.max(Duration::from_millis(100)),
            ..plan.clone()
        },
    )
    .await?;
    let before = server.rss_kib();
    let held = Held::acquire(
        channels.clone(),
        "t0",
        sizes.leases,
        sizes.connections * sizes.concurrency,
    )
    .await?;
    let with = server.rss_kib();
    let during = drive::drive_on(&channels, &plan).await?;
    progress(&name, &during);
    let count = held.len();
    let released = held.release_all().await?;
    let row = ScaleRow::new(&name, &during, with);
    let row = launcher.per_item(row, before, with, count, "lease", "bytes_per_lease");
    let row = row.note(format!("pairs while held; released {released}/{count}"));
    server.stop().await;
    Ok(row)
}

/// watch-0 and watch-N: pairs without watchers, then with N Watch streams
/// open and reading; memory per stream and updates/s.
async fn watchers(launcher: &Launcher, sizes: &Sizes) -> Result<Vec<ScaleRow>, Error> {
    let name = format!("watch-{}", sizes.watchers);
    let (server, _) = launcher.broker(&name, BrokerConfig::new(1, 1)).await?;
    let plan = sizes.plan(1);
    let channels = drive::connect(server.addr(), sizes.connections).await?;
    let base = drive::drive_on(&channels, &plan).await?;
    progress("watch-0", &base);
    let before = server.rss_kib();
    let watchers = Watchers::open(
        server.addr(),
        "t0",
        sizes.watchers,
        sizes.watch_connections,
        WATCH_OPEN_TIMEOUT,
    )
    .await?;
    let with = server.rss_kib();
    let (updates_before, started) = (watchers.updates(), Instant::now());
    let during = drive::drive_on(&channels, &plan).await?;
    let updates_per_sec =
        (watchers.updates() - updates_before) as f64 / started.elapsed().as_secs_f64();
    progress(&name, &during);
    watchers.close().await;
    let ratio = during.quantile_us(0.99) as f64 / base.quantile_us(0.99).max(1) as f64;
    let base_row = ScaleRow::new("watch-0", &base, before).note(format!("baseline for {name}"));
    let row = ScaleRow::new(&name, &during, server.rss_kib())
        .note(format!("p99 {ratio:.2}x watch-0"))
        .figure("watch_p99_ratio", ratio);
    let row = launcher.per_item(
        row,
        before,
        with,
        sizes.watchers,
        "stream",
        "bytes_per_stream",
    );
    let row = row
        .note(format!(
            "{updates_per_sec:.0} updates/s over {} connections",
            sizes.watch_connections
        ))
        .figure("updates_per_sec", updates_per_sec);
    server.stop().await;
    Ok(vec![base_row, row])
}

/// Prints each target with its figure and whether it is met.
fn print_targets(rows: &[ScaleRow]) {
    let figure = |key: &str| rows.iter().find_map(|r| r.get(key));
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    outln!();
    if let Some(p99) = figure("open_p99_ms") {
        outln!(
            "target p99 <= {TARGET_OPEN_P99_MS} ms at 50% of max: {p99:.3} ms, {}",
            verdict(p99 <= TARGET_OPEN_P99_MS)
        );
    }
    match figure("bytes_per_lease") {
        Some(b) => outln!(
            "target <= {TARGET_BYTES_PER_LEASE} B per held lease: {b:.0} B, {}",
            verdict(b <= TARGET_BYTES_PER_LEASE)
        ),
        None => outln!("target <= {TARGET_BYTES_PER_LEASE} B per held lease: n/a"),
    }
    if let Some(r) = figure("watch_p99_ratio") {
        outln!(
            "target Acquire p99 with watchers <= {TARGET_WATCH_P99_RATIO}x without: {r:.2}x, {}",
            verdict(r <= TARGET_WATCH_P99_RATIO)
        );
    }
    match rows
        .iter()
        .find(|r| r.name == "stream")
        .and_then(|r| r.get("stream_unary_ratio"))
    {
        Some(r) => outln!(
            "target stream >= {TARGET_STREAM_RATIO}x unary pairs/s: {r:.2}x, {}",
            verdict(r >= TARGET_STREAM_RATIO)
        ),
        None => {
            outln!("target stream >= {TARGET_STREAM_RATIO}x unary pairs/s: n/a (stream failed)")
        }
    }
}
