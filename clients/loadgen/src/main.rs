//! Load generator for quota-broker: drives Acquire→Release pairs against the
//! real broker and against a no-op QuotaBroker service (same gRPC stack, no
//! decision), both started in this process, and prints throughput and latency.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::quota_broker_server::{QuotaBroker, QuotaBrokerServer};
use quota_broker::pb::{
    AcquireRequest, AcquireResponse, QuotaStatus, ReleaseRequest, ReleaseResponse, RenewRequest,
    RenewResponse, ReportRequest, ReportResponse, WatchRequest,
};
use quota_broker::{server, Settings};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// Which services to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Broker,
    Noop,
    Both,
}

/// Acquire→Release load against the broker and a no-op baseline.
#[derive(Parser, Debug)]
#[command(name = "loadgen", version)]
struct Args {
    /// Measured seconds per run (after the warm-up).
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Warm-up seconds per run (not measured).
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// gRPC connections (HTTP/2) per target.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Concurrent Acquire→Release loops per connection.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Tenants in the broker config; pairs go to them round-robin.
    #[arg(long, default_value_t = 1)]
    tenants: usize,
    /// Org-wide buckets per tenant, all matching `* /**`.
    #[arg(long, default_value_t = 1)]
    buckets: usize,
    /// Also run open-loop at this many pairs/s (coordinated-omission corrected).
    #[arg(long)]
    rate: Option<f64>,
    /// Which service(s) to drive.
    #[arg(long, value_enum, default_value_t = Target::Both)]
    target: Target,
    /// Also print the results as JSON lines after the table.
    #[arg(long)]
    json: bool,
}

/// The broker config: `tenants` tenants, each with `buckets` org-wide buckets
/// matching every call with a huge rate; the first also holds a slot per lease.
fn broker_config(tenants: usize, buckets: usize) -> String {
    let mut s = String::from(
        "[server]\nshutdown_grace_ms = 1000\nstate_dir = \"\"\nmax_wait_ms = 1000\n\n",
    );
    for t in 0..tenants {
        s.push_str(&format!("[[tenants]]\nid = \"t{t}\"\n"));
        for b in 0..buckets {
            s.push_str(&format!(
                "[[tenants.buckets]]\nname = \"b{b}\"\nscope = \"org\"\nroutes = [\"* /**\"]\n\
                 permits = 100000000\nwindow_ms = 1000\nburst = 1000000\n"
            ));
            if b == 0 {
                s.push_str("max_in_flight = 1000000\n");
            }
        }
        s.push('\n');
    }
    s
}

/// A QuotaBroker that grants everything at once: the gRPC-stack baseline.
struct Noop;

type WatchStream = Pin<Box<dyn Stream<Item = Result<QuotaStatus, Status>> + Send>>;

#[tonic::async_trait]
impl QuotaBroker for Noop {
    async fn acquire(
        &self,
        request: Request<AcquireRequest>,
    ) -> Result<Response<AcquireResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(AcquireResponse {
            granted: true,
            lease_id: "noop".into(),
            permits: req.permits.max(1),
            ..Default::default()
        }))
    }

    async fn release(
        &self,
        _request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        Ok(Response::new(ReleaseResponse { released: true }))
    }

    async fn renew(
        &self,
        _request: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        Ok(Response::new(RenewResponse::default()))
    }

    async fn report(
        &self,
        _request: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        Ok(Response::new(ReportResponse::default()))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        _request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(Box::pin(tokio_stream::empty())))
    }

    type LeaseStreamStream =
        Pin<Box<dyn Stream<Item = Result<quota_broker::pb::LeaseStreamResponse, Status>> + Send>>;

    async fn lease_stream(
        &self,
        _request: Request<tonic::Streaming<quota_broker::pb::LeaseStreamRequest>>,
    ) -> Result<Response<Self::LeaseStreamStream>, Status> {
        Err(Status::unimplemented("no-op service: LeaseStream"))
    }
}

/// A server running in this process until `stop` is sent.
struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_broker(toml: &str) -> Result<Running, Box<dyn std::error::Error>> {
    let settings = Settings::from_toml(toml)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(e) = server::run(listener, &settings, shutdown).await {
            eprintln!("broker: {e}");
        }
    });
    Ok(Running { addr, stop, task })
}

