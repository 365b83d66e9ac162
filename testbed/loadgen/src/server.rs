//! The servers a run drives, behind one handle: the broker or the no-op
//! service, either in this process (one tokio task, stopped by a oneshot) or
//! as a child process (`child.rs`, the only way to see the broker's own
//! memory). Readiness is the same for both: an Acquire→Release pair that
//! succeeds, retried with a short backoff until a deadline.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::Settings;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Endpoint;

use crate::brokerconf::BrokerConfig;
use crate::child::Child;
use crate::drive;
use crate::error::Error;
use crate::noop;

/// How long to wait between readiness attempts, at most.
const MAX_BACKOFF: Duration = Duration::from_millis(50);
/// How long to wait for a server to become ready by default.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running server.
pub(crate) enum Server {
    /// A task in this process, serving until `stop` is sent.
    InProcess {
        /// Where it listens.
        addr: SocketAddr,
        /// Stops it.
        stop: oneshot::Sender<()>,
        /// The serving task.
        task: JoinHandle<()>,
    },
    /// A child process (boxed: a process handle is much larger than a task's).
    Child(Box<Child>),
}

impl Server {
    /// Starts the broker with `config` in this process and waits until it
    /// serves.
    pub(crate) async fn broker_in_process(config: &BrokerConfig) -> Result<Server, Error> {
        let settings = Settings::from_toml(&config.render())?;
        let listener = bind().await?;
        let addr = local_addr(&listener)?;
        // Metrics on, as deployed.
        let listeners = quota_broker::Listeners {
            grpc: listener,
            http: Some(bind().await?),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = quota_broker::serve(listeners, &settings, shutdown).await {
                eprintln!("loadgen: in-process broker: {e}");
            }
        });
        let server = Server::InProcess { addr, stop, task };
        wait_ready(addr, "the in-process broker", READY_TIMEOUT, || Ok(())).await?;
        Ok(server)
    }

    /// Starts the no-op service in this process.
    pub(crate) async fn noop_in_process() -> Result<Server, Error> {
        let listener = bind().await?;
        let addr = local_addr(&listener)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = noop::serve(listener, shutdown).await {
                eprintln!("loadgen: in-process no-op service: {e}");
            }
        });
        let server = Server::InProcess { addr, stop, task };
        wait_ready(addr, "the in-process no-op service", READY_TIMEOUT, || {
            Ok(())
        })
        .await?;
        Ok(server)
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        match self {
            Server::InProcess { addr, .. } => *addr,
            Server::Child(child) => child.addr(),
        }
    }

    /// The server process's resident set size in KiB; `None` in process
    /// (loadgen's own RSS would count the load generator too).
    pub(crate) fn rss_kib(&self) -> Option<u64> {
        match self {
            Server::InProcess { .. } => None,
            Server::Child(child) => child.rss_kib(),
        }
    }

    /// Stops it: a graceful shutdown in process (bounded), a kill for a child.
    pub(crate) async fn stop(self) {
        match self {
            Server::InProcess { stop, task, .. } => {
                let _ = stop.send(());
                let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
            }
            Server::Child(child) => child.kill().await,
        }
    }
}

async fn bind() -> Result<TcpListener, Error> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(Error::io("bind 127.0.0.1:0"))
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, Error> {
    listener
        .local_addr()
        .map_err(Error::io("read the listener's address"))
}

/// Waits until `addr` serves an Acquire→Release pair (to tenant `t0`),
/// retrying with a backoff of at most 50 ms until `timeout`. `exited` is
/// asked before each attempt and fails when the server is gone for good.
pub(crate) async fn wait_ready(
    addr: SocketAddr,
    what: &str,
    timeout: Duration,
    mut exited: impl FnMut() -> Result<(), Error>,
) -> Result<(), Error> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut backoff = Duration::from_millis(1);
    loop {
        exited()?;
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = async {
            let channel = Endpoint::from_shared(format!("http://{addr}"))?
                .connect_timeout(left)
                .connect()
                .await?;
            drive::pair(&mut QuotaBrokerClient::new(channel), "t0").await?;
            Ok::<(), Error>(())
        };
        let last = match tokio::time::timeout(left, attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        if Instant::now() >= deadline {
            return Err(Error::NotReady {
                what: what.to_owned(),
                waited: started.elapsed(),
                last,
            });
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
