//! The connection caps' counts: open and pending connections in all, per
//! serving thread, and handshakes per peer address (used by the accept
//! loops of both ports).

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A count with a cap, shared by the accept loop and the connections.
#[derive(Clone, Default)]
pub(crate) struct Gauge(Arc<AtomicUsize>);

/// One unit of a [`Gauge`], given back when dropped.
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Gauge {
    /// A slot if fewer than `max` are taken.
    pub(crate) fn try_take(&self, max: usize) -> Option<Slot> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.0.clone()))
    }

    /// A slot, whatever the count.
    pub(crate) fn take(&self) -> Slot {
        self.0.fetch_add(1, Ordering::AcqRel);
        Slot(self.0.clone())
    }

    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Handshakes in progress per peer address, for the per-peer cap (taken
/// once per connection, not per call: a mutex is enough).
#[derive(Clone, Default)]
pub(crate) struct PerPeer(Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>);

/// One pending handshake (or, on the HTTP port, connection) of a peer,
/// given back when dropped.
pub(crate) struct PeerSlot {
    counts: PerPeer,
    ip: IpAddr,
}

impl PerPeer {
    /// A slot if `ip` has fewer than `max` handshakes in progress.
    pub(crate) fn try_take(&self, ip: IpAddr, max: usize) -> Option<PeerSlot> {
        let mut counts = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Most handshakes one peer address may have in progress: a quarter of
/// the pending cap (at least one). The HTTP port caps a peer's
/// connections the same way.
pub(crate) fn per_peer_cap(max_pending: usize) -> usize {
    (max_pending / 4).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauge_caps_and_gives_back() {
        let g = Gauge::default();
        let a = g.try_take(2).unwrap();
        let _b = g.try_take(2).unwrap();
        assert!(g.try_take(2).is_none());
        drop(a);
        assert!(g.try_take(2).is_some());
    }
}