async fn start_noop() -> Result<Running, Box<dyn std::error::Error>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(QuotaBrokerServer::new(Noop))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            eprintln!("noop: {e}");
        }
    });
    Ok(Running { addr, stop, task })
}

/// One run's outcome.
struct Outcome {
    target: &'static str,
    mode: String,
    pairs: u64,
    errors: u64,
    secs: f64,
    hist: Histogram<u64>,
    rss_kib: u64,
}

impl Outcome {
    fn pairs_per_sec(&self) -> f64 {
        self.pairs as f64 / self.secs
    }
}

/// What one loop measured.
struct Tally {
    pairs: u64,
    errors: u64,
    hist: Histogram<u64>,
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// One Acquire→Release pair. Err on transport errors and on not-granted.
async fn pair(client: &mut QuotaBrokerClient<Channel>, tenant: &str) -> Result<(), Status> {
    let acquired = client
        .acquire(AcquireRequest {
            tenant: tenant.to_owned(),
            client_id: "loadgen".into(),
            priority_class: "critical".into(),
            method: "GET".into(),
            path: "/api/v2/users".into(),
            oauth_client: String::new(),
            permits: 1,
            max_wait_ms: Some(100),
        })
        .await?
        .into_inner();
    if !acquired.granted {
        return Err(Status::resource_exhausted(acquired.reason));
    }
    client
        .release(ReleaseRequest {
            lease_id: acquired.lease_id,
        })
        .await?;
    Ok(())
}

/// The pair schedule of one loop: closed (back to back) or open (fixed interval).
#[derive(Clone, Copy)]
enum Mode {
    Closed,
    Open { interval: Duration },
}

#[allow(clippy::too_many_arguments)]
async fn run_loop(
    mut client: QuotaBrokerClient<Channel>,
    tenants: Vec<String>,
    first_tenant: usize,
    mode: Mode,
    phase: Duration,
    start: Instant,
    measure_from: Instant,
    end: Instant,
) -> Tally {
    let mut tally = Tally {
        pairs: 0,
        errors: 0,
        hist: new_hist(),
    };
    let mut next_tenant = first_tenant;
    let mut scheduled = start + phase;
    loop {
        // When the pair counts as started: now (closed loop) or its scheduled
        // send time (open loop), so a slow answer that delays later sends is
        // charged to those sends too (coordinated omission).
        let begin = match mode {
            Mode::Closed => Instant::now(),
            Mode::Open { interval } => {
                let at = scheduled;
                scheduled += interval;
                if at > Instant::now() {
                    tokio::time::sleep_until(at.into()).await;
                }
                at
            }
        };
        if begin >= end {
            break;
        }
        let tenant = &tenants[next_tenant];
        next_tenant = (next_tenant + 1) % tenants.len();
        let ok = pair(&mut client, tenant).await.is_ok();
        if begin >= measure_from {
            if ok {
                tally.pairs += 1;
                let us = Instant::now().duration_since(begin).as_micros() as u64;
                tally.hist.saturating_record(us.max(1));
            } else {
                tally.errors += 1;
            }
        }
    }
    tally
}

async fn drive(
    target: &'static str,
    addr: SocketAddr,
    args: &Args,
    rate: Option<f64>,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let tenants: Vec<String> = (0..args.tenants.max(1)).map(|t| format!("t{t}")).collect();
    let loops = args.connections.max(1) * args.concurrency.max(1);
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        // A separate Endpoint::connect is a separate HTTP/2 connection.
        channels.push(
            Endpoint::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    let (mode, label) = match rate {
        None => (Mode::Closed, "closed (max)".to_string()),
        Some(r) => (
            Mode::Open {
                interval: Duration::from_secs_f64(loops as f64 / r),
            },
            format!("open {r} /s"),
        ),
    };
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup);
    let end = measure_from + Duration::from_secs(args.duration);
    let mut tasks = Vec::with_capacity(loops);
    for i in 0..loops {
        let client = QuotaBrokerClient::new(channels[i % channels.len()].clone());
        // Open loop: spread the loops' send times evenly over one interval.
        let phase = match mode {
            Mode::Closed => Duration::ZERO,
            Mode::Open { interval } => interval.mul_f64(i as f64 / loops as f64),
        };
        tasks.push(tokio::spawn(run_loop(
            client,
            tenants.clone(),
            i % tenants.len(),
            mode,
            phase,
            start,
            measure_from,
            end,
        )));
    }
    let mut hist = new_hist();
    let (mut pairs, mut errors) = (0, 0);
    for task in tasks {
        let tally = task.await?;
        pairs += tally.pairs;
        errors += tally.errors;
        hist.add(&tally.hist)?;
    }
    // Pairs that began inside the measured window, over the window's length.
    let secs = (args.duration as f64).max(f64::MIN_POSITIVE);
    Ok(Outcome {
        target,
        mode: label,
        pairs,
        errors,
        secs,
        hist,
        rss_kib: rss_kib(),
    })
}

/// This process's resident set size (VmRSS) in KiB; 0 if unknown.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn print_table(outcomes: &[Outcome]) {
    println!("| target | mode | pairs/s | p50 ms | p99 ms | p999 ms | errors | RSS MiB |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for o in outcomes {
        println!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {:.1} |",
            o.target,
            o.mode,
            o.pairs_per_sec(),
            ms(o.hist.value_at_quantile(0.50)),
            ms(o.hist.value_at_quantile(0.99)),
            ms(o.hist.value_at_quantile(0.999)),
            o.errors,
            o.rss_kib as f64 / 1024.0,
        );
    }
    let modes: Vec<&String> = {
        let mut m: Vec<&String> = outcomes.iter().map(|o| &o.mode).collect();
        m.dedup();
        m
    };
    for mode in modes {
        let find = |t: &str| outcomes.iter().find(|o| o.target == t && &o.mode == mode);
        if let (Some(b), Some(n)) = (find("broker"), find("noop")) {
            println!(
                "\nbroker/noop pairs/s, {mode}: {:.2}",
                b.pairs_per_sec() / n.pairs_per_sec().max(f64::MIN_POSITIVE)
            );
        }
    }
}

