//! SIGINT and SIGTERM stop a run cleanly: the real `scenario` binary, with
//! the broker (and, for SIGTERM, the simulator) as child processes, is
//! signalled once its children run; it must exit 130 / 143 with no child
//! left and its temporary directory gone. Linux only (reads `/proc`).

#![cfg(target_os = "linux")]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{broker_bin, gcsim_bin};

/// Longest the children may take to start, and the scenario to stop.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The live (not zombie) processes whose parent is `pid`.
fn live_children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                return false;
            };
            // "pid (comm) state ppid ...": comm may hold spaces and parens.
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                return false;
            };
            let mut fields = after.split_whitespace();
            let state = fields.next();
            let ppid = fields.next().and_then(|f| f.parse::<u32>().ok());
            ppid == Some(pid) && state != Some("Z")
        })
        .collect()
}

/// Whether `pid` is a process that has not exited (zombies have).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after = &stat[stat.rfind(')')? + 1..];
            after.split_whitespace().next().map(|s| s != "Z")
        })
        .unwrap_or(false)
}

/// Polls `done` until it holds or `TIMEOUT` passes (waiting for processes,
/// not for time to pass).
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a long broker-mode run with `extra` flags, waits for `children`
/// child processes, sends `signal`; returns the scenario's exit code, the
/// children it had and its temporary directory.
fn signal_run(extra: &[&str], children: usize, signal: &str) -> (Option<i32>, Vec<u32>, PathBuf) {
    let broker = broker_bin();
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_scenario"))
        .args([
            "--modes",
            "broker",
            "--duration",
            "3600",
            "--time-scale",
            "10",
            "--broker-bin",
        ])
        .arg(&broker)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start scenario");
    let pid = child.id();
    let workdir = std::env::temp_dir().join(format!("scenario-{pid}"));
    let mut seen = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while seen.len() < children {
        if Instant::now() >= deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("scenario did not start {children} children within {TIMEOUT:?}");
        }
        seen = live_children(pid);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        workdir.is_dir(),
        "no temporary directory {}",
        workdir.display()
    );
    let sent = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill {signal} {pid}: {sent}");
    let mut code = None;
    wait_for("scenario exits after the signal", || {
        match child.try_wait().expect("wait on scenario") {
            Some(status) => {
                code = status.code();
                true
            }
            None => false,
        }
    });
    (code, seen, workdir)
}

/// Every child has exited and the temporary directory is gone; on failure
/// the leftovers are removed before the test fails.
fn assert_cleaned_up(children: &[u32], workdir: &PathBuf) {
    // A killed child re-parented to init is reaped there, soon.
    let deadline = Instant::now() + TIMEOUT;
    let mut left: Vec<u32> = children.to_vec();
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left.retain(|&c| alive(c));
    }
    let stray = workdir.exists();
    for &c in &left {
        let _ = Command::new("kill")
            .args(["-KILL", &c.to_string()])
            .status();
    }
    if stray {
        let _ = std::fs::remove_dir_all(workdir);
    }
    assert!(left.is_empty(), "children {left:?} still running");
    assert!(
        !stray,
        "temporary directory {} left behind",
        workdir.display()
    );
}

#[test]
fn sigint_stops_the_broker_child_and_removes_the_work_dir() {
    let (code, children, workdir) = signal_run(&[], 1, "-INT");
    assert_cleaned_up(&children, &workdir);
    assert_eq!(code, Some(130));
}

#[test]
fn sigterm_stops_the_simulator_and_broker_children() {
    let gcsim = gcsim_bin();
    let gcsim = gcsim.to_str().expect("a UTF-8 target path");
    let (code, children, workdir) = signal_run(&["--gcsim-bin", gcsim], 2, "-TERM");
    assert_cleaned_up(&children, &workdir);
    assert_eq!(code, Some(143));
}

/// A SIGKILL runs no handler and no drop: the kernel must take the
/// children along (before, the broker kept serving under init, holding
/// its port). The temporary directory stays; the test removes it.
#[test]
fn sigkill_takes_the_simulator_and_broker_children_along() {
    let gcsim = gcsim_bin();
    let gcsim = gcsim.to_str().expect("a UTF-8 target path");
    let (code, children, workdir) = signal_run(&["--gcsim-bin", gcsim], 2, "-KILL");
    assert_eq!(code, None, "killed by a signal, no exit code");
    let _ = std::fs::remove_dir_all(&workdir);
    assert_cleaned_up(&children, &workdir);
}

/// SIGINT during a matrix's second cell prints the first cell's table
/// before exiting 130 (before, nothing: the finished cells were lost).
#[test]
fn sigint_during_a_matrix_prints_the_cells_finished() {
    use std::io::{BufRead, BufReader, Read};
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/upstreams/");
    let mut child = Command::new(env!("CARGO_BIN_EXE_scenario"))
        .args(["--matrix", "--upstream"])
        .arg(format!("{dir}genesys-fixed.toml"))
        .arg("--upstream")
        .arg(format!("{dir}token-bucket-silent.toml"))
        .args(["--duration", "120", "--time-scale", "60"])
        .arg("--broker-in-process")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start scenario");
    let pid = child.id();
    let stderr = child.stderr.take().expect("stderr piped");
    // Read to the end in a thread of its own: a closed pipe would fail the
    // scenario's next line on stderr.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("matrix cell 2 of 2") {
                let _ = tx.send(());
            }
        }
    });
    let second = rx.recv_timeout(TIMEOUT).is_ok();
    if !second {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the matrix never reached its second cell");
    }
    let sent = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -INT {pid}: {sent}");
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout piped")
        .read_to_string(&mut stdout)
        .expect("read stdout");
    let status = child.wait().expect("wait on scenario");
    assert_eq!(status.code(), Some(130));
    // A cell's row: its file, then its seed.
    let rows = |name: &str| {
        stdout
            .lines()
            .filter(|l| {
                let mut fields = l.split_whitespace();
                fields.next() == Some(name) && fields.next() == Some("1")
            })
            .count()
    };
    assert_eq!(
        (rows("genesys-fixed"), rows("token-bucket-silent")),
        (1, 0),
        "{stdout}"
    );
}
