//! LeaseStream: many operations on one bidirectional stream.

use crate::harness::{config, req, start};
use quota_broker::hash_token;
use quota_broker::pb::lease_stream_request::Op;
use quota_broker::pb::lease_stream_response::Result as Answer;
use quota_broker::pb::{
    LeaseStreamRequest, LeaseStreamResponse, ReleaseRequest, RenewRequest, ReportRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Streaming};

const ONE_SLOT: &str = "[[tenants.buckets]]\nname = \"slots\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\nlease_ttl_ms = 60000\n";

/// An open LeaseStream: send requests with `send`, read answers with `next`.
struct Session {
    tx: mpsc::Sender<LeaseStreamRequest>,
    rx: Streaming<LeaseStreamResponse>,
}

impl Session {
    async fn open(
        client: &mut quota_broker::pb::quota_broker_client::QuotaBrokerClient<
            tonic::transport::Channel,
        >,
    ) -> Session {
        let (tx, rx) = mpsc::channel(16);
        let rx = client
            .lease_stream(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Session { tx, rx }
    }

    async fn send(&self, id: u64, op: Op) {
        self.tx
            .send(LeaseStreamRequest { id, op: Some(op) })
            .await
            .unwrap();
    }

    async fn next(&mut self) -> (u64, Answer) {
        let m = self
            .rx
            .message()
            .await
            .unwrap()
            .expect("stream ended early");
        (m.id, m.result.expect("an answer carries a result"))
    }
}

fn acquire(max_wait_ms: u64) -> Op {
    Op::Acquire(req("GET", "/api/v2/users", max_wait_ms))
}

#[tokio::test(start_paused = true)]
async fn pipelined_operations_answer_by_id_and_errors_keep_the_stream() {
    let b = start(&config(ONE_SLOT)).await;
    let mut s = Session::open(&mut b.client.clone()).await;

    s.send(1, acquire(0)).await;
    let (id, a) = s.next().await;
    assert_eq!(id, 1);
    let Answer::Acquire(g) = a else {
        panic!("expected an acquire answer, got {a:?}")
    };
    assert!(g.granted && g.lease_ttl_ms > 0, "{g:?}");

    // Renew, report and a failing acquire are answered in turn on the same stream.
    s.send(
        2,
        Op::Renew(RenewRequest {
            lease_id: g.lease_id.clone(),
            extend_ms: 5000,
            ..Default::default()
        }),
    )
    .await;
    let mut bad = req("GET", "/x", 0);
    bad.tenant = "nope".into();
    s.send(3, Op::Acquire(bad)).await;
    s.send(
        4,
        Op::Report(ReportRequest {
            tenant: "t".into(),
            lease_id: g.lease_id.clone(),
            method: "GET".into(),
            path: "/api/v2/users".into(),
            http_status: 200,
            ..Default::default()
        }),
    )
    .await;
    s.tx.send(LeaseStreamRequest { id: 5, op: None })
        .await
        .unwrap();
    s.send(
        6,
        Op::Release(ReleaseRequest {
            lease_id: g.lease_id.clone(),
            ..Default::default()
        }),
    )
    .await;

    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(s.next().await);
    }
    answers.sort_by_key(|(id, _)| *id);
    assert!(
        matches!(&answers[0], (2, Answer::Renew(r)) if r.lease_ttl_ms == 5000),
        "{:?}",
        answers[0]
    );
    assert!(
        matches!(&answers[1], (3, Answer::Error(e)) if e.code == Code::NotFound as i32 && e.message.contains("nope")),
        "{:?}",
        answers[1]
    );
    assert!(
        matches!(&answers[2], (4, Answer::Report(r)) if r.buckets == ["slots"]),
        "{:?}",
        answers[2]
    );
    assert!(
        matches!(&answers[3], (5, Answer::Error(e)) if e.code == Code::InvalidArgument as i32 && e.message.contains("op")),
        "{:?}",
        answers[3]
    );
    assert!(
        matches!(&answers[4], (6, Answer::Release(r)) if r.released),
        "{:?}",
        answers[4]
    );

