//! The gRPC port's front door: the accept loop that owns every socket until
//! it has shown it speaks gRPC, and the connection type handed to tonic.
//!
//! A new connection must finish its TLS handshake (when `[server.tls]` is
//! set) and send the 24-byte HTTP/2 client preface within
//! `server.handshake_timeout_ms`, or it is closed. At most
//! `server.max_pending_connections` may be at that stage at once and at most
//! `server.max_connections` open in all; sockets beyond either cap are closed
//! as soon as they are accepted. So sockets that connect and send nothing (a
//! slowloris) hold a bounded number of descriptors for a bounded time, and
//! turning them away needs no token. A connection that opens with an
//! HTTP/1 request instead (curl, a browser, a load balancer's HTTP probe
//! given this port) is answered `505` with a line naming the HTTP port
//! (`server.http_listen`), then closed, rather than reset without a word
//! (over TLS, after the TLS handshake). One peer address may hold at most a
//! quarter of the pending cap: a single host opening silent sockets again
//! and again cannot keep every other client from connecting; and at most
//! `server.max_connections_per_address` open, established ones included,
//! so a host keeping connections alive cannot take the whole cap.
//!
//! TLS is done here with tokio-rustls rather than by tonic, so the handshake
//! falls under the same timeout. tonic gets a plain [`Conn`] that replays the
//! preface read from it; its [`PeerInfo`] (peer address, TLS or not, and for
//! TLS tonic's own `TlsConnectInfo` with the client's certificates) reaches
//! every request as an extension.
//!
//! [`Conn`] also coalesces the connection's writes (see `coalesce`): h2
//! flushes as soon as a response is ready, and each call's response is ready
//! in its own task, so without it a busy connection sends one small segment
//! (one `write` and one loopback delivery) per response.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

use super::caps::{per_peer_cap, Gauge, PeerSlot, PerPeer, Slot};
use super::coalesce::Coalesce;
use super::http1::{answer_http1, is_http1, may_become_http1};
use super::throttled::Throttled;
use crate::clock::millis;
use crate::config::ServerSettings;

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
pub(crate) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Pause after an accept error that is not about one connection (out of
/// descriptors, say), so the loop does not spin on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Handshaken connections waiting for tonic to take them.
const HANDOFF_QUEUE: usize = 64;
/// At most one warning this often while connections are being turned away.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub(crate) struct PeerInfo {
    tcp: TcpConnectInfo,
    tls: bool,
    /// tonic's TLS connection info (the client's certificates).
    tls_info: Option<TlsConnectInfo<TcpConnectInfo>>,
    /// Set once a response on this connection carried an `x-request-id`
    /// that HPACK may index (see `observe`).
    id_indexed: Arc<AtomicBool>,
}

impl PeerInfo {
    /// A peer at `remote`, over TLS or not, with no certificates (the HTTP
    /// port's callers, and tests of peers a test cannot be, such as a
    /// remote address).
    pub(crate) fn new(remote: Option<SocketAddr>, tls: bool) -> PeerInfo {
        PeerInfo {
            tcp: TcpConnectInfo {
                local_addr: None,
                remote_addr: remote,
            },
            tls,
            tls_info: None,
            id_indexed: Arc::default(),
        }
    }

    /// The peer's IP address (an IPv4-mapped IPv6 address as IPv4).
    pub(crate) fn ip(&self) -> Option<IpAddr> {
        self.tcp.remote_addr.map(|a| a.ip().to_canonical())
    }

    /// Whether the peer is on this host (127.0.0.0/8 or ::1).
    pub(crate) fn is_loopback(&self) -> bool {
        self.ip().is_some_and(|ip| ip.is_loopback())
    }

    /// Whether the connection is TLS.
    pub(crate) fn is_tls(&self) -> bool {
        self.tls
    }

    /// True the first time it is asked on a connection: that response's
    /// `x-request-id` may enter HPACK's dynamic table, so later ones send
    /// only their value.
    pub(crate) fn first_request_id(&self) -> bool {
        !self.id_indexed.load(Ordering::Relaxed) && !self.id_indexed.swap(true, Ordering::Relaxed)
    }

    /// tonic's connection info, as its own TLS would set it, so
    /// `Request::remote_addr` and `Request::peer_certs` work in services.
    pub(crate) fn tonic_info(&self) -> (TcpConnectInfo, Option<TlsConnectInfo<TcpConnectInfo>>) {
        (self.tcp.clone(), self.tls_info.clone())
    }
}

