//! Unit tests of what the fleet leaves in a continuous upstream bucket that
//! tells what is left of it, for the consumers the broker does not manage.

use super::tests::{args, tenant, NOW};
use super::*;
use crate::learning::RateLimitInfo;

const SEC: Duration = Duration::from_secs(1);

const BUCKET: &str = "[[tenants.buckets]]\nname = \"q\"\nroutes = [\"* /**\"]\npermits = 60\n\
                      window_ms = 60000\nburst = 10";

/// Headers of an upstream bucket of 16 refilled at 40 a minute with
/// `level` permits left.
fn told(level: f64) -> RateLimitInfo {
    RateLimitInfo {
        limit: Some(16),
        remaining: Some(level.max(0.0).floor() as u64),
        reset: Some(Duration::from_secs_f64((16.0 - level).max(0.0) * 1.5)),
        ..RateLimitInfo::default()
    }
}

fn class(name: &str) -> AcquireArgs {
    let mut a = args("GET", "/", 1);
    a.class = name.into();
    a
}

/// An upstream bucket of 16 refilled at 40 a minute that tells its level,
/// shared with a consumer the broker does not manage that sends 8 back to
/// back once a minute; the fleet's batch asks all the time. The broker
/// spends what the others leave and leaves them their bursts. Before, it
/// spent every token the headers said were left, so the burst found the
/// bucket empty: the consumer was refused 60 of its 80, and the fleet was
/// served 393 (now 327, all the others leave).
#[test]
fn the_fleet_leaves_a_bursty_consumer_its_bursts_and_takes_the_rest() {
    let t0 = Instant::now();
    let mut t = tenant(BUCKET, t0);
    let step = Duration::from_millis(100);
    let (mut level, mut served, mut refused, mut throttled) = (16.0_f64, 0u32, 0u32, 0u32);
    // Granted at one step, served by the upstream at the next.
    let mut in_flight = 0u32;
    for k in 0..6000u32 {
        let now = t0 + step * k;
        level = (level + 40.0 / 600.0).min(16.0);
        if k % 600 == 200 {
            for _ in 0..8 {
                if level >= 1.0 {
                    level -= 1.0;
                } else {
                    refused += 1;
                }
            }
        }
        for _ in 0..std::mem::take(&mut in_flight) {
            if level >= 1.0 {
                level -= 1.0;
                served += 1;
                t.report(("GET", "/", "oa"), 200, None, &told(level), now)
                    .unwrap();
            } else {
                throttled += 1;
                let wait = Duration::from_secs_f64((1.0 - level) * 1.5);
                t.report(("GET", "/", "oa"), 429, Some(wait), &told(level), now)
                    .unwrap();
            }
        }
        while let Decision::Granted(_) = t.acquire(&class("batch"), NOW, now).unwrap() {
            in_flight += 1;
        }
    }
    // 16 at the start and 400 refilled; the consumer takes 80; the floor
    // of 8 stays.
    assert_eq!(
        refused, 0,
        "the consumer was refused; fleet served {served}"
    );
    assert!(
        served >= 310,
        "fleet served {served}, throttled {throttled}"
    );
    assert!(throttled <= 2, "{throttled} of the fleet's calls throttled");
}

/// Below the floor, batch waits with a reason that says why, and a
/// critical call is granted at once: the first class may take the bucket
/// down to empty.
#[test]
fn below_the_floor_batch_waits_and_critical_is_served() {
    let t0 = Instant::now();
    let mut t = tenant(BUCKET, t0);
    // Seen empty once: its reset then is the time to refill it whole.
    t.report(("GET", "/", "oa"), 200, None, &told(0.0), t0)
        .unwrap();
    let t0 = t0 + 10 * SEC;
    t.report(("GET", "/", "oa"), 200, None, &told(4.0), t0)
        .unwrap();
    let Decision::Denied(denial) = t.acquire(&class("batch"), NOW, t0).unwrap() else {
        panic!("batch took a permit left for the others");
    };
    assert!(
        denial
            .reason
            .contains("4.0 of 16 permits left, and 8 are left in it for consumers"),
        "{}",
        denial.reason
    );
    // Five permits refill at 40 a minute: 7.5 s.
    assert!(
        denial.retry_after > 7 * SEC && denial.retry_after <= 8 * SEC,
        "{:?}",
        denial.retry_after
    );
    assert!(matches!(
        t.acquire(&class("critical"), NOW, t0).unwrap(),
        Decision::Granted(_)
    ));
    // What is left, as the broker follows it, is shown: 4, less the
    // critical grant.
    assert_eq!(t.statuses(t0)[0].upstream_remaining, Some(3));
    // The upstream says 9 are left: one above the floor for batch.
    let later = t0 + SEC;
    t.report(("GET", "/", "oa"), 200, None, &told(9.0), later)
        .unwrap();
    assert!(matches!(
        t.acquire(&class("batch"), NOW, later).unwrap(),
        Decision::Granted(_)
    ));
    assert!(matches!(
        t.acquire(&class("batch"), NOW, later).unwrap(),
        Decision::Denied(_)
    ));
}

