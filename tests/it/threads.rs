//! The serving threads (`server.io_threads`): connections spread over
//! threads of their own, calls on one woken by what happens on another,
//! the handshake timeout and the drain as on the main runtime. These run on
//! the real clock: the threads' runtimes are not the test's.

use crate::harness::{closed_by_broker, config, req, start, wait_for};
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{ReleaseRequest, WatchRequest};
use std::time::Duration;
use tonic::transport::Endpoint;

const SLOT: &str = r#"
[[tenants.buckets]]
name = "slots"
routes = ["POST /q"]
max_in_flight = 1
lease_ttl_ms = 60000
"#;

/// A client on a connection of its own (the broker hands each new one to
/// the thread serving the fewest).
async fn client(addr: &str) -> QuotaBrokerClient<tonic::transport::Channel> {
    QuotaBrokerClient::new(
        Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
}

#[tokio::test]
async fn a_call_waiting_on_one_serving_thread_is_granted_by_a_release_on_another() {
    let toml = config(SLOT).replace("[server]\n", "[server]\nio_threads = 2\n");
    let b = start(&toml).await;
    let addr = b.addr().to_string();
    // The harness's connection is on one thread; these two on the others
    // in turn (the fewest served), so holder and waiter are on different
    // threads whatever the first got.
    let mut holder = client(&addr).await;
    let mut waiter = client(&addr).await;
    let first = holder
        .acquire(req("POST", "/q", 0))
        .await
        .unwrap()
        .into_inner();
    assert!(first.granted, "{}", first.reason);
    let mut watch = b.watch_all().await;
    let waiting = tokio::spawn(async move {
        waiter
            .acquire(req("POST", "/q", 30_000))
            .await
            .unwrap()
            .into_inner()
    });
    wait_for(&mut watch, |s| s.waiting.get("batch") == Some(&1)).await;
    let released = holder
        .release(ReleaseRequest {
            lease_id: first.lease_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(released.released);
    let granted = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter is answered once the slot is released, long before its 30 s wait")
        .unwrap();
    assert!(granted.granted, "{}", granted.reason);
    b.stop().await;
}

#[tokio::test]
async fn serving_threads_close_silent_connections_and_drain_on_stop() {
    let toml = config(SLOT).replace(
        "[server]\n",
        "[server]\nio_threads = 2\nhandshake_timeout_ms = 300\n",
    );
    let mut b = start(&toml).await;
    let addr = b.addr();
    // Two silent sockets, one per thread (the harness's connection holds
    // one; the fewest served get these in turn): each closed at its
    // handshake timeout by the thread it went to.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    for s in &mut silent {
        let closed = tokio::time::timeout(Duration::from_secs(10), closed_by_broker(s))
            .await
            .expect("a silent connection is closed at the handshake timeout (300 ms)");
        assert!(closed);
    }
    // A Watch on a serving thread ends when the broker stops, and the
    // server returns once every thread has drained.
    let mut stream = client(&addr.to_string())
        .await
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        stream.message().await.unwrap().is_some(),
        "the first snapshot"
    );
    b.trigger_stop();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the Watch did not end on stop");
    tokio::time::timeout(Duration::from_secs(10), b.join())
        .await
        .expect("the broker stopped within its grace");
}

/// A call still open when the shutdown grace is over (here a request whose
/// body never ends) does not keep its serving thread: the thread ends at
/// the grace, and the connection is closed with it. (tonic's server would
/// wait for the call for ever: a program embedding the broker kept the
/// thread and the connection.)
#[tokio::test]
async fn a_call_open_past_the_shutdown_grace_is_closed_with_its_thread() {
    let toml = config(SLOT)
        .replace("shutdown_grace_ms = 2000", "shutdown_grace_ms = 300")
        .replace("[server]\n", "[server]\nio_threads = 2\n");
    assert!(toml.contains("shutdown_grace_ms = 300"), "{toml}");
    let mut b = start(&toml).await;
    let addr = b.addr();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let request =
        tonic::codegen::http::Request::post(format!("http://{addr}/quota.v1.QuotaBroker/Acquire"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
    // Its body is never sent, nor ended.
    let (open, _body) = h2.send_request(request.clone(), false).unwrap();
    // A whole call after it on the same connection: answered, so the open
    // one's headers reached the broker before it.
    let mut h2 = h2.ready().await.unwrap();
    let (answered, mut body) = h2.send_request(request, false).unwrap();
    let mut frame = vec![0u8];
    let message = prost::Message::encode_to_vec(&req("POST", "/q", 0));
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);
    body.send_data(frame.into(), true).unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), answered)
        .await
        .expect("a whole call is answered")
        .unwrap();
    assert_eq!(answered.status(), 200);
    b.trigger_stop();
    tokio::time::timeout(Duration::from_secs(10), b.join())
        .await
        .expect("the broker stopped at its grace (300 ms), the open call unfinished");
    // The open call's thread is gone, and its connection closed with it.
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the connection is closed once the grace is over")
        .unwrap()
        .ok();
    tokio::time::timeout(Duration::from_secs(10), open)
        .await
        .expect("the open call ends with its connection")
        .ok();
}
