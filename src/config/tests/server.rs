//! The `[server]` keys: an HTTP port set apart from the gRPC port, the
//! I/O threads, the connection limits, the TLS files given in whole pairs,
//! and a truncated PEM file (the server's or etcd's) said to be one.

use super::super::*;

#[test]
fn an_http_port_set_must_differ_from_the_grpc_port_and_the_default_is_never_refused() {
    let bucket = "[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\n\
                  routes = [\"* /**\"]\nmax_in_flight = 1\n";
    let with = |server: &str| Settings::from_toml(&format!("[server]\n{server}\n{bucket}"));
    // Left at the default, the HTTP port is best effort: a gRPC port on
    // the default's address is not the user's mistake to report.
    let s = with("listen = \"127.0.0.1:9464\"\nstate_dir = \"\"").unwrap();
    assert!(!s.server.http_listen_required);
    for (listen, http) in [
        ("127.0.0.1:7000", "127.0.0.1:7000"),
        ("0.0.0.0:7000", "127.0.0.1:7000"),
        ("127.0.0.1:7000", "0.0.0.0:7000"),
    ] {
        let e = with(&format!(
            "listen = \"{listen}\"\nhttp_listen = \"{http}\"\nstate_dir = \"\""
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("is the gRPC port"), "{listen} {http}: {e}");
    }
    let s = with("listen = \"127.0.0.1:7000\"\nhttp_listen = \"127.0.0.1:7001\"\nstate_dir = \"\"")
        .unwrap();
    assert!(s.server.http_listen_required);
}

#[test]
fn io_threads_are_one_per_cpu_for_the_program_unless_set() {
    let one = "[[tenants]]\nid = \"a\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n";
    let mut unset = Settings::from_toml(one).unwrap();
    assert_eq!(
        unset.server.io_threads, None,
        "an embedding program serves on its runtime"
    );
    unset.server.resolve_io_threads();
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(unset.server.io_threads, Some(cpus));
    let mut set = Settings::from_toml(&format!("[server]\nio_threads = 0\n{one}")).unwrap();
    set.server.resolve_io_threads();
    assert_eq!(set.server.io_threads, Some(0), "a value set is kept");
    let err = Settings::from_toml(&format!("[server]\nio_threads = 5000\n{one}")).unwrap_err();
    assert!(
        err.to_string()
            .contains("server.io_threads 5000 is over 1024"),
        "{err}"
    );
}

#[test]
fn connection_limits_and_tls_keys_are_checked() {
    let err = Settings::from_toml(
        r#"
        [server]
        handshake_timeout_ms = 50
        max_pending_connections = 0
        [server.tls]
        client_ca = "ca.pem"
        [[tenants]]
        id = "a"
        [[tenants.buckets]]
        name = "b"
        routes = ["* /**"]
        max_in_flight = 1
        "#,
    )
    .unwrap_err();
    let all = err.to_string();
    for needle in [
        "server.handshake_timeout_ms 50 must be between 100 and 60000",
        "server.max_pending_connections must be at least 1",
        "server.tls.client_ca is set without server.tls.cert",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert_eq!(err.problems.len(), 3, "{all}");
    let err = Settings::from_toml(
        "[server]\nmax_connections = 10\nmax_pending_connections = 20\n[server.tls]\ncert = \"x.pem\"\n\
         [[tenants]]\nid = \"a\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n",
    )
    .unwrap_err();
    assert_eq!(err.problems.len(), 2, "{err}");
    assert!(
        err.problems[0].contains("max_connections 10 must be at least"),
        "{err}"
    );
    assert!(
        err.problems[1].contains("server.tls.cert is set without server.tls.key"),
        "{err}"
    );
    let one = "[[tenants]]\nid = \"a\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n";
    for n in [0, 10_001] {
        let err = Settings::from_toml(&format!(
            "[server]\nmax_connections_per_address = {n}\n{one}"
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains(&format!(
                "server.max_connections_per_address {n} must be between 1 and \
                 server.max_connections 10000"
            )),
            "{err}"
        );
    }
    let small = Settings::from_toml(&format!(
        "[server]\nmax_connections = 3\n\
        max_pending_connections = 2\n{one}"
    ))
    .unwrap();
    assert_eq!(small.server.max_connections_per_address, 1);
}

/// A truncated PEM file is said to be one, naming the setting and the
/// file, not with the END line's label as a list of byte values.
#[test]
fn a_truncated_pem_file_says_its_end_line_is_missing_naming_the_setting_and_file() {
    let pki = testpki::Pki::new("config-truncated-pem");
    let truncated = |file: &str| {
        let whole = std::fs::read_to_string(pki.path(file)).unwrap();
        let cut = pki.path(&format!("cut-{file}"));
        std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
        cut.display().to_string()
    };
    let (cert, key, ca) = (
        truncated("server.pem"),
        truncated("server.key"),
        truncated("ca.pem"),
    );
    let tenants = "[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\n\
                   routes = [\"* /**\"]\nmax_in_flight = 1\n";
    let err = Settings::from_toml(&format!(
        "[server.tls]\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {ca:?}\n{tenants}"
    ))
    .unwrap_err();
    assert_eq!(
        err.problems,
        [
            format!(
                "server.tls.cert {cert}: not a valid PEM certificate file: missing the \
                 \"-----END CERTIFICATE-----\" line (a truncated file?)"
            ),
            format!(
                "server.tls.key {key}: not a valid PEM private key file: missing the \
                 \"-----END PRIVATE KEY-----\" line (a truncated file?)"
            ),
            format!(
                "server.tls.client_ca {ca}: not a valid PEM certificate file: missing the \
                 \"-----END CERTIFICATE-----\" line (a truncated file?)"
            ),
        ]
    );
    // The etcd files are read the same way.
    let err = Settings::from_toml(&format!(
        "[cluster]\netcd = [\"https://127.0.0.1:2379\"]\nnode = \"b1\"\n\
         advertise = \"http://127.0.0.1:50051\"\netcd_ca = {ca:?}\n\
         etcd_cert = {:?}\netcd_key = {key:?}\n{tenants}",
        pki.arg("client.pem")
    ))
    .unwrap_err()
    .to_string();
    for needle in [
        format!("cluster.etcd_ca {ca}: not a valid PEM certificate file: missing the"),
        format!("cluster.etcd_key {key}: not a valid PEM private key file: missing the"),
    ] {
        assert!(err.contains(&needle), "{needle}: {err}");
    }
    // A BEGIN line gone wrong is quoted clipped, however long.
    let broken = pki.path("broken.pem");
    std::fs::write(
        &broken,
        format!("-----BEGIN CERTIFICATE{}\n", "x".repeat(10_000)),
    )
    .unwrap();
    let err = Settings::from_toml(&format!(
        "[server.tls]\ncert = {:?}\nkey = {:?}\n{tenants}",
        broken.display().to_string(),
        pki.arg("server.key")
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("a -----BEGIN line that does not end in five dashes") && err.len() < 1_000,
        "{err}"
    );
}
