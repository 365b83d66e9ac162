//! Broker addresses that can never work, told from a broker that is away.
//!
//! The local fallback is for a broker that is down: it paces calls until
//! the broker answers again. An address that can never work is an error
//! instead, or the client would run on the fallback rate for good:
//!
//! - a URL that does not parse ([`broker_url`]: a port that is not a
//!   number from 1 to 65535, two `:` outside an IPv6 address's brackets, a
//!   space in the host, an unsupported scheme, a path or query, which
//!   gRPC would drop) is [`ClientError::Url`] when the client is built;
//! - a server there that answers, but not as a quota-broker's gRPC port
//!   ([`not_a_broker`]), is [`ClientError::NotABroker`] on every call:
//!   another gRPC service (its calls answered UNIMPLEMENTED), or a server
//!   that does not speak gRPC over plaintext HTTP/2, such as an HTTP/1
//!   server (the broker's own HTTP port answers a gRPC client `505`) or a
//!   TLS port addressed with `http://`.
//!
//! hyper's HTTP/2 client reads a server's HTTP/1 or TLS answer as a
//! connection closed, like a broker going down; so when a plaintext call
//! fails that way, [`first_answer`] opens one connection of its own, sends
//! HTTP/2's preface, and reads what the server says first.
//!
//! Tools that dial the broker themselves make the same checks with
//! [`check_broker_address`] and [`not_a_grpc_port`].

use crate::ClientError;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest part of a URL, or of what a server said, put in an error.
const SHOWN: usize = 200;

/// What to give instead, said with every URL error.
const FORMS: &str =
    "give host:port, http://host:port or https://host:port; an IPv6 address in brackets, \
     [::1]:50051";

/// `text` cut to [`SHOWN`] characters (an error never echoes a long value).
pub(crate) fn shown(text: &str) -> String {
    match text.char_indices().nth(SHOWN) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// The URL tonic dials for the broker address `given` (`host:port`,
/// `http://…`, `https://…`; `grpc://` and `grpcs://` read as `http://`
/// and `https://`); [`ClientError::Url`] saying what is wrong if it can
/// never be dialled.
pub(crate) fn broker_url(given: &str) -> Result<String, ClientError> {
    let bad = |why: String| ClientError::Url {
        url: shown(&without_password(given)),
        message: format!("{why} ({FORMS})"),
    };
    let (scheme, rest) = match given.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        // A bare `host:port` is plaintext, as quotactl and the Python
        // client read it. With a `/` in it, it is a mistyped URL
        // (`http:/host:port`), which would dial a host named `http`.
        None if given.contains('/') => {
            return Err(bad("a '/' in a bare host:port (a mistyped http://?)".into()))
        }
        None => ("http".to_owned(), given),
    };
    let scheme = match scheme.as_str() {
        "http" | "grpc" => "http",
        "https" | "grpcs" => "https",
        other => {
            return Err(bad(format!(
                "unsupported scheme {:?} (use http:// or https://)",
                shown(other)
            )))
        }
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    check_host_port(authority).map_err(bad)?;
    // gRPC dials the host and port and calls its own paths: one given here
    // would be dropped (as quotactl and the Python client say too).
    if !path.is_empty() && path != "/" {
        return Err(bad(format!(
            "a gRPC broker URL has no path or query (got {:?})",
            shown(path)
        )));
    }
    Ok(format!("{scheme}://{authority}"))
}

/// The URL a client dials for the broker address `given` (`host:port`,
/// `http://…`, `https://…`), or why it can never be dialled: a port that is
/// not a number from 1 to 65535, two `:` outside an IPv6 address's
/// brackets, a host name with characters no host has, another scheme. The
/// check [`BrokerClient`] makes when it is built, for tools that take broker
/// addresses of their own (quotactl's usage errors).
///
/// [`BrokerClient`]: crate::BrokerClient
pub fn check_broker_address(given: &str) -> Result<String, String> {
    broker_url(given).map_err(|e| match e {
        ClientError::Url { message, .. } => message,
        other => other.to_string(),
    })
}

/// `given` with the password of a `user:password@` in it masked, so an
/// error never shows it.
fn without_password(given: &str) -> String {
    let start = given.find("://").map_or(0, |i| i + 3);
    let end = given[start..]
        .find(['/', '?', '#'])
        .map_or(given.len(), |i| start + i);
    match given[start..end].rfind('@') {
        Some(at) => {
            let userinfo = &given[start..start + at];
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{}{user}:***{}", &given[..start], &given[start + at..])
        }
        None => given.to_owned(),
    }
}

/// Why `authority` (`host`, `host:port`, `[v6]:port`) can never be
/// connected to, if it cannot.
fn check_host_port(authority: &str) -> Result<(), String> {
    if authority.contains('@') {
        return Err(
            "a user name or password in the URL (user:password@): the broker takes a bearer \
             token, given apart from the URL"
                .into(),
        );
    }
    let (host, port) = if let Some(inside) = authority.strip_prefix('[') {
        let Some((host, rest)) = inside.split_once(']') else {
            return Err("no ']' closes the IPv6 address".into());
        };
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!(
                "{:?} in brackets is not an IPv6 address",
                shown(host)
            ));
        }
        match rest.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if rest.is_empty() => (host, None),
            None => return Err(format!("{:?} after the IPv6 address", shown(rest))),
        }
    } else if authority.matches(':').count() > 1 {
        return Err(if authority.parse::<std::net::Ipv6Addr>().is_ok() {
            "an IPv6 address goes in brackets, with the port after them".into()
        } else {
            "more than one ':'".into()
        });
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        if host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "/?#@[]\\\"<>".contains(c))
        {
            return Err(format!(
                "the host {:?} has characters a host name cannot have",
                shown(host)
            ));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    if let Some(port) = port {
        let number = port
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| port.parse::<u16>().ok())
            .flatten();
        if !matches!(number, Some(1..)) {
            return Err(format!(
                "the port {:?} is not a number from 1 to 65535",
                shown(port)
            ));
        }
    }
    Ok(())
}

