//! The ingestion of the modes that go through the broker ("broker" and
//! "broker + relay"): the real tool, `gc-ingest` (its library, in this
//! process), instead of the synthetic workers of `fleet`.
//!
//! - gc-ingest pages the same day of history in the same 1-hour blocks
//!   (query source, 100 a page) into a SQLite sink in the run's directory,
//!   every upstream call leased from the same broker as class `batch`,
//!   OAuth client `ingest` (a real token: `ingest@org-a` with gcsim's
//!   secret), broker client id `gc-ingest`.
//! - 4 workers (as the synthetic ingestion): each takes the next hour and
//!   runs gc-ingest over that one block ([`gc_ingest::run`]: claim, fetch
//!   every page, check against `totalHits`, store rows and checkpoint in
//!   one transaction). No block is started after production ends; a block
//!   that failed is run again while production lasts (as the next run of
//!   the tool would); the fleet's drain deadline aborts what is unfinished.
//! - Records: expected = gcsim's conversations of the blocks started (its
//!   control plane, `/_sim/orgs/{org}/conversations?interval=`), stored =
//!   the sink's rows among them, duplicates = rows stored more than once
//!   plus rows gcsim does not have there, unfinished = the missing ones of
//!   blocks the drain deadline cut off (their checkpoint is not done, so
//!   the next run fetches them), lost = expected − stored − unfinished.
//! - Counters: gc-ingest's upstream counts its requests, 429s and fallback
//!   leases (added to the fleet's at the end), not each call's wait; the
//!   batch wait recorded is each block's, from when a worker took it to
//!   when it was stored.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use gc_ingest::{
    blocks, parse_time, Block, BlockSize, Display, JobOptions, Plan, Sink, Source, SourceKind,
    QUERY_PATH,
};
use gc_upstream::{Credentials, Region, Upstream};
use quota_broker_client::{BrokerClient, Call};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::children::WorkDir;
use crate::confgen::{DAY, ORG};
use crate::error::Error;
use crate::measure::{Class, Records};
use crate::modes::Ctx;
use crate::relay::OAUTH_SECRET;

/// Workers, as the synthetic ingestion's.
const WORKERS: usize = 4;
/// The OAuth client (gcsim's client id is `<client>@<org>`).
const OAUTH_CLIENT: &str = "ingest";
/// The broker's client id of the process.
const CLIENT_ID: &str = "gc-ingest";
/// Failures kept as examples.
const KEPT_ERRORS: usize = 5;
/// One day, ms.
const DAY_MS: i64 = 86_400_000;

/// gc-ingest set up for one mode (shared by its workers).
pub(crate) struct GcIngest {
    sink: Sink,
    source: Source,
    /// The simulator's control plane, for the expected records.
    sim: crate::upstream::Upstream,
    /// "Now" for gc-ingest's watermark: a day after the history, so every
    /// block is final.
    now_ms: i64,
    /// std `Mutex`: held for queue bookkeeping, never across `.await`.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Blocks not taken yet (failed ones go back to the front).
    queue: VecDeque<Block>,
    /// Blocks taken at least once, in order.
    started: Vec<Block>,
    /// Rows gc-ingest reported stored.
    records: u64,
    /// Block runs that failed.
    failed: u64,
    /// A few of their errors.
    errors: Vec<String>,
}

/// What gc-ingest did in a mode.
#[derive(Debug)]
pub(crate) struct IngestFigures {
    /// Against gcsim's conversations of the blocks started.
    pub(crate) records: Records,
    /// Blocks taken at least once.
    pub(crate) blocks_started: u64,
    /// Details-query answers served (pages).
    pub(crate) pages: u64,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn ingest_error(what: &str) -> impl FnOnce(gc_ingest::IngestError) -> Error + '_ {
    move |e| Error::Ingest(format!("{what}: {e}"))
}

