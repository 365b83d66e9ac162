//! What a tenant learns from a Report: the outcome counted on every bucket
//! of the call, a 429 and the rate-limit headers attributed to one bucket,
//! and the learning rules (freeze, cut, regrowth, budget view) applied to it;
//! and the learned state kept across restarts.

use super::TenantState;
use crate::clock::millis;
use crate::config::Scope;
use crate::error::BrokerError;
use crate::learning::{attribute, Candidate, Learned, Persisted, RateLimitInfo, UpstreamBudget};
use std::time::Duration;
use tokio::time::Instant;

/// What a report did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportOutcome {
    /// Buckets it was counted on.
    pub buckets: Vec<String>,
    /// The bucket a 429 or the rate-limit headers were attributed to.
    pub attributed_to: Option<String>,
}

impl TenantState {
    /// Learns from an upstream outcome: counts it on every bucket of the
    /// call; a success regrows their rates; a 429 and the rate-limit headers
    /// are attributed to one bucket (see `TenantState::attribute`), which
    /// freezes, cuts its rate, and syncs to the upstream's remaining budget.
    pub fn report(
        &mut self,
        call: (&str, &str, &str),
        http_status: u32,
        retry_after: Option<Duration>,
        info: &RateLimitInfo,
        now: Instant,
    ) -> Result<ReportOutcome, BrokerError> {
        let now = self.monotonic(now);
        let (method, path, oauth_client) = call;
        let (retry_after, info) = self.capped(retry_after, info);
        let info = &info;
        let instances = match self.resolve(method, path, oauth_client, 1, 0.0, now)? {
            Ok(i) => i,
            Err(denial) => {
                return Ok(ReportOutcome {
                    buckets: denial.buckets,
                    attributed_to: None,
                })
            }
        };
        let throttled = http_status == 429;
        let (described, refused_by) = self.attribute_report(&instances, info, throttled);
        let s = self.learning;
        for &i in &instances {
            let Some(x) = self.instances.get_mut(i) else {
                continue;
            };
            x.reports_total += 1;
            x.last_report = Some(now);
            if http_status < 400 {
                let before = x.learner.rate(now, &s);
                x.learner.on_success(now, &s);
                if x.learner.rate(now, &s) != before {
                    x.apply_rate(now, &s);
                    self.learned_dirty = true;
                }
                if let Some(max) = x.slot_learner.as_mut().and_then(|l| l.on_success(now, &s)) {
                    x.apply_slot_limit();
                    tracing::info!(
                        tenant = %self.id, bucket = %self.buckets[x.bucket].settings.name,
                        max_in_flight = max, "probing a learned concurrency limit up one slot"
                    );
                }
            }
        }
        if let Some(i) = described.filter(|&d| refused_by != Some(d)) {
            self.learn(i, Some(info), None, now);
        }
        if let Some(i) = refused_by {
            // Headers that describe another budget say nothing of this one.
            let own = (described == Some(i)).then_some(info);
            self.learn(i, own, Some(retry_after), now);
        }
        let target = refused_by.or(described);
        for &i in &instances {
            self.touch(i);
        }
        Ok(ReportOutcome {
            buckets: self.names(&instances),
            attributed_to: target.map(|i| self.name(i)),
        })
    }

    /// A 429 the upstream says is about requests in flight: the first slot
    /// bucket of the call learns a lower concurrency limit (see
    /// `SlotLearner`); no rate is frozen or cut. A call without a slot
    /// bucket learns from it as from any 429.
    pub fn report_in_flight_refusal(
        &mut self,
        call: (&str, &str, &str),
        retry_after: Option<Duration>,
        info: &RateLimitInfo,
        now: Instant,
    ) -> Result<ReportOutcome, BrokerError> {
        let now = self.monotonic(now);
        let (method, path, oauth_client) = call;
        let instances = match self.resolve(method, path, oauth_client, 1, 0.0, now)? {
            Ok(i) => i,
            Err(denial) => {
                return Ok(ReportOutcome {
                    buckets: denial.buckets,
                    attributed_to: None,
                })
            }
        };
        let Some(target) = instances.iter().copied().find(|&i| {
            self.instances
                .get(i)
                .is_some_and(|x| x.slot_learner.is_some())
        }) else {
            return self.report(call, 429, retry_after, info, now);
        };
        let s = self.learning;
        for &i in &instances {
            if let Some(x) = self.instances.get_mut(i) {
                x.reports_total += 1;
                x.last_report = Some(now);
            }
        }
        if let Some(x) = self.instances.get_mut(target) {
            x.throttled_total += 1;
            let in_flight = x.slots.map_or(0, |sl| sl.in_flight());
            if let Some(max) = x
                .slot_learner
                .as_mut()
                .and_then(|l| l.on_refused(in_flight, now, &s))
            {
                x.apply_slot_limit();
                self.learned_dirty = true;
                tracing::info!(
                    tenant = %self.id, bucket = %self.buckets[x.bucket].settings.name,
                    in_flight, max_in_flight = max,
                    "upstream refused a call for concurrency: learned a lower concurrency limit"
                );
            }
        }
        for &i in &instances {
            self.touch(i);
        }
        Ok(ReportOutcome {
            buckets: self.names(&instances),
            attributed_to: Some(self.name(target)),
        })
    }

