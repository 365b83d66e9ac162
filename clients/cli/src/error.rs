//! The errors `quotactl` reports: each renders as one line (no newlines, no
//! secrets) for `quotactl: <error>` on stderr.

use std::error::Error as StdError;
use std::fmt;
use tonic::Code;

/// Everything that can go wrong after the arguments parsed.
#[derive(Debug)]
pub enum Error {
    /// The broker could not be reached (connect failed, refused, timed out).
    Unreachable {
        /// The broker URL tried.
        url: String,
        /// Why, e.g. `connection refused`.
        detail: String,
    },
    /// The connection broke during a call (e.g. the broker was killed).
    Lost {
        /// The broker URL.
        url: String,
        /// Why, e.g. `connection reset`.
        detail: String,
    },
    /// The broker answered with a gRPC error.
    Rpc {
        /// The gRPC status code.
        code: Code,
        /// The broker's message.
        message: String,
        /// The request id the broker gave the call (`x-request-id`): its
        /// log line about the call carries it.
        request_id: Option<String>,
    },
    /// The broker did not answer within the time limit.
    Timeout {
        /// The broker URL.
        url: String,
        /// The limit, in seconds.
        secs: u64,
    },
    /// The token cannot be sent as gRPC metadata.
    BadToken,
    /// The TLS options are not usable (a flag without https://, a file that
    /// cannot be read, a certificate or key that does not parse).
    Tls(String),
    /// Writing the output failed (other than a closed pipe).
    Output(std::io::Error),
    /// A command over every tenant found no broker leading any (a cluster
    /// cut off from etcd, or electing; or only members that lead none
    /// given): `asked` brokers were asked.
    NothingLed {
        /// How many brokers were given.
        asked: usize,
    },
    /// Options that do not fit what the broker has, found once it was asked
    /// (a new class without `--order`): a usage error, exit status 2.
    Usage(String),
    /// Several brokers were tried and none served the call: each URL tried
    /// and why it did not (a broker not leading the tenant, unreachable, ...).
    NoBroker {
        /// The tenant of the call; `None` for a call over every tenant.
        tenant: Option<String>,
        /// Each broker tried, in order, with its failure.
        tried: Vec<(String, Error)>,
    },
    /// A command over every tenant got answers from only some of the
    /// brokers given (each failure was reported on stderr before).
    Partial {
        /// Brokers that did not answer.
        failed: usize,
        /// Brokers given.
        total: usize,
    },
}

impl Error {
    /// Maps a transport error from connecting to `url`.
    pub fn transport(url: &str, e: &(dyn StdError + 'static)) -> Error {
        Error::Unreachable {
            url: url.to_owned(),
            detail: cause(e),
        }
    }

    /// Maps a gRPC status from a call to the broker at `url`. A status with
    /// a source was made locally from a transport failure (answers from the
    /// broker carry none): a failed connect becomes [`Error::Unreachable`],
    /// a connection broken during the call [`Error::Lost`].
    pub fn status(url: &str, s: tonic::Status) -> Error {
        if let Some(src) = s.source() {
            if s.code() == Code::Unavailable && s.message().contains("connect") {
                return Error::transport(url, src);
            }
            // (CANCELLED: a connection the broker closed as the call began,
            // e.g. refusing the client's certificate under mutual TLS.)
            if matches!(
                s.code(),
                Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
            ) {
                return Error::Lost {
                    url: url.to_owned(),
                    detail: cause(src),
                };
            }
        }
        // The broker never answers CANCELLED: the connection was closed
        // under the call (with or without a transport error as its source).
        if s.code() == Code::Cancelled {
            return Error::Lost {
                url: url.to_owned(),
                detail: s.message().to_owned(),
            };
        }
        let request_id = s
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|id| {
                !id.is_empty()
                    && id.len() <= 64
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
            })
            .map(str::to_owned);
        Error::Rpc {
            code: s.code(),
            message: s.message().to_owned(),
            request_id,
        }
    }
}

