//! Overload protection over real sockets and real gRPC: silent connections
//! closed at the handshake timeout, the pending-handshake and connection
//! caps, per-token and per-IP request rates, the Watch cap per token. Time
//! is paused, and "answered at once" is checked exactly: the call finishes
//! with the clock held still ([`clock_held`]).

use crate::harness::{clock_held, closed_by_broker, still_open};
use crate::tls::{config, Server};
use quota_broker::hash_token;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{AcquireRequest, WatchRequest};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn acquire_req() -> AcquireRequest {
    AcquireRequest {
        tenant: "t".into(),
        client_id: "overload-test".into(),
        method: "GET".into(),
        path: "/x".into(),
        max_wait_ms: Some(0),
        ..Default::default()
    }
}

fn with_token<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

async fn acquire(channel: &Channel, token: Option<&str>) -> Result<(), Status> {
    let r = QuotaBrokerClient::new(channel.clone())
        .acquire(with_token(acquire_req(), token))
        .await?
        .into_inner();
    assert!(r.granted, "{r:?}");
    Ok(())
}

/// A connected plaintext channel from `from` (any loopback address).
async fn channel_from(addr: SocketAddr, from: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .local_address(Some(from.parse::<IpAddr>().unwrap()))
        .connect()
        .await
        .unwrap()
}

/// A TCP connection to `addr` from `from` (any loopback address).
async fn connect_from(addr: SocketAddr, from: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    socket.connect(addr).await.unwrap()
}

/// The retry time of an overload refusal: RESOURCE_EXHAUSTED, with
/// `retry-after-ms` metadata that the message repeats.
fn retry_after(status: &Status) -> Duration {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let ms: u64 = status
        .metadata()
        .get("retry-after-ms")
        .expect("retry-after-ms metadata")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        status.message().contains(&format!("retry in {ms} ms")),
        "{}",
        status.message()
    );
    Duration::from_millis(ms)
}

#[tokio::test(start_paused = true)]
async fn silent_connections_are_closed_at_the_handshake_timeout_while_clients_are_served() {
    let server = Server::start(&config("handshake_timeout_ms = 5000\n")).await;
    // A real client gets in and is served at once, slowloris or not.
    let (mut silent, client) = clock_held("a client among 50 silent connections", async {
        let mut silent = Vec::new();
        for _ in 0..50 {
            silent.push(TcpStream::connect(server.addr).await.unwrap());
        }
        let client = channel_from(server.addr, "127.0.0.1").await;
        acquire(&client, None).await.unwrap();
        (silent, client)
    })
    .await;
    // Open until the handshake timeout, closed at it.
    tokio::time::advance(Duration::from_millis(4999)).await;
    // A call's round trip gives every woken task its turn first.
    clock_held("a call before the timeout", acquire(&client, None))
        .await
        .unwrap();
    assert!(silent.iter().all(still_open), "closed before the timeout");
    tokio::time::advance(Duration::from_millis(1)).await;
    clock_held("the silent connections closed at the timeout", async {
        for s in &mut silent {
            assert!(closed_by_broker(s).await);
        }
    })
    .await;
    // The client's connection finished its handshake: it is not closed.
    acquire(&client, None).await.unwrap();
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn connections_beyond_the_pending_cap_are_closed_at_once() {
    let server = Server::start(&config(
        "handshake_timeout_ms = 5000\nmax_pending_connections = 4\n",
    ))
    .await;
    let started = Instant::now();
    let mut pending = clock_held("connections beyond the cap closed at once", async {
        // From four addresses: one address may hold only a quarter.
        let mut pending = Vec::new();
        for from in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"] {
            pending.push(connect_from(server.addr, from).await);
        }
        let mut extra = Vec::new();
        for _ in 0..3 {
            extra.push(TcpStream::connect(server.addr).await.unwrap());
        }
        for s in &mut extra {
            assert!(closed_by_broker(s).await);
        }
        // A gRPC client arriving now is turned away too, promptly.
        let refused = Endpoint::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect_lazy();
        let err = acquire(&refused, None).await.unwrap_err();
        // tonic reports a connection closed during its handshake as one of these.
        assert!(
            matches!(
                err.code(),
                Code::Unavailable | Code::Cancelled | Code::Unknown
            ),
            "{err:?}"
        );
        pending
    })
    .await;
    // Once the silent ones time out, there is room again.
    for s in &mut pending {
        assert!(closed_by_broker(s).await);
    }
    assert!(started.elapsed() >= Duration::from_millis(5000));
    let client = channel_from(server.addr, "127.0.0.1").await;
    acquire(&client, None).await.unwrap();
    server.stop().await;
}

