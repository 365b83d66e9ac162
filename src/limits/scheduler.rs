//! The waiting queue of one tenant: who is served next when capacity frees.
//!
//! Waiters are grouped by priority class, and within a class by client.
//! When capacity frees, the queue offers it in this order:
//! - **across classes, weighted fair share**: start-time fair queuing; each
//!   class has a virtual time that advances by `permits / weight` per grant,
//!   and the class with the lowest virtual time goes next (ties: the higher
//!   class). A class that was idle does not bank credit.
//! - **within a class, round-robin across clients**, and first come, first
//!   served per client, so one greedy client cannot starve another.
//! - a waiter that cannot be granted holds its buckets for waiters of its
//!   own and lower classes in this pass (so a large request is not starved
//!   by small ones behind it) but not for higher classes, which may still
//!   use their reserve (enforced by the tenant in the offer). The tenant
//!   says how it holds them ([`Offer::BlockedOn`], [`Holds`]): what it
//!   lacks, outright; the rest not at all while it waits for something with
//!   no known time (a slot), else spared (a new request may take only what
//!   leaves its permits there when its wait ends). So a waiter blocked on a
//!   full slot bucket, or a backlog on one rate-limited bucket, does not
//!   stall every call that shares another bucket with it. The holds of the
//!   last pass, and those of waiters queued since, also stop new requests
//!   from going ahead of them ([`Queue::hold_on`]); within a pass, spared
//!   buckets are held for later waiters outright.
//!
//! The queue owns each waiter's reply handle; it knows nothing of buckets
//! beyond their indices, nor of classes beyond index, order and weight.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use tokio::time::Instant;

/// One request waiting for capacity.
#[derive(Debug)]
pub(crate) struct Waiter<R> {
    /// Identifies the waiter for removal when its caller gives up.
    pub id: u64,
    /// Bucket instances it needs.
    pub instances: Vec<usize>,
    /// Permits it needs from each.
    pub permits: u32,
    /// Index of its priority class.
    pub class: usize,
    /// The calling client.
    pub client_id: Arc<str>,
    /// Where the answer goes.
    pub reply: R,
}

/// What the tenant says of the waiter it is offered.
pub(crate) enum Offer {
    /// Granted (capacity already taken); the waiter leaves the queue.
    Granted,
    /// Not yet; it could be granted at this instant, if known (tokens refill
    /// at a known time; slots come back when someone releases), and it
    /// holds its buckets as [`Holds`] says.
    BlockedOn(Option<Instant>, Holds),
}

/// What a waiter that cannot be granted holds: the buckets whose places in
/// `Waiter::instances` `lacking` names ([`place_bit`]) for good, and the
/// rest as `rest` says.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Holds {
    /// The places it lacks capacity on.
    pub lacking: u64,
    /// Its other buckets.
    pub rest: Rest,
}

/// How a waiter holds the buckets it does not lack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rest {
    /// Not at all (it waits for something with no known time).
    Open,
    /// Spared: a new request may take from them only what leaves its
    /// permits there at the instant its wait ends (see [`Hold::spare`]).
    Spared,
}

#[cfg(test)]
impl Holds {
    /// Every bucket, outright.
    pub(crate) const ALL: Holds = Holds {
        lacking: u64::MAX,
        rest: Rest::Open,
    };
}

/// The holds a waiter of class order `order` for `permits` on `instances`
/// puts on them, as `h` says (`at`: when it could be granted; unknown, what
/// it would spare it keeps).
fn holds_of(
    instances: &[usize],
    order: u32,
    permits: u32,
    h: Holds,
    at: Option<Instant>,
) -> impl Iterator<Item = (usize, Hold)> + '_ {
    instances.iter().enumerate().filter_map(move |(j, &i)| {
        let lacks = h.lacking & place_bit(j) != 0;
        let spare = match (lacks, h.rest, at) {
            (false, Rest::Open, _) => return None,
            (false, Rest::Spared, Some(at)) => Some((permits, at)),
            _ => None,
        };
        Some((i, Hold { order, spare }))
    })
}

