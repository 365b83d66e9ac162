//! Where a block's conversations come from: the synchronous details query
//! (paged by number, `totalHits` on every page) or the asynchronous details
//! jobs (submit, poll until fulfilled, page the results by cursor). Every
//! request goes through [`Upstream`], so it is leased from the broker and
//! reported back; a job also holds a broker lease on the pseudo-route
//! `JOB /api/v2/analytics/conversations/details/jobs` from submission to
//! its last page, which a bucket with `max_in_flight` turns into the org's
//! running-jobs limit. A job fails its block when it is not fulfilled
//! within its wait ([`JobOptions::max_wait`]) or when its results give a
//! cursor a second time or go on past the pages its count of records
//! fills (they would page forever).

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gc_upstream::{Request, Response, RetryPolicy, Upstream, UpstreamError};
use quota_broker_client::{BrokerClient, Call, Lease};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::error::IngestError;
use crate::plan::Block;

/// The details query.
pub const QUERY_PATH: &str = "/api/v2/analytics/conversations/details/query";
/// The details jobs.
pub const JOBS_PATH: &str = "/api/v2/analytics/conversations/details/jobs";
/// The method of the lease a job holds while it runs (no upstream call is
/// made with it; a broker bucket routed on it counts running jobs).
pub const JOB_SLOT_METHOD: &str = "JOB";
/// How often a details query in progress says it still runs (a poll of a
/// job comes at most this far apart, and says so too).
pub(crate) const STILL_RUNNING: Duration = Duration::from_secs(30);
/// Largest details-query page.
const QUERY_PAGE: usize = 100;
/// Results page asked of a job first.
const JOB_PAGE: usize = 10_000;
/// Smallest results page: pages over the upstream client's body limit are
/// asked again at half the size, down to this.
const MIN_JOB_PAGE: usize = 100;
/// Longest pause between two polls of a job.
const MAX_POLL: Duration = Duration::from_secs(30);
/// A job slot not granted within this is reported as waited for.
const SAY_WAITING_AFTER: Duration = Duration::from_secs(5);
/// Results pages beyond those a job's count of records fills (pages may
/// come short) before its results are taken to page without end.
const EXTRA_PAGES: u64 = 2;
/// Results pages of a job that did not say how many records it holds (as
/// the real API does not) before they are taken to page without end: a
/// million records at the smallest page, far more than any block holds.
const MAX_PAGES_UNCOUNTED: u64 = 10_000;
/// Submissions of one block's job before giving up (a job that vanished,
/// 404, is submitted again).
const MAX_SUBMITS: u32 = 3;

/// Which API a run reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// `POST …/details/query`, interval + paging.
    Query,
    /// `POST …/details/jobs`, poll, `GET …/results?cursor=`.
    Jobs,
}

impl SourceKind {
    /// Its name on the command line and in summaries.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Query => "query",
            SourceKind::Jobs => "jobs",
        }
    }
}

impl std::str::FromStr for SourceKind {
    type Err = String;

    fn from_str(s: &str) -> Result<SourceKind, String> {
        match s {
            "query" => Ok(SourceKind::Query),
            "jobs" => Ok(SourceKind::Jobs),
            _ => Err("a source is \"query\" or \"jobs\"".into()),
        }
    }
}

/// One block as fetched.
#[derive(Debug)]
pub struct Fetched {
    /// The conversations, as the API returned them.
    pub conversations: Vec<Value>,
    /// How many the upstream says the block holds (`None`: it did not say,
    /// as the real jobs API does not).
    pub total_hits: Option<u64>,
    /// How far the upstream's data reached when it answered (Unix ms; the
    /// jobs API's `dataAvailabilityDate`; `None`: it did not say). A block
    /// ending after it is not complete yet.
    pub available_until: Option<i64>,
}

/// A source of blocks: the upstream, and what the jobs need.
#[derive(Clone)]
pub struct Source {
    kind: SourceKind,
    upstream: Upstream,
    retry: RetryPolicy,
    jobs: Arc<JobSettings>,
    /// Jobs of fetches given up (a run stopped) being deleted upstream,
    /// their slots released after.
    cleanup: TaskTracker,
}

/// What only the jobs source uses.
struct JobSettings {
    /// Its slot leases (`None`: no broker lease beyond each request's).
    broker: Option<(BrokerClient, Call)>,
    /// Local cap on jobs running at once (the broker's bucket may be lower).
    running: Semaphore,
    first_poll: Duration,
    max_wait: Duration,
}

