//! A broker killed with SIGKILL and started again on the same state
//! directory, while its clients hold slots and spend a token bucket: the
//! restart learning mode must keep every limit across the restart.

use crate::child::{temp_config, Broker};
use crate::harness::fresh_dir;
use crate::invariants::{Event, GrantLog};
use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{
    AcquireRequest, AcquireResponse, ClearLearnedRequest, ListBucketsRequest, ReleaseRequest,
    RenewRequest, ReportRequest,
};
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;

/// A slot bucket (3), a rate bucket (20 per 2 s, burst 20) and a slow one
/// (1 a second, burst 5) on `dir`.
fn config(dir: &Path) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
state_dir = "{}"
shutdown_grace_ms = 1000
[[tenants]]
id = "t"
[[tenants.buckets]]
name = "slots"
routes = ["POST /api/v2/analytics/**"]
max_in_flight = 3
lease_ttl_ms = 5000
[[tenants.buckets]]
name = "rate"
routes = ["GET /api/v2/users/**"]
permits = 20
window_ms = 2000
burst = 20
[[tenants.buckets]]
name = "slow"
routes = ["GET /api/v2/slow/**"]
permits = 60
window_ms = 60000
burst = 5
"#,
        dir.display()
    )
}

/// Critical, so no class reserve stands between the test and the limits.
fn call(method: &str, path: &str, client: &str, max_wait_ms: u64) -> AcquireRequest {
    AcquireRequest {
        tenant: "t".into(),
        client_id: client.into(),
        priority_class: "critical".into(),
        method: method.into(),
        path: path.into(),
        max_wait_ms: Some(max_wait_ms),
        ..Default::default()
    }
}

/// Acquire `req`, and its answer.
async fn ask(c: &mut QuotaBrokerClient<Channel>, req: AcquireRequest) -> AcquireResponse {
    c.acquire(req).await.unwrap().into_inner()
}

async fn client(b: &Broker) -> QuotaBrokerClient<Channel> {
    QuotaBrokerClient::connect(b.url()).await.unwrap()
}

/// Logs a grant of one permit that holds no slot, as lease `lease` (then
/// the next number).
fn rate_grant(log: &mut GrantLog, lease: &mut u64) {
    log.record(Event::Granted {
        lease: *lease,
        permits: 1,
        slot: false,
    });
    *lease += 1;
}

/// The broker writes its learned-state file before it serves: once a
/// client was served, a start on the same directory is a restart.
fn state_written(dir: &Path) {
    let file = dir.join("learned.toml");
    assert!(file.exists(), "{} was not written at start", file.display());
}

