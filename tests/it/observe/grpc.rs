//! The gRPC port beyond the calls' answers: Acquire's own framing seen on
//! a raw HTTP/2 connection, a call whose connection broke under it, a
//! client token's view of the priority classes, reflection v1alpha and v1,
//! health per service, request ids, and JSON logs that carry them.

use super::{
    config, get, grpc_frame, open_acquire, sample, start, tokens_config, with_token, BUCKETS,
    LIMIT, TOKEN,
};
use crate::harness::req;
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use quota_broker::pb::{AcquireResponse, ReportRequest};
use tokio::net::TcpStream;

/// An answer read off a raw HTTP/2 stream: its headers, its body and its
/// trailers (none for a trailers-only answer).
async fn read_answer(
    response: h2::client::ResponseFuture,
) -> (
    tonic::codegen::http::HeaderMap,
    Vec<u8>,
    Option<tonic::codegen::http::HeaderMap>,
) {
    tokio::time::timeout(LIMIT, async {
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        let headers = response.headers().clone();
        let mut body = response.into_body();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.unwrap();
        (headers, data, trailers)
    })
    .await
    .expect("answered within the limit")
}

/// Acquire frames its own answers (src/grpc/fast.rs): seen from a client
/// other than tonic's, they are plain gRPC, and what that framing does not
/// take (compression) still gets tonic's answer.
#[tokio::test]
async fn acquire_answers_are_plain_grpc_on_the_wire() {
    let b = start(&config("")).await;
    let tcp = TcpStream::connect(b.grpc).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let frame = grpc_frame(&req("GET", "/api/v2/users/1", 0));

    // The message split over two DATA frames, the first inside the prefix.
    let mut h2 = h2.ready().await.unwrap();
    let (response, mut body) = open_acquire(&mut h2, b.grpc);
    body.send_data(frame.slice(..3), false).unwrap();
    body.send_data(frame.slice(3..), true).unwrap();
    let (headers, data, trailers) = read_answer(response).await;
    assert_eq!(headers["content-type"], "application/grpc");
    assert_eq!(headers["x-request-id"].len(), 16);
    assert!(
        !headers.contains_key("content-length"),
        "gRPC answers carry no content-length: {headers:?}"
    );
    assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
    assert_eq!(data[0], 0, "not compressed");
    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    assert_eq!(len, data.len() - 5, "one message, its length as prefixed");
    let answer = <AcquireResponse as prost::Message>::decode(&data[5..]).unwrap();
    assert!(answer.granted, "{answer:?}");
    assert_eq!(answer.buckets, ["users"]);

    // A body that ends inside its message: a trailers-only INTERNAL.
    let mut h2 = h2.ready().await.unwrap();
    let (response, mut body) = open_acquire(&mut h2, b.grpc);
    body.send_data(frame.slice(..frame.len() - 1), true)
        .unwrap();
    let (headers, data, trailers) = read_answer(response).await;
    assert_eq!(headers["grpc-status"], "13", "{headers:?}");
    assert!(data.is_empty() && trailers.is_none());

    // Compressed: tonic's answer, as for every other method (no
    // compression is enabled).
    let mut h2 = h2.ready().await.unwrap();
    let request = tonic::codegen::http::Request::post(format!(
        "http://{}/quota.v1.QuotaBroker/Acquire",
        b.grpc
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-encoding", "gzip")
    .body(())
    .unwrap();
    let (response, mut body) = h2.send_request(request, false).unwrap();
    body.send_data(frame.clone(), true).unwrap();
    let (headers, _, _) = read_answer(response).await;
    assert_eq!(headers["grpc-status"], "12", "{headers:?}");
    b.stop().await;
}

#[tokio::test]
async fn a_call_whose_connection_broke_under_its_request_is_no_refusal() {
    let b = start(&config("")).await;
    let tcp = TcpStream::connect(b.grpc).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let (_response, mut body) = open_acquire(&mut h2, b.grpc);
    // Half the message, then the connection goes.
    let frame = grpc_frame(&req("GET", "/api/v2/users/1", 0));
    body.send_data(frame.slice(..frame.len() / 2), false)
        .unwrap();
    tokio::task::yield_now().await;
    body.send_reset(h2::Reason::INTERNAL_ERROR);
    drop(h2);
    connection.abort();
    let acquire = "/quota.v1.QuotaBroker/Acquire";
    let text = tokio::time::timeout(LIMIT, async {
        loop {
            let text = get(b.http, "/metrics", &[]).await.body;
            let done = sample(
                &text,
                &format!("quota_broker_rpc_duration_seconds_count{{method=\"{acquire}\"}}"),
            );
            if done.is_some_and(|n| n >= 1.0) {
                break text;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the broken call ended");
    assert!(
        !text.contains("quota_broker_rpc_refusals_total{"),
        "counted as a refusal:\n{text}"
    );
    b.stop().await;
}

#[tokio::test]
async fn a_client_token_lists_the_classes_of_its_tenants_only() {
    let b = start(&config(&tokens_config())).await;
    let list = |tenant: &str| {
        let request = with_token(
            quota_broker::pb::ListPriorityClassesRequest {
                tenant: tenant.into(),
            },
            TOKEN,
        );
        let mut admin = b.admin();
        async move { admin.list_priority_classes(request).await }
    };
    let mine = list("t").await.unwrap().into_inner();
    assert!(!mine.classes.is_empty());
    assert_eq!(
        list("u").await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    b.stop().await;
}

#[tokio::test]
async fn reflection_answers_v1alpha_and_v1() {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as V1alpha;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as AlphaResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest as AlphaMessage;

    let b = start(&config("")).await;
    let mut alpha = V1alpha::new(b.channel.clone());
    let ask = AlphaMessage {
        host: String::new(),
        message_request: Some(AlphaRequest::ListServices(String::new())),
    };
    let mut answers = alpha
        .server_reflection_info(tokio_stream::iter([ask]))
        .await
        .expect("v1alpha reflection is served")
        .into_inner();
    let answer = answers.message().await.unwrap().expect("one answer");
    let Some(AlphaResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for name in [
        "quota.v1.QuotaBroker",
        "quota.v1.QuotaAdmin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.contains(&name), "{name} not in {names:?}");
    }

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient as V1;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut v1 = V1::new(b.channel.clone());
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = v1
        .server_reflection_info(tokio_stream::iter([ask]))
        .await
        .expect("v1 reflection is still served")
        .into_inner();
    let answer = answers.message().await.unwrap().expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for name in [
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(names.contains(&name), "{name} not in {names:?}");
    }
    b.stop().await;
}

#[tokio::test]
async fn health_is_reported_per_service() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let b = start(&config("")).await;
    let mut health = HealthClient::new(b.channel.clone());
    for service in [
        "",
        "quota.v1.QuotaBroker",
        "quota.v1.QuotaAdmin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "quota.v1.Nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    b.stop().await;
}

#[tokio::test]
async fn a_request_id_comes_back_in_the_response_metadata() {
    let b = start(&config("")).await;
    let mut client = b.client();
    let mut given = tonic::Request::new(req("GET", "/api/v2/users/1", 0));
    given
        .metadata_mut()
        .insert("x-request-id", "call-42.a_b".parse().unwrap());
    let r = client.acquire(given).await.unwrap();
    assert_eq!(
        r.metadata().get("x-request-id").unwrap().to_str().unwrap(),
        "call-42.a_b"
    );
    // None given, or one too long or with other characters: a new one.
    for given in [None, Some("x".repeat(65)), Some("has space".to_owned())] {
        let mut request = tonic::Request::new(req("GET", "/api/v2/users/1", 0));
        if let Some(id) = &given {
            request
                .metadata_mut()
                .insert("x-request-id", id.parse().unwrap());
        }
        let r = client.acquire(request).await.unwrap();
        let id = r.metadata().get("x-request-id").unwrap().to_str().unwrap();
        assert_eq!(id.len(), 16, "{id}");
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
    }
    // Errors carry it too.
    let mut bad = tonic::Request::new(req("GET", "/api/v2/users/1", 0));
    bad.get_mut().tenant = "nope".into();
    bad.metadata_mut()
        .insert("x-request-id", "failing-1".parse().unwrap());
    let e = client.acquire(bad).await.unwrap_err();
    assert_eq!(
        e.metadata().get("x-request-id").unwrap().to_str().unwrap(),
        "failing-1"
    );
    b.stop().await;
}

/// The binary with `log_format = "json"`: every line is a JSON object, and
/// a line logged inside an RPC carries that RPC's request id.
#[tokio::test]
async fn json_logs_carry_the_request_id() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let path = super::child::temp_config(
        "json-logs",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"\"\nlog_format = \"json\"\n\
             state_dir = \"\"\n[[auth.tokens]]\nname = \"wallboard-7\"\nsha256 = \"{}\"\n\
             role = \"client\"\ntenants = [\"t\"]\n[[tenants]]\nid = \"t\"\n{BUCKETS}\
             [[tenants.buckets]]\nname = \"per-client\"\nscope = \"oauth_client\"\n\
             routes = [\"GET /api/v2/analytics/**\"]\npermits = 60\nwindow_ms = 60000\n",
            quota_broker::hash_token("s3cret-wallboard")
        ),
    );
    let bearer: tonic::metadata::MetadataValue<_> = "Bearer s3cret-wallboard".parse().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_quota-broker"))
        .arg("--config")
        .arg(&path)
        // The RPC layer's own info lines off, as in a quieter production
        // set-up (its refusals kept): the request id must still reach the
        // lines logged below it.
        .env(
            "RUST_LOG",
            "info,quota_broker::grpc=warn,quota_broker::grpc::observe=info",
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let result = async {
        let mut addr = None;
        while addr.is_none() {
            let line = lines
                .recv()
                .await
                .expect("the broker logged before exiting");
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            addr = v["fields"]["listen"].as_str().map(str::to_owned);
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", addr.unwrap()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        // Its calls are answered once health says SERVING (its "broker
        // started" line is below this test's log level).
        crate::harness::serving(&channel).await;
        let mut client = QuotaBrokerClient::new(channel);
        let mut report = tonic::Request::new(ReportRequest {
            tenant: "t".into(),
            method: "GET".into(),
            path: "/api/v2/users/1".into(),
            http_status: 429,
            retry_after_ms: 5_000,
            ..Default::default()
        });
        report
            .metadata_mut()
            .insert("x-request-id", "report-7".parse().unwrap());
        report
            .metadata_mut()
            .insert("authorization", bearer.clone());
        client.report(report).await.unwrap();
        let frozen = loop {
            let line = lines.recv().await.expect("the freeze was logged");
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            let message = v["fields"]["message"].as_str().unwrap_or_default();
            if message.contains("frozen") {
                break v;
            }
        };
        // A refused call is logged under the id its caller got back.
        let mut bad = tonic::Request::new(req("GET", "/api/v2/users/1", 0));
        bad.get_mut().tenant = "nope".into();
        bad.metadata_mut()
            .insert("x-request-id", "refused-9".parse().unwrap());
        bad.metadata_mut().insert("authorization", bearer.clone());
        let e = client.acquire(bad).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        let refused = loop {
            let line = lines.recv().await.expect("the refusal was logged");
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            if v["fields"]["message"] == "refused" {
                break v;
            }
        };
        // A client repeating a mistake is not a line per call: 50 more
        // refusals in well under a second, then a longer freeze as a
        // marker, log at most a few lines between.
        for _ in 0..50 {
            let mut bad = tonic::Request::new(req("GET", "/api/v2/users/1", 0));
            bad.get_mut().tenant = "nope".into();
            bad.metadata_mut().insert("authorization", bearer.clone());
            assert!(client.acquire(bad).await.is_err());
        }
        let mut marker = tonic::Request::new(ReportRequest {
            tenant: "t".into(),
            method: "GET".into(),
            path: "/api/v2/users/1".into(),
            http_status: 429,
            retry_after_ms: 50_000,
            ..Default::default()
        });
        marker
            .metadata_mut()
            .insert("authorization", bearer.clone());
        client.report(marker).await.unwrap();
        let mut repeated = 0;
        loop {
            let line = lines.recv().await.expect("the marker was logged");
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            let message = v["fields"]["message"].as_str().unwrap_or_default();
            if message.contains("frozen") {
                break;
            }
            repeated += usize::from(message == "refused");
        }
        assert!(repeated <= 4, "{repeated} lines for 50 refusals");
        // A per-OAuth-client bucket's freeze names the OAuth client.
        let mut one_client = tonic::Request::new(ReportRequest {
            tenant: "t".into(),
            method: "GET".into(),
            path: "/api/v2/analytics/users/details/query".into(),
            oauth_client: "wfm-sync".into(),
            http_status: 429,
            retry_after_ms: 5_000,
            ..Default::default()
        });
        one_client
            .metadata_mut()
            .insert("authorization", bearer.clone());
        client.report(one_client).await.unwrap();
        let per_client = loop {
            let line = lines
                .recv()
                .await
                .expect("the per-client freeze was logged");
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            let message = v["fields"]["message"].as_str().unwrap_or_default();
            if message.contains("frozen") {
                break v;
            }
        };
        (frozen, refused, per_client)
    };
    let outcome = tokio::time::timeout(LIMIT, result).await;
    // Stopped before any assertion: a failing test leaves no broker behind.
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let _ = std::fs::remove_file(&path);
    let (v, refused, per_client) = outcome.expect("the JSON log lines came within the limit");
    assert_eq!(per_client["fields"]["bucket"], "per-client", "{per_client}");
    assert_eq!(
        per_client["fields"]["oauth_client"], "wfm-sync",
        "{per_client}"
    );
    assert!(
        per_client["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("this OAuth client")),
        "{per_client}"
    );
    assert_eq!(v["span"]["request_id"], "report-7", "{v}");
    assert_eq!(v["span"]["method"], "/quota.v1.QuotaBroker/Report", "{v}");
    // Whose token froze the bucket.
    assert_eq!(v["span"]["token"], "wallboard-7", "{v}");
    assert_eq!(refused["span"]["request_id"], "refused-9", "{refused}");
    assert_eq!(refused["fields"]["code"], "PermissionDenied", "{refused}");
    assert_eq!(refused["span"]["token"], "wallboard-7", "{refused}");
    assert!(
        refused["fields"]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "the refusal says why: {refused}"
    );
}
