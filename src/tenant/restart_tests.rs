//! Unit tests of the learning mode after a restart or a take-over: slots
//! held by unknown leases, adoption of an earlier run's leases, and the
//! leases a cluster leader hands to the next.

use super::tests::{args, granted, tenant, NOW, TWO};
use super::*;
use crate::limits::LeaseId;

const SEC: Duration = Duration::from_secs(1);

/// The id of a lease an earlier run granted.
fn lease(seq: u64, nonce: u32) -> LeaseId {
    LeaseId {
        tenant: 0,
        seq,
        nonce,
    }
}

/// Tenant [`TWO`] restarted at `t0`: the earlier run issued lease numbers
/// up to 100.
fn restarted(t0: Instant) -> TenantState {
    let mut t = tenant(TWO, t0);
    t.start_leases_after(100);
    t.resume_after_restart(t0);
    t
}

#[test]
fn after_a_restart_unclaimed_slots_come_back_after_one_lease_ttl() {
    let t0 = Instant::now();
    let mut t = restarted(t0);
    let Decision::Denied(d) = t.acquire(&args("POST", "/q", 1), NOW, t0).unwrap() else {
        panic!("granted a slot an earlier run's lease may hold")
    };
    assert!(
        d.reason.contains("1 of 1 concurrency slots in use")
            && d.reason
                .contains("(1 of them counted for leases of the run before a restart"),
        "{}",
        d.reason
    );
    // Told when the slot comes back (the lease TTL, 5 s), not "now".
    assert_eq!(d.retry_after, 5 * SEC);
    assert_eq!(
        t.statuses(t0)[0].tokens_available,
        0.0,
        "rate bucket restarts drained"
    );
    // A renewal of a lease this run never granted, outside the window or
    // without its Acquire, is not adopted.
    let stranger = lease(7, 7);
    assert!(t.renew(stranger, None, None, t0).is_err());
    // The bucket's lease TTL is 5 s: then every earlier lease has expired.
    assert_eq!(t.tick(t0 + SEC), Some(t0 + 5 * SEC));
    t.tick(t0 + 5 * SEC);
    granted(
        t.acquire(&args("POST", "/q", 1), NOW, t0 + 5 * SEC)
            .unwrap(),
    );
    assert!(
        t.renew(stranger, None, Some(&args("POST", "/q", 1)), t0 + 5 * SEC)
            .is_err(),
        "adopted after the window"
    );
}

#[test]
fn an_adopted_lease_holds_its_slot_until_released() {
    let t0 = Instant::now();
    let mut t = restarted(t0);
    let earlier = lease(3, 9);
    let (at, ttl) = t
        .renew(earlier, None, Some(&args("POST", "/q", 1)), t0 + SEC)
        .unwrap();
    assert_eq!((at, ttl), (t0 + 6 * SEC, 5 * SEC));
    // The phantom became the adopted lease: at the window's end the slot
    // stays held.
    t.tick(t0 + 5 * SEC);
    assert!(matches!(
        t.acquire(&args("POST", "/q", 1), NOW, t0 + 5 * SEC)
            .unwrap(),
        Decision::Denied(_)
    ));
    assert!(t.release(earlier));
    granted(
        t.acquire(&args("POST", "/q", 1), NOW, t0 + 5 * SEC)
            .unwrap(),
    );
}

#[test]
fn an_adopted_lease_that_expired_is_not_adopted_again() {
    let t0 = Instant::now();
    let mut t = restarted(t0);
    let earlier = lease(3, 9);
    let with = args("POST", "/q", 1);
    // Adopted for one second only, then let expire inside the window.
    t.renew(earlier, Some(SEC), Some(&with), t0).unwrap();
    t.tick(t0 + 2 * SEC);
    // Renewed late: its slot went back to the pool; adopting it again
    // would take the phantom of another holder still calling.
    assert!(t.renew(earlier, None, Some(&with), t0 + 2 * SEC).is_err());
}