/// One address opening silent sockets again and again holds at most a
/// quarter of the pending cap: clients from elsewhere still connect and
/// are served at once.
#[tokio::test(start_paused = true)]
async fn one_address_holds_at_most_a_quarter_of_the_pending_cap() {
    let server = Server::start(&config(
        "handshake_timeout_ms = 5000\nmax_pending_connections = 8\n",
    ))
    .await;
    let (held, client) = clock_held("a client while one address floods", async {
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(connect_from(server.addr, "127.0.0.2").await);
        }
        for _ in 0..20 {
            let mut extra = connect_from(server.addr, "127.0.0.2").await;
            assert!(
                closed_by_broker(&mut extra).await,
                "a third from one address was kept"
            );
        }
        let client = channel_from(server.addr, "127.0.0.1").await;
        acquire(&client, None).await.unwrap();
        (held, client)
    })
    .await;
    assert!(
        held.iter().all(still_open),
        "the first two wait for their timeout"
    );
    acquire(&client, None).await.unwrap();
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn connections_beyond_the_connection_cap_are_closed_at_once() {
    let server = Server::start(&config(
        "max_connections = 2\nmax_pending_connections = 2\nmax_connections_per_address = 2\n",
    ))
    .await;
    let first = channel_from(server.addr, "127.0.0.1").await;
    acquire(&first, None).await.unwrap();
    let _silent = clock_held("a connection beyond the cap closed at once", async {
        let silent = TcpStream::connect(server.addr).await.unwrap();
        let mut over = TcpStream::connect(server.addr).await.unwrap();
        assert!(closed_by_broker(&mut over).await);
        silent
    })
    .await;
    // Open connections keep being served.
    acquire(&first, None).await.unwrap();
    server.stop().await;
}

/// One address holds at most `server.max_connections_per_address` open
/// connections, established ones included (a host that opens connections
/// and keeps them alive cannot take the whole cap); other addresses are
/// still served, and a connection closed gives its place back.
#[tokio::test(start_paused = true)]
async fn one_address_holds_at_most_its_share_of_open_connections() {
    let server = Server::start(&config(
        "max_connections = 100\nmax_pending_connections = 8\nmax_connections_per_address = 2\n",
    ))
    .await;
    let first = channel_from(server.addr, "127.0.0.2").await;
    let second = channel_from(server.addr, "127.0.0.2").await;
    acquire(&first, None).await.unwrap();
    acquire(&second, None).await.unwrap();
    clock_held(
        "a third connection from the address closed at once",
        async {
            let mut third = connect_from(server.addr, "127.0.0.2").await;
            assert!(closed_by_broker(&mut third).await);
        },
    )
    .await;
    let other = channel_from(server.addr, "127.0.0.3").await;
    acquire(&other, None).await.unwrap();
    // Established connections keep being served; one closed frees a place.
    acquire(&first, None).await.unwrap();
    drop(second);
    let again = clock_held("a place freed by a closed connection", async {
        loop {
            // The broker sees the close when its connection task ends.
            match Endpoint::from_shared(format!("http://{}", server.addr))
                .unwrap()
                .local_address(Some("127.0.0.2".parse::<IpAddr>().unwrap()))
                .connect()
                .await
            {
                Ok(c) if acquire(&c, None).await.is_ok() => break c,
                _ => tokio::task::yield_now().await,
            }
        }
    })
    .await;
    acquire(&again, None).await.unwrap();
    server.stop().await;
}

const TOKENS: &str = r#"
[[auth.tokens]]
name = "slow"
sha256 = "SLOW"
role = "client"
tenants = ["t"]
max_requests_per_sec = 5
max_watch_streams = 2

[[auth.tokens]]
name = "unlimited"
sha256 = "UNLIMITED"
role = "client"
tenants = ["t"]
max_requests_per_sec = 0
"#;

fn with_tokens(server_keys: &str) -> String {
    config(&format!(
        "{server_keys}{}",
        TOKENS
            .replace("SLOW", &hash_token("slow-secret"))
            .replace("UNLIMITED", &hash_token("unlimited-secret"))
    ))
}

