//! The HTTP port's connections: the accept loop with its caps (in all,
//! per peer) and header deadline, and the first bytes of each read to tell
//! a gRPC client given this port from an HTTP/1 one.

use crate::grpc::{per_peer_cap, PerPeer, Throttled, PREFACE};
use axum::extract::ConnectInfo;
use axum::Router;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Most connections the HTTP port holds open at once (dashboards, their
/// feeds, scrapers, probes), and fewer if `server.max_connections` says
/// so; one beyond is closed at once, so idle sockets cannot take the
/// process's file descriptors from the gRPC port.
pub(crate) const MAX_HTTP_CONNECTIONS: usize = 512;
/// How long a client may take to send a request's headers (also the first
/// request's, and the next one's on a kept-alive connection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `stop`, then waits for the open
/// connections to finish (event feeds end at the broker's shutdown). A
/// connection that opens with HTTP/2's preface (a gRPC client given this
/// port) is told it is not the gRPC port ([`first_bytes`]).
/// By hand rather than `axum::serve`, which has no connection cap and no
/// header deadline.
pub(super) async fn accept(
    listener: TcpListener,
    app: Router,
    cap: usize,
    stop: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(cap));
    // One address (a host reopening silent sockets) holds at most a
    // quarter of them: a probe or a scraper from elsewhere still gets in.
    let per_peer = PerPeer::default();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // Connections it could not take: a line at most every 10 s.
    let refused = Throttled::new(Duration::from_secs(10));
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, mostly: the error repeats until
                // some close, so pause rather than spin.
                if let Some(n) = refused.note() {
                    tracing::warn!(refused_since_last_line = n, error = %e,
                        "HTTP port: accepting a connection failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(n) = refused.note() {
                tracing::warn!(
                    refused_since_last_line = n,
                    "HTTP port: {cap} connections already open; closing a new one"
                );
            }
            continue;
        };
        let Some(mine) = per_peer.try_take(peer.ip(), per_peer_cap(cap)) else {
            if let Some(n) = refused.note() {
                tracing::warn!(
                    refused_since_last_line = n,
                    %peer,
                    "HTTP port: a quarter of its {cap} connections already open from one \
                     address; closing a new one"
                );
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(
            app.clone().layer(axum::Extension(ConnectInfo(peer))),
        );
        let watcher = graceful.watcher();
        let stop = stop.clone();
        tokio::spawn(async move {
            let first = tokio::select! {
                () = stop.cancelled() => None,
                first = first_bytes(stream) => first,
            };
            if let Some(io) = first {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(io), service);
                let _ = watcher.watch(conn).await;
            }
            drop((slot, mine));
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The answer to a client that speaks HTTP/2 with prior knowledge here (a
/// gRPC client given this port instead of the gRPC one), in HTTP/1.1 (what
/// this port speaks): the client sees
/// an HTTP/1 server and can say its address is not a gRPC port, where a
/// connection closed without a word (hyper's answer) reads as a broker down.
const NOT_GRPC: &str = "this is the quota-broker's HTTP port (metrics, dashboard, probes; \
    HTTP/1.1): give gRPC clients the broker's gRPC port (server.listen) instead\n";

/// A connection, its first bytes read to tell an HTTP/2 client (answered
/// with [`NOT_GRPC`] here, then closed: `None`) from an HTTP/1 one, whose
/// bytes read are handed back ahead of the rest. A client that sends no
/// first bytes within the header deadline is closed, as hyper would.
/// By hand: hyper's HTTP/1 server closes on the preface without a word, and
/// hyper-util's version-sniffing builder would serve HTTP/2 instead, with
/// no deadline on the sniff (a client that connects and sends nothing holds
/// a connection slot for good).
async fn first_bytes(
    mut stream: tokio::net::TcpStream,
) -> Option<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> {
    use tokio::io::AsyncReadExt;
    let mut seen = [0u8; PREFACE.len()];
    // At most the preface's length, and only while it could still be one
    // (an HTTP/1 request differs by its first or second byte); all of it
    // within one header deadline.
    let read = async {
        let mut len = 0;
        while len < PREFACE.len() && PREFACE.starts_with(&seen[..len]) {
            match stream.read(&mut seen[len..]).await {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(_) => return None,
            }
        }
        Some(len)
    };
    let len = tokio::time::timeout(HEADER_READ_TIMEOUT, read)
        .await
        .ok()
        .flatten()?;
    if len == PREFACE.len() && seen == *PREFACE {
        // A gRPC client given this port instead of the gRPC one.
        crate::grpc::answer_505(stream, NOT_GRPC).await;
        return None;
    }
    let (read, write) = stream.into_split();
    let read = std::io::Cursor::new(seen[..len].to_vec()).chain(read);
    Some(tokio::io::join(read, write))
}
