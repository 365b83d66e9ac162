//! The dashboard's memory: what each bucket instance showed over the last
//! [`WINDOW`], so a page opened (a wallboard switched on, a tab reloaded)
//! draws the last minutes at once instead of starting empty.
//!
//! Every [`STEP`], and when a page opens (at most every [`OPEN_SAMPLE`]), a
//! sampler reads the broker's change counter; when it moved, it reads the
//! instances that changed (as Watch does) and gives each the point of the
//! current step (steps counted from the sampler's start, so a point stands
//! for the last state of its step). Nothing is read when nothing changed,
//! and nothing is added on the request path. Instances the broker no longer
//! has are forgotten within [`PRUNE`] (a tenant led elsewhere now, a bucket
//! gone), except a per-client bucket's: an idle OAuth client's instance is
//! dropped and re-created on its next call, and its points stay part of
//! the bucket's last minutes until they age out. A page is sent the
//! instances that exist as it opens, and a per-client bucket's others. Memory is bounded: [`WINDOW`] / [`STEP`] points per instance, at
//! most [`MAX_INSTANCES`] instances (later ones get no history until room
//! is made: evicting the quietest on every new one would thrash).

use crate::broker::{Broker, TenantBucketStatus};
use crate::config::Scope;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How far back the dashboard's charts reach (its `WINDOW_MS`).
pub(crate) const WINDOW: Duration = Duration::from_secs(5 * 60);
/// At most one point per instance this often.
pub(crate) const STEP: Duration = Duration::from_secs(2);
/// Instances remembered at most (per-client buckets can make many).
pub(crate) const MAX_INSTANCES: usize = 2_000;
/// A page opening samples first unless a sample was read this recently
/// (pages opening together share one).
pub(crate) const OPEN_SAMPLE: Duration = Duration::from_millis(500);
/// Instances the broker no longer has are forgotten this often.
pub(crate) const PRUNE: Duration = Duration::from_secs(60);

/// One instance at one time: what the dashboard charts and counts.
#[derive(Debug, Clone, Copy)]
struct Point {
    /// Its step (since the sampler started).
    step: u64,
    /// When its figures were read.
    at: Instant,
    effective_per_min: f64,
    configured_per_min: f64,
    granted_total: u64,
    throttled_total: u64,
    in_flight: u32,
    max_in_flight: u32,
    paused: bool,
}

/// Tenant, bucket, OAuth client ("" for a shared bucket).
pub(crate) type Key = (String, String, String);

/// One instance's points, oldest first.
#[derive(Debug)]
struct Ring {
    /// "org" or "oauth_client" (the page groups per-client instances).
    scope: &'static str,
    points: VecDeque<Point>,
}

/// The last [`WINDOW`] of every instance seen.
#[derive(Debug)]
pub(crate) struct History {
    /// std `Mutex`: never held across `.await`.
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Where step 0 begins.
    start: Instant,
    rings: HashMap<Key, Ring>,
    /// What the last sample read of each tenant (see `Broker::changed_since`).
    seen: crate::broker::Seen,
    /// The broker's change counter at the last sample.
    version: Option<u64>,
    /// When a sample last read the broker.
    read_at: Option<Instant>,
    /// When instances the broker no longer has were last forgotten.
    pruned_at: Instant,
}

/// One instance's points, oldest first, as the event feed sends them.
#[derive(Debug)]
pub(crate) struct Series {
    tenant: String,
    bucket: String,
    oauth_client: String,
    scope: &'static str,
    /// The broker no longer has it (an idle OAuth client's instance it
    /// dropped): the page counts it only up to its last point.
    dropped: bool,
    points: Vec<Point>,
}

impl History {
    pub(crate) fn new(start: Instant) -> History {
        History {
            inner: Mutex::new(Inner {
                start,
                rings: HashMap::new(),
                seen: HashMap::new(),
                version: None,
                read_at: None,
                pruned_at: start,
            }),
        }
    }

