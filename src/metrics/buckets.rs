//! The bucket metrics, read at scrape time from the same snapshots as
//! ListBuckets: nothing on the request path. Instances of a per-OAuth-client
//! bucket are summed into their bucket (client ids are no labels). Every
//! configured bucket is exported, used or not: a per-client bucket with no
//! instance (before its first client; after its clients were dropped for
//! idleness) reads as one fresh instance, `instances` 0, so an operator's
//! pause of it shows, and its series do not come and go with its clients.

use super::Metrics;
use crate::broker::{Broker, BucketState, TenantBucketStatus};
use crate::config::Scope;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Reads every bucket of the broker on each scrape.
pub(crate) struct BucketCollector {
    broker: Broker,
    /// For the `class` labels of waiters, as the request-path metrics give
    /// them.
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for BucketCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketCollector").finish_non_exhaustive()
    }
}

impl BucketCollector {
    /// Collects `broker`'s buckets, labelling classes as `metrics` does.
    pub(crate) fn new(broker: Broker, metrics: Arc<Metrics>) -> BucketCollector {
        BucketCollector { broker, metrics }
    }
}

/// How recently a per-client instance must have had a report to count in
/// `effective_rate_lowest_share` (the sample alert's `for`).
const IN_USE_WITHIN: Duration = Duration::from_secs(15 * 60);

/// One bucket's figures, its instances summed.
#[derive(Default)]
struct Sum {
    /// A configured bucket of a tenant this broker leads (not one known
    /// only by the counts of its dropped instances).
    known: bool,
    instances: f64,
    grants: u64,
    throttled: u64,
    freezes: u64,
    configured: f64,
    effective: f64,
    /// The lowest effective / configured of the instances with a rate.
    lowest_share: Option<f64>,
    learned: Option<f64>,
    /// Some instance has a rate (a token bucket) / a slot limit: the
    /// gauges of a limit the bucket does not have are left out, not 0
    /// (which would read as exhausted).
    has_rate: bool,
    has_slots: bool,
    tokens: f64,
    in_flight: f64,
    held_over: f64,
    max_in_flight: f64,
    frozen: f64,
    freeze_left: f64,
    paused: f64,
    ratio: f64,
    waiting: BTreeMap<String, u32>,
}

impl Sum {
    fn add(&mut self, s: &TenantBucketStatus, now: Instant) {
        let b = &s.status;
        self.instances += 1.0;
        self.grants += b.granted_total;
        self.throttled += b.throttled_total;
        self.freezes += b.freezes_total;
        self.configured += b.configured_rate_per_min / 60.0;
        self.effective += b.effective_rate_per_min / 60.0;
        // A per-client instance counts while its client reports: one
        // that took a 429 and went quiet (or an OAuth client a Report
        // merely named) keeps its cut rate until the broker drops it, and
        // would hold the bucket's figure down for nobody.
        let in_use = b.scope == Scope::Org
            || b.last_report
                .is_some_and(|at| now.saturating_duration_since(at) <= IN_USE_WITHIN);
        if b.configured_rate_per_min > 0.0 && in_use {
            let share = b.effective_rate_per_min / b.configured_rate_per_min;
            self.lowest_share = Some(self.lowest_share.map_or(share, |l| l.min(share)));
        }
        if let Some(l) = b.learned_limit_per_min {
            *self.learned.get_or_insert(0.0) += l / 60.0;
        }
        self.tokens += b.tokens_available;
        self.has_rate |= b.burst > 0;
        self.has_slots |= b.max_in_flight > 0;
        self.in_flight += f64::from(b.in_flight);
        self.held_over += f64::from(b.held_over);
        self.max_in_flight += f64::from(b.max_in_flight);
        if let Some(until) = b.frozen_until.filter(|&u| u > now) {
            self.frozen = 1.0;
            self.freeze_left = self
                .freeze_left
                .max(until.saturating_duration_since(now).as_secs_f64());
        }
        if b.paused.is_some() {
            self.paused = 1.0;
        }
        self.ratio = self.ratio.max(b.throttle_ratio);
        for (class, n) in &b.waiting {
            *self.waiting.entry(class.clone()).or_default() += n;
        }
    }

    /// What holds for the bucket whatever its instances: the counts of its
    /// dropped ones, the pause; without an instance, the figures of a fresh
    /// one (what its next client gets, and what the bucket read before its
    /// last instance went: only an instance a fresh one would equal is
    /// dropped for idleness).
    fn bucket(&mut self, b: &BucketState) {
        self.known = true;
        self.grants += b.retired.granted;
        self.throttled += b.retired.throttled;
        self.freezes += b.retired.freezes;
        if b.paused {
            self.paused = 1.0;
        }
        if self.instances > 0.0 {
            return;
        }
        if let Some(rate) = b.rate {
            self.has_rate = true;
            self.configured = rate.per_minute() / 60.0;
            self.effective = self.configured;
            self.tokens = f64::from(rate.burst.get());
        }
        if b.max_in_flight > 0 {
            self.has_slots = true;
            self.max_in_flight = f64::from(b.max_in_flight);
        }
    }

