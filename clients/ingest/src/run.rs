//! One run: the range's blocks minus those the sink has as done, fetched
//! by a few workers at once. Each worker claims a block in the sink (so
//! workers in other processes skip it), fetches it, checks the records
//! against `totalHits` (a mismatch fetches the block again and is counted),
//! and stores rows and checkpoint together: final when older than the
//! watermark, provisional (fetched again next run) otherwise. A failure
//! that ends the run (the sink, or a refusal every block would meet; not
//! one about a block's records, which fails only that block) halts every
//! worker at once: the blocks being claimed or fetched are dropped, a
//! store under way runs to its end (none stored in part, each counted as
//! what it was), and the run's summary comes back with the error.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::error::IngestError;
use crate::plan::{blocks, now_ms, Block, BlockSize};
use crate::progress::{Console, Display, Progress};
use crate::sink::{Done, Sink};
use crate::source::{Fetched, Source};
use gc_upstream::UpstreamError;
use quota_broker_client::ClientError;

/// Errors kept in the summary (the rest are only counted).
const KEPT_ERRORS: usize = 10;

/// How long a halted run waits for the sink to take back the claim of a
/// block it dropped (a sink that failed may not answer at all); a claim
/// not given back expires, and this worker name takes it back at once.
const UNCLAIM_WAIT: Duration = Duration::from_secs(2);
/// How long the end of a run waits for the sink to take its worker name
/// back; one not given back goes stale after [`NAME_STALE`].
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// How often a run says it is alive, holding its worker name.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// A worker name not heard of for this long is free again (its run died
/// on another host, or without a trace).
const NAME_STALE: Duration = Duration::from_secs(60);

/// This run's id: host, process and start, so a run on the same host can
/// tell that the holder of its worker name is gone.
fn run_id() -> String {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}/{}/{}-{n}", host(), std::process::id(), now_ms())
}

/// This host, as far as process ids go: its name and its pid namespace
/// (containers sharing a host name each have their own pids).
fn host() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let pids = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    format!("{}{}", name.trim(), pids).replace('/', "_")
}

/// The runs of this process still going (their ids): a run of this process
/// not among them is over, though its process lives (its future was
/// dropped, and its claim of a name may have reached the sink after the
/// give-back did).
fn live_runs() -> std::sync::MutexGuard<'static, HashSet<String>> {
    static LIVE: std::sync::OnceLock<Mutex<HashSet<String>>> = std::sync::OnceLock::new();
    lock(LIVE.get_or_init(Mutex::default))
}

/// Whether run `id` is known to be over: its host is this one and its
/// process is gone (a run killed, its name still held), or it is a run of
/// this process no longer going.
fn run_is_over(id: &str) -> bool {
    if let Some(rest) = id.strip_prefix(&format!("{}/{}/", host(), std::process::id())) {
        return !rest.is_empty() && !live_runs().contains(id);
    }
    let mut parts = id.split('/');
    let (Some(h), Some(pid)) = (
        parts.next(),
        parts.next().and_then(|p| p.parse::<u32>().ok()),
    ) else {
        return false;
    };
    !h.is_empty()
        && h == host()
        && std::path::Path::new("/proc/self").exists()
        && !process_alive(pid)
}