#[test]
fn a_guessed_lease_id_is_not_adopted() {
    let t0 = Instant::now();
    let mut t = restarted(t0);
    let earlier = lease(3, 9);
    let with = args("POST", "/q", 1);
    t.renew(earlier, None, Some(&with), t0).unwrap();
    // The same sequence number under another nonce must not replace the
    // adopted lease (its slot would never come back).
    let guessed = LeaseId {
        nonce: 10,
        ..earlier
    };
    assert!(t.renew(guessed, None, Some(&with), t0).is_err());
    assert!(!t.release(guessed));
    // Nor is a number this run issued (its lease released, or one that
    // held no slot).
    // (The rate bucket restarts drained: its first permit half a second on.)
    let half = t0 + SEC / 2;
    let ours = granted(t.acquire(&args("GET", "/", 1), NOW, half).unwrap()).lease_id;
    assert_eq!(ours.seq, 101);
    assert!(t.renew(ours, None, Some(&with), half).is_err());
    assert!(
        t.release(earlier),
        "the adopted lease is still the one held"
    );
    granted(t.acquire(&with, NOW, t0 + SEC).unwrap());
}

#[test]
fn a_lease_numbered_above_this_runs_start_is_adopted_and_its_number_never_reissued() {
    // The last leader's clock ran ahead of this host's: its lease numbers
    // (taken from its clock) are above this run's start.
    let t0 = Instant::now();
    let mut t = restarted(t0);
    let ahead = lease(102, 9);
    let with = args("POST", "/q", 1);
    t.renew(ahead, None, Some(&with), t0)
        .expect("the lease of a leader whose clock ran ahead is adopted");
    // Numbering goes past it without issuing it again.
    let first = granted(t.acquire(&args("GET", "/", 1), NOW, t0 + SEC / 2).unwrap());
    let second = granted(t.acquire(&args("GET", "/", 1), NOW, t0 + SEC).unwrap());
    assert_eq!((first.lease_id.seq, second.lease_id.seq), (101, 103));
    // Renewed, it holds its slot past the learning window, until released.
    t.renew(ahead, None, None, t0 + 3 * SEC).unwrap();
    t.tick(t0 + 5 * SEC);
    assert!(matches!(
        t.acquire(&with, NOW, t0 + 5 * SEC).unwrap(),
        Decision::Denied(_)
    ));
    assert!(t.release(ahead));
    granted(t.acquire(&with, NOW, t0 + 5 * SEC).unwrap());
}

#[test]
fn leases_are_handed_over_only_when_no_slot_is_held_by_an_unknown_one() {
    let t0 = Instant::now();
    let mut t = restarted(t0);
    // An earlier leader's leases may still hold the slot: the next leader
    // must learn them again, not take "no lease" for the truth.
    assert_eq!(t.live_leases(t0), None);
    t.tick(t0 + 5 * SEC);
    let held = granted(
        t.acquire(&args("POST", "/q", 1), NOW, t0 + 5 * SEC)
            .unwrap(),
    );
    let leases = t
        .live_leases(t0 + 6 * SEC)
        .expect("every slot's lease is known");
    assert_eq!(leases.len(), 1);
    let mut next = tenant(TWO, t0);
    assert!(next.resume_leases(&leases, 600 * SEC, t0 + 6 * SEC));
    assert!(matches!(
        next.acquire(&args("POST", "/q", 1), NOW, t0 + 6 * SEC)
            .unwrap(),
        Decision::Denied(_)
    ));
    assert!(next.release(held.lease_id));
}