#[cfg(unix)]
#[tokio::test]
async fn after_a_crash_held_slots_are_adopted_and_never_granted_twice_even_with_a_tenant_added_first(
) {
    let dir = fresh_dir("slots");
    let path = temp_config("restart-slots", &config(&dir));
    let b = Broker::start(&path).await;
    let mut c = client(&b).await;
    let path_of = "/api/v2/analytics/conversations/details/query";
    let mut held = Vec::new();
    for k in 0..3u64 {
        let req = call("POST", path_of, &format!("holder-{k}"), 0);
        let r = c.acquire(req.clone()).await.unwrap().into_inner();
        assert!(r.granted, "{}", r.reason);
        held.push((r.lease_id, req));
    }
    state_written(&dir);

    let crash_log = b.kill().await;
    // Restarted with a tenant added before this one (a routine change):
    // the leases are still this tenant's.
    let added = config(&dir).replacen(
        "[[tenants]]",
        "[[tenants]]\nid = \"newco\"\n[[tenants.buckets]]\nname = \"b\"\n\
         routes = [\"* /**\"]\nmax_in_flight = 1\n[[tenants]]",
        1,
    );
    let restart_path = temp_config("restart-slots-added", &added);
    let b = Broker::start(&restart_path).await;
    let mut c = client(&b).await;
    // The three calls still run upstream: a fourth may not start.
    let r = ask(&mut c, call("POST", path_of, "newcomer", 0)).await;
    assert!(!r.granted, "granted a fourth slot after the restart");
    // The holders renew as usual and are adopted, not told NOT_FOUND.
    for (k, (lease_id, req)) in held.iter().enumerate() {
        let renewed = c
            .renew(RenewRequest {
                lease_id: lease_id.clone(),
                extend_ms: 0,
                acquired_with: Some(req.clone()),
            })
            .await;
        assert!(renewed.is_ok(), "holder {k}: {renewed:?}");
    }
    // Adopted, they still hold the three slots.
    let r = ask(&mut c, call("POST", path_of, "newcomer", 0)).await;
    assert!(
        !r.granted,
        "granted a fourth slot beside the adopted leases"
    );
    // The newcomer waits until a holder is done, then gets its slot.
    let mut waiter = c.clone();
    let newcomer = tokio::spawn(async move {
        waiter
            .acquire(call("POST", path_of, "newcomer", 10_000))
            .await
            .unwrap()
            .into_inner()
    });
    let released = c
        .release(ReleaseRequest {
            lease_id: held[0].0.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(released.released, "the adopted lease held its slot");
    let r = tokio::time::timeout(Duration::from_secs(15), newcomer)
        .await
        .expect("the newcomer is answered")
        .unwrap();
    assert!(r.granted, "{}", r.reason);
    let (status, restart_log) = b.terminate().await;
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&restart_path);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.success(), "{restart_log}");
    assert!(
        restart_log.contains("adopted a lease granted before the restart"),
        "{restart_log}\n--- before the crash ---\n{crash_log}"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn a_restart_does_not_refill_the_token_bucket() {
    let dir = fresh_dir("rate");
    let path = temp_config("restart-rate", &config(&dir));
    let mut log = GrantLog::default();
    let b = Broker::start(&path).await;
    let mut c = client(&b).await;
    let mut lease = 0u64;
    // Spend the whole burst. The bucket refills 10 a second meanwhile, which
    // a slow machine's calls give time for.
    let began = Instant::now();
    let most = |began: Instant| 20 + (began.elapsed().as_secs_f64() * 10.0) as u64;
    loop {
        let r = ask(&mut c, call("GET", "/api/v2/users/me", "spender", 0)).await;
        if !r.granted {
            break;
        }
        rate_grant(&mut log, &mut lease);
        assert!(lease <= most(began), "more than the burst and its refill");
    }
    assert!(
        (20..=most(began)).contains(&lease),
        "the burst and what refilled while it was spent: {lease} grants in {:?}",
        began.elapsed()
    );
    state_written(&dir);
    let before = lease;
    let start = Instant::now();
    b.kill().await;
    let b = Broker::start(&path).await;
    let mut c = client(&b).await;
    // Keep asking for two seconds after the burst: whatever the broker
    // grants, the log must stay within 20 + 10/s.
    while Instant::now() < start + Duration::from_secs(2) {
        let r = ask(&mut c, call("GET", "/api/v2/users/me", "spender", 100)).await;
        if r.granted {
            rate_grant(&mut log, &mut lease);
        }
    }
    let _ = b.terminate().await;
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
    log.check_rate(20, Duration::from_secs(2), 20).unwrap();
    assert!(lease > before, "nothing granted after the restart");
}

#[cfg(unix)]
#[tokio::test]
async fn a_crash_loop_grants_no_permit_per_restart() {
    let dir = fresh_dir("loop");
    let path = temp_config("restart-loop", &config(&dir));
    let mut log = GrantLog::default();
    let mut lease = 0u64;
    let slow = |wait| call("GET", "/api/v2/slow/x", "spender", wait);
    let mut b = Broker::start(&path).await;
    let mut c = client(&b).await;
    // The burst of 5 spent, then the broker crashes three times in a row,
    // each new run asked at once: the bucket was empty at every crash, so
    // a run that starts with a permit grants more than 1 a second.
    loop {
        let r = c.acquire(slow(0)).await.unwrap().into_inner();
        if !r.granted {
            break;
        }
        rate_grant(&mut log, &mut lease);
    }
    state_written(&dir);
    for _ in 0..3 {
        b.kill().await;
        b = Broker::start(&path).await;
        c = client(&b).await;
        if c.acquire(slow(0)).await.unwrap().into_inner().granted {
            rate_grant(&mut log, &mut lease);
        }
    }
    // The last run then paces the bucket again.
    let r = c.acquire(slow(5_000)).await.unwrap().into_inner();
    assert!(r.granted, "{}", r.reason);
    log.record(Event::Granted {
        lease,
        permits: 1,
        slot: false,
    });
    let _ = b.terminate().await;
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
    log.check_rate(5, Duration::from_secs(1), 1).unwrap();
}

#[cfg(unix)]
#[tokio::test]
async fn an_operators_clear_survives_a_crash_right_after_it() {
    let dir = fresh_dir("clear");
    let path = temp_config("restart-clear", &config(&dir));
    let frozen = |b: &Broker| {
        let url = b.url();
        async move {
            let list = QuotaAdminClient::connect(url)
                .await
                .unwrap()
                .list_buckets(ListBucketsRequest { tenant: "t".into() })
                .await
                .unwrap()
                .into_inner();
            let slow = list.buckets.iter().find(|s| s.bucket == "slow").unwrap();
            slow.frozen_until_ms > slow.at_ms
        }
    };
    let b = Broker::start(&path).await;
    // The upstream refuses for ten minutes: the bucket freezes.
    client(&b)
        .await
        .report(ReportRequest {
            tenant: "t".into(),
            method: "GET".into(),
            path: "/api/v2/slow/x".into(),
            http_status: 429,
            retry_after_ms: 600_000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(frozen(&b).await, "the 429 did not freeze the bucket");
    // A graceful stop saves the freeze: the next run starts frozen.
    let (status, log) = b.terminate().await;
    assert!(status.success(), "{log}");
    let b = Broker::start(&path).await;
    assert!(frozen(&b).await, "the freeze was not restored");
    // An operator knows better and clears it; the broker crashes at once.
    QuotaAdminClient::connect(b.url())
        .await
        .unwrap()
        .clear_learned(ClearLearnedRequest {
            tenant: "t".into(),
            bucket: "slow".into(),
            oauth_client: String::new(),
        })
        .await
        .unwrap();
    b.kill().await;
    let b = Broker::start(&path).await;
    let again = frozen(&b).await;
    let _ = b.terminate().await;
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!again, "the cleared freeze came back after the crash");
}

#[cfg(unix)]
#[tokio::test]
async fn an_unreadable_state_file_is_kept_aside_not_overwritten() {
    let dir = fresh_dir("unreadable");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("learned.toml"), "version = 1\nbuckets = 7\n").unwrap();
    std::fs::write(dir.join("admin.toml"), "version = 1\nbuckets = 8\n").unwrap();
    let path = temp_config("restart-unreadable", &config(&dir));
    let b = Broker::start(&path).await;
    let (_, log) = b.terminate().await;
    let kept = |name: &str| {
        let aside: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(&format!("{name}.unreadable-")))
            .collect();
        aside
            .first()
            .map(|n| std::fs::read_to_string(dir.join(n)).unwrap())
    };
    let (learned, admin) = (kept("learned.toml"), kept("admin.toml"));
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        learned.as_deref(),
        Some("version = 1\nbuckets = 7\n"),
        "{log}"
    );
    assert_eq!(
        admin.as_deref(),
        Some("version = 1\nbuckets = 8\n"),
        "{log}"
    );
    assert!(log.contains("kept_as"), "{log}");
}

