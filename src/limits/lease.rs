//! The lease table of one tenant: which grants hold concurrency slots, until
//! when, and the expiry order that hands slots back when a client never
//! releases them. Pure: the clock is passed in.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;
use tokio::time::Instant;

/// A lease's public identity: `{tenant:x}-{seq:x}-{nonce:08x}`.
///
/// The tenant tag ([`tenant_tag`]) routes Release/Renew to the right
/// tenant; the random nonce makes ids of other clients' leases unguessable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId {
    /// The tenant's tag.
    pub tenant: u32,
    /// Sequence number, unique within the tenant.
    pub seq: u64,
    /// Random check value.
    pub nonce: u32,
}

/// The tag of tenant `id` in its lease ids: a hash of the id (FNV-1a, fixed
/// across builds), not its place in the config, so a lease stays its
/// tenant's when tenants are added or reordered between a restart, or
/// listed in another order by a cluster's other brokers. Config validation
/// refuses two tenants with one tag.
pub(crate) fn tenant_tag(id: &str) -> u32 {
    use std::hash::Hasher as _;
    let mut h = fnv::FnvHasher::default();
    h.write(id.as_bytes());
    let h = h.finish();
    // Both halves, folded.
    (h ^ (h >> 32)) as u32
}

impl LeaseId {
    /// The id as its wire string. Written by hand, not with `format!`: it is
    /// made for every grant, and the formatting machinery cost more than the
    /// rest of the grant's encoding.
    pub fn to_wire(self) -> String {
        let mut out = String::with_capacity(8 + 1 + 16 + 1 + 8);
        push_hex(&mut out, u64::from(self.tenant), 1);
        out.push('-');
        push_hex(&mut out, self.seq, 1);
        out.push('-');
        push_hex(&mut out, u64::from(self.nonce), 8);
        out
    }
}

/// Appends `n` in lower-case hex, at least `width` digits.
fn push_hex(out: &mut String, n: u64, width: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (16 - n.leading_zeros() as usize / 4).max(width);
    for i in (0..digits).rev() {
        out.push(char::from(HEX[((n >> (4 * i)) & 0xf) as usize]));
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_wire())
    }
}

/// A string that is not a lease id this broker issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a lease id issued by this broker")]
pub struct BadLeaseId;

impl FromStr for LeaseId {
    type Err = BadLeaseId;

    fn from_str(s: &str) -> Result<LeaseId, BadLeaseId> {
        let mut parts = s.split('-');
        let (Some(t), Some(q), Some(n), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(BadLeaseId);
        };
        // The shape `to_wire` writes: hex digits only, the check value
        // always 8 of them (so a mistyped id is refused, not taken as one
        // this broker might have issued and released).
        let hex = |p: &str, len: std::ops::RangeInclusive<usize>| {
            len.contains(&p.len()) && p.bytes().all(|b| b.is_ascii_hexdigit())
        };
        if !(hex(t, 1..=8) && hex(q, 1..=16) && hex(n, 8..=8)) {
            return Err(BadLeaseId);
        }
        Ok(LeaseId {
            tenant: u32::from_str_radix(t, 16).map_err(|_| BadLeaseId)?,
            seq: u64::from_str_radix(q, 16).map_err(|_| BadLeaseId)?,
            nonce: u32::from_str_radix(n, 16).map_err(|_| BadLeaseId)?,
        })
    }
}

/// A grant that holds concurrency slots.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    /// Random check value of the lease id.
    pub nonce: u32,
    /// Bucket instances whose slots the lease holds.
    pub instances: Vec<usize>,
    /// Slots held in each of them.
    pub permits: u32,
    /// When the slots come back unless renewed.
    pub expires_at: Instant,
    /// The TTL a Renew with no explicit extension grants.
    pub ttl: Duration,
    /// The client that acquired it, for logs.
    pub client_id: String,
}

