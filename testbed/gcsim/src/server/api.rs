//! The Genesys-like endpoints other than the jobs: the conversation details
//! query (with the page faults the control plane sets), the queue
//! observations query, the wrap-up write and the limits namespaces; and the
//! `"<start>/<end>"` interval they and the jobs take.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use super::serve::{json_answer, Answer};
use super::{lock, OrgSlot, Sim};
use crate::data::parse_timestamp;

/// Simulated latency of a details query: fixed part and per row, ms.
const DETAILS_LATENCY_MS: (f64, f64) = (400.0, 2.0);
/// Simulated latency of a queue-observations query, ms.
const OBSERVATIONS_LATENCY_MS: f64 = 20.0;
/// Simulated latency of a wrap-up write, ms.
const WRAPUP_LATENCY_MS: f64 = 30.0;
/// Queues in every observations answer.
const OBSERVED_QUEUES: usize = 8;

/// The details query's body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DetailsQuery {
    interval: String,
    #[serde(default)]
    paging: Paging,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Paging {
    page_size: Option<i64>,
    page_number: Option<i64>,
}

/// `"<start>/<end>"` in ISO-8601 UTC, start before end → Unix ms.
pub(super) fn parse_interval(interval: &str) -> Option<(i64, i64)> {
    let (a, b) = interval.split_once('/')?;
    let (from, to) = (parse_timestamp(a)?, parse_timestamp(b)?);
    (from < to).then_some((from, to))
}

pub(super) fn bad_interval(interval: &str) -> String {
    // Bounded: an interval is a few dozen characters, not an echo of a body.
    let shown: String = interval.chars().take(80).collect();
    format!("interval {shown:?} is not \"<start>/<end>\" in ISO-8601 UTC with start before end")
}

fn details_answer(slot: &OrgSlot, body: &[u8]) -> Answer {
    let history = &slot.history;
    let query: DetailsQuery = match serde_json::from_slice(body) {
        Ok(q) => q,
        Err(e) => {
            return Answer::bad_request(format!("The request body is not a details query: {e}"))
        }
    };
    let Some((from, to)) = parse_interval(&query.interval) else {
        return Answer::bad_request(bad_interval(&query.interval));
    };
    let page_size = query.paging.page_size.unwrap_or(25);
    let page_number = query.paging.page_number.unwrap_or(1);
    if !(1..=100).contains(&page_size) || page_number < 1 {
        return Answer::bad_request(format!(
            "paging: pageSize must be 1–100 and pageNumber ≥ 1, got {page_size} and {page_number}"
        ));
    }
    let (size, number) = (page_size as usize, page_number as usize);
    let mut page = history.query(from, to, size, number);
    if number == 1 {
        let shifted = page.rows() > 0
            && slot
                .shifted_queries
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
        slot.shifting.store(shifted, Ordering::Relaxed);
    } else if slot.shifting.load(Ordering::Relaxed) {
        page = history.query_shifted(from, to, size, number);
    }
    // A page fault set by the control plane, taken once per page with rows.
    let take = |left: &AtomicU64| {
        page.rows() > 0
            && left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
    };
    let (short, malformed) = (take(&slot.short_pages), take(&slot.malformed_pages));
    let nul = take(&slot.nul_fields);
    if short {
        page.drop_last();
    }
    if malformed {
        page.garble_first();
    }
    if nul {
        page.nul_in_first();
    }
    let latency = DETAILS_LATENCY_MS.0 + DETAILS_LATENCY_MS.1 * page.rows() as f64;
    json_answer(&page, latency)
}

pub(super) async fn details(
    State(sim): State<Sim>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    sim.serve(&headers, "POST", uri.path(), |slot| {
        details_answer(slot, &body)
    })
    .await
}

pub(super) async fn observations(
    State(sim): State<Sim>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    sim.serve(
        &headers,
        "POST",
        uri.path(),
        |_| match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(_) => Answer::ok(
                StatusCode::OK,
                sim.inner.observations.clone(),
                OBSERVATIONS_LATENCY_MS,
            ),
            Err(e) => Answer::bad_request(format!("The request body is not JSON: {e}")),
        },
    )
    .await
}

/// The fixed answer of a queue-observations query.
pub(super) fn observations_body() -> String {
    let results: Vec<_> = (0..OBSERVED_QUEUES)
        .map(|q| {
            json!({
                "group": { "queueId": format!("queue-{q}") },
                "data": [
                    { "metric": "oWaiting", "stats": { "count": q } },
                    { "metric": "oInteracting", "stats": { "count": 2 * q } },
                ],
            })
        })
        .collect();
    json!({ "results": results }).to_string()
}

#[derive(Deserialize)]
struct Wrapup {
    code: String,
}

pub(super) async fn wrapup(
    State(sim): State<Sim>,
    Path((conversation, _participant, _communication)): Path<(String, String, String)>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    sim.serve(
        &headers,
        "POST",
        uri.path(),
        |slot| match serde_json::from_slice::<Wrapup>(&body) {
            Ok(w) if !w.code.is_empty() => {
                lock(&slot.org).store_write(&conversation);
                Answer::ok(StatusCode::ACCEPTED, "{}".into(), WRAPUP_LATENCY_MS)
            }
            Ok(_) => Answer::bad_request("code must not be empty".into()),
            Err(e) => Answer::bad_request(format!("The request body is not a wrap-up: {e}")),
        },
    )
    .await
}

pub(super) async fn namespace(
    State(sim): State<Sim>,
    Path(ns): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    sim.serve(&headers, "GET", uri.path(), |slot| {
        match lock(&slot.org).namespace(&ns) {
            Some(entities) => {
                let entities: Vec<_> = entities
                    .into_iter()
                    .map(|(key, value)| json!({ "key": key, "value": value }))
                    .collect();
                Answer::ok(
                    StatusCode::OK,
                    json!({ "namespace": ns, "entities": entities }).to_string(),
                    0.0,
                )
            }
            None => Answer::error(
                StatusCode::NOT_FOUND,
                "not.found",
                &format!("No limits namespace {ns:?}."),
            ),
        }
    })
    .await
}
