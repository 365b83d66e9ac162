//! The asynchronous analytics details jobs of one org: submit a job for an
//! interval, poll its state until it is fulfilled (after a latency that
//! grows with its rows), then page its results by cursor. Its own limits,
//! as Genesys has them: jobs running at once and submissions per window
//! (a refused submission is a 429 with `Retry-After`, decided and counted
//! with the org's other limits). Plain Rust with simulated time passed in;
//! the routes live in `server`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::data::{format_ms, ConversationJson, History};
use crate::org::Refusal;

/// Results page size when the caller gives none.
const DEFAULT_RESULTS_PAGE: usize = 1_000;
/// Largest results page.
const MAX_RESULTS_PAGE: usize = 10_000;
/// Retry-After of a refusal for too many running jobs, simulated ms.
const RUNNING_RETRY_MS: f64 = 1_000.0;

/// The jobs API's limits and timing (simulated ms), per org.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Jobs queued or running at once; one more submission is a 429.
    pub max_running: u64,
    /// Submissions per window; one more is a 429 until the window ends.
    pub submits_per_window: u64,
    /// The submission window.
    pub submit_window_ms: u64,
    /// Time from submission to fulfilment: this fixed part…
    pub fulfil_base_ms: u64,
    /// …plus this much per 1,000 rows of the job.
    pub fulfil_per_1000_rows_ms: u64,
    /// How long a job and its results stay after submission (then 404).
    pub expiry_ms: u64,
}

impl Default for JobsConfig {
    fn default() -> JobsConfig {
        JobsConfig {
            max_running: 2,
            submits_per_window: 10,
            submit_window_ms: 60_000,
            fulfil_base_ms: 5_000,
            fulfil_per_1000_rows_ms: 1_000,
            expiry_ms: 86_400_000,
        }
    }
}

impl JobsConfig {
    /// What is wrong with it, if anything.
    pub(crate) fn problem(&self) -> Option<&'static str> {
        if self.max_running == 0 || self.submits_per_window == 0 || self.submit_window_ms == 0 {
            Some("jobs: max_running, submits_per_window and submit_window_ms must be > 0")
        } else if self.expiry_ms == 0 {
            Some("jobs: expiry_ms must be > 0: a job would expire as it is submitted")
        } else {
            None
        }
    }
}

/// One submitted job.
#[derive(Debug)]
struct Job {
    from: i64,
    to: i64,
    submitted_ms: f64,
    fulfilled_ms: f64,
    rows: u64,
}

/// An org's jobs and the state of their limits.
#[derive(Debug)]
pub(crate) struct Jobs {
    config: JobsConfig,
    jobs: HashMap<String, Job>,
    /// (window index, submissions admitted in it).
    window: (u64, u64),
    /// Unix ms up to which jobs see data (a fault the control plane sets:
    /// the upstream's data lags; `None`: all of it).
    available_until: Option<i64>,
}

/// The job status answer.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct JobStatus {
    state: &'static str,
    submission_date: String,
    expiration_date: String,
    /// gcsim's addition, once fulfilled: the rows of the job (the real
    /// API does not say; a client may check its count against it).
    #[serde(skip_serializing_if = "Option::is_none")]
    total_hits: Option<u64>,
}

/// A results page.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ResultsPage {
    conversations: Vec<ConversationJson>,
    /// Absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<String>,
    data_availability_date: String,
}

impl ResultsPage {
    /// Rows on the page.
    pub(crate) fn rows(&self) -> usize {
        self.conversations.len()
    }

    /// Whether a page comes after it.
    pub(crate) fn has_next(&self) -> bool {
        self.cursor.is_some()
    }

    /// Hands out `cursor` for the next page (a fault: the caller's own).
    pub(crate) fn set_cursor(&mut self, cursor: String) {
        self.cursor = Some(cursor);
    }
}

/// Why a status or results request has no answer.
#[derive(Debug, PartialEq)]
pub(crate) enum JobError {
    /// No such job (never submitted, or expired).
    NotFound,
    /// Results asked for before the job is fulfilled.
    NotFulfilled,
    /// A cursor this job never handed out, or a bad page size.
    BadRequest(String),
}

impl Jobs {
    pub(crate) fn new(config: JobsConfig) -> Jobs {
        Jobs {
            config,
            jobs: HashMap::new(),
            window: (0, 0),
            available_until: None,
        }
    }

    /// Jobs submitted from now on see only conversations starting before
    /// `until` (Unix ms), and say so in `dataAvailabilityDate`; `None`:
    /// all data again.
    pub(crate) fn set_available_until(&mut self, until: Option<i64>) {
        self.available_until = until;
    }

    /// Jobs not yet fulfilled at `now`.
    fn running(&self, now: f64) -> u64 {
        self.jobs.values().filter(|j| j.fulfilled_ms > now).count() as u64
    }

