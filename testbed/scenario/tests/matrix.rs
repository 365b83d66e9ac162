//! `--matrix` end to end, CI-sized: two shipped upstream files × one seed,
//! broker mode, 120 simulated s at ×20 (about 6 real s a cell plus the
//! drain; at ×60 a machine busy with other tests stalled the fleet for
//! whole simulated windows and left records unfinished), the simulator and
//! the broker in the scenario's process, whose logs (at info) reach a pipe
//! without colour codes.

mod common;

use std::time::Duration;

use common::run_scenario_with;
use serde_json::Value;

#[test]
fn tiny_matrix_has_every_cell_and_loses_nothing() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/upstreams/");
    let fixed = format!("{dir}genesys-fixed.toml");
    let silent = format!("{dir}token-bucket-silent.toml");
    let (stdout, stderr) = run_scenario_with(
        &[
            "--matrix",
            "--upstream",
            &fixed,
            "--upstream",
            &silent,
            "--seeds",
            "3",
            "--duration",
            "120",
            "--time-scale",
            "20",
            "--broker-in-process",
            "--json",
        ],
        &[("RUST_LOG", "warn,quota_broker=info")],
        Duration::from_secs(60),
    );
    assert!(stderr.contains("INFO"), "no broker log line in {stderr:?}");
    assert!(!stderr.contains('\u{1b}'), "ANSI codes on stderr");
    assert!(stderr.contains("matrix cell 2 of 2"), "{stderr}");
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("scenario printed no JSON ({e}):\n{stdout}"));
    let cells = report["cells"].as_array().expect("cells");
    let got: Vec<(&str, u64, &str)> = cells
        .iter()
        .map(|c| {
            (
                c["upstream"].as_str().unwrap(),
                c["seed"].as_u64().unwrap(),
                c["mode"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("genesys-fixed", 3, "broker"),
            ("token-bucket-silent", 3, "broker")
        ]
    );
    for c in cells {
        assert_eq!(c["records_lost"], 0, "{c:#}");
        assert_eq!(c["records_unfinished"], 0, "{c:#}");
        assert_eq!(c["served_over"], 0, "{c:#}");
        for key in [
            "goodput_of_left",
            "ratio_429",
            "critical_outside",
            "critical_inside",
            "batch_p99_ms",
        ] {
            assert!(!c[key].is_null(), "{key} missing: {c:#}");
        }
        // The yardstick beside the cell: an exact even pace is served about
        // all that is left on these two, refusing the consumer nothing.
        let exact = &c["exact_pace"];
        assert!(exact[0].as_f64().is_some_and(|g| g > 0.95), "{c:#}");
        assert_eq!(exact[1][0], 0, "{c:#}");
    }
    assert!(cells[1]["upstream_summary"]
        .as_str()
        .unwrap()
        .contains("silent"));
}

/// Several `--upstream` files (not a matrix) with `--keep-logs`: each
/// file's logs in a folder of its own (before, each run wrote over the
/// last one's, and only the last file's logs were left).
#[test]
fn several_upstreams_keep_their_logs_apart() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/upstreams/");
    let fixed = format!("{dir}genesys-fixed.toml");
    let silent = format!("{dir}token-bucket-silent.toml");
    let logs = std::env::temp_dir().join(format!("scenario-kept-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&logs);
    let (_, stderr) = run_scenario_with(
        &[
            "--upstream",
            &fixed,
            "--upstream",
            &silent,
            "--modes",
            "broker",
            "--duration",
            "60",
            "--time-scale",
            "60",
            "--broker-in-process",
            "--keep-logs",
            logs.to_str().expect("a UTF-8 temp path"),
        ],
        &[],
        Duration::from_secs(60),
    );
    assert!(
        stderr.contains("upstream 2 of 2: token-bucket-silent"),
        "{stderr}"
    );
    let kept = |name: &str| -> Vec<String> {
        std::fs::read_dir(logs.join(name))
            .map(|d| {
                d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (a, b) = (kept("genesys-fixed"), kept("token-bucket-silent"));
    let _ = std::fs::remove_dir_all(&logs);
    assert!(a.iter().any(|f| f.starts_with("broker")), "{a:?}");
    assert!(b.iter().any(|f| f.starts_with("broker")), "{b:?}");
}