    /// Waiters per `class` label, every label present (0 when nobody
    /// waits: a series that comes and goes reads as missing data); classes
    /// added at run time as `other`.
    fn waiting_by_label(&self, metrics: &Metrics) -> BTreeMap<String, u32> {
        let mut out: BTreeMap<String, u32> = metrics
            .class_labels()
            .iter()
            .map(|c| (c.clone(), 0))
            .collect();
        for (class, n) in &self.waiting {
            *out.entry(metrics.class_label(class).to_owned())
                .or_default() += n;
        }
        out
    }
}

type Key = (String, String);

fn gauges(
    encoder: &mut DescriptorEncoder<'_>,
    sums: &BTreeMap<Key, Sum>,
    name: &str,
    help: &str,
    value: impl Fn(&Sum) -> Option<f64>,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for ((tenant, bucket), sum) in sums.iter().filter(|(_, s)| s.known) {
        if let Some(v) = value(sum) {
            let labels = [("tenant", tenant.as_str()), ("bucket", bucket.as_str())];
            ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

fn counters(
    encoder: &mut DescriptorEncoder<'_>,
    sums: &BTreeMap<Key, Sum>,
    name: &str,
    help: &str,
    value: impl Fn(&Sum) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for ((tenant, bucket), sum) in sums {
        let labels = [("tenant", tenant.as_str()), ("bucket", bucket.as_str())];
        ConstCounter::new(value(sum)).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for BucketCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let now = Instant::now();
        let mut sums: BTreeMap<Key, Sum> = BTreeMap::new();
        let (list, buckets) = self.broker.list_with_buckets();
        // A per-client bucket's unused row stands for no instance: the
        // bucket's own state below gives its figures.
        for s in list.iter().filter(|s| !s.status.unused) {
            sums.entry((s.tenant.clone(), s.status.bucket.clone()))
                .or_default()
                .add(s, now);
        }
        // Dropped instances' counts stay in the totals: a counter that went
        // down would read as a reset, and `rate()` would count it all again.
        for b in &buckets {
            sums.entry((b.tenant.clone(), b.bucket.clone()))
                .or_default()
                .bucket(b);
        }
        let e = &mut encoder;
        counters(
            e,
            &sums,
            "bucket_grants",
            "Permits granted on the bucket",
            |s| s.grants,
        )?;
        counters(
            e,
            &sums,
            "throttled",
            "Reported 429s attributed to the bucket",
            |s| s.throttled,
        )?;
        counters(
            e,
            &sums,
            "freezes",
            "Times the bucket froze after a 429",
            |s| s.freezes,
        )?;
        gauges(
            e,
            &sums,
            "configured_rate_per_second",
            "The configured rate (0 without one; per-OAuth-client buckets: their instances summed)",
            |s| Some(s.configured),
        )?;
        gauges(
            e,
            &sums,
            "effective_rate_per_second",
            "The rate granted at after what was learned (nothing is granted while frozen or \
             paused; per-OAuth-client buckets: their instances summed)",
            |s| Some(s.effective),
        )?;
        gauges(
            e,
            &sums,
            "effective_rate_lowest_share",
            "Effective over configured rate of the bucket's most cut instance (per-OAuth-client \
             buckets: the OAuth client learning cut furthest of those that reported in the last \
             15 min; buckets with a rate)",
            |s| s.lowest_share,
        )?;
        gauges(
            e,
            &sums,
            "learned_rate_per_second",
            "The limit learned from the upstream's rate-limit headers (per-OAuth-client buckets: \
             their instances' summed)",
            |s| s.learned,
        )?;
        gauges(
            e,
            &sums,
            "tokens",
            "Permits available now (buckets with a rate; per-OAuth-client buckets: summed)",
            |s| s.has_rate.then_some(s.tokens),
        )?;
        gauges(
            e,
            &sums,
            "slots_in_flight",
            "Concurrency slots held (buckets with a slot limit; per-OAuth-client buckets: summed)",
            |s| s.has_slots.then_some(s.in_flight),
        )?;
        gauges(
            e,
            &sums,
            "slots_held_over",
            "Of the slots held, those counted for unknown leases of an earlier run (after a \
             crash), until renewals claim them or one lease TTL passes",
            |s| s.has_slots.then_some(s.held_over),
        )?;
        gauges(
            e,
            &sums,
            "slots_max",
            "Concurrency slot limit (buckets with one; per-OAuth-client buckets: summed)",
            |s| s.has_slots.then_some(s.max_in_flight),
        )?;
        gauges(
            e,
            &sums,
            "frozen",
            "1 while the bucket is frozen after a 429 (per-OAuth-client buckets: any of its clients)",
            |s| Some(s.frozen),
        )?;
        gauges(
            e,
            &sums,
            "freeze_remaining_seconds",
            "Time left of the bucket's freeze (per-OAuth-client buckets: the longest)",
            |s| Some(s.freeze_left),
        )?;
        gauges(
            e,
            &sums,
            "paused",
            "1 while an operator pauses the bucket",
            |s| Some(s.paused),
        )?;
        gauges(
            e,
            &sums,
            "throttle_ratio",
            "Share of reports that were 429s over the ratio window (per-OAuth-client buckets: the \
             highest of its clients')",
            |s| Some(s.ratio),
        )?;
        gauges(
            e,
            &sums,
            "instances",
            "Bucket instances (one per OAuth client seen for per-client buckets)",
            |s| Some(s.instances),
        )?;
        let mut m = e.encode_descriptor(
            "waiters",
            "Acquires waiting, per class",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for ((tenant, bucket), sum) in &sums {
            for (class, n) in &sum.waiting_by_label(&self.metrics) {
                let labels = [
                    ("tenant", tenant.as_str()),
                    ("bucket", bucket.as_str()),
                    ("class", class.as_str()),
                ];
                ConstGauge::new(i64::from(*n)).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = e.encode_descriptor(
            "leases_held",
            "Leases holding concurrency slots",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (tenant, held) in self.broker.leases_held() {
            ConstGauge::new(held as i64)
                .encode(m.encode_family(&[("tenant", tenant.as_str())])?)?;
        }
        ConstGauge::new(i64::from(self.broker.state_save_failing())).encode(
            e.encode_descriptor(
                "state_save_failing",
                "1 while the last write of learned state to server.state_dir failed",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?,
        )?;
        let (configured, led) = self.broker.tenants_led();
        ConstGauge::new(configured as i64).encode(e.encode_descriptor(
            "tenants",
            "Tenants configured",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?)?;
        ConstGauge::new(led as i64).encode(e.encode_descriptor(
            "tenants_led",
            "Tenants this broker grants for now (in a cluster: leads; all of them alone)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::BucketStatus;

    fn instance(scope: Scope, effective: f64, last_report: Option<Instant>) -> TenantBucketStatus {
        TenantBucketStatus {
            tenant: "t".into(),
            at: Instant::now(),
            status: BucketStatus {
                scope,
                oauth_client: (scope == Scope::OauthClient).then(|| "c".into()),
                effective_rate_per_min: effective,
                last_report,
                ..BucketStatus::sample("b")
            },
        }
    }

    /// A per-client bucket whose instances were all dropped reads as it did
    /// with its last one, which was as a fresh one (or it would not have
    /// been dropped), but for `instances`.
    #[tokio::test(start_paused = true)]
    async fn a_bucket_without_an_instance_reads_as_a_fresh_one() {
        let now = Instant::now();
        let per_minute = std::num::NonZeroU32::new(60).unwrap();
        let state = BucketState {
            tenant: "t".into(),
            bucket: "b".into(),
            rate: Some(crate::config::Rate {
                permits: per_minute,
                window: Duration::from_secs(60),
                burst: per_minute,
            }),
            max_in_flight: 2,
            paused: true,
            retired: crate::tenant::Retired {
                granted: 3,
                throttled: 1,
                freezes: 1,
            },
        };
        let mut last = instance(Scope::OauthClient, 60.0, None);
        last.status.tokens_available = 60.0;
        last.status.max_in_flight = 2;
        last.status.paused = Some("maintenance".into());
        let mut one = Sum::default();
        one.add(&last, now);
        one.bucket(&state);
        let mut none = Sum::default();
        none.bucket(&state);
        assert_eq!((one.instances, none.instances), (1.0, 0.0));
        let figures = |s: &Sum| {
            (
                (
                    s.configured,
                    s.effective,
                    s.tokens,
                    s.max_in_flight,
                    s.in_flight,
                ),
                (s.has_rate, s.has_slots, s.paused, s.frozen, s.lowest_share),
                (s.grants, s.throttled, s.freezes),
            )
        };
        assert_eq!(figures(&none), figures(&one));
        assert_eq!(figures(&none).2, (3, 1, 1));
        assert!(none.known);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_clients_cut_rate_does_not_count_as_the_buckets_lowest_share() {
        let reported = Instant::now();
        tokio::time::advance(IN_USE_WITHIN + Duration::from_secs(1)).await;
        let now = Instant::now();
        let lowest = |instances: &[TenantBucketStatus]| {
            let mut sum = Sum::default();
            for s in instances {
                sum.add(s, now);
            }
            sum.lowest_share
        };
        // A client cut to a fifth that has not reported since.
        let quiet = instance(Scope::OauthClient, 12.0, Some(reported));
        let busy = instance(Scope::OauthClient, 30.0, Some(now));
        assert_eq!(lowest(&[quiet.clone(), busy]), Some(0.5));
        assert_eq!(lowest(std::slice::from_ref(&quiet)), None);
        assert_eq!(lowest(&[instance(Scope::OauthClient, 12.0, None)]), None);
        // An org-wide bucket's cut rate is the next caller's, reports or not.
        assert_eq!(lowest(&[instance(Scope::Org, 12.0, None)]), Some(0.2));
    }
}