impl Error {
    /// Whether another broker of a cluster may serve the call this error
    /// failed: the broker did not serve it (UNAVAILABLE: not the tenant's
    /// leader, no leader yet, shutting down), could not be reached, the
    /// connection broke, or it did not answer in time.
    pub fn try_another(&self) -> bool {
        matches!(
            self,
            Error::Unreachable { .. }
                | Error::Lost { .. }
                | Error::Timeout { .. }
                | Error::Rpc {
                    code: Code::Unavailable,
                    ..
                }
        )
    }

    /// This error without the broker's URL, for a list of brokers tried.
    pub fn without_url(&self) -> String {
        match self {
            Error::Unreachable { url, detail } => format!(
                "unreachable: {}{}{}",
                one_line(detail),
                tls_hint(url, detail),
                port_hint(url)
            ),
            Error::Lost { url, detail } => {
                format!("connection lost: {}{}", one_line(detail), port_hint(url))
            }
            Error::Timeout { url, secs } => format!("no answer within {secs}s{}", port_hint(url)),
            other => other.to_string(),
        }
    }
}

/// What to check when a broker URL without a port (`http://10.0.0.5`, a
/// bare `10.0.0.5`) did not lead to a broker: it was dialled on the
/// scheme's port, where a broker seldom listens ("" for a URL with a port).
pub(crate) fn port_hint(url: &str) -> String {
    let Ok(uri) = url.parse::<tonic::transport::Uri>() else {
        return String::new();
    };
    if uri.port_u16().is_some() {
        return String::new();
    }
    let used = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    let port = crate::cli::DEFAULT_PORT;
    format!(
        " (the URL gives no port, so port {used} was used; a broker's gRPC port is {port} unless \
         its server.listen says another: give it, like {}:{port})",
        short(url.trim_end_matches(':'))
    )
}

