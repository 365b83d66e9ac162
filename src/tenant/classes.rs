//! Priority classes of one tenant: their order and weight in the queue, the
//! reserve each holds back from lower classes, how much of a bucket a
//! class may take (or, for the highest, borrow while a lower class waits),
//! and operators' changes to them (set, reset to the config's, removed).

use super::instance::{held_back, Share};
use super::TenantState;
use crate::config::{BucketSettings, ClassSettings};
use crate::error::{clip, clip_plain, BrokerError};
use crate::limits::ClassShape;
use tokio::time::Instant;

impl TenantState {
    /// The index of class `name` ("" is the default class).
    pub fn class_index(&self, name: &str) -> Result<usize, BrokerError> {
        if name.is_empty() {
            return Ok(self.default_class);
        }
        self.live_classes()
            .find(|(_, c)| c.name == name)
            .map(|(k, _)| k)
            .ok_or_else(|| {
                let known: Vec<&str> = self.live_classes().map(|(_, c)| c.name.as_str()).collect();
                BrokerError::invalid(
                    "priority_class",
                    format!(
                        "{} is not a class of tenant {:?}; use one of: {}",
                        clip(name),
                        self.id,
                        clip_plain(&known.join(", "))
                    ),
                )
            })
    }

    /// The order of `class` (unknown: last).
    #[inline]
    pub(super) fn order(&self, class: usize) -> u32 {
        self.classes.get(class).map_or(u32::MAX, |c| c.order)
    }

    /// The classes in force with their indices (a class an operator
    /// removed keeps its index, for the Acquires still waiting in it).
    #[inline]
    fn live_classes(&self) -> impl Iterator<Item = (usize, &ClassSettings)> {
        self.classes
            .iter()
            .enumerate()
            .filter(|(k, _)| !self.removed_classes.contains(k))
    }

    /// Share of every bucket that classes ordered before `order` hold back
    /// from it.
    #[inline]
    pub(super) fn reserve_before(&self, order: u32) -> f64 {
        self.live_classes()
            .filter(|(_, c)| c.order < order)
            .map(|(_, c)| c.reserve)
            .sum()
    }

    /// Share of every bucket that classes above `class` hold back from it.
    #[inline]
    pub(super) fn reserve_above(&self, class: usize) -> f64 {
        self.reserve_before(self.order(class))
    }

    /// What `class` must leave of the buckets of `instances` to higher
    /// classes, and what it may borrow below empty. While a lower class
    /// waits on them, a class that holds back less than the lowest one does
    /// may take what the classes between hold back (at least one permit)
    /// below empty: so a wallboard or a trunk finds a permit at once while
    /// batch saturates the bucket, however small its burst and even right
    /// after a freeze or a budget sync emptied it. The waiting lower class
    /// repays the debt from the refill before it is served again (it waits
    /// until the permits are earned), so the headroom is reserved in the
    /// refill and the total granted per window stays the same; with no
    /// lower class waiting nothing is borrowed and batch uses it all.
    /// A lower class refused until a later instant counts as waiting until
    /// then: a client whose wait ran out sleeps out its `retry_after` and
    /// asks again, and repays the debt as if it had stayed in the queue;
    /// without that, a wallboard polling while batch sleeps found the
    /// bucket batch had emptied and no headroom below it. Not where the
    /// upstream of one of the instances was seen refilling continuously
    /// (see `Learner::refills_continuously`): paced at its learned refill,
    /// the broker's empty bucket is the upstream's, and a permit lent
    /// below it before anyone comes back to repay it is a 429; a fixed
    /// window, once reset, holds the whole window whatever the pace.
    /// The classes that may not borrow also leave what a continuous
    /// upstream bucket keeps for consumers the broker does not manage
    /// (see `Kept`).
    #[inline]
    pub(super) fn bucket_share(&self, class: usize, instances: &[usize], now: Instant) -> Share {
        let held = self.reserve_above(class);
        let lowest = self.live_classes().map(|(_, c)| c.order).max().unwrap_or(0);
        let below = self.reserve_before(lowest);
        let order = self.order(class);
        let lower = |o| o > order;
        // The classes the lowest one holds reserves for.
        let reserved_for = held + 1e-9 < below;
        let borrow = if reserved_for
            && (self.waiting_where(instances, lower)
                || (self.deferred_where(instances, now, lower)
                    && !self.refills_continuously(instances)))
        {
            below
        } else {
            0.0
        };
        Share {
            held,
            borrow,
            leaves_kept: !reserved_for,
        }
    }

    /// Whether the upstream of any of `instances` refills continuously.
    #[inline]
    fn refills_continuously(&self, instances: &[usize]) -> bool {
        instances.iter().any(|&i| {
            self.instances
                .get(i)
                .is_some_and(|x| x.learner.refills_continuously())
        })
    }

