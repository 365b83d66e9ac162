//! The `--driver h2` caller of `loadgen peer`: the requests of the raw
//! driver (encoded once, before the run), sent through the h2 crate
//! directly (the HTTP/2 layer under hyper and tonic) instead of tonic's
//! client, whose channel hands every call to a buffer task and back.
//!
//! A lighter driver leaves more of a shared machine to the server, and
//! pinned to its own core it runs out later than the server does, so
//! calls/s says more about the server and less about the client.
//!
//! The gRPC framing is written here: a 5-byte message prefix, the headers
//! every gRPC client sends (`content-type`, `te: trailers`), and the
//! status read from the trailers (or from the headers of a trailers-only
//! answer). An answer counts as allowed as in the raw driver.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use tokio::net::TcpStream;
use tonic::codegen::http::{self, HeaderMap, HeaderValue, Method, Request, Uri};
use tonic::{Code, Status};

use crate::error::Error;
use crate::raw::ALLOWED;

/// Opens `n` HTTP/2 connections to `addr`, each driven by its own task.
pub(crate) async fn connect(addr: SocketAddr, n: usize) -> Result<Vec<SendRequest<Bytes>>, Error> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(Error::io(format!("connect to {addr}")))?;
        tcp.set_nodelay(true)
            .map_err(Error::io("set TCP_NODELAY".to_owned()))?;
        let (send, conn) = h2::client::handshake(tcp)
            .await
            .map_err(|e| Error::Rpc(h2_status(e)))?;
        tokio::spawn(async move {
            // Ends when every SendRequest is dropped or the server closes.
            let _ = conn.await;
        });
        conns.push(send);
    }
    Ok(conns)
}

/// One server's RPC with its requests framed, one per key.
#[derive(Clone)]
pub(crate) struct Framed {
    uri: Uri,
    requests: Arc<[Bytes]>,
}

impl Framed {
    /// `encode(key)` for each of `keys` keys, with the gRPC message prefix,
    /// for `path` on `addr`.
    pub(crate) fn new(
        addr: SocketAddr,
        path: &str,
        keys: usize,
        encode: impl Fn(usize) -> Vec<u8>,
    ) -> Result<Framed, Status> {
        let uri: Uri = format!("http://{addr}{path}")
            .parse()
            .map_err(|e| Status::invalid_argument(format!("bad URI for {path}: {e}")))?;
        let requests = (0..keys.max(1))
            .map(|k| frame(&encode(k)))
            .collect::<Result<_, _>>()?;
        Ok(Framed { uri, requests })
    }
}

/// `message` with the gRPC length prefix (uncompressed).
fn frame(message: &[u8]) -> Result<Bytes, Status> {
    let len =
        u32::try_from(message.len()).map_err(|_| Status::invalid_argument("message over 4 GiB"))?;
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(len);
    out.put_slice(message);
    Ok(out.freeze())
}

/// Calls one server over one HTTP/2 connection with framed requests.
pub(crate) struct H2Caller {
    send: SendRequest<Bytes>,
    framed: Framed,
}

impl H2Caller {
    pub(crate) fn new(send: SendRequest<Bytes>, framed: Framed) -> H2Caller {
        H2Caller { send, framed }
    }

    /// One call on key `key`; Err on a transport error, a non-OK status or
    /// a refusal.
    pub(crate) async fn call(&mut self, key: usize) -> Result<(), Status> {
        let requests = &self.framed.requests;
        let body = requests[key % requests.len()].clone();
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.framed.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(())
            .map_err(|e| Status::internal(format!("cannot build the request: {e}")))?;
        poll_fn(|cx| self.send.poll_ready(cx))
            .await
            .map_err(h2_status)?;
        let (response, mut stream) = self.send.send_request(request, false).map_err(h2_status)?;
        stream.send_data(body, true).map_err(h2_status)?;
        let response = response.await.map_err(h2_status)?;
        if response.status() != http::StatusCode::OK {
            return Err(Status::unknown(format!("HTTP {}", response.status())));
        }
        // A trailers-only answer (an error) has its status in the headers.
        if let Some(status) = grpc_status(response.headers()) {
            return status;
        }
        let mut body = response.into_body();
        let mut answer = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(h2_status)?;
            let _ = body.flow_control().release_capacity(chunk.len());
            answer.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.map_err(h2_status)?;
        match trailers.as_ref().and_then(grpc_status) {
            Some(Ok(())) => {}
            Some(err) => return err,
            None => return Err(Status::internal("answer without grpc-status")),
        }
        // The message after its 5-byte prefix.
        if answer.get(5..).is_some_and(|m| m.starts_with(&ALLOWED)) {
            Ok(())
        } else {
            Err(Status::resource_exhausted("not allowed"))
        }
    }
}