    /// Submits a job over `[from, to)` at `now`: its id, or why not (reason
    /// `jobs:running` or `jobs:submits`).
    pub(crate) fn submit(
        &mut self,
        now: f64,
        history: &History,
        from: i64,
        to: i64,
        id: String,
    ) -> Result<String, Refusal> {
        let expiry = self.config.expiry_ms as f64;
        self.jobs.retain(|_, j| now - j.submitted_ms < expiry);
        let window_ms = self.config.submit_window_ms as f64;
        let index = (now / window_ms) as u64;
        if self.window.0 != index {
            self.window = (index, 0);
        }
        if self.window.1 >= self.config.submits_per_window {
            return Err(Refusal {
                reason: "jobs:submits".into(),
                limit: Some(self.config.submits_per_window),
                retry_after_ms: (index + 1) as f64 * window_ms - now,
            });
        }
        if self.running(now) >= self.config.max_running {
            let first_done = self
                .jobs
                .values()
                .map(|j| j.fulfilled_ms)
                .filter(|t| *t > now)
                .fold(f64::INFINITY, f64::min);
            return Err(Refusal {
                reason: "jobs:running".into(),
                limit: Some(self.config.max_running),
                retry_after_ms: (first_done - now).clamp(1.0, RUNNING_RETRY_MS),
            });
        }
        self.window.1 += 1;
        // What the job can see: its interval, cut where data ends.
        let to = self.available_until.map_or(to, |a| to.min(a.max(from)));
        let rows = history.count(from, to) as u64;
        let latency = self.config.fulfil_base_ms as f64
            + self.config.fulfil_per_1000_rows_ms as f64 * rows as f64 / 1000.0;
        self.jobs.insert(
            id.clone(),
            Job {
                from,
                to,
                submitted_ms: now,
                fulfilled_ms: now + latency,
                rows,
            },
        );
        Ok(id)
    }

    /// The status of job `id` at `now`; `epoch_ms` (Unix ms) is simulated
    /// time 0, for the dates of the answer.
    pub(crate) fn status(&self, now: f64, id: &str, epoch_ms: i64) -> Result<JobStatus, JobError> {
        let job = self.live(id, now)?;
        let done = job.fulfilled_ms <= now;
        Ok(JobStatus {
            state: if done { "FULFILLED" } else { "PENDING" },
            submission_date: format_ms(epoch_ms + job.submitted_ms as i64),
            expiration_date: format_ms(epoch_ms + (job.submitted_ms as i64) + self.expiry()),
            total_hits: done.then_some(job.rows),
        })
    }

    /// Deletes job `id` (the real API's `DELETE …/jobs/{id}`) at `now`: a
    /// job not fulfilled yet stops counting as running.
    pub(crate) fn delete(&mut self, now: f64, id: &str) -> Result<(), JobError> {
        self.live(id, now)?;
        self.jobs.remove(id).map(|_| ()).ok_or(JobError::NotFound)
    }

    /// Job `id` unless it was never submitted or expired by `now` (expired
    /// jobs are dropped at the next submission; until then they are only
    /// hidden).
    fn live(&self, id: &str, now: f64) -> Result<&Job, JobError> {
        self.jobs
            .get(id)
            .filter(|j| now - j.submitted_ms < self.config.expiry_ms as f64)
            .ok_or(JobError::NotFound)
    }

    fn expiry(&self) -> i64 {
        self.config.expiry_ms as i64
    }

    /// A results page of job `id` at `now`, from `cursor` (none: the
    /// first page).
    pub(crate) fn results(
        &self,
        now: f64,
        history: &History,
        id: &str,
        cursor: Option<&str>,
        page_size: Option<usize>,
    ) -> Result<ResultsPage, JobError> {
        let job = self.live(id, now)?;
        if job.fulfilled_ms > now {
            return Err(JobError::NotFulfilled);
        }
        let size = page_size.unwrap_or(DEFAULT_RESULTS_PAGE);
        if !(1..=MAX_RESULTS_PAGE).contains(&size) {
            return Err(JobError::BadRequest(format!(
                "pageSize must be 1–{MAX_RESULTS_PAGE}, got {size}"
            )));
        }
        let offset = match cursor {
            None => 0,
            Some(c) => parse_cursor(id, c).ok_or_else(|| {
                JobError::BadRequest("cursor is not one this job handed out".into())
            })?,
        };
        let conversations = history.slice(job.from, job.to, offset, size);
        let next = offset + conversations.len();
        Ok(ResultsPage {
            cursor: ((next as u64) < job.rows).then(|| format!("{id}.{next}")),
            conversations,
            data_availability_date: format_ms(self.available_until.unwrap_or(job.to)),
        })
    }
}

