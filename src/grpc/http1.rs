//! HTTP/1 on the gRPC port: telling a request line (curl, a browser, an
//! HTTP probe) from the HTTP/2 preface, and the `505` that names the port
//! an HTTP/1 client wants instead. The accept loop (`transport`) decides
//! when to answer.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How an HTTP/1 request line starts (a method and its space): sent to
/// this port, it is answered with [`NOT_HTTP1`].
const HTTP1_METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"HEAD ",
    b"PUT ",
    b"OPTIONS ",
    b"DELETE ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];
/// The answer to an HTTP/1 request (in HTTP/1.1, what the client speaks):
/// what this port is, and the port that a person, a probe or a scraper
/// sending HTTP/1 wants instead.
const NOT_HTTP1: &str = "this is the quota-broker's gRPC port: it speaks HTTP/2 only, for gRPC \
    clients; the dashboard, /metrics and the health probes (/healthz, /readyz) are on the \
    broker's HTTP port (server.http_listen)\n";
/// Bound on writing [`NOT_HTTP1`] and on reading (and dropping) what the
/// client sent after the bytes looked at, until it closes: closing with
/// its bytes unread would send a reset, which may discard the answer
/// before the client reads it.
const HTTP1_ANSWER_WITHIN: Duration = Duration::from_secs(1);
/// Most bytes of an HTTP/1 client read and dropped after the answer.
const HTTP1_DRAINED_AT_MOST: usize = 16 * 1024;

/// Whether `seen` is an HTTP/1 request's start: a method and its space, or
/// a request line's version.
pub(super) fn is_http1(seen: &[u8]) -> bool {
    HTTP1_METHODS.iter().any(|m| seen.starts_with(m))
        || seen.windows(b" HTTP/1.".len()).any(|w| w == b" HTTP/1.")
}

/// Whether `seen` is too short to tell, but could be an HTTP/1 method yet.
pub(super) fn may_become_http1(seen: &[u8]) -> bool {
    HTTP1_METHODS
        .iter()
        .any(|m| m.len() > seen.len() && m.starts_with(seen))
}

/// Answers an HTTP/1 client `505` with [`NOT_HTTP1`] and closes (see
/// [`answer_505`]).
pub(super) async fn answer_http1(io: impl AsyncRead + AsyncWrite + Unpin) {
    answer_505(io, NOT_HTTP1).await;
}

/// Answers a client that speaks the other HTTP version than its port `505`
/// with `body` (in HTTP/1.1) and closes, all within
/// [`HTTP1_ANSWER_WITHIN`]: after the answer, what the client sent is read
/// and dropped until it closes (at most [`HTTP1_DRAINED_AT_MOST`]), so the
/// close is not a reset. Both ports answer a wrong client so: an HTTP/1
/// one here, an HTTP/2 one (a gRPC client) on the HTTP port.
pub(crate) async fn answer_505(mut io: impl AsyncRead + AsyncWrite + Unpin, body: &str) {
    let answer = format!(
        "HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answered = async {
        io.write_all(answer.as_bytes()).await?;
        // Flushes, and ends the stream (TLS: its close_notify first).
        io.shutdown().await?;
        let mut dropped = [0u8; 1024];
        let mut left = HTTP1_DRAINED_AT_MOST;
        while left > 0 {
            match io.read(&mut dropped).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        io::Result::Ok(())
    };
    // The connection closes (dropped) whatever came of it.
    let _ = tokio::time::timeout(HTTP1_ANSWER_WITHIN, answered).await;
}

#[cfg(test)]
mod tests {
    use super::super::PREFACE;
    use super::*;

    #[test]
    fn http1_request_lines_are_told_from_the_preface_and_from_noise() {
        for http1 in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n"[..],
            b"GET ",
            b"POST /quota.v1",
            b"HEAD /",
            b"OPTIONS * HTTP/1.1",
            b"DELETE /x",
            b"PROPFIND / HTTP/1.1\r\n",
        ] {
            assert!(is_http1(http1), "{:?}", String::from_utf8_lossy(http1));
        }
        for other in [
            &PREFACE[..],
            b"PRI * HTTP/2.0",
            b"\x16\x03\x01\x02\x00",
            b"GE",
            b"GETX",
        ] {
            assert!(!is_http1(other), "{:?}", String::from_utf8_lossy(other));
        }
        // Read on while a method may still be coming, and only then.
        for short in [
            &b""[..],
            b"G",
            b"GE",
            b"OPTIO",
            b"DELET",
            b"P",
            b"PO",
            b"PA",
        ] {
            assert!(may_become_http1(short), "{short:?}");
        }
        for decided in [&b"GET "[..], b"GEX", b"PRI", b"\x16", b"get"] {
            assert!(!may_become_http1(decided), "{decided:?}");
        }
        assert!(NOT_HTTP1.contains("server.http_listen"));
    }
}
