//! Drives Acquire→Release pairs at a server and measures them: a plan
//! (connections × loops, tenants, closed or open loop, unary or LeaseStream)
//! in, pairs/s and a latency histogram out. Unary loops live here; the
//! pipelined LeaseStream driver is `stream.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use hdrhistogram::Histogram;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{AcquireRequest, AcquireResponse, ReleaseRequest};
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::error::Error;
use crate::stream;

/// How a pair is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Mode {
    /// Two unary RPCs per pair.
    Unary,
    /// Two messages on a LeaseStream per pair, pipelined.
    Stream,
}

/// When pairs start: back to back, or at a fixed total rate.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Schedule {
    /// Each loop starts its next pair when the last one ends (max rate).
    Closed,
    /// Pairs start at `rate` per second in total, whatever the answers do
    /// (a pair that starts late because its loop was still busy is timed
    /// from its scheduled start: coordinated omission corrected).
    Open {
        /// Pairs per second over all loops.
        rate: f64,
    },
}

/// One measured run.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// HTTP/2 connections (one LeaseStream each in stream mode).
    pub(crate) connections: usize,
    /// Pairs in flight per connection.
    pub(crate) concurrency: usize,
    /// Tenants the pairs go to, round-robin.
    pub(crate) tenants: Arc<[String]>,
    /// Not measured, before the measured window.
    pub(crate) warmup: Duration,
    /// The measured window.
    pub(crate) duration: Duration,
    /// Unary or stream.
    pub(crate) mode: Mode,
    /// Closed or open loop.
    pub(crate) schedule: Schedule,
}

impl Plan {
    /// "closed (max)" / "open 5000 /s", prefixed "stream " in stream mode.
    pub(crate) fn label(&self) -> String {
        let schedule = match self.schedule {
            Schedule::Closed => "closed (max)".to_string(),
            Schedule::Open { rate } => format!("open {rate:.0} /s"),
        };
        match self.mode {
            Mode::Unary => schedule,
            Mode::Stream => format!("stream {schedule}"),
        }
    }
}

/// The times that bound a run, shared by all its loops.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    /// When the run started.
    pub(crate) start: Instant,
    /// Pairs that start from here on are measured...
    pub(crate) measure_from: Instant,
    /// ...up to here; no pair starts after it.
    pub(crate) end: Instant,
}

/// Where one loop's pairs start: its first pair's delay after the start and,
/// in open loop, the interval between its pairs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pace {
    /// Open loop: delay of the first pair, spreading loops over one interval.
    pub(crate) phase: Duration,
    /// Open loop: time between this loop's pairs; `None` for closed loop.
    pub(crate) interval: Option<Duration>,
}

impl Pace {
    /// The pace of loop `i` of `loops` under `schedule`.
    pub(crate) fn of(schedule: Schedule, i: usize, loops: usize) -> Self {
        match schedule {
            Schedule::Closed => Pace {
                phase: Duration::ZERO,
                interval: None,
            },
            Schedule::Open { rate } => {
                let interval = Duration::from_secs_f64(loops as f64 / rate.max(f64::MIN_POSITIVE));
                Pace {
                    phase: interval.mul_f64(i as f64 / loops as f64),
                    interval: Some(interval),
                }
            }
        }
    }
}

/// What some loops measured.
#[derive(Debug)]
pub(crate) struct Tally {
    /// Pairs completed that started in the measured window.
    pub(crate) pairs: u64,
    /// Pairs that failed or were not granted, started in the window.
    pub(crate) errors: u64,
    /// Latency per completed pair, µs.
    pub(crate) hist: Histogram<u64>,
}

impl Tally {
    /// Nothing measured yet.
    pub(crate) fn new() -> Self {
        Tally {
            pairs: 0,
            errors: 0,
            hist: new_hist(),
        }
    }

    /// Counts a pair that started at `begin` and ended now, if it started
    /// inside the measured window.
    pub(crate) fn record(&mut self, window: &Window, begin: Instant, ok: bool) {
        if begin < window.measure_from {
            return;
        }
        if ok {
            self.pairs += 1;
            let us = begin.elapsed().as_micros();
            self.hist
                .saturating_record(u64::try_from(us).unwrap_or(u64::MAX).max(1));
        } else {
            self.errors += 1;
        }
    }

    /// Adds another tally into this one.
    pub(crate) fn merge(&mut self, other: &Tally) -> Result<(), Error> {
        self.pairs += other.pairs;
        self.errors += other.errors;
        self.hist.add(&other.hist)?;
        Ok(())
    }
}

/// One run's outcome.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// The plan's label.
    pub(crate) label: String,
    /// What was measured.
    pub(crate) tally: Tally,
    /// Length of the measured window, s.
    pub(crate) secs: f64,
}

impl Outcome {
    /// Pairs started in the measured window per second of it.
    pub(crate) fn pairs_per_sec(&self) -> f64 {
        self.tally.pairs as f64 / self.secs.max(f64::MIN_POSITIVE)
    }

    /// Latency at quantile `q`, µs.
    pub(crate) fn quantile_us(&self, q: f64) -> u64 {
        self.tally.hist.value_at_quantile(q)
    }
}

