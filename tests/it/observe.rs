//! Observability: the HTTP port (/metrics, the event feed, probes),
//! reflection v1alpha, per-service health, request ids and JSON logs.

mod alerts;
mod feed;
mod grpc;
mod http_port;
mod metrics;
mod probes;

// `super::child::temp_config`, as the JSON-log test in `grpc` names it.
use super::child;
use quota_broker::pb::quota_admin_client::QuotaAdminClient;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::{Listeners, Settings};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

/// Bound on every wait of these tests.
pub(super) const LIMIT: Duration = Duration::from_secs(20);

pub struct Observed {
    pub channel: Channel,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), quota_broker::ServerError>>,
}

impl Observed {
    pub fn client(&self) -> QuotaBrokerClient<Channel> {
        QuotaBrokerClient::new(self.channel.clone())
    }

    pub fn admin(&self) -> QuotaAdminClient<Channel> {
        QuotaAdminClient::new(self.channel.clone())
    }

    /// Asks the broker to shut down, without waiting for it.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub async fn stop(mut self) {
        self.signal_stop();
        tokio::time::timeout(LIMIT, &mut self.server)
            .await
            .expect("the broker stops within the limit")
            .unwrap()
            .unwrap();
    }
}

/// A broker with its HTTP port, both on ephemeral loopback ports.
pub async fn start(toml: &str) -> Observed {
    let settings = Settings::from_toml(toml).expect("test config is valid");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let listeners = Listeners {
        grpc,
        http: Some(http),
    };
    let server = tokio::spawn(async move {
        quota_broker::serve(listeners, &settings, async {
            let _ = stopped.await;
        })
        .await
    });
    let channel = Endpoint::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Health says SERVING once both ports serve the broker's routes.
    super::harness::serving(&channel).await;
    Observed {
        channel,
        grpc: grpc_addr,
        http: http_addr,
        stop: Some(stop),
        server,
    }
}

pub(super) const BUCKETS: &str =
    "[[tenants.buckets]]\nname = \"users\"\nroutes = [\"GET /api/v2/users/**\"]\n\
                       permits = 2\nwindow_ms = 60000\nmax_in_flight = 5\n";

pub fn config(extra: &str) -> String {
    format!(
        "[server]\nshutdown_grace_ms = 2000\nstate_dir = \"\"\n{extra}\n[[tenants]]\nid = \"t\"\n{BUCKETS}\
         [[tenants]]\nid = \"u\"\n{BUCKETS}"
    )
}

/// An HTTP/1.1 response: status, headers (lower-case names), body.
pub struct HttpResponse {
    pub status: u16,
    headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends a GET and reads the status line and headers; the body stays in the
/// reader (bodies are read by [`get`] or as an event stream). Written by
/// hand: the test needs one GET and a chunked event stream, not an HTTP
/// client's dependencies.
pub async fn open(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (HttpResponse, BufReader<TcpStream>) {
    send(addr, "GET", path, headers).await
}

/// [`open`] with any method (no body).
pub(super) async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (HttpResponse, BufReader<TcpStream>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The test's own Host header, if it gives one.
    let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if method != "GET" {
        request.push_str("Content-Length: 0\r\n");
    }
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await.unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP status line: {line:?}"));
    let mut response = HttpResponse {
        status,
        headers: Vec::new(),
        body: String::new(),
    };
    loop {
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            response
                .headers
                .push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    (response, reader)
}

/// Reads one chunk of a chunked body (`None` at its end).
pub(super) async fn chunk(reader: &mut BufReader<TcpStream>) -> Option<String> {
    let mut size = String::new();
    reader.read_line(&mut size).await.ok()?;
    let n = usize::from_str_radix(size.trim(), 16).ok()?;
    if n == 0 {
        return None;
    }
    let mut data = vec![0; n + 2];
    reader.read_exact(&mut data).await.ok()?;
    data.truncate(n);
    String::from_utf8(data).ok()
}

pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    tokio::time::timeout(LIMIT, async {
        let (mut response, mut reader) = open(addr, path, headers).await;
        if response.header("transfer-encoding") == Some("chunked") {
            while let Some(c) = chunk(&mut reader).await {
                response.body.push_str(&c);
            }
        } else {
            reader.read_to_string(&mut response.body).await.unwrap();
        }
        response
    })
    .await
    .expect("the HTTP answer came within the limit")
}

/// The value of the sample `name{labels}` in a metrics text, if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A gRPC message frame: uncompressed, length-prefixed.
pub(super) fn grpc_frame(message: &impl prost::Message) -> bytes::Bytes {
    let body = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&body);
    frame.into()
}

/// A unary Acquire on a raw HTTP/2 connection, its request body not yet
/// sent (end of stream not set).
pub(super) fn open_acquire(
    h2: &mut h2::client::SendRequest<bytes::Bytes>,
    grpc: SocketAddr,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let request =
        tonic::codegen::http::Request::post(format!("http://{grpc}/quota.v1.QuotaBroker/Acquire"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
    h2.send_request(request, false).unwrap()
}

pub const TOKEN: &str = "t-only-token";

pub fn tokens_config() -> String {
    format!(
        "[[auth.tokens]]\nname = \"t-reader\"\nsha256 = \"{}\"\nrole = \"client\"\ntenants = [\"t\"]\n",
        quota_broker::hash_token(TOKEN)
    )
}

/// `message` as a call with `authorization: Bearer <token>`.
pub(super) fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Reads server-sent events until one of `kind` satisfies `pred`.
pub async fn next_of(
    reader: &mut BufReader<TcpStream>,
    kind: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let kind = format!("event: {kind}");
    tokio::time::timeout(LIMIT, async {
        let mut pending = String::new();
        loop {
            let c = chunk(reader).await.expect("the event feed ended early");
            pending.push_str(&c);
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                let data = event
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .filter(|_| event.lines().any(|l| l == kind))
                    .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok());
                if let Some(v) = data.filter(|v| pred(v)) {
                    return v;
                }
            }
        }
    })
    .await
    .expect("the expected event came within the limit")
}
