//! The `/_sim` control plane: the orgs' counters, the wrap-ups written,
//! changing a family's limits, the request log, an org's conversation ids,
//! and the faults that make later pages and cursors misbehave.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::api::{bad_interval, parse_interval};
use super::errors::{error_body, unknown_org};
use super::{lock, OrgSlot, Sim};
use crate::org::FamilyChange;

pub(super) async fn stats(State(sim): State<Sim>) -> Response {
    let now = sim.inner.clock.now_ms();
    let orgs: Vec<_> = sim
        .inner
        .ids
        .iter()
        .filter_map(|id| {
            let slot = sim.inner.orgs.get(id)?;
            Some(lock(&slot.org).stats(now, id))
        })
        .collect();
    axum::Json(json!({ "sim_ms": now, "orgs": orgs })).into_response()
}

pub(super) async fn writes(State(sim): State<Sim>, Path(org): Path<String>) -> Response {
    match sim.inner.orgs.get(&org) {
        Some(slot) => axum::Json(lock(&slot.org).writes().clone()).into_response(),
        None => unknown_org(&org),
    }
}

pub(super) async fn change(
    State(sim): State<Sim>,
    Path((org, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Some(slot) = sim.inner.orgs.get(&org) else {
        return unknown_org(&org);
    };
    let change: FamilyChange = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return error_body(
                StatusCode::BAD_REQUEST,
                "bad.request",
                format!("expected any of {{\"hidden_permits\":N,\"max_concurrent\":N,\"unmanaged_per_window\":N}}: {e}"),
                None,
            )
        }
    };
    if change.hidden_permits == Some(0) {
        return error_body(
            StatusCode::BAD_REQUEST,
            "bad.request",
            "hidden_permits must be above 0 (a limit of 0 refuses every request, as no upstream does)"
                .into(),
            None,
        );
    }
    let now = sim.inner.clock.now_ms();
    if lock(&slot.org).change(now, &name, change) {
        tracing::info!(org, family = name, ?change, sim_ms = now, "family changed");
        axum::Json(json!({ "sim_ms": now })).into_response()
    } else {
        error_body(
            StatusCode::NOT_FOUND,
            "not.found",
            format!("Org {org:?} has no family {name:?}."),
            None,
        )
    }
}

#[derive(Deserialize)]
pub(super) struct Since {
    #[serde(default)]
    since: u64,
}

pub(super) async fn log_page(State(sim): State<Sim>, Query(q): Query<Since>) -> Response {
    let page = lock(&sim.inner.log).page(q.since);
    axum::Json(page).into_response()
}

pub(super) async fn conversation_ids(
    State(sim): State<Sim>,
    Path(org): Path<String>,
    Query(q): Query<IdsParams>,
) -> Response {
    let Some(slot) = sim.inner.orgs.get(&org) else {
        return unknown_org(&org);
    };
    match q.interval {
        None => axum::Json(slot.history.ids()).into_response(),
        Some(interval) => match parse_interval(&interval) {
            Some((from, to)) => axum::Json(slot.history.ids_in(from, to)).into_response(),
            None => error_body(
                StatusCode::BAD_REQUEST,
                "bad.request",
                bad_interval(&interval),
                None,
            ),
        },
    }
}

/// `GET /_sim/orgs/{org}/conversations?interval=<start>/<end>`: only the
/// conversations starting in the interval.
#[derive(Deserialize)]
pub(super) struct IdsParams {
    interval: Option<String>,
}

/// `POST /_sim/orgs/{org}/short-pages` body `N`: the next N details-query
/// pages with rows each lose their last row.
pub(super) async fn short_pages(
    State(sim): State<Sim>,
    Path(org): Path<String>,
    body: Bytes,
) -> Response {
    page_fault(&sim, &org, &body, "short_pages", |slot| &slot.short_pages)
}

/// `POST /_sim/orgs/{org}/shifted-queries` body `N`: the next N details
/// queries (counted at their first page) answer every later page as if a
/// conversation on the first was removed once it was read (rows one place
/// on, `totalHits` one fewer), until another query's first page.
pub(super) async fn shifted_queries(
    State(sim): State<Sim>,
    Path(org): Path<String>,
    body: Bytes,
) -> Response {
    page_fault(&sim, &org, &body, "shifted_queries", |slot| {
        &slot.shifted_queries
    })
}

/// `POST /_sim/orgs/{org}/repeating-cursor` body `N`: the next N job results
/// pages read with a cursor, that have a page after them, hand back the
/// cursor they were read with instead of the next page's.
pub(super) async fn repeating_cursor(
    State(sim): State<Sim>,
    Path(org): Path<String>,
    body: Bytes,
) -> Response {
    page_fault(&sim, &org, &body, "repeating_cursor", |slot| {
        &slot.repeating_cursors
    })
}

/// `POST /_sim/orgs/{org}/endless-cursor` body `N`: the next N job results
/// pages (the last one too) hand out a cursor never handed out before that
/// reads the same page again.
pub(super) async fn endless_cursor(
    State(sim): State<Sim>,
    Path(org): Path<String>,
    body: Bytes,
) -> Response {
    page_fault(&sim, &org, &body, "endless_cursor", |slot| {
        &slot.endless_cursors
    })
}

/// `POST /_sim/orgs/{org}/malformed-pages` body `N`: the first row of each
/// of the next N details-query pages with rows lacks `conversationStart`.
pub(super) async fn malformed_pages(
    State(sim): State<Sim>,
    Path(org): Path<String>,
    body: Bytes,
) -> Response {
    page_fault(&sim, &org, &body, "malformed_pages", |slot| {
        &slot.malformed_pages
    })
}

/// `POST /_sim/orgs/{org}/nul-fields` body `N`: the first row of each of
/// the next N details-query pages with rows has a NUL character at the end
/// of its `queueId` and `wrapUpCode`.
pub(super) async fn nul_fields(
    State(sim): State<Sim>,
    Path(org): Path<String>,
    body: Bytes,
) -> Response {
    page_fault(&sim, &org, &body, "nul_fields", |slot| &slot.nul_fields)
}

/// `POST /_sim/orgs/{org}/jobs-available-until` body a Unix ms time, or
/// `null`: jobs submitted from now on see only conversations starting
/// before it, and their results say it as `dataAvailabilityDate`.
pub(super) async fn jobs_available_until(
    State(sim): State<Sim>,
    Path(org): Path<String>,
    body: Bytes,
) -> Response {
    let Some(slot) = sim.inner.orgs.get(&org) else {
        return unknown_org(&org);
    };
    match serde_json::from_slice::<Option<i64>>(&body) {
        Ok(until) => {
            lock(&slot.jobs).set_available_until(until);
            axum::Json(json!({ "jobs_available_until": until })).into_response()
        }
        Err(e) => error_body(
            StatusCode::BAD_REQUEST,
            "bad.request",
            format!("expected Unix ms or null: {e}"),
            None,
        ),
    }
}

/// Sets the count of a details-query page fault from a request body `N`.
fn page_fault(
    sim: &Sim,
    org: &str,
    body: &[u8],
    name: &str,
    counter: impl Fn(&OrgSlot) -> &AtomicU64,
) -> Response {
    let Some(slot) = sim.inner.orgs.get(org) else {
        return unknown_org(org);
    };
    match serde_json::from_slice::<u64>(body) {
        Ok(n) => {
            counter(slot).store(n, Ordering::Relaxed);
            axum::Json(json!({ name: n })).into_response()
        }
        Err(e) => error_body(
            StatusCode::BAD_REQUEST,
            "bad.request",
            format!("expected a number of pages: {e}"),
            None,
        ),
    }
}
