//! Unit tests of the settings: the embedded default, every key's checks
//! and their messages, the environment over the file, and file errors.

use super::*;
use std::path::Path;

#[test]
fn embedded_default_is_valid_and_has_the_documented_buckets() {
    let s = Settings::embedded_default().unwrap();
    assert_eq!(s.server.listen, "127.0.0.1:50051".parse().unwrap());
    let demo = &s.tenants[0];
    assert_eq!(demo.id, "demo");
    let names: Vec<_> = demo.buckets.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["per-client", "analytics-query", "analytics-jobs"]);
    let per_client = &demo.buckets[0];
    assert_eq!(per_client.scope, Scope::OauthClient);
    let rate = per_client.rate.unwrap();
    assert_eq!(rate.per_minute(), 300.0);
    let query = &demo.buckets[1];
    assert!(query.rate.is_some() && query.max_in_flight.is_some());
    assert!(demo.buckets[2].max_in_flight.is_some());
}

#[test]
fn the_cluster_example_is_valid_and_bad_cluster_keys_are_listed() {
    let s = Settings::from_toml(include_str!("../../examples/cluster-node.toml")).unwrap();
    let c = s.cluster.unwrap();
    assert_eq!(
        (c.node.as_str(), c.prefix.as_str()),
        ("b1", "/quota-broker")
    );
    assert_eq!(
        (c.lease_ttl, c.safety_margin),
        (Duration::from_secs(5), Duration::from_secs(1))
    );
    let bad = Settings::from_toml(
        "[cluster]\netcd = [\"127.0.0.1:2379\"]\nnode = \"a/b\"\nadvertise = \"x\"\n\
         lease_ttl_ms = 2500\nsafety_margin_ms = 2000\n[[tenants]]\nid = \"t\"\n\
         [[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n",
    )
    .unwrap_err()
    .to_string();
    for key in [
        "cluster.etcd",
        "cluster.node",
        "cluster.advertise",
        "cluster.lease_ttl_ms",
        "cluster.safety_margin_ms",
    ] {
        assert!(bad.contains(key), "{key} missing from: {bad}");
    }
    // A URL without a host would be sent to callers as the leader's.
    let no_host = Settings::from_toml(
        "[cluster]\netcd = [\"http://127.0.0.1:2379\"]\nnode = \"b1\"\n\
         advertise = \"http://\"\n[[tenants]]\nid = \"t\"\n\
         [[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        no_host.contains(
            "cluster.advertise \"http://\" must be the URL clients reach this broker at, e.g."
        ),
        "{no_host}"
    );
    // Nor one with a path, which the clients refuse to follow.
    let path = Settings::from_toml(
        "[cluster]\netcd = [\"http://127.0.0.1:2379\"]\nnode = \"b1\"\n\
         advertise = \"http://10.0.0.5:50051/broker\"\n[[tenants]]\nid = \"t\"\n\
         [[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n",
    )
    .unwrap_err()
    .to_string();
    assert!(path.contains("no path"), "{path}");
    // Nor a URL of thousands of bytes, sent with every redirect.
    let long = Settings::from_toml(&format!(
        "[cluster]\netcd = [\"http://127.0.0.1:2379\"]\nnode = \"b1\"\n\
         advertise = \"http://{}:50051\"\n[[tenants]]\nid = \"t\"\n\
         [[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n",
        "h".repeat(5000)
    ))
    .unwrap_err()
    .to_string();
    assert!(long.contains("is 5013 bytes long"), "{long}");
    assert!(long.len() < 1_000, "{long}");
}

/// A TTL in hours left a crashed leader's tenants without a leader for
/// that long, while every other broker said it was ready.
#[test]
fn a_lease_ttl_past_a_minute_is_refused_saying_what_a_crash_costs() {
    let node = |keys: &str| {
        Settings::from_toml(&format!(
            "[cluster]\netcd = [\"http://127.0.0.1:2379\"]\nnode = \"b1\"\n\
             advertise = \"http://127.0.0.1:50051\"\n{keys}\n[[tenants]]\nid = \"t\"\n\
             [[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n"
        ))
    };
    let err = node("lease_ttl_ms = 3600000000").unwrap_err();
    assert_eq!(
        err.problems,
        [
            "cluster.lease_ttl_ms 3600000000 must be at most 60000 (a minute): a leader's \
          crash leaves its tenants without a leader for up to this long"
        ]
    );
    let err = node("lease_ttl_ms = 61000").unwrap_err().to_string();
    assert!(err.contains("must be at most 60000"), "{err}");
    let ttl = node("lease_ttl_ms = 60000")
        .unwrap()
        .cluster
        .unwrap()
        .lease_ttl;
    assert_eq!(ttl, Duration::from_secs(60));
    // The lower bound as before, and a margin past any sum: a problem,
    // not an overflow.
    let err = node("lease_ttl_ms = 1500").unwrap_err().to_string();
    assert!(err.contains("whole seconds, at least 2000"), "{err}");
    let err = node("safety_margin_ms = 9223372036854775807")
        .unwrap_err()
        .to_string();
    assert!(err.contains("cluster.safety_margin_ms"), "{err}");
}

