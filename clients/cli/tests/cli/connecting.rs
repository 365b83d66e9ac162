//! Reaching the broker: its HTTP port given for the gRPC port is named as
//! such; nothing listening, a URL with a path and one without a port are
//! each said in one line; and a broker that takes calls and never answers
//! is given up after `--timeout` for the next one given.

use super::{config, output, quotactl, stderr_line, Broker, ADMIN, LIMIT};
use quota_broker::Settings;
use serde_json::Value;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// The broker's HTTP port given for its gRPC port: hyper reads the HTTP/1
/// answer as a connection closed, which alone would read as a TLS mix-up;
/// quotactl asks the server what it speaks and says it is not the gRPC port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_http_port_given_for_its_grpc_port_is_named_as_such() {
    let settings = Settings::from_toml(&config()).expect("test config is valid");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let listeners = quota_broker::Listeners {
            grpc,
            http: Some(http),
        };
        quota_broker::serve(listeners, &settings, async {
            let _ = stopped.await;
        })
        .await
    });
    let mut c = quotactl(&["status"]);
    c.arg("--broker")
        .arg(format!("http://{http_addr}"))
        .arg("--token")
        .arg(ADMIN);
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(1));
    let line = stderr_line(&out);
    assert!(
        line.starts_with(&format!(
            "quotactl: http://{http_addr} is not a quota-broker's gRPC port: it answers in HTTP/1"
        )) && line.contains("505")
            && line.contains("server.listen")
            && !line.contains("TLS"),
        "{line}"
    );
    let _ = stop.send(());
    timeout(LIMIT, server)
        .await
        .expect("broker stops in time")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_is_one_line_and_exit_1() {
    // A port that was just free: nothing listens there any more.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut c = quotactl(&["status"]);
    c.arg("--broker").arg(format!("http://{addr}"));
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        stderr_line(&out),
        format!("quotactl: cannot reach the broker at http://{addr}: connection refused")
    );
}

/// A broker URL with a path: refused (gRPC would drop it), saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_url_with_a_path_is_refused() {
    let out = output(quotactl(&["--broker", "http://127.0.0.1:1/foo", "status"])).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a gRPC broker URL has no path or query (got /foo)"),
        "{err}"
    );
}

/// A broker URL without a port is dialled on the scheme's (80 for http://
/// or a bare host): the error says so, and which port a broker has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_url_without_a_port_says_the_port_used() {
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", 80)).is_err(),
        "this test needs nothing listening on 127.0.0.1:80, and something does: stop it"
    );
    for given in ["127.0.0.1", "http://127.0.0.1"] {
        let out = output(quotactl(&["--broker", given, "status"])).await;
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            stderr_line(&out),
            "quotactl: cannot reach the broker at http://127.0.0.1: connection refused (the URL \
             gives no port, so port 80 was used; a broker's gRPC port is 50051 unless its \
             server.listen says another: give it, like http://127.0.0.1:50051)",
            "{given}"
        );
    }
}

/// A gRPC server for both broker services that takes every call and never
/// answers it (a broker whose connections and pings are served while its
/// calls are stuck).
#[derive(Clone)]
struct Silent<const ADMIN: bool>;

impl<const ADMIN: bool> tonic::server::NamedService for Silent<ADMIN> {
    const NAME: &'static str = if ADMIN {
        "quota.v1.QuotaAdmin"
    } else {
        "quota.v1.QuotaBroker"
    };
}

impl<const ADMIN: bool> tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>>
    for Silent<ADMIN>
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Pending<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        std::future::pending()
    }
}

/// Starts a [`Silent`] server; its URL and the task serving it.
async fn silent() -> (String, JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(Silent::<true>)
            .add_service(Silent::<false>)
            .serve_with_incoming(incoming)
            .await;
    });
    (url, server)
}

#[tokio::test]
async fn a_broker_that_never_answers_is_given_up_after_the_timeout_and_the_next_tried() {
    let b = Broker::start().await;
    let (stuck, server) = silent().await;
    let brokers = format!("{stuck},{}", b.url());
    let started = tokio::time::Instant::now();
    // Both brokers, the stuck one first, 2 s for each call.
    let run = |args: &[&str]| {
        let mut c = quotactl(&["--broker", &brokers, "--token", ADMIN, "--timeout", "2"]);
        c.args(args);
        output(c)
    };
    let out = run(&[
        "pause",
        "--tenant",
        "t",
        "org",
        "--reason",
        "stuck broker",
        "--json",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let paused: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(paused["paused"], true, "{paused}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the stuck broker was given its 2 s"
    );
    // A command over every broker given says which one did not answer, and
    // shows what the other said.
    let out = run(&["status", "--json"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("quotactl: {stuck}: no answer within 2s\n")),
        "{err}"
    );
    let buckets: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let org = buckets
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["bucket"] == "org")
        .expect("bucket org listed");
    assert_eq!(org["paused"], true, "{org}");
    // Nonsense timeouts are refused before anything is sent.
    for bad in ["0", "3601", "soon"] {
        let out = b.run(Some(ADMIN), &["--timeout", bad, "status"]).await;
        assert_eq!(out.status.code(), Some(2), "--timeout {bad}");
    }
    server.abort();
    b.stop().await;
}
