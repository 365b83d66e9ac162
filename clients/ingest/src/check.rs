//! The start-up check's part that is gc-ingest's own: a login host that
//! refuses connections (a wrong `--region`, nothing listening there) is an
//! error at start, not a warning followed by every block failing. The
//! upstream client's check only says the login host "did not answer"; a
//! direct connection tells a refusal from a host that is slow or away.

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

/// Why the login host at `login` (a base URL) refuses connections, if it
/// does at every address it has: `None` when it takes one, does not answer
/// within `within`, cannot be resolved, or is reached through a proxy.
pub async fn login_refuses(login: &str, within: Duration) -> Option<std::io::Error> {
    let through_proxy = PROXY_VARIABLES
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|p| !p.is_empty()));
    if through_proxy {
        return None;
    }
    let authority = authority(login)?;
    let addrs = tokio::time::timeout(within, tokio::net::lookup_host(&authority))
        .await
        .ok()?
        .ok()?;
    let mut refused = None;
    for addr in addrs {
        match tokio::time::timeout(within, TcpStream::connect(addr)).await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused = Some(e),
            // Taken, or slow, or away: not a refusal.
            _ => return None,
        }
    }
    refused
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
        assert!(login_refuses(&format!("http://{open}"), within)
            .await
            .is_none());
        let refused = login_refuses(&format!("http://{closed}"), within).await;
        assert!(refused.is_some(), "{closed}");
    }
}
