//! Counters and histograms for the metrics every call touches, kept in one
//! shard per thread and summed when scraped.
//!
//! prometheus-client's `Histogram` takes a mutex on every observation and
//! its `Counter` is one atomic, both shared by every worker thread: with
//! two workers serving calls at once, each observation moves the cache line
//! from the other core (the broker spent several µs more per call with
//! metrics on than off when its workers ran in parallel, and about the same
//! when they shared one core). prometheus-client has no per-thread
//! variant, so these are written here: a thread keeps to its own shard,
//! each on its own cache line, and a scrape adds the shards up. They encode
//! exactly as the crate's own types do.

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Shards per metric: more than the worker threads of a small machine;
/// threads beyond it share shards (still correct, only contended).
const SHARDS: usize = 8;

/// This thread's shard.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// A value on a cache line of its own.
#[derive(Default)]
#[repr(align(128))]
struct Padded<T>(T);

/// A monotonic counter (a `_total` series), sharded per thread.
#[derive(Clone, Default)]
pub(crate) struct ShardedCounter {
    shards: Arc<[Padded<AtomicU64>; SHARDS]>,
}

impl ShardedCounter {
    /// Adds one.
    pub(crate) fn inc(&self) {
        self.shards[shard()].0.fetch_add(1, Ordering::Relaxed);
    }

    /// The sum over the shards.
    pub(crate) fn get(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

impl std::fmt::Debug for ShardedCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ShardedCounter").field(&self.get()).finish()
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One thread's observations: a count per bucket (the last is +Inf) and
/// the sum, as f64 bits.
struct HistogramShard {
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

/// A histogram with fixed upper bounds, sharded per thread.
#[derive(Clone)]
pub(crate) struct ShardedHistogram {
    inner: Arc<HistogramInner>,
}

struct HistogramInner {
    /// Finite upper bounds, ascending.
    bounds: Box<[f64]>,
    shards: Box<[Padded<HistogramShard>]>,
}

impl ShardedHistogram {
    /// A histogram with these upper bounds (ascending; +Inf is added).
    pub(crate) fn new(bounds: impl IntoIterator<Item = f64>) -> ShardedHistogram {
        let bounds: Box<[f64]> = bounds.into_iter().filter(|b| b.is_finite()).collect();
        let shards = (0..SHARDS)
            .map(|_| {
                Padded(HistogramShard {
                    counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                    sum: AtomicU64::new(0f64.to_bits()),
                })
            })
            .collect();
        ShardedHistogram {
            inner: Arc::new(HistogramInner { bounds, shards }),
        }
    }

    /// Records `v`.
    pub(crate) fn observe(&self, v: f64) {
        let inner = &*self.inner;
        let bucket = inner
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(inner.bounds.len());
        let shard = &inner.shards[shard()].0;
        if let Some(c) = shard.counts.get(bucket) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        // Only this thread writes this shard's sum, bar threads beyond
        // SHARDS: the loop runs once unless two share it.
        let _ = shard
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    /// Sum, count and per-bucket counts (upper bound, count in it) over
    /// the shards.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let inner = &*self.inner;
        let mut buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .map(|b| (b, 0))
            .collect();
        let mut sum = 0.0;
        for shard in inner.shards.iter() {
            sum += f64::from_bits(shard.0.sum.load(Ordering::Relaxed));
            for (b, c) in buckets.iter_mut().zip(shard.0.counts.iter()) {
                b.1 += c.load(Ordering::Relaxed);
            }
        }
        let count = buckets.iter().map(|b| b.1).sum();
        (sum, count, buckets)
    }
}

impl std::fmt::Debug for ShardedHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (sum, count, _) = self.snapshot();
        f.debug_struct("ShardedHistogram")
            .field("sum", &sum)
            .field("count", &count)
            .finish_non_exhaustive()
    }
}

impl TypedMetric for ShardedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ShardedHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    fn text(registry: &Registry) -> String {
        let mut s = String::new();
        encode(&mut s, registry).unwrap();
        s
    }

    /// Observations from several threads, encoded as the crate's own types
    /// encode the same observations.
    #[test]
    fn encodes_as_the_crates_own_types() {
        let bounds = [0.001, 0.01, 0.1, 1.0];
        // Binary fractions, so the sums are exact in any order.
        let values = [0.000_976_562_5, 0.007_812_5, 0.0625, 0.5, 1.0, 3.0, 7.5];
        let (ours, theirs) = (ShardedHistogram::new(bounds), Histogram::new(bounds));
        let (our_count, their_count) = (ShardedCounter::default(), Counter::<u64>::default());
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for v in values {
                        ours.observe(v);
                        our_count.inc();
                    }
                });
            }
        });
        for _ in 0..4 {
            for v in values {
                theirs.observe(v);
                their_count.inc();
            }
        }
        let mut a = Registry::default();
        a.register("h", "latency", ours);
        a.register("c", "calls", our_count);
        let mut b = Registry::default();
        b.register("h", "latency", theirs);
        b.register("c", "calls", their_count);
        assert_eq!(text(&a), text(&b));
        assert!(
            text(&a).contains("h_bucket{le=\"+Inf\"} 28"),
            "{}",
            text(&a)
        );
    }
}
