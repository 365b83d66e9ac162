//! `loadgen peer`: the broker's unary Acquire against a peer rate-limit
//! server, throttlecrab-server (a Rust GCRA server on tonic, installed by
//! `scripts/install-peer.sh`), with one closed-loop driver for both: one
//! rate decision per call, every call allowed. Each cell (keys × in
//! flight) runs the broker with metrics on, the broker with metrics off and
//! the peer, in alternating order, `--runs` times; calls/s and latency are
//! pooled over the runs, and each server's CPU per call is read from
//! `/proc/PID/stat` around every run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use quota_broker::pb::{AcquireRequest, AcquireResponse};
use tokio::process::Command;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

use crate::child::child_files;
use crate::drive::{connect, Tally, Window};
use crate::error::Error;
use crate::h2drive::{Framed, H2Caller};
use crate::raw::{Encoded, RawCaller};
use bytes::Bytes;
use h2::client::SendRequest;
use prost::Message;

/// The peer's one RPC, written out by hand: a build script and a proto
/// file for a single message pair would cost more than these lines.
mod wire {
    /// throttlecrab.ThrottleRequest.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct ThrottleRequest {
        #[prost(string, tag = "1")]
        pub(crate) key: String,
        #[prost(int32, tag = "2")]
        pub(crate) max_burst: i32,
        #[prost(int32, tag = "3")]
        pub(crate) count_per_period: i32,
        #[prost(int32, tag = "4")]
        pub(crate) period: i32,
        #[prost(int32, tag = "5")]
        pub(crate) quantity: i32,
    }

    /// throttlecrab.ThrottleResponse.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct ThrottleResponse {
        #[prost(bool, tag = "1")]
        pub(crate) allowed: bool,
        #[prost(int32, tag = "2")]
        pub(crate) limit: i32,
        #[prost(int32, tag = "3")]
        pub(crate) remaining: i32,
        #[prost(int32, tag = "4")]
        pub(crate) retry_after: i32,
        #[prost(int32, tag = "5")]
        pub(crate) reset_after: i32,
    }
}

const THROTTLE: &str = "/throttlecrab.RateLimiter/Throttle";
const ACQUIRE: &str = "/quota.v1.QuotaBroker/Acquire";
/// A million a second, burst a million (the broker's largest burst): no
/// run comes near it, so every call is allowed on both servers.
const HUGE: i32 = 1_000_000;

/// Flags of `loadgen peer`.
#[derive(clap::Args, Debug)]
pub(crate) struct PeerArgs {
    /// The release `quota-broker` binary (default: next to loadgen).
    #[arg(long)]
    broker_bin: Option<PathBuf>,
    /// The throttlecrab-server binary (default: target/peer/bin, where
    /// scripts/install-peer.sh puts it).
    #[arg(long)]
    peer_bin: Option<PathBuf>,
    /// Alternating runs per cell and target.
    #[arg(long, default_value_t = 6, value_parser = crate::at_least_one)]
    runs: usize,
    /// Measured seconds per run.
    #[arg(long, default_value = "10", value_parser = crate::parse_secs)]
    duration: Duration,
    /// Warm-up seconds per run.
    #[arg(long, default_value = "1", value_parser = crate::parse_secs)]
    warmup: Duration,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 4, value_parser = crate::at_least_one)]
    connections: usize,
    /// Calls in flight per connection.
    #[arg(long, default_value_t = 32, value_parser = crate::at_least_one)]
    concurrency: usize,
    /// Run the servers on CPU 0 (`taskset -c 0`); start loadgen itself with
    /// `taskset -c 1` so driver and server each have one core.
    #[arg(long)]
    pin: bool,
    /// Only these cells (default: all three).
    #[arg(long, value_enum)]
    cell: Vec<CellKind>,
    /// How the driver makes its calls (default: typed); several run one
    /// after the other, each cell with each.
    #[arg(long, value_enum)]
    driver: Vec<Driver>,
}

/// How the driver builds requests and reads answers.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Driver {
    /// Each server's generated client: requests built and encoded, answers
    /// decoded, per call (what a real client pays).
    Typed,
    /// Requests encoded before the run and answers taken as bytes, so the
    /// driver spends the same on either server (see raw.rs).
    Raw,
    /// The raw driver's requests over the h2 crate directly, without
    /// tonic's client (see h2drive.rs): the lightest driver.
    H2,
}

/// The cells `loadgen peer` measures.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum CellKind {
    /// One key, `--connections` × `--concurrency` in flight.
    OneKey,
    /// 1,000 keys, `--connections` × `--concurrency` in flight.
    ManyKeys,
    /// One key, one call in flight on one connection.
    OneInFlight,
}