/// What a server that is not a quota-broker's gRPC port is, from a call's
/// failure there (`first`: what the server said first, when
/// [`first_answer`] was asked); `None`: it may be a broker that is away.
pub(crate) fn not_a_broker(status: &tonic::Status, first: Option<FirstAnswer>) -> Option<String> {
    match first {
        Some(FirstAnswer::Http1(line)) => Some(format!(
            "it answers in HTTP/1 ({line:?}), not gRPC over HTTP/2: an HTTP/1 server, such as a \
             broker's HTTP port (server.http_listen, which serves metrics and probes)"
        )),
        Some(FirstAnswer::Tls) => Some(
            "it answers in TLS: a TLS port addressed with http:// or as host:port (use https://)"
                .into(),
        ),
        // What a plaintext gRPC port says: nothing wrong there.
        Some(FirstAnswer::Http2) => None,
        // The server's own answer (a transport failure made locally
        // carries its source).
        None if status.code() == tonic::Code::Unimplemented
            && std::error::Error::source(status).is_none()
            && !from_a_proxy_404(status) =>
        {
            Some(
                "it does not serve this quota-broker call (UNIMPLEMENTED): another gRPC service \
                 listens there, or a quota-broker older than this client"
                    .into(),
            )
        }
        None => None,
    }
}

/// Whether `status` is tonic's reading of an HTTP 404 that carried no
/// gRPC status: a proxy's answer (an ingress with no broker behind it
/// while one restarts, most often), not a gRPC service's UNIMPLEMENTED.
pub(crate) fn from_a_proxy_404(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unimplemented
        && status
            .message()
            .contains("mapped from HTTP status code 404")
}

/// The error for the server at `url`, which is not a quota-broker's gRPC
/// port for `reason`, after a call there got `status`.
pub(crate) fn not_a_broker_error(url: &str, reason: String, status: &tonic::Status) -> ClientError {
    ClientError::NotABroker {
        url: shown(url),
        code: status.code(),
        reason,
        detail: shown(status.message()),
    }
}

/// What a server says first to a client that opens with HTTP/2's preface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FirstAnswer {
    /// An HTTP/1 status line (cut short).
    Http1(String),
    /// A TLS record (an alert, most likely).
    Tls,
    /// HTTP/2's SETTINGS frame: a plaintext HTTP/2 server, as a broker
    /// without `[server.tls]` is (the answer a plaintext gRPC client wants;
    /// a mistake only where the URL says `https://`).
    Http2,
}

/// Why a TLS handshake with the server at `url` (an `https://` URL) ended
/// with the connection closed, if it is a plaintext HTTP/2 server there (a
/// broker without `[server.tls]` resets a TLS ClientHello rather than
/// answering it): said as a server that is not the broker the URL names.
pub(crate) async fn plaintext_at_tls_url(url: &str, connect_within: Duration) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    if uri.scheme_str() != Some("https") {
        return None;
    }
    let port = uri.port_u16().unwrap_or(443);
    let plain: http::Uri = format!("http://{}:{port}/", uri.host()?).parse().ok()?;
    (first_answer(&plain, connect_within).await? == FirstAnswer::Http2).then(|| {
        "it answers in plaintext HTTP/2, not TLS: a broker without [server.tls] addressed with \
         https:// (use http://)"
            .to_owned()
    })
}