#[cfg(unix)]
#[tokio::test]
async fn a_graceful_restart_holds_only_the_leases_it_recorded_and_a_stale_record_is_not_trusted() {
    let dir = fresh_dir("graceful");
    // Leases that outlive two starts on a slow machine.
    let path = temp_config(
        "restart-graceful",
        &config(&dir).replace("lease_ttl_ms = 5000", "lease_ttl_ms = 60000"),
    );
    let path_of = "/api/v2/analytics/conversations/details/query";
    let b = Broker::start(&path).await;
    let mut c = client(&b).await;
    let mut held = Vec::new();
    for k in 0..2u64 {
        let r = ask(&mut c, call("POST", path_of, &format!("holder-{k}"), 0)).await;
        assert!(r.granted, "{}", r.reason);
        held.push(r.lease_id);
    }
    let (status, first_log) = b.terminate().await;
    assert!(status.success(), "{first_log}");
    let record = dir.join("stopped.json");
    assert!(
        record.exists(),
        "a graceful stop left no record:\n{first_log}"
    );
    let first_record = std::fs::read(&record).unwrap();

    // A deploy: the two holders still call upstream, the third slot is free
    // at once (not held for a lease TTL as after a crash), a fourth is not.
    let b = Broker::start(&path).await;
    let mut c = client(&b).await;
    let r = ask(&mut c, call("POST", path_of, "newcomer", 0)).await;
    assert!(!record.exists(), "the record is used once");
    assert!(
        r.granted,
        "the free slot after a graceful restart: {}",
        r.reason
    );
    let r = ask(&mut c, call("POST", path_of, "fourth", 0)).await;
    assert!(!r.granted, "granted a fourth slot after a graceful restart");
    // The recorded leases are known by their ids: renewed without saying
    // which Acquire granted them, released with their slot.
    let renewed = c
        .renew(RenewRequest {
            lease_id: held[0].clone(),
            extend_ms: 0,
            acquired_with: None,
        })
        .await;
    assert!(renewed.is_ok(), "{renewed:?}");
    let released = c
        .release(ReleaseRequest {
            lease_id: held[1].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(released.released, "the recorded lease held its slot");
    let r = ask(&mut c, call("POST", path_of, "after-release", 0)).await;
    assert!(r.granted, "{}", r.reason);

    // That run crashes; the first run's record is found again (a backup
    // restored, a copy left behind). It names a run older than the last
    // start, whose leases it does not know: every slot counts as held.
    let crash_log = b.kill().await;
    std::fs::write(&record, &first_record).unwrap();
    let b = Broker::start(&path).await;
    let mut c = client(&b).await;
    let r = ask(&mut c, call("POST", path_of, "after-crash", 0)).await;
    let (_, last_log) = b.terminate().await;
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !r.granted,
        "a stale stop record was trusted after a crash:\n{last_log}\n--- crashed run ---\n{crash_log}"
    );
    assert!(last_log.contains("older than the last start"), "{last_log}");
}

/// A broker down longer than its leases had left: their slots are free at
/// the next start, not held for the time they had left at the stop (the
/// stop's record is made older, as a long downtime would leave it).
#[cfg(unix)]
#[tokio::test]
async fn a_graceful_restart_after_the_leases_ran_out_holds_none_of_them() {
    let dir = fresh_dir("graceful-late");
    let path = temp_config(
        "restart-graceful-late",
        &config(&dir).replace("lease_ttl_ms = 5000", "lease_ttl_ms = 60000"),
    );
    let path_of = "/api/v2/analytics/conversations/details/query";
    let b = Broker::start(&path).await;
    let mut c = client(&b).await;
    for k in 0..2 {
        let r = ask(&mut c, call("POST", path_of, &format!("holder-{k}"), 0)).await;
        assert!(r.granted, "{}", r.reason);
    }
    let (status, first_log) = b.terminate().await;
    assert!(status.success(), "{first_log}");
    // Stopped two minutes ago, as far as the record says.
    let record = dir.join("stopped.json");
    let mut stop: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    let at = stop["stopped_at_ms"].as_u64().unwrap();
    stop["stopped_at_ms"] = (at - 120_000).into();
    std::fs::write(&record, stop.to_string()).unwrap();
    let b = Broker::start(&path).await;
    let mut c = client(&b).await;
    let mut granted = 0;
    for k in 0..3 {
        let r = ask(&mut c, call("POST", path_of, &format!("after-{k}"), 0)).await;
        granted += usize::from(r.granted);
    }
    let (_, log) = b.terminate().await;
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        granted, 3,
        "slots held for leases that ran out while down:\n{log}"
    );
}