/// The leases of one tenant that hold slots, by sequence number and by expiry.
#[derive(Debug, Default)]
pub(crate) struct LeaseTable {
    leases: HashMap<u64, Lease>,
    by_expiry: BTreeSet<(Instant, u64)>,
    next_seq: u64,
    /// Sequence numbers up to this one were issued before this run.
    base: u64,
    /// The highest sequence number above `next_seq` taken in from an
    /// earlier run (adopted, or handed over): numbering skips the live ones.
    taken_above: u64,
    /// Every number taken in from an earlier run: once such a lease expired
    /// or was released, its slot is back in the pool, so a late renewal
    /// must not adopt it again (it would take another unknown holder's
    /// phantom). As many as the earlier run's leases, at most.
    taken: std::collections::HashSet<u64>,
}

impl LeaseTable {
    /// Issues sequence numbers above `base` from now on, so that ids of a
    /// later run never meet the ids of an earlier one still in clients'
    /// hands.
    pub(crate) fn start_after(&mut self, base: u64) {
        self.next_seq = self.next_seq.max(base);
        self.base = self.base.max(base);
    }

    /// True if `seq` may name a lease an earlier run granted that this run
    /// does not hold yet: never one this run issued, nor one it holds
    /// under another nonce (a guessed id must not replace a live lease).
    ///
    /// An earlier run's numbers are usually below `base` (it is taken from
    /// the clock), but not when that run was on another host whose clock
    /// was ahead (a cluster's last leader): so any number this run has not
    /// issued qualifies, and [`LeaseTable::next_seq`] skips those taken in.
    pub(crate) fn may_adopt(&self, seq: u64) -> bool {
        let issued_here = self.base < seq && seq <= self.next_seq;
        !issued_here && !self.leases.contains_key(&seq) && !self.taken.contains(&seq)
    }

