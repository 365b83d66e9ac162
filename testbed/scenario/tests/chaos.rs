//! Chaos in broker mode, end to end: the real `scenario` binary runs the CI
//! preset's broker mode with the broker as a child process (the
//! `quota-broker` binary of this build, next to the test's `deps/`),
//! SIGKILLs it at 70 simulated seconds, keeps it down 10 simulated seconds
//! (0.5 s real) and restarts it on the same port and state directory. The
//! run is real time (about 6 s plus the drain), bounded by a hard timeout.
//!
//! Asserted: nothing lost, the fleet fell back while the broker was away,
//! the broker restarted and granted again, and the simulator never served
//! beyond a limit (which it guarantees by answering 429 first: what the
//! fleet sent beyond a limit are its 429s, printed here, not asserted).

mod common;

use std::time::Duration;

use common::{broker_bin, f64_at, mode, not_stored, run_scenario};
use serde_json::Value;

/// Longest the scenario may take before it is killed.
const TIMEOUT: Duration = Duration::from_secs(40);

#[test]
fn broker_killed_and_restarted_mid_run_loses_nothing() {
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
            "--chaos-kill-at",
            "70",
            "--chaos-down-for",
            "10",
        ],
        TIMEOUT,
    );
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("scenario printed no JSON ({e}):\n{stdout}"));
    let broker = mode(&report, "broker");
    let chaos = &broker["chaos"];
    eprintln!(
        "chaos: {:#}\nlimits: {:#}\nrecords: {:#}",
        Value::Object(
            chaos
                .as_object()
                .expect("broker mode has chaos figures")
                .iter()
                .filter(|(k, _)| *k != "broker_log")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        ),
        broker["limits"],
        broker["records"]
    );

    for kind in ["ingest", "writes"] {
        assert!(
            f64_at(broker, &["records", kind, "expected"]) > 0.0,
            "no {kind} records at all: {broker:#}"
        );
        let lost = not_stored(broker, kind);
        assert_eq!(
            lost, 0.0,
            "{kind} records lost across the restart: {broker:#}"
        );
    }

    // The kill happened, the broker was away as long as asked, and the
    // fleet's clients saw it (they took leases from their local fallback).
    assert!(f64_at(chaos, &["killed_ms"]) >= 70_000.0, "{chaos:#}");
    assert!(f64_at(chaos, &["broker_down_ms"]) >= 10_000.0, "{chaos:#}");
    assert!(
        f64_at(chaos, &["fallback", "leases"]) > 0.0,
        "no client fell back while the broker was down: {chaos:#}"
    );

    // The same broker came back and served: it granted after the restart.
    assert_eq!(
        chaos["restarted"], true,
        "broker did not serve again: {chaos:#}"
    );
    assert!(f64_at(chaos, &["restart_attempts"]) >= 1.0, "{chaos:#}");
    assert!(f64_at(chaos, &["granted_after_restart"]) > 0.0, "{chaos:#}");

    // The upstream never served beyond a limit in any window.
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
