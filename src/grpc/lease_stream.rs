//! The LeaseStream session: one bidirectional stream on which a busy
//! sidecar acquires, releases, renews and reports without paying an RPC per
//! operation. A session owns the stream's waiting acquires, polled in the
//! session's own task so that a grant is never lost between the broker and
//! the stream, and the leases granted on it, which it releases when the
//! stream ends for any reason.

use super::codec::MAX_CONCURRENT_STREAMS;
use super::ops::Ops;
use crate::auth::Principal;
use crate::pb;
use crate::pb::lease_stream_request::Op;
use crate::pb::lease_stream_response::Result as Answer;
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Status, Streaming};
use tracing::Instrument;

/// Answers buffered for a slow reader; when full, the session stops reading
/// requests until the client reads (backpressure, not unbounded memory).
const ANSWER_BUFFER: usize = 256;
/// Most acquires one stream may have waiting at once, as many as the
/// concurrent unary RPCs one connection may have.
const MAX_WAITING: usize = MAX_CONCURRENT_STREAMS as usize;
/// Leases the session tracks before it first forgets those that expired.
const HELD_PRUNE_AT: usize = 1024;

/// What the session answers on the response stream.
pub(crate) type Answers = mpsc::Receiver<Result<pb::LeaseStreamResponse, Status>>;

/// Starts a session for `who` on `requests`; its answers come out of the
/// returned receiver. The session ends when the client closes its side and
/// every waiting acquire is answered, when the client goes away, or at
/// shutdown.
pub(crate) fn serve(
    svc: Ops,
    who: Principal,
    requests: Streaming<pb::LeaseStreamRequest>,
) -> Answers {
    let (tx, rx) = mpsc::channel(ANSWER_BUFFER);
    // In the stream's request span: the session's log lines, and the
    // broker's for operations on it, carry its request id.
    tokio::spawn(session(svc, who, requests, tx).in_current_span());
    rx
}

/// One step of the session loop.
enum Event {
    Request(pb::LeaseStreamRequest),
    Granted(u64, Result<pb::AcquireResponse, Status>),
    ClientDone,
    /// The session must end with this status; acquires still waiting are
    /// answered with it first.
    End(Status),
    /// Nobody reads the answers any more.
    ClientGone,
}

async fn session(
    svc: Ops,
    who: Principal,
    mut requests: Streaming<pb::LeaseStreamRequest>,
    tx: mpsc::Sender<Result<pb::LeaseStreamResponse, Status>>,
) {
    let shutdown = svc.broker().shutdown_token().clone();
    let mut held = Held::default();
    let mut waiting = FuturesUnordered::new();
    // Ids of the acquires in `waiting`, to answer them if the session ends.
    let mut pending: HashSet<u64> = HashSet::new();
    let mut reading = true;
    let end = loop {
        let event = tokio::select! {
            r = requests.message(), if reading => match r {
                Ok(Some(req)) => Event::Request(req),
                Ok(None) => Event::ClientDone,
                // E.g. a message over the size limit: the stream cannot go
                // on, and the client must hear why.
                Err(status) => {
                    tracing::debug!(%status, "LeaseStream: request stream failed");
                    Event::End(status)
                }
            },
            Some((id, r)) = waiting.next(), if !waiting.is_empty() => Event::Granted(id, r),
            _ = shutdown.cancelled() => Event::End(Status::unavailable(
                "the broker is shutting down; open a new stream once it is back",
            )),
            _ = tx.closed() => Event::ClientGone,
        };
        let answer = match event {
            Event::Request(req) => {
                let id = req.id;
                match req.op {
                    Some(Op::Acquire(_)) if pending.contains(&id) => Some(failed(
                        id,
                        Status::invalid_argument(format!(
                            "id {id} is already waiting on this stream; give each operation its own id"
                        )),
                    )),
                    Some(Op::Acquire(a)) if waiting.len() < MAX_WAITING => {
                        let (svc, who) = (&svc, &who);
                        pending.insert(id);
                        waiting.push(async move { (id, svc.acquire_op(who, a).await) });
                        None
                    }
                    Some(Op::Acquire(_)) => Some(failed(
                        id,
                        Status::resource_exhausted(format!(
                            "this stream already has {MAX_WAITING} acquires waiting; wait for answers before sending more"
                        )),
                    )),
                    Some(Op::Release(r)) => {
                        held.released(&r.lease_id);
                        Some(answer(id, svc.release_op(&who, r).map(Answer::Release)))
                    }
                    Some(Op::Renew(r)) => {
                        let lease_id = r.lease_id.clone();
                        let renewed = svc.renew_op(&who, r);
                        if let Ok(a) = &renewed {
                            held.renewed(&lease_id, a.lease_ttl_ms, Instant::now());
                        }
                        Some(answer(id, renewed.map(Answer::Renew)))
                    }
                    Some(Op::Report(r)) => {
                        Some(answer(id, svc.report_op(&who, r).map(Answer::Report)))
                    }
                    None => Some(failed(
                        id,
                        Status::invalid_argument(
                            "op: required, one of acquire, release, renew or report",
                        ),
                    )),
                }
            }
            Event::Granted(id, r) => {
                pending.remove(&id);
                if let Ok(g) = &r {
                    if g.granted && g.lease_ttl_ms > 0 {
                        held.granted(&g.lease_id, g.lease_ttl_ms, Instant::now());
                    }
                }
                Some(answer(id, r.map(Answer::Acquire)))
            }
            Event::ClientDone => {
                reading = false;
                None
            }
            Event::End(status) => break Some(status),
            Event::ClientGone => break None,
        };
        if let Some(a) = answer {
            if tx.send(Ok(a)).await.is_err() {
                break None;
            }
        }
        if !reading && waiting.is_empty() {
            break None;
        }
    };
    // Dropping a waiting acquire withdraws it from its queue.
    drop(waiting);
    if let Some(status) = end {
        // Every operation gets an answer, then the stream its status: like
        // a unary waiter, a streamed one hears UNAVAILABLE at shutdown.
        for id in pending {
            let op = failed(
                id,
                Status::new(
                    status.code(),
                    format!("not answered before the stream ended: {}", status.message()),
                ),
            );
            if tx.send(Ok(op)).await.is_err() {
                break;
            }
        }
        let _ = tx.send(Err(status)).await;
    }
    let held = held.0;
    if shutdown.is_cancelled() {
        // The broker is stopping, not the caller: its calls upstream may
        // still run. The leases stay held, so the stop records them (or a
        // cluster hands them over) and the next broker keeps their slots
        // until they are renewed, released or expire.
        if !held.is_empty() {
            tracing::debug!(
                leases = held.len(),
                "LeaseStream ended by shutdown: its leases stay held for the next start"
            );
        }
        return;
    }
    if !held.is_empty() {
        tracing::debug!(
            leases = held.len(),
            "LeaseStream ended: releasing its leases"
        );
    }
    for lease in held.into_keys() {
        // Already expired or released elsewhere is fine: release is idempotent.
        let _ = svc.broker().release(&lease, None);
    }
}

