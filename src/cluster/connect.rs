//! How a connection to an etcd member is made: TCP, TLS for `https://`,
//! and the start of HTTP/2 (the member's SETTINGS frame received), all
//! within one bound, before tonic sends anything on it.
//!
//! tonic bounds only the TCP connect (`Endpoint::connect_timeout`), and its
//! HTTP/2 handshake only writes the client's preface. A member that is
//! frozen (SIGSTOP, a paused VM, a long GC stall) still has its kernel
//! complete TCP handshakes, so a new connection to it "succeeded", the call
//! was written into its socket, and waited there for the whole call bound:
//! the call failed instead of moving to the next member, though it had
//! never been read (and would be, once the member ran again). Here such a
//! member is a connection that could not be made (a `tonic::ConnectError`),
//! and nothing was sent to it.
//!
//! A TLS failure is said with the setting to change ([`tls_hint`]): a CA
//! that did not sign etcd's certificate, a URL host the certificate does
//! not name, a client certificate etcd asks for or refuses. The files
//! were checked at load; whether they fit this etcd shows only here, so
//! the broker runs, unready, and says so at every retry of its session.

use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{AlertDescription, CertificateError, ClientConfig};
use tokio_rustls::TlsConnector;
use tonic::codegen::http::Uri;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An HTTP/2 frame header's length, and the SETTINGS frame type.
const FRAME_HEADER: usize = 9;
const SETTINGS: u8 = 0x4;

/// Connects to etcd members for tonic (`Endpoint::connect_with_connector_lazy`).
#[derive(Clone)]
pub(super) struct Connector {
    /// TLS, for `https://` endpoints.
    tls: Option<TlsConnector>,
    /// The TLS configuration presents a client certificate
    /// (`cluster.etcd_cert`): what a refused one's hint says.
    client_cert: bool,
    /// Bound on the whole connection: TCP, TLS and HTTP/2's start.
    bound: Duration,
}

/// A connection to a member that could not be made, and why.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectFailed {
    /// No answer within the bound (a host that drops packets, or a
    /// process that accepts nothing or is frozen).
    #[error("{stage} not done within {} ms", .bound.as_millis())]
    TimedOut {
        bound: Duration,
        stage: &'static str,
    },
    /// The URL has no host to connect to.
    #[error("no host in {0}")]
    NoHost(String),
    /// TCP, TLS, or the first HTTP/2 bytes failed; `hint` says which
    /// setting to check for a TLS failure ("" for none).
    #[error("{stage}: {source}{hint}")]
    Io {
        stage: &'static str,
        #[source]
        source: io::Error,
        hint: String,
    },
}

impl ConnectFailed {
    /// This failure with the hint [`tls_hint`] finds for it, if any.
    fn with_tls_hint(self, host: &str, client_cert: bool) -> ConnectFailed {
        match self {
            ConnectFailed::Io {
                stage,
                source,
                hint,
            } if hint.is_empty() => {
                let hint = tls_hint(&source, host, client_cert).unwrap_or_default();
                ConnectFailed::Io {
                    stage,
                    source,
                    hint,
                }
            }
            other => other,
        }
    }
}

/// What to check after a TLS failure `e` with the etcd member at `host`
/// (the URL's), in parentheses: the setting to change, or etcd's
/// certificate out of its validity. `None` when it is no TLS failure, or
/// one no such hint fits. `client_cert`: the broker presented one
/// (`cluster.etcd_cert`).
fn tls_hint(e: &io::Error, host: &str, client_cert: bool) -> Option<String> {
    use tokio_rustls::rustls::Error as Tls;
    let tls = e.get_ref()?.downcast_ref::<Tls>()?;
    let hint = match tls {
        Tls::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "check cluster.etcd_ca: the CA that signed etcd's certificate; the one set did not"
                .to_owned()
        }
        Tls::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "check cluster.etcd: its host {} is not a name etcd's certificate is for; use one \
             it is for, or add this one to the certificate",
            crate::error::clip(host)
        ),
        Tls::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "etcd's certificate has expired: renew it on etcd (or check this host's clock)"
            .to_owned(),
        Tls::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "etcd's certificate is not valid yet: check this host's clock".to_owned(),
        // etcd's refusal of the client's side: etcd 3.4 (Go 1.19) sends
        // bad_certificate when none is given, under TLS 1.3 too; other
        // servers send certificate_required, or unknown_ca for one their
        // CA did not sign.
        Tls::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::CertificateRequired
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::UnsupportedCertificate,
        ) => {
            if client_cert {
                "check cluster.etcd_cert and cluster.etcd_key: etcd refused the client \
                 certificate; it must be signed by a CA etcd trusts (its --trusted-ca-file) \
                 and be valid now"
                    .to_owned()
            } else {
                "check cluster.etcd_cert and cluster.etcd_key: etcd asks for a client \
                 certificate, and none is set"
                    .to_owned()
            }
        }
        _ => return None,
    };
    Some(format!(" ({hint})"))
}

impl Connector {
    /// Connections bounded by `bound`, with TLS by `tls` if set.
    pub(super) fn new(tls: Option<Arc<ClientConfig>>, bound: Duration) -> Connector {
        Connector {
            client_cert: tls
                .as_ref()
                .is_some_and(|c| c.client_auth_cert_resolver.has_certs()),
            tls: tls.map(TlsConnector::from),
            bound,
        }
    }