/// HTTP/2's connection preface and an empty SETTINGS frame: what a gRPC
/// client sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// How long [`first_answer`] waits for the server's first bytes, after
/// connecting: a server that answers a preface at all does so at once.
const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// Whether a plaintext call's failure may be a server's HTTP/1 or TLS
/// answer that hyper read as a closed connection: it connected, then the
/// connection ended (not refused, no such host, not timed out).
pub(crate) fn worth_asking(status: &tonic::Status) -> bool {
    let Some(source) = std::error::Error::source(status) else {
        return false;
    };
    let chain = crate::error::error_chain(source).to_ascii_lowercase();
    let connected = !["tcp connect error", "connection refused", "dns error"]
        .iter()
        .any(|s| chain.contains(s));
    connected && !chain.contains("timed out") && !chain.contains("deadline")
}

/// What the server at `uri` (plaintext) says first to a gRPC client, if
/// it is an HTTP/1 or TLS answer; `None` for HTTP/2, nothing, or no
/// connection within `connect_within` (and the answer within
/// [`FIRST_ANSWER_WAIT`]).
pub(crate) async fn first_answer(uri: &http::Uri, connect_within: Duration) -> Option<FirstAnswer> {
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let mut stream =
        tokio::time::timeout(connect_within, tokio::net::TcpStream::connect((host, port)))
            .await
            .ok()?
            .ok()?;
    // A server that answers before reading all of it may close first.
    let _ = stream.write_all(PREFACE).await;
    let mut first = [0u8; 64];
    let mut got = 0;
    let deadline = tokio::time::Instant::now() + FIRST_ANSWER_WAIT;
    while got < 16 {
        match tokio::time::timeout_at(deadline, stream.read(&mut first[got..])).await {
            Ok(Ok(n)) if n > 0 => got += n,
            _ => break,
        }
    }
    classify(&first[..got])
}

/// What a plaintext server that is not a quota-broker's gRPC port said
/// first to a gRPC client (see [`not_a_grpc_port`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotAGrpcPort {
    /// An HTTP/1 server, such as a broker's HTTP port; its status line.
    Http1(String),
    /// A TLS port (addressed with `http://` or as `host:port`).
    Tls,
}

impl std::fmt::Display for NotAGrpcPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let first = match self {
            NotAGrpcPort::Http1(line) => FirstAnswer::Http1(line.clone()),
            NotAGrpcPort::Tls => FirstAnswer::Tls,
        };
        // (Never Http2: that is a gRPC port.)
        let why = not_a_broker(&tonic::Status::unavailable(""), Some(first));
        f.write_str(why.as_deref().unwrap_or_default())
    }
}

/// What the plaintext server at `url` (`http://host:port` or `host:port`)
/// is, when it is not a quota-broker's gRPC port, from what it says first
/// to a gRPC client; `None` when it answers HTTP/2, says nothing, or
/// cannot be reached within `connect_within`. For tools that call the
/// broker through their own channel and get only "connection closed" from
/// such a server: the [`BrokerClient`] asks this itself
/// ([`ClientError::NotABroker`]).
///
/// [`BrokerClient`]: crate::BrokerClient
pub async fn not_a_grpc_port(url: &str, connect_within: Duration) -> Option<NotAGrpcPort> {
    let uri: http::Uri = broker_url(url).ok()?.parse().ok()?;
    if uri.scheme_str() != Some("http") {
        return None;
    }
    match first_answer(&uri, connect_within).await? {
        FirstAnswer::Http1(line) => Some(NotAGrpcPort::Http1(line)),
        FirstAnswer::Tls => Some(NotAGrpcPort::Tls),
        FirstAnswer::Http2 => None,
    }
}