/// Leases granted on a stream that may still hold slots, with their expiry
/// as the stream last heard it (one renewed by a unary Renew may be
/// forgotten early: its TTL frees it all the same). Those that expired are
/// forgotten each time the map doubles, so a stream that lets its leases
/// expire does not grow it without end.
#[derive(Debug)]
struct Held(HashMap<String, Instant>, usize);

impl Default for Held {
    fn default() -> Held {
        Held(HashMap::new(), HELD_PRUNE_AT)
    }
}

impl Held {
    fn granted(&mut self, lease_id: &str, ttl_ms: u64, now: Instant) {
        self.0
            .insert(lease_id.to_owned(), now + Duration::from_millis(ttl_ms));
        if self.0.len() >= self.1 {
            self.0.retain(|_, until| *until > now);
            self.1 = HELD_PRUNE_AT.max(2 * self.0.len());
        }
    }

    fn renewed(&mut self, lease_id: &str, ttl_ms: u64, now: Instant) {
        if let Some(until) = self.0.get_mut(lease_id) {
            *until = now + Duration::from_millis(ttl_ms);
        }
    }

    fn released(&mut self, lease_id: &str) {
        self.0.remove(lease_id);
    }
}

fn answer(id: u64, r: Result<Answer, Status>) -> pb::LeaseStreamResponse {
    match r {
        Ok(result) => pb::LeaseStreamResponse {
            id,
            result: Some(result),
        },
        Err(status) => failed(id, status),
    }
}

fn failed(id: u64, status: Status) -> pb::LeaseStreamResponse {
    pb::LeaseStreamResponse {
        id,
        result: Some(Answer::Error(pb::OperationError {
            code: status.code() as i32,
            message: status.message().to_owned(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_leases_are_forgotten_and_live_ones_kept() {
        let t0 = Instant::now();
        let mut held = Held::default();
        held.granted("renewed", 1_000, t0);
        held.granted("live", 60_000, t0);
        for i in 0..HELD_PRUNE_AT - 3 {
            held.granted(&format!("short-{i}"), 1_000, t0);
        }
        held.renewed("renewed", 60_000, t0);
        held.released("live");
        held.granted("live", 60_000, t0);
        assert_eq!(held.0.len(), HELD_PRUNE_AT - 1);
        // The next grant, after the short ones expired, forgets them.
        held.granted("next", 1_000, t0 + Duration::from_secs(2));
        let mut left: Vec<&str> = held.0.keys().map(String::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["live", "next", "renewed"]);
        assert_eq!(held.1, HELD_PRUNE_AT);
    }
}