    async fn connect(self, uri: Uri) -> Result<TokioIo<Primed>, ConnectFailed> {
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .filter(|h| !h.is_empty())
            .ok_or_else(|| ConnectFailed::NoHost(uri.to_string()))?;
        let port = uri
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let deadline = tokio::time::Instant::now() + self.bound;
        let bound = self.bound;
        let tcp = within(deadline, bound, "TCP connect", async {
            TcpStream::connect((host.as_str(), port)).await
        })
        .await?;
        let _ = tcp.set_nodelay(true);
        // Every endpoint is `https://` when TLS is set (the config's
        // check), and tonic hands this the URL as `http://` (see
        // `Etcd::connect`).
        let io: Box<dyn Io> = match &self.tls {
            Some(tls) => {
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
                    .map_err(|source| ConnectFailed::Io {
                        stage: "TLS handshake",
                        source,
                        hint: String::new(),
                    })?;
                let handshake = within(deadline, bound, "TLS handshake", tls.connect(name, tcp));
                Box::new(
                    handshake
                        .await
                        .map_err(|e| e.with_tls_hint(&host, self.client_cert))?,
                )
            }
            None => Box::new(tcp),
        };
        // Under TLS 1.3 the client's handshake is done before the server
        // has checked its certificate: a refusal comes here, as an alert.
        let primed = within(deadline, bound, "HTTP/2 start", Primed::start(io))
            .await
            .map_err(|e| e.with_tls_hint(&host, self.client_cert))?;
        Ok(TokioIo::new(primed))
    }
}

/// `step` of a connection, by `deadline` (the connection's `bound`).
async fn within<T>(
    deadline: tokio::time::Instant,
    bound: Duration,
    stage: &'static str,
    step: impl Future<Output = io::Result<T>>,
) -> Result<T, ConnectFailed> {
    match tokio::time::timeout_at(deadline, step).await {
        Ok(done) => done.map_err(|source| ConnectFailed::Io {
            stage,
            source,
            hint: String::new(),
        }),
        Err(_) => Err(ConnectFailed::TimedOut { bound, stage }),
    }
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<Primed>;
    type Error = ConnectFailed;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectFailed>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectFailed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

/// A TCP or TLS stream.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A connection on which the client preface is sent and the server's
/// first bytes (its SETTINGS) were read: hyper's HTTP/2 client, which
/// writes the preface itself, has its preface taken as written and reads
/// those bytes first.
pub(super) struct Primed {
    io: Box<dyn Io>,
    /// How much of the preface hyper has still to write (not sent again).
    preface_left: usize,
    /// What the server sent during the start, not yet read by hyper.
    received: Vec<u8>,
    read_at: usize,
}

impl Primed {
    /// Sends the preface and waits for the server's SETTINGS frame header.
    async fn start(mut io: Box<dyn Io>) -> io::Result<Primed> {
        io.write_all(PREFACE).await?;
        io.flush().await?;
        let mut received = Vec::with_capacity(64);
        while received.len() < FRAME_HEADER {
            if io.read_buf(&mut received).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection was closed",
                ));
            }
        }
        if received[3] != SETTINGS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not an HTTP/2 server (its first frame is no SETTINGS)",
            ));
        }
        Ok(Primed {
            io,
            preface_left: PREFACE.len(),
            received,
            read_at: 0,
        })
    }
}

impl AsyncRead for Primed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.read_at < this.received.len() {
            let n = buf.remaining().min(this.received.len() - this.read_at);
            buf.put_slice(&this.received[this.read_at..this.read_at + n]);
            this.read_at += n;
            if this.read_at == this.received.len() {
                this.received = Vec::new();
                this.read_at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Primed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.preface_left > 0 {
            let sent = PREFACE.len() - this.preface_left;
            let n = this.preface_left.min(buf.len());
            if buf[..n] != PREFACE[sent..sent + n] {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the HTTP/2 client did not start with its preface",
                )));
            }
            this.preface_left -= n;
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.preface_left > 0 {
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
            return self.poll_write(cx, first);
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_rustls::rustls::Error as Tls;

    fn failed(e: Tls) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    /// The failures the real-connection test cannot make (certificates out
    /// of their validity) are said too; a failure no TLS setting causes
    /// gets no hint.
    #[test]
    fn a_certificate_out_of_its_validity_is_said_and_other_failures_get_no_hint() {
        let expired = failed(Tls::InvalidCertificate(CertificateError::Expired));
        let hint = tls_hint(&expired, "etcd-1", false).unwrap();
        assert!(hint.contains("etcd's certificate has expired"), "{hint}");
        let early = failed(Tls::InvalidCertificate(CertificateError::NotValidYet));
        let hint = tls_hint(&early, "etcd-1", false).unwrap();
        assert!(hint.contains("check this host's clock"), "{hint}");
        // A long host is clipped where the hint names it.
        let host = "h".repeat(5_000);
        let name = failed(Tls::InvalidCertificate(CertificateError::NotValidForName));
        let hint = tls_hint(&name, &host, false).unwrap();
        assert!(
            hint.contains("check cluster.etcd: its host") && hint.len() < 500,
            "{hint}"
        );
        for other in [
            io::Error::from(io::ErrorKind::ConnectionRefused),
            failed(Tls::HandshakeNotComplete),
            failed(Tls::AlertReceived(AlertDescription::HandshakeFailure)),
        ] {
            assert_eq!(tls_hint(&other, "etcd-1", true), None, "{other}");
        }
    }
}
