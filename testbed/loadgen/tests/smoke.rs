//! Runs the loadgen binary briefly against real servers on 127.0.0.1:0 and
//! checks what it prints: the default run (unary and stream mode) and a
//! tiny scale suite.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// How long one loadgen run may take.
const DEADLINE: Duration = Duration::from_secs(20);

/// What a finished run printed.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs loadgen with `args`; kills it and fails after [`DEADLINE`].
fn loadgen(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen starts");
    let read = |mut pipe: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            let _ = tx.send(text);
        });
        rx
    };
    let stdout = read(Box::new(child.stdout.take().expect("stdout piped")));
    let stderr = read(Box::new(child.stderr.take().expect("stderr piped")));
    // Both pipes reach their end when the process exits.
    let Ok(out) = stdout.recv_timeout(DEADLINE) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("loadgen {args:?} ran past {DEADLINE:?}");
    };
    let err = stderr.recv_timeout(DEADLINE).unwrap_or_default();
    let status = child.wait().expect("wait on loadgen");
    Run {
        status,
        stdout: out,
        stderr: err,
    }
}

/// Runs loadgen with `args` and expects success.
fn loadgen_ok(args: &[&str]) -> String {
    let run = loadgen(args);
    assert!(
        run.status.success(),
        "loadgen {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    run.stdout
}

/// Cell `n` (1-based, after the leading `|`) of the row starting `prefix`.
fn cell<'a>(out: &'a str, prefix: &str, n: usize) -> &'a str {
    let row = out
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no row {prefix:?} in:\n{out}"));
    row.split('|')
        .nth(n)
        .map(str::trim)
        .unwrap_or_else(|| panic!("row {row:?} has no cell {n}"))
}

fn number(out: &str, prefix: &str, n: usize) -> f64 {
    let v = cell(out, prefix, n);
    v.parse()
        .unwrap_or_else(|_| panic!("cell {n} of {prefix:?} is {v:?}, not a number"))
}

#[test]
fn short_run_prints_both_rows() {
    let out = loadgen_ok(&[
        "--duration",
        "1",
        "--connections",
        "1",
        "--concurrency",
        "2",
    ]);
    assert!(
        out.contains("| target | mode | pairs/s | p50 ms | p99 ms | p999 ms |"),
        "no table header in:\n{out}"
    );
    for target in ["broker", "noop"] {
        let pairs = number(&out, &format!("| {target} | closed"), 3);
        assert!(pairs > 0.0, "{target} made no pairs:\n{out}");
    }
    assert!(out.contains("broker/noop pairs/s"), "no ratio in:\n{out}");
}

#[test]
fn stream_mode_pipelines_pairs_on_lease_streams() {
    let out = loadgen_ok(&[
        "--mode",
        "stream",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--connections",
        "2",
        "--concurrency",
        "8",
        "--tenants",
        "3",
    ]);
    for target in ["broker", "noop"] {
        let prefix = format!("| {target} | stream closed (max)");
        assert!(
            number(&out, &prefix, 3) > 0.0,
            "{target} made no pairs:\n{out}"
        );
        assert_eq!(cell(&out, &prefix, 7), "0", "{target} had errors:\n{out}");
    }
    assert!(
        out.contains("broker/noop pairs/s, stream closed (max)"),
        "no ratio in:\n{out}"
    );
}