/// What a run drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    BrokerMetrics,
    BrokerNoMetrics,
    Peer,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::BrokerMetrics => "broker (metrics on)",
            Target::BrokerNoMetrics => "broker (metrics off)",
            Target::Peer => "throttlecrab-server",
        }
    }
}

/// A cell: keys, load shape and driver.
#[derive(Clone, Copy, Debug)]
struct Cell {
    keys: usize,
    connections: usize,
    concurrency: usize,
    driver: Driver,
}

impl Cell {
    fn label(self) -> String {
        format!(
            "{} key{}, {} conn x {} in flight{}",
            self.keys,
            if self.keys == 1 { "" } else { "s" },
            self.connections,
            self.concurrency,
            match self.driver {
                Driver::Typed => "",
                Driver::Raw => ", raw driver",
                Driver::H2 => ", h2 driver",
            }
        )
    }
}

/// A server child process, killed when dropped.
struct Proc {
    child: tokio::process::Child,
    pid: u32,
    addr: SocketAddr,
    files: Vec<PathBuf>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// User + system CPU time of `pid` so far, from /proc/PID/stat.
pub(crate) fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, in parentheses).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(Duration::from_millis((utime + stime) * 10))
}

/// The broker config: one tenant `t0`, a rate-only bucket (org-wide for one
/// key, per OAuth client for many).
fn broker_config(listen: SocketAddr, keys: usize, metrics: bool) -> String {
    let http = if metrics { "127.0.0.1:0" } else { "" };
    let scope = if keys > 1 {
        format!("scope = \"oauth_client\"\nmax_clients = {}\n", keys * 2)
    } else {
        String::new()
    };
    format!(
        "[server]\nlisten = \"{listen}\"\nhttp_listen = \"{http}\"\nstate_dir = \"\"\n\
         shutdown_grace_ms = 1000\n[[tenants]]\nid = \"t0\"\n[[tenants.buckets]]\nname = \"rate\"\n\
         routes = [\"* /**\"]\npermits = {HUGE}\nwindow_ms = 1000\nburst = {HUGE}\n{scope}"
    )
}

