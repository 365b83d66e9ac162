//! A cluster member that comes back on a new etcd lease (killed and
//! started again) gets the tenants it is preferred for back from their
//! live leader only after a hold-down of two lease TTLs, doubled for a
//! second return within ten minutes; meanwhile the leader keeps granting
//! and the returned member sends callers to it. Real etcd, two broker
//! processes; every wait is on a line a broker logs.

use crate::child::{temp_config, Broker};
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::AcquireRequest;
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;

const TTL_MS: u64 = 2_000;
const TENANTS: usize = 12;

fn config(node: &str, port: u16, etcd: &str, prefix: &str) -> String {
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nhttp_listen = \"\"\nstate_dir = \"\"\n\
         shutdown_grace_ms = 1000\n[cluster]\netcd = [\"{etcd}\"]\nnode = \"{node}\"\n\
         advertise = \"http://127.0.0.1:{port}\"\nprefix = \"{prefix}\"\n\
         lease_ttl_ms = {TTL_MS}\nsafety_margin_ms = 500\n"
    );
    for t in 0..TENANTS {
        toml.push_str(&format!(
            "[[tenants]]\nid = \"t{t}\"\n[[tenants.buckets]]\nname = \"rate\"\n\
             routes = [\"GET /x\"]\npermits = 100\nwindow_ms = 1000\nburst = 100\n"
        ));
    }
    toml
}

fn acquire(tenant: &str) -> AcquireRequest {
    AcquireRequest {
        tenant: tenant.into(),
        client_id: "c".into(),
        priority_class: "critical".into(),
        method: "GET".into(),
        path: "/x".into(),
        max_wait_ms: Some(0),
        ..Default::default()
    }
}

fn client(url: &str) -> QuotaBrokerClient<Channel> {
    QuotaBrokerClient::new(Channel::from_shared(url.to_owned()).unwrap().connect_lazy())
}

/// The value of `field=` in the first line of `log` containing `text`.
fn field_of(log: &str, text: &str, field: &str) -> String {
    let line = log.lines().find(|l| l.contains(text)).unwrap();
    let at = line.find(&format!(" {field}=")).unwrap() + field.len() + 2;
    line[at..].split_whitespace().next().unwrap().to_owned()
}

#[tokio::test]
async fn a_member_back_on_a_new_lease_gets_its_tenants_back_only_after_a_hold_down() {
    let etcd = testsvc::Etcd::start().unwrap();
    let prefix = "/qb-test-rejoin";
    let (p1, p2) = (testsvc::free_port().unwrap(), testsvc::free_port().unwrap());
    let c1 = temp_config("rejoin-b1", &config("b1", p1, &etcd.url(), prefix));
    let c2 = temp_config("rejoin-b2", &config("b2", p2, &etcd.url(), prefix));
    let b1 = Broker::start(&c1).await;
    for t in 0..TENANTS {
        b1.until_logged(&format!("took the tenant over: leading it tenant=t{t} "))
            .await;
    }
    // b2 joins for the first time: the tenants it is preferred for move to
    // it at once (no hold-down for a member never seen before).
    let b2 = Broker::start(&c2).await;
    b1.until_logged("handed the tenant over to its preferred broker")
        .await;
    let mine = field_of(
        &b1.logged(),
        "handed the tenant over to its preferred broker",
        "tenant",
    );
    b2.until_logged(&format!("took the tenant over: leading it tenant={mine} "))
        .await;
    assert!(!b1.logged().contains("is back on a new etcd lease"));

    // Killed: b1 takes its tenants over once its lease expired.
    b2.kill().await;
    b1.until_logged(&format!(
        "took the tenant over: leading it tenant={mine} from=b2"
    ))
    .await;

    // Back on a new lease: b1 keeps the tenant for two TTLs.
    let before = b1.logged().len();
    let b2 = Broker::start(&c2).await;
    b1.until_logged("member b2 is back on a new etcd lease")
        .await;
    let said_at = Instant::now();
    let said = b1.logged()[before..].to_owned();
    let stay: u64 = field_of(&said, "member b2 is back", "stay_for_ms")
        .parse()
        .unwrap();
    assert!(
        stay <= 2 * TTL_MS && stay + 1_000 > 2 * TTL_MS,
        "first return: a hold-down of two TTLs, said {stay} ms"
    );
    assert_eq!(field_of(&said, "member b2 is back", "returns"), "1");
    assert!(
        !said.contains(&format!("handed the tenant over to its preferred broker tenant={mine} next=http://127.0.0.1:{p2}")),
        "handed back before the hold-down"
    );
    // Meanwhile b1 grants and b2 sends callers to it.
    assert!(
        client(&b1.url())
            .acquire(acquire(&mine))
            .await
            .unwrap()
            .into_inner()
            .granted
    );
    let away = client(&b2.url()).acquire(acquire(&mine)).await.unwrap_err();
    assert_eq!(away.code(), tonic::Code::Unavailable, "{away:?}");
    assert_eq!(
        away.metadata()
            .get(quota_broker::LEADER_METADATA)
            .and_then(|v| v.to_str().ok()),
        Some(b1.url().as_str()),
        "{away:?}"
    );
    // Then it goes back.
    b2.until_logged(&format!(
        "took the tenant over: leading it tenant={mine} from=b1"
    ))
    .await;
    // (Less a second for this test seeing b1's line late.)
    let held = said_at.elapsed();
    assert!(
        held + Duration::from_secs(1) >= Duration::from_millis(stay),
        "went back {held:?} after b1 said it keeps the tenant {stay} ms"
    );

    // A second return within ten minutes waits twice as long (b2 started
    // again once b1 holds its tenants: a tenant no one leads would go to
    // b2 at once).
    let before = b1.logged().len();
    b2.kill().await;
    b1.until_logged_after(
        before,
        &format!("took the tenant over: leading it tenant={mine} from=b2"),
    )
    .await;
    let before = b1.logged().len();
    let b2 = Broker::start(&c2).await;
    b1.until_logged_after(before, "returns=2").await;
    let said = b1.logged()[before..].to_owned();
    let stay: u64 = field_of(&said, "member b2 is back", "stay_for_ms")
        .parse()
        .unwrap();
    assert!(
        stay <= 4 * TTL_MS && stay + 1_000 > 4 * TTL_MS,
        "second return: a hold-down of four TTLs, said {stay} ms"
    );
    drop(b2);
    drop(b1);
}
