//! The `[cluster]` keys: the example node's config is valid and every bad
//! key is listed; the URL a broker advertises (a host, no path, not too
//! long, https:// when it serves TLS); the lease TTL's bounds; and etcd
//! over TLS, with its CA and whole pairs of files.

use super::super::*;

#[test]
fn the_cluster_example_is_valid_and_bad_cluster_keys_are_listed() {
    let s = Settings::from_toml(include_str!("../../../examples/cluster-node.toml")).unwrap();
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
