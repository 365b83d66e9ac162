//! Runs the loadgen binary briefly and checks it reports both targets.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn short_run_prints_both_rows() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "--duration",
            "1",
            "--connections",
            "1",
            "--concurrency",
            "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("loadgen starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait on loadgen") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("loadgen ran past 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout piped")
        .read_to_string(&mut out)
        .expect("read stdout");
    assert!(status.success(), "loadgen failed: {status}\n{out}");
    assert!(
        out.contains("| target | mode | pairs/s | p50 ms | p99 ms | p999 ms |"),
        "no table header in:\n{out}"
    );
    for target in ["broker", "noop"] {
        let row = out
            .lines()
            .find(|l| l.starts_with(&format!("| {target} | closed")))
            .unwrap_or_else(|| panic!("no {target} row in:\n{out}"));
        let pairs: f64 = row
            .split('|')
            .nth(3)
            .map(str::trim)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no pairs/s in {row:?}"));
        assert!(pairs > 0.0, "{target} made no pairs: {row}");
    }
    assert!(out.contains("broker/noop pairs/s"), "no ratio in:\n{out}");
}