    /// Whether a class whose order passes `keep` was refused on any of
    /// `instances` and told to ask again after `now`.
    #[inline]
    fn deferred_where(
        &self,
        instances: &[usize],
        now: Instant,
        keep: impl Fn(u32) -> bool,
    ) -> bool {
        instances.iter().any(|&i| {
            self.instances.get(i).is_some_and(|x| {
                x.deferred
                    .iter()
                    .any(|(&k, &until)| until > now && keep(self.order(k)))
            })
        })
    }

    /// Remembers that `class` was refused on `instances` and told to ask
    /// again at `until` (see [`Self::bucket_share`]).
    pub(super) fn defer(&mut self, instances: &[usize], class: usize, until: Instant) {
        for &i in instances {
            if let Some(x) = self.instances.get_mut(i) {
                let at = x.deferred.entry(class).or_insert(until);
                *at = (*at).max(until);
            }
        }
    }

    /// Whether waiters of a class whose order passes `keep` wait on any of
    /// `instances`.
    #[inline]
    pub(super) fn waiting_where(&self, instances: &[usize], keep: impl Fn(u32) -> bool) -> bool {
        instances.iter().any(|&i| {
            self.instances.get(i).is_some_and(|x| {
                x.waiting
                    .iter()
                    .any(|(&k, &n)| n > 0 && keep(self.order(k)))
            })
        })
    }

    /// The tenant's classes in force.
    pub fn classes(&self) -> Vec<&ClassSettings> {
        self.live_classes().map(|(_, c)| c).collect()
    }

    /// The class of Acquires that name none.
    pub fn default_class(&self) -> &str {
        self.classes
            .get(self.default_class)
            .map_or("", |c| c.name.as_str())
    }

    /// Creates or changes a class (checked as in the config); one an
    /// operator removed is back.
    pub fn set_class(&mut self, class: ClassSettings) -> Result<(), BrokerError> {
        let mut next = self.classes.clone();
        let k = match next.iter().position(|c| c.name == class.name) {
            Some(k) => {
                next[k] = class.clone();
                k
            }
            None => {
                next.push(class.clone());
                next.len() - 1
            }
        };
        let mut problems = Vec::new();
        // The error says "class: " already; name the class instead.
        class.check(&crate::error::clip(&class.name), &mut problems);
        let live: Vec<ClassSettings> = next
            .iter()
            .enumerate()
            .filter(|(i, _)| *i == k || !self.removed_classes.contains(i))
            .map(|(_, c)| c.clone())
            .collect();
        crate::config::check_class_set(&live, &mut problems);
        if !problems.is_empty() {
            return Err(BrokerError::invalid("class", problems.join("; ")));
        }
        self.classes = next;
        self.removed_classes.retain(|&i| i != k);
        for (k, c) in self.classes.iter().enumerate() {
            self.queue.set_class(
                k,
                ClassShape {
                    order: c.order,
                    weight: c.weight,
                },
            );
        }
        Ok(())
    }

    /// Undoes operators' changes to class `name`: the config's class
    /// (`configured`) again, or, for a class the config lacks, the class
    /// removed. Acquires already waiting in a removed class are served in
    /// its order as before; new ones naming it are refused, and it holds
    /// nothing back from lower classes. Returns the class now in force
    /// (`None`: removed).
    pub fn reset_class(
        &mut self,
        name: &str,
        configured: Option<&ClassSettings>,
    ) -> Result<Option<ClassSettings>, BrokerError> {
        let k = self.class_index(name)?;
        if let Some(c) = configured {
            self.set_class(c.clone())?;
            return Ok(Some(c.clone()));
        }
        if k == self.default_class {
            // The default class comes from the config, so this cannot be;
            // refused rather than leave Acquires that name none unservable.
            return Err(BrokerError::invalid(
                "class",
                format!("{} is the default class; it cannot be removed", clip(name)),
            ));
        }
        self.removed_classes.push(k);
        Ok(None)
    }
}

#[inline]
pub(super) fn check_permits(
    tenant: &str,
    b: &BucketSettings,
    permits: u32,
    reserve: f64,
) -> Result<(), BrokerError> {
    let too_many = |max: u32, what| BrokerError::TooManyPermits {
        tenant: tenant.to_owned(),
        bucket: b.name.clone(),
        permits,
        max,
        what,
    };
    if let Some(r) = b.rate {
        let held = held_back(r.burst.get(), reserve);
        let max = r.burst.get() - held;
        if permits > max {
            let what = if held > 0 {
                "burst less the reserve of higher classes"
            } else {
                "burst"
            };
            return Err(too_many(max, what));
        }
    }
    if let Some(m) = b.max_in_flight {
        let held = held_back(m.get(), reserve);
        let max = m.get() - held;
        if permits > max {
            let what = if held > 0 {
                "max_in_flight less the reserve of higher classes"
            } else {
                "max_in_flight"
            };
            return Err(too_many(max, what));
        }
    }
    Ok(())
}