/// How a [`Source`] of jobs behaves.
#[derive(Clone, Debug)]
pub struct JobOptions {
    /// Jobs this process runs at once.
    pub max_running: usize,
    /// First pause before polling a job; doubled each poll up to 30 s.
    pub first_poll: Duration,
    /// Longest a job may take from submission to fulfilment: past it the
    /// job is deleted upstream and its block fails.
    pub max_wait: Duration,
}

impl Default for JobOptions {
    fn default() -> JobOptions {
        JobOptions {
            max_running: 2,
            first_poll: Duration::from_secs(1),
            max_wait: DEFAULT_JOB_WAIT,
        }
    }
}

/// [`JobOptions::max_wait`] unless set: a day's job takes minutes; two
/// hours leave room for an upstream that is slow.
pub const DEFAULT_JOB_WAIT: Duration = Duration::from_secs(2 * 3600);

/// How a block's fetch goes, for a person watching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Its job was submitted.
    Submitted,
    /// Its job is not fulfilled yet, this long after submission.
    Pending {
        /// Seconds since submission.
        for_s: u64,
    },
    /// Its job is fulfilled with this many records (if said).
    Fulfilled {
        /// Records the job holds.
        records: Option<u64>,
    },
    /// Its details query still runs, this long after it started, with
    /// this many records read so far (of how many, once a page said).
    Querying {
        /// Seconds since the block's first page was asked for.
        for_s: u64,
        /// Records read so far.
        records: u64,
        /// Records in all, if a page said.
        of: Option<u64>,
    },
    /// This many records read so far, of how many if known.
    Paged {
        /// Records read so far.
        records: u64,
        /// Records in all, if known.
        of: Option<u64>,
    },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Submitted => write!(f, "job submitted"),
            Step::Pending { for_s } => write!(f, "job running for {for_s}s"),
            Step::Fulfilled { records: Some(n) } => write!(f, "job done, {n} records to read"),
            Step::Fulfilled { records: None } => write!(f, "job done, reading its records"),
            Step::Querying {
                for_s,
                records,
                of: Some(of),
            } => write!(
                f,
                "query running for {for_s}s, {records} of {of} records read"
            ),
            Step::Querying {
                for_s, of: None, ..
            } => write!(f, "query running for {for_s}s, no page answered yet"),
            Step::Paged {
                records,
                of: Some(of),
            } => write!(f, "{records} of {of} records read"),
            Step::Paged { records, of: None } => write!(f, "{records} records read"),
        }
    }
}

