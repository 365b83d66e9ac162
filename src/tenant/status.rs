//! The live state of a tenant's bucket instances, for Watch (only what
//! changed since a stream last looked) and ListBuckets. A per-client
//! bucket with no instance (before its first client; after its clients
//! were dropped for idleness) shows as one row marked `unused` with the
//! figures of a fresh instance, so it and an operator's pause of it are
//! seen.

use super::{Instance, TenantState};
use crate::config::Scope;
use std::collections::{BTreeMap, HashMap};
use tokio::time::Instant;

/// Live state of one bucket instance, for Watch and ListBuckets.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketStatus {
    /// Bucket name.
    pub bucket: String,
    /// Scope.
    pub scope: Scope,
    /// OAuth client of a per-client instance.
    pub oauth_client: Option<String>,
    /// Configured rate per minute (0 without a rate).
    pub configured_rate_per_min: f64,
    /// Effective rate per minute (0 without a rate).
    pub effective_rate_per_min: f64,
    /// Burst (0 without a rate).
    pub burst: u32,
    /// Permits available now.
    pub tokens_available: f64,
    /// Slots held.
    pub in_flight: u32,
    /// Of `in_flight`, slots counted as held by leases of the run before
    /// a restart after a crash (nobody known holds them): free again when
    /// renewals claim them or one lease TTL passes.
    pub held_over: u32,
    /// Slot limit (0 without one).
    pub max_in_flight: u32,
    /// Waiters per class.
    pub waiting: BTreeMap<String, u32>,
    /// Operator's reason, when the bucket is paused.
    pub paused: Option<String>,
    /// Permits granted.
    pub granted_total: u64,
    /// 429s reported.
    pub throttled_total: u64,
    /// Reports received.
    pub reports_total: u64,
    /// When the last report was received (`None`: none since this run
    /// began).
    pub last_report: Option<Instant>,
    /// Freezes after a 429.
    pub freezes_total: u64,
    /// Frozen until (after a reported 429).
    pub frozen_until: Option<Instant>,
    /// Limit learned from rate-limit headers, per minute.
    pub learned_limit_per_min: Option<f64>,
    /// 429 ratio over the ratio window.
    pub throttle_ratio: f64,
    /// The ratio backstop holds the rate until then.
    pub cooldown_until: Option<Instant>,
    /// What the upstream last said is left of its budget (until its reset);
    /// a continuous upstream bucket's level as followed since it said.
    pub upstream_remaining: Option<u32>,
    /// A per-client bucket with no instance: the row stands for the
    /// bucket, with a fresh instance's figures.
    pub unused: bool,
}

/// A reader's `seen` key for bucket `b`'s row while it has no instance
/// (instance keys are slab indexes, far below).
fn unused_key(b: usize) -> usize {
    usize::MAX - b
}

impl TenantState {
    /// Status of instances whose version is above what `seen` holds for
    /// them (all instances when `seen` is empty); updates `seen`.
    pub fn statuses_since(
        &self,
        seen: &mut HashMap<usize, u64>,
        now: Instant,
    ) -> Vec<BucketStatus> {
        let mut out = Vec::new();
        for (i, x) in &self.instances {
            let last = seen.get(&i).copied();
            if last.is_some_and(|v| v >= x.version) {
                continue;
            }
            seen.insert(i, x.version);
            out.push(self.status_of(x, now));
        }
        let unused: Vec<usize> = self.unused_buckets().collect();
        seen.retain(|&i, _| {
            self.instances.contains(i) || unused.iter().any(|&b| unused_key(b) == i)
        });
        for b in unused {
            let version = self.buckets[b].version;
            if seen.get(&unused_key(b)).is_some_and(|&v| v >= version) {
                continue;
            }
            seen.insert(unused_key(b), version);
            out.push(self.unused_status(b, now));
        }
        out
    }

    /// Status of every instance, and a row for each per-client bucket
    /// without one.
    pub fn statuses(&self, now: Instant) -> Vec<BucketStatus> {
        self.instances
            .iter()
            .map(|(_, x)| self.status_of(x, now))
            .chain(self.unused_buckets().map(|b| self.unused_status(b, now)))
            .collect()
    }

    /// The per-client buckets with no instance.
    fn unused_buckets(&self) -> impl Iterator<Item = usize> + '_ {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, def)| def.org.is_none() && def.per_client.is_empty())
            .map(|(b, _)| b)
    }

    /// The row of bucket `b` while it has no instance: a fresh instance's
    /// figures, marked `unused`.
    fn unused_status(&self, b: usize, now: Instant) -> BucketStatus {
        let fresh = Instance::new(b, &self.buckets[b].settings, None, now);
        BucketStatus {
            unused: true,
            ..self.status_of(&fresh, now)
        }
    }

    pub(super) fn status_of(&self, x: &Instance, now: Instant) -> BucketStatus {
        let now = now.max(self.latest);
        let settings = &self.buckets[x.bucket].settings;
        BucketStatus {
            bucket: settings.name.clone(),
            scope: settings.scope,
            oauth_client: x.oauth_client.as_deref().map(str::to_owned),
            configured_rate_per_min: settings.rate.map_or(0.0, |r| r.per_minute()),
            effective_rate_per_min: x.tokens.as_ref().map_or(0.0, |t| t.rate_per_min()),
            burst: x.tokens.as_ref().map_or(0, |t| t.burst()),
            tokens_available: x.tokens.as_ref().map_or(0.0, |t| t.available(now)),
            in_flight: x.slots.map_or(0, |s| s.in_flight()),
            held_over: x.phantom,
            max_in_flight: x.slots.map_or(0, |s| s.max()),
            waiting: x
                .waiting
                .iter()
                .filter_map(|(&k, &n)| Some((self.classes.get(k)?.name.clone(), n)))
                .collect(),
            paused: self.buckets[x.bucket].paused.clone(),
            granted_total: x.granted_total,
            throttled_total: x.throttled_total,
            reports_total: x.reports_total,
            last_report: x.last_report,
            freezes_total: x.freezes_total,
            frozen_until: x.learner.frozen_until(now),
            learned_limit_per_min: x.learner.learned_limit(),
            throttle_ratio: x.learner.throttle_ratio(now, &self.learning),
            cooldown_until: x.learner.cooldown_until(now),
            upstream_remaining: x.upstream.and_then(|u| u.remaining(now)).or_else(|| {
                x.kept
                    .as_ref()
                    .map(|k| k.view.available(now).floor() as u32)
            }),
            unused: false,
        }
    }

    /// Waiters in the queue.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// Leases holding slots.
    pub fn leases_held(&self) -> usize {
        self.leases.len()
    }
}

#[cfg(test)]
impl BucketStatus {
    /// An org-wide bucket at 60 a minute, burst 60, nothing counted or
    /// learned: for tests to change what they look at.
    pub(crate) fn sample(bucket: &str) -> BucketStatus {
        BucketStatus {
            bucket: bucket.into(),
            scope: crate::config::Scope::Org,
            oauth_client: None,
            configured_rate_per_min: 60.0,
            effective_rate_per_min: 60.0,
            burst: 60,
            tokens_available: 0.0,
            in_flight: 0,
            held_over: 0,
            max_in_flight: 0,
            waiting: Default::default(),
            paused: None,
            granted_total: 0,
            throttled_total: 0,
            reports_total: 0,
            last_report: None,
            freezes_total: 0,
            frozen_until: None,
            learned_limit_per_min: None,
            throttle_ratio: 0.0,
            cooldown_until: None,
            upstream_remaining: None,
            unused: false,
        }
    }
}