/// Batch saturates the bucket with waiters always queued (no unmanaged
/// consumer); an interactive call (a call-flow relay) every 10 s and a
/// critical poll every 2 s, neither waiting. The classes the reserves are
/// for are served at once: the floor is left by batch, not by them. (When
/// every class below the first left it, interactive was granted 0 of 54.)
#[test]
fn the_classes_reserves_are_for_are_served_at_once_while_batch_saturates() {
    use tokio::sync::oneshot::error::TryRecvError;
    let t0 = Instant::now();
    let mut t = tenant(BUCKET, t0);
    let step = Duration::from_millis(100);
    let (mut level, mut in_flight) = (16.0_f64, 0u32);
    let mut waiting: Vec<Queued> = Vec::new();
    let mut asked = [0u32; 2];
    let mut granted = [0u32; 2];
    for k in 0..6000u32 {
        let now = t0 + step * k;
        level = (level + 40.0 / 600.0).min(16.0);
        for _ in 0..std::mem::take(&mut in_flight) {
            let status = if level >= 1.0 {
                level -= 1.0;
                200
            } else {
                429
            };
            t.report(("GET", "/", "oa"), status, Some(SEC), &told(level), now)
                .unwrap();
        }
        while waiting.len() < 4 {
            match t.acquire(&class("batch"), super::tests::WAIT, now).unwrap() {
                Decision::Granted(_) => in_flight += 1,
                Decision::Queued(q) => waiting.push(q),
                Decision::Denied(_) => break,
            }
        }
        if k > 600 {
            for (c, name, every) in [(0, "critical", 20), (1, "interactive", 100)] {
                if k % every == every / 2 {
                    asked[c] += 1;
                    if let Decision::Granted(_) = t.acquire(&class(name), NOW, now).unwrap() {
                        granted[c] += 1;
                        in_flight += 1;
                    }
                }
            }
        }
        t.tick(now);
        waiting.retain_mut(|q| match q.reply.try_recv() {
            Ok(Ok(_)) => {
                in_flight += 1;
                false
            }
            Err(TryRecvError::Empty) => true,
            _ => false,
        });
    }
    assert!(
        granted[0] * 10 >= asked[0] * 9 && granted[1] * 10 >= asked[1] * 9,
        "critical granted {} of {}, interactive {} of {}",
        granted[0],
        asked[0],
        granted[1],
        asked[1]
    );
}

/// A refusal for the floor tells when the broker's own bucket will have a
/// permit too: a caller that waits what it was told is served. (It said
/// 1.5 s, the view's, where the bucket, cut to 10 a minute, needed 10.5.)
#[test]
fn a_refusal_for_the_floor_waits_for_the_bucket_too() {
    let t0 = Instant::now();
    let mut t = tenant(BUCKET, t0);
    t.report(("GET", "/", "oa"), 200, None, &told(0.0), t0)
        .unwrap();
    let now = t0 + 10 * SEC;
    t.report(("GET", "/", "oa"), 200, None, &told(8.0), now)
        .unwrap();
    for (_, x) in t.instances.iter_mut() {
        if let Some(b) = x.tokens.as_mut() {
            b.set_rate_per_min(10.0, now);
            b.shrink_to(0, now);
        }
    }
    let Decision::Denied(d) = t.acquire(&class("batch"), NOW, now).unwrap() else {
        panic!("granted from an empty bucket");
    };
    assert!(
        matches!(
            t.acquire(&class("batch"), NOW, now + d.retry_after)
                .unwrap(),
            Decision::Granted(_)
        ),
        "refused again after the {:?} it was told: {}",
        d.retry_after,
        d.reason
    );
}

/// The view refills at the rate the headers state, not at the broker's:
/// configured 30 a minute under an upstream refilled at 40, five permits
/// below the floor are 7.5 s away (10 s at the broker's rate).
#[test]
fn the_view_refills_at_the_stated_rate() {
    let t0 = Instant::now();
    let bucket = "[[tenants.buckets]]\nname = \"q\"\nroutes = [\"* /**\"]\npermits = 30\n\
                  window_ms = 60000\nburst = 10";
    let mut t = tenant(bucket, t0);
    t.report(("GET", "/", "oa"), 200, None, &told(0.0), t0)
        .unwrap();
    let now = t0 + 30 * SEC;
    t.report(("GET", "/", "oa"), 200, None, &told(4.0), now)
        .unwrap();
    let Decision::Denied(d) = t.acquire(&class("batch"), NOW, now).unwrap() else {
        panic!("batch took a permit left for the others");
    };
    assert!(
        d.retry_after > 7 * SEC && d.retry_after <= Duration::from_millis(7600),
        "{:?}: {}",
        d.retry_after,
        d.reason
    );
}

/// Forgetting what was learned about a bucket forgets the view too.
#[test]
fn forgetting_the_learned_state_forgets_the_view() {
    let t0 = Instant::now();
    let mut t = tenant(BUCKET, t0);
    t.report(("GET", "/", "oa"), 200, None, &told(0.0), t0)
        .unwrap();
    t.report(("GET", "/", "oa"), 200, None, &told(1.0), t0 + SEC)
        .unwrap();
    assert!(t.instances.iter().any(|(_, x)| x.kept.is_some()));
    t.clear_learned("q", None, t0 + SEC).unwrap();
    assert!(t.instances.iter().all(|(_, x)| x.kept.is_none()));
}