/// A hold on one bucket instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hold {
    /// The lowest class order of a waiter holding it.
    pub order: u32,
    /// For one waiter it only spares: its permits and when it can be
    /// granted. `None`: held outright.
    pub spare: Option<(u32, Instant)>,
}

/// The bit of place `j` of a waiter's instances in an [`Offer::BlockedOn`]
/// mask (places from 63 on share the last bit).
pub(crate) fn place_bit(j: usize) -> u64 {
    1 << j.min(63)
}

/// A class as the queue sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClassShape {
    /// Lower is served first on ties.
    pub order: u32,
    /// Share weight.
    pub weight: u32,
}

#[derive(Debug)]
struct ClassQueue<R> {
    /// Clients with waiters, in round-robin order, each with its FIFO.
    clients: VecDeque<(Arc<str>, VecDeque<Waiter<R>>)>,
    vtime: f64,
    shape: ClassShape,
}

impl<R> ClassQueue<R> {
    fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

/// The queue.
#[derive(Debug)]
pub(crate) struct Queue<R> {
    classes: Vec<ClassQueue<R>>,
    /// Waiter id → class index.
    index: HashMap<u64, usize>,
    /// Virtual time of the last grant.
    vnow: f64,
    /// Instance → who holds it.
    holds: HashMap<usize, Hold>,
}

/// Waiter ids, unique in the process: a waiter that outlived its queue (a
/// tenant's state replaced when a cluster member takes it over) can never
/// withdraw another queue's waiter by its id.
static NEXT_WAITER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl<R> Default for Queue<R> {
    fn default() -> Self {
        Queue {
            classes: Vec::new(),
            index: HashMap::new(),
            vnow: 0.0,
            holds: HashMap::new(),
        }
    }
}

impl<R> Queue<R> {
    /// Sets the shape of class `class` (creating classes up to it).
    pub(crate) fn set_class(&mut self, class: usize, shape: ClassShape) {
        while self.classes.len() <= class {
            self.classes.push(ClassQueue {
                clients: VecDeque::new(),
                vtime: 0.0,
                shape,
            });
        }
        self.classes[class].shape = shape;
    }

    /// Appends a waiter; returns its id.
    pub(crate) fn push(
        &mut self,
        instances: Vec<usize>,
        permits: u32,
        class: usize,
        client_id: Arc<str>,
        reply: R,
    ) -> u64 {
        self.set_class(
            class,
            self.classes.get(class).map_or(
                ClassShape {
                    order: u32::MAX,
                    weight: 1,
                },
                |c| c.shape,
            ),
        );
        let id = NEXT_WAITER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let vnow = self.vnow;
        let q = &mut self.classes[class];
        if q.is_empty() {
            q.vtime = q.vtime.max(vnow);
        }
        let waiter = Waiter {
            id,
            instances,
            permits,
            class,
            client_id: client_id.clone(),
            reply,
        };
        match q.clients.iter_mut().find(|(c, _)| *c == client_id) {
            Some((_, fifo)) => fifo.push_back(waiter),
            None => q.clients.push_back((client_id, VecDeque::from([waiter]))),
        }
        self.index.insert(id, class);
        id
    }

    /// Removes a waiter (its caller gave up); `None` if it already left.
    pub(crate) fn remove(&mut self, id: u64) -> Option<Waiter<R>> {
        let class = self.index.remove(&id)?;
        let q = &mut self.classes[class];
        let (c, at) =
            q.clients.iter().enumerate().find_map(|(c, (_, fifo))| {
                fifo.iter().position(|w| w.id == id).map(|at| (c, at))
            })?;
        let w = q.clients[c].1.remove(at);
        if q.clients[c].1.is_empty() {
            q.clients.remove(c);
        }
        w
    }

    /// Removes every waiter.
    pub(crate) fn drain(&mut self) -> Vec<Waiter<R>> {
        self.index.clear();
        self.classes
            .iter_mut()
            .flat_map(|q| q.clients.drain(..))
            .flat_map(|(_, fifo)| fifo)
            .collect()
    }

