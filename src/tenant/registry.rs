//! Which bucket instances a call draws on: route matching (cached) to
//! buckets, and for per-OAuth-client buckets one instance per client seen,
//! at most `max_clients`, the idle ones evicted.

use super::classes::check_permits;
use super::{Denial, Instance, TenantState};
use crate::config::BucketSettings;
use crate::error::BrokerError;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

pub(super) struct BucketDef {
    pub(super) settings: BucketSettings,
    /// Operator's reason, while paused.
    pub(super) paused: Option<String>,
    pub(super) org: Option<usize>,
    pub(super) per_client: HashMap<Arc<str>, usize>,
    /// What dropped per-client instances had counted (grants, 429s,
    /// freezes), so the bucket's totals never go down.
    pub(super) retired: Retired,
    /// A per-client bucket's change counter at its last change while it
    /// had no instance (its unused row's version, as an instance has one).
    pub(super) version: u64,
}

/// Counts of bucket instances no longer held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Retired {
    /// Permits granted.
    pub granted: u64,
    /// 429s attributed.
    pub throttled: u64,
    /// Freezes.
    pub freezes: u64,
}

impl Retired {
    fn add(&mut self, x: &Instance) {
        self.granted += x.granted_total;
        self.throttled += x.throttled_total;
        self.freezes += x.freezes_total;
    }
}

impl TenantState {
    /// The instances a call draws on, creating per-client ones as needed.
    /// `Ok(Err(denial))` when a per-client bucket is at its instance limit.
    pub(super) fn resolve(
        &mut self,
        method: &str,
        path: &str,
        oauth_client: &str,
        permits: u32,
        reserve: f64,
        now: Instant,
    ) -> Result<Result<Vec<usize>, Denial>, BrokerError> {
        let buckets = &self.buckets;
        let matched: Vec<usize> = self
            .routes
            .matches(method, path, || {
                (0..buckets.len())
                    .filter(|&b| {
                        buckets[b]
                            .settings
                            .routes
                            .iter()
                            .any(|r| r.matches(method, path))
                    })
                    .collect()
            })
            .to_vec();
        let mut out = Vec::with_capacity(matched.len());
        for b in matched {
            let def = &self.buckets[b];
            check_permits(&self.id, &def.settings, permits, reserve)?;
            let instance = match def.org {
                Some(i) => i,
                None => match def.per_client.get(oauth_client) {
                    Some(&i) => i,
                    None => match self.add_client_instance(b, oauth_client, now) {
                        Some(i) => i,
                        None => {
                            let def = &self.buckets[b].settings;
                            return Ok(Err(Denial {
                                retry_after: Duration::from_secs(1),
                                reason: format!(
                                    "bucket {:?} already tracks its limit of {} OAuth clients, all \
                                     busy; raise max_clients in the broker config",
                                    def.name, def.max_clients
                                ),
                                buckets: vec![def.name.clone()],
                            }));
                        }
                    },
                },
            };
            out.push(instance);
        }
        if out.is_empty() {
            return Err(BrokerError::NoBucketMatches {
                tenant: self.id.clone(),
                method: method.to_owned(),
                path: path.to_owned(),
            });
        }
        Ok(Ok(out))
    }

    pub(super) fn add_client_instance(
        &mut self,
        bucket: usize,
        client: &str,
        now: Instant,
    ) -> Option<usize> {
        let max = self.buckets[bucket].settings.max_clients.get() as usize;
        if self.buckets[bucket].per_client.len() >= max {
            self.evict_idle(Some(bucket), now);
            if self.buckets[bucket].per_client.len() >= max && !self.forget_stalest(bucket, now) {
                return None;
            }
        }
        let client: Arc<str> = Arc::from(client);
        let def = &mut self.buckets[bucket];
        let i = self.instances.insert(Instance::new(
            bucket,
            &def.settings,
            Some(client.clone()),
            now,
        ));
        def.per_client.insert(client, i);
        self.touch(i);
        self.restart_instance(i, now);
        Some(i)
    }

    /// Drops per-client instances nobody uses and that are full (a fresh one
    /// would be identical), in `only` bucket or in all.
    pub(super) fn evict_idle(&mut self, only: Option<usize>, now: Instant) {
        let mut emptied = Vec::new();
        let mut dropped = false;
        for (b, def) in self.buckets.iter_mut().enumerate() {
            if only.is_some_and(|o| o != b) {
                continue;
            }
            let instances = &mut self.instances;
            let retired = &mut def.retired;
            let before = def.per_client.len();
            def.per_client.retain(|_, &mut i| {
                let idle = instances.get(i).is_none_or(|x| x.idle(now));
                if idle {
                    if let Some(x) = instances.try_remove(i) {
                        retired.add(&x);
                    }
                }
                !idle
            });
            if before > 0 && def.per_client.is_empty() {
                emptied.push(b);
            }
            // What was learned of a dropped instance (a freeze since ended,
            // a cut since regrown) may still be in the last learned state
            // written: written again without it, or a restart would bring
            // it back until the next sweep.
            dropped |= def.per_client.len() < before;
        }
        self.learned_dirty |= dropped;
        for b in emptied {
            self.touch_if_unused(b);
        }
    }

    /// Drops the quiet per-client instance of `bucket` that changed least
    /// recently, forgetting what it learned: without this, instances kept
    /// only for their learned limits (a Report may teach one for any OAuth
    /// client name) would fill the bucket's `max_clients` for good. False if
    /// every instance is in use.
    fn forget_stalest(&mut self, bucket: usize, now: Instant) -> bool {
        let instances = &self.instances;
        let stalest = self.buckets[bucket]
            .per_client
            .iter()
            .filter_map(|(client, &i)| {
                let x = instances.get(i)?;
                x.quiet(now).then(|| (x.version, client.clone(), i))
            })
            .min_by_key(|(version, _, _)| *version);
        let Some((_, client, i)) = stalest else {
            return false;
        };
        self.buckets[bucket].per_client.remove(&client);
        if let Some(x) = self.instances.try_remove(i) {
            self.buckets[bucket].retired.add(&x);
        }
        self.learned_dirty = true;
        tracing::info!(tenant = %self.id, bucket = %self.buckets[bucket].settings.name,
            oauth_client = %client,
            "forgot the learned limits of the OAuth client unused longest, to track a new one (max_clients)");
        true
    }

    /// Per bucket, what its dropped instances had counted.
    pub fn retired(&self) -> Vec<(String, Retired)> {
        self.buckets
            .iter()
            .filter(|b| b.retired != Retired::default())
            .map(|b| (b.settings.name.clone(), b.retired))
            .collect()
    }

    /// Every instance of bucket `b`.
    pub(super) fn instances_of(&self, b: usize) -> Vec<usize> {
        self.instances
            .iter()
            .filter(|(_, x)| x.bucket == b)
            .map(|(i, _)| i)
            .collect()
    }

    pub(super) fn bucket_index(&self, bucket: &str) -> Result<usize, BrokerError> {
        self.buckets
            .iter()
            .position(|b| b.settings.name == bucket)
            .ok_or_else(|| BrokerError::UnknownBucket {
                tenant: self.id.clone(),
                bucket: bucket.to_owned(),
                known: self
                    .buckets
                    .iter()
                    .map(|b| b.settings.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}
