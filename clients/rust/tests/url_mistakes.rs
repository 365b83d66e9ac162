//! A broker URL that can never work is an error, not an outage.
//!
//! The local fallback is for a broker that is down: it paces calls until
//! the broker is back. A URL that cannot be parsed, or whose server answers
//! but is not a quota-broker's gRPC port (a broker's HTTP port, an HTTP/1
//! server, another gRPC service), is never back: the client returns
//! `ClientError::Url` / `ClientError::NotABroker` saying what to change,
//! and logs it once per address, instead of running on the fallback rate
//! for good. An outage (connection refused) still falls back. Against real
//! servers: a broker in process with its HTTP port, an HTTP/1 server, a
//! tonic gRPC server without the broker's services.

use quota_broker::{Listeners, Settings};
use quota_broker_client::{BrokerClient, Call, ClientError, FallbackSettings};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

const CONFIG: &str = r#"
[server]
state_dir = ""
shutdown_grace_ms = 2000
[[tenants]]
id = "t"
[[tenants.buckets]]
name = "org"
routes = ["* /**"]
permits = 600
window_ms = 60000
"#;

/// Bound on the broker's start.
const LIMIT: Duration = Duration::from_secs(20);

fn call() -> Call {
    Call::new("t", "GET", "/api/v2/users/me").max_wait(Duration::ZERO)
}

/// What the client logs at ERROR, while the guard lives (this thread's
/// events: the tests run on a current-thread runtime).
struct Logged {
    text: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

#[derive(Clone)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logged {
    fn errors() -> Logged {
        let text = Arc::new(Mutex::new(Vec::new()));
        let buffer = Buffer(text.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::ERROR)
            .with_ansi(false)
            .with_writer(move || buffer.clone())
            .finish();
        Logged {
            text,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    /// The ERROR lines so far.
    fn lines(&self) -> Vec<String> {
        let text = self.text.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&text)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// A broker in process with its HTTP port (metrics, dashboard, probes),
/// started; stopped when the sender is dropped.
async fn broker_with_http_port() -> (SocketAddr, SocketAddr, oneshot::Sender<()>) {
    let settings = Settings::from_toml(CONFIG).unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addrs = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let listeners = Listeners {
            grpc,
            http: Some(http),
        };
        quota_broker::serve(listeners, &settings, async {
            let _ = stopped.await;
        })
        .await
    });
    // Until the start is done its gRPC port answers UNAVAILABLE "starting".
    let client = BrokerClient::connect(&format!("http://{}", addrs.0), None).unwrap();
    assert!(client.check("t", LIMIT).await.unwrap(), "the broker serves");
    (addrs.0, addrs.1, stop)
}

/// The text and code of a `NotABroker` answer (fails the test on any other).
fn not_a_broker<T>(answer: Result<T, ClientError>) -> (String, tonic::Code) {
    match answer {
        Err(e @ ClientError::NotABroker { .. }) => {
            let text = e.to_string();
            let ClientError::NotABroker { code, .. } = e else {
                unreachable!()
            };
            (text, code)
        }
        Err(other) => panic!("expected NotABroker, got {other:?}"),
        Ok(_) => panic!("expected NotABroker, got an answer"),
    }
}

#[test]
fn a_url_that_does_not_parse_is_an_error_when_the_client_is_built() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _in = rt.enter();
    for (url, says) in [
        (
            "127.0.0.1:5oo51",
            "the port \"5oo51\" is not a number from 1 to 65535",
        ),
        ("127.0.0.1:70000", "the port \"70000\" is not a number"),
        (
            "http://127.0.0.1:5oo51",
            "the port \"5oo51\" is not a number",
        ),
        ("127.0.0.1:50051:1", "more than one ':'"),
        ("broker host:50051", "characters a host name cannot have"),
        (":50051", "no host"),
        ("[::1:50051", "no ']'"),
        ("ftp://127.0.0.1:50051", "unsupported scheme"),
        (
            "http://user:pw@127.0.0.1:50051",
            "a user name or password in the URL",
        ),
        // One bad URL in a list of brokers.
        (
            "http://127.0.0.1:50051,127.0.0.1:5oo51",
            "the port \"5oo51\"",
        ),
    ] {
        let err = BrokerClient::connect(url, None).err();
        let Some(ClientError::Url { message, .. }) = &err else {
            panic!("{url}: {err:?}");
        };
        assert!(message.contains(says), "{url}: {message}");
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        let named = url
            .rsplit(',')
            .next()
            .unwrap_or(url)
            .replace(":pw@", ":***@");
        assert!(text.contains(&named), "{text}");
        assert!(!text.contains("pw@"), "{text}");
    }
    for url in [
        "127.0.0.1:50051",
        "localhost:50051",
        "[::1]:50051",
        "http://[::1]:50051",
        "https://broker.example:443",
        "http://127.0.0.1:50051/",
    ] {
        assert!(BrokerClient::connect(url, None).is_ok(), "{url}");
    }
    // Debug, for an app's state: the brokers, never the token.
    let client = BrokerClient::connect("http://127.0.0.1:50051", Some("s3cret-token")).unwrap();
    let shown = format!("{client:?}");
    assert!(shown.contains("http://127.0.0.1:50051"), "{shown}");
    assert!(!shown.contains("s3cret"), "{shown}");
}

