//! The broker mode against a cluster of three brokers on a real etcd
//! (`--cluster 3`, testsvc's etcd, installed as Debian `etcd-server` if
//! missing), end to end: the real `scenario` binary runs the CI preset's
//! broker mode with the `quota-broker` binary of this build as the three
//! nodes, the fleet's clients given all three URLs, and SIGKILLs the leader
//! of the org's tenant at 50 simulated seconds; it stays down. The etcd
//! lease TTL is 2 s real (40 simulated seconds at the preset's scale 20),
//! so the take-over falls well within the run.
//!
//! Asserted: another broker took the tenant over and granted, no broker
//! granted during the gap (between the kill and the new leader's
//! take-over), nothing lost, and the upstream never served beyond a limit.

mod common;

use std::time::Duration;

use common::{broker_bin, f64_at, mode, not_stored, run_scenario};
use serde_json::Value;

/// Longest the scenario may take before it is killed (etcd's first
/// install, when needed, takes part of it).
const TIMEOUT: Duration = Duration::from_secs(180);

#[test]
fn cluster_leader_killed_mid_run_is_taken_over_without_double_grants() {
    let bin = broker_bin();
    let bin = bin.to_str().expect("a UTF-8 target path");
    let stdout = run_scenario(
        &[
            "--preset",
            "ci",
            "--modes",
            "broker",
            "--json",
            "--broker-bin",
            bin,
            "--cluster",
            "3",
            "--chaos-kill-at",
            "50",
        ],
        TIMEOUT,
    );
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("scenario printed no JSON ({e}):\n{stdout}"));
    let broker = mode(&report, "broker");
    let cluster = &broker["cluster"];
    eprintln!(
        "cluster: {cluster:#}\nrequests: {:#}\nrecords: {:#}\nanalytics: {:#}",
        broker["requests"], broker["records"], broker["analytics"]
    );
    assert_eq!(cluster["nodes"], 3, "{cluster:#}");
    let kill = &cluster["kill"];

    // A new leader took over and granted.
    assert_eq!(kill["new_leader_took_over"], true, "{kill:#}");
    assert_ne!(kill["new_leader"], kill["killed"], "{kill:#}");
    assert!(f64_at(kill, &["killed_ms"]) >= 50_000.0, "{kill:#}");
    let takeover = f64_at(kill, &["takeover_ms"]);
    assert!(takeover > 0.0, "{kill:#}");
    // No broker granted between the kill and the take-over.
    assert_eq!(f64_at(kill, &["grants_in_gap"]), 0.0, "{kill:#}");
    // The new leader leads at the end (the killed one stayed down).
    assert_eq!(cluster["leader_at_end"], kill["new_leader"], "{cluster:#}");

    for kind in ["ingest", "writes"] {
        assert!(
            f64_at(broker, &["records", kind, "expected"]) > 0.0,
            "no {kind} records at all: {broker:#}"
        );
        let lost = not_stored(broker, kind);
        assert_eq!(lost, 0.0, "{kind} records lost across the take-over");
    }
    let limits = broker["limits"].as_array().expect("limits per family");
    assert!(!limits.is_empty(), "no family checked: {broker:#}");
    for l in limits {
        assert_eq!(
            f64_at(l, &["served_over"]),
            0.0,
            "the upstream served beyond its limit: {l:#}"
        );
    }
}