async fn spawn(
    target: Target,
    keys: usize,
    broker_bin: &Path,
    peer_bin: &Path,
    pin: bool,
) -> Result<Proc, Error> {
    let (addr, dir, log_path) = child_files(&format!("peer-{target:?}"))?;
    let mut files = vec![log_path.clone()];
    let (bin, args): (&Path, Vec<String>) = match target {
        Target::BrokerMetrics | Target::BrokerNoMetrics => {
            let config = dir.join(format!("{target:?}.toml"));
            std::fs::write(
                &config,
                broker_config(addr, keys, target == Target::BrokerMetrics),
            )
            .map_err(Error::io(format!("write {}", config.display())))?;
            files.push(config.clone());
            (
                broker_bin,
                vec!["--config".into(), config.display().to_string()],
            )
        }
        Target::Peer => (
            peer_bin,
            vec![
                "--grpc".into(),
                "--grpc-host".into(),
                "127.0.0.1".into(),
                "--grpc-port".into(),
                addr.port().to_string(),
            ],
        ),
    };
    if !bin.is_file() {
        return Err(Error::MissingBinary(bin.to_owned()));
    }
    let mut command = if pin {
        let mut c = Command::new("taskset");
        c.arg("-c").arg("0").arg(bin);
        c
    } else {
        Command::new(bin)
    };
    let log = std::fs::File::create(&log_path)
        .map_err(Error::io(format!("create {}", log_path.display())))?;
    let child = command
        .args(&args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(Error::io(format!("start {}", bin.display())))?;
    let pid = child.id().unwrap_or(0);
    let mut proc = Proc {
        child,
        pid,
        addr,
        files,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = proc.child.try_wait() {
            return Err(Error::Exited {
                what: target.name().to_owned(),
                status,
                log: std::fs::read_to_string(&log_path).unwrap_or_default(),
            });
        }
        let attempt = async {
            let channels = connect(addr, 1).await?;
            let mut caller =
                Caller::new(target, Conn::Tonic(channels[0].clone()), Driver::Typed, 1)?;
            caller.call(0).await.map_err(Error::Rpc)
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(())) => return Ok(proc),
            Ok(Err(e)) if Instant::now() >= deadline => {
                return Err(Error::NotReady {
                    what: target.name().to_owned(),
                    waited: Duration::from_secs(30),
                    last: e.to_string(),
                })
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
        if Instant::now() >= deadline {
            return Err(Error::NotReady {
                what: target.name().to_owned(),
                waited: Duration::from_secs(30),
                last: "timed out".into(),
            });
        }
    }
}

/// The broker's Acquire on key `key`: one permit of the rate bucket, no wait.
fn acquire_request(key: usize) -> AcquireRequest {
    AcquireRequest {
        tenant: "t0".into(),
        client_id: "loadgen".into(),
        priority_class: String::new(),
        method: "GET".into(),
        path: "/api/v2/users".into(),
        oauth_client: format!("k{key}"),
        permits: 1,
        max_wait_ms: Some(0),
        idempotency_key: String::new(),
    }
}

/// The peer's Throttle on key `key`: one unit of a limit no run reaches.
fn throttle_request(key: usize) -> wire::ThrottleRequest {
    wire::ThrottleRequest {
        key: format!("k{key}"),
        max_burst: HUGE,
        count_per_period: HUGE,
        period: 1,
        quantity: 1,
    }
}

/// One connection to a server, as the driver uses it.
#[derive(Clone)]
enum Conn {
    /// A tonic channel (typed and raw drivers).
    Tonic(Channel),
    /// An h2 connection and the server's address (h2 driver).
    H2(SendRequest<Bytes>, SocketAddr),
}

/// `n` connections to `addr` for `driver`.
async fn open(addr: SocketAddr, n: usize, driver: Driver) -> Result<Vec<Conn>, Error> {
    Ok(match driver {
        Driver::H2 => crate::h2drive::connect(addr, n)
            .await?
            .into_iter()
            .map(|send| Conn::H2(send, addr))
            .collect(),
        Driver::Typed | Driver::Raw => connect(addr, n)
            .await?
            .into_iter()
            .map(Conn::Tonic)
            .collect(),
    })
}

/// One rate decision per call, on either server. The typed callers of
/// both go through `tonic::client::Grpc::unary` with prost's codec, so
/// they differ only in their messages (the generated broker client would
/// also add its method extension to every request).
enum Caller {
    Broker(tonic::client::Grpc<Channel>),
    Peer(tonic::client::Grpc<Channel>),
    Raw(RawCaller),
    H2(H2Caller),
}

impl Caller {
    /// A caller of `target` over `conn`; `keys` sizes the raw drivers'
    /// tables of encoded requests.
    fn new(target: Target, conn: Conn, driver: Driver, keys: usize) -> Result<Caller, Error> {
        let (path, encode): (&'static str, fn(usize) -> Vec<u8>) = match target {
            Target::Peer => (THROTTLE, |k| throttle_request(k).encode_to_vec()),
            _ => (ACQUIRE, |k| acquire_request(k).encode_to_vec()),
        };
        Ok(match (conn, driver, target) {
            (Conn::H2(send, addr), _, _) => Caller::H2(H2Caller::new(
                send,
                Framed::new(addr, path, keys, encode).map_err(Error::Rpc)?,
            )),
            (Conn::Tonic(channel), Driver::Raw | Driver::H2, _) => {
                Caller::Raw(RawCaller::new(channel, Encoded::new(path, keys, encode)))
            }
            (Conn::Tonic(channel), Driver::Typed, Target::Peer) => {
                Caller::Peer(tonic::client::Grpc::new(channel))
            }
            (Conn::Tonic(channel), Driver::Typed, _) => {
                Caller::Broker(tonic::client::Grpc::new(channel))
            }
        })
    }

    /// One call on key `key`; Err on a transport error or a refusal.
    async fn call(&mut self, key: usize) -> Result<(), tonic::Status> {
        match self {
            Caller::Broker(grpc) => {
                let r: AcquireResponse = typed_unary(grpc, ACQUIRE, acquire_request(key)).await?;
                if r.granted {
                    Ok(())
                } else {
                    Err(tonic::Status::resource_exhausted(r.reason))
                }
            }
            Caller::Peer(grpc) => {
                let r: wire::ThrottleResponse =
                    typed_unary(grpc, THROTTLE, throttle_request(key)).await?;
                if r.allowed {
                    Ok(())
                } else {
                    Err(tonic::Status::resource_exhausted("throttled"))
                }
            }
            Caller::Raw(raw) => raw.call(key).await,
            Caller::H2(h2) => h2.call(key).await,
        }
    }
}

/// One unary call of `path` with prost's codec, the typed callers' path
/// for either server.
async fn typed_unary<Req, Resp>(
    grpc: &mut tonic::client::Grpc<Channel>,
    path: &'static str,
    request: Req,
) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    Ok(grpc
        .unary(
            tonic::Request::new(request),
            PathAndQuery::from_static(path),
            codec,
        )
        .await?
        .into_inner())
}

/// One measured run of `cell` on `proc`.
async fn run_once(
    target: Target,
    cell: Cell,
    proc: &Proc,
    warmup: Duration,
    duration: Duration,
) -> Result<(Tally, Cpu), Error> {
    let conns = open(proc.addr, cell.connections, cell.driver).await?;
    let start = Instant::now();
    let window = Window {
        start,
        measure_from: start + warmup,
        end: start + warmup + duration,
    };
    let mut tasks = tokio::task::JoinSet::new();
    let loops = cell.connections * cell.concurrency;
    for i in 0..loops {
        let mut caller = Caller::new(
            target,
            conns[i % conns.len()].clone(),
            cell.driver,
            cell.keys,
        )?;
        let keys = cell.keys;
        tasks.spawn(async move {
            let mut tally = Tally::new();
            let mut key = i % keys;
            loop {
                let begin = Instant::now();
                if begin >= window.end {
                    break;
                }
                let ok = caller.call(key).await.is_ok();
                key = (key + loops) % keys;
                tally.record(&window, begin, ok);
            }
            tally
        });
    }
    tokio::time::sleep_until((window.measure_from).into()).await;
    let own = std::process::id();
    let from = (cpu_time(proc.pid), cpu_time(own));
    let io_from = (syscalls(proc.pid), syscalls(own));
    let mut tally = Tally::new();
    tokio::time::sleep_until(window.end.into()).await;
    let to = (cpu_time(proc.pid), cpu_time(own));
    let io_to = (syscalls(proc.pid), syscalls(own));
    while let Some(t) = tasks.join_next().await {
        tally.merge(&t?)?;
    }
    let spent = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => Duration::ZERO,
    };
    let counted = |a: Option<Syscalls>, b: Option<Syscalls>| match (a, b) {
        (Some(a), Some(b)) => Syscalls {
            reads: b.reads.saturating_sub(a.reads),
            writes: b.writes.saturating_sub(a.writes),
        },
        _ => Syscalls::default(),
    };
    let cpu = Cpu {
        server: spent(from.0, to.0),
        driver: spent(from.1, to.1),
        server_io: counted(io_from.0, io_to.0),
        driver_io: counted(io_from.1, io_to.1),
    };
    Ok((tally, cpu))
}

