//! The serving threads (`server.io_threads`): each runs the gRPC
//! connections handed to it, their calls, reads and writes, on a
//! single-threaded runtime of its own, and has its own tonic server over
//! the same services.
//!
//! On tokio's work-stealing runtime a call's task, spawned by hyper on the
//! worker that read its request, wakes an idle worker to steal it, and its
//! answer wakes the connection's task on another: a `futex` and a context
//! switch every few calls, which on a machine the broker shares with its
//! callers pre-empt them. A connection kept on one thread does its calls
//! and its writes in one run of that thread (and `transport`'s write hold
//! gathers every answer a run produced into one write). What crosses
//! threads is the broker's shared state (locks and atomics, as before) and
//! the background tasks on the main runtime (freeze ends, Watch feeds,
//! cluster work), which wake a waiting call from there.
//!
//! The accept loop stays on the main runtime (the connection caps count in
//! one place) and hands each socket to the thread serving the fewest.

use std::future::Future;
use std::io;
use std::pin::Pin;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::transport::{self, Conn, ServingThread};
use super::ServerError;
use crate::config::ServerSettings;

/// A server as one thread runs it: its connections, and when to stop
/// taking new ones and drain.
pub(crate) type ServeOn = Box<
    dyn FnOnce(
            ReceiverStream<io::Result<Conn>>,
            WaitForCancellationFutureOwned,
        ) -> Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>>>>
        + Send,
>;

/// Starts one thread per server in `servers`, and the accept loop handing
/// them `listener`'s connections until `stop` (which also ends pending
/// handshakes). Each server drains once `drain` is cancelled; once `force`
/// is (the shutdown grace is over), each thread ends at once, its runtime
/// and with it every connection it still serves dropped (tonic's server
/// has no forced close of its own). The future returned ends when every
/// thread's server has ended, or at once with the first thread's error.
pub(crate) fn serve(
    servers: Vec<ServeOn>,
    listener: tokio::net::TcpListener,
    settings: &ServerSettings,
    stop: CancellationToken,
    drain: CancellationToken,
    force: CancellationToken,
) -> Result<impl Future<Output = Result<(), ServerError>> + Send + 'static, ServerError> {
    let mut threads = Vec::with_capacity(servers.len());
    let mut ended = Vec::with_capacity(servers.len());
    for (n, server) in servers.into_iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ended_tx, ended_rx) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ServerError::Thread(n, e))?;
        let stop = stop.clone();
        let drain = drain.clone();
        let force = force.clone();
        std::thread::Builder::new()
            .name(format!("grpc-io-{n}"))
            .spawn(move || {
                let served = runtime.block_on(async move {
                    tokio::select! {
                        served = server(transport::handshakes(rx, stop), drain.cancelled_owned()) => served,
                        () = force.cancelled() => Ok(()),
                    }
                });
                let _ = ended_tx.send(served);
                // Here, not at the thread's end by chance: what it still
                // served goes with its runtime.
                drop(runtime);
            })
            .map_err(|e| ServerError::Thread(n, e))?;
        threads.push(ServingThread::new(tx));
        ended.push(ended_rx);
    }
    transport::incoming_to_threads(listener, settings, stop, threads);
    // The first thread to fail ends the whole: a broker serving on fewer
    // threads than it was given would be a broker that half works.
    let all = futures_util::future::try_join_all(ended.into_iter().enumerate().map(
        |(n, thread)| async move {
            match thread.await {
                Ok(served) => served.map_err(ServerError::from),
                // The thread ended without saying how: its server panicked.
                Err(_) => Err(ServerError::ThreadPanicked(n)),
            }
        },
    ));
    Ok(async move { all.await.map(|_| ()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_thread_whose_server_panics_ends_serve_at_once_with_its_number() {
        let settings = crate::config::Settings::from_toml(
            "[[tenants]]\nid = \"a\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n",
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let serves_on: ServeOn = Box::new(|_incoming, drain| {
            Box::pin(async move {
                drain.await;
                Ok(())
            })
        });
        let panics: ServeOn = Box::new(|_incoming, _drain| Box::pin(async { panic!("a bug") }));
        let (stop, drain) = (CancellationToken::new(), CancellationToken::new());
        let served = serve(
            vec![serves_on, panics],
            listener,
            &settings.server,
            stop.clone(),
            drain.clone(),
            CancellationToken::new(),
        )
        .unwrap();
        // Thread 0 serves until drained, which nothing asks for here.
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), served)
            .await
            .expect("serve ends with the first thread's failure, not the last thread's end");
        assert!(
            matches!(ended, Err(ServerError::ThreadPanicked(1))),
            "{ended:?}"
        );
        drain.cancel();
        stop.cancel();
    }
}
