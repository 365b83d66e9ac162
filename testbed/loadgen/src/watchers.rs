//! Open Watch streams: many watchers of one tenant spread over a few
//! connections, each a task that reads and counts every update, so updates
//! really flow (a watcher that never reads would only fill buffers).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::WatchRequest;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::drive;
use crate::error::Error;

/// Open Watch streams; dropping this closes them.
pub(crate) struct Watchers {
    /// The watcher tasks; dropping the set aborts them, which drops (resets)
    /// their streams.
    tasks: JoinSet<()>,
    /// Updates received by all watchers. An atomic because a thousand tasks
    /// add to it and the run reads it from outside.
    updates: Arc<AtomicU64>,
    /// Kept so the connections outlive the tasks' clients.
    _channels: Vec<Channel>,
}

impl Watchers {
    /// Opens `n` Watch streams on `tenant` over `connections` connections
    /// and waits, at most `timeout`, until each has received its first
    /// snapshot.
    pub(crate) async fn open(
        addr: SocketAddr,
        tenant: &str,
        n: usize,
        connections: usize,
        timeout: Duration,
    ) -> Result<Watchers, Error> {
        let channels = drive::connect(addr, connections).await?;
        let updates = Arc::new(AtomicU64::new(0));
        let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), tonic::Status>>(n.max(1));
        let mut tasks = JoinSet::new();
        for i in 0..n {
            let mut client = QuotaBrokerClient::new(channels[i % channels.len()].clone());
            let request = WatchRequest {
                tenant: tenant.to_owned(),
            };
            let (ready, updates) = (ready_tx.clone(), updates.clone());
            tasks.spawn(async move {
                let mut stream = match client.watch(request).await {
                    Ok(response) => response.into_inner(),
                    Err(status) => {
                        let _ = ready.send(Err(status)).await;
                        return;
                    }
                };
                let mut first = Some(ready);
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => {
                            updates.fetch_add(1, Ordering::Relaxed);
                            if let Some(ready) = first.take() {
                                let _ = ready.send(Ok(())).await;
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            if let Some(ready) = first.take() {
                                let _ = ready.send(Err(status)).await;
                            }
                            break;
                        }
                    }
                }
            });
        }
        drop(ready_tx);
        let deadline = Instant::now() + timeout;
        for opened in 0..n {
            match tokio::time::timeout_at(deadline.into(), ready_rx.recv()).await {
                Ok(Some(Ok(()))) => {}
                Ok(Some(Err(status))) => return Err(Error::Rpc(status)),
                Ok(None) => {
                    return Err(Error::Protocol(format!(
                        "{} Watch streams ended before their first snapshot",
                        n - opened
                    )))
                }
                Err(_) => {
                    return Err(Error::Protocol(format!(
                        "only {opened} of {n} Watch streams had a snapshot after {timeout:?}"
                    )))
                }
            }
        }
        Ok(Watchers {
            tasks,
            updates,
            _channels: channels,
        })
    }

    /// Updates received so far by all watchers (snapshots included).
    pub(crate) fn updates(&self) -> u64 {
        self.updates.load(Ordering::Relaxed)
    }

    /// Closes every stream and waits until the tasks are gone.
    pub(crate) async fn close(mut self) {
        self.tasks.shutdown().await;
    }
}
