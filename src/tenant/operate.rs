//! Operators' changes to a tenant's buckets: limits and pause, applied at
//! once to every instance and to the requests waiting on them.

use super::{BucketStatus, LimitChange, TenantState};
use crate::clock::millis;
use crate::config::{check_rate, BucketSettings};
use crate::error::BrokerError;
use crate::learning::{Learner, SlotLearner};
use crate::limits::{Slots, TokenBucket};
use std::time::Duration;
use tokio::time::Instant;

impl TenantState {
    /// Changes a bucket's configured limits (`None`/0 fields unchanged);
    /// applies at once to every instance and to waiting requests.
    pub fn set_bucket_limit(
        &mut self,
        bucket: &str,
        change: LimitChange,
        now: Instant,
    ) -> Result<&BucketSettings, BrokerError> {
        let now = self.monotonic(now);
        let b = self.bucket_index(bucket)?;
        let old = self.buckets[b].settings.clone();
        let bad = |field, problem: String| BrokerError::invalid(field, problem);
        let rate = match (change.permits, change.window, old.rate) {
            (None, None, r) => r.map(|r| (r.permits.get(), r.window, r.burst.get())),
            // A burst as large as the permits (the default when none is
            // given) follows them: lowering the permits of an upstream in
            // trouble must not leave the old window's worth as a burst.
            (p, w, Some(r)) => Some((
                p.unwrap_or(r.permits.get()),
                w.unwrap_or(r.window),
                r.burst_with_permits(p.unwrap_or(r.permits.get())),
            )),
            (Some(p), Some(w), None) => Some((p, w, p)),
            _ => {
                return Err(bad(
                    "permits",
                    format!("bucket {bucket:?} has no rate yet; give both permits and window_ms"),
                ))
            }
        }
        .map(|(p, w, burst)| (p, w, change.burst.unwrap_or(burst)));
        let rate = match rate {
            Some((p, w, burst)) => {
                // A burst that follows the permits is checked as not given,
                // so a refusal says so rather than naming a burst nobody set.
                let given = change.burst.or((burst != p).then_some(burst));
                Some(check_rate(p, millis(w), given).map_err(|found| {
                    let field = found.first().map_or("permits", |&(key, _)| key);
                    let problem = found
                        .iter()
                        .map(|(key, problem)| format!("{key} {problem}"))
                        .collect::<Vec<_>>()
                        .join("; ");
                    BrokerError::invalid(field, problem)
                })?)
            }
            None if change.burst.is_some() => {
                return Err(bad(
                    "burst",
                    format!("bucket {bucket:?} has no rate to burst"),
                ))
            }
            None => None,
        };
        let max_in_flight = match change.max_in_flight {
            Some(m) => std::num::NonZeroU32::new(m),
            None => old.max_in_flight,
        };
        self.apply_limits(b, rate, max_in_flight, now);
        Ok(&self.buckets[b].settings)
    }

    /// Puts a bucket's limits back to `configured` (the config file's),
    /// dropping what operators set: a rate or a slot limit the config does
    /// not have is removed. Applies at once to every instance and to the
    /// requests waiting on them; a pause stays as it is.
    pub fn reset_bucket_limit(
        &mut self,
        bucket: &str,
        configured: Option<&BucketSettings>,
        now: Instant,
    ) -> Result<&BucketSettings, BrokerError> {
        let now = self.monotonic(now);
        let b = self.bucket_index(bucket)?;
        // Every bucket of a tenant is in its config (none is added at run
        // time), so one known here is there.
        let configured = configured.ok_or(BrokerError::Internal(
            "the bucket is not in the config the broker started with",
        ))?;
        self.apply_limits(b, configured.rate, configured.max_in_flight, now);
        Ok(&self.buckets[b].settings)
    }

