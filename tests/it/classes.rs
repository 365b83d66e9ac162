//! Priority classes under saturation, the waiter cap, pause/resume, admin
//! changes that survive a restart, and every auth case. All on tokio's
//! paused clock: minutes of saturation run in milliseconds.

use crate::harness::{req, start, TestBroker};
use quota_broker::pb::{
    AcquireRequest, ListBucketsRequest, ListPriorityClassesRequest, PauseBucketRequest,
    PriorityClass, QuotaStatus, ResumeBucketRequest, SetBucketLimitRequest,
    SetPriorityClassRequest,
};
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// One tenant "t", one org bucket of 10 per second (burst 10), the default
/// classes (critical and interactive each reserve 10%).
fn saturated(extra: &str) -> String {
    format!(
        "[server]\nstate_dir = \"\"\n{extra}\n[[tenants]]\nid = \"t\"\n\
         [[tenants.buckets]]\nname = \"org\"\nroutes = [\"* /**\"]\npermits = 600\nwindow_ms = 60000\nburst = 10\n"
    )
}

/// [`saturated`] with its state kept in `dir`.
fn saturated_in(dir: &std::path::Path) -> String {
    saturated("").replace(
        "state_dir = \"\"",
        &format!("state_dir = {:?}", dir.to_str().unwrap()),
    )
}

/// Pauses bucket "org" of tenant "t" for maintenance.
async fn pause_org(
    admin: &mut quota_broker::pb::quota_admin_client::QuotaAdminClient<tonic::transport::Channel>,
) {
    admin
        .pause_bucket(PauseBucketRequest {
            tenant: "t".into(),
            bucket: "org".into(),
            reason: "maintenance".into(),
        })
        .await
        .unwrap();
}

/// Resumes bucket "org" of tenant "t".
async fn resume_org(
    admin: &mut quota_broker::pb::quota_admin_client::QuotaAdminClient<tonic::transport::Channel>,
) {
    admin
        .resume_bucket(ResumeBucketRequest {
            tenant: "t".into(),
            bucket: "org".into(),
        })
        .await
        .unwrap();
}

fn class_req(class: &str, client: &str, max_wait_ms: u64) -> AcquireRequest {
    let mut r = req("GET", "/api/v2/analytics/queues/observations", max_wait_ms);
    r.priority_class = class.into();
    r.client_id = client.into();
    r
}

/// `loops` concurrent greedy loops of `client` in `class` until `end`;
/// returns the grants and each grant's wait.
fn greedy(
    b: &TestBroker,
    class: &str,
    client: &str,
    loops: usize,
    end: Instant,
) -> Vec<tokio::task::JoinHandle<Vec<Duration>>> {
    (0..loops)
        .map(|_| {
            let mut c = b.client.clone();
            let (class, client) = (class.to_owned(), client.to_owned());
            tokio::spawn(async move {
                let mut waits = Vec::new();
                while Instant::now() < end {
                    let t0 = Instant::now();
                    let r = c
                        .acquire(class_req(&class, &client, 60_000))
                        .await
                        .unwrap()
                        .into_inner();
                    if r.granted && Instant::now() <= end {
                        waits.push(t0.elapsed());
                    }
                }
                waits
            })
        })
        .collect()
}

async fn collect(handles: Vec<tokio::task::JoinHandle<Vec<Duration>>>) -> Vec<Duration> {
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all
}