/// Whether process `pid` runs: it exists and has not exited (a killed
/// process stays a zombie until reaped, which in a container whose first
/// process does not reap may be a while).
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // "pid (comm) state ...": comm may hold spaces and ')'.
            let state = stat
                .get(stat.rfind(')')? + 1..)?
                .split_whitespace()
                .next()?;
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// Takes `plan.owner` for this run, or says who holds it. The holder may
/// change between the reads (a run ending, or one of this process dropped
/// and giving the name back): a few tries.
async fn take_worker_name(plan: &Plan, sink: &Sink, run: &str) -> Result<(), IngestError> {
    let busy = |seen: Option<i64>, now: i64| {
        IngestError::WorkerBusy(format!(
            "another gc-ingest run works on this sink as worker {:?}{}: give this run another \
             --worker name to share the range with it, or let it finish",
            plan.owner.chars().take(64).collect::<String>(),
            seen.map_or(String::new(), |seen| format!(
                " (seen {} s ago)",
                (now - seen).max(0) / 1000
            ))
        ))
    };
    for _ in 0..3 {
        let now = now_ms();
        let stale = now - NAME_STALE.as_millis() as i64;
        if sink.take_worker_name(&plan.owner, run, now, stale).await? {
            return Ok(());
        }
        match sink.worker_name_holder(&plan.owner).await? {
            // Given back between the two reads.
            None => continue,
            Some((id, _)) if run_is_over(&id) => {
                if sink
                    .take_worker_name_from(&plan.owner, run, &id, now)
                    .await?
                {
                    tracing::info!(worker = %plan.owner,
                        "the run that held this worker name is gone: taking it");
                    return Ok(());
                }
            }
            Some((_, seen)) => return Err(busy(Some(seen), now)),
        }
    }
    Err(busy(None, now_ms()))
}

/// What a run covers and how.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Unix ms, included.
    pub from_ms: i64,
    /// Unix ms, excluded.
    pub to_ms: i64,
    /// Block length.
    pub block: BlockSize,
    /// Blocks ending less than this before `now_ms` are provisional.
    pub watermark: Duration,
    /// "Now" for the watermark (Unix ms).
    pub now_ms: i64,
    /// This worker's name in block claims (several workers on one range
    /// need different names; the same name takes its own claims back).
    pub owner: String,
    /// How long a claim keeps other workers off a block.
    pub claim_ttl: Duration,
    /// Blocks fetched at once by this process.
    pub parallel: usize,
    /// Fetches of a block that disagrees with its `totalHits` before the
    /// block fails.
    pub max_attempts: u32,
    /// Progress display.
    pub display: Display,
    /// Where other lines for the person watching go while the bar is
    /// shown (keep a clone to write through it).
    pub console: Console,
}

impl Plan {
    /// `[from_ms, to_ms)` in `block`s, with the defaults: a 4 h watermark
    /// from the wall clock, owner `gc-ingest`, 10 min claims, 4 blocks at
    /// once, 3 attempts, progress shown.
    pub fn new(from_ms: i64, to_ms: i64, block: BlockSize) -> Plan {
        Plan {
            from_ms,
            to_ms,
            block,
            watermark: Duration::from_secs(4 * 3600),
            now_ms: now_ms(),
            owner: "gc-ingest".into(),
            claim_ttl: Duration::from_secs(600),
            parallel: 4,
            max_attempts: 3,
            display: Display::Auto,
            console: Console::default(),
        }
    }
}

/// What a run did (the `--json` summary).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Summary {
    /// `query` or `jobs`.
    pub source: String,
    /// Blocks in the range.
    pub blocks_total: u64,
    /// Blocks already done before this run (not fetched).
    pub blocks_skipped: u64,
    /// Blocks fetched and stored as final.
    pub blocks_final: u64,
    /// Blocks fetched and stored as provisional (newer than the watermark).
    pub blocks_provisional: u64,
    /// Blocks another worker held a claim on.
    pub blocks_busy: u64,
    /// Blocks that failed (left unclaimed for the next run).
    pub blocks_failed: u64,
    /// Records stored.
    pub records: u64,
    /// Fetches thrown away because the records did not match `totalHits`.
    pub mismatches: u64,
    /// Wall time, seconds.
    pub elapsed_s: f64,
    /// Records stored per second.
    pub records_per_s: f64,
    /// Upstream requests sent.
    pub upstream_requests: u64,
    /// 429 answers among them.
    pub upstream_429: u64,
    /// Retries among them.
    pub upstream_retries: u64,
    /// Leases from the local fallback (broker unreachable).
    pub fallback_leases: u64,
    /// Records per upstream request.
    pub records_per_request: f64,
    /// The run was stopped (a signal) before its range was done.
    pub stopped: bool,
    /// Blocks in progress when it stopped (a signal, or the error that
    /// ended it), left for the next run.
    pub blocks_stopped: u64,
    /// The first few failures.
    pub errors: Vec<String>,
    /// The error that ended the run before its range was done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A run that ended on an error, with what it did before (`None`: it ended