/// A holder that lets go before any renewal claimed its lease (the broker
/// crashed and came back between two renewals) says which Acquire granted
/// it: the slot is free at once, not counted as held for a lease TTL.
#[test]
fn a_release_of_an_earlier_runs_lease_frees_its_slot_at_once() {
    let t0 = Instant::now();
    let mut t = restarted(t0);
    let q = args("POST", "/q", 1);
    assert!(matches!(
        t.acquire(&q, NOW, t0).unwrap(),
        Decision::Denied(_)
    ));
    assert!(
        !t.release(lease(3, 9)),
        "a bare release knows no such lease"
    );
    assert!(t.release_or_adopt(lease(3, 9), &q, t0 + SEC).unwrap());
    granted(t.acquire(&q, NOW, t0 + SEC).unwrap());
    // Once only; and not a lease of this run, nor after the window.
    assert!(!t.release_or_adopt(lease(3, 9), &q, t0 + SEC).unwrap());
    let mine = granted(t.acquire(&args("GET", "/x", 1), NOW, t0 + SEC).unwrap());
    assert!(!t.release_or_adopt(mine.lease_id, &q, t0 + SEC).unwrap());
    assert!(!t.release_or_adopt(lease(4, 1), &q, t0 + 6 * SEC).unwrap());
}

/// A graceful stop records its leases once its own restart window (the
/// longest lease TTL of a slot bucket) is over, whatever its rate windows:
/// before, an hourly rate bucket kept every stop within an hour of a
/// restart from recording them, and the next start held every slot.
#[test]
fn a_stop_after_the_lease_ttl_records_the_leases_whatever_the_rate_windows() {
    let t0 = Instant::now();
    let mut t = tenant(
        r#"
        [[tenants.buckets]]
        name = "hourly"
        routes = ["GET /**"]
        permits = 600
        window_ms = 3600000
        [[tenants.buckets]]
        name = "slots"
        routes = ["POST /q"]
        max_in_flight = 2
        lease_ttl_ms = 5000
        "#,
        t0,
    );
    t.start_leases_after(100);
    t.resume_after_restart(t0);
    assert_eq!(t.live_leases(t0 + SEC), None);
    t.tick(t0 + 5 * SEC);
    let held = granted(
        t.acquire(&args("POST", "/q", 1), NOW, t0 + 5 * SEC)
            .unwrap(),
    );
    let leases = t
        .live_leases(t0 + 6 * SEC)
        .expect("every slot's holder is known one lease TTL after the restart");
    assert_eq!(leases.len(), 1);
    assert!(t.release(held.lease_id));
}

/// The time no broker ran counts against the leases a graceful stop
/// recorded: one that ran out meanwhile holds no slot at the next start,
/// one with time left holds it for what is left.
#[test]
fn a_graceful_stops_leases_lose_the_time_the_broker_was_down() {
    let t0 = Instant::now();
    let config = r#"
        [[tenants.buckets]]
        name = "slots"
        routes = ["POST /q"]
        max_in_flight = 2
        lease_ttl_ms = 20000
        "#;
    let mut last = tenant(config, t0);
    let short = granted(last.acquire(&args("POST", "/q", 1), NOW, t0).unwrap());
    let long = granted(
        last.acquire(&args("POST", "/q", 1), NOW, t0 + 10 * SEC)
            .unwrap(),
    );
    // Stopped at 12 s: 8 s and 18 s left.
    let recorded = last.live_leases(t0 + 12 * SEC).unwrap();
    assert_eq!(recorded.len(), 2);
    // Down for 10 s: the first ran out, the second has 8 s left.
    let start = t0 + 22 * SEC;
    let mut next = tenant(config, start);
    assert!(next.resume_after_stop(&recorded, 10 * SEC, 600 * SEC, start));
    let one_free = next.acquire(&args("POST", "/q", 1), NOW, start).unwrap();
    granted(one_free);
    assert!(
        matches!(
            next.acquire(&args("POST", "/q", 1), NOW, start).unwrap(),
            Decision::Denied(_)
        ),
        "the lease with time left holds its slot"
    );
    assert!(
        !next.release(short.lease_id),
        "a lease that ran out is gone"
    );
    assert!(next.release(long.lease_id), "the other is known by its id");
}

