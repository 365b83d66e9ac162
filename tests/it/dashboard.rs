//! The dashboard in a real browser: headless Chromium (Debian `chromium`)
//! driven by Playwright (`playwright-core`, pinned, installed with npm under
//! target/), against a broker under load. It waits for the charts to move,
//! checks that the numbers shown match ListBuckets once the load stops,
//! that a frozen bucket is shown first and one at its limit says so (every
//! slot held, or batch held back by the reserve of the classes above it),
//! that a page opened later draws the minutes before it (the 429
//! included), saves a screenshot (`target/tmp/dashboard.png`; the README
//! shows a copy, docs/dashboard.png), and that a page whose broker stopped
//! says it has no data instead of showing the last figures as current;
//! that a page opened after a per-client bucket's OAuth clients were
//! dropped charts each only while it existed; that a paused per-client
//! bucket no client uses has its panel (PAUSED, 0 clients); and that eight
//! tabs of it in one browser all go live (they share one feed).
//! Anything that cannot be installed fails the test, saying what.

mod feed;
mod per_client;
mod token;
mod under_load;

// `super::observe::…`, as `feed`, `token` and `under_load` name it.
use super::observe;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// The Playwright version installed (its Chromium protocol fits Debian
/// bookworm's Chromium).
const PLAYWRIGHT: &str = "playwright-core@1.65.1";
/// Bound on the whole browser session.
pub(super) const LIMIT: Duration = Duration::from_secs(120);

/// Installs Chromium, Node.js, npm and Playwright; the Playwright directory.
pub(super) fn install() -> PathBuf {
    // Both browser tests start at once: two npm runs writing one
    // node_modules would leave a half-written package to the first.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    testsvc::apt_install(&["chromium", "nodejs"]).unwrap_or_else(|e| {
        panic!("the dashboard test needs Chromium and Node.js: {e}");
    });
    let has_npm = std::process::Command::new("npm")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_npm {
        // Debian's nodejs comes without npm; some other builds bundle it.
        testsvc::apt_install(&["npm"])
            .unwrap_or_else(|e| panic!("the dashboard test needs npm: {e}"));
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("playwright");
    if !dir
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::process::Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg(PLAYWRIGHT)
            .output()
            .unwrap_or_else(|e| panic!("cannot run npm: {e}"));
        assert!(
            out.status.success(),
            "npm install {PLAYWRIGHT} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

/// Runs the node script `source` (written to `name`) with `args` and the
/// Playwright install at `playwright`, for at most [`LIMIT`].
pub(super) async fn node(
    name: &str,
    source: &str,
    args: &[String],
    playwright: &Path,
) -> std::process::Output {
    let run = node_command(name, source, args, playwright).output();
    tokio::time::timeout(LIMIT, run)
        .await
        .unwrap_or_else(|_| panic!("the browser session took over {LIMIT:?}"))
        .unwrap_or_else(|e| panic!("cannot run node: {e}"))
}

/// `source` written to `name` in the test's directory, as a node command
/// with `args` that finds Playwright and dies with the test.
fn node_command(
    name: &str,
    source: &str,
    args: &[String],
    playwright: &Path,
) -> tokio::process::Command {
    let script = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&script, source).unwrap();
    let mut command = tokio::process::Command::new("node");
    command
        .arg(&script)
        .args(args)
        .env("PW_DIR", playwright)
        .kill_on_drop(true);
    command
}

/// The script of `node` started with its stdin, stdout and stderr piped,
/// for a session the test talks to line by line.
pub(super) fn spawn_node(
    name: &str,
    source: &str,
    args: &[String],
    playwright: &Path,
) -> tokio::process::Child {
    node_command(name, source, args, playwright)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run node: {e}"))
}

/// The script exited 0 having printed `OK` alone.
pub(super) fn assert_said_ok(out: &std::process::Output) {
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "OK",
        "node said:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
