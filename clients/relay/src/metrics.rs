//! The relay's Prometheus metrics: intake outcomes and ack latency, drain
//! outcomes and the upstream's client errors (counted as they happen), and the queue's depth, oldest age,
//! drain rate, dead letters, the oldest one's age and the records held
//! behind them (read from the queue at each scrape, so
//! several relays on one PostgreSQL queue all show the shared figures).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::queue::Depth;

/// One label: an outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabel {
    /// The outcome's name.
    pub(crate) outcome: &'static str,
}

/// The metrics (cheap to clone: each metric is an `Arc` inside).
#[derive(Clone)]
pub(crate) struct Metrics {
    /// Intake answers by outcome: accepted, duplicate, full, invalid,
    /// unauthorized, unavailable.
    pub(crate) intake: Family<OutcomeLabel, Counter>,
    /// Seconds from a request's arrival to its 202 (fsync included).
    pub(crate) ack_seconds: Histogram,
    /// Drain outcomes: delivered, retried, dead.
    pub(crate) drained: Family<OutcomeLabel, Counter>,
    /// The upstream's 4xx answers (other than 429) a delivery ended with:
    /// client errors. A 401 the call was made again after, with a new
    /// token, is not one (the upstream client counts every 4xx it got).
    pub(crate) client_4xx: Counter,
    depth: Gauge,
    inflight: Gauge,
    bytes: Gauge,
    oldest: Gauge<f64, AtomicU64>,
    dead: Gauge,
    oldest_dead: Gauge<f64, AtomicU64>,
    blocked: Gauge,
    rate: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            intake: Family::default(),
            // 0.25 ms .. ~2 s.
            ack_seconds: Histogram::new(exponential_buckets(0.00025, 2.0, 14)),
            drained: Family::default(),
            client_4xx: Counter::default(),
            depth: Gauge::default(),
            inflight: Gauge::default(),
            bytes: Gauge::default(),
            oldest: Gauge::default(),
            dead: Gauge::default(),
            oldest_dead: Gauge::default(),
            blocked: Gauge::default(),
            rate: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Counts one intake answer.
    pub(crate) fn intake(&self, outcome: &'static str) {
        self.intake.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Counts one drain outcome.
    pub(crate) fn drained(&self, outcome: &'static str) {
        self.drained.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// The text exposition, with the queue's figures `depth`.
    pub(crate) fn encode(&self, depth: &Depth) -> String {
        self.depth.set(depth.records);
        self.inflight.set(depth.inflight);
        self.bytes.set(depth.bytes);
        self.oldest.set(depth.oldest_age_s);
        self.dead.set(depth.dead);
        self.oldest_dead.set(depth.oldest_dead_age_s);
        self.blocked.set(depth.blocked);
        self.rate.set(depth.done_last_minute as f64 / 60.0);
        let mut registry = Registry::with_prefix("gc_relay");
        let m = self.clone();
        registry.register("intake_requests", "Intake answers by outcome", m.intake);
        registry.register(
            "ack_seconds",
            "Seconds from an intake request's arrival to its durable answer",
            m.ack_seconds,
        );
        registry.register("drained_records", "Drain outcomes", m.drained);
        registry.register(
            "upstream_client_4xx",
            "Deliveries the upstream answered with a 4xx other than 429 (a 401 answered \
             again after a new login is not counted)",
            m.client_4xx,
        );
        registry.register("queue_depth", "Records pending or in flight", m.depth);
        registry.register("queue_inflight", "Records in flight", m.inflight);
        registry.register(
            "queue_bytes",
            "Bytes of the records pending or in flight",
            m.bytes,
        );
        registry.register(
            "oldest_record_age_seconds",
            "Age of the oldest record pending or in flight",
            m.oldest,
        );
        registry.register("dead_letters", "Records in the dead-letter table", m.dead);
        registry.register(
            "oldest_dead_letter_age_seconds",
            "Age of the oldest dead letter",
            m.oldest_dead,
        );
        registry.register(
            "blocked_records",
            "Records pending behind a dead letter of their order key",
            m.blocked,
        );
        registry.register(
            "drain_rate",
            "Records delivered per second over the last minute",
            m.rate,
        );
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}