/// before its blocks were planned).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct RunFailed {
    /// Why it ended.
    #[source]
    pub error: IngestError,
    /// Its summary, with the error in [`Summary::error`].
    pub summary: Option<Summary>,
}

/// Shared by the workers.
struct Work {
    queue: Mutex<VecDeque<Block>>,
    /// A failure every block would meet (login or lease refused): the
    /// workers stop, and the run ends with it.
    setup_failed: Mutex<Option<String>>,
    /// The first error a worker ended on (the sink): the run ends with it.
    failure: Mutex<Option<IngestError>>,
    /// Cancelled on either failure: every worker drops the block in hand.
    halt: CancellationToken,
    /// Another run took this run's worker name: take no more blocks.
    lost: Arc<std::sync::atomic::AtomicBool>,
    /// std `Mutex`: held to add one block's outcome.
    summary: Mutex<Summary>,
    progress: Progress,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters stay usable after a panic elsewhere.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `plan`: fetches every block of the range not yet done from
/// `source` into `sink`.
pub async fn run(plan: &Plan, source: &Source, sink: &Sink) -> Result<Summary, IngestError> {
    run_until(plan, source, sink, &CancellationToken::new()).await
}

/// [`run`], until `stop` is cancelled: then no block is started, the
/// blocks in progress are given up and unclaimed for the next run (their
/// jobs deleted upstream, their leases released: see [`Source::settle`]),
/// and the summary says `stopped`.
pub async fn run_until(
    plan: &Plan,
    source: &Source,
    sink: &Sink,
    stop: &CancellationToken,
) -> Result<Summary, IngestError> {
    run_reporting(plan, source, sink, stop)
        .await
        .map_err(|failed| failed.error)
}

/// [`run_until`], with the summary of a run that failed once its blocks
/// were planned (what it stored, and the error).
pub async fn run_reporting(
    plan: &Plan,
    source: &Source,
    sink: &Sink,
    stop: &CancellationToken,
) -> Result<Summary, RunFailed> {
    let failed = |error| RunFailed {
        error,
        summary: None,
    };
    if plan.from_ms >= plan.to_ms {
        return Err(failed(IngestError::Usage(
            "the range is empty: --from must be before --to".into(),
        )));
    }
    let run = run_id();
    // Before the name is taken: a run dropped while its claim is on the
    // way to the sink gives it back all the same (giving back a name this
    // run does not hold deletes nothing).
    live_runs().insert(run.clone());
    let mut name = NameHeld::new(sink, &plan.owner, &run);
    if let Err(e) = take_worker_name(plan, sink, &run).await {
        name.released = true;
        return Err(failed(e));
    }
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    name.start(&lost);
    let outcome = run_blocks(plan, source, sink, &lost, stop).await;
    name.release().await;
    let (summary, error) = match outcome {
        Ok(ran) => ran,
        Err(e) => return Err(failed(e)),
    };
    let error = error.or_else(|| {
        lost.load(std::sync::atomic::Ordering::Relaxed).then(|| {
            IngestError::WorkerBusy(
                "another run took this run's worker name (this one was not heard of for a \
                     minute); blocks stored so far are kept, the rest are that run's"
                    .into(),
            )
        })
    });
    match error {
        None => Ok(summary),
        Some(error) => Err(RunFailed {
            summary: Some(Summary {
                error: Some(error.to_string()),
                ..summary
            }),
            error,
        }),
    }
}

/// The worker name while a run holds it: a heartbeat renews it, and the
/// name is given back when the run ends, or when its future is dropped (a
/// caller's deadline or `select!`): a heartbeat outliving the run would
/// keep the name from every later run in this process.
struct NameHeld {
    heartbeat: Option<AbortOnDropHandle<()>>,
    sink: Sink,
    owner: String,
    run: String,
    released: bool,
}

impl NameHeld {
    /// The name `owner` of run `run`, before it is taken.
    fn new(sink: &Sink, owner: &str, run: &str) -> NameHeld {
        NameHeld {
            heartbeat: None,
            sink: sink.clone(),
            owner: owner.to_owned(),
            run: run.to_owned(),
            released: false,
        }
    }

