//! The endpoints of the asynchronous details jobs (`crate::jobs`): submit
//! (its limits decided last in the org's decision), status, delete and the
//! cursor-paged results, with the cursor faults the control plane sets.

use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use super::api::{bad_interval, parse_interval};
use super::serve::{json_answer, Answer};
use super::{lock, Sim};
use crate::data::uuid_like;
use crate::jobs::JobError;

/// Simulated latency of a job submission or status, ms.
const JOB_LATENCY_MS: f64 = 50.0;
/// Simulated latency of a job results page: fixed part and per row, ms.
const JOB_RESULTS_LATENCY_MS: (f64, f64) = (100.0, 0.1);
/// Unix ms of simulated time 0 in a job's dates: the Unix epoch itself.
const JOB_EPOCH_MS: i64 = 0;

/// A job submission's body: the interval, as the details query has it.
#[derive(Deserialize)]
struct JobQuery {
    interval: String,
}

/// A job submission's interval from its body (Unix ms), or the 400's message.
fn job_interval(body: &[u8]) -> Result<(i64, i64), String> {
    let query: JobQuery = serde_json::from_slice(body)
        .map_err(|e| format!("The request body is not a job query: {e}"))?;
    parse_interval(&query.interval).ok_or_else(|| bad_interval(&query.interval))
}

fn job_error(e: JobError) -> Answer {
    match e {
        JobError::NotFound => Answer::error(
            StatusCode::NOT_FOUND,
            "not.found",
            "No such job (never submitted, or expired).",
        ),
        JobError::NotFulfilled => Answer::bad_request("The job is not fulfilled yet.".into()),
        JobError::BadRequest(message) => Answer::bad_request(message),
    }
}

/// A submission: once the token and family limits admit it, a bad body is
/// a 400 (whatever the jobs running) and a good one meets the jobs limits,
/// last in the org's decision, so that their refusal counts as any other.
pub(super) async fn job_submit(
    State(sim): State<Sim>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    let interval = job_interval(&body);
    sim.serve_gated(
        &headers,
        "POST",
        uri.path(),
        |slot, now| match interval {
            Ok((from, to)) => {
                let id = uuid_like(&mut fastrand::Rng::new());
                lock(&slot.jobs)
                    .submit(now, &slot.history, from, to, id)
                    .map(Ok)
            }
            Err(message) => Ok(Err(message)),
        },
        |_, submitted| match submitted {
            Ok(id) => Answer::ok(
                StatusCode::ACCEPTED,
                json!({ "jobId": id }).to_string(),
                JOB_LATENCY_MS,
            ),
            Err(message) => Answer::bad_request(message),
        },
    )
    .await
}

pub(super) async fn job_status(
    State(sim): State<Sim>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let now = sim.inner.clock.now_ms();
    sim.serve(&headers, "GET", uri.path(), |slot| {
        match lock(&slot.jobs).status(now, &id, JOB_EPOCH_MS) {
            Ok(status) => json_answer(&status, JOB_LATENCY_MS),
            Err(e) => job_error(e),
        }
    })
    .await
}

pub(super) async fn job_delete(
    State(sim): State<Sim>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let now = sim.inner.clock.now_ms();
    sim.serve(&headers, "DELETE", uri.path(), |slot| {
        match lock(&slot.jobs).delete(now, &id) {
            Ok(()) => Answer::ok(StatusCode::NO_CONTENT, String::new(), JOB_LATENCY_MS),
            Err(e) => job_error(e),
        }
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ResultsParams {
    cursor: Option<String>,
    page_size: Option<usize>,
}

pub(super) async fn job_results(
    State(sim): State<Sim>,
    Path(id): Path<String>,
    Query(params): Query<ResultsParams>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let now = sim.inner.clock.now_ms();
    sim.serve(&headers, "GET", uri.path(), |slot| {
        // A cursor the endless-cursor fault handed out reads the page of
        // the cursor it was made from.
        let cursor = params.cursor.as_deref().map(|c| match c.rsplit_once('~') {
            Some((base, n))
                if n.parse::<u64>()
                    .is_ok_and(|n| n < slot.fresh_cursors.load(Ordering::Relaxed)) =>
            {
                base
            }
            _ => c,
        });
        let page = lock(&slot.jobs).results(now, &slot.history, &id, cursor, params.page_size);
        match page {
            Ok(mut page) => {
                if slot
                    .endless_cursors
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let n = slot.fresh_cursors.fetch_add(1, Ordering::Relaxed);
                    let base = cursor.map_or_else(|| format!("{id}.0"), str::to_owned);
                    page.set_cursor(format!("{base}~{n}"));
                }
                // The fault, taken once per page read with a cursor that
                // has a page after it.
                if let Some(asked) = &params.cursor {
                    if page.has_next()
                        && slot
                            .repeating_cursors
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                n.checked_sub(1)
                            })
                            .is_ok()
                    {
                        page.set_cursor(asked.clone());
                    }
                }
                let latency =
                    JOB_RESULTS_LATENCY_MS.0 + JOB_RESULTS_LATENCY_MS.1 * page.rows() as f64;
                json_answer(&page, latency)
            }
            Err(e) => job_error(e),
        }
    })
    .await
}
