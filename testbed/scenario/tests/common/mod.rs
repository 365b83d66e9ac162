//! What the scenario's integration tests share: running the real
//! `scenario` binary under a hard timeout, and reading its JSON.

#![allow(dead_code)] // Each test binary uses its own subset.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Runs `scenario` with `args`, killed after `timeout`; its stdout. Panics
/// (with its stderr) if it fails or runs out of time.
pub fn run_scenario(args: &[&str], timeout: Duration) -> String {
    run_scenario_with(args, &[], timeout).0
}

/// As [`run_scenario`], with environment variables `env`; its stdout and
/// stderr.
pub fn run_scenario_with(
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> (String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_scenario"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start scenario");
    // Drained on threads, so a full pipe never blocks the child.
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait on scenario") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "scenario did not finish within {timeout:?}; stderr:\n{}",
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    assert!(
        status.success(),
        "scenario failed ({status}); stderr:\n{stderr}\nstdout:\n{stdout}"
    );
    (stdout, stderr)
}

/// The quota-broker binary of this build: in the target directory, next to
/// the test's own `deps/` (`cargo build -p quota-broker`, and `cargo test
/// --workspace`, put it there). A test that needs it fails without it.
pub fn broker_bin() -> PathBuf {
    built(
        "quota-broker",
        "run `cargo build -p quota-broker` first (with the same profile as the tests; \
         `cargo test --workspace` builds it)",
    )
}

/// The gcsim binary of this build, next to the test's own `deps/` (`cargo
/// test -p gcsim` and `cargo build -p gcsim` put it there).
pub fn gcsim_bin() -> PathBuf {
    built("gcsim", "run `cargo build -p gcsim` first")
}

/// The binary `name` in this build's target directory, or a failure that
/// says how to build it.
fn built(name: &str, how: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test runs from <target>/<profile>/deps");
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "no {name} binary at {}: {how}",
        bin.display()
    );
    bin
}

/// The mode called `name` of a report.
pub fn mode<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["modes"]
        .as_array()
        .and_then(|modes| modes.iter().find(|m| m["mode"] == name))
        .unwrap_or_else(|| panic!("mode {name} missing from {report:#}"))
}

/// The number at `path` in `v`.
pub fn f64_at(v: &Value, path: &[&str]) -> f64 {
    let mut at = v;
    for key in path {
        at = &at[*key];
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v:#}"))
}

/// A mode's `kind` records ("ingest" or "writes") not stored by the end of
/// the run: lost, or left unfinished for the next run.
pub fn not_stored(mode: &Value, kind: &str) -> f64 {
    f64_at(mode, &["records", kind, "lost"]) + f64_at(mode, &["records", kind, "unfinished"])
}
