//! The start-up check's probe of a host that did not answer: a login host
//! that refuses connections (nothing listening there) or whose name does
//! not exist (a misspelt `--region`) is an error at start, not a warning
//! followed by every call failing; a broker that refuses connections is
//! said to, not to be "away". A failed HTTP request only says the host
//! "did not answer"; a lookup and a direct connection tell those from a
//! host that is slow or away, or a resolver that is.

use std::time::Duration;

use tokio::net::TcpStream;

/// Variables through which the HTTP client reaches the login host by a
/// proxy: a direct connection would then test another path.
const PROXY_VARIABLES: [&str; 6] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Why the host of `url` (an `http://` or `https://` URL) cannot be
/// reached, if so: it refuses connections at every address it has, or the
/// resolver says its name does not exist (`refuses connections (…)`, `has
/// a name that does not exist (…)`, the system's error in brackets).
/// `None` when it takes a connection, does not answer within `within`,
/// cannot be resolved for now (no resolver, a timeout), or is reached
/// through a proxy.
pub async fn host_refuses(url: &str, within: Duration) -> Option<String> {
    let through_proxy = PROXY_VARIABLES
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|p| !p.is_empty()));
    if through_proxy {
        return None;
    }
    let authority = authority(url)?;
    let addrs = match tokio::time::timeout(within, tokio::net::lookup_host(&authority)).await {
        Ok(Ok(addrs)) => addrs,
        Ok(Err(e)) if name_does_not_exist(&e) => {
            return Some(format!("has a name that does not exist ({e})"))
        }
        _ => return None,
    };
    let mut refused = None;
    for addr in addrs {
        match tokio::time::timeout(within, TcpStream::connect(addr)).await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused = Some(e),
            // Taken, or slow, or away: not a refusal.
            _ => return None,
        }
    }
    refused.map(|e| format!("refuses connections ({e})"))
}

/// Whether a failed lookup is the resolver's answer that the name does
/// not exist (`EAI_NONAME`, `EAI_NODATA`), not a resolver that could not
/// answer for now (`EAI_AGAIN`). std reports `getaddrinfo`'s errors only as
/// their text, with no kind of their own, so the text is what is read.
fn name_does_not_exist(e: &std::io::Error) -> bool {
    let text = e.to_string();
    [
        "Name or service not known",
        "No address associated with hostname",
        "nodename nor servname provided",
    ]
    .iter()
    .any(|t| text.contains(t))
}

/// `host:port` of an `http://` or `https://` base URL (the scheme's port
/// when it names none).
fn authority(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let host = rest.split(['/', '?', '#']).next()?;
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    if host.is_empty() {
        return None;
    }
    // A port after the host (after the `]` of an IPv6 address).
    let has_port = host[host.rfind(']').unwrap_or(0)..].contains(':');
    Some(if has_port {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    })
}

/// At most [`SHOWN`] characters of `s` (a URL or name from the command
/// line), with `…` where it was cut: what a message quotes of input.
pub fn clip(s: &str) -> String {
    match s.char_indices().nth(SHOWN) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// Characters of input a message quotes at most ([`clip`]).
pub const SHOWN: usize = 200;

/// The broker's limit on a client id, bytes (a longer one is refused with
/// `INVALID_ARGUMENT` on every call).
pub const MAX_CLIENT_ID: usize = 256;

/// What is wrong with `id` as the broker's client id, if anything: longer
/// than [`MAX_CLIENT_ID`] bytes, or holding a control character (both
/// refused by the broker on every call). Quotes none of it.
pub fn client_id_problem(id: &str) -> Option<String> {
    if id.len() > MAX_CLIENT_ID {
        return Some(format!(
            "{} bytes long; the broker takes a client id of at most {MAX_CLIENT_ID} bytes",
            id.len()
        ));
    }
    if id.chars().any(char::is_control) {
        return Some(
            "holds a control character (a newline, a tab, an escape), which the broker \
             refuses in a client id"
                .to_owned(),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authority_of_a_login_url() {
        let a = |url| authority(url);
        assert_eq!(
            a("https://login.mypurecloud.com").as_deref(),
            Some("login.mypurecloud.com:443")
        );
        assert_eq!(
            a("http://127.0.0.1:24999").as_deref(),
            Some("127.0.0.1:24999")
        );
        assert_eq!(
            a("http://127.0.0.1:24999/x?y").as_deref(),
            Some("127.0.0.1:24999")
        );
        assert_eq!(a("http://[::1]").as_deref(), Some("[::1]:80"));
        assert_eq!(a("http://[::1]:8080/").as_deref(), Some("[::1]:8080"));
        assert_eq!(a("ftp://h"), None);
        assert_eq!(a("http://"), None);
    }

    #[tokio::test]
    async fn a_refusal_is_told_from_a_host_that_takes_the_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let within = Duration::from_secs(5);
        assert!(host_refuses(&format!("http://{open}"), within)
            .await
            .is_none());
        let refused = host_refuses(&format!("http://{closed}"), within).await;
        assert!(
            refused
                .as_deref()
                .is_some_and(|r| r.starts_with("refuses connections")),
            "{closed}: {refused:?}"
        );
    }

    #[test]
    fn long_input_is_clipped_and_long_client_ids_refused() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(20_000);
        let shown = clip(&long);
        assert_eq!(shown.chars().count(), SHOWN + 1);
        assert!(shown.ends_with('…'));
        assert_eq!(client_id_problem(&"a".repeat(256)), None);
        let said = client_id_problem(&"a".repeat(257)).unwrap();
        assert!(
            said.contains("257 bytes") && said.contains("at most 256"),
            "{said}"
        );
        assert!(!said.contains("aaa"), "{said}");
        assert!(client_id_problem("a\nb").is_some());
    }

    #[test]
    fn a_name_that_does_not_exist_is_told_from_a_resolver_away() {
        let lookup = |text: &str| {
            std::io::Error::other(format!("failed to lookup address information: {text}"))
        };
        assert!(name_does_not_exist(&lookup("Name or service not known")));
        assert!(name_does_not_exist(&lookup(
            "No address associated with hostname"
        )));
        assert!(!name_does_not_exist(&lookup(
            "Temporary failure in name resolution"
        )));
        assert!(!name_does_not_exist(&lookup(
            "Non-recoverable failure in name resolution"
        )));
    }
}