/// [`first_answer`]'s reading of the first bytes a server sent.
fn classify(first: &[u8]) -> Option<FirstAnswer> {
    if first.starts_with(b"HTTP/") {
        let line = first.split(|b| *b == b'\r' || *b == b'\n').next()?;
        let line: String = String::from_utf8_lossy(line)
            .chars()
            .filter(|c| !c.is_control())
            .take(40)
            .collect();
        return Some(FirstAnswer::Http1(line));
    }
    // A TLS record: alert (21) or handshake (22), version 3.x; an HTTP/2
    // frame header (3 bytes of length) of type SETTINGS (4) on stream 0.
    match first {
        [21 | 22, 3, ..] => Some(FirstAnswer::Tls),
        [_, _, _, 4, _, 0, 0, 0, 0, ..] => Some(FirstAnswer::Http2),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(given: &str) -> String {
        match broker_url(given) {
            Err(ClientError::Url { url, message }) => {
                assert_eq!(url, given);
                message
            }
            other => panic!("{given}: {other:?}"),
        }
    }

    #[test]
    fn urls_that_can_never_be_dialled_say_why() {
        for (given, says) in [
            (
                "127.0.0.1:5oo51",
                "the port \"5oo51\" is not a number from 1 to 65535",
            ),
            ("127.0.0.1:70000", "the port \"70000\" is not a number"),
            ("127.0.0.1:0", "the port \"0\" is not a number"),
            (
                "http://127.0.0.1:5oo51",
                "the port \"5oo51\" is not a number",
            ),
            ("127.0.0.1:", "the port \"\" is not a number"),
            ("127.0.0.1:50051:1", "more than one ':'"),
            ("::1", "an IPv6 address goes in brackets"),
            ("broker host:50051", "characters a host name cannot have"),
            (":50051", "no host"),
            ("http://", "no host"),
            ("[::1:50051", "no ']'"),
            ("[x]:50051", "is not an IPv6 address"),
            ("ftp://127.0.0.1:50051", "unsupported scheme"),
            ("http:/127.0.0.1:50051", "a '/' in a bare host:port"),
            (
                "http://127.0.0.1:50051/foo",
                "has no path or query (got \"/foo\")",
            ),
            ("http://127.0.0.1:50051?x=1", "has no path or query"),
        ] {
            let message = refused(given);
            assert!(message.contains(says), "{given}: {message}");
            assert!(message.contains("[::1]:50051"), "{given}: {message}");
        }
        // Not echoed in full.
        let long = format!("127.0.0.1:{}", "9".repeat(5000));
        let Err(e) = broker_url(&long) else {
            panic!("a port of 5000 digits");
        };
        assert!(e.to_string().len() < 1000, "{e}");
    }

    #[test]
    fn urls_that_can_be_dialled_are_taken() {
        for (given, dialled) in [
            ("127.0.0.1:50051", "http://127.0.0.1:50051"),
            ("localhost:50051", "http://localhost:50051"),
            ("[::1]:50051", "http://[::1]:50051"),
            ("http://[::1]:50051", "http://[::1]:50051"),
            ("https://broker.example:443", "https://broker.example:443"),
            ("https://broker.example", "https://broker.example"),
            ("http://127.0.0.1:50051/", "http://127.0.0.1:50051"),
            ("HTTP://127.0.0.1:50051", "http://127.0.0.1:50051"),
            ("grpc://127.0.0.1:50051", "http://127.0.0.1:50051"),
            (
                "grpcs://broker.example:50051",
                "https://broker.example:50051",
            ),
        ] {
            assert_eq!(broker_url(given).unwrap(), dialled, "{given}");
        }
    }

    #[test]
    fn first_bytes_tell_http1_and_tls_from_http2() {
        assert_eq!(
            classify(b"HTTP/1.1 505 HTTP Version Not Supported\r\ncontent-type: x"),
            Some(FirstAnswer::Http1(
                "HTTP/1.1 505 HTTP Version Not Supported".into()
            ))
        );
        assert_eq!(classify(&[21, 3, 3, 0, 2, 2, 50]), Some(FirstAnswer::Tls));
        // A SETTINGS frame: HTTP/2 (a plaintext gRPC port).
        assert_eq!(
            classify(&[0, 0, 18, 4, 0, 0, 0, 0, 0]),
            Some(FirstAnswer::Http2)
        );
        assert_eq!(classify(&[0, 0, 18, 4, 0, 0, 0]), None);
        assert_eq!(classify(b""), None);
    }

    /// A proxy's HTTP 404 (an ingress with no broker behind it while one
    /// restarts) is read by tonic as UNIMPLEMENTED: an outage, not another
    /// gRPC service.
    #[test]
    fn a_proxys_404_is_not_another_grpc_service() {
        let proxy = tonic::Status::unimplemented(
            "grpc-status header missing, mapped from HTTP status code 404",
        );
        assert!(from_a_proxy_404(&proxy));
        assert_eq!(not_a_broker(&proxy, None), None);
        assert!(crate::error::is_unreachable(&proxy));
        let service = tonic::Status::unimplemented("Method not found!");
        assert!(!from_a_proxy_404(&service));
        assert!(not_a_broker(&service, None).is_some());
    }
}