    /// Starts the heartbeat once the name is taken; it sets `lost` when
    /// another run took the name.
    fn start(&mut self, lost: &Arc<std::sync::atomic::AtomicBool>) {
        let (s, o, r, lost) = (
            self.sink.clone(),
            self.owner.clone(),
            self.run.clone(),
            lost.clone(),
        );
        let heartbeat = AbortOnDropHandle::new(tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                match s.renew_worker_name(&o, &r, now_ms()).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::error!(worker = %o,
                            "another run took this run's worker name: stopping after the blocks \
                             in hand");
                        lost.store(true, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "could not renew this run's worker name"),
                }
            }
        }));
        self.heartbeat = Some(heartbeat);
    }

    /// The run is over: stop the heartbeat and give the name back (within
    /// [`RELEASE_WAIT`]: a sink that failed may not answer).
    async fn release(mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        let release = self.sink.release_worker_name(&self.owner, &self.run);
        match tokio::time::timeout(RELEASE_WAIT, release).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not give this run's worker name back"),
            Err(_) => tracing::warn!(
                "the sink did not take this run's worker name back in time: it is free again \
                 in a minute"
            ),
        }
        // Only now: dropped during the release above, `Drop` releases.
        self.released = true;
    }
}

impl Drop for NameHeld {
    fn drop(&mut self) {
        live_runs().remove(&self.run);
        if self.released {
            return;
        }
        // Dropped mid-run: the heartbeat stops with its handle; the name is
        // given back by a task of its own (without a runtime, it goes stale).
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (sink, owner, run) = (self.sink.clone(), self.owner.clone(), self.run.clone());
            rt.spawn(async move {
                if let Err(e) = sink.release_worker_name(&owner, &run).await {
                    tracing::warn!(error = %e, "could not give a cancelled run's worker name back");
                }
            });
        }
    }
}