impl GcIngest {
    /// gc-ingest for the simulator at `sim` through the broker at `broker`,
    /// its sink `ingest-<mode>.db` in `dir`; durations scaled by `scale`
    /// like every other client's.
    pub(crate) async fn start(
        sim: SocketAddr,
        broker: &str,
        dir: &WorkDir,
        mode: &str,
        scale: f64,
    ) -> Result<Arc<GcIngest>, Error> {
        let db = dir.file(&format!("ingest-{mode}.db"));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
        let sink = Sink::open(&db.display().to_string())
            .await
            .map_err(ingest_error("open the sink"))?;
        let broker =
            BrokerClient::with_fallback(broker, None, crate::modes::fallback_settings(scale))?;
        let template = Call::new(ORG, "POST", QUERY_PATH)
            .client_id(CLIENT_ID)
            .oauth_client(OAUTH_CLIENT)
            .class(Class::Batch.as_str());
        let region = Region::new(&format!("http://{sim}"))
            .map_err(|e| Error::Ingest(format!("the simulator's address: {e}")))?;
        let upstream = Upstream::new(
            region,
            Credentials {
                client_id: format!("{OAUTH_CLIENT}@{ORG}"),
                client_secret: OAUTH_SECRET.into(),
            },
            broker.clone(),
            template.clone(),
        )
        .map_err(|e| Error::Ingest(format!("the upstream client: {e}")))?;
        let source = Source::new(
            SourceKind::Query,
            upstream,
            Some((broker, template)),
            JobOptions::default(),
        );
        let from = parse_time(DAY).map_err(ingest_error("the day of history"))?;
        Ok(Arc::new(GcIngest {
            sink,
            source,
            sim: crate::upstream::Upstream::new(sim),
            now_ms: from + 2 * DAY_MS,
            state: Mutex::new(State {
                queue: blocks(from, from + DAY_MS, BlockSize::Hour).into(),
                ..State::default()
            }),
        }))
    }