/// A connection that finished its handshake, as tonic serves it: the
/// preface already read is replayed, then reads and writes go to the socket
/// (or its TLS session).
pub(crate) struct Conn {
    io: Io,
    /// Bytes of [`PREFACE`] handed back to the reader so far.
    replayed: usize,
    info: PeerInfo,
    /// Holds a write back briefly so that more responses join it.
    coalesce: Coalesce,
    /// Counts the connection among the open ones (and, on a serving
    /// thread, among that thread's) until it is dropped.
    _open: ((Slot, PeerSlot), Option<Slot>),
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(rest) = PREFACE.get(this.replayed..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.coalesce.poll_write_ready(cx, buf.len()));
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum();
        std::task::ready!(this.coalesce.poll_write_ready(cx, len));
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.io).poll_flush(cx);
        if flushed.is_ready() {
            this.coalesce.flushed();
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What every connection's handshake needs.
#[derive(Clone)]
struct Front {
    tls: Option<TlsAcceptor>,
    handshake_timeout: Duration,
    max_pending: usize,
    max_connections: usize,
    /// Most open connections one peer address may hold.
    max_per_address: usize,
    pending: Gauge,
    open: Gauge,
    per_peer: PerPeer,
    /// Open connections per peer address.
    open_per_peer: PerPeer,
}

/// Accepts connections on `listener` until `stop` is cancelled (or the
/// returned stream is dropped), and yields those that complete their
/// handshake in time. The listener closes when the loop ends.
pub(crate) fn incoming(
    listener: TcpListener,
    server: &ServerSettings,
    stop: CancellationToken,
) -> ReceiverStream<io::Result<Conn>> {
    let front = Front::new(server);
    let (tx, rx) = mpsc::channel(HANDOFF_QUEUE);
    tokio::spawn(accept_loop(listener, front, Handoff::Here(tx), stop));
    ReceiverStream::new(rx)
}

/// A socket within the caps, taken off this runtime's reactor, on its way
/// to a serving thread that runs its handshake and serves it.
pub(crate) struct Accepted {
    tcp: std::net::TcpStream,
    peer: SocketAddr,
    slots: ((Slot, PeerSlot), (Slot, PeerSlot)),
    /// Counts the connection among its thread's open ones.
    thread: Slot,
    front: Front,
}

/// A serving thread as the accept loop sees it: where to send a socket,
/// and how many connections it serves.
pub(crate) struct ServingThread {
    tx: mpsc::UnboundedSender<Accepted>,
    open: Gauge,
}

impl ServingThread {
    pub(crate) fn new(tx: mpsc::UnboundedSender<Accepted>) -> ServingThread {
        ServingThread {
            tx,
            open: Gauge::default(),
        }
    }
}

/// [`incoming`] for serving threads: accepts on this runtime and hands each
/// socket within the caps to the thread serving the fewest connections,
/// whose [`handshakes`] yields it to that thread's server once handshaken.
pub(crate) fn incoming_to_threads(
    listener: TcpListener,
    server: &ServerSettings,
    stop: CancellationToken,
    threads: Vec<ServingThread>,
) {
    tokio::spawn(accept_loop(
        listener,
        Front::new(server),
        Handoff::Threads(threads),
        stop,
    ));
}

/// On a serving thread's runtime: the sockets handed to it, registered with
/// this runtime's reactor, handshaken, as its server takes them.
pub(crate) fn handshakes(
    mut accepted: mpsc::UnboundedReceiver<Accepted>,
    stop: CancellationToken,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(HANDOFF_QUEUE);
    tokio::spawn(async move {
        while let Some(a) = accepted.recv().await {
            let tcp = match TcpStream::from_std(a.tcp) {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(peer = %a.peer, error = %e, "cannot register a connection; closed");
                    continue;
                }
            };
            tokio::spawn(handshake(
                tcp,
                a.peer,
                a.slots,
                Some(a.thread),
                a.front,
                tx.clone(),
                stop.clone(),
            ));
        }
    });
    ReceiverStream::new(rx)
}

/// Where the accept loop sends a socket within the caps.
enum Handoff {
    /// Handshaken on this runtime, to this server.
    Here(mpsc::Sender<io::Result<Conn>>),
    /// To the serving thread with the fewest open connections.
    Threads(Vec<ServingThread>),
}

