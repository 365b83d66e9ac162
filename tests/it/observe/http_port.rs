//! The HTTP port's connections: the Host names it answers (so a rebound
//! DNS name gets nothing), a request whose headers never end, a gRPC
//! client sent to it by mistake, and its connection caps, per address and
//! in all.

use super::{config, get, open, start, LIMIT};
use crate::harness::req;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tonic::transport::Endpoint;

#[tokio::test]
async fn an_open_brokers_event_feed_and_metrics_answer_only_localhost_or_an_ip() {
    let b = start(&config("")).await;
    let port = b.http.port();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "[::1]".into(),
    ] {
        let (head, _feed) = open(b.http, "/events", &[("Host", &host)]).await;
        assert_eq!(head.status, 200, "{host}");
    }
    // A name that a hostile page's domain may have been rebound to.
    let r = get(b.http, "/events", &[("Host", "attacker.example:9464")]).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("DNS"), "{}", r.body);
    // The metrics show the same buckets: on a loopback port, likewise.
    let r = get(b.http, "/metrics", &[("Host", "attacker.example:9464")]).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("DNS"), "{}", r.body);
    let r = get(
        b.http,
        "/metrics",
        &[("Host", &format!("localhost:{port}"))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A query the feed cannot read says what it takes.
    let r = get(b.http, "/events?tenant=t&tenant=u", &[]).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("duplicate field") && r.body.contains("each at most once"),
        "{}",
        r.body
    );
    b.stop().await;
}

/// Reads until the peer closes the connection; the bytes it sent.
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let _ = stream.read_to_end(&mut seen).await;
    seen
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_headers_never_end_is_closed_after_ten_seconds() {
    let b = start(&config("")).await;
    let mut slow = TcpStream::connect(b.http).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
    let started = tokio::time::Instant::now();
    let seen = tokio::time::timeout(Duration::from_secs(60), until_closed(&mut slow))
        .await
        .expect("closed by the broker, not held open");
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // A 408 or nothing: never a served request.
    assert!(!String::from_utf8_lossy(&seen).contains("200 OK"));
    // A connection that says nothing at all is closed too.
    let mut silent = TcpStream::connect(b.http).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), until_closed(&mut silent))
        .await
        .expect("a silent connection is closed");
    // A kept-alive connection left idle after its answer is closed too.
    let mut kept = TcpStream::connect(b.http).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(60), until_closed(&mut kept))
        .await
        .expect("an idle kept-alive connection is closed");
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    assert_eq!(get(b.http, "/healthz", &[]).await.status, 200);
    b.stop().await;
}

/// A gRPC client given the HTTP port instead of the gRPC one (a mistaken
/// url) is answered in HTTP/1.1, saying so: gRPC clients then report an
/// HTTP/1 server, a mistake to fix, where a connection closed without a
/// word reads as a broker that is down. HTTP/1 requests, also ones that
/// start like the HTTP/2 preface and come a byte at a time, are served.
#[tokio::test]
async fn a_grpc_client_on_the_http_port_is_told_it_is_not_the_grpc_port() {
    let b = start(&config("")).await;
    let mut grpc = TcpStream::connect(b.http).await.unwrap();
    grpc.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let seen = tokio::time::timeout(LIMIT, until_closed(&mut grpc))
        .await
        .expect("answered and closed");
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.starts_with("HTTP/1.1 505 "), "{seen}");
    assert!(
        seen.contains("HTTP port") && seen.contains("server.listen"),
        "{seen}"
    );
    // tonic, as any gRPC client, fails to connect there: not HTTP/2.
    let tonic = Endpoint::from_shared(format!("http://{}", b.http))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = tonic {
        let answer = QuotaBrokerClient::new(channel)
            .acquire(req("GET", "/api/v2/users/1", 0))
            .await;
        assert!(answer.is_err(), "{answer:?}");
    }
    for request in [
        "POST /session HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(b.http).await.unwrap();
        for byte in request.as_bytes() {
            s.write_all(&[*byte]).await.unwrap();
        }
        let seen = tokio::time::timeout(LIMIT, until_closed(&mut s))
            .await
            .expect("answered and closed");
        let seen = String::from_utf8_lossy(&seen);
        assert!(seen.starts_with("HTTP/1.1 2"), "{request:?}: {seen}");
    }
    b.stop().await;
}

#[tokio::test]
async fn the_http_port_holds_at_most_its_connection_cap() {
    let b = start(&config("max_connections = 4\nmax_pending_connections = 4")).await;
    let from = |ip: &'static str| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(ip.parse().unwrap(), 0))
            .unwrap();
        socket.connect(b.http).await.unwrap()
    };
    // One address holds at most a quarter of the cap: a second from it is
    // closed at once, unanswered.
    let first = from("127.0.0.2").await;
    let mut second = from("127.0.0.2").await;
    let _ = second
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let seen = tokio::time::timeout(LIMIT, until_closed(&mut second))
        .await
        .expect("a second connection from one address is closed");
    assert!(seen.is_empty(), "{}", String::from_utf8_lossy(&seen));
    drop(first);
    let mut idle = Vec::new();
    for ip in ["127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"] {
        let mut s = from(ip).await;
        // A whole request each, so each is surely accepted before the next.
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut line = String::new();
        let mut reader = BufReader::new(s);
        reader.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        idle.push(reader);
    }
    // The fifth is closed at once, unanswered.
    let mut fifth = from("127.0.0.7").await;
    let _ = fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let seen = tokio::time::timeout(LIMIT, until_closed(&mut fifth))
        .await
        .expect("the connection over the cap is closed");
    assert!(seen.is_empty(), "{}", String::from_utf8_lossy(&seen));
    // One closes: a new one is served (once the broker has seen it close).
    drop(idle.pop());
    let served = tokio::time::timeout(LIMIT, async {
        loop {
            let mut s = TcpStream::connect(b.http).await.unwrap();
            let _ = s
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await;
            let seen = until_closed(&mut s).await;
            if !seen.is_empty() {
                break String::from_utf8_lossy(&seen).into_owned();
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("a connection is served again once one closed");
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    drop(idle);
    b.stop().await;
}
