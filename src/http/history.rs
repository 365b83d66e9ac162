//! The dashboard's memory: what each bucket instance showed over the last
//! [`WINDOW`], so a page opened (a wallboard switched on, a tab reloaded)
//! draws the last minutes at once instead of starting empty.
//!
//! Every [`STEP`], and when a page opens, a sampler reads the broker's
//! change counter; when it moved, it reads the instances that changed (as
//! Watch does) and adds a point to each (or updates the instance's last
//! point, if that began less than [`STEP`] before: a point stands for the
//! last state of its step). Nothing is read when nothing changed, and nothing
//! is added on the request path. Memory is bounded: [`WINDOW`] / [`STEP`]
//! points per instance, at most [`MAX_INSTANCES`] instances (those quiet
//! longest are forgotten first).

use crate::broker::{Broker, TenantBucketStatus};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How far back the dashboard's charts reach (its `WINDOW_MS`).
pub(crate) const WINDOW: Duration = Duration::from_secs(5 * 60);
/// At most one point per instance this often.
pub(crate) const STEP: Duration = Duration::from_secs(2);
/// Instances remembered at most (per-client buckets can make many).
pub(crate) const MAX_INSTANCES: usize = 2_000;

/// One instance at one time: what the dashboard charts and counts.
#[derive(Debug, Clone, Copy)]
struct Point {
    /// When its step began.
    from: Instant,
    /// When its figures were read.
    at: Instant,
    effective_per_min: f64,
    configured_per_min: f64,
    granted_total: u64,
    throttled_total: u64,
    in_flight: u32,
    max_in_flight: u32,
}

/// Tenant, bucket, OAuth client ("" for a shared bucket).
type Key = (String, String, String);

/// One instance's points, oldest first.
#[derive(Debug)]
struct Ring {
    /// "org" or "oauth_client" (the page groups per-client instances).
    scope: &'static str,
    points: VecDeque<Point>,
}

/// The last [`WINDOW`] of every instance seen.
#[derive(Debug, Default)]
pub(crate) struct History {
    /// std `Mutex`: never held across `.await`.
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    rings: HashMap<Key, Ring>,
    /// What the last sample read of each tenant (see `Broker::changed_since`).
    seen: HashMap<usize, HashMap<usize, u64>>,
    /// The broker's change counter at the last sample.
    version: Option<u64>,
}

/// One instance's points, oldest first, as the event feed sends them.
#[derive(Debug)]
pub(crate) struct Series {
    pub tenant: String,
    pub bucket: String,
    pub oauth_client: String,
    scope: &'static str,
    points: Vec<Point>,
}

impl History {
    /// Samples `broker` every [`STEP`] until `stop` is cancelled.
    pub(crate) fn spawn(broker: Broker, stop: CancellationToken) -> std::sync::Arc<History> {
        let history = std::sync::Arc::new(History::default());
        let h = history.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(STEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                h.sample(&broker);
            }
        });
        history
    }

    /// Adds a point to each instance of `broker` that changed since the
    /// last sample.
    pub(crate) fn sample(&self, broker: &Broker) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let version = broker.change_version();
        if inner.version == Some(version) {
            return;
        }
        inner.version = Some(version);
        let batch = broker.changed_since(&mut inner.seen);
        record(&mut inner.rings, &batch);
    }

    /// Every instance of the tenants `shows` accepts, in key order.
    pub(crate) fn series(&self, shows: impl Fn(&str) -> bool) -> Vec<Series> {
        let Ok(inner) = self.inner.lock() else {
            return Vec::new();
        };
        let mut out: Vec<Series> = inner
            .rings
            .iter()
            .filter(|((tenant, _, _), _)| shows(tenant))
            .map(|((tenant, bucket, oauth_client), ring)| Series {
                tenant: tenant.clone(),
                bucket: bucket.clone(),
                oauth_client: oauth_client.clone(),
                scope: ring.scope,
                points: ring.points.iter().copied().collect(),
            })
            .collect();
        out.sort_unstable_by(|a, b| {
            (&a.tenant, &a.bucket, &a.oauth_client).cmp(&(&b.tenant, &b.bucket, &b.oauth_client))
        });
        out
    }
}

