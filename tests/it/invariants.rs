//! The grant log: every grant, release and expiry a test's clients
//! saw, and the two promises a broker makes about them, checked over the
//! whole log. A fault test records what happened and ends with `check_*`.
//!
//! Times are the clients' (when an answer arrived), so two grants the
//! broker made a few microseconds apart may be seen closer or further; the
//! rate check allows one permit for that and nothing else.

use std::time::Duration;
use tokio::time::Instant;

/// What happened to a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Granted `permits`; `slot` when it holds a concurrency slot.
    Granted {
        lease: u64,
        permits: u32,
        slot: bool,
    },
    /// Released by its holder.
    Released { lease: u64 },
    /// Its holder stopped renewing and the TTL ran out.
    Expired { lease: u64 },
}

/// Every event, in the order seen.
#[derive(Debug, Default)]
pub struct GrantLog {
    events: Vec<(Instant, Event)>,
}

impl GrantLog {
    pub fn record(&mut self, event: Event) {
        self.events.push((Instant::now(), event));
    }

    /// How many grants were seen.
    pub fn granted(&self) -> usize {
        self.grants().len()
    }

    /// Grants seen, with their time and permits.
    fn grants(&self) -> Vec<(Instant, u32)> {
        self.events
            .iter()
            .filter_map(|&(at, e)| match e {
                Event::Granted { permits, .. } => Some((at, permits)),
                _ => None,
            })
            .collect()
    }

    /// In every window, the permits granted are at most `burst + rate ×
    /// window` (+1 for when the answers were seen): the token bucket's bound.
    pub fn check_rate(&self, burst: u32, per: Duration, permits_per: u32) -> Result<(), String> {
        let grants = self.grants();
        let rate = f64::from(permits_per) / per.as_secs_f64();
        for (i, &(start, _)) in grants.iter().enumerate() {
            let mut n = 0u32;
            for &(at, permits) in &grants[i..] {
                n += permits;
                let bound = f64::from(burst) + rate * (at - start).as_secs_f64() + 1.0;
                if f64::from(n) > bound {
                    return Err(format!(
                        "{n} permits granted in {:?} (bound {bound:.1}: burst {burst} + \
                         {permits_per} per {per:?})",
                        at - start
                    ));
                }
            }
        }
        Ok(())
    }

    /// At every instant, the slots held (granted, not yet released or
    /// expired) are at most `limit`.
    pub fn check_slots(&self, limit: u32) -> Result<(), String> {
        let mut held: Vec<(u64, u32)> = Vec::new();
        for &(at, e) in &self.events {
            match e {
                Event::Granted {
                    lease,
                    permits,
                    slot: true,
                } => {
                    held.push((lease, permits));
                    let n: u32 = held.iter().map(|&(_, p)| p).sum();
                    if n > limit {
                        return Err(format!(
                            "{n} slots held at {at:?}, above the limit of {limit}: {held:?}"
                        ));
                    }
                }
                Event::Released { lease } | Event::Expired { lease } => {
                    held.retain(|&(l, _)| l != lease);
                }
                Event::Granted { .. } => {}
            }
        }
        Ok(())
    }
}

#[test]
fn the_checker_catches_what_it_checks() {
    let mut log = GrantLog::default();
    for lease in 0..3 {
        log.record(Event::Granted {
            lease,
            permits: 1,
            slot: true,
        });
    }
    assert!(log.check_slots(3).is_ok());
    log.record(Event::Granted {
        lease: 3,
        permits: 1,
        slot: true,
    });
    assert!(log.check_slots(3).is_err(), "a fourth holder must fail");
    log.record(Event::Released { lease: 0 });
    log.record(Event::Expired { lease: 1 });
    log.record(Event::Granted {
        lease: 4,
        permits: 1,
        slot: true,
    });
    assert!(
        log.check_slots(4).is_ok(),
        "released and expired slots are free"
    );
    assert!(log.check_rate(5, Duration::from_secs(1), 1).is_ok());
    assert!(log.check_rate(3, Duration::from_secs(1), 1).is_err());
}
