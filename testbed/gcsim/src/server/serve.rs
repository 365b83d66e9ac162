//! One API request from start to end: its caller, the org's decision (an
//! endpoint's own limit last), then either the 429 with `Retry-After` or the
//! endpoint's answer after its simulated latency, slept while the request
//! holds its concurrency slots; the rate-limit headers and the log entry
//! either way. Also what an endpoint answers with, [`Answer`].

use std::sync::Arc;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::errors::{error_json, too_many, unknown_org};
use super::{lock, OrgSlot, Sim};
use crate::log::Entry;
use crate::org::Refusal;

impl Sim {
    fn log(&self, entry: Entry) {
        lock(&self.inner.log).push(entry);
    }

    /// One API request: auth, the org's decision, `answer` (run once
    /// admitted), its latency, the headers.
    pub(super) async fn serve<F>(
        &self,
        headers: &HeaderMap,
        method: &str,
        path: &str,
        answer: F,
    ) -> Response
    where
        F: FnOnce(&OrgSlot) -> Answer,
    {
        self.serve_gated(
            headers,
            method,
            path,
            |_, _| Ok(()),
            |slot, ()| answer(slot),
        )
        .await
    }

    /// [`Self::serve`] for an endpoint with a limit of its own: `gate` (at
    /// the decision's simulated ms, under the org's lock) is that limit's
    /// last word in the org's decision (see
    /// [`Org::admit_gated`](crate::org::Org::admit_gated)); what it
    /// admits with goes to `answer`.
    pub(super) async fn serve_gated<G, T, F>(
        &self,
        headers: &HeaderMap,
        method: &str,
        path: &str,
        gate: G,
        answer: F,
    ) -> Response
    where
        G: FnOnce(&OrgSlot, f64) -> Result<T, Refusal>,
        F: FnOnce(&OrgSlot, T) -> Answer,
    {
        let (org_id, client) = match self.caller(headers) {
            Ok(caller) => caller,
            Err(response) => return *response,
        };
        let (org_id, client) = (org_id.as_str(), client.as_str());
        let Some(slot) = self.inner.orgs.get(org_id) else {
            return unknown_org(org_id);
        };
        let clock = self.inner.clock;
        let now = clock.now_ms();
        let mut admitted = None;
        let decision = lock(&slot.org).admit_gated(now, client, method, path, || {
            admitted = Some(gate(slot, now)?);
            Ok(())
        });
        let entry = |status: StatusCode, reason: Option<String>| Entry {
            seq: 0,
            sim_ms: now,
            org: org_id.to_owned(),
            client: client.to_owned(),
            method: method.to_owned(),
            path: path.to_owned(),
            status: status.as_u16(),
            reason,
        };
        // None when no limit that applies tells (a silent org).
        let rate_headers: Vec<(&'static str, String)> = decision
            .told
            .map(|t| {
                vec![
                    ("inin-ratelimit-allowed", t.allowed.to_string()),
                    ("inin-ratelimit-count", t.count.to_string()),
                    ("inin-ratelimit-reset", clock.header_secs(t.reset_ms)),
                ]
            })
            .unwrap_or_default();
        let (slots, admitted) = match (decision.verdict, admitted) {
            (Ok(slots), Some(admitted)) => (slots, admitted),
            (Ok(_), None) => unreachable!("the gate runs whenever the org admits"),
            (Err(refusal), _) => {
                self.log(entry(
                    StatusCode::TOO_MANY_REQUESTS,
                    Some(refusal.reason.clone()),
                ));
                let mut response = too_many(&refusal);
                let h = response.headers_mut();
                if let Ok(v) = clock.header_secs(refusal.retry_after_ms).parse() {
                    h.insert(header::RETRY_AFTER, v);
                }
                add_headers(&mut response, &rate_headers);
                return response;
            }
        };
        let _slots = SlotGuard {
            slot: Arc::clone(slot),
            slots,
        };
        let answer = answer(slot, admitted);
        self.log(entry(answer.status, None));
        tokio::time::sleep(clock.real(answer.latency_ms)).await;
        let mut response = (
            answer.status,
            [(header::CONTENT_TYPE, "application/json")],
            answer.body,
        )
            .into_response();
        add_headers(&mut response, &rate_headers);
        response
    }
}

/// Gives back the concurrency slots of a request when it ends (or when its
/// client goes away mid-latency and the handler is dropped).
struct SlotGuard {
    slot: Arc<OrgSlot>,
    slots: Vec<usize>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if !self.slots.is_empty() {
            lock(&self.slot.org).release(&self.slots);
        }
    }
}

/// What an admitted request answers.
pub(super) struct Answer {
    status: StatusCode,
    body: String,
    /// Simulated ms before the answer is sent.
    latency_ms: f64,
}

impl Answer {
    pub(super) fn ok(status: StatusCode, body: String, latency_ms: f64) -> Answer {
        Answer {
            status,
            body,
            latency_ms,
        }
    }

    /// A Genesys-style error, answered at once.
    pub(super) fn error(status: StatusCode, code: &str, message: &str) -> Answer {
        Answer {
            status,
            body: error_json(status, code, message, None),
            latency_ms: 0.0,
        }
    }

    pub(super) fn bad_request(message: String) -> Answer {
        Answer::error(StatusCode::BAD_REQUEST, "bad.request", &message)
    }
}

fn add_headers(response: &mut Response, headers: &[(&'static str, String)]) {
    for (name, value) in headers {
        if let Ok(v) = value.parse() {
            response.headers_mut().insert(*name, v);
        }
    }
}

pub(super) fn json_answer<T: serde::Serialize>(value: &T, latency_ms: f64) -> Answer {
    match serde_json::to_string(value) {
        Ok(body) => Answer::ok(StatusCode::OK, body, latency_ms),
        Err(e) => Answer::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal.server.error",
            &format!("The answer could not be encoded: {e}"),
        ),
    }
}