    /// Samples `broker` every [`STEP`] until `stop` is cancelled.
    pub(crate) fn spawn(broker: Broker, stop: CancellationToken) -> std::sync::Arc<History> {
        let history = std::sync::Arc::new(History::new(Instant::now()));
        let h = history.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(STEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                h.sample(&broker, false);
            }
        });
        history
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // What a panicked sample left is still points in order.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a point to each instance of `broker` that changed since the
    /// last sample (for a page opening: unless one was read within
    /// [`OPEN_SAMPLE`]).
    pub(crate) fn sample(&self, broker: &Broker, page_opening: bool) {
        let mut inner = self.lock();
        let now = Instant::now();
        if now >= inner.pruned_at + PRUNE {
            inner.pruned_at = now;
            let live: HashSet<Key> = broker
                .list(None, |_| true)
                .unwrap_or_default()
                .into_iter()
                .map(|s| key_of(&s))
                .collect();
            inner.rings.retain(|k, ring| {
                live.contains(k)
                    || (ring.scope == Scope::OauthClient.as_str()
                        && ring.points.back().is_some_and(|p| p.at + WINDOW > now))
            });
        }
        if page_opening && inner.read_at.is_some_and(|at| at + OPEN_SAMPLE > now) {
            return;
        }
        let version = broker.change_version();
        if inner.version == Some(version) {
            return;
        }
        inner.version = Some(version);
        inner.read_at = Some(now);
        let inner = &mut *inner;
        let batch = broker.changed_since(&mut inner.seen);
        record(inner.start, &mut inner.rings, &batch);
    }

    /// The instances in `live`, and the dropped ones of per-client buckets
    /// with an instance in `live` (marked so), in key order, each with its points of the last
    /// [`WINDOW`] before `now` and the one before them (where its line
    /// starts).
    pub(crate) fn series(&self, live: &HashSet<Key>, now: Instant) -> Vec<Series> {
        let buckets: HashSet<(&str, &str)> = live
            .iter()
            .map(|(t, b, _)| (t.as_str(), b.as_str()))
            .collect();
        let inner = self.lock();
        let mut out: Vec<Series> = inner
            .rings
            .iter()
            .filter(|(k, ring)| {
                live.contains(*k)
                    || (ring.scope == Scope::OauthClient.as_str()
                        && buckets.contains(&(k.0.as_str(), k.1.as_str()))
                        && ring.points.back().is_some_and(|p| p.at + WINDOW > now))
            })
            .map(|(key, ring)| {
                let (tenant, bucket, oauth_client) = key;
                let inside = ring
                    .points
                    .iter()
                    .position(|p| p.at + WINDOW > now)
                    .unwrap_or(ring.points.len());
                Series {
                    tenant: tenant.clone(),
                    bucket: bucket.clone(),
                    oauth_client: oauth_client.clone(),
                    scope: ring.scope,
                    dropped: !live.contains(key),
                    points: ring
                        .points
                        .iter()
                        .skip(inside.saturating_sub(1))
                        .copied()
                        .collect(),
                }
            })
            .collect();
        out.sort_unstable_by(|a, b| {
            (&a.tenant, &a.bucket, &a.oauth_client).cmp(&(&b.tenant, &b.bucket, &b.oauth_client))
        });
        out
    }
}

/// The instance a status is of.
pub(crate) fn key_of(s: &TenantBucketStatus) -> Key {
    (
        s.tenant.clone(),
        s.status.bucket.clone(),
        s.status.oauth_client.clone().unwrap_or_default(),
    )
}

/// Gives each status the point of its step.
fn record(start: Instant, rings: &mut HashMap<Key, Ring>, batch: &[TenantBucketStatus]) {
    for s in batch {
        let b = &s.status;
        let key = key_of(s);
        if !rings.contains_key(&key) && rings.len() >= MAX_INSTANCES {
            continue;
        }
        let ring = &mut rings
            .entry(key)
            .or_insert_with(|| Ring {
                scope: b.scope.as_str(),
                points: VecDeque::new(),
            })
            .points;
        let step =
            u64::try_from(s.at.saturating_duration_since(start).as_nanos() / STEP.as_nanos())
                .unwrap_or(u64::MAX);
        if ring.back().is_some_and(|last| last.step == step) {
            ring.pop_back();
        }
        ring.push_back(Point {
            step,
            at: s.at,
            effective_per_min: b.effective_rate_per_min,
            configured_per_min: b.configured_rate_per_min,
            granted_total: b.granted_total,
            throttled_total: b.throttled_total,
            in_flight: b.in_flight,
            max_in_flight: b.max_in_flight,
            paused: b.paused.is_some(),
        });
        // One point from before the window stays: where the line starts.
        while ring.len() > 1 && ring[1].at + WINDOW <= s.at {
            ring.pop_front();
        }
    }
}