#[test]
fn no_lease_is_handed_over_while_an_unseen_oauth_clients_slot_may_be_held() {
    let t0 = Instant::now();
    let mut t = tenant(
        r#"
        [[tenants.buckets]]
        name = "per-client"
        scope = "oauth_client"
        routes = ["POST /q"]
        max_in_flight = 1
        lease_ttl_ms = 5000
        "#,
        t0,
    );
    t.resume_after_restart(t0);
    // No instance yet, so no phantom: but a client the last leader served
    // may hold its slot, and would find it free at the next leader.
    assert_eq!(t.live_leases(t0 + SEC), None);
    assert_eq!(t.live_leases(t0 + 5 * SEC), Some(Vec::new()));
}

#[test]
fn handed_leases_without_a_place_here_say_so_and_live_no_longer_than_allowed() {
    let t0 = Instant::now();
    let mut last = tenant(TWO, t0);
    let held = granted(last.acquire(&args("POST", "/q", 1), NOW, t0).unwrap());
    let handed = last.live_leases(t0).unwrap();
    // Here the bucket has no slots: the lease cannot be placed.
    let mut here = tenant(
        r#"
        [[tenants.buckets]]
        name = "slots"
        routes = ["POST /q"]
        permits = 5
        window_ms = 1000
        "#,
        t0,
    );
    assert!(!here.resume_leases(&handed, 600 * SEC, t0));
    // A lease claiming more time than a renewal may give is cut to it.
    let mut next = tenant(TWO, t0);
    assert!(next.resume_leases(&handed, SEC, t0));
    next.tick(t0 + 2 * SEC);
    assert!(next.renew(held.lease_id, None, None, t0 + 2 * SEC).is_err());
}

#[test]
fn a_handed_lease_is_released_by_its_acquires_key_at_the_next_leader() {
    let t0 = Instant::now();
    let mut last = tenant(TWO, t0);
    let keyed = AcquireArgs {
        idempotency_key: "lost-answer".into(),
        ..args("POST", "/q", 1)
    };
    let held = granted(last.acquire(&keyed, NOW, t0).unwrap());
    let handed = last.live_leases(t0).unwrap();
    // Through the snapshot's JSON, as a hand-over goes.
    let json = serde_json::to_string(&handed).unwrap();
    let handed: Vec<HandedLease> = serde_json::from_str(&json).unwrap();
    let mut next = tenant(TWO, t0);
    assert!(next.resume_leases(&handed, 600 * SEC, t0));
    assert!(
        next.release_by_key("lost-answer"),
        "the client that never saw the grant releases it at the next leader"
    );
    assert!(!next.release(held.lease_id), "already released");
    granted(next.acquire(&args("POST", "/q", 1), NOW, t0).unwrap());
    // A key longer than the API takes is not taken from a snapshot.
    let mut last = tenant(TWO, t0);
    let long = "k".repeat(super::restart::MAX_HANDED_KEY + 1);
    let keyed = AcquireArgs {
        idempotency_key: long.clone(),
        ..args("POST", "/q", 1)
    };
    granted(last.acquire(&keyed, NOW, t0).unwrap());
    let mut next = tenant(TWO, t0);
    assert!(next.resume_leases(&last.live_leases(t0).unwrap(), 600 * SEC, t0));
    assert!(!next.release_by_key(&long));
}

/// A per-OAuth-client rate bucket of 10 a minute.
const PER_CLIENT: &str = r#"
    [[tenants.buckets]]
    name = "per-client"
    scope = "oauth_client"
    routes = ["* /**"]
    permits = 10
    window_ms = 60000
"#;

/// `a` with OAuth client `client`.
fn of_client(client: &str) -> AcquireArgs {
    AcquireArgs {
        oauth_client: client.into(),
        ..args("GET", "/q", 1)
    }
}