/// What to do about a TLS handshake the client refused, by rustls's words
/// for it ("" for anything else).
fn tls_hint(url: &str, detail: &str) -> &'static str {
    if detail.contains("not valid for name") {
        " (connect by a name the certificate has, or give one with --tls-server-name)"
    } else if detail.contains("UnknownIssuer") {
        " (no CA trusted here signed the broker's certificate: --ca-cert with the CA that did)"
    } else if detail.contains("xpired") {
        " (the broker's certificate has expired: renew it on the broker)"
    } else if detail.contains("NotValidYet") || detail.contains("not valid yet") {
        " (the broker's certificate is not valid yet: check this host's clock)"
    } else if url.starts_with("https://")
        && [
            "reset",
            "InvalidContentType",
            "corrupt message",
            "unexpected EOF",
            "close_notify",
        ]
        .iter()
        .any(|w| detail.contains(w))
    {
        // A plaintext broker answers a TLS ClientHello with HTTP/2 bytes or
        // by closing the connection.
        " (if the broker serves no TLS on this port, without [server.tls], use an http:// URL)"
    } else {
        ""
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unreachable { url, detail } => {
                write!(
                    f,
                    "cannot reach the broker at {}: {}{}{}",
                    short(url),
                    one_line(detail),
                    tls_hint(url, detail),
                    port_hint(url)
                )
            }
            Error::Lost { url, detail } => {
                write!(
                    f,
                    "lost the connection to the broker at {}: {}",
                    short(url),
                    one_line(detail)
                )?;
                // A broker with [server.tls] drops a plaintext client during
                // the handshake, which looks like any broken connection.
                if url.starts_with("http://") {
                    write!(
                        f,
                        " (if the broker serves TLS, use an https:// URL, with --ca-cert for a private CA)"
                    )?;
                } else if url.starts_with("https://") {
                    // With TLS 1.3 a client certificate is checked after the
                    // client's side of the handshake: the refusal arrives as
                    // a broken connection on the first call.
                    write!(
                        f,
                        " (if the broker was not restarting: under mutual TLS it drops a client \
                         whose certificate its client CA did not sign, or that gave none: check \
                         --client-cert and --client-key)"
                    )?;
                }
                write!(f, "{}", port_hint(url))
            }
            Error::Rpc {
                code,
                message,
                request_id,
            } => {
                let message = one_line(message);
                if message.is_empty() {
                    write!(f, "{}", code_name(*code))?;
                } else {
                    write!(f, "{}: {message}", code_name(*code))?;
                }
                // The broker speaks to every gRPC caller; here the token is
                // a flag.
                if *code == Code::Unauthenticated {
                    write!(f, " (quotactl sends the token given with --token or QUOTA_BROKER_TOKEN)")?;
                }
                match request_id {
                    Some(id) => write!(f, " (request id {id})"),
                    None => Ok(()),
                }
            }
            Error::Timeout { url, secs } => {
                write!(
                    f,
                    "the broker at {} did not answer within {secs}s{}",
                    short(url),
                    port_hint(url)
                )
            }
            Error::NothingLed { asked: 1 } => write!(
                f,
                "no bucket to show: the broker given leads no tenant right now. A cluster's \
                 member may lead none: give every broker (--broker URL,URL,... or \
                 QUOTA_BROKER_URL), or --tenant T to be sent to that tenant's leader; if no \
                 member leads any, the cluster is cut off from etcd or electing leaders"
            ),
            Error::NothingLed { asked } => write!(
                f,
                "no bucket to show: none of the {asked} brokers given leads a tenant right now (a \
                 cluster cut off from etcd, or electing leaders; or the members that lead were \
                 not given: --tenant T is sent to that tenant's leader)"
            ),
            Error::BadToken => write!(
                f,
                "the token contains characters that cannot be sent in gRPC metadata (printable ASCII only)"
            ),
            Error::Tls(detail) => {
                write!(f, "TLS: {}", one_line(detail))?;
                if detail.contains("KeyMismatch") || detail.contains("keys may not be consistent") {
                    write!(f, " (--client-key is not the key of --client-cert)")?;
                }
                Ok(())
            }
            Error::Output(e) => write!(f, "cannot write the output: {}", one_line(&e.to_string())),
            Error::Usage(problem) => write!(f, "{}", one_line(problem)),
            Error::NoBroker { tenant, tried } => {
                match tenant {
                    Some(t) => write!(f, "no broker served tenant {t:?}; tried ")?,
                    None => write!(f, "no broker answered; tried ")?,
                }
                for (i, (url, e)) in tried.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    write!(f, "{sep}{} ({})", short(url), e.without_url())?;
                }
                Ok(())
            }
            Error::Partial { failed, total } => write!(
                f,
                "{failed} of {total} brokers did not answer (see above); the output lacks the tenants they lead, if they still lead any"
            ),
        }
    }
}

impl StdError for Error {}

pub use quota_broker::code_name;

/// The first I/O error in a source chain.
fn find_io<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a std::io::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

/// Why a connection failed, as short as the chain allows: the I/O error's
/// kind when it is a well-known one (`connection refused`), else the
/// innermost message.
fn cause(e: &(dyn StdError + 'static)) -> String {
    use std::io::ErrorKind as K;
    if let Some(io) = find_io(e) {
        return match io.kind() {
            K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::TimedOut
            | K::HostUnreachable
            | K::NetworkUnreachable
            | K::AddrNotAvailable
            | K::PermissionDenied => io.kind().to_string(),
            _ => strip_os_error(&io.to_string()),
        };
    }
    let mut innermost = e;
    while let Some(next) = innermost.source() {
        innermost = next;
    }
    strip_os_error(&innermost.to_string())
}

/// `Connection refused (os error 111)` → `Connection refused`.
fn strip_os_error(s: &str) -> String {
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_owned(),
        _ => s.to_owned(),
    }
}