    /// A report's Retry-After and reset, cut to `learning.max_freeze`: one
    /// report must not block a bucket for longer (logged when it would).
    fn capped(
        &self,
        retry_after: Option<Duration>,
        info: &RateLimitInfo,
    ) -> (Option<Duration>, RateLimitInfo) {
        let max = self.learning.max_freeze;
        let asked = [retry_after, info.retry_after, info.reset]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or_default();
        if asked > max {
            tracing::warn!(
                tenant = %self.id,
                asked_ms = millis(asked),
                max_ms = millis(max),
                "a report asks to block a bucket longer than learning.max_freeze_ms; capped"
            );
        }
        let cap = |d: Option<Duration>| d.map(|d| d.min(max));
        let info = RateLimitInfo {
            retry_after: cap(info.retry_after),
            reset: cap(info.reset),
            ..*info
        };
        (cap(retry_after), info)
    }

    /// Which bucket the rate-limit headers describe, and which bucket
    /// refused a 429. They differ when the headers describe a budget with
    /// requests left: Genesys sends its per-OAuth-client headers on every
    /// answer, also on a 429 from an org-wide endpoint-family limit, and
    /// that 429 must teach the family's bucket, not freeze the client's.
    pub(super) fn attribute_report(
        &self,
        instances: &[usize],
        info: &RateLimitInfo,
        throttled: bool,
    ) -> (Option<usize>, Option<usize>) {
        let described = (!info.is_empty())
            .then(|| self.attribute(instances, info))
            .flatten();
        if !throttled {
            return (described, None);
        }
        let budget_left = info.remaining.is_some_and(|r| r > 0);
        let refused_by = match described {
            Some(d) if budget_left => {
                let others: Vec<usize> = instances.iter().copied().filter(|&i| i != d).collect();
                self.attribute(&others, &RateLimitInfo::default())
                    .or(Some(d))
            }
            Some(d) => Some(d),
            None => self.attribute(instances, info),
        };
        (described, refused_by)
    }

    /// Applies what a report says to instance `i`: `info` (the headers, when
    /// they describe this bucket's budget) and `throttled` (a 429 this bucket
    /// refused, with its Retry-After).
    pub(super) fn learn(
        &mut self,
        i: usize,
        info: Option<&RateLimitInfo>,
        throttled: Option<Option<Duration>>,
        now: Instant,
    ) {
        let s = self.learning;
        let tenant = self.id.clone();
        let bucket = self.name(i);
        let Some(x) = self.instances.get_mut(i) else {
            return;
        };
        let mut learned = Vec::new();
        let empty = RateLimitInfo::default();
        let info = info.unwrap_or(&empty);
        let bucket_window = self.buckets[x.bucket]
            .settings
            .rate
            .map_or(Duration::from_secs(60), |r| r.window);
        let window = match info.window {
            Some(w) => w,
            None => x.header_window(info.reset, bucket_window),
        };
        // Resets far shorter than the window: refilled continuously.
        let continuous = info.window.is_none() && window.mul_f64(2.0) < bucket_window;
        if let Some(limit) = info.limit {
            x.limit_window = Some(window);
            let per_min = limit as f64 * 60.0 / window.as_secs_f64().max(1e-3);
            learned.extend(x.learner.on_limit(per_min));
        }
        x.sync_budget(info, (window, continuous), now);
        if let Some(retry_after) = throttled {
            x.throttled_total += 1;
            learned.extend(
                x.learner
                    .on_throttled(now, retry_after, info.exhausted(), &s),
            );
            // Jitter is drawn once per freeze end, not once per report.
            for change in &learned {
                if let Learned::Frozen { until } = change {
                    x.freeze(*until, self.rng.f64(), &s, now);
                }
            }
        }
        x.apply_rate(now, &s);
        for change in &learned {
            match change {
                Learned::Frozen { until } => tracing::info!(
                    %tenant, %bucket, oauth_client = x.oauth_client.as_deref().unwrap_or(""),
                    frozen_ms = millis(until.saturating_duration_since(now)),
                    "upstream answered 429: bucket frozen for {}",
                    match x.oauth_client.as_deref() {
                        None => "every caller of the tenant",
                        Some("") => "the callers that name no OAuth client",
                        Some(_) => "this OAuth client",
                    }
                ),
                Learned::Cut { from, to, why } => tracing::info!(
                    %tenant, %bucket, oauth_client = x.oauth_client.as_deref().unwrap_or(""),
                    from_per_min = from, to_per_min = to,
                    "effective rate cut: {why}"
                ),
                Learned::Limit { per_min } => tracing::info!(
                    %tenant, %bucket, oauth_client = x.oauth_client.as_deref().unwrap_or(""),
                    learned_per_min = per_min,
                    configured_per_min = x.learner.configured(),
                    "upstream reports a limit below the configured rate; adopting it"
                ),
            }
        }
        // A budget view from headers is learned state too (saved at most
        // once a second).
        if !learned.is_empty() || info.remaining.is_some() {
            self.learned_dirty = true;
        }
    }