/// Permits granted at once to `client` at `now`, up to 20.
fn at_once(t: &mut TenantState, client: &str, now: Instant) -> u32 {
    (0..20)
        .take_while(|_| {
            matches!(
                t.acquire(&of_client(client), NOW, now).unwrap(),
                Decision::Granted(_)
            )
        })
        .count() as u32
}

#[test]
fn after_a_hand_over_an_oauth_client_the_last_leader_had_not_seen_starts_as_full_as_there() {
    let t0 = Instant::now();
    // A leader that knew every level: a client it never saw is full.
    let mut last = tenant(PER_CLIENT, t0);
    // What a full instance grants at once (less the higher classes' reserve).
    let full = at_once(&mut last, "seen", t0);
    assert!(full >= 5, "{full}");
    let at = t0 + 6 * SEC;
    assert_eq!(last.levels_unknown_for(at), None);
    let mut next = tenant(PER_CLIENT, t0);
    next.resume_after_restart(at);
    next.resume_levels(&last.levels(at), last.levels_unknown_for(at), at);
    assert!(
        at_once(&mut next, "seen", at) <= 1,
        "its level is handed over"
    );
    assert_eq!(at_once(&mut next, "unseen", at), full);

    // A leader itself within a window of its restart did not know the
    // level of a client it had not seen: neither does the next one, for
    // the rest of that window.
    let mut restarted = tenant(PER_CLIENT, t0);
    restarted.resume_after_restart(t0);
    let at = t0 + 20 * SEC;
    assert_eq!(restarted.levels_unknown_for(at), Some(20 * SEC));
    let mut next = tenant(PER_CLIENT, t0);
    next.resume_after_restart(at);
    next.resume_levels(&restarted.levels(at), restarted.levels_unknown_for(at), at);
    assert_eq!(at_once(&mut next, "unseen", at), 0);
    assert_eq!(at_once(&mut next, "unseen-later", t0 + 61 * SEC), full);
}

/// An org bucket of 60 a minute with a burst of 20.
const BURSTY: &str = r#"
    [[tenants.buckets]]
    name = "org"
    routes = ["* /**"]
    permits = 60
    window_ms = 60000
    burst = 20
"#;

/// A tenant on [`BURSTY`] that a 429 with `Retry-After: 10` froze at `t0`.
fn frozen_at(t0: Instant) -> TenantState {
    let mut t = tenant(BURSTY, t0);
    let info = crate::learning::RateLimitInfo::default();
    t.report(("GET", "/", "oa"), 429, Some(10 * SEC), &info, t0)
        .unwrap();
    t
}

/// Critical permits (no class reserve between) granted from `from` to
/// `from + 15 s`, asking every 100 ms for all it can get.
fn granted_over_15s(t: &mut TenantState, from: Instant) -> u32 {
    let critical = AcquireArgs {
        class: "critical".into(),
        ..args("GET", "/", 1)
    };
    (0..150)
        .map(|tick| {
            let now = from + tick * SEC / 10;
            (0..20)
                .take_while(|_| matches!(t.acquire(&critical, NOW, now), Ok(Decision::Granted(_))))
                .count() as u32
        })
        .sum()
}

#[test]
fn a_freeze_restored_after_a_crash_or_a_take_over_ends_on_an_empty_bucket() {
    let t0 = Instant::now();
    let at = t0 + 2 * SEC;
    // Never stopped: the freeze ends at 10 s on an empty bucket, then one
    // permit a second (about 5 by 17 s).
    let mut kept = frozen_at(t0);
    let paced = granted_over_15s(&mut kept, at);
    assert!((4..=6).contains(&paced), "{paced}");

    let last = frozen_at(t0);
    let restore = |t: &mut TenantState| {
        for (bucket, client, p) in last.learned(at) {
            assert!(t.restore(&bucket, client.as_deref(), p, at));
        }
    };
    // Restarted 2 s into the freeze (its state file read back): not a
    // bucket refilled from the restart on (10 at once at 10 s).
    let mut restarted = tenant(BURSTY, at);
    restore(&mut restarted);
    restarted.resume_after_restart(at);
    assert_eq!(
        granted_over_15s(&mut restarted, at),
        paced,
        "after a restart"
    );
    // Taken over with the last leader's levels (its bucket empty).
    let mut next = tenant(BURSTY, at);
    restore(&mut next);
    next.resume_after_restart(at);
    next.resume_levels(&last.levels(at), last.levels_unknown_for(at), at);
    assert_eq!(granted_over_15s(&mut next, at), paced, "after a take-over");
}