/// A list key is set from the environment comma-separated, and a
/// number no key can hold is said to be out of range, not of the wrong
/// type.
#[test]
fn the_environment_sets_lists_comma_separated_and_says_when_a_number_is_out_of_range() {
    let env = |extra: &[(&str, &str)]| {
        let mut env = vec![
            (
                "QUOTA_BROKER__CLUSTER__ETCD",
                " http://127.0.0.1:2379, http://127.0.0.2:2379 ,",
            ),
            ("QUOTA_BROKER__CLUSTER__NODE", "b1"),
            ("QUOTA_BROKER__CLUSTER__ADVERTISE", "http://127.0.0.1:50051"),
        ];
        env.extend_from_slice(extra);
        env.into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect::<Vec<_>>()
    };
    let c = Settings::load(None, env(&[])).unwrap().cluster.unwrap();
    assert_eq!(c.etcd, ["http://127.0.0.1:2379", "http://127.0.0.2:2379"]);
    let one = [("QUOTA_BROKER__CLUSTER__ETCD", "https://etcd.internal:2379")];
    let err = Settings::load(None, env(&one)).unwrap_err().to_string();
    // Read as a list of one: what is missing is its CA, not a sequence.
    assert!(!err.contains("sequence"), "{err}");
    assert!(
        err.contains("set cluster.etcd_ca")
            && err.contains("(set by the environment variable QUOTA_BROKER__CLUSTER__ETCD)"),
        "{err}"
    );
    let none = [("QUOTA_BROKER__CLUSTER__ETCD", "")];
    let err = Settings::load(None, env(&none)).unwrap_err().to_string();
    assert!(
        err.contains("cluster.etcd is empty")
            && err.contains("(set by the environment variable QUOTA_BROKER__CLUSTER__ETCD)"),
        "{err}"
    );
    let huge = [(
        "QUOTA_BROKER__CLUSTER__LEASE_TTL_MS",
        "99999999999999999999",
    )];
    let err = Settings::load(None, env(&huge)).unwrap_err();
    assert_eq!(
        err.problems,
        [
            "cluster.lease_ttl_ms: 99999999999999999999 is out of range for this key (it takes \
          whole numbers from 0 to 9223372036854775807) (set by the environment variable \
          QUOTA_BROKER__CLUSTER__LEASE_TTL_MS)"
        ]
    );
    let below = [(
        "QUOTA_BROKER__CLUSTER__LEASE_TTL_MS",
        "-99999999999999999999",
    )];
    let err = Settings::load(None, env(&below)).unwrap_err().to_string();
    assert!(
        err.contains("-99999999999999999999 is out of range"),
        "{err}"
    );
    // A fraction is of the wrong type still, and a long value is clipped.
    let fraction = [("QUOTA_BROKER__CLUSTER__LEASE_TTL_MS", "2.5")];
    let err = Settings::load(None, env(&fraction))
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid type: floating point"), "{err}");
    let long = "9".repeat(5_000);
    let err = Settings::load(None, env(&[("QUOTA_BROKER__CLUSTER__LEASE_TTL_MS", &long)]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("out of range") && err.len() < 600, "{err}");
    // The same from a file: a number past the key's type.
    let err = Settings::from_toml("[server]\nmax_connections = 99999999999\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "server.max_connections: 99999999999 is out of range for this key (it takes whole \
             numbers from 0 to 4294967295)"
        ),
        "{err}"
    );
}