fn percentile(waits: &mut [Duration], p: f64) -> Duration {
    waits.sort();
    waits[((waits.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(start_paused = true)]
async fn critical_is_served_at_once_while_batch_saturates_and_batch_never_takes_the_reserve() {
    let b = start(&saturated("")).await;
    let end = Instant::now() + Duration::from_secs(60);
    let batch = greedy(&b, "batch", "ingest", 8, end);
    // A wallboard polling every 2 s, and an interactive relay every 500 ms.
    let poll = |class: &'static str, every_ms: u64| {
        let mut c = b.client.clone();
        tokio::spawn(async move {
            let mut waits = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(every_ms));
            while Instant::now() < end {
                tick.tick().await;
                let t0 = Instant::now();
                let r = c
                    .acquire(class_req(class, class, 5_000))
                    .await
                    .unwrap()
                    .into_inner();
                assert!(r.granted, "{class}: {}", r.reason);
                waits.push(t0.elapsed());
            }
            waits
        })
    };
    let critical = poll("critical", 2_000);
    let interactive = poll("interactive", 500);
    let mut critical = critical.await.unwrap();
    let mut interactive = interactive.await.unwrap();
    let mut batch = collect(batch).await;
    let refill = Duration::from_millis(100);
    for (name, waits) in [
        ("critical", &mut critical),
        ("interactive", &mut interactive),
        ("batch", &mut batch),
    ] {
        eprintln!(
            "{name}: {} grants, wait p50 {:?} p99 {:?} max {:?}",
            waits.len(),
            percentile(waits, 0.5),
            percentile(waits, 0.99),
            waits.iter().max().unwrap()
        );
    }
    assert!(
        critical.iter().all(|w| *w <= refill),
        "critical waited past one refill: {critical:?}"
    );
    assert!(
        interactive.iter().all(|w| *w <= refill),
        "interactive waited past one refill"
    );
    // Batch got everything else: 10/s for 60 s plus the burst, less the others' share.
    let total = batch.len() + critical.len() + interactive.len();
    assert!(
        (590..=611).contains(&total),
        "{total} grants in 60 s at 10/s"
    );
    // The polls take at most one grant per tick (31 + 121 in 60 s), so
    // batch, saturating, must have had all the rest.
    let polls = (60_000 / 2_000 + 1) + (60_000 / 500 + 1);
    assert!(critical.len() + interactive.len() <= polls);
    assert!(
        batch.len() >= 590 - polls,
        "batch got {} of {total}",
        batch.len()
    );
    // With batch still saturating, the reserve is there for a critical call.
    let end2 = Instant::now() + Duration::from_secs(5);
    let batch2 = greedy(&b, "batch", "ingest", 8, end2);
    tokio::time::advance(Duration::from_secs(2)).await;
    let s = b.bucket("org").await;
    assert!(
        s.tokens_available >= 1.0,
        "batch left the reserve: {}",
        s.tokens_available
    );
    let r = b.acquire(class_req("critical", "wallboard", 0)).await;
    assert!(r.granted, "{}", r.reason);
    collect(batch2).await;
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn batch_clients_with_different_demand_get_equal_shares() {
    let b = start(&saturated("")).await;
    let end = Instant::now() + Duration::from_secs(60);
    let greedy_client = greedy(&b, "batch", "greedy", 12, end);
    let modest_client = greedy(&b, "batch", "modest", 2, end);
    let g = collect(greedy_client).await.len() as f64;
    let m = collect(modest_client).await.len() as f64;
    eprintln!("greedy {g}, modest {m}");
    assert!((m / g - 1.0).abs() <= 0.05, "greedy {g} vs modest {m}");
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn weights_are_honoured_within_five_percent() {
    let classes = "[scheduling]\ndefault_class = \"low\"\n\
        [[classes]]\nname = \"high\"\norder = 0\nweight = 3\n\
        [[classes]]\nname = \"low\"\norder = 1\nweight = 1\n";
    let b = start(&saturated(classes)).await;
    let end = Instant::now() + Duration::from_secs(60);
    let high = greedy(&b, "high", "h", 6, end);
    let low = greedy(&b, "low", "l", 6, end);
    let h = collect(high).await.len() as f64;
    let l = collect(low).await.len() as f64;
    eprintln!("weight 3: {h} grants, weight 1: {l} grants");
    let share = h / (h + l);
    assert!(
        (share - 0.75).abs() <= 0.05 * 0.75,
        "high got {share:.3} of the grants, not 0.75"
    );
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_waiter_cap_answers_at_once() {
    let b = start(&saturated("[scheduling]\nmax_waiters_per_bucket = 2\n")).await;
    // Empty the bucket (8 of 10 are batch's).
    for _ in 0..8 {
        assert!(b.acquire(class_req("batch", "x", 0)).await.granted);
    }
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let mut c = b.client.clone();
            tokio::spawn(async move { c.acquire(class_req("batch", "x", 60_000)).await })
        })
        .collect();
    let mut w = b.watch_all().await;
    crate::harness::wait_for(&mut w, |s| s.waiting.get("batch") == Some(&2)).await;
    let r = crate::harness::clock_held(
        "a waiter beyond the cap answered at once",
        b.acquire(class_req("batch", "x", 60_000)),
    )
    .await;
    assert!(!r.granted);
    assert!(r.reason.contains("max_waiters_per_bucket"), "{}", r.reason);
    for wt in waiters {
        assert!(wt.await.unwrap().unwrap().into_inner().granted);
    }
    b.stop().await;
}

/// A bucket's (configured rate a minute, burst, slot limit, paused).
fn limits_of(s: &QuotaStatus) -> (f64, u32, u32, bool) {
    (
        s.configured_rate_per_min,
        s.burst,
        s.max_in_flight,
        s.paused,
    )
}

async fn list(b: &TestBroker) -> HashMap<String, QuotaStatus> {
    let l = b
        .admin
        .clone()
        .list_buckets(ListBucketsRequest::default())
        .await
        .unwrap()
        .into_inner();
    l.buckets
        .into_iter()
        .map(|s| (s.bucket.clone(), s))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn pause_tells_waiters_why_and_resume_grants_again() {
    let b = start(&saturated("")).await;
    for _ in 0..8 {
        assert!(b.acquire(class_req("batch", "x", 0)).await.granted);
    }
    let mut c = b.client.clone();
    let waiter = tokio::spawn(async move { c.acquire(class_req("batch", "x", 60_000)).await });
    let mut w = b.watch_all().await;
    crate::harness::wait_for(&mut w, |s| s.waiting.get("batch") == Some(&1)).await;
    let paused = b
        .admin
        .clone()
        .pause_bucket(PauseBucketRequest {
            tenant: "t".into(),
            bucket: "org".into(),
            reason: "upstream incident #42".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(paused.status.unwrap().paused);
    let answer = waiter.await.unwrap().unwrap().into_inner();
    assert!(!answer.granted);
    assert!(
        answer
            .reason
            .contains("paused by an operator: upstream incident #42"),
        "{}",
        answer.reason
    );
    tokio::time::advance(Duration::from_secs(10)).await;
    let r = b.acquire(class_req("critical", "wallboard", 1_000)).await;
    assert!(!r.granted && r.reason.contains("paused"), "{}", r.reason);
    // Asked to come back later, not at once (a caller that honours 0 spins).
    assert_eq!(r.retry_after_ms, 5_000);
    resume_org(&mut b.admin.clone()).await;
    assert!(b.acquire(class_req("batch", "x", 0)).await.granted);
    assert!(!list(&b).await["org"].paused);
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn admin_changes_apply_at_once_and_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("qb-admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = saturated_in(&dir);
    let b = start(&cfg).await;
    let mut admin = b.admin.clone();
    let class = PriorityClass {
        name: "reports".into(),
        order: 1,
        weight: 3,
        reserve: 0.05,
        default_max_wait_ms: 100,
    };
    let set = admin
        .set_priority_class(SetPriorityClassRequest {
            reset: false,
            tenant: "t".into(),
            class: Some(class.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.class.as_ref(), Some(&class));
    let limit = admin
        .set_bucket_limit(SetBucketLimitRequest {
            tenant: "t".into(),
            bucket: "org".into(),
            permits: 120,
            window_ms: 60_000,
            burst: 4,
            max_in_flight: 3,
            reset: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(
        (
            limit.configured_rate_per_min,
            limit.burst,
            limit.max_in_flight
        ),
        (120.0, 4, 3)
    );
    assert!(limit.tokens_available <= 4.0);
    pause_org(&mut admin).await;
    // A bad class is refused with the reason.
    let bad = PriorityClass {
        name: "greedy".into(),
        order: 9,
        weight: 1,
        reserve: 0.9,
        default_max_wait_ms: 0,
    };
    let err = admin
        .set_priority_class(SetPriorityClassRequest {
            reset: false,
            tenant: "t".into(),
            class: Some(bad),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("reserves add up to"),
        "{}",
        err.message()
    );
    b.stop().await;

    let b = start(&cfg).await;
    let org = list(&b).await.remove("org").unwrap();
    assert_eq!(limits_of(&org), (120.0, 4, 3, true));
    // The class list after the restart: the config's and the one added,
    // served first to last.
    let listed = b
        .admin
        .clone()
        .list_priority_classes(ListPriorityClassesRequest { tenant: "t".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.classes.contains(&class), "{listed:?}");
    assert!(listed
        .classes
        .windows(2)
        .all(|w| (w[0].order, &w[0].name) <= (w[1].order, &w[1].name)));
    assert!(listed
        .classes
        .iter()
        .any(|c| c.name == listed.default_class));
    for (tenant, code) in [
        ("", tonic::Code::InvalidArgument),
        ("nobody", tonic::Code::NotFound),
    ] {
        let err = b
            .admin
            .clone()
            .list_priority_classes(ListPriorityClassesRequest {
                tenant: tenant.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{tenant:?}: {err:?}");
    }
    resume_org(&mut b.admin.clone()).await;
    // After a restart every slot counts as held until renewals claim it or
    // one lease TTL passes (the restart learning mode): wait that out.
    let r = b.acquire(class_req("reports", "r", 60_000)).await;
    assert!(r.granted, "the restored class exists: {}", r.reason);
    b.stop().await;

    std::fs::write(dir.join("admin.toml"), "classes = 3").unwrap();
    let b = start(&cfg).await;
    let org = list(&b).await.remove("org").unwrap();
    assert_eq!(
        org.configured_rate_per_min, 600.0,
        "corrupt file: config alone"
    );
    b.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `reset` undoes operators' changes to a class: a class of the config is
/// the config's again, and one an operator added is removed (new Acquires
/// naming it refused, one already waiting in it still served); neither
/// comes back after a restart.
#[tokio::test(start_paused = true)]
async fn a_reset_class_is_the_configs_again_or_removed_and_stays_so_after_a_restart() {
    let dir = crate::harness::fresh_dir("class-reset");
    let cfg = saturated_in(&dir);
    let b = start(&cfg).await;
    let mut admin = b.admin.clone();
    let classes = |b: &TestBroker| {
        let mut admin = b.admin.clone();
        async move {
            admin
                .list_priority_classes(ListPriorityClassesRequest { tenant: "t".into() })
                .await
                .unwrap()
                .into_inner()
                .classes
        }
    };
    let set = |class: PriorityClass, reset: bool| SetPriorityClassRequest {
        tenant: "t".into(),
        class: Some(class),
        reset,
    };
    let named = |name: &str| PriorityClass {
        name: name.into(),
        ..Default::default()
    };
    let configured = classes(&b).await;
    let critical = configured
        .iter()
        .find(|c| c.name == "critical")
        .unwrap()
        .clone();
    let reports = PriorityClass {
        name: "reports".into(),
        order: 5,
        weight: 1,
        reserve: 0.0,
        default_max_wait_ms: 0,
    };
    admin
        .set_priority_class(set(reports.clone(), false))
        .await
        .unwrap();
    let heavier = PriorityClass {
        weight: critical.weight + 7,
        ..critical.clone()
    };
    admin
        .set_priority_class(set(heavier.clone(), false))
        .await
        .unwrap();
    assert!(classes(&b).await.contains(&heavier));

    // One Acquire of "reports" waits on the saturated bucket.
    for _ in 0..8 {
        assert!(b.acquire(class_req("batch", "x", 0)).await.granted);
    }
    let mut w = b.watch_all().await;
    let mut c = b.client.clone();
    let waiter = tokio::spawn(async move { c.acquire(class_req("reports", "r", 60_000)).await });
    crate::harness::wait_for(&mut w, |s| s.waiting.get("reports") == Some(&1)).await;

    // Removed: gone from the list, refused by name, the waiter still served.
    let removed = admin
        .set_priority_class(set(named("reports"), true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.class, None);
    assert!(!classes(&b).await.iter().any(|c| c.name == "reports"));
    let err = b
        .client
        .clone()
        .acquire(class_req("reports", "r", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("critical"), "{}", err.message());
    let served = waiter.await.unwrap().unwrap().into_inner();
    assert!(served.granted, "{}", served.reason);
    // The config's class is the config's again.
    let back = admin
        .set_priority_class(set(named("critical"), true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.class.as_ref(), Some(&critical));
    // Refused: fields beside reset, a class the tenant does not have (the
    // removed one included), the default class... which the config has, so
    // reset to it.
    for (class, what) in [
        (heavier.clone(), "give only its name"),
        (named("reports"), "not a class"),
        (named(""), "class.name"),
    ] {
        let err = admin
            .set_priority_class(set(class, true))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}");
        assert!(err.message().contains(what), "{}", err.message());
    }
    // Added again after its removal, then removed again.
    admin
        .set_priority_class(set(reports.clone(), false))
        .await
        .unwrap();
    assert!(classes(&b).await.contains(&reports));
    assert!(b.acquire(class_req("reports", "r", 60_000)).await.granted);
    admin
        .set_priority_class(set(named("reports"), true))
        .await
        .unwrap();
    b.stop().await;

    let b = start(&cfg).await;
    assert_eq!(classes(&b).await, configured, "after the restart");
    b.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// An operator's limits are undone with `reset`: a slot limit the config
/// does not have is removed (a lease holding one of its slots releases
/// into nothing), the rate and burst go back to the config's, nothing is
/// re-applied at the next start, and a pause stays. `reset` with a limit
/// beside it is refused.
#[tokio::test]
async fn an_operators_limits_reset_go_back_to_the_config_and_stay_back() {
    let dir = std::env::temp_dir().join(format!("qb-admin-reset-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = saturated_in(&dir);
    let b = start(&cfg).await;
    let mut admin = b.admin.clone();
    let set = |permits, max_in_flight, reset| SetBucketLimitRequest {
        tenant: "t".into(),
        bucket: "org".into(),
        permits,
        window_ms: 0,
        burst: 0,
        max_in_flight,
        reset,
    };
    admin.set_bucket_limit(set(60, 1, false)).await.unwrap();
    let org = list(&b).await.remove("org").unwrap();
    assert_eq!((org.configured_rate_per_min, org.max_in_flight), (60.0, 1));
    let held = b.acquire(class_req("critical", "x", 0)).await;
    assert!(held.granted, "{}", held.reason);
    let full = b.acquire(class_req("critical", "y", 0)).await;
    assert!(!full.granted, "the operator's one slot is held");
    pause_org(&mut admin).await;
    let err = admin.set_bucket_limit(set(60, 0, true)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("reset puts every limit back"),
        "{}",
        err.message()
    );
    let reset = admin
        .set_bucket_limit(set(0, 0, true))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(limits_of(&reset), (600.0, 10, 0, true));
    assert_eq!(reset.pause_reason, "maintenance");
    resume_org(&mut admin).await;
    // No slot limit any more: granted while the first lease still runs.
    let free = b.acquire(class_req("critical", "y", 0)).await;
    assert!(free.granted, "{}", free.reason);
    b.client
        .clone()
        .release(quota_broker::pb::ReleaseRequest {
            tenant: "t".into(),
            lease_id: held.lease_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    b.stop().await;
    let saved = std::fs::read_to_string(dir.join("admin.toml")).unwrap_or_default();
    assert!(
        !saved.contains("org"),
        "the reset bucket is still saved:\n{saved}"
    );
    let b = start(&cfg).await;
    let org = list(&b).await.remove("org").unwrap();
    assert_eq!(limits_of(&org), (600.0, 10, 0, false));
    b.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_pause_pins_no_limit_so_a_config_edit_still_takes_effect() {
    let dir = std::env::temp_dir().join(format!("qb-admin-pin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg =
        |permits: u32| saturated_in(&dir).replace("permits = 600", &format!("permits = {permits}"));
    let b = start(&cfg(600)).await;
    pause_org(&mut b.admin.clone()).await;
    b.stop().await;
    let saved = std::fs::read_to_string(dir.join("admin.toml")).unwrap();
    assert!(
        !saved.contains("permits"),
        "a pause pinned the rate:\n{saved}"
    );
    // The config's rate is edited while the bucket is paused: the edit
    // takes effect, the pause stays.
    let b = start(&cfg(300)).await;
    let org = list(&b).await.remove("org").unwrap();
    b.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!((org.configured_rate_per_min, org.paused), (300.0, true));
}

/// A burst as large as the config's permits, kept by an operator who
/// lowered the permits, is still that burst after a restart (replayed
/// alone, the saved permits would have taken the burst with them).
#[tokio::test]
async fn an_operators_burst_survives_a_restart_beside_changed_permits() {
    let dir = std::env::temp_dir().join(format!("qb-admin-burst-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = saturated_in(&dir).replace("burst = 10\n", "");
    let b = start(&cfg).await;
    b.admin
        .clone()
        .set_bucket_limit(SetBucketLimitRequest {
            tenant: "t".into(),
            bucket: "org".into(),
            permits: 100,
            window_ms: 0,
            burst: 600,
            max_in_flight: 0,
            reset: false,
        })
        .await
        .unwrap();
    assert_eq!(list(&b).await.remove("org").unwrap().burst, 600);
    b.stop().await;
    let b = start(&cfg).await;
    let org = list(&b).await.remove("org").unwrap();
    b.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!((org.configured_rate_per_min, org.burst), (100.0, 600));
}

/// Permits an operator raises past the most a burst may be, on a bucket
/// whose burst follows them, are refused saying the burst follows and how
/// to give one; a rate finer than the broker paces is refused too.
#[tokio::test]
async fn permits_beyond_what_a_bucket_can_hold_or_pace_are_refused_saying_why() {
    let b = start(&saturated("").replace("burst = 10\n", "")).await;
    let limit = |permits, window_ms, burst| SetBucketLimitRequest {
        tenant: "t".into(),
        bucket: "org".into(),
        permits,
        window_ms,
        burst,
        max_in_flight: 0,
        reset: false,
    };
    let mut admin = b.admin.clone();
    let err = admin
        .set_bucket_limit(limit(u32::MAX, 0, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("burst not given, so it would be permits (4294967295)")
            && err.message().contains("give burst explicitly"),
        "{}",
        err.message()
    );
    let err = admin
        .set_bucket_limit(limit(u32::MAX, 1, 10))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("more than one a nanosecond"),
        "{}",
        err.message()
    );
    // Nothing changed.
    assert_eq!(
        list(&b)
            .await
            .remove("org")
            .unwrap()
            .configured_rate_per_min,
        600.0
    );
    admin
        .set_bucket_limit(limit(u32::MAX, 86_400_000, 1000))
        .await
        .expect("a large rate with a burst given");
    b.stop().await;
}

/// A burst the operator did not change is not saved beside the permits
/// they changed: after a restart it is the edited config's.
#[tokio::test]
async fn a_burst_the_operator_left_follows_an_edit_of_the_config() {
    let dir = std::env::temp_dir().join(format!("qb-admin-burst-left-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let b = start(&saturated_in(&dir)).await;
    b.admin
        .clone()
        .set_bucket_limit(SetBucketLimitRequest {
            tenant: "t".into(),
            bucket: "org".into(),
            permits: 300,
            window_ms: 60_000,
            burst: 0,
            max_in_flight: 0,
            reset: false,
        })
        .await
        .unwrap();
    assert_eq!(list(&b).await.remove("org").unwrap().burst, 10);
    b.stop().await;
    let saved = std::fs::read_to_string(dir.join("admin.toml")).unwrap();
    // The window given equals the config's: not saved either.
    assert!(
        saved.contains("permits = 300") && !saved.contains("burst") && !saved.contains("window"),
        "only the permits changed:\n{saved}"
    );
    let edited = saturated_in(&dir)
        .replace("permits = 600", "permits = 1200")
        .replace("burst = 10", "burst = 20");
    let b = start(&edited).await;
    let org = list(&b).await.remove("org").unwrap();
    b.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!((org.configured_rate_per_min, org.burst), (300.0, 20));
}

#[tokio::test(start_paused = true)]
async fn admin_changes_made_at_once_are_all_saved_and_the_last_survives() {
    let dir = std::env::temp_dir().join(format!("qb-admin-race-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = saturated_in(&dir);
    let b = start(&cfg).await;
    // The saves share one file: each change is answered once it is saved,
    // and the file ends with the state the last one left.
    let changes = (1..=24u32).map(|i| {
        let mut admin = b.admin.clone();
        async move {
            admin
                .set_bucket_limit(SetBucketLimitRequest {
                    tenant: "t".into(),
                    bucket: "org".into(),
                    permits: 100 + i,
                    window_ms: 60_000,
                    burst: 4,
                    max_in_flight: 3,
                    reset: false,
                })
                .await
        }
    });
    for answer in futures_util::future::join_all(changes).await {
        answer.expect("the change was saved");
    }
    let last = list(&b)
        .await
        .remove("org")
        .unwrap()
        .configured_rate_per_min;
    b.stop().await;
    let b = start(&cfg).await;
    let org = list(&b).await.remove("org").unwrap();
    assert_eq!(org.configured_rate_per_min, last);
    b.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

mod auth {
    use super::*;
    use quota_broker::hash_token;
    use quota_broker::pb::{ReleaseRequest, WatchRequest};
    use tonic::metadata::MetadataValue;
    use tonic::{Code, Request};

    fn config() -> String {
        let token = |name: &str, role: &str, tenants: &str| {
            format!(
                "[[auth.tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nrole = \"{role}\"\ntenants = {tenants}\n",
                hash_token(&format!("secret-{name}"))
            )
        };
        let bucket =
            "[[tenants.buckets]]\nname = \"org\"\nroutes = [\"* /**\"]\nmax_in_flight = 5\n";
        format!(
            "[server]\nstate_dir = \"\"\n{}{}{}[[tenants]]\nid = \"t\"\n{bucket}[[tenants]]\nid = \"u\"\n{bucket}",
            token("t-client", "client", "[\"t\"]"),
            token("u-client", "client", "[\"u\"]"),
            token("ops", "admin", "[\"*\"]"),
        )
    }

    fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Option<(Code, String)> {
        r.err().map(|s| (s.code(), s.message().to_owned()))
    }

    fn with<T>(msg: T, token: Option<&str>) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(t) = token {
            let v: MetadataValue<_> = format!("Bearer {t}").parse().unwrap();
            r.metadata_mut().insert("authorization", v);
        }
        r
    }

    #[tokio::test(start_paused = true)]
    async fn every_auth_case() {
        let b = start(&config()).await;
        let mut c = b.client.clone();
        let mut a = b.admin.clone();
        let acquire = |tenant: &str| {
            let mut r = req("GET", "/x", 0);
            r.tenant = tenant.into();
            r
        };

        let (k, m) = code(c.acquire(with(acquire("t"), None)).await).unwrap();
        assert_eq!(k, Code::Unauthenticated, "{m}");
        assert!(m.contains("authorization: Bearer"), "{m}");
        let (k, m) = code(c.acquire(with(acquire("t"), Some("nope"))).await).unwrap();
        assert_eq!(k, Code::Unauthenticated, "{m}");
        assert!(!m.contains("nope"), "never echo the token: {m}");
        let mut bad = Request::new(acquire("t"));
        bad.metadata_mut()
            .insert("authorization", "Basic dXNlcg==".parse().unwrap());
        assert_eq!(code(c.acquire(bad).await).unwrap().0, Code::Unauthenticated);

        let ok = c
            .acquire(with(acquire("t"), Some("secret-t-client")))
            .await
            .unwrap()
            .into_inner();
        assert!(ok.granted);
        let (k, m) = code(c.acquire(with(acquire("u"), Some("secret-t-client"))).await).unwrap();
        assert_eq!(k, Code::PermissionDenied);
        assert!(m.contains("may not use tenant \"u\""), "{m}");
        let (k, _) = code(
            c.watch(with(
                WatchRequest { tenant: "u".into() },
                Some("secret-t-client"),
            ))
            .await,
        )
        .unwrap();
        assert_eq!(k, Code::PermissionDenied);
        // Another tenant's client cannot release this lease.
        let rel = ReleaseRequest {
            lease_id: ok.lease_id.clone(),
            ..Default::default()
        };
        assert_eq!(
            code(c.release(with(rel.clone(), Some("secret-u-client"))).await)
                .unwrap()
                .0,
            Code::PermissionDenied
        );
        assert!(
            c.release(with(rel, Some("secret-t-client")))
                .await
                .unwrap()
                .into_inner()
                .released
        );

        // Listing everything shows only the caller's tenants.
        let mine = a
            .list_buckets(with(ListBucketsRequest::default(), Some("secret-t-client")))
            .await
            .unwrap()
            .into_inner();
        assert!(mine.buckets.iter().all(|s| s.tenant == "t") && !mine.buckets.is_empty());

        let pause = || PauseBucketRequest {
            tenant: "t".into(),
            bucket: "org".into(),
            reason: "x".into(),
        };
        let (k, m) = code(a.pause_bucket(with(pause(), Some("secret-t-client"))).await).unwrap();
        assert_eq!(k, Code::PermissionDenied);
        assert!(m.contains("needs an admin token"), "{m}");
        assert_eq!(
            code(a.pause_bucket(with(pause(), None)).await).unwrap().0,
            Code::Unauthenticated
        );
        assert!(a
            .pause_bucket(with(pause(), Some("secret-ops")))
            .await
            .is_ok());
        let all = a
            .list_buckets(with(ListBucketsRequest::default(), Some("secret-ops")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(all.buckets.len(), 2);
        b.stop().await;
    }

    #[test]
    fn open_mode_only_on_loopback() {
        let err = quota_broker::Settings::from_toml(
            "[server]\nlisten = \"0.0.0.0:50051\"\n[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("not a loopback address but no [[auth.tokens]]"),
            "{err}"
        );
    }
}