#[test]
fn a_handed_level_replaces_the_drain_of_a_take_over_that_learns_slots_again() {
    let t0 = Instant::now();
    let last = tenant(BURSTY, t0);
    let at = t0 + 2 * SEC;
    // The next leader drains as after a crash (the handed leases did not
    // fit, or the last leader was itself learning), then sets the levels
    // it was handed: full.
    let mut next = tenant(BURSTY, at);
    next.resume_after_restart(at);
    next.resume_levels(&last.levels(at), last.levels_unknown_for(at), at);
    let critical = AcquireArgs {
        class: "critical".into(),
        ..args("GET", "/", 1)
    };
    let at_once = (0..30)
        .take_while(|_| matches!(next.acquire(&critical, NOW, at), Ok(Decision::Granted(_))))
        .count();
    assert_eq!(at_once, 20);
}

#[test]
fn a_lead_that_lapsed_resumes_the_level_it_left_not_a_refilled_bucket() {
    let t0 = Instant::now();
    let mut t = tenant(BURSTY, t0);
    t.set_lead(Some(t0 + 60 * SEC), None, t0);
    let critical = AcquireArgs {
        class: "critical".into(),
        ..args("GET", "/", 1)
    };
    for _ in 0..20 {
        granted(t.acquire(&critical, NOW, t0).unwrap());
    }
    // etcd away at 1 s: the lead ends there, and comes back 30 s later
    // with no other broker having led.
    let left = t0 + SEC;
    t.set_lead(None, None, left);
    let back = left + 30 * SEC;
    t.resume_lapsed(back);
    t.set_lead(Some(back + 60 * SEC), None, back);
    // One permit earned before the lapse, none during it.
    let at_once = (0..20)
        .take_while(|_| matches!(t.acquire(&critical, NOW, back), Ok(Decision::Granted(_))))
        .count();
    assert_eq!(at_once, 1);
}

/// An empty bucket whose refill cannot give a permit within the caller's
/// wait (and a tenth) answers at once, saying so, instead of holding the
/// caller for its whole wait; one that can, queues. Full slots never answer
/// early: a release may free one at any moment.
#[test]
fn a_refill_past_the_wait_is_answered_at_once_and_full_slots_still_queue() {
    let t0 = Instant::now();
    let mut t = restarted(t0);
    // "rate" restarted empty at 2 a second: its first permit in 500 ms.
    let Decision::Denied(d) = t
        .acquire(&args("GET", "/x", 1), Some(Duration::from_millis(400)), t0)
        .unwrap()
    else {
        panic!("a wait of 400 ms queued for a permit 500 ms away")
    };
    assert_eq!(d.retry_after, Duration::from_millis(500));
    assert!(
        d.reason
            .contains("past this call's wait of 400 ms, so it is answered now"),
        "{}",
        d.reason
    );
    // Within a tenth of the wait it may still come (the rate may grow).
    let Decision::Queued(_) = t
        .acquire(&args("GET", "/x", 1), Some(Duration::from_millis(460)), t0)
        .unwrap()
    else {
        panic!("a wait that may see the permit was not queued")
    };
    // The slot is counted as held until 5 s, but a release may free it
    // sooner: a wait of 1 s queues.
    let Decision::Queued(_) = t.acquire(&args("POST", "/q", 1), Some(SEC), t0).unwrap() else {
        panic!("full slots answered before the wait")
    };
}