/// An empty histogram for 1 µs .. 60 s at 3 significant digits.
pub(crate) fn new_hist() -> Histogram<u64> {
    // The bounds are constants that satisfy new_with_bounds' rules
    // (low >= 1, high >= 2 * low, sigfig <= 5), so this cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Opens `n` separate HTTP/2 connections to `addr`.
pub(crate) async fn connect(addr: SocketAddr, n: usize) -> Result<Vec<Channel>, Error> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        // A separate Endpoint::connect is a separate HTTP/2 connection.
        channels.push(
            Endpoint::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    Ok(channels)
}

/// The Acquire of every pair: one permit, critical class, answer at once
/// or within 100 ms.
pub(crate) fn acquire_request(tenant: &str) -> AcquireRequest {
    AcquireRequest {
        tenant: tenant.to_owned(),
        client_id: "loadgen".into(),
        priority_class: "critical".into(),
        method: "GET".into(),
        path: "/api/v2/users".into(),
        oauth_client: String::new(),
        permits: 1,
        max_wait_ms: Some(100),
        idempotency_key: String::new(),
    }
}

/// One unary Acquire; Err on transport errors and on not-granted.
pub(crate) async fn acquire(
    client: &mut QuotaBrokerClient<Channel>,
    tenant: &str,
) -> Result<AcquireResponse, Status> {
    let acquired = client.acquire(acquire_request(tenant)).await?.into_inner();
    if acquired.granted {
        Ok(acquired)
    } else {
        Err(Status::resource_exhausted(acquired.reason))
    }
}

/// One unary Acquire→Release pair. Err on transport errors and on
/// not-granted.
pub(crate) async fn pair(
    client: &mut QuotaBrokerClient<Channel>,
    tenant: &str,
) -> Result<(), Status> {
    let acquired = acquire(client, tenant).await?;
    client
        .release(ReleaseRequest {
            lease_id: acquired.lease_id,
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// One unary loop: pairs one after another (closed) or on its pace (open).
async fn unary_loop(
    mut client: QuotaBrokerClient<Channel>,
    tenants: Arc<[String]>,
    first_tenant: usize,
    pace: Pace,
    window: Window,
) -> Tally {
    let mut tally = Tally::new();
    let mut next_tenant = first_tenant;
    let mut scheduled = window.start + pace.phase;
    loop {
        // When the pair counts as started: now (closed loop); in open loop
        // its scheduled send time when the loop is behind, so a slow answer
        // that delays later sends is charged to those sends too (coordinated
        // omission), and when the loop was idle waiting for that time, the
        // moment the timer woke it (tokio timers round up to the next
        // millisecond; that lateness is loadgen's, not the server's).
        let begin = match pace.interval {
            None => Instant::now(),
            Some(interval) => {
                let at = scheduled;
                scheduled += interval;
                if at > Instant::now() {
                    tokio::time::sleep_until(at.into()).await;
                    Instant::now()
                } else {
                    at
                }
            }
        };
        if begin >= window.end {
            break;
        }
        let tenant = &tenants[next_tenant];
        next_tenant = (next_tenant + 1) % tenants.len();
        let ok = pair(&mut client, tenant).await.is_ok();
        tally.record(&window, begin, ok);
    }
    tally
}

/// Runs `plan` against `addr` on `plan.connections` fresh connections.
pub(crate) async fn drive(addr: SocketAddr, plan: &Plan) -> Result<Outcome, Error> {
    let channels = connect(addr, plan.connections).await?;
    drive_on(&channels, plan).await
}

/// Runs `plan` on the connections `channels` (`plan.connections` is
/// ignored: one per channel).
pub(crate) async fn drive_on(channels: &[Channel], plan: &Plan) -> Result<Outcome, Error> {
    let per_conn = plan.concurrency.max(1);
    let loops = channels.len() * per_conn;
    let tenants = if plan.tenants.is_empty() {
        Arc::from(vec!["t0".to_string()])
    } else {
        plan.tenants.clone()
    };
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let window = Window {
        start,
        measure_from,
        end: measure_from + plan.duration,
    };
    let mut tasks = tokio::task::JoinSet::new();
    match plan.mode {
        Mode::Unary => {
            for i in 0..loops {
                let client = QuotaBrokerClient::new(channels[i % channels.len()].clone());
                let run = unary_loop(
                    client,
                    tenants.clone(),
                    i % tenants.len(),
                    Pace::of(plan.schedule, i, loops),
                    window,
                );
                tasks.spawn(async move { Ok::<_, Error>(run.await) });
            }
        }
        Mode::Stream => {
            for (c, channel) in channels.iter().enumerate() {
                let slots = (0..per_conn)
                    .map(|k| {
                        let i = c * per_conn + k;
                        (i % tenants.len(), Pace::of(plan.schedule, i, loops))
                    })
                    .collect();
                tasks.spawn(stream::run(channel.clone(), tenants.clone(), slots, window));
            }
        }
    }
    let mut tally = Tally::new();
    while let Some(joined) = tasks.join_next().await {
        tally.merge(&joined??)?;
    }
    Ok(Outcome {
        label: plan.label(),
        tally,
        secs: plan.duration.as_secs_f64(),
    })
}