/// The `grpc-status` in `headers`, if there is one: Ok for 0 (tonic's
/// parser, so the driver reads statuses as tonic's client does).
fn grpc_status(headers: &HeaderMap<HeaderValue>) -> Option<Result<(), Status>> {
    let status = Status::from_header_map(headers)?;
    Some(match status.code() {
        Code::Ok => Ok(()),
        _ => Err(status),
    })
}

fn h2_status(e: h2::Error) -> Status {
    Status::unavailable(format!("HTTP/2: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The driver against a real broker: a grant, a refusal (an answer with
    /// `granted = false`) and an error (a trailers-only answer).
    #[tokio::test]
    async fn calls_a_real_broker_and_reads_grants_refusals_and_errors() {
        use prost::Message;
        use quota_broker::pb::AcquireRequest;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let settings = quota_broker::Settings::from_toml(
            "[server]\nstate_dir = \"\"\n[[tenants]]\nid = \"t0\"\n[[tenants.buckets]]\n\
             name = \"rate\"\nroutes = [\"* /**\"]\npermits = 1\nwindow_ms = 60000\n",
        )
        .unwrap();
        let broker = quota_broker::Embedded::spawn(listener, settings).unwrap();
        assert!(broker.started().await, "the broker did not start");
        let addr = broker.addr();
        let conns = connect(addr, 1).await.unwrap();
        let acquire = |tenant: &'static str| {
            move |_| {
                AcquireRequest {
                    tenant: tenant.into(),
                    client_id: "h2drive".into(),
                    method: "GET".into(),
                    path: "/api/v2/users".into(),
                    max_wait_ms: Some(0),
                    ..Default::default()
                }
                .encode_to_vec()
            }
        };
        let path = "/quota.v1.QuotaBroker/Acquire";
        let framed = Framed::new(addr, path, 1, acquire("t0")).unwrap();
        let mut caller = H2Caller::new(conns[0].clone(), framed);
        caller.call(0).await.unwrap();
        let refused = caller.call(0).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert_eq!(refused.message(), "not allowed");
        let framed = Framed::new(addr, path, 1, acquire("nope")).unwrap();
        let mut caller = H2Caller::new(conns[0].clone(), framed);
        let error = caller.call(0).await.unwrap_err();
        assert_eq!(error.code(), Code::NotFound, "{error:?}");
        assert!(error.message().contains("nope"), "{error:?}");
        broker.stop().await.unwrap();
    }

    #[test]
    fn a_frame_is_the_uncompressed_flag_the_length_and_the_message() {
        let framed = frame(b"abc").unwrap();
        assert_eq!(&framed[..], &[0, 0, 0, 0, 3, b'a', b'b', b'c']);
    }

    #[test]
    fn the_status_comes_from_grpc_status_and_grpc_message() {
        let mut h = HeaderMap::new();
        assert!(grpc_status(&h).is_none());
        h.insert("grpc-status", HeaderValue::from_static("0"));
        assert!(matches!(grpc_status(&h), Some(Ok(()))));
        h.insert("grpc-status", HeaderValue::from_static("8"));
        h.insert("grpc-message", HeaderValue::from_static("slow down"));
        let err = grpc_status(&h).unwrap().unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert_eq!(err.message(), "slow down");
    }
}
