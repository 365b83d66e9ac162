//! The fleet scenario's CI preset, end to end: the real `scenario` binary,
//! running the simulator (the gcsim library, fresh per mode, on its own
//! socket) and the quota broker in its process, with loose asserts on its
//! JSON (four modes: naive, local, broker, broker + relay). The run is real
//! time (about 6 s per mode plus the drain), bounded
//! by a hard timeout that kills it.

mod common;

use std::time::Duration;

use common::{f64_at, mode, not_stored, run_scenario};
use serde_json::Value;

/// Longest the whole scenario may take before it is killed.
const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn ci_preset_broker_beats_naive() {
    let stdout = run_scenario(
        &["--preset", "ci", "--json", "--broker-in-process"],
        TIMEOUT,
    );
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("scenario printed no JSON ({e}):\n{stdout}"));
    assert_eq!(report["duration_s"], 120);
    assert_eq!(report["time_scale"], 20.0);

    // Every mode ran, did work, and its 429 count agrees with the simulator's.
    for name in ["naive", "local", "broker", "relay"] {
        let m = mode(&report, name);
        let sent = f64_at(m, &["requests", "sent"]);
        assert!(sent > 100.0, "{name} sent only {sent} requests: {m:#}");
        assert!(
            f64_at(m, &["records", "ingest", "expected"]) > 0.0,
            "{name}: {m:#}"
        );
        assert!(
            f64_at(m, &["records", "writes", "expected"]) > 0.0,
            "{name}: {m:#}"
        );
        let refused = f64_at(m, &["requests", "refused"]);
        let sim_refused = f64_at(m, &["requests", "sim_refused"]);
        assert!(
            (refused - sim_refused).abs() <= 2.0,
            "{name}: client counted {refused} 429s, simulator {sim_refused}"
        );
    }

    let naive = mode(&report, "naive");
    let broker = mode(&report, "broker");
    for kind in ["ingest", "writes"] {
        let lost = not_stored(broker, kind);
        assert_eq!(
            lost, 0.0,
            "broker mode lost or left unfinished {kind} records: {broker:#}"
        );
    }
    let (b_ratio, n_ratio) = (
        f64_at(broker, &["requests", "ratio"]),
        f64_at(naive, &["requests", "ratio"]),
    );
    assert!(
        b_ratio < n_ratio,
        "broker 429 ratio {b_ratio} not below naive's {n_ratio}"
    );
    // Broker + relay: the trunks' writes through gc-relay lose nothing.
    let relay = mode(&report, "relay");
    for kind in ["ingest", "writes"] {
        let lost = not_stored(relay, kind);
        assert_eq!(
            lost, 0.0,
            "broker+relay mode lost or left unfinished {kind} records: {relay:#}"
        );
    }
    let share = f64_at(broker, &["analytics", "share"]);
    assert!(share >= 0.8, "broker goodput share {share} below 0.8");
    let (b_p99, n_p99) = (
        f64_at(broker, &["wait", "critical", "p99_ms"]),
        f64_at(naive, &["wait", "critical", "p99_ms"]),
    );
    assert!(
        b_p99 < n_p99,
        "broker critical p99 {b_p99} ms not below naive's {n_p99} ms"
    );
}
