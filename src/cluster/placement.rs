//! Which broker leads a tenant: rendezvous (highest-random-weight) hashing
//! of the tenant over the live members, so every broker that sees the same
//! members agrees without talking, and a member joining or leaving moves
//! only the tenants it wins or held. The runner-up is the tenant's standby.

use std::hash::Hasher as _;

/// The weight of `node` for `tenant`: FNV-1a of both (stable across Rust
/// versions and builds, unlike std's `DefaultHasher`, so brokers of
/// different builds agree), then a 64-bit finaliser to spread it.
fn weight(tenant: &str, node: &str) -> u64 {
    let mut h = fnv::FnvHasher::default();
    h.write(tenant.as_bytes());
    h.write_u8(0xff);
    h.write(node.as_bytes());
    let mut x = h.finish();
    // splitmix64's finaliser.
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The member that should lead `tenant` (`None`: no members).
pub(crate) fn leader_of<'a>(
    tenant: &str,
    members: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    members
        .into_iter()
        .max_by_key(|node| (weight(tenant, node), *node))
}

/// `members` ordered by preference for `tenant`: leader, standby, ...
#[cfg(test)]
fn ranked<'a>(tenant: &str, members: &[&'a str]) -> Vec<&'a str> {
    let mut v = members.to_vec();
    v.sort_by_key(|node| std::cmp::Reverse((weight(tenant, node), *node)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenants(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("org-{i}")).collect()
    }

    #[test]
    fn tenants_spread_about_evenly() {
        let members = ["b1", "b2", "b3"];
        let mut count = [0; 3];
        for t in tenants(3000) {
            let leader = leader_of(&t, members).unwrap();
            count[members.iter().position(|m| *m == leader).unwrap()] += 1;
        }
        assert!(
            count.iter().all(|&c| (850..=1150).contains(&c)),
            "{count:?}"
        );
    }

    #[test]
    fn a_joining_member_takes_only_tenants_it_wins() {
        let before = ["b1", "b2", "b3"];
        let after = ["b1", "b2", "b3", "b4"];
        let mut moved = 0;
        for t in tenants(2000) {
            let (a, b) = (
                leader_of(&t, before).unwrap(),
                leader_of(&t, after).unwrap(),
            );
            if a != b {
                assert_eq!(b, "b4", "{t} moved between old members");
                moved += 1;
            }
        }
        // About a quarter move, all to the new member.
        assert!((400..=600).contains(&moved), "{moved}");
    }

    #[test]
    fn a_leaving_leader_hands_its_tenants_to_their_standby() {
        let all = ["b1", "b2", "b3"];
        for t in tenants(500) {
            let order = ranked(&t, &all);
            let rest: Vec<&str> = all.iter().copied().filter(|m| *m != order[0]).collect();
            assert_eq!(leader_of(&t, rest), Some(order[1]));
        }
    }

    #[test]
    fn the_order_of_members_does_not_matter() {
        for t in tenants(100) {
            assert_eq!(
                leader_of(&t, ["a", "b", "c"]),
                leader_of(&t, ["c", "a", "b"])
            );
        }
        assert_eq!(leader_of("t", std::iter::empty()), None);
    }
}