/// The run itself, once the worker name is this run's: its summary, and
/// the error that ended it early, if one did (`Err`: no block planned).
async fn run_blocks(
    plan: &Plan,
    source: &Source,
    sink: &Sink,
    lost: &Arc<std::sync::atomic::AtomicBool>,
    stop: &CancellationToken,
) -> Result<(Summary, Option<IngestError>), IngestError> {
    let started = Instant::now();
    let before = source.upstream().stats();
    let done: HashSet<Block> = sink
        .checkpoints()
        .await?
        .into_iter()
        .filter(|c| c.status == "done")
        .map(|c| c.block)
        .collect();
    let all = blocks(plan.from_ms, plan.to_ms, plan.block);
    let todo: VecDeque<Block> = all.iter().copied().filter(|b| !done.contains(b)).collect();
    let work = Arc::new(Work {
        progress: Progress::new(todo.len() as u64, plan.display, &plan.console),
        summary: Mutex::new(Summary {
            source: source.kind().as_str().into(),
            blocks_total: all.len() as u64,
            blocks_skipped: (all.len() - todo.len()) as u64,
            ..Summary::default()
        }),
        queue: Mutex::new(todo),
        setup_failed: Mutex::new(None),
        failure: Mutex::new(None),
        halt: CancellationToken::new(),
        lost: Arc::clone(lost),
    });
    let mut workers = JoinSet::new();
    for _ in 0..plan.parallel.max(1) {
        let (work, plan, source, sink, stop) = (
            Arc::clone(&work),
            plan.clone(),
            source.clone(),
            sink.clone(),
            stop.clone(),
        );
        workers.spawn(async move { worker(&work, &plan, &source, &sink, &stop).await });
    }
    while let Some(joined) = workers.join_next().await {
        if let Err(e) = joined {
            fail(&work, worker_lost(&e));
        }
    }
    work.progress.finish();
    let failure = lock(&work.failure).take().or_else(|| {
        lock(&work.setup_failed).take().map(|e| {
            IngestError::Usage(format!(
                "{e} (every block would meet it: fix the client credentials or their \
                 permissions, the tenant or the broker token, then run again; blocks stored so \
                 far are kept)"
            ))
        })
    });
    let mut summary = lock(&work.summary).clone();
    let stats = source.upstream().stats();
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary.records_per_s = summary.records as f64 / summary.elapsed_s.max(1e-3);
    summary.upstream_requests = stats.calls - before.calls;
    summary.upstream_429 = stats.throttled_429 - before.throttled_429;
    summary.upstream_retries = stats.retries - before.retries;
    summary.fallback_leases = stats.fallback_leases - before.fallback_leases;
    summary.records_per_request = summary.records as f64 / summary.upstream_requests.max(1) as f64;
    // A signal after the last block was stored stopped nothing.
    summary.stopped = failure.is_none()
        && stop.is_cancelled()
        && (summary.blocks_stopped > 0 || !lock(&work.queue).is_empty());
    Ok((summary, failure))
}

/// Why a worker task ended without returning: it panicked (workers are
/// never aborted), a bug.
fn worker_lost(e: &tokio::task::JoinError) -> IngestError {
    IngestError::WorkerPanicked(e.to_string())
}

/// Ends the run with `e` (unless it already ends with an earlier error,
/// of which `e` is most likely an echo): every worker drops the block it
/// is claiming or fetching.
fn fail(work: &Work, e: IngestError) {
    lock(&work.failure).get_or_insert(e);
    work.halt.cancel();
}

/// Whether a worker goes on to its next block.
enum Next {
    /// The block is stored, failed or busy: the next one.
    Block,
    /// The block was given back, and the worker stops.
    Stop,
    /// The run halted while the block was claimed or fetched: the worker
    /// drops it and stops.
    Halted,
}

/// Takes blocks off the queue until it is empty or the run halts. Fetch
/// failures and records the sink refuses are counted and the block left
/// for later; any other error from the sink ends the run. A halt drops the
/// block in hand while it is claimed or fetched; a store once started runs
/// to its end, as it would without a halt, so a block is counted as what
/// the sink made of it: stored, or failed and dropped.
async fn worker(work: &Work, plan: &Plan, source: &Source, sink: &Sink, stop: &CancellationToken) {
    loop {
        if work.halt.is_cancelled()
            || work.lost.load(std::sync::atomic::Ordering::Relaxed)
            || stop.is_cancelled()
        {
            return;
        }
        let Some(block) = lock(&work.queue).pop_front() else {
            return;
        };
        match one_block(work, plan, source, sink, stop, block).await {
            Ok(Next::Block) => {}
            // The block was given back: a signal, or a refusal.
            Ok(Next::Stop) => return,
            Ok(Next::Halted) => return drop_block(work, plan, sink, block).await,
            Err(e) => {
                fail(work, e);
                return drop_block(work, plan, sink, block).await;
            }
        }
    }
}

/// `block`, in hand when the run halted, is left for the next run: its
/// claim given back if the sink still answers within [`UNCLAIM_WAIT`].
async fn drop_block(work: &Work, plan: &Plan, sink: &Sink, block: Block) {
    let unclaim = tokio::time::timeout(UNCLAIM_WAIT, sink.unclaim(block, &plan.owner)).await;
    if !matches!(unclaim, Ok(Ok(()))) {
        tracing::debug!(%block, "the claim of a dropped block is left to expire");
    }
    lock(&work.summary).blocks_stopped += 1;
}

