//! Broker mode's trace of what the broker believed: its analytics bucket
//! (`ListBuckets`) sampled every few simulated seconds while the fleet runs,
//! rates converted to permits per simulated window. It is how a missed
//! target is diagnosed (when did it learn the hidden limit, how long did
//! freezes last), and goes into the JSON output only.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::ListBucketsRequest;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Endpoint;

use crate::clock::SimClock;
use crate::confgen::{ANALYTICS, ORG, WINDOW_MS};

/// Sampling period, simulated ms.
const EVERY_MS: f64 = 5_000.0;

/// One sample of the broker's analytics bucket.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Sample {
    /// Simulated time.
    pub(crate) sim_ms: f64,
    /// Effective rate, permits per simulated window.
    pub(crate) effective: f64,
    /// Learned limit, permits per simulated window (0: none).
    pub(crate) learned_limit: f64,
    /// Tokens in the bucket.
    pub(crate) tokens: f64,
    /// Slots held.
    pub(crate) in_flight: u32,
    /// Simulated ms the bucket stays frozen (0: not frozen).
    pub(crate) frozen_for_ms: f64,
    /// Grants so far.
    pub(crate) granted_total: u64,
    /// 429s reported so far.
    pub(crate) throttled_total: u64,
    /// 429 ratio over the broker's ratio window.
    pub(crate) throttle_ratio: f64,
    /// What the upstream's headers last said is left (-1: unknown).
    pub(crate) upstream_remaining: i64,
}

/// A running sampler.
pub(crate) struct Tracer {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Vec<Sample>>,
}

impl Tracer {
    /// Starts sampling the broker at `addr`.
    pub(crate) fn start(addr: SocketAddr, clock: SimClock) -> Tracer {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let Ok(endpoint) = Endpoint::from_shared(format!("http://{addr}")) else {
                return samples;
            };
            let mut admin = QuotaAdminClient::new(endpoint.connect_lazy());
            let mut next = clock.now_ms();
            loop {
                tokio::select! {
                    _ = &mut stopped => return samples,
                    _ = clock.sleep_until(next) => {}
                }
                next += EVERY_MS;
                let req = ListBucketsRequest {
                    tenant: ORG.to_owned(),
                };
                let Ok(resp) = admin.list_buckets(req).await else {
                    continue;
                };
                let now_unix_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or(Duration::ZERO)
                    .as_millis() as f64;
                // Per real minute → per simulated window.
                let per_window = |per_min: f64| {
                    per_min / 60.0 / clock.sim_ms(Duration::from_secs(1)) * WINDOW_MS as f64
                };
                if let Some(b) = resp
                    .into_inner()
                    .buckets
                    .iter()
                    .find(|b| b.bucket == ANALYTICS)
                {
                    let frozen_real_ms = (b.frozen_until_ms as f64 - now_unix_ms).max(0.0);
                    samples.push(Sample {
                        sim_ms: clock.now_ms(),
                        effective: per_window(b.effective_rate_per_min),
                        learned_limit: per_window(b.learned_limit_per_min),
                        tokens: b.tokens_available,
                        in_flight: b.in_flight,
                        frozen_for_ms: clock
                            .sim_ms(Duration::from_secs_f64(frozen_real_ms / 1000.0)),
                        granted_total: b.granted_total,
                        throttled_total: b.throttled_total,
                        throttle_ratio: b.throttle_ratio,
                        upstream_remaining: b.upstream_remaining,
                    });
                }
            }
        });
        Tracer { stop, task }
    }

    /// Stops sampling; the samples taken.
    pub(crate) async fn finish(self) -> Vec<Sample> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}