/// A broker serving TLS that advertises a plaintext URL would redirect
/// clients to its TLS port in plaintext.
#[test]
fn a_tls_broker_advertises_an_https_url() {
    let pki = testpki::Pki::new("config-advertise-tls");
    let node = |advertise: &str| {
        Settings::from_toml(&format!(
            "[server]
[server.tls]
cert = {:?}
key = {:?}
             [cluster]
etcd = [\"http://127.0.0.1:2379\"]
node = \"b1\"
             advertise = \"{advertise}\"
[[tenants]]
id = \"t\"
             [[tenants.buckets]]
name = \"b\"
routes = [\"* /**\"]
max_in_flight = 1
",
            pki.arg("server.pem"),
            pki.arg("server.key"),
        ))
    };
    let err = node("http://127.0.0.1:50051").unwrap_err().to_string();
    assert!(err.contains("advertise \"https://…\""), "{err}");
    assert!(node("https://127.0.0.1:50051").is_ok());
}

#[test]
fn etcd_over_tls_needs_its_ca_and_whole_pairs_of_files() {
    let pki = testpki::Pki::new("config-etcd-tls");
    let node = |etcd: &str, files: &str| {
        Settings::from_toml(&format!(
            "[cluster]\netcd = [{etcd}]\nnode = \"b1\"\n\
             advertise = \"http://127.0.0.1:50051\"\n{files}\n[[tenants]]\nid = \"t\"\n\
             [[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n"
        ))
    };
    let https = "\"https://127.0.0.1:2379\", \"https://127.0.0.2:2379\"";
    let ca = format!("etcd_ca = {:?}", pki.arg("ca.pem"));
    let pair = format!(
        "{ca}\netcd_cert = {:?}\netcd_key = {:?}",
        pki.arg("client.pem"),
        pki.arg("client.key")
    );
    let tls = node(https, &pair)
        .unwrap()
        .cluster
        .unwrap()
        .etcd_tls
        .unwrap();
    assert!(tls.identity.is_some());
    let tls = node(https, &ca).unwrap().cluster.unwrap().etcd_tls.unwrap();
    assert!(tls.identity.is_none());
    assert_eq!(
        node("\"http://127.0.0.1:2379\"", "")
            .unwrap()
            .cluster
            .unwrap()
            .etcd_tls,
        None
    );
    for (etcd, files, says) in [
        (https, String::new(), "set cluster.etcd_ca"),
        (
            "\"http://127.0.0.1:2379\"",
            ca.clone(),
            "the endpoints are http://",
        ),
        (
            "\"http://127.0.0.1:2379\", \"https://127.0.0.1:2380\"",
            ca.clone(),
            "mixes http:// and https://",
        ),
        (
            https,
            format!("{ca}\netcd_cert = {:?}", pki.arg("client.pem")),
            "etcd_cert is set without cluster.etcd_key",
        ),
        (
            https,
            "etcd_ca = \"/nonexistent/ca.pem\"".to_owned(),
            "cluster.etcd_ca: cannot read /nonexistent/ca.pem",
        ),
        (
            https,
            format!("etcd_ca = {:?}", pki.arg("client.key")),
            "no PEM certificate found",
        ),
        (
            https,
            format!(
                "{ca}\netcd_cert = {:?}\netcd_key = {:?}",
                pki.arg("client.pem"),
                pki.arg("ca.pem")
            ),
            "cluster.etcd_key",
        ),
        (
            "\"https://\"",
            ca.clone(),
            "is not an http:// or https:// URL",
        ),
        (
            https,
            format!(
                "{ca}\netcd_cert = {:?}\netcd_key = {:?}",
                pki.arg("client.pem"),
                pki.arg("server.key")
            ),
            "cluster.etcd_key does not fit cluster.etcd_cert",
        ),
        (
            "\"https://127.0.0.1:2379 \"",
            ca.clone(),
            "is not an http:// or https:// URL",
        ),
    ] {
        let err = node(etcd, &files).unwrap_err().to_string();
        assert!(err.contains(says), "{etcd} {files}: {err}");
    }
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

#[test]
fn two_tenants_whose_lease_id_tags_collide_are_refused() {
    let mut seen: std::collections::HashMap<u32, String> = std::collections::HashMap::new();
    let (a, b) = (0u64..)
        .find_map(|n| {
            let id = format!("org-{n}");
            let tag = crate::limits::tenant_tag(&id);
            seen.insert(tag, id.clone()).map(|other| (other, id))
        })
        .unwrap();
    let tenant = |id: &str| {
        format!(
            "[[tenants]]\nid = \"{id}\"\n[[tenants.buckets]]\nname = \"b\"\n\
             routes = [\"* /**\"]\nmax_in_flight = 1\n"
        )
    };
    let err = Settings::from_toml(&(tenant(&a) + &tenant(&b)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("has the same lease-id tag as"), "{err}");
}

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
fn every_problem_is_listed() {
    let err = Settings::from_toml(
        r#"
        [server]
        listen = "nowhere"
        [[tenants]]
        id = "a"
        [[tenants.buckets]]
        name = "x"
        routes = ["FETCH"]
        permits = 0
        window_ms = 1000
        [[tenants.buckets]]
        name = "x"
        routes = ["GET /a"]
        [[tenants]]
        id = "a"
        "#,
    )
    .unwrap_err();
    let all = err.to_string();
    for needle in [
        "server.listen \"nowhere\"",
        "route \"FETCH\"",
        "permits must be above 0",
        "name \"x\" is used twice",
        "limits nothing",
        "id \"a\" is used twice",
        "has no [[tenants.buckets]]",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert_eq!(err.problems.len(), 7, "{all}");
}

#[test]
fn embedded_default_is_plaintext_open_with_the_documented_limits() {
    let s = Settings::embedded_default().unwrap();
    assert!(s.server.tls.is_none());
    assert!(s.tokens.is_empty());
    assert_eq!(s.server.handshake_timeout, Duration::from_millis(5000));
    assert_eq!(s.server.max_pending_connections, 256);
    assert_eq!(s.server.max_connections, 10_000);
    assert_eq!(s.server.max_connections_per_address, 2_500);
    assert_eq!(s.overload, OverloadSettings::default());
    // Leaving the keys out gives the same.
    let bare = Settings::from_toml(
        "[[tenants]]\nid = \"a\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n",
    )
    .unwrap();
    assert_eq!(bare.overload, s.overload);
    assert_eq!(bare.server.handshake_timeout, s.server.handshake_timeout);
    assert_eq!(bare.server.max_connections, s.server.max_connections);
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

#[test]
fn every_type_error_and_unknown_key_is_listed() {
    let err = Settings::from_toml(
        r#"
        [server]
        max_wait_ms = "soon"
        listen_on = "127.0.0.1:1"
        [learning]
        beta = "a lot"
        [[tenants]]
        id = "a"
        colour = "blue"
        [[tenants.buckets]]
        name = "x"
        routes = ["* /**"]
        permits = "sixty"
        window_ms = 60000
        [[tenants.buckets]]
        name = "y"
        routes = ["* /**"]
        max_in_flight = -1
        lease_ttl = 5
        "#,
    )
    .unwrap_err();
    let all = err.to_string();
    for needle in [
        "server.max_wait_ms",
        "server.listen_on",
        "learning.beta",
        "tenants[0].colour",
        "tenants[0].buckets[0].permits",
        "tenants[0].buckets[1].max_in_flight",
        "tenants[0].buckets[1].lease_ttl",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert_eq!(err.problems.len(), 7, "{all}");
}

proptest::proptest! {
    /// Whatever a config file holds, loading it answers (settings or a
    /// list of problems) and never panics.
    #[test]
    fn loading_any_document_never_panics(doc in "(\\[[a-z.]{1,12}\\]\n|[a-z_]{1,12} = (\"[a-z0-9*/ ]{0,12}\"|-?[0-9]{1,6}|true|\\[\\])\n){0,12}") {
        let _ = Settings::from_toml(&doc);
    }

    /// Nor does an arbitrary string.
    #[test]
    fn loading_any_string_never_panics(doc in proptest::prelude::any::<String>()) {
        let _ = Settings::from_toml(&doc);
    }
}

#[test]
fn unknown_keys_are_rejected() {
    let err = Settings::from_toml("[server]\nlisten_on = \"127.0.0.1:1\"\n").unwrap_err();
    assert!(err.to_string().contains("listen_on"), "{err}");
}

#[test]
fn a_long_unknown_key_is_clipped_where_it_is_named() {
    let key = "k".repeat(5_000);
    let err = Settings::from_toml(&format!("[server]\n{key} = 1\n")).unwrap_err();
    let all = err.to_string();
    assert!(all.len() < 1_000, "{} bytes: {all}", all.len());
    assert!(all.contains(&format!("server.{}…", &key[..64])), "{all}");
    assert!(all.contains("expected one of `listen`"), "{all}");
    // A value of the wrong type is quoted by serde: clipped too.
    let value = "v".repeat(5_000);
    let err = Settings::from_toml(&format!("[server]\nmax_wait_ms = \"{value}\"\n")).unwrap_err();
    let all = err.to_string();
    assert!(all.len() < 1_000, "{} bytes: {all}", all.len());
    assert!(all.contains("server.max_wait_ms: invalid type"), "{all}");
    // A long key from the environment is still said to come from there.
    let var = format!("QUOTA_BROKER__SERVER__{}", "K".repeat(200));
    let err = Settings::load(None, [(var, "1".to_owned())]).unwrap_err();
    let all = err.to_string();
    assert!(
        all.contains("(set by the environment variable QUOTA_BROKER__SERVER__KKK"),
        "{all}"
    );
    assert!(all.len() < 1_000, "{} bytes: {all}", all.len());
}

#[test]
fn env_overrides_a_key_of_the_default() {
    let env = [(
        "QUOTA_BROKER__SERVER__LISTEN".to_owned(),
        "127.0.0.1:6000".to_owned(),
    )];
    let s = Settings::load(None, env).unwrap();
    assert_eq!(s.server.listen.port(), 6000);
    let env = [(
        "QUOTA_BROKER__SERVER__MAX_WAIT_MS".to_owned(),
        "1500".to_owned(),
    )];
    let s = Settings::load(None, env).unwrap();
    assert_eq!(s.server.max_wait, Duration::from_millis(1500));
    // A string key's value that looks like a number is read as written.
    let env = [
        (
            "QUOTA_BROKER__SERVER__STATE_DIR".to_owned(),
            "0070".to_owned(),
        ),
        (
            "QUOTA_BROKER__SERVER__LOG_FORMAT".to_owned(),
            "true".to_owned(),
        ),
    ];
    let err = Settings::load(None, env).unwrap_err().to_string();
    assert!(!err.contains("state_dir"), "{err}");
    assert!(err.contains("log_format"), "{err}");
    let env = [(
        "QUOTA_BROKER__SERVER__STATE_DIR".to_owned(),
        "0070".to_owned(),
    )];
    let s = Settings::load(None, env).unwrap();
    assert_eq!(s.server.state_dir, Some(std::path::PathBuf::from("0070")));
}

#[test]
fn env_vars_meant_for_the_config_but_not_read_are_named() {
    let env = [
        ("QUOTA_BROKER_SERVER__LISTEN", "nope"),
        ("QUOTA_BROKER__SERVER__LISTEN", "127.0.0.1:1"),
        ("QUOTA_BROKER_URL", "http://127.0.0.1:1"),
        ("QUOTA_BROKER_TOKEN", "t"),
        ("QUOTA_BROKERX", "x"),
        ("PATH", "/bin"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    assert_eq!(unread_env_vars(env), ["QUOTA_BROKER_SERVER__LISTEN"]);
}

#[test]
fn a_problem_in_an_array_names_the_element_by_its_place_in_the_file() {
    let err = Settings::from_toml(
        "[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\n\
         routes = [\"GET /a\", 5, 6, \"GET /b\", 7]\npermits = 1\nwindow_ms = 1000\n",
    )
    .unwrap_err()
    .to_string();
    for at in [1, 2, 4] {
        assert!(
            err.contains(&format!("tenants[0].buckets[0].routes[{at}]: invalid type")),
            "routes[{at}]: {err}"
        );
    }
    assert!(!err.contains("routes[3]"), "{err}");
    // A missing key of the element after one set aside is still named.
    let err = Settings::from_toml(
        "[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = 5\nroutes = [\"* /**\"]\n\
         max_in_flight = 1\n[[tenants.buckets]]\nroutes = [\"* /**\"]\nmax_in_flight = 1\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("tenants[0].buckets[0].name: invalid type"),
        "{err}"
    );
    assert!(
        err.contains("tenants[0].buckets[1]: missing field `name`"),
        "{err}"
    );
}

#[test]
fn values_that_contradict_or_outlast_any_use_are_refused() {
    let err = Settings::from_toml(
        "[server]\nmax_wait_ms = 3600001\n[learning]\nprobe_hold_windows = 10\n\
         probe_max_windows = 2\n[[classes]]\nname = \"c\"\norder = 0\nweight = 1\n\
         reserve = 0.0\ndefault_max_wait_ms = 99999999999\n[scheduling]\n\
         default_class = \"c\"\n[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\n\
         name = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\nlease_ttl_ms = 999999999\n",
    )
    .unwrap_err()
    .to_string();
    for what in [
        "server.max_wait_ms 3600001 is over an hour",
        "probe_max_windows = 2 is below learning.probe_hold_windows = 10",
        "default_max_wait_ms 99999999999 is over an hour",
        "lease_ttl_ms 999999999 must be above 0 and at most an hour",
    ] {
        assert!(err.contains(what), "{what}: {err}");
    }
    // The memory turned off (0) is not a contradiction.
    assert!(Settings::from_toml(
        "[learning]\nprobe_max_windows = 0\n[[tenants]]\nid = \"t\"\n\
         [[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n"
    )
    .is_ok());
}

#[test]
fn names_with_control_characters_or_slashes_are_refused() {
    let err = Settings::from_toml(
        "[[classes]]\nname = \"a/b\"\norder = 0\n[[classes]]\nname = \"batch\"\norder = 1\n\
         [[tenants]]\nid = \"t/1\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\n\
         max_in_flight = 1\n[[tenants]]\nid = \"t\\nforged log line\"\n[[tenants.buckets]]\n\
         name = \"b\\tc\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n",
    )
    .unwrap_err()
    .to_string();
    for what in [
        "tenants[0]: id must not hold '/'",
        "tenants[1]: id must not hold control characters",
        "name must not hold control characters",
        "classes[0] (\"a/b\"): name must not hold '/'",
    ] {
        assert!(err.contains(what), "{what}: {err}");
    }
    assert!(!err.contains("forged log line\n"), "{err}");
    // Quotes, spaces and other scripts are names like any other.
    assert!(Settings::from_toml(
        "[[tenants]]\nid = \"Acme \\\"EU\\\" 👍\"\n[[tenants.buckets]]\nname = \"b q\"\n\
         routes = [\"* /**\"]\nmax_in_flight = 1\n"
    )
    .is_ok());
}

/// Every name a config gives (tenant, bucket, class, token) is held
/// to one rule: nothing that prints as something else.
#[test]
fn names_with_invisible_format_characters_are_refused_like_control_characters() {
    let token = |name: &str| {
        format!(
            "[[auth.tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nrole = \"admin\"\n\
             tenants = [\"*\"]\n",
            crate::auth::hash_token("a-token")
        )
    };
    let err = Settings::from_toml(&format!(
        "[[classes]]\nname = \"batch\\u2066\"\norder = 0\n[[classes]]\nname = \"batch\"\n\
         order = 1\n[[tenants]]\nid = \"acme\\u202Eevil\"\n[[tenants.buckets]]\n\
         name = \"b\\u200Bq\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n{}{}",
        token("ops\\nforged"),
        token("ops\\u202Eevil")
    ))
    .unwrap_err();
    let all = err.to_string();
    for what in [
        "classes[0] (\"batch\\u{2066}\"): name must not hold control characters or \
         invisible format characters: it holds an invisible format character (U+2066",
        "tenants[0]: id must not hold control characters or invisible format characters: \
         it holds an invisible format character (U+202E",
        ".buckets[0] (\"b\\u{200b}q\"): name must not hold control characters or \
         invisible format characters: it holds an invisible format character (U+200B",
        "auth.tokens[0] (\"ops\\nforged\"): name must not hold control characters or \
         invisible format characters: it holds a control character (U+000A",
        "auth.tokens[1] (\"ops\\u{202e}evil\"): name must not hold control characters or \
         invisible format characters: it holds an invisible format character (U+202E",
    ] {
        assert!(all.contains(what), "{what}: {all}");
    }
    assert_eq!(err.problems.len(), 5, "{all}");
    assert!(!all.contains(['\u{202E}', '\u{2066}', '\u{200B}']), "{all}");
}

#[test]
fn slot_limits_and_queues_are_bounded() {
    let config = |max_in_flight: u32, waiters: u32| {
        Settings::from_toml(&format!(
            "[scheduling]\nmax_waiters_per_bucket = {waiters}\n[[tenants]]\nid = \"t\"\n\
             [[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\n\
             max_in_flight = {max_in_flight}\n"
        ))
    };
    let err = config(u32::MAX, u32::MAX).unwrap_err();
    assert_eq!(
        err.problems,
        [
            "scheduling.max_waiters_per_bucket 4294967295 must be between 1 and 1000000: \
             each waiting request holds memory and a stream until it is served or gives up",
            "tenants[0] (\"t\").buckets[0] (\"b\"): max_in_flight 4294967295 must be \
             between 1 and 1000000 (leave it out for no concurrency limit)",
        ]
    );
    let err = config(0, 0).unwrap_err().to_string();
    assert!(
        err.contains("max_waiters_per_bucket 0 must be between 1"),
        "{err}"
    );
    assert!(err.contains("max_in_flight 0 must be between 1"), "{err}");
    let s = config(MAX_IN_FLIGHT, 1_000_000).unwrap();
    assert_eq!(s.scheduling.max_waiters_per_bucket, 1_000_000);
    assert_eq!(
        s.tenants[0].buckets[0].max_in_flight.map(NonZeroU32::get),
        Some(MAX_IN_FLIGHT)
    );
}

#[test]
fn names_longer_than_a_request_may_carry_are_refused() {
    let config = |tenant: &str, bucket: &str| {
        Settings::from_toml(&format!(
            "[[tenants]]\nid = \"{tenant}\"\n[[tenants.buckets]]\nname = \"{bucket}\"\n\
             routes = [\"* /**\"]\nmax_in_flight = 1\n"
        ))
    };
    let long = "é".repeat(150);
    let err = config(&long, &"b".repeat(MAX_ID_LEN + 1))
        .unwrap_err()
        .to_string();
    for what in [
        "tenants[0]: id is 300 bytes long, more than a request may carry (256), so no \
         request could name it: shorten it",
        ".buckets[0] (\"bbbbbbbb",
        "name is 257 bytes long, more than a request may carry (256)",
    ] {
        assert!(err.contains(what), "{what}: {err}");
    }
    assert!(err.len() < 1_000, "{} bytes: {err}", err.len());
    // The longest a request may carry is a name like any other.
    let s = config(&"t".repeat(MAX_ID_LEN), &"b".repeat(MAX_ID_LEN)).unwrap();
    assert_eq!(s.tenants[0].buckets[0].name.len(), MAX_ID_LEN);
}

#[test]
fn a_route_no_request_path_can_match_is_refused_saying_what_to_write() {
    let err = Settings::from_toml(
        "[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\n\
         routes = [\"GET /t/\", \"GET /a/../b\", \"GET /p%20q\", \"GET /z?q=1\", \
         \"GET /c[é]\"]\nmax_in_flight = 1\n",
    )
    .unwrap_err();
    assert_eq!(
        err.problems,
        [
            "tenants[0] (\"t\").buckets[0] (\"b\"): route \"GET /t/\": a trailing \"/\" \
             never matches: request paths are matched without it; write \"GET /t\"",
            "tenants[0] (\"t\").buckets[0] (\"b\"): route \"GET /a/../b\": a \".\" or \"..\" \
             segment never matches: request paths are matched with dot segments resolved; \
             write \"GET /b\"",
            "tenants[0] (\"t\").buckets[0] (\"b\"): route \"GET /p%20q\": a percent-escape \
             never matches: request paths are matched decoded, where only a \"%\" itself \
             is still spelled \"%25\" (\"?\" matches a space, which a pattern cannot \
             hold); write \"GET /p?q\"",
            "tenants[0] (\"t\").buckets[0] (\"b\"): route \"GET /z?q=1\": a query string \
             never matches: request paths are matched without theirs (in a pattern, \"?\" \
             matches any one character); write \"GET /z\"",
            "tenants[0] (\"t\").buckets[0] (\"b\"): route \"GET /c[é]\": path \"/c[é]\": a \
             \"[…]\" set matches one byte, so a non-ASCII character in it matches nothing; \
             give the choices as alternatives (\"{é,è}\")",
        ]
    );
    // What they are told to write is accepted.
    assert!(Settings::from_toml(
        "[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\n\
         routes = [\"GET /t\", \"GET /b\", \"GET /p?q\", \"GET /z\", \"GET /c{é,è}\"]\n\
         max_in_flight = 1\n"
    )
    .is_ok());
}

#[test]
fn a_rate_beyond_what_the_bucket_can_hold_or_pace_is_refused() {
    let bucket = |rate: &str| {
        Settings::from_toml(&format!(
            "[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\n\
             routes = [\"* /**\"]\n{rate}\n"
        ))
        .map_err(|e| e.to_string())
    };
    // The burst defaults to the permits, and so is held to its bound.
    let err = bucket("permits = 4294967295\nwindow_ms = 60000").unwrap_err();
    assert!(
        err.contains("burst not given, so it would be permits (4294967295)")
            && err.contains("give burst explicitly"),
        "{err}"
    );
    assert!(bucket("permits = 2000000\nwindow_ms = 3600000\nburst = 1000").is_ok());
    // Finer than a nanosecond per permit.
    let err = bucket("permits = 2000000\nwindow_ms = 1\nburst = 10").unwrap_err();
    assert!(err.contains("more than one a nanosecond"), "{err}");
    let ok = bucket("permits = 1000000\nwindow_ms = 1\nburst = 10").unwrap();
    let rate = ok.tenants[0].buckets[0].rate.unwrap();
    assert_eq!(rate.per_minute(), 60_000_000_000.0);
}

#[test]
fn invalid_tokens_are_not_called_missing() {
    let err = Settings::from_toml(
        "[server]\nlisten = \"0.0.0.0:1\"\n[[auth.tokens]]\nname = \"a\"\n\
         sha256 = \"zz\"\nrole = \"client\"\ntenants = [\"t\"]\n\
         [[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\n\
         routes = [\"* /**\"]\nmax_in_flight = 1\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("auth.tokens[0]"), "{err}");
    assert!(!err.contains("no [[auth.tokens]] are configured"), "{err}");
}

#[test]
fn a_problem_set_by_the_environment_names_its_variable() {
    let env = [
        ("QUOTA_BROKER__SERVER__LISTN".to_owned(), "x".to_owned()),
        (
            "QUOTA_BROKER__SERVER__MAX_WAIT_MS".to_owned(),
            "abc".to_owned(),
        ),
    ];
    let err = Settings::load(None, env).unwrap_err().to_string();
    assert!(
        err.contains("(set by the environment variable QUOTA_BROKER__SERVER__LISTN)"),
        "{err}"
    );
    assert!(
        err.contains("(set by the environment variable QUOTA_BROKER__SERVER__MAX_WAIT_MS)"),
        "{err}"
    );
    // A section that does not exist, named alone.
    let env = [("QUOTA_BROKER__SERVR__LISTEN".to_owned(), "x".to_owned())];
    let err = Settings::load(None, env).unwrap_err().to_string();
    assert!(
        err.contains("servr")
            && err.contains("(set by the environment variable QUOTA_BROKER__SERVR__LISTEN)"),
        "{err}"
    );
    // A semantic problem too.
    let env = [("QUOTA_BROKER__SERVER__LISTEN".to_owned(), "nope".to_owned())];
    let err = Settings::load(None, env).unwrap_err().to_string();
    assert!(
        err.contains("(set by the environment variable QUOTA_BROKER__SERVER__LISTEN)"),
        "{err}"
    );
}

#[test]
fn a_key_set_aside_for_its_value_is_not_also_missing() {
    let err = Settings::from_toml(
        "[[auth.tokens]]\nname = \"x\"\nsha256 = \"00\"\nrole = \"admn\"\ntenants = []\n",
    )
    .unwrap_err();
    assert_eq!(
        err.problems,
        ["auth.tokens[0].role: unknown variant `admn`, expected `client` or `admin`"]
    );
    // A key that is really missing still is one.
    let err = Settings::from_toml("[[auth.tokens]]\nname = \"x\"\nsha256 = \"00\"\n").unwrap_err();
    assert!(
        err.problems
            .iter()
            .any(|p| p.contains("missing field `role`")),
        "{err}"
    );
}

#[test]
fn a_token_listed_twice_is_a_problem_and_a_name_is_short() {
    let token = |name: &str, role: &str, tenants: &str| {
        format!(
            "[[auth.tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nrole = \"{role}\"\n\
             tenants = {tenants}\n",
            crate::auth::hash_token("s3cret")
        )
    };
    let tenants = "[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\n\
                   routes = [\"* /**\"]\nmax_in_flight = 1\n";
    let twice = format!(
        "{}{}{tenants}",
        token("ops", "admin", "[\"*\"]"),
        token("wallboard", "client", "[\"t\"]")
    );
    let err = Settings::from_toml(&twice).unwrap_err();
    assert_eq!(
        err.problems,
        [
            "auth.tokens[1] (\"wallboard\"): the same sha256 as auth.tokens[0]; a token has one \
          entry (two holders need two tokens)"
        ]
    );
    let long = "n".repeat(3_000);
    let err = Settings::from_toml(&format!("{}{tenants}", token(&long, "client", "[\"t\"]")))
        .unwrap_err();
    let all = err.to_string();
    assert!(all.contains("name is 3000 characters; at most 64"), "{all}");
    assert!(all.len() < 500, "{all}");
    // One name, two tokens: a rotation.
    let rotation = format!(
        "{}[[auth.tokens]]\nname = \"ops\"\nsha256 = \"{}\"\nrole = \"admin\"\n\
         tenants = [\"*\"]\n{tenants}",
        token("ops", "admin", "[\"*\"]"),
        crate::auth::hash_token("n3w-s3cret")
    );
    assert!(Settings::from_toml(&rotation).is_ok());
}

#[test]
fn a_toml_syntax_error_names_the_file() {
    let path = std::env::temp_dir().join(format!("qb-syntax-{}.toml", std::process::id()));
    std::fs::write(&path, "[server\nlisten = 1\n").unwrap();
    let err = Settings::load(Some(&path), []).unwrap_err().to_string();
    assert!(
        err.contains(&format!("config file {}: TOML parse error", path.display())),
        "{err}"
    );
    // A long line is not echoed back, and the error stays on one line.
    let long = format!("[server]\nlisten = \"{}\n", "a".repeat(100_000));
    std::fs::write(&path, long).unwrap();
    let err = Settings::load(Some(&path), []).unwrap_err().to_string();
    let _ = std::fs::remove_file(&path);
    assert!(err.len() < 1_000, "{} bytes", err.len());
    assert!(
        err.contains("line 2") && err.contains("invalid basic string"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 2, "{err}");
    // A number TOML cannot hold says where it is too.
    std::fs::write(&path, "[server]\nmax_wait_ms = 18446744073709551615\n").unwrap();
    let err = Settings::load(Some(&path), []).unwrap_err().to_string();
    let _ = std::fs::remove_file(&path);
    assert!(
        err.contains(&format!(
            "config file {}: TOML parse error at line 2, column 15",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn missing_file_is_a_clear_error() {
    let err = Settings::load(Some(Path::new("/nonexistent/broker.toml")), []).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/broker.toml"),
        "{err}"
    );
}
