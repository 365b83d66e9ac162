//! A broker served by the caller's tokio runtime until stopped: the one copy
//! of "bind, spawn, stop gracefully" that tests and tools running a broker
//! in process need. Its port answers at once, the broker's calls
//! UNAVAILABLE "starting" until the start is done: a caller that must not
//! see that waits for [`Embedded::started`] first.

use super::{serve_telling, Listeners, ServerError};
use crate::config::Settings;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// A broker (gRPC only) running in a task of this process until
/// [`Embedded::stop`]; dropped without it, the task is aborted.
#[derive(Debug)]
pub struct Embedded {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
    /// True once the broker serves.
    started: watch::Receiver<bool>,
}

impl Embedded {
    /// Serves `settings` on `listener` in a task of the current runtime.
    pub fn spawn(listener: TcpListener, settings: Settings) -> std::io::Result<Embedded> {
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let (tell, started) = watch::channel(false);
        let task = tokio::spawn(async move {
            let listeners = Listeners {
                grpc: listener,
                http: None,
            };
            let shutdown = async {
                let _ = stopped.await;
            };
            serve_telling(listeners, &settings, shutdown, Some(tell)).await
        });
        Ok(Embedded {
            addr,
            stop: Some(stop),
            task: Some(task),
            started,
        })
    }

    /// Waits until the broker has started (its calls get the broker's
    /// answers, health says SERVING): true; false if the server ended
    /// before ([`Embedded::stop`] says why).
    pub async fn started(&self) -> bool {
        self.started.clone().wait_for(|s| *s).await.is_ok()
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://` and its address.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shuts it down gracefully and waits until it has; the server's error
    /// if it failed (a panic in it is resumed here).
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => match task.await {
                Ok(result) => result,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => Ok(()),
            },
            None => Ok(()),
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