    /// Which bucket of a call a 429 or rate-limit headers belong to (the
    /// rule: [`crate::learning::attribute`]).
    pub(super) fn attribute(&self, instances: &[usize], info: &RateLimitInfo) -> Option<usize> {
        let candidates: Vec<Candidate> = instances
            .iter()
            .filter_map(|&i| {
                let b = &self.buckets[self.instances.get(i)?.bucket].settings;
                Some(Candidate {
                    id: i,
                    permits: b.rate.map(|r| r.permits.get()),
                    rate_per_min: b.rate.map(|r| r.per_minute()),
                    org_wide: b.scope == Scope::Org,
                })
            })
            .collect();
        attribute(&candidates, info.limit).or_else(|| instances.first().copied())
    }

    /// Whether learned state changed since the last call.
    pub fn take_learned_dirty(&mut self) -> bool {
        std::mem::take(&mut self.learned_dirty)
    }

    /// Marks learned state as not saved (a save after
    /// [`TenantState::take_learned_dirty`] failed), so the next one writes it.
    pub fn mark_learned_dirty(&mut self) {
        self.learned_dirty = true;
    }

    /// Learned state of every instance that has any:
    /// (bucket, OAuth client, state).
    pub fn learned(&self, now: Instant) -> Vec<(String, Option<String>, Persisted)> {
        self.instances
            .iter()
            .filter_map(|(_, x)| {
                let upstream = x.upstream.and_then(|u| u.saved(now));
                let slots = x.slot_learner.as_ref().and_then(|l| l.persisted());
                if x.learner.is_pristine(now)
                    && upstream.is_none()
                    && slots.is_none()
                    && !x.learner.has_ceiling()
                    && !x.learner.refills_continuously()
                {
                    return None;
                }
                let b = &self.buckets[x.bucket].settings;
                let client = x.oauth_client.as_deref().map(str::to_owned);
                let p = Persisted {
                    upstream,
                    slots,
                    limit_window: x
                        .limit_window
                        .filter(|_| x.learner.learned_limit().is_some()),
                    ..x.learner.persisted()
                };
                Some((b.name.clone(), client, p))
            })
            .collect()
    }

    /// The instance of `bucket` for `oauth_client` (created for a
    /// per-client bucket); `None` if the config has no such bucket.
    pub(super) fn instance_of(
        &mut self,
        bucket: &str,
        oauth_client: Option<&str>,
        now: Instant,
    ) -> Option<usize> {
        let b = self
            .buckets
            .iter()
            .position(|d| d.settings.name == bucket)?;
        match (self.buckets[b].org, oauth_client) {
            (Some(i), _) => Some(i),
            (None, Some(c)) => match self.buckets[b].per_client.get(c) {
                Some(&i) => Some(i),
                None => self.add_client_instance(b, c, now),
            },
            (None, None) => None,
        }
    }

    /// Restores learned state of one instance (creating a per-client one).
    /// False if the bucket no longer exists in the config.
    pub fn restore(
        &mut self,
        bucket: &str,
        oauth_client: Option<&str>,
        p: Persisted,
        now: Instant,
    ) -> bool {
        let now = self.monotonic(now);
        let Some(x) = self
            .instance_of(bucket, oauth_client, now)
            .and_then(|i| self.instances.get_mut(i))
        else {
            return false;
        };
        let s = &self.learning;
        // A state file is ours, but not beyond doubt: no restored block
        // outlasts what one report could impose now.
        let p = Persisted {
            frozen_until: p.frozen_until.map(|t| t.min(now + s.max_freeze)),
            cooldown: p.cooldown.map(|(t, rate)| (t.min(now + s.cooldown), rate)),
            upstream: p
                .upstream
                .map(|(left, reset, w)| (left, reset.min(now + s.max_freeze), w)),
            ..p
        };
        if let Some(view) = p.upstream.and_then(|v| UpstreamBudget::resumed(v, now)) {
            x.upstream = Some(view);
        }
        x.learner.restore(p);
        if let Some(w) = p.limit_window.filter(|w| !w.is_zero()) {
            // The next header, stated a moment into a window, must not read
            // the limit over a shorter one than was learned.
            let bucket_window = x.learner.window();
            x.limit_window = Some(w);
            x.longest_reset = x.longest_reset.max(w.min(bucket_window));
        }
        if let (Some(l), Some(slots)) = (x.slot_learner.as_mut(), p.slots) {
            l.restore(slots, now, s);
            x.apply_slot_limit();
        }
        if let Some(until) = x.learner.frozen_until(now) {
            x.freeze(until, self.rng.f64(), s, now);
        }
        x.apply_rate(now, s);
        true
    }
}
