//! The "broker + relay" mode: as broker mode, but the trunks' wrap-up
//! writes are posted to gc-relay (in this process, on a SQLite queue in the
//! run's directory) the way an Architect flow's data action would, and the
//! relay drains them to the simulator leased by the same broker. A write's
//! wait is the agent's: until the relay's 202. After production the relay
//! gets the fleet's drain time to empty its queue; a record still in its
//! queue then is counted unfinished, not lost: the queue is on disk and
//! the relay's next start sends it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tokio::time::Instant;

use crate::children::WorkDir;
use crate::clock::SimClock;
use crate::confgen::{ORG, WINDOW_MS};
use crate::error::Error;
use crate::measure::Metrics;
use crate::modes::{CallFailed, Caller};
use crate::upstream::Answer;

/// Credentials the trunks' "data action" sends.
const USER: &str = "architect";
const PASSWORD: &str = "scenario";
/// The relay's OAuth client at the simulator (`<client>@<org>`).
const OAUTH_CLIENT: &str = "trunks-relay";
/// gcsim's default OAuth secret (also gc-ingest's, [`crate::ingest`]).
pub(crate) const OAUTH_SECRET: &str = "gcsim-secret";
/// Windows the relay gets to empty its queue after the fleet is done (as
/// the fleet's own drain).
const DRAIN_WINDOWS: f64 = 3.0;
/// Pause before posting again after a refusal (503) or a lost connection,
/// simulated ms.
const REPOST_MS: f64 = 1_000.0;

/// gc-relay running for one mode.
pub(crate) struct RelayServer {
    relay: gc_relay::RelayHandle,
    intake: RelayIntake,
}

/// Where the trunks post (cheap to clone).
#[derive(Clone)]
pub(crate) struct RelayIntake {
    http: reqwest::Client,
    url: String,
}

impl RelayServer {
    /// A relay for the simulator at `sim` through the broker at `broker`.
    pub(crate) async fn start(
        sim: SocketAddr,
        broker: &str,
        dir: &WorkDir,
    ) -> Result<RelayServer, Error> {
        let queue = dir.file("relay-queue.db");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", queue.display()));
        }
        let upstream = gc_relay::UpstreamSettings {
            region: format!("http://{sim}"),
            client_id: format!("{OAUTH_CLIENT}@{ORG}"),
            client_secret: OAUTH_SECRET.into(),
            broker: broker.into(),
            broker_token: None,
            tenant: ORG.into(),
        };
        let auth = gc_relay::Auth {
            basic: Some((USER.into(), PASSWORD.into())),
            secret: None,
        };
        let mut settings =
            gc_relay::Settings::new(&format!("sqlite:{}", queue.display()), upstream, auth);
        settings.name = "relay".into();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(Error::io("bind the relay's listener"))?;
        let relay = gc_relay::start(settings, listener).await?;
        let intake = RelayIntake {
            http: reqwest::Client::new(),
            url: format!("http://{}/records", relay.addr()),
        };
        Ok(RelayServer { relay, intake })
    }

    /// The trunks' side.
    pub(crate) fn intake(&self) -> RelayIntake {
        self.intake.clone()
    }

    /// Waits ([`DRAIN_WINDOWS`] at most) for the queue to empty, stops the
    /// relay, and counts its upstream requests as the fleet's writes.
    /// Returns the records still queued.
    pub(crate) async fn finish(self, clock: SimClock, metrics: &Metrics) -> u64 {
        let deadline = Instant::now() + clock.real(DRAIN_WINDOWS * WINDOW_MS as f64);
        let queue = self.relay.queue().clone();
        let empty = async {
            loop {
                if matches!(queue.depth().await, Ok(d) if d.records == 0) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout_at(deadline, empty).await.is_err() {
            tracing::warn!("the relay's queue did not empty by the drain deadline");
        }
        let queued = match queue.depth().await {
            Ok(d) => u64::try_from(d.records).unwrap_or(0),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the relay's queue depth");
                0
            }
        };
        let s = self.relay.upstream().stats();
        let w = &metrics.writes;
        w.sent.fetch_add(s.calls, Ordering::Relaxed);
        w.refused.fetch_add(s.throttled_429, Ordering::Relaxed);
        w.errors.fetch_add(
            s.client_4xx + s.server_5xx + s.transport_errors,
            Ordering::Relaxed,
        );
        self.relay.shutdown().await;
        queued
    }
}

impl Caller {
    /// Posts the write `POST path` to the relay until it answers 202 (a
    /// 503 or a lost connection is posted again: the key makes a repeat the
    /// same record); the wait is until that answer.
    pub(crate) async fn call_relay(
        &self,
        relay: &RelayIntake,
        path: &str,
        body: Bytes,
        wanted: Instant,
    ) -> Result<Answer, CallFailed> {
        let body: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| CallFailed::Rejected {
                status: 0,
                body: format!("the write's body is not JSON: {e}"),
            })?;
        let record = json!({
            "idempotencyKey": path,
            "method": "POST",
            "path": path,
            "body": body,
        });
        loop {
            let answer = relay
                .http
                .post(&relay.url)
                .basic_auth(USER, Some(PASSWORD))
                .json(&record)
                .send()
                .await;
            match answer {
                Ok(r) if r.status().as_u16() == 202 => {
                    self.done_at(wanted, Instant::now());
                    let headers = r.headers().clone();
                    return Ok(Answer {
                        status: 202,
                        headers,
                        body: r.bytes().await.unwrap_or_default(),
                    });
                }
                Ok(r) if r.status().as_u16() == 503 => {}
                Ok(r) => {
                    return Err(CallFailed::Rejected {
                        status: r.status().as_u16(),
                        body: r.text().await.unwrap_or_default(),
                    })
                }
                Err(e) => tracing::warn!(error = %e.without_url(), "relay unreachable"),
            }
            tokio::time::sleep(self.ctx.clock.real(REPOST_MS)).await;
        }
    }
}