impl Handoff {
    /// Ends when no server will take another connection.
    async fn closed(&self) {
        match self {
            Handoff::Here(tx) => tx.closed().await,
            // Each thread's server stops on the same token as the loop.
            Handoff::Threads(_) => std::future::pending().await,
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    front: Front,
    handoff: Handoff,
    stop: CancellationToken,
) {
    // A flood logs one warning per REFUSAL_LOG_EVERY, with the count,
    // rather than one line per socket.
    let mut last_warning: Option<tokio::time::Instant> = None;
    let mut refused_since_warning = 0u64;
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            () = handoff.closed() => return,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) if is_about_one_connection(&e) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed; pausing before the next");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let slots = front.open.try_take(front.max_connections).map(|open| {
            let theirs = front
                .open_per_peer
                .try_take(peer.ip(), front.max_per_address);
            let pending = front.pending.try_take(front.max_pending).map(|pending| {
                let mine = front
                    .per_peer
                    .try_take(peer.ip(), per_peer_cap(front.max_pending));
                (pending, mine)
            });
            (open, theirs, pending)
        });
        let (open, pending) = match slots {
            Some((open, Some(theirs), Some((pending, Some(mine))))) => {
                ((open, theirs), (pending, mine))
            }
            refused => {
                let (cap, until) = match refused {
                    None => (
                        "server.max_connections",
                        "until connections close or time out in their handshake",
                    ),
                    Some((_, None, _)) => (
                        "server.max_connections_per_address",
                        "from this address until its own connections close",
                    ),
                    Some((_, _, None)) => (
                        "server.max_pending_connections",
                        "until pending ones finish their handshake or time out",
                    ),
                    Some(_) => (
                        "a quarter of server.max_pending_connections from one address",
                        "from this address until its pending ones finish their handshake or \
                         time out",
                    ),
                };
                refused_since_warning += 1;
                if last_warning.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_EVERY) {
                    tracing::warn!(
                        %peer,
                        cap,
                        refused = refused_since_warning,
                        "connection limit reached ({cap}): new connections are closed at once \
                         {until}"
                    );
                    last_warning = Some(tokio::time::Instant::now());
                    refused_since_warning = 0;
                } else {
                    tracing::debug!(%peer, cap, "connection closed at once");
                }
                // Dropping the socket closes it.
                continue;
            }
        };
        // Small answers must not sit in Nagle's buffer waiting for an ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        match &handoff {
            Handoff::Here(tx) => {
                tokio::spawn(handshake(
                    tcp,
                    peer,
                    (open, pending),
                    None,
                    front.clone(),
                    tx.clone(),
                    stop.clone(),
                ));
            }
            Handoff::Threads(threads) => {
                // A thread whose server ended takes no more (the broker is
                // stopping, or failing: see `threads::serve`).
                let Some(thread) = threads
                    .iter()
                    .filter(|t| !t.tx.is_closed())
                    .min_by_key(|t| t.open.get())
                else {
                    continue;
                };
                // Off this runtime's reactor: the serving thread's own
                // registers it, so its readiness wakes that thread.
                let tcp = match tcp.into_std() {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "cannot hand a connection over; closed");
                        continue;
                    }
                };
                let _ = thread.tx.send(Accepted {
                    tcp,
                    peer,
                    slots: (open, pending),
                    thread: thread.open.take(),
                    front: front.clone(),
                });
            }
        }
    }
}

/// Accept errors that concern only the connection being accepted.
fn is_about_one_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    )
}

/// Failed handshakes, for a log line at most once a minute.
static FAILED_HANDSHAKES: Throttled = Throttled::new(Duration::from_secs(60));
/// HTTP/1 requests answered, for a log line at most once a minute.
static HTTP1_ANSWERED: Throttled = Throttled::new(Duration::from_secs(60));

impl Front {
    fn new(server: &ServerSettings) -> Front {
        Front {
            tls: server
                .tls
                .as_ref()
                .map(|t| TlsAcceptor::from(t.server_config())),
            handshake_timeout: server.handshake_timeout,
            max_pending: server.max_pending_connections,
            max_connections: server.max_connections,
            max_per_address: server.max_connections_per_address,
            pending: Gauge::default(),
            open: Gauge::default(),
            per_peer: PerPeer::default(),
            open_per_peer: PerPeer::default(),
        }
    }
}

