//! Members coming back: which other members this broker has seen on which
//! etcd lease, and for how long a member back on a new lease (restarted,
//! resumed after a pause, cut off and back) waits before the tenants it is
//! preferred for move back to it from their live leader.
//!
//! Without the wait a member that crashes again soon after its return
//! takes its tenants down with it each time, and each crash costs them a
//! take-over in the restart learning mode. The wait is two lease TTLs,
//! doubled for each further return within [`RETURNS_KEPT`], at most
//! [`LONGEST`]: a member that keeps failing keeps nothing. A member seen
//! for the first time (a new broker, or any member after this broker
//! started) and a tenant no one leads are not held back.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::time::Instant;

/// How long a return is remembered (each one within it doubles the wait),
/// and a member unseen that long is forgotten (back later, it is new).
pub(super) const RETURNS_KEPT: Duration = Duration::from_secs(600);
/// The longest wait.
pub(super) const LONGEST: Duration = Duration::from_secs(300);

/// A member as this broker last saw it.
#[derive(Debug)]
struct Seen {
    lease: i64,
    last_seen: Instant,
    /// When it came back on a new lease, within the last [`RETURNS_KEPT`].
    returns: VecDeque<Instant>,
    /// Until when the tenants it is preferred for stay with their leader.
    held_until: Option<Instant>,
    /// The wait of its latest return was said in the log.
    said: bool,
}

/// The other members seen, by name.
#[derive(Debug)]
pub(super) struct Rejoins {
    ttl: Duration,
    seen: HashMap<String, Seen>,
}

/// A member's wait, to be said in the log.
#[derive(Debug, PartialEq)]
pub(super) struct Held {
    /// How long it still waits.
    pub(super) left: Duration,
    /// Its returns within [`RETURNS_KEPT`], this one included.
    pub(super) returns: usize,
}

impl Rejoins {
    pub(super) fn new(ttl: Duration) -> Rejoins {
        Rejoins {
            ttl,
            seen: HashMap::new(),
        }
    }

    /// Records the members a tick read (name, etcd lease), this broker's
    /// own left out by the caller.
    pub(super) fn saw<'a>(
        &mut self,
        members: impl IntoIterator<Item = (&'a str, i64)>,
        now: Instant,
    ) {
        for (node, lease) in members {
            match self.seen.get_mut(node) {
                Some(s) => {
                    s.last_seen = now;
                    if s.lease != lease {
                        s.lease = lease;
                        s.returns
                            .retain(|at| now.saturating_duration_since(*at) < RETURNS_KEPT);
                        s.returns.push_back(now);
                        s.held_until = Some(now + wait(self.ttl, s.returns.len()));
                        s.said = false;
                    }
                }
                None => {
                    self.seen.insert(
                        node.to_owned(),
                        Seen {
                            lease,
                            last_seen: now,
                            returns: VecDeque::new(),
                            held_until: None,
                            said: true,
                        },
                    );
                }
            }
        }
        self.seen
            .retain(|_, s| now.saturating_duration_since(s.last_seen) < RETURNS_KEPT);
    }

    /// Whether the tenants `node` is preferred for stay with their live
    /// leader at `now`.
    pub(super) fn held(&self, node: &str, now: Instant) -> bool {
        self.seen
            .get(node)
            .and_then(|s| s.held_until)
            .is_some_and(|until| now < until)
    }

    /// `node`'s wait, the first time it is asked after each return (then
    /// `None`): for the log line of the leader holding its tenants.
    pub(super) fn unsaid(&mut self, node: &str, now: Instant) -> Option<Held> {
        let s = self.seen.get_mut(node)?;
        let until = s.held_until?;
        if s.said || now >= until {
            return None;
        }
        s.said = true;
        Some(Held {
            left: until - now,
            returns: s.returns.len(),
        })
    }
}

/// The wait after the `n`-th return within [`RETURNS_KEPT`].
fn wait(ttl: Duration, n: usize) -> Duration {
    let doublings = u32::try_from(n.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(16);
    (2 * ttl).saturating_mul(1 << doublings).min(LONGEST)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(5);

    #[test]
    fn a_member_seen_first_is_not_held_and_one_back_on_a_new_lease_is_for_two_ttls() {
        let t0 = Instant::now();
        let mut r = Rejoins::new(TTL);
        r.saw([("b1", 1), ("b2", 2)], t0);
        assert!(!r.held("b1", t0));
        assert_eq!(r.unsaid("b1", t0), None);
        // The same lease a tick on: nothing changes.
        r.saw([("b1", 1), ("b2", 2)], t0 + TTL);
        assert!(!r.held("b1", t0 + TTL));
        // Gone (its lease expired), then back on another.
        r.saw([("b2", 2)], t0 + 2 * TTL);
        let back = t0 + 3 * TTL;
        r.saw([("b1", 7), ("b2", 2)], back);
        assert!(r.held("b1", back));
        assert!(!r.held("b2", back));
        assert!(r.held("b1", back + 2 * TTL - Duration::from_millis(1)));
        assert!(!r.held("b1", back + 2 * TTL));
        assert_eq!(
            r.unsaid("b1", back + Duration::from_secs(1)),
            Some(Held {
                left: 2 * TTL - Duration::from_secs(1),
                returns: 1
            })
        );
        assert_eq!(
            r.unsaid("b1", back + Duration::from_secs(2)),
            None,
            "said once"
        );
    }

    #[test]
    fn each_return_within_ten_minutes_doubles_the_wait_up_to_five_minutes() {
        let t0 = Instant::now();
        let mut r = Rejoins::new(TTL);
        r.saw([("b1", 0)], t0);
        let mut waits = Vec::new();
        for k in 1..=7 {
            let at = t0 + Duration::from_secs(60 * k);
            r.saw([("b1", k as i64)], at);
            waits.push(r.unsaid("b1", at).unwrap().left.as_secs());
        }
        assert_eq!(waits, [10, 20, 40, 80, 160, 300, 300]);
        // Ten quiet minutes later the returns before are forgotten.
        let later = t0 + Duration::from_secs(60 * 7 + 601);
        r.saw([("b1", 100)], later);
        assert_eq!(r.unsaid("b1", later).unwrap().returns, 1);
    }

    #[test]
    fn a_member_unseen_for_ten_minutes_is_new_when_it_comes_back() {
        let t0 = Instant::now();
        let mut r = Rejoins::new(TTL);
        r.saw([("b1", 1)], t0);
        r.saw(std::iter::empty(), t0 + RETURNS_KEPT);
        let back = t0 + RETURNS_KEPT + TTL;
        r.saw([("b1", 2)], back);
        assert!(!r.held("b1", back));
    }
}