#[tokio::test(start_paused = true)]
async fn a_token_over_its_rate_is_refused_at_once_with_a_retry_time() {
    let server = Server::start(&with_tokens("")).await;
    let client = channel_from(server.addr, "127.0.0.1").await;
    let err = clock_held("a token over its rate refused at once", async {
        for _ in 0..5 {
            acquire(&client, Some("slow-secret")).await.unwrap();
        }
        acquire(&client, Some("slow-secret")).await.unwrap_err()
    })
    .await;
    let wait = retry_after(&err);
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(200),
        "{wait:?}"
    );
    assert!(err.message().contains("\"slow\""), "{}", err.message());
    // Other tokens and health checks are not held back by it.
    for _ in 0..50 {
        acquire(&client, Some("unlimited-secret")).await.unwrap();
    }
    let mut health = HealthClient::new(client.clone());
    for _ in 0..20 {
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
    }
    // After the retry time, it is served again.
    tokio::time::advance(wait).await;
    acquire(&client, Some("slow-secret")).await.unwrap();
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn anonymous_callers_are_limited_per_peer_ip() {
    let server = Server::start(&config(
        "[overload]\nmax_requests_per_sec = 3\nexempt_loopback = false\n",
    ))
    .await;
    let a = channel_from(server.addr, "127.0.0.1").await;
    let b = channel_from(server.addr, "127.0.0.2").await;
    for _ in 0..3 {
        acquire(&a, None).await.unwrap();
    }
    let err = acquire(&a, None).await.unwrap_err();
    retry_after(&err);
    assert!(err.message().contains("127.0.0.1"), "{}", err.message());
    // Another address has its own budget.
    for _ in 0..3 {
        acquire(&b, None).await.unwrap();
    }
    assert_eq!(
        acquire(&b, None).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn loopback_callers_are_exempt_from_anonymous_limits_by_default() {
    let server = Server::start(&config("[overload]\nmax_requests_per_sec = 3\n")).await;
    let a = channel_from(server.addr, "127.0.0.1").await;
    for _ in 0..30 {
        acquire(&a, None).await.unwrap();
    }
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn watch_streams_per_token_are_capped() {
    let server = Server::start(&with_tokens("")).await;
    let client = channel_from(server.addr, "127.0.0.1").await;
    let mut broker = QuotaBrokerClient::new(client.clone());
    let watch = |token: &'static str| {
        let mut broker = broker.clone();
        async move {
            broker
                .watch(with_token(WatchRequest::default(), Some(token)))
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let mut first = watch("slow-secret").await.unwrap();
    first.message().await.unwrap().expect("a snapshot");
    let _second = watch("slow-secret").await.unwrap();
    let err = clock_held(
        "a Watch beyond the cap refused at once",
        watch("slow-secret"),
    )
    .await
    .unwrap_err();
    let wait = retry_after(&err);
    assert!(
        err.message().contains("2 Watch streams"),
        "{}",
        err.message()
    );
    // Another token is not affected.
    let _other = watch("unlimited-secret").await.unwrap();
    // Closing a stream gives its place back (as soon as the broker sees the
    // stream reset; a client retries after the time it was given).
    drop(first);
    let mut reopened = None;
    for _ in 0..20 {
        match broker
            .watch(with_token(WatchRequest::default(), Some("slow-secret")))
            .await
        {
            Ok(s) => {
                reopened = Some(s.into_inner());
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                // Paused time: the client waits the time it was given.
                tokio::time::advance(wait).await;
            }
        }
    }
    let mut reopened = reopened.expect("a closed Watch stream frees its place");
    reopened.message().await.unwrap().expect("a snapshot");
    server.stop().await;
}

/// Reads an HTTP/1.1 answer's head and its `Content-Length` body.
async fn http1_answer(s: &mut TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let text = String::from_utf8_lossy(&seen).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .expect("a Content-Length")
                .parse()
                .unwrap();
            if body.len() >= length {
                return text;
            }
        }
        match s.read(&mut buf).await.unwrap() {
            0 => panic!("closed before the whole answer: {text:?}"),
            n => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// curl, a browser or an HTTP probe given the gRPC port is answered in
/// HTTP/1.1, at once, with where to go (not reset without a word); short
/// request lines too (fewer bytes than HTTP/2's preface). gRPC is served
/// as before.
#[tokio::test(start_paused = true)]
async fn an_http1_request_on_the_grpc_port_is_told_where_the_http_port_is() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start(&config("")).await;
    for request in [
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
        "GET / HTTP/1.0\r\n\r\n",
        "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        "POST /quota.v1.QuotaBroker/Acquire HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    ] {
        let answer = clock_held("an HTTP/1 request answered at once", async {
            let mut s = TcpStream::connect(server.addr).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            http1_answer(&mut s).await
        })
        .await;
        assert!(answer.starts_with("HTTP/1.1 505 "), "{request:?}: {answer}");
        for said in [
            "Connection: close",
            "Content-Type: text/plain",
            "gRPC port",
            "HTTP/2",
            "server.http_listen",
        ] {
            assert!(answer.contains(said), "{said:?} not in {answer}");
        }
    }
    // The connection ends with a close, not a reset, though the broker
    // read only the request's first bytes: the client reads it all.
    let all = clock_held("the answer, then the close", async {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n")
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.expect("closed, not reset");
        String::from_utf8(all).unwrap()
    })
    .await;
    assert!(all.starts_with("HTTP/1.1 505 "), "{all}");
    assert!(all.ends_with("(server.http_listen)\n"), "{all}");
    let client = channel_from(server.addr, "127.0.0.1").await;
    acquire(&client, None).await.unwrap();
    server.stop().await;
}

/// `server.max_watch_streams` counts every caller's Watch streams and
/// dashboard feeds together, loopback's too (exempt from the per-caller
/// caps by default): one over it is refused at once, naming the setting;
/// one closed gives its place back.
#[tokio::test(start_paused = true)]
async fn watch_streams_and_event_feeds_share_the_broker_wide_cap() {
    use crate::observe::{config, get, open, start};
    let b = start(&config("max_watch_streams = 2\n")).await;
    let broker = b.client();
    let watch = || {
        let mut broker = broker.clone();
        async move {
            broker
                .watch(WatchRequest::default())
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let mut first = watch().await.unwrap();
    first.message().await.unwrap().expect("a snapshot");
    let _second = watch().await.unwrap();
    let (err, feed) = clock_held("a Watch and a feed over the cap refused at once", async {
        (
            watch().await.unwrap_err(),
            get(b.http, "/events", &[]).await,
        )
    })
    .await;
    retry_after(&err);
    assert!(
        err.message().contains("server.max_watch_streams"),
        "{}",
        err.message()
    );
    assert_eq!(feed.status, 503, "{}", feed.body);
    assert!(
        feed.body.contains("server.max_watch_streams"),
        "{}",
        feed.body
    );
    assert_eq!(feed.header("retry-after"), Some("1"));
    // A stream closed gives its place back (once the broker sees it reset).
    drop(first);
    let mut third = clock_held("a place freed by a closed Watch", async {
        loop {
            match watch().await {
                Ok(s) => break s,
                Err(e) => {
                    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                    tokio::task::yield_now().await;
                }
            }
        }
    })
    .await;
    third.message().await.unwrap().expect("a snapshot");
    // An event feed takes a place like a Watch stream.
    drop(third);
    let (_head, _feed) = clock_held("a feed in the freed place", async {
        loop {
            let (head, feed) = open(b.http, "/events", &[]).await;
            if head.status == 200 {
                break (head, feed);
            }
            assert_eq!(head.status, 503);
            tokio::task::yield_now().await;
        }
    })
    .await;
    let err = clock_held("a Watch over the cap the feed holds", watch())
        .await
        .unwrap_err();
    assert!(
        err.message().contains("server.max_watch_streams"),
        "{}",
        err.message()
    );
    b.stop().await;
}

#[test]
fn max_watch_streams_out_of_bounds_is_refused_naming_it() {
    for n in [0, 100_001] {
        let err = quota_broker::Settings::from_toml(&config(&format!("max_watch_streams = {n}\n")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "server.max_watch_streams {n} must be between 1 and 100000"
            )),
            "{err}"
        );
    }
}

/// A refused login names where it came from, on gRPC and on the event
/// feed (sampled: the first of each is logged at info).
#[tokio::test]
async fn refused_logins_are_logged_with_the_peer_address() {
    use crate::child::{temp_config, Broker};
    let path = temp_config(
        "refused-logins",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nstate_dir = \"\"\n\
             [[auth.tokens]]\nname = \"c\"\nsha256 = \"{}\"\nrole = \"client\"\ntenants = [\"t\"]\n\
             [[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\n\
             max_in_flight = 2\n",
            hash_token("right-secret")
        ),
    );
    let broker = Broker::start(&path).await;
    let _ = std::fs::remove_file(&path);
    let channel = Endpoint::from_shared(broker.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = acquire(&channel, Some("wrong-secret")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    broker
        .until_logged("refused code=Unauthenticated peer=127.0.0.1")
        .await;
    let http: SocketAddr = broker
        .http
        .as_deref()
        .expect("an HTTP port")
        .parse()
        .unwrap();
    let feed = crate::observe::get(http, "/events?token=wrong-secret", &[]).await;
    assert_eq!(feed.status, 401, "{}", feed.body);
    broker
        .until_logged("HTTP port: refused path=\"/events\" status=401 peer=127.0.0.1")
        .await;
    // Neither line echoes the token tried.
    assert!(
        !broker.logged().contains("wrong-secret"),
        "{}",
        broker.logged()
    );
}