/// A tenant added to the config between a graceful stop and the next start
/// had no lease in the last run: its slots are free at once, not counted
/// held for a lease TTL as after a crash.
#[tokio::test]
async fn a_tenant_added_since_a_graceful_stop_starts_with_its_slots_free() {
    let dir = fresh_dir("graceful-added");
    let before = config(&dir).replace("lease_ttl_ms = 5000", "lease_ttl_ms = 600000");
    let path = temp_config("restart-graceful-added", &before);
    let b = Broker::start(&path).await;
    let (status, first_log) = b.terminate().await;
    assert!(status.success(), "{first_log}");
    // The same config with a second tenant "u", of one slot.
    let added = format!(
        "{before}[[tenants]]\nid = \"u\"\n[[tenants.buckets]]\nname = \"slots\"\n\
         routes = [\"POST /api/v2/analytics/**\"]\nmax_in_flight = 1\nlease_ttl_ms = 600000\n"
    );
    std::fs::write(&path, added).unwrap();
    let b = Broker::start(&path).await;
    let mut c = client(&b).await;
    let r = ask(
        &mut c,
        AcquireRequest {
            tenant: "u".into(),
            ..call(
                "POST",
                "/api/v2/analytics/conversations/details/query",
                "new",
                0,
            )
        },
    )
    .await;
    let (_, log) = b.terminate().await;
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(r.granted, "{}\n{log}", r.reason);
}