/// A job slot held, and the job submitted under it while it is not
/// done. A fetch given up mid-job (its future dropped) deletes the job
/// upstream, then gives the slot back, in a task the source waits for in
/// [`Source::settle`].
struct RunningJob {
    source: Source,
    /// The job submitted and not yet read to its end.
    id: Option<String>,
    slot: Option<Lease>,
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else {
            return;
        };
        let (source, slot) = (self.source.clone(), self.slot.take());
        // Without a runtime the job runs on upstream and the slot comes
        // back at its expiry.
        if tokio::runtime::Handle::try_current().is_ok() {
            self.source.cleanup.spawn(async move {
                source.delete_job(&id).await;
                drop(slot);
            });
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueryPage {
    #[serde(default)]
    conversations: Vec<Value>,
    #[serde(default)]
    total_hits: u64,
}

/// A submitted job's id goes into the paths of the status, results and
/// DELETE calls: a `/`, `?` or `..` in it would change what they reach.
fn check_job_id(id: &str) -> Result<(), IngestError> {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    if id.is_empty() || id.len() > 128 || !id.bytes().all(plain) {
        return Err(IngestError::answer(
            "job submission",
            "the jobId is not an id (letters, digits, '-' or '_', at most 128)",
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Submitted {
    job_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobStatus {
    state: String,
    total_hits: Option<u64>,
}

#[derive(Deserialize)]
struct ResultsPage {
    #[serde(default)]
    conversations: Vec<Value>,
    cursor: Option<String>,
    #[serde(default, rename = "dataAvailabilityDate")]
    data_availability_date: Option<String>,
}

impl Source {
    /// A `kind` source over `upstream`; jobs hold slot leases from `broker`
    /// with `template` (its tenant, client id and class) when given.
    pub fn new(
        kind: SourceKind,
        upstream: Upstream,
        broker: Option<(BrokerClient, Call)>,
        jobs: JobOptions,
    ) -> Source {
        Source {
            kind,
            upstream,
            retry: RetryPolicy::default(),
            jobs: Arc::new(JobSettings {
                broker,
                running: Semaphore::new(jobs.max_running.max(1)),
                first_poll: jobs.first_poll,
                max_wait: jobs.max_wait,
            }),
            cleanup: TaskTracker::new(),
        }
    }

    /// Once fetches were given up (their futures dropped: a run stopped),
    /// waits at most `within` for what they leave to end: the jobs they
    /// submitted deleted upstream, the slots their leases held released
    /// at the broker. Returns what is still on its way.
    pub async fn settle(&self, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        self.cleanup.close();
        let _ = tokio::time::timeout_at(deadline, self.cleanup.wait()).await;
        let left = self.cleanup.len();
        let within = || deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut releasing = self.upstream.broker().settle(within()).await;
        if let Some((broker, _)) = &self.jobs.broker {
            // Usually the same client as the upstream's: not counted twice.
            releasing = releasing.max(broker.settle(within()).await);
        }
        left + releasing
    }

    /// Which API it reads.
    pub fn kind(&self) -> SourceKind {
        self.kind
    }

    /// The upstream (for its counters).
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Every conversation of `block`.
    pub async fn fetch(&self, block: Block) -> Result<Fetched, IngestError> {
        self.fetch_noting(block, &|_| {}).await
    }

    /// [`Source::fetch`], telling `note` how the block goes (a day's job
    /// can take minutes before its first record).
    pub async fn fetch_noting(
        &self,
        block: Block,
        note: &(dyn Fn(Step) + Send + Sync),
    ) -> Result<Fetched, IngestError> {
        match self.kind {
            SourceKind::Query => self.fetch_query(block, note).await,
            SourceKind::Jobs => self.fetch_job(block, note).await,
        }
    }

    /// `req` with retries; a non-2xx last answer is an error.
    async fn call(&self, what: &'static str, req: Request) -> Result<Response, IngestError> {
        let answer = self.upstream.send_retrying(&req, &self.retry).await?;
        if (200..300).contains(&answer.status) {
            Ok(answer)
        } else {
            Err(IngestError::status(what, answer.status, &answer.text()))
        }
    }

    /// [`Source::fetch_query_pages`], saying every [`STILL_RUNNING`] that
    /// it still runs and how far it got ([`Step::Querying`]): an hour's
    /// block can take minutes (many pages, leases waited for), in which
    /// a log without a terminal would otherwise say nothing.
    async fn fetch_query(
        &self,
        block: Block,
        note: &(dyn Fn(Step) + Send + Sync),
    ) -> Result<Fetched, IngestError> {
        // Of: `u64::MAX` until a page says.
        let (read, of) = (AtomicU64::new(0), AtomicU64::new(u64::MAX));
        let paged = |step: Step| {
            if let Step::Paged { records, of: total } = step {
                read.store(records, Ordering::Relaxed);
                of.store(total.unwrap_or(u64::MAX), Ordering::Relaxed);
            }
            note(step);
        };
        let pages = self.fetch_query_pages(block, &paged);
        ticking(pages, STILL_RUNNING, |elapsed| {
            let total = of.load(Ordering::Relaxed);
            note(Step::Querying {
                for_s: elapsed.as_secs(),
                records: read.load(Ordering::Relaxed),
                of: (total != u64::MAX).then_some(total),
            });
        })
        .await
    }

    async fn fetch_query_pages(
        &self,
        block: Block,
        note: &(dyn Fn(Step) + Send + Sync),
    ) -> Result<Fetched, IngestError> {
        let mut conversations = Vec::new();
        // The first page's count is what the block is checked against: a
        // conversation removed between two pages shifts the rows after it
        // one place back, so the row at the page boundary is never read,
        // and the later pages' count (one fewer) would match what was.
        let mut first_total = None;
        let mut total = 0;
        for page_number in 1.. {
            let body = json!({
                "interval": block.interval(),
                "order": "asc",
                "orderBy": "conversationStart",
                "paging": { "pageSize": QUERY_PAGE, "pageNumber": page_number },
            });
            let answer = self
                .call("details query", Request::post(QUERY_PATH, body))
                .await?;
            let page: QueryPage = answer
                .json()
                .map_err(|e| IngestError::answer("details query", e))?;
            total = page.total_hits;
            let expected = *first_total.get_or_insert(total);
            if expected != total {
                tracing::warn!(%block, was = expected, now = total, page = page_number,
                    "totalHits changed between pages; the block will be fetched again");
            }
            let rows = page.conversations.len();
            conversations.extend(page.conversations);
            note(Step::Paged {
                records: conversations.len() as u64,
                of: Some(expected),
            });
            if rows < QUERY_PAGE || conversations.len() as u64 >= total {
                break;
            }
        }
        Ok(Fetched {
            conversations,
            total_hits: Some(first_total.unwrap_or(total)),
            available_until: None,
        })
    }

    async fn fetch_job(
        &self,
        block: Block,
        note: &(dyn Fn(Step) + Send + Sync),
    ) -> Result<Fetched, IngestError> {
        // Closed never: the semaphore lives as long as the source.
        let _running = self
            .jobs
            .running
            .acquire()
            .await
            .map_err(|_| IngestError::Usage("the job limiter was closed".into()))?;
        // Held until the last results page: one running job.
        let _slot = match &self.jobs.broker {
            // A job slot busy (another process's job) is waited for, as
            // every other lease is, not a failed block.
            Some((broker, template)) => {
                let call = template.to(JOB_SLOT_METHOD, JOBS_PATH);
                let waiting = gc_upstream::lease_waiting(broker, &call);
                tokio::pin!(waiting);
                let lease = match tokio::time::timeout(SAY_WAITING_AFTER, &mut waiting).await {
                    Ok(lease) => lease?,
                    Err(_) => {
                        // A long silent wait reads as a hang: say what for.
                        tracing::warn!(%block,
                            "waiting for a job slot: the broker's running-jobs bucket is full \
                             (this run's own jobs if --max-jobs is above its max_in_flight, other \
                             runs' jobs, or a killed run's until their lease TTL)");
                        waiting.await?
                    }
                };
                Some(lease)
            }
            None => None,
        };
        let mut running = RunningJob {
            source: self.clone(),
            id: None,
            slot: _slot,
        };
        let mut submits = 0;
        loop {
            submits += 1;
            let (submitted, slot) = self.submit_job(block, running.slot.take()).await;
            running.slot = slot;
            let job = submitted?;
            check_job_id(&job.job_id)?;
            running.id = Some(job.job_id.clone());
            note(Step::Submitted);
            let fulfilled = self.await_job(block, &job.job_id, note).await;
            if matches!(fulfilled, Ok(None) | Err(IngestError::JobFailed { .. })) {
                // Vanished or failed: nothing left running upstream.
                running.id = None;
            }
            match fulfilled? {
                Some(total_hits) => {
                    note(Step::Fulfilled {
                        records: total_hits,
                    });
                    let (conversations, available_until) = self
                        .job_results(block, &job.job_id, total_hits, note)
                        .await?;
                    running.id = None;
                    return Ok(Fetched {
                        conversations,
                        total_hits,
                        available_until,
                    });
                }
                None if submits < MAX_SUBMITS => {
                    tracing::warn!(%block, "job vanished before it was fulfilled; submitting again");
                }
                None => {
                    return Err(IngestError::JobFailed {
                        interval: block.interval(),
                        state: "EXPIRED".into(),
                    })
                }
            }
        }
    }

    /// Submits the job of `block`, holding `slot`: the job's id, and the
    /// slot back. The submission runs in a task of its own: a fetch given
    /// up while it is on its way would not learn the id of a job the
    /// upstream then runs; the task deletes that job and lets the slot go.
    async fn submit_job(
        &self,
        block: Block,
        slot: Option<Lease>,
    ) -> (Result<Submitted, IngestError>, Option<Lease>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let source = self.clone();
        self.cleanup.spawn(async move {
            let submitted = source
                .call(
                    "job submission",
                    Request::post(JOBS_PATH, json!({ "interval": block.interval() })),
                )
                .await
                .and_then(|answer| {
                    answer
                        .json::<Submitted>()
                        .map_err(|e| IngestError::answer("job submission", e))
                });
            if let Err((Ok(job), slot)) = tx.send((submitted, slot)) {
                source.delete_job(&job.job_id).await;
                drop(slot);
            }
        });
        match rx.await {
            Ok(answer) => answer,
            // Only if the task was cancelled (the runtime ending): the
            // slot went with it, to come back at its expiry.
            Err(_) => (
                Err(IngestError::Usage(
                    "the job submission was cancelled".into(),
                )),
                None,
            ),
        }
    }

    /// Deletes job `id` upstream (a fetch given up: the job would count as
    /// running against the org until it ends or expires).
    async fn delete_job(&self, id: &str) {
        let req = Request::delete(format!("{JOBS_PATH}/{id}"));
        match self.upstream.send_retrying(&req, &self.retry).await {
            Ok(answer) if (200..300).contains(&answer.status) || answer.status == 404 => {}
            Ok(answer) => tracing::warn!(
                status = answer.status,
                "an abandoned job could not be deleted; it runs on upstream until it ends"
            ),
            Err(e) => tracing::warn!(error = %e,
                "an abandoned job could not be deleted; it runs on upstream until it ends"),
        }
    }

    /// Polls job `id` until it is fulfilled: `Some(its totalHits, if
    /// said)`, or `None` if the upstream no longer knows it (404); an
    /// error once it was submitted [`JobOptions::max_wait`] ago.
    async fn await_job(
        &self,
        block: Block,
        id: &str,
        note: &(dyn Fn(Step) + Send + Sync),
    ) -> Result<Option<Option<u64>>, IngestError> {
        let mut pause = self.jobs.first_poll;
        let submitted = tokio::time::Instant::now();
        loop {
            note(Step::Pending {
                for_s: submitted.elapsed().as_secs(),
            });
            let left = self.jobs.max_wait.saturating_sub(submitted.elapsed());
            if left.is_zero() {
                return Err(IngestError::JobTimedOut {
                    job: id.to_owned(),
                    interval: block.interval(),
                    waited_s: self.jobs.max_wait.as_secs(),
                });
            }
            // The last poll comes at the limit, not a whole pause past it.
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(MAX_POLL);
            let req = Request::get(format!("{JOBS_PATH}/{id}"));
            let answer = self.upstream.send_retrying(&req, &self.retry).await?;
            match answer.status {
                404 => return Ok(None),
                200..=299 => {}
                status => return Err(IngestError::status("job status", status, &answer.text())),
            }
            let status: JobStatus = answer
                .json()
                .map_err(|e| IngestError::answer("job status", e))?;
            match status.state.as_str() {
                "FULFILLED" => return Ok(Some(status.total_hits)),
                "QUEUED" | "PENDING" | "RUNNING" => {}
                other => {
                    return Err(IngestError::JobFailed {
                        interval: block.interval(),
                        state: other.chars().take(20).collect(),
                    })
                }
            }
        }
    }

    /// Every results page of fulfilled job `id` of `block`, and the
    /// earliest `dataAvailabilityDate` they gave; an error if a page gives
    /// a cursor an earlier one gave, or if there are more pages than its
    /// count of records, `of`, fills ([`max_pages`]).
    async fn job_results(
        &self,
        block: Block,
        id: &str,
        of: Option<u64>,
        note: &(dyn Fn(Step) + Send + Sync),
    ) -> Result<(Vec<Value>, Option<i64>), IngestError> {
        let mut conversations = Vec::new();
        let mut available_until: Option<i64> = None;
        let mut cursor: Option<String> = None;
        let mut seen = HashSet::new();
        let mut page_size = JOB_PAGE;
        let mut pages: u64 = 0;
        loop {
            let allowed = max_pages(of, page_size);
            if pages >= allowed {
                return Err(IngestError::TooManyPages {
                    job: id.to_owned(),
                    interval: block.interval(),
                    pages: allowed,
                    why: match of {
                        Some(n) => format!(
                            "more than its {n} records fill at {page_size} a page, and \
                             {EXTRA_PAGES} to spare"
                        ),
                        None => "more than any block holds (the job did not say how many \
                                 records it has)"
                            .into(),
                    },
                });
            }
            let mut path = format!("{JOBS_PATH}/{id}/results?pageSize={page_size}");
            if let Some(c) = &cursor {
                path.push_str("&cursor=");
                path.push_str(&encode_query(c));
            }
            let answer = match self.call("job results", Request::get(path)).await {
                // Records larger than planned for: the same page, smaller.
                Err(IngestError::Upstream(UpstreamError::BodyTooLarge(max)))
                    if page_size > MIN_JOB_PAGE =>
                {
                    page_size = (page_size / 2).max(MIN_JOB_PAGE);
                    tracing::info!(job = %id, page_size, max_body = max,
                        "a results page was over the body limit; asking for smaller ones");
                    continue;
                }
                answer => answer?,
            };
            let page: ResultsPage = answer
                .json()
                .map_err(|e| IngestError::answer("job results", e))?;
            pages += 1;
            conversations.extend(page.conversations);
            note(Step::Paged {
                records: conversations.len() as u64,
                of,
            });
            if let Some(date) = &page.data_availability_date {
                let at = crate::plan::parse_time(date).map_err(|_| {
                    IngestError::answer("job results", "dataAvailabilityDate is not a time")
                })?;
                available_until = Some(available_until.map_or(at, |a: i64| a.min(at)));
            }
            match page.cursor {
                Some(c) if !c.is_empty() => {
                    if !seen.insert(c.clone()) {
                        return Err(IngestError::CursorRepeated {
                            job: id.to_owned(),
                            interval: block.interval(),
                            page: seen.len() as u64 + 1,
                        });
                    }
                    cursor = Some(c);
                }
                _ => return Ok((conversations, available_until)),
            }
        }
    }
}

/// The most results pages a job holding `of` records can take at
/// `page_size` a page (the smallest asked for so far: pages read at a
/// larger size only used fewer), with [`EXTRA_PAGES`] to spare.
fn max_pages(of: Option<u64>, page_size: usize) -> u64 {
    match of {
        Some(n) => n.div_ceil(page_size.max(1) as u64) + EXTRA_PAGES,
        None => MAX_PAGES_UNCOUNTED,
    }
}

/// `s` percent-encoded for a query string (cursors are opaque).
fn encode_query(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, CURSOR).to_string()
}

/// Everything but RFC 3986's unreserved characters.
const CURSOR: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `work`'s output, `tick` told the time since it started every `every`
/// while it runs (not once it is done).
async fn ticking<T>(work: impl Future<Output = T>, every: Duration, tick: impl Fn(Duration)) -> T {
    let started = tokio::time::Instant::now();
    let mut ticks = tokio::time::interval_at(started + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            biased;
            out = &mut work => return out,
            _ = ticks.tick() => tick(started.elapsed()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block's query that runs 95 s says so at 30, 60 and 90 s, and no
    /// more once it is done (tokio's clock paused: no time passes).
    #[tokio::test(start_paused = true)]
    async fn a_long_query_says_every_half_minute_that_it_still_runs() {
        let said = std::sync::Mutex::new(Vec::new());
        let out = ticking(
            async {
                tokio::time::sleep(Duration::from_secs(95)).await;
                7
            },
            STILL_RUNNING,
            |elapsed| said.lock().unwrap().push(elapsed.as_secs()),
        )
        .await;
        assert_eq!(out, 7);
        assert_eq!(*said.lock().unwrap(), [30, 60, 90]);
        // Done before the first half minute: nothing said.
        let quick = ticking(async { 1 }, STILL_RUNNING, |_| panic!("a tick")).await;
        assert_eq!(quick, 1);
    }

    #[test]
    fn a_query_step_says_how_far_it_got() {
        let step = Step::Querying {
            for_s: 30,
            records: 200,
            of: Some(1000),
        };
        assert_eq!(
            step.to_string(),
            "query running for 30s, 200 of 1000 records read"
        );
        let step = Step::Querying {
            for_s: 60,
            records: 0,
            of: None,
        };
        assert_eq!(
            step.to_string(),
            "query running for 60s, no page answered yet"
        );
    }

    #[test]
    fn a_job_id_that_would_change_a_request_path_is_refused() {
        assert!(check_job_id("0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b").is_ok());
        for bad in ["", "../../users", "a/b", "a?b=1", "a%2Fb", &"x".repeat(129)] {
            assert!(check_job_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_jobs_results_may_take_the_pages_its_records_fill_and_two_more() {
        assert_eq!(max_pages(Some(0), JOB_PAGE), 2);
        assert_eq!(max_pages(Some(8_000), JOB_PAGE), 3);
        assert_eq!(max_pages(Some(20_000), JOB_PAGE), 4);
        assert_eq!(max_pages(Some(10_001), MIN_JOB_PAGE), 103);
        assert_eq!(max_pages(None, MIN_JOB_PAGE), MAX_PAGES_UNCOUNTED);
    }

    #[test]
    fn cursors_are_encoded_for_the_query_string() {
        assert_eq!(encode_query("a.b-1_~"), "a.b-1_~");
        assert_eq!(encode_query("x/y+z="), "x%2Fy%2Bz%3D");
    }
}