    // The slot is free again: a new acquire on the stream is granted at once.
    s.send(7, acquire(0)).await;
    assert!(matches!(s.next().await, (7, Answer::Acquire(g)) if g.granted));
    drop(s);
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_waiting_acquire_does_not_hold_up_a_release_behind_it() {
    let b = start(&config(ONE_SLOT)).await;
    let mut s = Session::open(&mut b.client.clone()).await;
    s.send(1, acquire(0)).await;
    let (_, Answer::Acquire(first)) = s.next().await else {
        panic!("expected an acquire answer")
    };
    assert!(first.granted);

    // 2 waits for the only slot; 3 releases it. 3 is answered first, then 2.
    s.send(2, acquire(10_000)).await;
    s.send(
        3,
        Op::Release(ReleaseRequest {
            lease_id: first.lease_id,
            ..Default::default()
        }),
    )
    .await;
    let (id, a) = s.next().await;
    assert!(
        matches!((id, &a), (3, Answer::Release(r)) if r.released),
        "{id} {a:?}"
    );
    let (id, a) = s.next().await;
    assert!(
        matches!((id, &a), (2, Answer::Acquire(g)) if g.granted),
        "{id} {a:?}"
    );
    drop(s);
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_acquire_with_the_id_of_a_waiting_one_is_refused() {
    let b = start(&config(ONE_SLOT)).await;
    let mut s = Session::open(&mut b.client.clone()).await;
    s.send(1, acquire(0)).await;
    let (_, Answer::Acquire(first)) = s.next().await else {
        panic!("expected an acquire answer")
    };
    s.send(2, acquire(10_000)).await;
    // The same id again while 2 waits: refused, and 2 still answered.
    s.send(2, acquire(10_000)).await;
    let (id, a) = s.next().await;
    assert!(
        matches!((id, &a), (2, Answer::Error(e))
            if e.code == Code::InvalidArgument as i32 && e.message.contains("already waiting")),
        "{id} {a:?}"
    );
    s.send(
        3,
        Op::Release(ReleaseRequest {
            lease_id: first.lease_id,
            ..Default::default()
        }),
    )
    .await;
    assert!(matches!(s.next().await, (3, Answer::Release(r)) if r.released));
    assert!(matches!(s.next().await, (2, Answer::Acquire(g)) if g.granted));
    drop(s);
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn leases_of_a_stream_that_ends_are_released() {
    let b = start(&config(ONE_SLOT)).await;
    let mut s = Session::open(&mut b.client.clone()).await;
    s.send(1, acquire(0)).await;
    assert!(matches!(s.next().await, (1, Answer::Acquire(g)) if g.granted));
    // A waiter on the same slot, outside the stream.
    let waiter = {
        let mut c = b.client.clone();
        tokio::spawn(async move {
            c.acquire(req("GET", "/x", 10_000))
                .await
                .unwrap()
                .into_inner()
        })
    };
    // The sidecar goes away without releasing: its lease must not hold the
    // slot for the whole 60 s TTL.
    drop(s);
    let g = waiter.await.unwrap();
    assert!(g.granted, "the stream's lease was not released: {g:?}");

    // A client that closes its side cleanly gets its answers, then its
    // leases are released too.
    let waiter = {
        let mut c = b.client.clone();
        let lease = g.lease_id.clone();
        tokio::spawn(async move {
            c.release(ReleaseRequest {
                lease_id: lease,
                ..Default::default()
            })
            .await
            .unwrap();
        })
    };
    waiter.await.unwrap();
    let s = Session::open(&mut b.client.clone()).await;
    s.send(1, acquire(0)).await;
    let Session { tx, mut rx } = s;
    drop(tx);
    let m = rx.message().await.unwrap().unwrap();
    assert!(
        matches!(m.result, Some(Answer::Acquire(ref g)) if g.granted),
        "{m:?}"
    );
    assert!(
        rx.message().await.unwrap().is_none(),
        "the stream ends after its last answer"
    );
    let again = b.acquire(req("GET", "/x", 10_000)).await;
    assert!(again.granted, "{again:?}");
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_stream_needs_a_token_and_each_operation_the_tenant() {
    let token = |name: &str, tenants: &str| {
        format!(
            "[[auth.tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nrole = \"client\"\ntenants = {tenants}\n",
            hash_token(&format!("secret-{name}"))
        )
    };
    let b = start(&format!(
        "[server]\nstate_dir = \"\"\n{}[[tenants]]\nid = \"t\"\n{ONE_SLOT}[[tenants]]\nid = \"u\"\n{ONE_SLOT}",
        token("u-client", "[\"u\"]")
    ))
    .await;
    let (_tx, rx) = mpsc::channel::<LeaseStreamRequest>(1);
    let err = b
        .client
        .clone()
        .lease_stream(ReceiverStream::new(rx))
        .await
        .expect_err("a stream without a token is refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    let (tx, rx) = mpsc::channel(4);
    let mut r = Request::new(ReceiverStream::new(rx));
    r.metadata_mut()
        .insert("authorization", "Bearer secret-u-client".parse().unwrap());
    let mut answers = b.client.clone().lease_stream(r).await.unwrap().into_inner();
    tx.send(LeaseStreamRequest {
        id: 9,
        op: Some(acquire(0)),
    })
    .await
    .unwrap();
    let m = answers.message().await.unwrap().unwrap();
    assert!(
        matches!(m.result, Some(Answer::Error(ref e)) if e.code == Code::PermissionDenied as i32),
        "{m:?}"
    );
    drop(tx);
    b.stop().await;
}

#[tokio::test(start_paused = true)]
async fn at_shutdown_a_waiting_acquire_is_answered_and_the_stream_ends_unavailable() {
    let mut b = start(&config(ONE_SLOT)).await;
    let mut s = Session::open(&mut b.client.clone()).await;
    s.send(1, acquire(0)).await;
    let (_, Answer::Acquire(first)) = s.next().await else {
        panic!("expected an acquire answer")
    };
    assert!(first.granted);
    s.send(2, acquire(60_000)).await;
    // The acquire is in the queue before the broker stops.
    for _ in 0..1000 {
        if b.bucket("slots").await.waiting.values().sum::<u32>() > 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(b.bucket("slots").await.waiting.values().sum::<u32>(), 1);
    b.trigger_stop();
    let (id, a) = s.next().await;
    assert_eq!(id, 2);
    let Answer::Error(e) = a else {
        panic!("the waiting acquire was not refused: {a:?}")
    };
    assert_eq!(e.code, Code::Unavailable as i32, "{e:?}");
    let end = s.rx.message().await.expect_err("the stream ended OK");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    b.join().await;
}

#[tokio::test(start_paused = true)]
async fn a_message_over_the_size_limit_ends_the_stream_with_its_error() {
    let b = start(&config(ONE_SLOT)).await;
    let mut s = Session::open(&mut b.client.clone()).await;
    s.send(1, acquire(60_000)).await;
    let (_, Answer::Acquire(first)) = s.next().await else {
        panic!("expected an acquire answer")
    };
    assert!(first.granted);
    // 2 waits; 3 is too large to decode.
    s.send(2, acquire(60_000)).await;
    let mut huge = ReportRequest {
        tenant: "t".into(),
        method: "GET".into(),
        path: "/api/v2/users".into(),
        http_status: 200,
        ..Default::default()
    };
    huge.headers.insert("x-padding".into(), "x".repeat(100_000));
    s.send(3, Op::Report(huge)).await;
    let (id, a) = s.next().await;
    assert!(
        matches!((id, &a), (2, Answer::Error(e)) if e.code != Code::Ok as i32),
        "{id} {a:?}"
    );
    let end = s.rx.message().await.expect_err("the stream ended OK");
    assert!(
        matches!(end.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{end:?}"
    );
    drop(s);
    b.stop().await;
}

/// A graceful stop ends every stream, but it is the broker that goes, not
/// the caller, whose calls upstream may still run: the streams' leases stay
/// held, are recorded with the others, and keep their slots on the next
/// start.
#[tokio::test]
async fn a_streams_leases_keep_their_slots_across_a_graceful_restart() {
    let dir = crate::harness::fresh_dir("stream-stop");
    let config = format!(
        "[server]\nstate_dir = \"{}\"\nshutdown_grace_ms = 1000\n[[tenants]]\nid = \"t\"\n\
         [[tenants.buckets]]\nname = \"slots\"\nroutes = [\"* /**\"]\nmax_in_flight = 2\n\
         lease_ttl_ms = 60000\n",
        dir.display()
    );
    let b = crate::observe::start(&config).await;
    let mut s = Session::open(&mut b.client()).await;
    s.send(1, acquire(0)).await;
    let (_, a) = s.next().await;
    assert!(matches!(&a, Answer::Acquire(g) if g.granted), "{a:?}");
    b.stop().await;

    let b = crate::observe::start(&config).await;
    let mut c = b.client();
    let first = c.acquire(req("GET", "/x", 0)).await.unwrap().into_inner();
    let second = c.acquire(req("GET", "/x", 0)).await.unwrap().into_inner();
    b.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(first.granted, "{}", first.reason);
    assert!(
        !second.granted,
        "the stream's lease lost its slot in the restart"
    );
}