/// The offset in a cursor `"<job id>.<offset>"` of job `id`.
fn parse_cursor(id: &str, cursor: &str) -> Option<usize> {
    cursor.strip_prefix(id)?.strip_prefix('.')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::parse_day;

    fn setup() -> (Jobs, History, i64) {
        let day = parse_day("2026-11-01").unwrap();
        let config = JobsConfig {
            max_running: 1,
            submits_per_window: 2,
            ..JobsConfig::default()
        };
        (
            Jobs::new(config),
            History::generate(1, "o", day, 1, 2_400),
            day,
        )
    }

    #[test]
    fn a_deleted_job_is_gone_and_no_longer_runs() {
        let (mut jobs, history, day) = setup();
        let id = jobs
            .submit(0.0, &history, day, day + 3_600_000, "j1".into())
            .unwrap();
        // One may run at once: a second waits for the first.
        let refused = jobs.submit(1.0, &history, day, day + 3_600_000, "j2".into());
        assert_eq!(refused.unwrap_err().reason, "jobs:running");
        assert_eq!(jobs.delete(1.5, &id), Ok(()));
        assert_eq!(jobs.status(2.0, &id, 0).err(), Some(JobError::NotFound));
        assert_eq!(jobs.delete(2.5, &id), Err(JobError::NotFound));
        assert!(jobs
            .submit(3.0, &history, day, day + 3_600_000, "j3".into())
            .is_ok());
    }

    /// Past its expiry a job answers 404 to status, results and delete at
    /// once, not only after the next submission drops it.
    #[test]
    fn an_expired_job_is_not_found_before_the_next_submission() {
        let (mut jobs, history, day) = setup();
        let id = jobs
            .submit(0.0, &history, day, day + 3_600_000, "j1".into())
            .unwrap();
        let expired = jobs.config.expiry_ms as f64;
        assert!(jobs.status(expired - 1.0, &id, 0).is_ok());
        assert_eq!(jobs.status(expired, &id, 0).err(), Some(JobError::NotFound));
        assert_eq!(
            jobs.results(expired, &history, &id, None, None).err(),
            Some(JobError::NotFound)
        );
        assert_eq!(jobs.delete(expired, &id), Err(JobError::NotFound));
    }

    #[test]
    fn a_job_is_pending_then_pages_its_interval_by_cursor() {
        let (mut jobs, history, day) = setup();
        let (from, to) = (day, day + 6 * 3_600_000);
        let id = jobs.submit(0.0, &history, from, to, "j1".into()).unwrap();
        let pending = jobs.status(100.0, &id, 0).unwrap();
        assert_eq!((pending.state, pending.total_hits), ("PENDING", None));
        assert_eq!(
            jobs.results(100.0, &history, &id, None, None).err(),
            Some(JobError::NotFulfilled)
        );
        let later = 60_000.0;
        let done = jobs.status(later, &id, 0).unwrap();
        let hits = done.total_hits.unwrap();
        assert_eq!(done.state, "FULFILLED");
        assert_eq!(hits as usize, history.count(from, to));
        let (mut rows, mut cursor, mut pages) = (0, None, 0);
        loop {
            let page = jobs
                .results(later, &history, &id, cursor.as_deref(), Some(256))
                .unwrap();
            rows += page.rows();
            pages += 1;
            match page.cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(rows as u64, hits);
        assert_eq!(pages, (hits as usize).div_ceil(256));
        assert!(matches!(
            jobs.results(later, &history, &id, Some("other.5"), None),
            Err(JobError::BadRequest(_))
        ));
        assert_eq!(
            jobs.status(later, "nope", 0).err(),
            Some(JobError::NotFound)
        );
    }

    #[test]
    fn running_and_submit_limits_refuse_with_a_wait() {
        let (mut jobs, history, day) = setup();
        jobs.submit(0.0, &history, day, day + 1, "a".into())
            .unwrap();
        let busy = jobs
            .submit(10.0, &history, day, day + 1, "b".into())
            .unwrap_err();
        assert_eq!(busy.reason, "jobs:running");
        assert!(busy.retry_after_ms > 0.0 && busy.retry_after_ms <= RUNNING_RETRY_MS);
        // Once the first is fulfilled, a second fits; a third is over the
        // submit rate until the window ends.
        jobs.submit(30_000.0, &history, day, day + 1, "b".into())
            .unwrap();
        let rate = jobs
            .submit(50_000.0, &history, day, day + 1, "c".into())
            .unwrap_err();
        assert_eq!(rate.reason, "jobs:submits");
        assert_eq!(rate.retry_after_ms, 10_000.0);
        jobs.submit(60_000.0, &history, day, day + 1, "c".into())
            .unwrap();
    }
}