    /// A fresh sequence number (also used for leases that hold no slot and
    /// are therefore never stored).
    pub(crate) fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        while self.next_seq <= self.taken_above && self.leases.contains_key(&self.next_seq) {
            self.next_seq += 1;
        }
        self.next_seq
    }

    /// Stores a lease this run granted under `seq` (from
    /// [`LeaseTable::next_seq`]).
    pub(crate) fn insert(&mut self, seq: u64, lease: Lease) {
        self.by_expiry.insert((lease.expires_at, seq));
        self.leases.insert(seq, lease);
    }

    /// Stores a lease an earlier run granted (adopted, or handed over),
    /// under its own number; `false`, and nothing stored, if that number
    /// is live already.
    pub(crate) fn take_in(&mut self, seq: u64, lease: Lease) -> bool {
        if self.leases.contains_key(&seq) {
            return false;
        }
        if seq > self.next_seq {
            self.taken_above = self.taken_above.max(seq);
        }
        self.taken.insert(seq);
        self.insert(seq, lease);
        true
    }

    /// Removes the lease if `seq` and `nonce` name a live one.
    pub(crate) fn remove(&mut self, seq: u64, nonce: u32) -> Option<Lease> {
        if self.leases.get(&seq)?.nonce != nonce {
            return None;
        }
        let lease = self.leases.remove(&seq)?;
        self.by_expiry.remove(&(lease.expires_at, seq));
        Some(lease)
    }

    /// Moves a live lease's expiry; returns it, or `None` if unknown.
    pub(crate) fn renew(&mut self, seq: u64, nonce: u32, expires_at: Instant) -> Option<&Lease> {
        let lease = self.leases.get_mut(&seq).filter(|l| l.nonce == nonce)?;
        self.by_expiry.remove(&(lease.expires_at, seq));
        lease.expires_at = expires_at;
        self.by_expiry.insert((expires_at, seq));
        Some(lease)
    }

    /// A live lease.
    pub(crate) fn get(&self, seq: u64, nonce: u32) -> Option<&Lease> {
        self.leases.get(&seq).filter(|l| l.nonce == nonce)
    }

    /// Removes and returns one lease that expired at or before `now`.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<(u64, Lease)> {
        let &(at, seq) = self.by_expiry.first()?;
        if at > now {
            return None;
        }
        self.by_expiry.pop_first();
        self.leases.remove(&seq).map(|l| (seq, l))
    }

    /// When the next lease expires.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.by_expiry.first().map(|&(at, _)| at)
    }

    /// When the first lease holding a slot of `instance` expires.
    pub(crate) fn first_expiry_holding(&self, instance: usize) -> Option<Instant> {
        self.by_expiry
            .iter()
            .find(|(_, seq)| {
                self.leases
                    .get(seq)
                    .is_some_and(|l| l.instances.contains(&instance))
            })
            .map(|&(at, _)| at)
    }

    /// Moves every live lease's expiry `by` later.
    pub(crate) fn postpone_all(&mut self, by: Duration) {
        self.by_expiry = self
            .leases
            .iter_mut()
            .map(|(&seq, lease)| {
                lease.expires_at += by;
                (lease.expires_at, seq)
            })
            .collect();
    }

    /// The live leases, by sequence number.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &Lease)> {
        self.leases.iter().map(|(&seq, lease)| (seq, lease))
    }

    /// Number of live leases.
    pub(crate) fn len(&self) -> usize {
        self.leases.len()
    }

    #[cfg(test)]
    /// Whether no lease is live.
    pub(crate) fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(expires_at: Instant, instance: usize) -> Lease {
        Lease {
            nonce: 7,
            instances: vec![instance],
            permits: 1,
            expires_at,
            ttl: Duration::from_secs(30),
            client_id: "c".into(),
        }
    }

    #[test]
    fn id_round_trips_and_rejects_garbage() {
        let id = LeaseId {
            tenant: 3,
            seq: 0xabc,
            nonce: 0xdead,
        };
        assert_eq!(id.to_string().parse::<LeaseId>(), Ok(id));
        for bad in [
            "",
            "x",
            "1-2",
            "1-2-3-4",
            "g-1-1",
            "1--1",
            "9-9-9",
            "0-1-5c0f1d2",
            "0-1-5c0f1d2e0",
            "+0-1-5c0f1d2e",
            "0-+1-5c0f1d2e",
            "123456789-1-5c0f1d2e",
            "0-12345678901234567-5c0f1d2e",
        ] {
            assert_eq!(bad.parse::<LeaseId>(), Err(BadLeaseId), "{bad}");
        }
    }

    #[test]
    fn the_wire_form_is_tenant_seq_and_nonce_in_hex() {
        for (tenant, seq, nonce) in [
            (0, 0, 0),
            (3, 0xabc, 0xdead),
            (0xf, 0x10, 0x1234_5678),
            (u32::MAX, u64::MAX, u32::MAX),
        ] {
            let id = LeaseId { tenant, seq, nonce };
            let want = format!("{tenant:x}-{seq:x}-{nonce:08x}");
            assert_eq!(id.to_wire(), want);
            assert_eq!(id.to_string(), want);
            assert_eq!(want.parse::<LeaseId>(), Ok(id));
        }
    }

    #[test]
    fn expiry_order_and_renewal() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut t = LeaseTable::default();
        let a = t.next_seq();
        let b = t.next_seq();
        t.insert(a, lease(t0 + 10 * s, 0));
        t.insert(b, lease(t0 + 5 * s, 1));
        assert_eq!(t.next_expiry(), Some(t0 + 5 * s));
        assert_eq!(t.first_expiry_holding(0), Some(t0 + 10 * s));
        assert!(t.renew(b, 7, t0 + 20 * s).is_some());
        assert!(t.renew(b, 8, t0 + 30 * s).is_none(), "wrong nonce");
        assert_eq!(t.pop_expired(t0 + 9 * s).map(|(q, _)| q), None);
        assert_eq!(t.pop_expired(t0 + 10 * s).map(|(q, _)| q), Some(a));
        assert!(t.remove(a, 7).is_none(), "already gone");
        assert!(t.remove(b, 7).is_some());
        assert!(t.is_empty() && t.next_expiry().is_none());
    }
}
