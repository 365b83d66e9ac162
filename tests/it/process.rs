//! The `quota-broker` binary itself: config errors, serving, SIGTERM.

use crate::child::{temp_config, Broker};
use quota_broker::pb::quota_broker_client::QuotaBrokerClient;
use std::process::Command;

/// Runs the broker on the config file at `path` (then removed), which it
/// must refuse with exit status 2; returns what it printed on stderr.
fn refused_config(path: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_quota-broker"))
        .arg("--config")
        .arg(path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(path);
    assert_eq!(out.status.code(), Some(2));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_config_exits_non_zero_listing_every_problem() {
    let path = temp_config(
        "bad",
        "[server]\nlisten = \"nope\"\n[[tenants]]\nid = \"a\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"GET x\"]\n",
    );
    let err = refused_config(&path);
    assert!(err.contains("server.listen \"nope\""), "{err}");
    assert!(err.contains("route \"GET x\""), "{err}");
    assert!(err.contains("limits nothing"), "{err}");
}

#[test]
fn a_state_dir_it_cannot_write_exits_2_naming_it() {
    // A directory below a regular file can never be created.
    let file = temp_config("not-a-dir", "");
    let dir = file.join("state");
    let path = temp_config(
        "state-dir",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nstate_dir = {:?}\n[[tenants]]\nid = \"t\"\n\
             [[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 2\n",
            dir.to_str().unwrap()
        ),
    );
    let err = refused_config(&path);
    let _ = std::fs::remove_file(&file);
    assert!(err.contains("server.state_dir"), "{err}");
    assert!(err.contains("cannot write there"), "{err}");
}

/// Runs the broker on the config file at `path` (then removed), with
/// `rust_log` as `RUST_LOG` if given, which must exit 1 (a port it cannot
/// listen on); returns what it printed on stderr.
fn fails_to_listen(path: &std::path::Path, rust_log: Option<&str>) -> String {
    let mut broker = Command::new(env!("CARGO_BIN_EXE_quota-broker"));
    broker.arg("--config").arg(path);
    if let Some(filter) = rust_log {
        broker.env("RUST_LOG", filter);
    }
    let out = broker.output().unwrap();
    let _ = std::fs::remove_file(path);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    err
}

#[test]
fn an_http_port_asked_for_must_be_bound_and_differ_from_the_grpc_port() {
    // Held here: the broker must not serve with probes and scrapes going
    // to whatever holds its configured HTTP port.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let path = temp_config(
        "http-taken",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:{port}\"\n\
             state_dir = \"\"\n[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\n\
             routes = [\"* /**\"]\nmax_in_flight = 2\n"
        ),
    );
    let err = fails_to_listen(&path, None);
    drop(taken);
    assert!(
        err.contains(&format!(
            "cannot listen on server.http_listen 127.0.0.1:{port}"
        )),
        "{err}"
    );
    // The same port for both is a config error, found before anything binds.
    let path = temp_config(
        "http-same",
        "[server]\nlisten = \"127.0.0.1:50999\"\nhttp_listen = \"127.0.0.1:50999\"\n\
         state_dir = \"\"\n[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\n\
         routes = [\"* /**\"]\nmax_in_flight = 2\n",
    );
    let err = refused_config(&path);
    assert!(err.contains("is the gRPC port"), "{err}");
}

/// A gRPC port another process holds: exit 1 saying how to pick another;
/// and a `RUST_LOG` that does not parse is said, not silently dropped.
#[test]
fn a_taken_grpc_port_says_how_to_move_and_a_bad_log_filter_is_said() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let path = temp_config(
        "grpc-taken",
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nhttp_listen = \"\"\nstate_dir = \"\"\n\
             [[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\n\
             max_in_flight = 2\n"
        ),
    );
    let err = fails_to_listen(&path, Some("quota_broker=[nope"));
    drop(taken);
    assert!(
        err.contains(&format!("cannot listen on server.listen 127.0.0.1:{port}"))
            && err.contains("QUOTA_BROKER__SERVER__LISTEN"),
        "{err}"
    );
    assert!(
        err.contains("RUST_LOG cannot be read: logging at info"),
        "{err}"
    );
}

