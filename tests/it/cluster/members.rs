//! Who may lead what: a second broker under a member's node name leads
//! nothing, also when both reach etcd at the same moment; a tenant is led
//! only by members that serve it; and a member with another config for a
//! tenant is warned of once.

use super::{config, leader, leads, settled_leader, Cluster, TTL_MS};
use crate::child::{temp_config, Broker};
use std::time::Duration;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_under_a_members_node_name_leads_nothing() {
    let etcd = testsvc::Etcd::start().unwrap();
    let cluster = Cluster::start(etcd, "same-name", &["b1"], 1).await;
    let first = settled_leader(&cluster.feed(), &cluster.urls(), "t0").await;
    // Another process configured as b1 too (a copied config, an overlapping
    // deploy): it must not take b1's tenants while b1 lives.
    let port = testsvc::free_port().unwrap();
    let http = testsvc::free_port().unwrap();
    let toml = config(
        "b1",
        port,
        &cluster.etcd_url,
        &cluster.prefix,
        &cluster.tenants,
    )
    .replacen(
        "http_listen = \"\"",
        &format!("http_listen = \"127.0.0.1:{http}\""),
        1,
    );
    let dup = Broker::start(&temp_config(&format!("cluster-dup-{port}"), &toml)).await;
    // For two lease TTLs, at every event and at their end.
    let mut events = cluster.feed_with(&[&dup]);
    let watch_until = Instant::now() + Duration::from_millis(2 * TTL_MS);
    loop {
        assert_eq!(
            leads(&first, "t0").await,
            Ok(()),
            "the first b1 stopped leading"
        );
        assert!(
            leads(&dup.url(), "t0").await.is_err(),
            "the second b1 leads too"
        );
        if !events.next_before(watch_until).await {
            break;
        }
    }
    // Its readiness probe says why, not only that etcd may be away.
    let ready = crate::observe::get(
        std::net::SocketAddr::from(([127, 0, 0, 1], http)),
        "/readyz",
        &[],
    )
    .await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(
        ready
            .body
            .contains("another broker is a member as node \"b1\""),
        "{}",
        ready.body
    );
    let (_, log) = dup.terminate().await;
    assert!(
        log.contains("another broker is a member as node \"b1\""),
        "{log}"
    );
    // The lease it names is the one the first b1 said it joined on, both
    // in hex.
    let theirs = log
        .split("(etcd lease ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("{log}"));
    let first_log = cluster.brokers["b1"].logged();
    assert!(
        first_log
            .lines()
            .any(|l| l.contains("joined the cluster") && l.contains(&format!("lease={theirs}"))),
        "lease {theirs} not in the first b1's join line:\n{first_log}"
    );
    // Failing each tick for 2 lease TTLs, said once (at most once a minute).
    assert_eq!(log.matches("cluster session failed").count(), 1, "{log}");
}

/// A member whose config lacks some tenants is never elected to lead them
/// (they would go unled), a tenant only one member has is led by it, and
/// the others warn that the members' tenants differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_is_led_only_by_members_that_serve_it() {
    let etcd = testsvc::Etcd::start().unwrap();
    let mut cluster = Cluster::start(etcd, "other-tenants", &["b1"], 8).await;
    let all = cluster.tenants.clone();
    let b1 = cluster.brokers["b1"].url();
    // b1 leads every tenant before b2 comes (it takes them one by one).
    let mut events = cluster.feed();
    let deadline = Instant::now() + Duration::from_secs(20);
    for t in &all {
        while leads(&b1, t).await.is_err() {
            assert!(
                events.next_before(deadline).await,
                "{t} is not led by b1 alone"
            );
        }
    }
    // b2 serves t0–t3 and a tenant of its own, not t4–t7.
    let mut some: Vec<String> = all[..4].to_vec();
    some.push("only-b2".into());
    let port = testsvc::free_port().unwrap();
    let toml = config("b2", port, &cluster.etcd_url, &cluster.prefix, &some);
    let b2 = Broker::start(&temp_config(&format!("cluster-b2-{port}"), &toml)).await;
    let feed = cluster.feed_with(&[&b2]);
    // b2 has joined once it leads its own tenant.
    let mut events = feed.fresh();
    let deadline = Instant::now() + Duration::from_secs(20);
    while leads(&b2.url(), "only-b2").await.is_err() {
        assert!(
            events.next_before(deadline).await,
            "only-b2 is not led by b2"
        );
    }
    // Then, for a lease TTL and more (ticks of both, hand-overs done):
    // t4–t7 stay led by b1 whatever the hashing prefers, at every event
    // and at the end; and each of t0–t3 is led by one of the two.
    let urls = vec![b1.clone(), b2.url()];
    let mut events = feed.fresh();
    let watch_until = Instant::now() + Duration::from_millis(2 * TTL_MS);
    let mut lapse = None;
    'watch: loop {
        for t in &all[4..] {
            if let Err(leader) = leads(&b1, t).await {
                lapse = Some(format!(
                    "{t}, which b2 lacks, is not led by b1 (leader: {leader:?})"
                ));
                break 'watch;
            }
        }
        if !events.next_before(watch_until).await {
            break;
        }
    }
    if let Some(lapse) = lapse {
        let (_, b2_log) = b2.terminate().await;
        let b1_log = match cluster.brokers.remove("b1") {
            Some(b1) => b1.terminate().await.1,
            None => String::new(),
        };
        panic!("{lapse}\nb1's log:\n{b1_log}\nb2's log:\n{b2_log}");
    }
    for t in &all[..4] {
        leader(&feed, &urls, t).await;
    }
    let (_, log) = b2.terminate().await;
    assert!(
        log.contains("serves other tenants than this broker"),
        "{log}"
    );
    cluster.brokers.clear();
}

