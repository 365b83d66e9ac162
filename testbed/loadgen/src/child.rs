//! Servers run as child processes, so that their memory can be read on its
//! own (`/proc/PID/status`): the `quota-broker` binary with a generated
//! config file, or this binary's hidden `noop-server` subcommand. Each child
//! listens on a port picked by binding 127.0.0.1:0 and dropping it, logs to a
//! file (RUST_LOG=warn), is killed when its handle is dropped and is reaped
//! by [`Child::kill`].

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::brokerconf::{BrokerConfig, ClusterNode};
use crate::error::Error;
use crate::server::wait_ready;

/// The end of a failed child's log shown in the error, bytes.
const LOG_TAIL: usize = 2_000;

/// What a child runs.
pub(crate) enum Program<'a> {
    /// The quota-broker binary at `bin` with `config` (its listen address is
    /// filled in).
    Broker {
        /// Path of the `quota-broker` binary.
        bin: &'a Path,
        /// The config to write for it.
        config: BrokerConfig,
        /// Cluster mode: its `[cluster]` section. Such a node is ready
        /// when it listens (it answers pairs only for tenants it leads).
        cluster: Option<&'a ClusterNode>,
    },
    /// This binary's `noop-server` subcommand.
    Noop,
}

/// A running child server; killed when dropped.
pub(crate) struct Child {
    child: tokio::process::Child,
    pid: u32,
    addr: SocketAddr,
    /// Config and log files, removed when the child is dropped.
    files: Vec<PathBuf>,
}

/// A loopback port nothing listens on right now.
fn free_port() -> Result<SocketAddr, Error> {
    let probe = TcpListener::bind("127.0.0.1:0").map_err(Error::io("bind 127.0.0.1:0"))?;
    probe
        .local_addr()
        .map_err(Error::io("read the probe listener's address"))
}

/// The last `LOG_TAIL` bytes of the log at `path`.
fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let mut from = log.len().saturating_sub(LOG_TAIL);
    while !log.is_char_boundary(from) {
        from += 1;
    }
    log[from..].to_owned()
}

/// A free port, this process's directory for child files, and the log
/// file path of child `name` in it.
pub(crate) fn child_files(name: &str) -> Result<(SocketAddr, PathBuf, PathBuf), Error> {
    let addr = free_port()?;
    let dir = std::env::temp_dir().join(format!("loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(Error::io(format!("create {}", dir.display())))?;
    let log_path = dir.join(format!("{name}.log"));
    Ok((addr, dir, log_path))
}

impl Child {
    /// Starts `program` as a child named `name` (for its files and errors)
    /// and waits until it serves, at most `ready_timeout`.
    pub(crate) async fn spawn(
        name: &str,
        program: Program<'_>,
        ready_timeout: Duration,
    ) -> Result<Child, Error> {
        let (addr, dir, log_path) = child_files(name)?;
        let mut files = vec![log_path.clone()];
        let mut listening_is_ready = false;
        let mut command = match program {
            Program::Broker {
                bin,
                mut config,
                cluster,
            } => {
                if !bin.is_file() {
                    return Err(Error::MissingBinary(bin.to_owned()));
                }
                config.listen = Some(addr);
                let mut text = config.render();
                if let Some(node) = cluster {
                    text.push_str(&node.render(addr));
                    listening_is_ready = true;
                }
                let config_path = dir.join(format!("{name}.toml"));
                std::fs::write(&config_path, text)
                    .map_err(Error::io(format!("write {}", config_path.display())))?;
                files.push(config_path.clone());
                let mut command = Command::new(bin);
                command.arg("--config").arg(config_path);
                command
            }
            Program::Noop => {
                let exe = std::env::current_exe().map_err(Error::io("find loadgen's own path"))?;
                let mut command = Command::new(exe);
                command
                    .arg("noop-server")
                    .arg("--listen")
                    .arg(addr.to_string());
                command
            }
        };
        let log =
            File::create(&log_path).map_err(Error::io(format!("create {}", log_path.display())))?;
        let child = command
            .env("RUST_LOG", "warn")
            // The no-op server exits when its stdin closes, so it does not
            // outlive a loadgen that was killed.
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(Error::io(format!("start {name}")))?;
        // id() is None only once the child has been reaped; it was just
        // spawned and nothing has waited on it.
        let pid = child.id().unwrap_or(0);
        let mut child = Child {
            child,
            pid,
            addr,
            files,
        };
        let what = format!("{name} (pid {pid}, {addr})");
        let waiting = &mut child.child;
        let exited = || match waiting.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::Exited {
                what: what.clone(),
                status,
                log: log_tail(&log_path),
            }),
            Err(e) => Err(Error::Io(format!("wait on {what}"), e)),
        };
        if listening_is_ready {
            wait_listening(addr, &what, ready_timeout, exited).await?;
        } else {
            wait_ready(addr, &what, ready_timeout, exited).await?;
        }
        Ok(child)
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Its resident set size (VmRSS) in KiB, if it can be read.
    pub(crate) fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid)
    }

    /// Kills it and waits for it to exit.
    pub(crate) async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // The process itself is killed by kill_on_drop.
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
        if let Some(dir) = self.files.first().and_then(|f| f.parent()) {
            // Fails while other children still use it; the last one removes it.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Waits until something accepts connections on `addr` (at most
/// `timeout`); `exited` fails when the server is gone for good.
async fn wait_listening(
    addr: SocketAddr,
    what: &str,
    timeout: Duration,
    mut exited: impl FnMut() -> Result<(), Error>,
) -> Result<(), Error> {
    let started = tokio::time::Instant::now();
    loop {
        exited()?;
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() >= timeout => {
                return Err(Error::NotReady {
                    what: what.to_owned(),
                    waited: started.elapsed(),
                    last: e.to_string(),
                })
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// VmRSS of process `pid` in KiB, from /proc/PID/status.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

/// VmRSS in KiB from the text of /proc/PID/status.
fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\tquota-broker\nVmPeak:\t  900 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(12345));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert!(rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
    }
}