impl Series {
    /// The event's JSON: each point as `[ms ago, effective per min,
    /// configured per min, granted total, 429s total, in flight, max in
    /// flight, paused (1 or 0)]`, times relative to `now` so the page needs
    /// no clock in sync; `dropped` when the broker no longer has it.
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
                    u8::from(p.paused),
                ])
            })
            .collect();
        serde_json::json!({
            "tenant": self.tenant,
            "bucket": self.bucket,
            "oauth_client": self.oauth_client,
            "scope": self.scope,
            "dropped": self.dropped,
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
                granted_total: granted,
                ..BucketStatus::sample(bucket)
            },
        }
    }

    impl History {
        fn record(&self, batch: &[TenantBucketStatus]) {
            let mut inner = self.lock();
            let start = inner.start;
            record(start, &mut inner.rings, batch);
        }

        fn all(&self, now: Instant) -> Vec<Series> {
            let keys: HashSet<Key> = self.lock().rings.keys().cloned().collect();
            self.series(&keys, now)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_the_window_and_one_point_before_it_one_point_a_step() {
        let t0 = Instant::now();
        let h = History::new(t0);
        for i in 0..200u32 {
            // Late by up to half a step, as a busy sampler may be...
            let late = Duration::from_millis(u64::from(i % 7) * 130);
            h.record(&[status("t", "b", t0 + STEP * i + late, i.into())]);
            // ...and a page opened within the step: the step's point is
            // updated, not added.
            h.record(&[status("t", "b", t0 + STEP * i + STEP * 9 / 10, i.into())]);
        }
        let last = t0 + STEP * 199 + STEP * 9 / 10;
        let series = h.all(last);
        assert_eq!(series.len(), 1);
        let points = &series[0].points;
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
        // Sent later, after the instance went quiet: only the window, and
        // the point where its line starts.
        let quiet = h.all(last + WINDOW + STEP * 10);
        assert_eq!(quiet[0].points.len(), 1);
        assert_eq!(quiet[0].points[0].granted_total, 199);
    }

    #[tokio::test(start_paused = true)]
    async fn beyond_the_cap_new_instances_wait_and_only_live_ones_are_sent() {
        let t0 = Instant::now();
        let h = History::new(t0);
        for i in 0..MAX_INSTANCES {
            h.record(&[status("t", &format!("b{i:05}"), t0, 0)]);
        }
        h.record(&[status("u", "new", t0 + STEP, 0)]);
        let all = h.all(t0 + STEP);
        assert_eq!(all.len(), MAX_INSTANCES);
        assert!(!all.iter().any(|s| s.bucket == "new"));
        // Room made (as pruning does for instances the broker dropped).
        h.lock().rings.retain(|k, _| k.1 != "b00000");
        h.record(&[status("u", "new", t0 + STEP * 2, 0)]);
        let live: HashSet<Key> = [("u".into(), "new".into(), String::new())].into();
        let u = h.series(&live, t0 + STEP * 2);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].bucket, "new");
    }

    #[tokio::test(start_paused = true)]
    async fn a_per_client_buckets_dropped_instances_are_sent_marked_so() {
        let t0 = Instant::now();
        let h = History::new(t0);
        let client = |c: &str| TenantBucketStatus {
            tenant: "t".into(),
            at: t0,
            status: BucketStatus {
                scope: Scope::OauthClient,
                oauth_client: Some(c.into()),
                ..BucketStatus::sample("pc")
            },
        };
        h.record(&[client("a"), client("b")]);
        let live: HashSet<Key> = [("t".into(), "pc".into(), "b".into())].into();
        let sent: Vec<(String, bool)> = h
            .series(&live, t0 + STEP)
            .iter()
            .map(|s| (s.oauth_client.clone(), s.dropped))
            .collect();
        assert_eq!(sent, [("a".into(), true), ("b".into(), false)]);
        let json: serde_json::Value =
            serde_json::from_str(&h.series(&live, t0 + STEP)[0].to_json(t0 + STEP)).unwrap();
        assert_eq!(json["dropped"], true, "{json}");
    }
}
