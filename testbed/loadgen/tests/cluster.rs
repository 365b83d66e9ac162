//! `loadgen cluster --quick` end to end: a real etcd (testsvc's, installed
//! as Debian `etcd-server` if missing) and the `quota-broker` binary of
//! this build (next to the test's `deps/`) as 1, then 2 cluster nodes over
//! 20 tenants; the table must have a row per broker count with pairs and
//! no errors, and with 2 brokers both must lead tenants.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Longest the run may take (etcd's first install, when needed, included).
const DEADLINE: Duration = Duration::from_secs(180);

/// The quota-broker binary of this build (`cargo build -p quota-broker`).
fn broker_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test runs from <target>/<profile>/deps");
    let bin = dir.join(format!("quota-broker{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "no quota-broker binary at {}: run `cargo build -p quota-broker` first",
        bin.display()
    );
    bin
}

#[test]
fn quick_cluster_run_prints_a_row_per_broker_count() {
    let bin = broker_bin();
    let child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "cluster",
            "--quick",
            "--lease-ttl-ms",
            "2000",
            "--broker-bin",
        ])
        .arg(&bin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen starts");
    // Its end is waited for on a thread (std has no wait with a timeout);
    // past the deadline it is killed by its pid, which the thread then reaps.
    let pid = child.id();
    let (done, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let out = match ended.recv_timeout(DEADLINE) {
        Ok(out) => out.expect("loadgen's output"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("loadgen cluster ran past {DEADLINE:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed:\n{stdout}\n{stderr}");
    for brokers in ["1", "2"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {brokers} |")))
            .unwrap_or_else(|| panic!("no row for {brokers} broker(s):\n{stdout}\n{stderr}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let pairs: f64 = cells[2].parse().expect("pairs/s is a number");
        assert!(pairs > 0.0, "no pairs: {row}");
        assert_eq!(cells[6], "0", "errors: {row}\n{stderr}");
        let led: Vec<usize> = cells[10]
            .split(" / ")
            .map(|n| n.parse().expect("a count"))
            .collect();
        assert_eq!(led.iter().sum::<usize>(), 20, "{row}");
        assert_eq!(led.len().to_string(), brokers, "{row}");
        assert!(led.iter().all(|&n| n > 0), "a broker leads nothing: {row}");
    }
}