/// CPU time spent during a measured run.
#[derive(Clone, Copy, Default)]
struct Cpu {
    /// By the server under test.
    server: Duration,
    /// By loadgen itself (the driver).
    driver: Duration,
    /// Read and write system calls of the server.
    server_io: Syscalls,
    /// Read and write system calls of the driver.
    driver_io: Syscalls,
}

/// Counts of read-like and write-like system calls, from /proc/PID/io:
/// how many calls share a socket write (batching). Socket reads through
/// `recv` are not among the reads counted there.
#[derive(Clone, Copy, Default)]
struct Syscalls {
    reads: u64,
    writes: u64,
}

/// `syscr` and `syscw` of `pid` so far.
fn syscalls(pid: u32) -> Option<Syscalls> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(Syscalls {
        reads: field("syscr:")?,
        writes: field("syscw:")?,
    })
}

/// Pooled figures of one target in one cell.
struct Pooled {
    tally: Tally,
    cpu: Duration,
    driver_cpu: Duration,
    server_writes: u64,
    driver_writes: u64,
    secs: f64,
    per_run: Vec<f64>,
}

pub(crate) async fn run(args: PeerArgs) -> Result<(), Error> {
    let broker_bin = match &args.broker_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .map_err(Error::io("find loadgen's own path"))?
            .with_file_name("quota-broker"),
    };
    let peer_bin = args.peer_bin.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/peer/bin/throttlecrab-server")
    });
    let cells = [
        (
            CellKind::OneKey,
            Cell {
                keys: 1,
                connections: args.connections,
                concurrency: args.concurrency,
                driver: Driver::Typed,
            },
        ),
        (
            CellKind::ManyKeys,
            Cell {
                keys: 1000,
                connections: args.connections,
                concurrency: args.concurrency,
                driver: Driver::Typed,
            },
        ),
        (
            CellKind::OneInFlight,
            Cell {
                keys: 1,
                connections: 1,
                concurrency: 1,
                driver: Driver::Typed,
            },
        ),
    ];
    let drivers = if args.driver.is_empty() {
        vec![Driver::Typed]
    } else {
        args.driver.clone()
    };
    let cells: Vec<Cell> = drivers
        .iter()
        .flat_map(|&driver| {
            cells
                .iter()
                .filter(|(kind, _)| args.cell.is_empty() || args.cell.contains(kind))
                .map(move |&(_, cell)| Cell { driver, ..cell })
        })
        .collect();
    let targets = [Target::BrokerMetrics, Target::BrokerNoMetrics, Target::Peer];
    eprintln!(
        "loadgen peer: {} runs x {:?} (+{:?} warm-up) per cell and target, alternating{}",
        args.runs,
        args.duration,
        args.warmup,
        if args.pin { ", servers on CPU 0" } else { "" }
    );
    outln!("| cell | target | calls/s (pooled) | runs (calls/s) | p50 µs | p99 µs | server CPU µs/call | driver CPU µs/call | calls per server write | calls per driver write | vs peer calls/s | vs peer CPU |");
    outln!("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for cell in cells {
        let mut pooled: Vec<Pooled> = targets
            .iter()
            .map(|_| Pooled {
                tally: Tally::new(),
                cpu: Duration::ZERO,
                driver_cpu: Duration::ZERO,
                server_writes: 0,
                driver_writes: 0,
                secs: 0.0,
                per_run: Vec::new(),
            })
            .collect();
        for r in 0..args.runs {
            // Rotate who goes first, so drift in the machine's load falls on
            // every target alike.
            for k in 0..targets.len() {
                let t = (r + k) % targets.len();
                let target = targets[t];
                let proc = spawn(target, cell.keys, &broker_bin, &peer_bin, args.pin).await?;
                let (tally, cpu) =
                    run_once(target, cell, &proc, args.warmup, args.duration).await?;
                drop(proc);
                let rate = tally.pairs as f64 / args.duration.as_secs_f64();
                eprintln!(
                    "loadgen peer: {} / {} run {}: {rate:.0} calls/s, {} errors",
                    cell.label(),
                    target.name(),
                    r + 1,
                    tally.errors
                );
                let p = &mut pooled[t];
                p.per_run.push(rate);
                p.tally.merge(&tally)?;
                p.cpu += cpu.server;
                p.driver_cpu += cpu.driver;
                p.server_writes += cpu.server_io.writes;
                p.driver_writes += cpu.driver_io.writes;
                p.secs += args.duration.as_secs_f64();
            }
        }
        let peer_rate = pooled[2].tally.pairs as f64 / pooled[2].secs.max(1e-9);
        let cpu_per_call = |p: &Pooled| p.cpu.as_secs_f64() * 1e6 / (p.tally.pairs.max(1) as f64);
        let peer_cpu = cpu_per_call(&pooled[2]);
        for (t, p) in pooled.iter().enumerate() {
            let rate = p.tally.pairs as f64 / p.secs.max(1e-9);
            let runs: Vec<String> = p.per_run.iter().map(|r| format!("{r:.0}")).collect();
            let (vs_rate, vs_cpu) = if t == 2 {
                ("1.00".to_owned(), "1.00".to_owned())
            } else {
                (
                    format!("{:.2}×", rate / peer_rate.max(1e-9)),
                    format!("{:.2}×", cpu_per_call(p) / peer_cpu.max(1e-9)),
                )
            };
            outln!(
                "| {} | {} | {rate:.0} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {vs_rate} | {vs_cpu} |",
                cell.label(),
                targets[t].name(),
                runs.join(", "),
                p.tally.hist.value_at_quantile(0.5),
                p.tally.hist.value_at_quantile(0.99),
                cpu_per_call(p),
                p.driver_cpu.as_secs_f64() * 1e6 / (p.tally.pairs.max(1) as f64),
                p.tally.pairs as f64 / p.server_writes.max(1) as f64,
                p.tally.pairs as f64 / p.driver_writes.max(1) as f64,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_time_of_this_process() {
        assert!(cpu_time(std::process::id()).is_some());
        let before = syscalls(std::process::id()).unwrap();
        let _ = std::fs::read_to_string("/proc/self/stat").unwrap();
        let after = syscalls(std::process::id()).unwrap();
        assert!(after.reads > before.reads);
    }

    #[test]
    fn the_broker_config_is_valid_both_ways() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        for (keys, metrics) in [(1, true), (1000, false)] {
            let s = quota_broker::Settings::from_toml(&broker_config(addr, keys, metrics)).unwrap();
            assert_eq!(s.server.http_listen.is_some(), metrics);
        }
    }
}