    /// Removes the waiters `pred` selects.
    pub(crate) fn remove_where(
        &mut self,
        mut pred: impl FnMut(&Waiter<R>) -> bool,
    ) -> Vec<Waiter<R>> {
        let ids: Vec<u64> = self
            .classes
            .iter()
            .flat_map(|q| q.clients.iter())
            .flat_map(|(_, fifo)| fifo.iter())
            .filter(|w| pred(w))
            .map(|w| w.id)
            .collect();
        ids.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    /// The hold a waiter of class order `order` or above has on
    /// `instance`: a new request of that order may not go ahead of it
    /// (outright, or beyond what it spares).
    pub(crate) fn hold_on(&self, instance: usize, order: u32) -> Option<Hold> {
        if self.holds.is_empty() {
            return None;
        }
        self.holds
            .get(&instance)
            .copied()
            .filter(|h| h.order <= order)
    }

    /// A waiter queued since the last pass holds `instance` until the next.
    /// Two waiters sparing one instance hold it outright (what each spares
    /// is not added up).
    pub(crate) fn hold(&mut self, instance: usize, hold: Hold) {
        self.holds
            .entry(instance)
            .and_modify(|h| {
                *h = Hold {
                    order: h.order.min(hold.order),
                    spare: None,
                }
            })
            .or_insert(hold);
    }

    /// A waiter of class order `order` for `permits` on `instances`, queued
    /// since the last pass, holds them as `h` says until the next (`at`:
    /// when it could be granted, if known).
    pub(crate) fn hold_waiter(
        &mut self,
        instances: &[usize],
        order: u32,
        permits: u32,
        h: Holds,
        at: Option<Instant>,
    ) {
        for (i, hold) in holds_of(instances, order, permits, h, at) {
            self.hold(i, hold);
        }
    }

    /// Nobody waits on `instance` any more: its hold ends now, not at the
    /// next pass.
    pub(crate) fn unhold(&mut self, instance: usize) {
        self.holds.remove(&instance);
    }

    /// Number of waiters.
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// Offers capacity to waiters in scheduling order. `offer` takes the
    /// capacity and says `Granted`, or says when the waiter could be served.
    /// Returns the granted waiters and the earliest instant worth trying again.
    pub(crate) fn serve(
        &mut self,
        mut offer: impl FnMut(&Waiter<R>) -> Offer,
    ) -> (Vec<Waiter<R>>, Option<Instant>) {
        let mut granted = Vec::new();
        let mut next: Option<Instant> = None;
        // (instance, class order): held for waiters of that order and lower
        // in this pass (spared ones too); and every hold, for new requests.
        let mut held: Vec<(usize, u32)> = Vec::new();
        let mut holds: Vec<(usize, Hold)> = Vec::new();
        // Clients whose head waiter was passed over in this pass.
        let mut passed: HashSet<(usize, Arc<str>)> = HashSet::new();
        loop {
            // Each class's next candidate: the head of its first client (in
            // round-robin order) not yet passed over.
            let pick = self
                .classes
                .iter()
                .enumerate()
                .filter_map(|(k, q)| {
                    let c = q
                        .clients
                        .iter()
                        .position(|(client, _)| !passed.contains(&(k, client.clone())))?;
                    Some((k, c, q.vtime, q.shape.order))
                })
                .min_by(|a, b| a.2.total_cmp(&b.2).then(a.3.cmp(&b.3)));
            let Some((k, c, _, order)) = pick else { break };
            let q = &mut self.classes[k];
            let client = q.clients[c].0.clone();
            let Some(w) = q.clients[c].1.front() else {
                q.clients.remove(c);
                continue;
            };
            // The places of its instances a waiter ahead holds for it.
            let held_mask = w.instances.iter().enumerate().fold(0u64, |m, (j, i)| {
                if held.iter().any(|&(h, o)| h == *i && o <= order) {
                    m | place_bit(j)
                } else {
                    m
                }
            });
            let is_held = held_mask != 0;
            let verdict = if is_held {
                Offer::BlockedOn(
                    None,
                    Holds {
                        lacking: held_mask,
                        rest: Rest::Open,
                    },
                )
            } else {
                offer(w)
            };
            match verdict {
                Offer::Granted => {
                    let Some(w) = q.clients[c].1.pop_front() else {
                        continue;
                    };
                    self.vnow = q.vtime;
                    q.vtime += f64::from(w.permits) / f64::from(q.shape.weight.max(1));
                    // Round-robin: this client goes to the back of its class.
                    if let Some(entry) = q.clients.remove(c) {
                        if !entry.1.is_empty() {
                            q.clients.push_back(entry);
                        }
                    }
                    self.index.remove(&w.id);
                    granted.push(w);
                }
                Offer::BlockedOn(at, h) => {
                    if !is_held {
                        next = match (next, at) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                    }
                    for (i, hold) in holds_of(&w.instances, order, w.permits, h, at) {
                        held.push((i, order));
                        holds.push((i, hold));
                    }
                    passed.insert((k, client));
                }
            }
        }
        self.holds.clear();
        for (i, h) in holds {
            self.hold(i, h);
        }
        (granted, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q3() -> Queue<&'static str> {
        let mut q = Queue::default();
        q.set_class(
            0,
            ClassShape {
                order: 0,
                weight: 3,
            },
        );
        q.set_class(
            1,
            ClassShape {
                order: 1,
                weight: 1,
            },
        );
        q
    }

    #[test]
    fn a_waiter_id_never_names_a_waiter_of_another_queue() {
        // A replaced tenant state's queue starts afresh; an id handed out by
        // the old one must not withdraw a newcomer of the new one.
        let mut old = q3();
        let stale = old.push(vec![0], 1, 0, "a".into(), "old");
        let mut fresh = q3();
        let newcomer = fresh.push(vec![0], 1, 0, "b".into(), "new");
        assert_ne!(stale, newcomer);
        assert!(fresh.remove(stale).is_none());
        assert_eq!(fresh.len(), 1);
    }

    #[test]
    fn weighted_share_across_classes() {
        let mut q = q3();
        for _ in 0..40 {
            q.push(vec![0], 1, 0, "a".into(), "hi");
            q.push(vec![0], 1, 1, "b".into(), "lo");
        }
        // Capacity for 20 grants.
        let mut left = 20;
        let (granted, _) = q.serve(|_| {
            if left > 0 {
                left -= 1;
                Offer::Granted
            } else {
                Offer::BlockedOn(None, Holds::ALL)
            }
        });
        let hi = granted.iter().filter(|w| w.reply == "hi").count();
        assert_eq!((hi, granted.len() - hi), (15, 5));
    }

    #[test]
    fn round_robin_across_clients_fifo_within() {
        let mut q = q3();
        for _ in 0..6 {
            q.push(vec![0], 1, 1, "greedy".into(), "g");
        }
        q.push(vec![0], 1, 1, "modest".into(), "m");
        let mut left = 3;
        let (granted, _) = q.serve(|_| {
            if left > 0 {
                left -= 1;
                Offer::Granted
            } else {
                Offer::BlockedOn(None, Holds::ALL)
            }
        });
        let order: Vec<_> = granted.iter().map(|w| w.reply).collect();
        assert_eq!(order, ["g", "m", "g"]);
        let ids: Vec<_> = granted
            .iter()
            .filter(|w| w.reply == "g")
            .map(|w| w.id)
            .collect();
        assert!(ids[0] < ids[1], "FIFO within a client");
    }

    #[test]
    fn a_blocked_waiter_holds_its_bucket_for_lower_classes_only() {
        let mut q = q3();
        let big = q.push(vec![0], 5, 1, "x".into(), "big-lo");
        q.push(vec![0], 1, 1, "y".into(), "small-lo");
        q.push(vec![0], 1, 0, "z".into(), "hi");
        let mut offered = Vec::new();
        let (granted, _) = q.serve(|w| {
            offered.push(w.reply);
            if w.permits > 1 {
                Offer::BlockedOn(None, Holds::ALL)
            } else if w.class == 0 {
                Offer::Granted
            } else {
                Offer::BlockedOn(None, Holds::ALL)
            }
        });
        // "small-lo" is behind "big-lo" on bucket 0 and is not offered; "hi" is.
        assert_eq!(granted.iter().map(|w| w.reply).collect::<Vec<_>>(), ["hi"]);
        assert!(!offered.contains(&"small-lo"), "{offered:?}");
        assert!(q.remove(big).is_some());
        assert_eq!(q.len(), 1);
    }
}