fn print_json(outcomes: &[Outcome]) {
    for o in outcomes {
        println!(
            "{{\"target\":\"{}\",\"mode\":\"{}\",\"pairs_per_sec\":{:.1},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"errors\":{},\"rss_kib\":{}}}",
            o.target,
            o.mode,
            o.pairs_per_sec(),
            o.hist.value_at_quantile(0.50),
            o.hist.value_at_quantile(0.99),
            o.hist.value_at_quantile(0.999),
            o.errors,
            o.rss_kib,
        );
    }
}

/// Runs a future on a fresh multi-thread runtime.
fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut targets: Vec<(&'static str, Running)> = Vec::new();
    if matches!(args.target, Target::Broker | Target::Both) {
        let toml = broker_config(args.tenants.max(1), args.buckets.max(1));
        targets.push(("broker", start_broker(&toml).await?));
    }
    if matches!(args.target, Target::Noop | Target::Both) {
        targets.push(("noop", start_noop().await?));
    }
    eprintln!(
        "loadgen: {} connections x {} loops, {} tenants x {} buckets, {} s warm-up + {} s per run",
        args.connections, args.concurrency, args.tenants, args.buckets, args.warmup, args.duration
    );
    let mut modes = vec![None];
    if args.rate.is_some() {
        modes.push(args.rate);
    }
    let mut outcomes = Vec::new();
    for rate in modes {
        for (name, running) in &targets {
            let outcome = drive(name, running.addr, &args, rate).await?;
            eprintln!(
                "loadgen: {name} {}: {:.0} pairs/s",
                outcome.mode,
                outcome.pairs_per_sec()
            );
            outcomes.push(outcome);
        }
    }
    for (_, running) in targets {
        let _ = running.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(3), running.task).await;
    }
    print_table(&outcomes);
    if args.json {
        println!();
        print_json(&outcomes);
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = block_on(run(args)) {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}