    /// Starts the workers on `tasks`; none starts a block from `stop_at` on.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        tasks: &mut JoinSet<Result<(), Error>>,
        ctx: &Arc<Ctx>,
        stop_at: Instant,
    ) {
        for w in 0..WORKERS {
            tasks.spawn(self.clone().worker(ctx.clone(), w, stop_at));
        }
    }

    /// The next block to run, if production is not over.
    fn next(&self, stop_at: Instant) -> Option<Block> {
        if Instant::now() >= stop_at {
            return None;
        }
        let mut state = lock(&self.state);
        let block = state.queue.pop_front()?;
        if !state.started.contains(&block) {
            state.started.push(block);
        }
        Some(block)
    }

    async fn worker(
        self: Arc<Self>,
        ctx: Arc<Ctx>,
        w: usize,
        stop_at: Instant,
    ) -> Result<(), Error> {
        while let Some(block) = self.next(stop_at) {
            let wanted = Instant::now();
            let mut plan = Plan::new(block.start, block.end, BlockSize::Hour);
            plan.now_ms = self.now_ms;
            plan.owner = format!("{CLIENT_ID}-w{w}");
            plan.parallel = 1;
            plan.display = Display::Quiet;
            let summary = gc_ingest::run(&plan, &self.source, &self.sink)
                .await
                .map_err(ingest_error("the run"))?;
            let stored = summary.blocks_final + summary.blocks_provisional > 0;
            if stored {
                let clock = ctx.clock;
                ctx.metrics.record_wait(
                    Class::Batch,
                    clock.sim_ms_at(wanted),
                    clock.sim_ms(wanted.elapsed()),
                );
            }
            let mut state = lock(&self.state);
            state.records += summary.records;
            if summary.blocks_failed > 0 {
                // Run it again, as the next run of the tool would.
                state.failed += summary.blocks_failed;
                for e in summary.errors {
                    if state.errors.len() < KEPT_ERRORS {
                        state.errors.push(e);
                    }
                }
                state.queue.push_front(block);
            }
        }
        Ok(())
    }

    /// What was stored against what gcsim has in the blocks started; adds
    /// gc-ingest's request counters to the fleet's. Call once the workers
    /// are done or aborted.
    pub(crate) async fn finish(&self, ctx: &Ctx) -> Result<IngestFigures, Error> {
        let stats = self.source.upstream().stats();
        let m = &ctx.metrics;
        m.analytics.sent.fetch_add(stats.calls, Ordering::Relaxed);
        m.analytics
            .refused
            .fetch_add(stats.throttled_429, Ordering::Relaxed);
        m.analytics.errors.fetch_add(
            stats.client_4xx + stats.server_5xx + stats.transport_errors,
            Ordering::Relaxed,
        );
        m.granted.fetch_add(
            stats.calls.saturating_sub(stats.fallback_leases),
            Ordering::Relaxed,
        );
        m.fallback_leases
            .fetch_add(stats.fallback_leases, Ordering::Relaxed);

        let (started, records, failed, errors) = {
            let s = lock(&self.state);
            (s.started.clone(), s.records, s.failed, s.errors.clone())
        };
        if failed > 0 {
            tracing::warn!(failed, ?errors, "gc-ingest block runs failed (run again)");
        }
        let rows = self
            .sink
            .conversation_ids()
            .await
            .map_err(ingest_error("read the sink"))?;
        // A block whose checkpoint is not done (or provisional: stored, to
        // be fetched again) was cut off by the drain deadline: its claim
        // expires and the next run fetches it, so what it misses is
        // unfinished, not lost.
        let stored_blocks: HashSet<Block> = self
            .sink
            .checkpoints()
            .await
            .map_err(ingest_error("read the checkpoints"))?
            .into_iter()
            .filter(|c| c.status == "done" || c.status == "provisional")
            .map(|c| c.block)
            .collect();
        self.sink.close().await;
        let in_sink: HashSet<&str> = rows.iter().map(String::as_str).collect();
        let mut expected = HashSet::new();
        let mut unfinished = 0u64;
        for block in &started {
            let ids = self.sim.conversation_ids(ORG, &block.interval()).await?;
            unfinished += left_for_next_run(block, &ids, &stored_blocks, &in_sink);
            expected.extend(ids);
        }
        let distinct = rows.len() as u64;
        let stored = rows.iter().filter(|id| expected.contains(*id)).count() as u64;
        let unexpected = distinct - stored;
        if unexpected > 0 {
            tracing::warn!(
                unexpected,
                "gc-ingest stored rows gcsim does not have in the blocks started"
            );
        }
        Ok(IngestFigures {
            records: Records::with_unfinished(
                expected.len() as u64,
                stored,
                records.saturating_sub(distinct) + unexpected,
                unfinished,
            ),
            blocks_started: started.len() as u64,
            pages: stats.ok_2xx,
        })
    }
}

/// Records of `block` (gcsim's `ids` of it) the sink lacks, where the
/// block's checkpoint says it was never stored: the next run fetches them.
fn left_for_next_run(
    block: &Block,
    ids: &[String],
    stored_blocks: &HashSet<Block>,
    in_sink: &HashSet<&str>,
) -> u64 {
    if stored_blocks.contains(block) {
        return 0;
    }
    ids.iter()
        .filter(|id| !in_sink.contains(id.as_str()))
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_blocks_never_stored_leave_records_for_the_next_run() {
        let done = Block { start: 0, end: 10 };
        let cut_off = Block { start: 10, end: 20 };
        let stored_blocks: HashSet<Block> = [done].into();
        let ids = |p: &str| (0..4).map(|i| format!("{p}{i}")).collect::<Vec<_>>();
        let in_sink: HashSet<&str> = ["a0", "a1", "a2"].into();
        // A stored block that lacks a record lost it: not the next run's.
        assert_eq!(
            left_for_next_run(&done, &ids("a"), &stored_blocks, &in_sink),
            0
        );
        // A block cut off before its store: all four are left.
        assert_eq!(
            left_for_next_run(&cut_off, &ids("b"), &stored_blocks, &in_sink),
            4
        );
        let records = Records::with_unfinished(8, 3, 0, 4);
        assert_eq!((records.unfinished, records.lost), (4, 1));
    }
}
