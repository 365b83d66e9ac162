//! The LeaseStream driver: one bidirectional stream per connection carrying
//! many Acquire→Release pairs at once, pipelined. Each pair slot `k` has at
//! most one request outstanding, sent with id `k`: its acquire, then, on the
//! grant, its release; the release's answer completes the pair and starts the
//! slot's next one. One task per stream reads every answer and drives every
//! slot; requests go out through an mpsc whose receiver is the request body
//! (tonic's encoder is the stream's single writer, so requests that are ready
//! together leave in one write).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quota_broker::pb::lease_stream_request::Op;
use quota_broker::pb::lease_stream_response::Result as Answer;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{LeaseStreamRequest, LeaseStreamResponse, ReleaseRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::drive::{acquire_request, Pace, Tally, Window};
use crate::error::Error;

/// How long to wait, after the last pair, for the server to close its side.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a slot's pair is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing outstanding (waiting for its scheduled start, or done).
    Idle,
    /// The acquire is outstanding.
    Acquiring,
    /// The release is outstanding.
    Releasing,
}

/// One pair slot.
struct Slot {
    phase: Phase,
    /// When its current pair started (or was scheduled to).
    begin: Instant,
    /// Open loop: when its next pair is scheduled.
    scheduled: Instant,
    /// Tenant of its next pair.
    tenant: usize,
    pace: Pace,
}

/// The state of one stream's slots, owned by the stream's reader task.
struct Driver {
    tx: mpsc::Sender<LeaseStreamRequest>,
    tenants: Arc<[String]>,
    slots: Vec<Slot>,
    /// Open loop: slots whose next pair is scheduled in the future, earliest
    /// first.
    due: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Slots with a request outstanding.
    in_flight: usize,
    window: Window,
    tally: Tally,
}

impl Driver {
    async fn send(&self, request: LeaseStreamRequest) -> Result<(), Error> {
        self.tx
            .send(request)
            .await
            .map_err(|_| Error::Protocol("the request stream closed under load".into()))
    }

    /// Starts slot `k`'s next pair now, schedules it, or retires the slot
    /// when the pair would start after the window. An open-loop pair already
    /// due (the slot is behind) is timed from its scheduled start.
    async fn next_pair(&mut self, k: usize) -> Result<(), Error> {
        let now = Instant::now();
        let slot = &mut self.slots[k];
        let begin = match slot.pace.interval {
            None => now,
            Some(interval) => {
                let at = slot.scheduled;
                slot.scheduled += interval;
                at
            }
        };
        if begin >= self.window.end {
            return Ok(());
        }
        if begin > now {
            self.due.push(Reverse((begin, k)));
            return Ok(());
        }
        self.send_acquire(k, begin).await
    }

    /// Starts every scheduled pair whose time has come, timed from now: the
    /// slot was idle, so the timer's lateness (up to a millisecond) is
    /// loadgen's, not the server's.
    async fn start_due(&mut self) -> Result<(), Error> {
        let now = Instant::now();
        while let Some(&Reverse((at, k))) = self.due.peek() {
            if at > now {
                break;
            }
            self.due.pop();
            self.send_acquire(k, now).await?;
        }
        Ok(())
    }

    async fn send_acquire(&mut self, k: usize, begin: Instant) -> Result<(), Error> {
        let slot = &mut self.slots[k];
        slot.begin = begin;
        slot.phase = Phase::Acquiring;
        let tenant = slot.tenant;
        slot.tenant = (tenant + 1) % self.tenants.len();
        self.in_flight += 1;
        let acquire = acquire_request(&self.tenants[tenant]);
        self.send(LeaseStreamRequest {
            id: k as u64,
            op: Some(Op::Acquire(acquire)),
        })
        .await
    }

    /// Ends slot `k`'s pair and starts its next.
    async fn finish(&mut self, k: usize, ok: bool) -> Result<(), Error> {
        self.slots[k].phase = Phase::Idle;
        self.in_flight -= 1;
        self.tally.record(&self.window, self.slots[k].begin, ok);
        self.next_pair(k).await
    }

    async fn on_answer(&mut self, answer: LeaseStreamResponse) -> Result<(), Error> {
        let k = usize::try_from(answer.id)
            .ok()
            .filter(|&k| k < self.slots.len() && self.slots[k].phase != Phase::Idle)
            .ok_or_else(|| Error::Protocol(format!("answer to id {} asked nothing", answer.id)))?;
        match (self.slots[k].phase, answer.result) {
            (Phase::Acquiring, Some(Answer::Acquire(granted))) if granted.granted => {
                self.slots[k].phase = Phase::Releasing;
                self.send(LeaseStreamRequest {
                    id: k as u64,
                    op: Some(Op::Release(ReleaseRequest {
                        lease_id: granted.lease_id,
                        ..Default::default()
                    })),
                })
                .await
            }
            (Phase::Releasing, Some(Answer::Release(_))) => self.finish(k, true).await,
            // Not granted, or the operation failed: the pair failed, the
            // stream goes on.
            (Phase::Acquiring, Some(Answer::Acquire(_))) | (_, Some(Answer::Error(_))) => {
                self.finish(k, false).await
            }
            (phase, other) => Err(Error::Protocol(format!(
                "id {k} is waiting for its {phase:?} answer but got {other:?}"
            ))),
        }
    }
}

/// Runs the pair slots `slots` (each: its first tenant and its pace) on one
/// LeaseStream over `channel` until the window ends and every pair is
/// answered.
pub(crate) async fn run(
    channel: Channel,
    tenants: Arc<[String]>,
    slots: Vec<(usize, Pace)>,
    window: Window,
) -> Result<Tally, Error> {
    // Room for one request per slot: each slot has at most one outstanding,
    // so sending never waits on the channel.
    let (tx, rx) = mpsc::channel(slots.len().max(1));
    let mut client = QuotaBrokerClient::new(channel);
    let mut answers = client
        .lease_stream(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut driver = Driver {
        tx,
        tenants,
        slots: slots
            .into_iter()
            .map(|(tenant, pace)| Slot {
                phase: Phase::Idle,
                begin: window.start,
                scheduled: window.start + pace.phase,
                tenant,
                pace,
            })
            .collect(),
        due: BinaryHeap::new(),
        in_flight: 0,
        window,
        tally: Tally::new(),
    };
    for k in 0..driver.slots.len() {
        driver.next_pair(k).await?;
    }
    while driver.in_flight > 0 || !driver.due.is_empty() {
        let next_due = driver.due.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            // Streaming::message keeps its state in the Streaming, so losing
            // the race to the timer loses no answer.
            answer = answers.message() => match answer? {
                Some(answer) => driver.on_answer(answer).await?,
                None => {
                    return Err(Error::Protocol(format!(
                        "the server ended the stream with {} pairs in flight",
                        driver.in_flight
                    )))
                }
            },
            _ = tokio::time::sleep_until(next_due.unwrap_or(window.end).into()), if next_due.is_some() => {
                driver.start_due().await?;
            }
        }
    }
    // Close our side and let the server finish its (it releases whatever the
    // stream still holds: nothing, here).
    let Driver { tx, tally, .. } = driver;
    drop(tx);
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Ok(Some(_)) = answers.message().await {}
    })
    .await;
    Ok(tally)
}