/// Adds a point per status.
fn record(rings: &mut HashMap<Key, Ring>, batch: &[TenantBucketStatus]) {
    for s in batch {
        let b = &s.status;
        let key = (
            s.tenant.clone(),
            b.bucket.clone(),
            b.oauth_client.clone().unwrap_or_default(),
        );
        if !rings.contains_key(&key) && rings.len() >= MAX_INSTANCES {
            forget_the_quietest(rings);
        }
        let ring = &mut rings
            .entry(key)
            .or_insert_with(|| Ring {
                scope: b.scope.as_str(),
                points: VecDeque::new(),
            })
            .points;
        let from = match ring.back() {
            // (A page opened within the step.)
            Some(last) if last.from + STEP > s.at => {
                let from = last.from;
                ring.pop_back();
                from
            }
            _ => s.at,
        };
        ring.push_back(Point {
            from,
            at: s.at,
            effective_per_min: b.effective_rate_per_min,
            configured_per_min: b.configured_rate_per_min,
            granted_total: b.granted_total,
            throttled_total: b.throttled_total,
            in_flight: b.in_flight,
            max_in_flight: b.max_in_flight,
        });
        // One point from before the window stays: where the line starts.
        while ring.len() > 1 && ring[1].at + WINDOW <= s.at {
            ring.pop_front();
        }
    }
}

/// Drops the instance whose last point is the oldest.
fn forget_the_quietest(rings: &mut HashMap<Key, Ring>) {
    let quietest = rings
        .iter()
        .min_by_key(|(_, ring)| ring.points.back().map(|p| p.at))
        .map(|(k, _)| k.clone());
    if let Some(k) = quietest {
        rings.remove(&k);
    }
}

impl Series {
    /// The event's JSON: each point as `[ms ago, effective per min,
    /// configured per min, granted total, 429s total, in flight, max in
    /// flight]`, times relative to `now` so the page needs no clock in sync.
    pub(crate) fn to_json(&self, now: Instant) -> String {
        let points: Vec<serde_json::Value> = self
            .points
            .iter()
            .map(|p| {
                serde_json::json!([
                    crate::clock::millis(now.saturating_duration_since(p.at)),
                    p.effective_per_min,
                    p.configured_per_min,
                    p.granted_total,
                    p.throttled_total,
                    p.in_flight,
                    p.max_in_flight,
                ])
            })
            .collect();
        serde_json::json!({
            "tenant": self.tenant,
            "bucket": self.bucket,
            "oauth_client": self.oauth_client,
            "scope": self.scope,
            "points": points,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::BucketStatus;

    fn status(tenant: &str, bucket: &str, at: Instant, granted: u64) -> TenantBucketStatus {
        TenantBucketStatus {
            tenant: tenant.into(),
            at,
            status: BucketStatus {
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
                granted_total: granted,
                throttled_total: 0,
                reports_total: 0,
                freezes_total: 0,
                frozen_until: None,
                learned_limit_per_min: None,
                throttle_ratio: 0.0,
                cooldown_until: None,
                upstream_remaining: None,
            },
        }
    }

    impl History {
        fn record(&self, batch: &[TenantBucketStatus]) {
            record(&mut self.inner.lock().unwrap().rings, batch);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_the_window_and_one_point_before_it() {
        let h = History::default();
        let t0 = Instant::now();
        for i in 0..200u64 {
            h.record(&[status("t", "b", t0 + STEP * i as u32, i)]);
            // A page opened within the step: the step's point is updated.
            h.record(&[status("t", "b", t0 + STEP * i as u32 + STEP / 2, i)]);
        }
        let series = h.series(|_| true);
        assert_eq!(series.len(), 1);
        let points = &series[0].points;
        let last = t0 + STEP * 199 + STEP / 2;
        assert_eq!(points.last().map(|p| p.granted_total), Some(199));
        assert!(
            points[0].at + WINDOW <= last,
            "the line starts before the window"
        );
        assert!(points[1].at + WINDOW > last, "nothing older is kept");
        assert_eq!(
            points.len(),
            (WINDOW.as_secs() / STEP.as_secs()) as usize + 1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn forgets_the_quietest_instance_beyond_the_cap_and_filters_tenants() {
        let h = History::default();
        let t0 = Instant::now();
        for i in 0..MAX_INSTANCES {
            h.record(&[status(
                "t",
                &format!("b{i:05}"),
                t0 + Duration::from_millis(i as u64 + 1),
                0,
            )]);
        }
        // b00000 is the quietest: a new instance takes its place.
        h.record(&[status("u", "new", t0 + STEP, 0)]);
        let all = h.series(|_| true);
        assert_eq!(all.len(), MAX_INSTANCES);
        assert!(!all.iter().any(|s| s.bucket == "b00000"));
        assert!(all.iter().any(|s| s.bucket == "b00001"));
        let u = h.series(|t| t == "u");
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].bucket, "new");
    }
}