/// Takes the three slots of bucket `slots`; their leases.
async fn hold_every_slot(c: &mut QuotaBrokerClient<Channel>) -> Vec<AcquireResponse> {
    let mut held = Vec::new();
    for k in 0..3 {
        let r = ask(
            c,
            call("POST", "/api/v2/analytics/x", &format!("holder-{k}"), 0),
        )
        .await;
        assert!(r.granted, "{}", r.reason);
        held.push(r);
    }
    held
}

/// The state directory deleted under a running broker (a temp cleaner, a
/// reset by hand) is written again at once; and a start that finds
/// `learned.toml` missing beside other files of an earlier run still
/// starts as after a crash. Before, either way the next start after a
/// crash was a first start: every slot free, granted a second time.
#[cfg(unix)]
#[tokio::test]
async fn state_deleted_under_a_running_broker_still_makes_the_next_start_a_restart() {
    let dir = fresh_dir("deleted");
    let path = temp_config("restart-deleted", &config(&dir));
    let b = Broker::start(&path).await;
    let mut c = client(&b).await;
    hold_every_slot(&mut c).await;
    std::fs::remove_dir_all(&dir).unwrap();
    // Logged once the file is written again.
    b.until_logged("learned.toml vanished").await;
    b.kill().await;

    let b = Broker::start(&path).await;
    let mut c = client(&b).await;
    let r = ask(&mut c, call("POST", "/api/v2/analytics/x", "newcomer", 0)).await;
    assert!(
        !r.granted,
        "a slot granted after a crash while the earlier run's callers hold every one"
    );
    // An operator's change leaves admin.toml; learned.toml is deleted
    // while the broker is down (it cannot write it again).
    QuotaAdminClient::connect(b.url())
        .await
        .unwrap()
        .pause_bucket(quota_broker::pb::PauseBucketRequest {
            tenant: "t".into(),
            bucket: "slow".into(),
            reason: "maintenance".into(),
        })
        .await
        .unwrap();
    b.kill().await;
    std::fs::remove_file(dir.join("learned.toml")).unwrap();
    let b = Broker::start(&path).await;
    let mut c = client(&b).await;
    let r = ask(&mut c, call("POST", "/api/v2/analytics/x", "newcomer", 0)).await;
    let (_, log) = b.terminate().await;
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        !r.granted,
        "a slot granted after a crash with learned.toml deleted"
    );
    assert!(log.contains("learned.toml is missing"), "{log}");
}