/// `https://` to a broker without `[server.tls]`: its port resets the TLS
/// handshake (it reads the ClientHello as a bad HTTP/2 preface), which
/// alone looks like a broker going down; asked in plaintext, it answers in
/// HTTP/2. An error saying to use http://, not the fallback rate for good.
#[tokio::test]
async fn https_to_a_plaintext_broker_is_an_error_not_an_outage() {
    let (grpc, _http, _stop) = broker_with_http_port().await;
    let url = format!("https://{grpc}");
    let client = BrokerClient::connect(&url, None).unwrap();
    let (text, _) = not_a_broker(client.acquire(&call()).await);
    assert!(
        text.contains(&format!(
            "the server at {url} is not a quota-broker's gRPC port"
        )) && text.contains("plaintext HTTP/2, not TLS")
            && text.contains("use http://"),
        "{text}"
    );
    not_a_broker(client.check("t", Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_brokers_http_port_is_an_error_not_an_outage() {
    let logged = Logged::errors();
    let (grpc, http, _stop) = broker_with_http_port().await;
    let client = BrokerClient::connect(&format!("127.0.0.1:{}", http.port()), None).unwrap();
    for _ in 0..2 {
        let (text, _) = not_a_broker(client.acquire(&call()).await);
        assert!(
            text.contains(&format!(
                "the server at http://{http} is not a quota-broker's gRPC port"
            )),
            "{text}"
        );
        assert!(text.contains("HTTP/1.1 505"), "{text}");
        assert!(text.contains("server.listen"), "{text}");
    }
    let headers = http::HeaderMap::new();
    not_a_broker(client.report(&call(), "", 200, &headers).await);
    not_a_broker(client.check("t", Duration::from_secs(5)).await);
    // Said once, loudly, for the address.
    let lines = logged.lines();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains(&format!("http://{http}")), "{lines:#?}");
    // The right port, for contrast.
    let right = BrokerClient::connect(&format!("http://{grpc}"), None).unwrap();
    assert!(!right.acquire(&call()).await.unwrap().is_fallback());
}

/// An HTTP/1 server: answers every request (HTTP/2's preface too) with a
/// 400, as most do.
async fn http1_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = conn.read(&mut request).await;
                let _ = conn
                    .write_all(
                        b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\n\
                          Content-Length: 12\r\nConnection: close\r\n\r\nbad request\n",
                    )
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_http1_server_is_an_error_not_an_outage() {
    let logged = Logged::errors();
    let addr = http1_server().await;
    let client = BrokerClient::connect(&format!("http://{addr}"), None).unwrap();
    for _ in 0..2 {
        let (text, _) = not_a_broker(client.acquire(&call()).await);
        assert!(
            text.contains("it answers in HTTP/1 (\"HTTP/1.0 400 Bad Request\")"),
            "{text}"
        );
    }
    assert_eq!(logged.lines().len(), 1, "{:#?}", logged.lines());
}

/// A gRPC server serving none of the broker's services, on an ephemeral
/// port; it stops when the sender is used or dropped.
async fn other_grpc_service() -> (
    SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(tonic::service::Routes::default())
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    (addr, stop, server)
}

#[tokio::test]
async fn another_grpc_service_is_an_error_not_an_outage() {
    let logged = Logged::errors();
    let (addr, stop, server) = other_grpc_service().await;
    let client = BrokerClient::connect(&format!("http://{addr}"), None).unwrap();
    let (text, code) = not_a_broker(client.acquire(&call()).await);
    assert_eq!(code, tonic::Code::Unimplemented);
    assert!(text.contains("another gRPC service"), "{text}");
    let headers = http::HeaderMap::new();
    not_a_broker(client.report(&call(), "", 200, &headers).await);
    assert_eq!(logged.lines().len(), 1, "{:#?}", logged.lines());
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_mistaken_url_among_brokers_is_said_once_and_the_others_serve() {
    let logged = Logged::errors();
    let (grpc, http, _stop) = broker_with_http_port().await;
    let client = BrokerClient::connect(&format!("http://{http},http://{grpc}"), None).unwrap();
    for _ in 0..3 {
        let lease = client.acquire(&call()).await.unwrap();
        assert!(!lease.is_fallback());
        assert_eq!(client.current_url(), format!("http://{grpc}"));
    }
    let lines = logged.lines();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains(&format!("http://{http}")), "{lines:#?}");
}

/// A broker in process on `addr` (gRPC only), started; the handle ends
/// once it has stopped, which sending on (or dropping) the sender asks.
async fn broker_at(addr: &str) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let settings = Settings::from_toml(CONFIG).unwrap();
    let grpc = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = grpc.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        let listeners = Listeners { grpc, http: None };
        quota_broker::serve(listeners, &settings, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let client = BrokerClient::connect(&format!("http://{addr}"), None).unwrap();
    assert!(client.check("t", LIMIT).await.unwrap(), "the broker serves");
    (addr, stop, served)
}

/// A URL found not to be a broker is passed over for a while, not for
/// good: once a broker answers there (a load balancer that misrouted
/// during a deploy), calls go to it again.
#[tokio::test]
async fn a_url_found_not_to_be_a_broker_is_tried_again_later() {
    // Another gRPC service, then a broker on the same port.
    let (first, stop_other, other) = other_grpc_service().await;
    let (second, stop_second, second_served) = broker_at("127.0.0.1:0").await;
    let fallback = FallbackSettings {
        fraction: 0.5,
        floor_per_min: 6000,
        probe_every: Duration::ZERO,
    };
    let client =
        BrokerClient::with_fallback(&format!("http://{first},http://{second}"), None, fallback)
            .unwrap();
    assert!(!client.acquire(&call()).await.unwrap().is_fallback());
    assert_eq!(client.current_url(), format!("http://{second}"));

    let _ = stop_other.send(());
    other.await.unwrap().unwrap();
    let (_, _stop_first, _) = broker_at(&first.to_string()).await;
    let _ = stop_second.send(());
    second_served.await.unwrap();
    // Passed over while the finding is fresh: with the other broker down,
    // an outage.
    let lease = client.acquire(&call()).await.unwrap();
    assert!(lease.is_fallback());
    drop(lease);
    tokio::time::pause();
    tokio::time::advance(quota_broker_client::RECHECK_NOT_A_BROKER + Duration::from_secs(1)).await;
    tokio::time::resume();
    // Falling back, the calls probe the broker in the background; one of
    // the next is the broker's.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match client.acquire(&call()).await {
            Ok(lease) if !lease.is_fallback() => break,
            Ok(_) => {}
            // The fallback's pace, refused without waiting.
            Err(ClientError::NotGranted { reason, .. }) if reason.contains("unreachable") => {}
            Err(e) => panic!("{e}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the broker now at {first} is not tried"
        );
        // The probe runs on this thread.
        tokio::task::yield_now().await;
    }
    assert_eq!(client.current_url(), format!("http://{first}"));
}

#[tokio::test]
async fn a_broker_that_refuses_connections_is_still_an_outage() {
    let logged = Logged::errors();
    // Bound, not listening: connections refused.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    let client = BrokerClient::connect(&format!("http://{addr}"), None).unwrap();
    assert!(client.acquire(&call()).await.unwrap().is_fallback());
    assert_eq!(logged.lines(), Vec::<String>::new());
}

/// A mistaken URL first in the list and the broker behind the other down:
/// an outage (the fallback), whichever URL the client is on, and every
/// call alike. (It failed every call with NotABroker when the client
/// started at the mistaken URL: the hops through the list ran out there.)
#[tokio::test]
async fn a_mistaken_url_first_and_the_broker_down_is_an_outage() {
    let wrong = http1_server().await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let down = socket.local_addr().unwrap();
    let fallback = FallbackSettings {
        fraction: 0.5,
        floor_per_min: 6000,
        probe_every: Duration::ZERO,
    };
    let client =
        BrokerClient::with_fallback(&format!("http://{wrong},http://{down}"), None, fallback)
            .unwrap();
    for k in 0..4 {
        match client.acquire(&call()).await {
            Ok(lease) => assert!(lease.is_fallback(), "call {k}"),
            // The fallback's pace, refused without waiting: an outage too.
            Err(ClientError::NotGranted { reason, .. }) if reason.contains("unreachable") => {}
            Err(e) => panic!("call {k}: {e}"),
        }
    }
    assert_eq!(client.current_url(), format!("http://{down}"));
}

/// A server that accepts connections and closes them at once, counting
/// them.
async fn closing_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            drop(conn);
        }
    });
    (addr, accepted)
}