/// Two processes configured with one node name that reach etcd at the
/// same moment (both started while it hung): one joins, the other waits;
/// never do both lead a tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_started_at_once_under_one_name_do_not_both_lead() {
    let etcd = testsvc::Etcd::start().unwrap();
    let cluster = Cluster::start(etcd, "same-name-at-once", &[], 1).await;
    cluster.etcd.freeze().unwrap();
    let mut twins = Vec::new();
    for _ in 0..2 {
        let port = testsvc::free_port().unwrap();
        let toml = config(
            "b9",
            port,
            &cluster.etcd_url,
            &cluster.prefix,
            &cluster.tenants,
        );
        twins.push(Broker::start(&temp_config(&format!("cluster-twin-{port}"), &toml)).await);
    }
    // Both asked etcd for a lease while it hung; it answers both at once.
    cluster.etcd.thaw().unwrap();
    // (The twin that did not join knows no leader to send callers to:
    // `leader()`'s settled cluster never comes.)
    let urls: Vec<String> = twins.iter().map(Broker::url).collect();
    let mut events = cluster.feed_with(&twins.iter().collect::<Vec<_>>());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut first: Option<String> = None;
    let mut watch_until = deadline;
    // At every event until one leads, then for two lease TTLs more.
    loop {
        let mut leading = Vec::new();
        for url in &urls {
            if leads(url, "t0").await.is_ok() {
                leading.push(url.clone());
            }
        }
        assert!(leading.len() <= 1, "both b9s lead t0: {leading:?}");
        if first.is_none() {
            if let [one] = &leading[..] {
                first = Some(one.clone());
                watch_until = Instant::now() + Duration::from_millis(2 * TTL_MS);
            }
        }
        if !events.next_before(watch_until).await {
            break;
        }
    }
    let first = first.expect("one b9 leads t0 within 20 s");
    assert_eq!(
        leads(&first, "t0").await,
        Ok(()),
        "the leader stopped leading"
    );
    let mut logs = String::new();
    for twin in twins {
        logs.push_str(&twin.terminate().await.1);
    }
    assert!(
        logs.contains("another broker is a member as node \"b9\"")
            || logs.contains("changed while joining"),
        "{logs}"
    );
}

/// A member whose buckets differ from this broker's for a tenant (10 times
/// the permits) is warned of by both, naming the member, the tenant and
/// what differs, once; a tenant configured alike is not named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_another_config_for_a_tenant_is_warned_of_once() {
    let etcd = testsvc::Etcd::start().unwrap();
    let mut cluster = Cluster::start(etcd, "drift", &["b1"], 2).await;
    let port = testsvc::free_port().unwrap();
    // t0's rate bucket: 100 permits a second, not 10 (the first tenant's
    // block comes first).
    let toml = config(
        "b2",
        port,
        &cluster.etcd_url,
        &cluster.prefix,
        &cluster.tenants,
    )
    .replacen("permits = 10\n", "permits = 100\n", 1);
    assert!(toml.contains("permits = 100\n"));
    let b2 = Broker::start(&temp_config(&format!("cluster-b2-{port}"), &toml)).await;
    let said = |of: &str| {
        format!(
            "member {of} serves tenant t0 with another config than this broker's: buckets \
             differ; every member should have the same [[tenants]]"
        )
    };
    let b1 = &cluster.brokers["b1"];
    b1.until_logged(&said("b2")).await;
    b2.until_logged(&said("b1")).await;
    // Ticks later (each tenant's leader the same for a second), still
    // said once.
    let urls = vec![b1.url(), b2.url()];
    for t in &cluster.tenants {
        settled_leader(&cluster.feed_with(&[&b2]), &urls, t).await;
    }
    let (_, log2) = b2.terminate().await;
    let log1 = cluster.brokers.remove("b1").unwrap().terminate().await.1;
    for (log, of) in [(&log1, "b2"), (&log2, "b1")] {
        assert_eq!(log.matches(&said(of)).count(), 1, "{log}");
        assert!(!log.contains("tenant t1 with another config"), "{log}");
        assert!(!log.contains("serves other tenants"), "{log}");
    }
}