/// `hash-token` with `input` on stdin: exit status, stdout, stderr.
fn hash_token(input: &[u8]) -> (Option<i32>, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_quota-broker"))
        .arg("hash-token")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It may stop reading early (too much): a broken pipe is its answer.
    let _ = child.stdin.take().unwrap().write_all(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn hash_token_hashes_one_token_and_refuses_anything_else() {
    let abc = quota_broker::hash_token("abc");
    for input in [&b"abc"[..], b"abc\n", b"  abc \r\n"] {
        let (code, out, err) = hash_token(input);
        assert_eq!((code, out), (Some(0), format!("{abc}\n")));
        // Hashed, and warned of: a short token is guessed from its hash.
        assert!(err.contains("warning: the token is 3 characters"), "{err}");
    }
    for (input, says) in [
        (&b""[..], "no token on stdin"),
        (b" \n", "no token on stdin"),
        (b"a\nb\n", "more than one line"),
        (&[b'x'; 5000][..], "more than 4096 bytes"),
    ] {
        let (code, out, err) = hash_token(input);
        assert_eq!(code, Some(2), "{err}");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.starts_with("quota-broker: hash-token: ") && err.contains(says),
            "{err}"
        );
        assert!(err.len() < 200, "{err}");
    }
}

#[test]
fn a_config_path_it_cannot_read_is_named_clipped() {
    let path = std::env::temp_dir().join("p".repeat(5000));
    let out = Command::new(env!("CARGO_BIN_EXE_quota-broker"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot read config file"), "{err}");
    assert!(err.len() < 600, "{} bytes: {err}", err.len());
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_quota-broker"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // clap's usage line ("Usage: quota-broker [OPTIONS] [COMMAND]").
    assert!(String::from_utf8_lossy(&out.stderr)
        .to_lowercase()
        .contains("usage: quota-broker"));
}

#[cfg(unix)]
#[tokio::test]
async fn serves_then_exits_zero_on_sigterm() {
    let path = temp_config(
        "ok",
        "[server]\nlisten = \"127.0.0.1:0\"\nstate_dir = \"\"\n[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 2\n",
    );
    let broker = Broker::start(&path).await;
    // A reload signal out of habit does not end it (its default action).
    broker.signal("-HUP");
    let mut client = QuotaBrokerClient::connect(broker.url()).await.unwrap();
    let r = client
        .acquire(quota_broker::pb::AcquireRequest {
            tenant: "t".into(),
            client_id: "it".into(),
            method: "GET".into(),
            path: "/x".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.granted);
    let (status, log) = broker.terminate().await;
    let _ = std::fs::remove_file(&path);
    assert!(status.success(), "exit {status:?}\n{log}");
    assert!(log.contains("shutdown requested"), "{log}");
    assert!(log.contains("SIGHUP ignored"), "{log}");
    assert!(log.contains("broker stopped"), "{log}");
}

/// Whatever reads the broker's log may go away (`quota-broker | head`, a
/// log shipper restarting): the log lines it can no longer write are
/// dropped, and the broker serves and stops as before, never exiting 101
/// on a panic about a closed stderr.
#[cfg(unix)]
#[tokio::test]
async fn a_closed_stderr_does_not_take_the_broker_down() {
    let path = temp_config(
        "closed-stderr",
        "[server]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"\"\nstate_dir = \"\"\n[[tenants]]\n\
         id = \"t\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 2\n",
    );
    let broker = Broker::start_closing_log(&path).await;
    // A line logged at once (its default action ignored, and said so).
    broker.signal("-HUP");
    let mut client = QuotaBrokerClient::connect(broker.url()).await.unwrap();
    let acquire = quota_broker::pb::AcquireRequest {
        tenant: "t".into(),
        client_id: "it".into(),
        method: "GET".into(),
        path: "/x".into(),
        ..Default::default()
    };
    for _ in 0..2 {
        assert!(
            client
                .acquire(acquire.clone())
                .await
                .unwrap()
                .into_inner()
                .granted
        );
    }
    // The stop logs several lines, on the main thread.
    let (status, _) = broker.terminate().await;
    let _ = std::fs::remove_file(&path);
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// With many tenants the log does not grow a line (or a word) per tenant:
/// the startup line names ten and counts the rest, and a start after a
/// graceful stop says so once, not once a tenant.
#[cfg(unix)]
#[tokio::test]
async fn many_tenants_do_not_make_log_lines_per_tenant() {
    let dir = std::env::temp_dir().join(format!("quota-broker-{}-many", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"\"\nstate_dir = \"{}\"\n",
        dir.display()
    );
    for t in 0..25 {
        config.push_str(&format!(
            "[[tenants]]\nid = \"tenant-{t}\"\n[[tenants.buckets]]\nname = \"b\"\n\
             routes = [\"* /**\"]\nmax_in_flight = 2\n"
        ));
    }
    let path = temp_config("many", &config);
    let (status, _) = Broker::start(&path).await.terminate().await;
    assert!(status.success());
    let (status, log) = Broker::start(&path).await.terminate().await;
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.success(), "{log}");
    let serving = log
        .lines()
        .find(|l| l.contains("quota-broker serving"))
        .expect("a startup line");
    assert!(serving.contains("and 15 more"), "{serving}");
    assert!(!serving.contains("tenant-24"), "{serving}");
    let resumed = log.matches("started after a graceful stop").count();
    assert_eq!(resumed, 1, "{log}");
    assert!(log.contains("tenants=25"), "{log}");
}