/// Calls failing on a broker that closes their connection (one going
/// down, or over its limits) ask it what it speaks once, not once each:
/// 50 at once opened 50 more connections to it before.
#[tokio::test]
async fn failing_calls_ask_a_server_what_it_speaks_once() {
    let (addr, accepted) = closing_server().await;
    let fallback = FallbackSettings {
        fraction: 0.5,
        floor_per_min: 60_000,
        probe_every: Duration::ZERO,
    };
    let client = BrokerClient::with_fallback(&format!("http://{addr}"), None, fallback).unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let client = client.clone();
        calls.spawn(async move { client.acquire(&call()).await.map(|l| l.is_fallback()) });
    }
    while let Some(answer) = calls.join_next().await {
        match answer.unwrap() {
            Ok(fallback) => assert!(fallback),
            Err(ClientError::NotGranted { reason, .. }) if reason.contains("unreachable") => {}
            Err(e) => panic!("{e}"),
        }
    }
    let n = accepted.load(std::sync::atomic::Ordering::Relaxed);
    assert!((1..=10).contains(&n), "{n} connections for 50 calls");
}

/// A broker serving TLS, addressed with `http://`: its port answers a
/// plaintext HTTP/2 preface in TLS (an alert), which no plaintext call
/// there can get past.
#[tokio::test]
async fn a_tls_port_addressed_with_http_is_an_error_not_an_outage() {
    let logged = Logged::errors();
    let pki = testpki::Pki::new("url-mistakes");
    let toml = format!(
        "[server]\nstate_dir = \"\"\n[server.tls]\ncert = {:?}\nkey = {:?}\n\
         [[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\n\
         max_in_flight = 10\n",
        pki.path("server.pem"),
        pki.path("server.key"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broker =
        quota_broker::Embedded::spawn(listener, Settings::from_toml(&toml).unwrap()).unwrap();
    assert!(broker.started().await, "the broker started");
    let client = BrokerClient::connect(&format!("http://{}", broker.addr()), None).unwrap();
    let (text, _) = not_a_broker(client.acquire(&call()).await);
    assert!(text.contains("it answers in TLS"), "{text}");
    assert!(text.contains("use https://"), "{text}");
    assert_eq!(logged.lines().len(), 1, "{:#?}", logged.lines());
    broker.stop().await.unwrap();
}

/// A broker still starting answers its calls UNAVAILABLE "starting": an
/// outage (the fallback, said at WARN), not a mistaken URL; once it has
/// started the client is back on it. The start is held deterministically:
/// the state directory's `admin.toml` is a named pipe, which gives nothing
/// until the test writes to it.
#[tokio::test]
async fn a_broker_still_starting_is_an_outage_not_a_mistake() {
    let logged = Logged::errors();
    let dir = std::env::temp_dir().join(format!(
        "quota-broker-client-{}-held-start",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pipe = dir.join("admin.toml");
    assert!(std::process::Command::new("mkfifo")
        .arg(&pipe)
        .status()
        .unwrap()
        .success());
    let toml = CONFIG.replace("state_dir = \"\"", &format!("state_dir = {dir:?}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broker =
        quota_broker::Embedded::spawn(listener, Settings::from_toml(&toml).unwrap()).unwrap();
    let fallback = FallbackSettings {
        fraction: 0.5,
        floor_per_min: 600,
        probe_every: Duration::from_millis(100),
    };
    let client = BrokerClient::with_fallback(&broker.url(), None, fallback).unwrap();
    let lease = client.acquire(&call()).await.unwrap();
    assert!(
        lease.is_fallback(),
        "a broker still starting is away for now"
    );
    drop(lease);

    // The state directory answers: the start goes on, and the client's
    // probe finds the broker.
    let writer = tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&pipe)?
            .write_all(b"version = 1\n")
    });
    tokio::time::timeout(LIMIT, writer)
        .await
        .expect("the broker opened its admin.toml")
        .unwrap()
        .unwrap();
    assert!(broker.started().await, "the broker started");
    // Calls that may wait a second, longer than the fallback's next permit
    // takes (600 a minute, one at a time): each returns with one, or once
    // the client's probe (due every 100 ms while a call waits) finds the
    // broker and the call goes to it (which answers within that second).
    let waiting = call().max_wait(Duration::from_secs(1));
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        // A lease from the broker, or its refusal: not the fallback's.
        match client.acquire(&waiting).await {
            Ok(lease) if !lease.is_fallback() => break,
            Err(ClientError::NotGranted { reason, .. }) if !reason.contains("fallback") => break,
            // The fallback's.
            Ok(_) | Err(ClientError::NotGranted { .. }) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client stayed on the fallback once the broker had started"
        );
    }
    assert_eq!(logged.lines(), Vec::<String>::new());
    broker.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