    /// Sets bucket `b`'s rate and slot limit and applies them to every
    /// instance: a rate or slot limit set anew starts as a new instance's
    /// would, one changed keeps what was learned within its new bound, and
    /// one removed is dropped (leases holding a removed slot release into
    /// nothing).
    fn apply_limits(
        &mut self,
        b: usize,
        rate: Option<crate::config::Rate>,
        max_in_flight: Option<std::num::NonZeroU32>,
        now: Instant,
    ) {
        let settings = &mut self.buckets[b].settings;
        settings.rate = rate;
        settings.max_in_flight = max_in_flight;
        let settings = settings.clone();
        let s = self.learning;
        self.touch_if_unused(b);
        for i in self.instances_of(b) {
            let Some(x) = self.instances.get_mut(i) else {
                continue;
            };
            match settings.rate {
                Some(r) => {
                    x.learner.set_configured(r.per_minute(), r.window);
                    x.base_burst = r.burst.get();
                    match x.tokens.as_mut() {
                        Some(t) => t.set_burst(r.burst.get(), now),
                        None => {
                            x.tokens = Some(TokenBucket::new(
                                r.permits.get(),
                                r.window,
                                r.burst.get(),
                                now,
                            ))
                        }
                    }
                    x.apply_rate(now, &s);
                }
                None if x.tokens.is_some() => {
                    x.tokens = None;
                    x.base_burst = 1;
                    x.learner = Learner::new(0.0, Duration::from_secs(60), now);
                }
                None => {}
            }
            match settings.max_in_flight {
                Some(m) => {
                    if x.slots.is_none() {
                        x.slots = Some(Slots::new(m.get()));
                    }
                    let window = settings.rate.map_or(Duration::from_secs(60), |r| r.window);
                    x.slot_learner
                        .get_or_insert_with(|| SlotLearner::new(m.get(), window))
                        .set_configured(m.get());
                    x.apply_slot_limit();
                }
                None => {
                    x.slots = None;
                    x.slot_learner = None;
                }
            }
            self.touch(i);
        }
    }

    /// Pauses (`Some(reason)`) or resumes (`None`) a bucket. Pausing answers
    /// every request waiting on it at once, with the reason.
    pub fn set_paused(
        &mut self,
        bucket: &str,
        reason: Option<String>,
        now: Instant,
    ) -> Result<(), BrokerError> {
        let now = self.monotonic(now);
        let b = self.bucket_index(bucket)?;
        self.buckets[b].paused = reason;
        let on_bucket = self.instances_of(b);
        if self.buckets[b].paused.is_some() {
            let gone = self
                .queue
                .remove_where(|w| w.instances.iter().any(|i| on_bucket.contains(i)));
            for w in gone {
                self.unqueue(&w);
                let denial = self.paused(&w.instances).unwrap_or_else(|| {
                    let order = self.order(w.class);
                    self.explain(
                        &w.instances,
                        w.permits,
                        super::instance::Share::NONE,
                        order,
                        now,
                    )
                });
                let _ = w.reply.tx.send(Err(denial));
            }
        }
        self.touch_if_unused(b);
        for i in on_bucket {
            self.touch(i);
        }
        Ok(())
    }

    /// Forgets what was learned about bucket `bucket` (every instance, or
    /// only `oauth_client`'s): freeze, cut rate, learned limit, cooldown
    /// and the upstream's budget view. The instances resume paced from an
    /// empty bucket at the configured rate, never with a burst. Returns the
    /// statuses of the instances cleared.
    pub fn clear_learned(
        &mut self,
        bucket: &str,
        oauth_client: Option<&str>,
        now: Instant,
    ) -> Result<Vec<BucketStatus>, BrokerError> {
        let now = self.monotonic(now);
        let b = self.bucket_index(bucket)?;
        let settings = &self.buckets[b].settings;
        let (configured, window) = settings.rate.map_or((0.0, Duration::from_secs(60)), |r| {
            (r.per_minute(), r.window)
        });
        let s = self.learning;
        let mut cleared = Vec::new();
        for i in self.instances_of(b) {
            let Some(x) = self.instances.get_mut(i) else {
                continue;
            };
            if oauth_client.is_some_and(|c| x.oauth_client.as_deref() != Some(c)) {
                continue;
            }
            x.learner = Learner::new(configured, window, now);
            if let Some(l) = x.slot_learner.as_mut() {
                l.clear();
            }
            x.apply_slot_limit();
            x.resume_at = None;
            x.upstream = None;
            x.kept = None;
            if let Some(t) = x.tokens.as_mut() {
                t.restart_empty(now);
            }
            x.apply_rate(now, &s);
            cleared.push(i);
            self.touch(i);
        }
        self.learned_dirty = true;
        Ok(cleared
            .into_iter()
            .filter_map(|i| Some(self.status_of(self.instances.get(i)?, now)))
            .collect())
    }

    /// The bucket's current limits and pause, for the admin state file.
    pub fn bucket_admin_view(&self, bucket: &str) -> Option<(&BucketSettings, Option<&str>)> {
        let b = self.bucket_index(bucket).ok()?;
        Some((&self.buckets[b].settings, self.buckets[b].paused.as_deref()))
    }
}