/// Claims, fetches and stores `block`.
async fn one_block(
    work: &Work,
    plan: &Plan,
    source: &Source,
    sink: &Sink,
    stop: &CancellationToken,
    block: Block,
) -> Result<Next, IngestError> {
    let claimed = tokio::select! {
        claimed = sink.claim(block, &plan.owner, now_ms(), plan.claim_ttl) => claimed?,
        () = work.halt.cancelled() => return Ok(Next::Halted),
    };
    if !claimed {
        lock(&work.summary).blocks_busy += 1;
        return Ok(Next::Block);
    }
    let fetched = tokio::select! {
        fetched = fetch_checked(block, plan, source, &work.progress) => fetched,
        () = work.halt.cancelled() => return Ok(Next::Halted),
        () = stop.cancelled() => {
            // The fetch is dropped: its job and leases are let go of
            // in the background (`Source::settle` waits for them).
            sink.unclaim(block, &plan.owner).await?;
            lock(&work.summary).blocks_stopped += 1;
            return Ok(Next::Stop);
        }
    };
    match fetched {
        Ok((fetched, mismatches)) => {
            let complete = fetched.available_until.is_none_or(|a| a >= block.end);
            if !complete {
                tracing::info!(%block, available_until = %crate::plan::format_ms(fetched.available_until.unwrap_or_default()),
                    "the upstream's data does not reach the block's end yet: stored as provisional");
            }
            let is_final = complete && block.is_final(plan.now_ms, plan.watermark);
            let (conversations, total_hits) = (fetched.conversations, fetched.total_hits);
            let records = conversations.len() as u64;
            let done = Done {
                block,
                conversations: &conversations,
                total_hits,
                is_final,
                mismatches,
            };
            match sink.store(done, now_ms()).await {
                Ok(()) => {}
                Err(e) if e.fails_only_its_block() => {
                    block_failed(work, plan, sink, block, &e).await?;
                    return Ok(Next::Block);
                }
                Err(e) => return Err(e),
            }
            {
                let mut s = lock(&work.summary);
                s.records += records;
                s.mismatches += u64::from(mismatches);
                if is_final {
                    s.blocks_final += 1;
                } else {
                    s.blocks_provisional += 1;
                }
            }
            let throttled = source.upstream().stats().throttled_429;
            work.progress.block_done(block, records, throttled);
        }
        Err(e) if refused_for_every_block(&e) => {
            sink.unclaim(block, &plan.owner).await?;
            lock(&work.summary).blocks_stopped += 1;
            lock(&work.setup_failed).get_or_insert_with(|| e.to_string());
            work.halt.cancel();
            return Ok(Next::Stop);
        }
        Err(e) => block_failed(work, plan, sink, block, &e).await?,
    }
    Ok(Next::Block)
}

/// A refusal every block would meet: the login refused, the API refusing
/// the OAuth client (401 with a fresh token, 403: a role without the
/// analytics permission), or the broker refusing the lease for who asks
/// (unknown tenant, bad token), not a broker or network error that may
/// pass.
fn refused_for_every_block(e: &IngestError) -> bool {
    use tonic::Code;
    match e {
        IngestError::Upstream(UpstreamError::Auth { .. }) => true,
        IngestError::Status {
            status: 401 | 403, ..
        } => true,
        IngestError::Upstream(UpstreamError::Lease(ClientError::Refused(s))) => matches!(
            s.code(),
            Code::Unauthenticated
                | Code::PermissionDenied
                | Code::NotFound
                | Code::InvalidArgument
                | Code::FailedPrecondition
        ),
        IngestError::Upstream(UpstreamError::Lease(ClientError::Token)) => true,
        _ => false,
    }
}