/// Collapses line breaks so an error is always one line.
fn one_line(s: &str) -> String {
    clip(
        &s.split(['\n', '\r'])
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
        DETAIL_CHARS,
    )
}

/// Most characters of a URL shown: it is what was typed.
const URL_CHARS: usize = 200;
/// Most characters of an error's own words shown (a resolver's echoes the
/// host name it was given, however long).
const DETAIL_CHARS: usize = 1_000;

/// `s` as an error shows it: as is, or cut after `most` characters.
pub(crate) fn clip(s: &str, most: usize) -> String {
    match s.char_indices().nth(most) {
        None => s.to_owned(),
        Some((end, _)) => format!("{}… ({} bytes)", &s[..end], s.len()),
    }
}

/// A broker URL as an error shows it.
pub(crate) fn short(url: &str) -> String {
    clip(url, URL_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancelled_call_is_a_lost_connection_with_what_to_do() {
        let e = Error::status(
            "https://b:50051",
            tonic::Status::cancelled("operation was canceled"),
        );
        assert!(matches!(e, Error::Lost { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.starts_with("lost the connection to the broker at https://b:50051")
                && text.contains("--client-cert and --client-key"),
            "{text}"
        );
    }

    #[test]
    fn rpc_errors_are_one_line_with_the_code_name() {
        let e = Error::status(
            "http://x",
            tonic::Status::permission_denied(
                "token \"ingest\" has role client; this RPC needs an admin token",
            ),
        );
        assert_eq!(
            e.to_string(),
            "PERMISSION_DENIED: token \"ingest\" has role client; this RPC needs an admin token"
        );
        let e = Error::status("http://x", tonic::Status::not_found("a\nb\n"));
        assert_eq!(e.to_string(), "NOT_FOUND: a; b");
        let e = Error::status("http://x", tonic::Status::internal(""));
        assert_eq!(e.to_string(), "INTERNAL");
        // A missing or unknown token: how quotactl sends one.
        let e = Error::status(
            "http://x",
            tonic::Status::unauthenticated(
                "no bearer token: send metadata `authorization: Bearer <token>`",
            ),
        );
        assert!(
            e.to_string()
                .ends_with("(quotactl sends the token given with --token or QUOTA_BROKER_TOKEN)"),
            "{e}"
        );
        // The broker's request id, so its log line can be found; one that
        // is not a plain short id is left out.
        let mut with_id = tonic::Status::not_found("no tenant \"x\"");
        with_id
            .metadata_mut()
            .insert("x-request-id", "9f2c4e1a00b3d7e5".parse().unwrap());
        let e = Error::status("http://x", with_id);
        assert_eq!(
            e.to_string(),
            "NOT_FOUND: no tenant \"x\" (request id 9f2c4e1a00b3d7e5)"
        );
        let mut odd = tonic::Status::not_found("gone");
        odd.metadata_mut()
            .insert("x-request-id", "a b".parse().unwrap());
        assert_eq!(
            Error::status("http://x", odd).to_string(),
            "NOT_FOUND: gone"
        );
    }

    #[test]
    fn local_transport_failures_are_not_broker_answers() {
        let io = std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "stream closed because of a broken pipe",
        );
        let e = Error::status("http://b:1", tonic::Status::from_error(Box::new(io)));
        assert_eq!(
            e.to_string(),
            "lost the connection to the broker at http://b:1: stream closed because of a broken pipe \
             (if the broker serves TLS, use an https:// URL, with --ca-cert for a private CA)"
        );
        // The same code sent by the broker stays an RPC error.
        let e = Error::status("http://b:1", tonic::Status::unavailable("shutting down"));
        assert_eq!(e.to_string(), "UNAVAILABLE: shutting down");
    }

    #[test]
    fn io_causes_are_short() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = Error::transport("http://127.0.0.1:1", &io);
        assert_eq!(
            e.to_string(),
            "cannot reach the broker at http://127.0.0.1:1: connection refused"
        );
        let other = std::io::Error::other("failed to lookup address information (os error 2)");
        assert_eq!(cause(&other), "failed to lookup address information");
    }

    #[test]
    fn no_broker_names_every_url_tried() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = Error::NoBroker {
            tenant: Some("t".into()),
            tried: vec![
                (
                    "http://a:1".into(),
                    Error::status("http://a:1", tonic::Status::unavailable("no leader\nyet")),
                ),
                (
                    "http://b:2".into(),
                    Error::transport("http://b:2", &refused),
                ),
            ],
        };
        assert_eq!(
            e.to_string(),
            "no broker served tenant \"t\"; tried http://a:1 (UNAVAILABLE: no leader; yet), \
             http://b:2 (unreachable: connection refused)"
        );
        assert!(Error::status("x", tonic::Status::unavailable("")).try_another());
        assert!(!Error::status("x", tonic::Status::not_found("")).try_another());
    }

    #[test]
    fn what_was_typed_is_clipped_and_tls_mistakes_say_what_to_do() {
        let long = format!("http://{}:1", "h".repeat(3_000));
        let e = Error::Unreachable {
            url: long,
            detail: "failed to lookup address information".into(),
        };
        let shown = e.to_string();
        assert!(shown.len() < 300, "{shown}");
        assert!(shown.contains("(3009 bytes)"), "{shown}");
        let plaintext = Error::Unreachable {
            url: "https://127.0.0.1:50051".into(),
            detail: "connection reset".into(),
        };
        assert!(
            plaintext.to_string().contains("use an http:// URL"),
            "{plaintext}"
        );
        let http = Error::Unreachable {
            url: "http://127.0.0.1:50051".into(),
            detail: "connection reset".into(),
        };
        assert!(!http.to_string().contains("TLS"), "{http}");
        let mismatch =
            Error::Tls("transport error: keys may not be consistent: KeyMismatch".into());
        assert!(
            mismatch
                .to_string()
                .ends_with("(--client-key is not the key of --client-cert)"),
            "{mismatch}"
        );
    }

    #[test]
    fn a_url_without_a_port_says_the_port_used_and_the_brokers() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            Error::transport("http://127.0.0.1", &refused).to_string(),
            "cannot reach the broker at http://127.0.0.1: connection refused (the URL gives no \
             port, so port 80 was used; a broker's gRPC port is 50051 unless its server.listen \
             says another: give it, like http://127.0.0.1:50051)"
        );
        let e = Error::Timeout {
            url: "https://broker.internal".into(),
            secs: 30,
        };
        assert!(
            e.to_string().ends_with(
                "so port 443 was used; a broker's gRPC port is 50051 unless its \
                            server.listen says another: give it, like \
                            https://broker.internal:50051)"
            ),
            "{e}"
        );
        let lost = Error::Lost {
            url: "http://b".into(),
            detail: "connection reset".into(),
        };
        assert!(lost.without_url().contains("port 80 was used"), "{lost}");
        // A URL with its port: nothing added.
        for url in ["http://127.0.0.1:1", "https://[::1]:443"] {
            assert_eq!(port_hint(url), "", "{url}");
        }
    }

    #[test]
    fn nothing_led_says_whether_more_brokers_should_be_given() {
        let one = Error::NothingLed { asked: 1 }.to_string();
        assert!(
            one.contains("the broker given leads no tenant right now"),
            "{one}"
        );
        assert!(one.contains("give every broker"), "{one}");
        let two = Error::NothingLed { asked: 2 }.to_string();
        assert!(
            two.contains("none of the 2 brokers given leads a tenant right now"),
            "{two}"
        );
    }

    #[test]
    fn every_code_has_a_name() {
        for i in 0..=16 {
            assert!(!code_name(Code::from_i32(i)).is_empty());
        }
        assert_eq!(code_name(Code::Unauthenticated), "UNAUTHENTICATED");
    }
}
