//! The `quota-broker` binary itself: config errors, serving, SIGTERM.

use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

fn temp_config(name: &str, content: &str) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("quota-broker-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, content).unwrap();
    path
}

#[test]
fn bad_config_exits_non_zero_listing_every_problem() {
    let path = temp_config(
        "bad",
        "[server]\nlisten = \"nope\"\n[[tenants]]\nid = \"a\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"GET x\"]\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_quota-broker"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.listen \"nope\""), "{err}");
    assert!(err.contains("route \"GET x\""), "{err}");
    assert!(err.contains("limits nothing"), "{err}");
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_quota-broker"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // clap's usage line ("Usage: quota-broker [OPTIONS] [COMMAND]").
    assert!(String::from_utf8_lossy(&out.stderr)
        .to_lowercase()
        .contains("usage: quota-broker"));
}

/// Kills the broker if the test fails before it exits, so no process (and
/// no pipe a CI runner waits on) outlives the test.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(unix)]
#[tokio::test]
async fn serves_then_exits_zero_on_sigterm() {
    let path = temp_config(
        "ok",
        "[server]\nlisten = \"127.0.0.1:0\"\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 2\n",
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_quota-broker"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut guard = KillOnDrop(Some(child));
    // The startup line names the bound address.
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let reader = std::thread::spawn(move || {
        let mut addr_tx = Some(addr_tx);
        let mut log = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listen=").nth(1) {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                if let Some(tx) = addr_tx.take() {
                    let _ = tx.send(addr);
                }
            }
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    let addr = tokio::time::timeout(Duration::from_secs(30), addr_rx)
        .await
        .expect("broker printed its address within 30 s")
        .unwrap();
    let mut client = QuotaBrokerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let r = client
        .acquire(quota_broker::pb::AcquireRequest {
            tenant: "t".into(),
            client_id: "it".into(),
            method: "GET".into(),
            path: "/x".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.granted);
    let pid = guard.0.as_ref().unwrap().id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let waiting = tokio::task::spawn_blocking(move || {
        let status = guard.0.as_mut().map(|c| c.wait());
        (status, guard)
    });
    let status = match tokio::time::timeout(Duration::from_secs(30), waiting).await {
        Ok(done) => done.unwrap().0.unwrap().unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            panic!("broker did not exit within 30 s of SIGTERM");
        }
    };
    let log = reader.join().unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(status.success(), "exit {status:?}\n{log}");
    assert!(log.contains("shutdown requested"), "{log}");
    assert!(log.contains("broker stopped"), "{log}");
}
