//! The `--driver raw` caller of `loadgen peer`: requests encoded once,
//! before the run, and answers taken as bytes, so the driver spends the
//! same on either server and calls/s compares the servers rather than the
//! cost of building and parsing their messages.
//!
//! Only protobuf encoding and decoding are left out; the HTTP/2 and gRPC
//! framing is tonic's client as in the typed driver. An answer counts as
//! allowed when it starts with field 1 set to true (`granted` in the
//! broker's `AcquireResponse`, `allowed` in the peer's `ThrottleResponse`;
//! prost writes fields in tag order), which is all the typed driver checks.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::Status;

/// Field 1, varint, value 1: `granted = true` / `allowed = true`.
pub(crate) const ALLOWED: [u8; 2] = [0x08, 0x01];

/// Passes bytes through both ways.
#[derive(Clone, Copy, Default)]
struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> BytesCodec {
        BytesCodec
    }

    fn decoder(&mut self) -> BytesCodec {
        BytesCodec
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// One server's RPC with its requests already encoded, one per key.
#[derive(Clone)]
pub(crate) struct Encoded {
    path: PathAndQuery,
    requests: Arc<[Bytes]>,
}

impl Encoded {
    /// `encode(key)` for each of `keys` keys, sent to `path`.
    pub(crate) fn new(path: &'static str, keys: usize, encode: impl Fn(usize) -> Vec<u8>) -> Self {
        Encoded {
            path: PathAndQuery::from_static(path),
            requests: (0..keys.max(1)).map(|k| Bytes::from(encode(k))).collect(),
        }
    }
}

/// Calls one server with pre-encoded requests.
pub(crate) struct RawCaller {
    grpc: tonic::client::Grpc<Channel>,
    encoded: Encoded,
}

impl RawCaller {
    pub(crate) fn new(channel: Channel, encoded: Encoded) -> RawCaller {
        RawCaller {
            grpc: tonic::client::Grpc::new(channel),
            encoded,
        }
    }

    /// One call on key `key`; Err on a transport error or a refusal.
    pub(crate) async fn call(&mut self, key: usize) -> Result<(), Status> {
        let requests = &self.encoded.requests;
        let body = requests[key % requests.len()].clone();
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let answer = self
            .grpc
            .unary(
                tonic::Request::new(body),
                self.encoded.path.clone(),
                BytesCodec,
            )
            .await?
            .into_inner();
        if answer.starts_with(&ALLOWED) {
            Ok(())
        } else {
            Err(Status::resource_exhausted("not allowed"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use quota_broker::pb::AcquireResponse;

    #[test]
    fn a_granted_answer_starts_with_field_one_true() {
        let granted = AcquireResponse {
            granted: true,
            lease_id: "t0-1-ab".into(),
            permits: 1,
            ..Default::default()
        };
        assert!(granted.encode_to_vec().starts_with(&ALLOWED));
        let refused = AcquireResponse {
            granted: false,
            reason: "wait".into(),
            ..Default::default()
        };
        assert!(!refused.encode_to_vec().starts_with(&ALLOWED));
    }
}