#[test]
fn quick_scale_suite_prints_every_row() {
    let out = loadgen_ok(&[
        "scale",
        "--quick",
        "--in-process",
        "--duration",
        "0.3",
        "--warmup",
        "0.1",
        "--json",
    ]);
    assert!(
        out.contains("| scenario | pairs/s | p50 ms | p99 ms | p999 ms | errors | server RSS MiB | derived |"),
        "no table header in:\n{out}"
    );
    for row in [
        "tenants-1",
        "open-50%",
        "stream",
        "tenants-10",
        "noop-unary",
        "noop-stream",
        "held-leases-100",
        "watch-0",
        "watch-10",
    ] {
        let prefix = format!("| {row} |");
        assert!(
            number(&out, &prefix, 2) > 0.0,
            "{row} made no pairs:\n{out}"
        );
        assert_eq!(cell(&out, &prefix, 6), "0", "{row} had errors:\n{out}");
        assert!(
            out.contains(&format!("{{\"scenario\":\"{row}\",\"pairs_per_sec\":")),
            "no JSON line for {row} in:\n{out}"
        );
    }
    assert!(cell(&out, "| tenants-10 |", 8).starts_with("startup "));
    assert!(cell(&out, "| stream |", 8).starts_with("stream/unary "));
    let held = cell(&out, "| held-leases-100 |", 8);
    assert!(held.contains("B/lease n/a (in-process)"), "{held}");
    assert!(held.contains("released 100/100"), "{held}");
    let watch = cell(&out, "| watch-10 |", 8);
    assert!(watch.contains("B/stream n/a (in-process)"), "{watch}");
    assert!(watch.contains("updates/s"), "{watch}");
    assert!(out.contains("target stream >= 2x unary pairs/s:"), "{out}");
}

#[test]
fn scale_without_a_broker_binary_says_how_to_build_one() {
    let run = loadgen(&[
        "scale",
        "--quick",
        "--broker-bin",
        "/nonexistent/quota-broker",
    ]);
    assert!(
        !run.status.success(),
        "ran without a broker:\n{}",
        run.stdout
    );
    assert!(
        run.stderr
            .contains("cargo build --release --bin quota-broker"),
        "no build hint in:\n{}",
        run.stderr
    );
}

/// Ctrl-C (or SIGTERM) during a run stops loadgen's child servers and
/// removes their files: none is left serving, holding its port.
#[cfg(unix)]
#[test]
fn a_signal_stops_the_child_servers_and_removes_their_files() {
    use std::io::{BufRead, BufReader};
    let exe = std::env::current_exe().expect("the test's own path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test runs from <target>/<profile>/deps")
        .join("quota-broker");
    assert!(
        bin.is_file(),
        "no quota-broker binary at {}: run `cargo build -p quota-broker` first",
        bin.display()
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["scale", "--quick", "--duration", "3", "--warmup", "0.1"])
        .arg("--broker-bin")
        .arg(&bin)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen starts");
    let pid = child.id();
    let files = std::env::temp_dir().join(format!("loadgen-{pid}"));
    // The first row done: its child broker serves the next ones.
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr piped");
    thread::spawn(move || {
        let mut said = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("loadgen scale: tenants-1:") {
                let _ = tx.send(Ok(()));
            }
            said.push_str(&line);
            said.push('\n');
        }
        let _ = tx.send(Err(said));
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(Ok(())) => {}
        other => {
            let _ = child.kill();
            panic!("no first row within {DEADLINE:?}: {other:?}");
        }
    }
    let servers = |pid: u32| -> Vec<String> {
        let mark = format!("loadgen-{pid}/");
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&mark))
            .collect()
    };
    assert!(!servers(pid).is_empty(), "no child server running to stop");
    assert!(Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill runs")
        .success());
    let said = rx.recv_timeout(DEADLINE).expect("loadgen exited");
    let status = child.wait().expect("wait on loadgen");
    assert_eq!(status.code(), Some(130), "{said:?}");
    assert!(
        format!("{said:?}").contains("stopped by SIGINT"),
        "{said:?}"
    );
    // Killed as loadgen stopped; a killed process is gone a moment later.
    let gone_by = std::time::Instant::now() + Duration::from_secs(5);
    while !servers(pid).is_empty() && std::time::Instant::now() < gone_by {
        thread::yield_now();
    }
    assert_eq!(
        servers(pid),
        Vec::<String>::new(),
        "child servers left running"
    );
    assert!(!files.exists(), "{} left behind", files.display());
}
