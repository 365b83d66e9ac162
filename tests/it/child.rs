//! The `quota-broker` binary as a child process: started on a config file,
//! its address read from its startup log line, killed if a test fails
//! before it exits (so no process, and no pipe a CI runner waits on,
//! outlives the test). Every wait is bounded.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bound on the broker starting or exiting.
const LIMIT: Duration = Duration::from_secs(30);

/// Writes `content` to a config file unique to this test process.
pub fn temp_config(name: &str, content: &str) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("quota-broker-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, content).unwrap();
    path
}

/// A running broker process.
pub struct Broker {
    child: Option<std::process::Child>,
    /// The address it serves, `host:port`.
    pub addr: String,
    /// Its HTTP port's address, `host:port`; `None` with the port off.
    pub http: Option<String>,
    log: Option<JoinHandle<String>>,
    /// What it logged so far, and a change each time it logs a line.
    so_far: tokio::sync::watch::Sender<String>,
}

impl Broker {
    /// Starts the binary on `config` and waits until it has started (its
    /// "broker started" line: health SERVING, its calls answered).
    pub async fn start(config: &Path) -> Broker {
        Broker::start_reading(config, true).await
    }

    /// Starts the binary like [`Broker::start`], then closes its log pipe:
    /// every line it logs afterwards meets a broken pipe (`quota-broker |
    /// head`, a log shipper gone).
    pub async fn start_closing_log(config: &Path) -> Broker {
        Broker::start_reading(config, false).await
    }

    /// Starts the binary like [`Broker::start`], logging by `filter` (a
    /// `RUST_LOG`, e.g. `info,quota_broker::cluster=debug`).
    pub async fn start_logging(config: &Path, filter: &str) -> Broker {
        let (broker, started) = Broker::spawn(config, true, filter).await;
        tokio::time::timeout(LIMIT, started)
            .await
            .expect("broker started within 30 s")
            .expect("broker exited before it had started");
        broker
    }

    async fn start_reading(config: &Path, keep_reading: bool) -> Broker {
        let (broker, started) = Broker::spawn(config, keep_reading, "info").await;
        tokio::time::timeout(LIMIT, started)
            .await
            .expect("broker started within 30 s")
            .expect("broker exited before it had started");
        broker
    }

    /// Starts the binary on `config` and waits for its "serving" line only
    /// (its ports bound and answering, the broker maybe still starting).
    pub async fn start_unready(config: &Path) -> Broker {
        Broker::spawn(config, true, "info").await.0
    }

    /// Starts the binary and waits for its "serving" line; with what
    /// resolves on its "broker started" line.
    async fn spawn(
        config: &Path,
        keep_reading: bool,
        filter: &str,
    ) -> (Broker, tokio::sync::oneshot::Receiver<()>) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_quota-broker"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let so_far = tokio::sync::watch::Sender::new(String::new());
        let mut broker = Broker {
            child: Some(child),
            addr: String::new(),
            http: None,
            log: None,
            so_far: so_far.clone(),
        };
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        broker.log = Some(std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            let mut started_tx = Some(started_tx);
            let mut log = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // The startup line only: an error about a taken
                // `http_listen=` port must not be read as the gRPC address.
                let serving = line.contains("quota-broker serving");
                if let Some(rest) = line.split(" listen=").nth(1).filter(|_| serving) {
                    let addr = rest.split_whitespace().next().unwrap_or_default();
                    let http = line
                        .split(" http=")
                        .nth(1)
                        .and_then(|h| h.split_whitespace().next())
                        .filter(|h| *h != "off");
                    if let Some(tx) = addr_tx.take() {
                        let _ = tx.send((addr.to_owned(), http.map(str::to_owned)));
                    }
                }
                let started = line.contains("broker started");
                if started {
                    if let Some(tx) = started_tx.take() {
                        let _ = tx.send(());
                    }
                }
                log.push_str(&line);
                log.push('\n');
                so_far.send_modify(|seen| {
                    seen.push_str(&line);
                    seen.push('\n');
                });
                if started && !keep_reading {
                    // Dropping the pipe's end closes it.
                    break;
                }
            }
            log
        }));
        (broker.addr, broker.http) = tokio::time::timeout(LIMIT, addr_rx)
            .await
            .expect("broker printed its address within 30 s")
            .expect("broker exited before serving");
        (broker, started_rx)
    }

    /// The broker's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends `signal` (e.g. "-HUP") to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Sends `signal` and waits (at most 30 s) for the process to exit.
    async fn stop_with(&mut self, signal: &str) -> ExitStatus {
        self.signal(signal);
        let mut child = self.child.take().expect("running");
        let waiting = tokio::task::spawn_blocking(move || {
            let status = child.wait();
            (status, child)
        });
        match tokio::time::timeout(LIMIT, waiting).await {
            Ok(done) => done.unwrap().0.unwrap(),
            Err(_) => panic!("broker did not exit within 30 s of {signal}"),
        }
    }

    /// What the broker has logged so far.
    pub fn logged(&self) -> String {
        self.so_far.borrow().clone()
    }

    /// Its log from now on: changes with each line it logs (what it
    /// logged so far taken as seen). Ends once the broker has exited and
    /// been dropped.
    pub fn log_feed(&self) -> tokio::sync::watch::Receiver<String> {
        self.so_far.subscribe()
    }

    /// Waits (at most 30 s) until the broker has logged a line containing
    /// `text` past the first `offset` bytes of its log (a line logged
    /// again, after `offset = logged().len()`).
    pub async fn until_logged_after(&self, offset: usize, text: &str) {
        let mut lines = self.so_far.subscribe();
        let seen = tokio::time::timeout(
            LIMIT,
            lines.wait_for(|log| log.get(offset..).is_some_and(|l| l.contains(text))),
        )
        .await;
        assert!(
            matches!(seen, Ok(Ok(_))),
            "the broker did not log {text:?} again within 30 s:\n{}",
            self.logged()
        );
    }

    /// Waits (at most 30 s) until the broker has logged a line containing
    /// `text`: woken by each line it logs, not by a clock.
    pub async fn until_logged(&self, text: &str) {
        let mut lines = self.so_far.subscribe();
        let seen = tokio::time::timeout(LIMIT, lines.wait_for(|log| log.contains(text))).await;
        assert!(
            matches!(seen, Ok(Ok(_))),
            "the broker did not log {text:?} within 30 s:\n{}",
            self.logged()
        );
    }

    /// Waits (at most 30 s) for the process to exit by itself; its exit
    /// status and everything it logged.
    pub async fn exited(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let waiting = tokio::task::spawn_blocking(move || child.wait());
        let status = match tokio::time::timeout(LIMIT, waiting).await {
            Ok(done) => done.unwrap().unwrap(),
            Err(_) => panic!("broker did not exit within 30 s"),
        };
        (status, self.take_log())
    }

    /// SIGTERM; the exit status and everything the broker logged.
    pub async fn terminate(mut self) -> (ExitStatus, String) {
        let status = self.stop_with("-TERM").await;
        (status, self.take_log())
    }

    /// SIGKILL: a crash, with no chance to save or release anything.
    pub async fn kill(mut self) -> String {
        self.stop_with("-KILL").await;
        self.take_log()
    }

    fn take_log(&mut self) -> String {
        self.log
            .take()
            .map(|l| l.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