/// Gives `block` back (for the next run) and counts why it failed.
async fn block_failed(
    work: &Work,
    plan: &Plan,
    sink: &Sink,
    block: Block,
    e: &IngestError,
) -> Result<(), IngestError> {
    tracing::warn!(%block, error = %e, "block failed; left for the next run");
    sink.unclaim(block, &plan.owner).await?;
    let mut s = lock(&work.summary);
    s.blocks_failed += 1;
    // Every fetch of a block that never agreed with its totalHits was
    // thrown away, as those of a block stored after a refetch are.
    if let IngestError::Mismatch { attempts, .. } = e {
        s.mismatches += u64::from(*attempts);
    }
    if s.errors.len() < KEPT_ERRORS {
        s.errors.push(format!("{block}: {e}"));
    }
    Ok(())
}

/// `block`'s conversations once they agree with its `totalHits` (fetched
/// again while they do not), with the number of fetches thrown away.
async fn fetch_checked(
    block: Block,
    plan: &Plan,
    source: &Source,
    progress: &Progress,
) -> Result<(Fetched, u32), IngestError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let fetched = source
            .fetch_noting(block, &|step| progress.step(block, step))
            .await?;
        let distinct: HashSet<&str> = fetched
            .conversations
            .iter()
            .filter_map(|c| c.get("conversationId")?.as_str())
            .collect();
        let received = fetched.conversations.len() as u64;
        // Without a totalHits, all that can be checked is no duplicates.
        let expected = fetched.total_hits.unwrap_or(received);
        if received == expected && distinct.len() as u64 == expected {
            return Ok((fetched, attempt - 1));
        }
        tracing::warn!(%block, received, distinct = distinct.len(), total_hits = expected, attempt,
            "records do not match totalHits; fetching the block again");
        if attempt >= plan.max_attempts.max(1) {
            return Err(IngestError::Mismatch {
                interval: block.interval(),
                received: distinct.len() as u64,
                total_hits: expected,
                attempts: attempt,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{process_alive, refused_for_every_block, worker_lost};
    use crate::IngestError;

    /// A worker's panic ends the run as a bug to report, not as a usage
    /// error (exit 2, which orchestrators do not retry).
    #[tokio::test]
    async fn a_worker_panic_is_a_bug_to_report() {
        let joined = tokio::spawn(async { panic!("boom") }).await;
        let e = worker_lost(&joined.unwrap_err());
        assert!(matches!(e, IngestError::WorkerPanicked(_)), "{e:?}");
        let said = e.to_string();
        assert!(said.contains("boom") && said.contains("bug"), "{said}");
    }

    /// An OAuth client the API refuses (no analytics permission) would be
    /// refused for every block: the run stops at the first, it does not
    /// spend a leased request on each of thousands.
    #[test]
    fn the_api_refusing_the_client_stops_the_run() {
        for status in [401, 403] {
            let e = IngestError::status("details query", status, "missing permission");
            assert!(refused_for_every_block(&e), "{status}");
        }
        for status in [400, 404, 500, 503] {
            let e = IngestError::status("details query", status, "");
            assert!(!refused_for_every_block(&e), "{status}");
        }
    }

    #[test]
    fn a_killed_process_not_yet_reaped_is_not_a_live_run() {
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        // It exits at once and stays a zombie until waited for: waitid with
        // WNOWAIT returns once it has exited and leaves it unreaped.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid siginfo_t for waitid to fill.
        let waited = unsafe {
            libc::waitid(
                libc::P_PID,
                child.id(),
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        assert_eq!(waited, 0, "waitid: {}", std::io::Error::last_os_error());
        assert!(!process_alive(child.id()), "an exited, unreaped child");
        assert!(std::path::Path::new(&format!("/proc/{}", child.id())).exists());
        child.wait().unwrap();
        assert!(!process_alive(u32::MAX));
    }
}
