//! The waiting queue of one tenant: who is served next when capacity frees.
//!
//! For now strictly first come, first served per bucket: a waiter is served
//! when every bucket it needs can grant and no earlier waiter still waits on
//! any of those buckets (so a large request is not starved by small ones, and
//! a waiter on an unrelated bucket is not held up). New requests never barge
//! past waiters. The queue owns each waiter's reply handle; it knows nothing
//! of buckets beyond their indices.

use std::collections::VecDeque;
use tokio::time::Instant;

/// One request waiting for capacity.
#[derive(Debug)]
pub struct Waiter<R> {
    /// Identifies the waiter for removal when its caller gives up.
    pub id: u64,
    /// Bucket instances it needs.
    pub instances: Vec<usize>,
    /// Permits it needs from each.
    pub permits: u32,
    /// Its priority class.
    pub class: String,
    /// The calling client, for logs.
    pub client_id: String,
    /// Where the grant goes.
    pub reply: R,
}

/// What the tenant says of the waiter it is offered.
pub enum Offer {
    /// Granted (capacity already taken); the waiter leaves the queue.
    Granted,
    /// Not yet; it could be granted at this instant, if known (tokens refill
    /// at a known time; slots come back when someone releases).
    NotYet(Option<Instant>),
}

/// The FIFO queue.
#[derive(Debug)]
pub struct Queue<R> {
    waiters: VecDeque<Waiter<R>>,
    next_id: u64,
}

impl<R> Default for Queue<R> {
    fn default() -> Self {
        Queue {
            waiters: VecDeque::new(),
            next_id: 0,
        }
    }
}

impl<R> Queue<R> {
    /// Appends a waiter; returns its id.
    pub fn push(
        &mut self,
        instances: Vec<usize>,
        permits: u32,
        class: String,
        client_id: String,
        reply: R,
    ) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.waiters.push_back(Waiter {
            id,
            instances,
            permits,
            class,
            client_id,
            reply,
        });
        id
    }

    /// Removes a waiter (its caller gave up); `None` if it already left.
    pub fn remove(&mut self, id: u64) -> Option<Waiter<R>> {
        let at = self.waiters.iter().position(|w| w.id == id)?;
        self.waiters.remove(at)
    }

    /// Removes every waiter.
    pub fn drain(&mut self) -> impl Iterator<Item = Waiter<R>> + '_ {
        self.waiters.drain(..)
    }

    /// Number of waiters.
    pub fn len(&self) -> usize {
        self.waiters.len()
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    /// Offers capacity to waiters in order. `offer` takes the capacity and
    /// says `Granted`, or says when the waiter could be served. Returns the
    /// granted waiters and the earliest instant worth trying again.
    pub fn serve(
        &mut self,
        mut offer: impl FnMut(&Waiter<R>) -> Offer,
    ) -> (Vec<Waiter<R>>, Option<Instant>) {
        let mut granted = Vec::new();
        let mut next: Option<Instant> = None;
        // Instances an earlier waiter still waits on: later waiters that need
        // one of them keep their place behind it.
        let mut blocked: Vec<usize> = Vec::new();
        let mut i = 0;
        while i < self.waiters.len() {
            let w = &self.waiters[i];
            if w.instances.iter().any(|x| blocked.contains(x)) {
                blocked.extend_from_slice(&w.instances);
                i += 1;
                continue;
            }
            match offer(w) {
                Offer::Granted => {
                    if let Some(w) = self.waiters.remove(i) {
                        granted.push(w);
                    }
                }
                Offer::NotYet(at) => {
                    next = match (next, at) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    blocked.extend_from_slice(&self.waiters[i].instances);
                    i += 1;
                }
            }
        }
        (granted, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_per_bucket_without_head_of_line_blocking_across_buckets() {
        let mut q = Queue::default();
        let a = q.push(vec![0], 1, "c".into(), "x".into(), "a");
        let b = q.push(vec![0, 1], 1, "c".into(), "x".into(), "b");
        let c = q.push(vec![2], 1, "c".into(), "x".into(), "c");
        // Bucket 0 has no capacity; bucket 2 has.
        let (granted, _) = q.serve(|w| {
            if w.instances.contains(&0) {
                Offer::NotYet(None)
            } else {
                Offer::Granted
            }
        });
        assert_eq!(granted.iter().map(|w| w.reply).collect::<Vec<_>>(), ["c"]);
        // b would fit but a is ahead of it on bucket 0: b must not be offered.
        let mut offered = Vec::new();
        q.serve(|w| {
            offered.push(w.id);
            Offer::NotYet(None)
        });
        assert_eq!(offered, [a]);
        assert!(q.remove(b).is_some());
        assert!(q.remove(c).is_none());
        assert_eq!(q.len(), 1);
    }
}