/// An operator's change that could not be saved (here `admin.toml` is a
/// directory, so the write fails, as on a full disk) is answered INTERNAL
/// and stays in force; once the file can be written it is saved by itself,
/// and a restart keeps it. Before, it was never saved and a restart
/// dropped it while `state_save_failing` read 0.
#[cfg(unix)]
#[tokio::test]
async fn an_admin_change_not_saved_is_saved_once_it_can_be() {
    let dir = fresh_dir("admin-unsaved");
    let path = temp_config("restart-admin-unsaved", &config(&dir));
    let b = Broker::start(&path).await;
    // The start has read its state and written learned.toml (before it
    // logs "broker started", which `start` waits for).
    assert!(dir.join("learned.toml").exists());
    std::fs::create_dir_all(dir.join("admin.toml")).unwrap();
    let mut admin = QuotaAdminClient::connect(b.url()).await.unwrap();
    let e = admin
        .pause_bucket(quota_broker::pb::PauseBucketRequest {
            tenant: "t".into(),
            bucket: "slow".into(),
            reason: "upstream maintenance".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
    std::fs::remove_dir(dir.join("admin.toml")).unwrap();
    b.until_logged("saved to the state directory after all")
        .await;
    assert!(dir.join("admin.toml").is_file());
    let (status, log) = b.terminate().await;
    assert!(status.success(), "{log}");

    let b = Broker::start(&path).await;
    let mut admin = QuotaAdminClient::connect(b.url()).await.unwrap();
    let list = admin
        .list_buckets(ListBucketsRequest { tenant: "t".into() })
        .await
        .unwrap()
        .into_inner();
    // Resumed, the bucket is as configured: nothing left to save.
    admin
        .resume_bucket(quota_broker::pb::ResumeBucketRequest {
            tenant: "t".into(),
            bucket: "slow".into(),
        })
        .await
        .unwrap();
    let saved = std::fs::read_to_string(dir.join("admin.toml")).unwrap();
    let _ = b.terminate().await;
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
    let slow = list.buckets.iter().find(|s| s.bucket == "slow").unwrap();
    assert!(slow.paused, "the pause was lost: {slow:?}");
    assert!(
        !saved.contains("[[buckets]]"),
        "a resumed bucket is still saved as changed:\n{saved}"
    );
}

/// A second broker on a state directory a running one holds is refused at
/// start, naming the first's process (the two would each overwrite the
/// other's saved state); once the first has stopped, it starts there.
#[tokio::test]
async fn a_second_broker_on_a_state_directory_in_use_is_refused() {
    let dir = fresh_dir("state-dir-in-use");
    let first = Broker::start(&temp_config("in-use-first", &config(&dir))).await;
    let second = temp_config("in-use-second", &config(&dir));
    let run_second = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_quota-broker"))
            .arg("--config")
            .arg(&second)
            .env("QUOTA_BROKER__SERVER__HTTP_LISTEN", "")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let refused = tokio::time::timeout(Duration::from_secs(30), run_second().wait_with_output())
        .await
        .expect("the second broker exits at once, refused, rather than serving")
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{err}");
    let pid = std::fs::read_to_string(dir.join("broker.lock")).unwrap();
    assert!(
        err.contains(&format!(
            "is in use by another broker (process {}): two brokers on one state directory",
            pid.trim()
        )),
        "{err}"
    );
    let (status, _) = first.terminate().await;
    assert!(status.success());
    let again = Broker::start(&second).await;
    let (status, log) = again.terminate().await;
    assert!(status.success(), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