/// Runs one connection's handshake under the timeout, then hands it over.
async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    (open, pending): ((Slot, PeerSlot), (Slot, PeerSlot)),
    thread: Option<Slot>,
    front: Front,
    tx: mpsc::Sender<io::Result<Conn>>,
    stop: CancellationToken,
) {
    let tcp_info = tcp.connect_info();
    let done = tokio::select! {
        () = stop.cancelled() => return,
        r = tokio::time::timeout(front.handshake_timeout, establish(tcp, front.tls.as_ref())) => r,
    };
    let (io, tls_info) = match done {
        Ok(Ok(Opened::Grpc(io, tls_info))) => (io, tls_info),
        Ok(Ok(Opened::Http1(io))) => {
            match HTTP1_ANSWERED.note() {
                Some(since) => tracing::info!(%peer, answered_since_last_line = since,
                    "an HTTP/1 request on the gRPC port (a browser, curl or an HTTP probe given \
                     the wrong port) answered 505, naming the HTTP port (server.http_listen)"),
                None => tracing::debug!(%peer, "HTTP/1 request on the gRPC port answered 505"),
            }
            tokio::select! {
                () = stop.cancelled() => {}
                () = answer_http1(io) => {}
            }
            return;
        }
        Ok(Err(e)) => {
            // A client that cannot connect (a wrong CA, an expired or
            // mismatched certificate, plaintext to a TLS port) sees only
            // "unavailable": say it here, at most once a minute, with how
            // many failed since.
            // A connection closed before saying anything (a TCP health
            // check, a port scan) is not a client that failed to connect.
            let silent = e.kind() == io::ErrorKind::UnexpectedEof;
            match (!silent).then(|| FAILED_HANDSHAKES.note()).flatten() {
                Some(since) => tracing::info!(%peer, error = %e, failed_since_last_line = since,
                    "connection closed: its handshake failed (TLS or HTTP/2 preface)"),
                None => tracing::debug!(%peer, error = %e, "handshake failed; connection closed"),
            }
            return;
        }
        Err(_) => {
            tracing::debug!(
                %peer,
                timeout_ms = millis(front.handshake_timeout),
                "no handshake within server.handshake_timeout_ms; connection closed"
            );
            return;
        }
    };
    drop(pending);
    let conn = Conn {
        io,
        replayed: 0,
        coalesce: Coalesce::default(),
        info: PeerInfo {
            tcp: tcp_info,
            tls: tls_info.is_some(),
            tls_info,
            id_indexed: Arc::default(),
        },
        _open: (open, thread),
    };
    // The receiver is gone only when the server stops; the connection closes.
    let _ = tx.send(Ok(conn)).await;
}

/// What a connection turned out to be once its first bytes were read.
enum Opened {
    /// A gRPC client: it sent the HTTP/2 preface (read: [`Conn`] replays
    /// it).
    Grpc(Io, Option<TlsConnectInfo<TcpConnectInfo>>),
    /// An HTTP/1 client, to answer with [`answer_http1`].
    Http1(Io),
}

/// The TLS handshake (if configured), then the HTTP/2 preface, or an
/// HTTP/1 request line. Reads at most the preface's length, and only while
/// the bytes could still be the preface or the start of an HTTP/1 method:
/// it never waits for more than it needs to tell.
async fn establish(tcp: TcpStream, tls: Option<&TlsAcceptor>) -> io::Result<Opened> {
    let (mut io, tls_info) = match tls {
        None => (Io::Plain(tcp), None),
        Some(acceptor) => {
            let stream = acceptor.accept(tcp).await?;
            let info = stream.connect_info();
            (Io::Tls(Box::new(stream)), Some(info))
        }
    };
    let mut preface = [0u8; PREFACE.len()];
    let mut len = 0;
    while len < PREFACE.len()
        && (PREFACE.starts_with(&preface[..len]) || may_become_http1(&preface[..len]))
    {
        match io.read(&mut preface[len..]).await? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => len += n,
        }
    }
    if len < PREFACE.len() || &preface != PREFACE {
        if is_http1(&preface[..len]) {
            return Ok(Opened::Http1(io));
        }
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            if tls.is_some() {
                "not an HTTP/2 client preface after the TLS handshake (gRPC needs HTTP/2)"
            } else {
                "not an HTTP/2 client preface (a TLS client on a plaintext port, or not gRPC)"
            },
        ));
    }
    Ok(Opened::Grpc(io, tls_info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_request_id_of_a_connection_is_indexed() {
        let info = PeerInfo::new(None, false);
        let copy = info.clone();
        assert!(copy.first_request_id());
        assert!(!info.first_request_id());
        assert!(!copy.first_request_id());
        assert!(PeerInfo::new(None, false).first_request_id());
    }

    #[test]
    fn peer_info_sees_loopback_through_mapped_ipv6() {
        let at = |s: &str| PeerInfo::new(Some(s.parse().unwrap()), false);
        assert!(at("127.0.0.1:1").is_loopback());
        assert!(at("127.3.2.1:1").is_loopback());
        assert!(at("[::1]:1").is_loopback());
        assert!(at("[::ffff:127.0.0.1]:1").is_loopback());
        assert!(!at("10.0.0.1:1").is_loopback());
        assert!(!at("[::ffff:10.0.0.1]:1").is_loopback());
        assert!(!PeerInfo::new(None, false).is_loopback());
    }
}
