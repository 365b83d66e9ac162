//! Cluster mode against a real etcd served over TLS that asks for client
//! certificates, with a TLS setup that does not fit it: the broker runs,
//! is not ready, and says which setting to change, in its log and on
//! `/readyz`. (Whether the files fit this etcd shows only when connecting:
//! files that cannot be read stop the start, as config problems.)

use crate::child::{temp_config, Broker};
use crate::observe::get;
use std::net::SocketAddr;

/// A node of one tenant on `etcd`, its HTTP port on, with the `[cluster]`
/// lines `tls`.
fn node(name: &str, etcd: &str, tls: &str) -> std::path::PathBuf {
    let (grpc, http) = (testsvc::free_port().unwrap(), testsvc::free_port().unwrap());
    temp_config(
        &format!("cluster-tls-errors-{name}"),
        &format!(
            r#"[server]
listen = "127.0.0.1:{grpc}"
http_listen = "127.0.0.1:{http}"
state_dir = ""
shutdown_grace_ms = 1000
[cluster]
etcd = ["{etcd}"]
node = "{name}"
advertise = "http://127.0.0.1:{grpc}"
prefix = "/qb-test-tls-errors"
lease_ttl_ms = 2000
safety_margin_ms = 500
{tls}
[[tenants]]
id = "t"
[[tenants.buckets]]
name = "b"
routes = ["* /**"]
max_in_flight = 1
"#
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_setup_that_does_not_fit_etcd_is_said_with_the_setting_to_change() {
    let pki = testpki::Pki::new("etcd-tls-errors");
    let other = testpki::Pki::new("etcd-tls-errors-other");
    let etcd = testsvc::Etcd::start_tls(testsvc::EtcdTls {
        cert: pki.path("server.pem"),
        key: pki.path("server.key"),
        client_ca: Some(pki.path("ca.pem")),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    // etcd's CA trusted, but no client certificate given.
    let no_cert = Broker::start(&node(
        "no-cert",
        &etcd.url(),
        &format!("etcd_ca = {:?}", pki.arg("ca.pem")),
    ))
    .await;
    // A CA that did not sign etcd's certificate.
    let wrong_ca = Broker::start(&node(
        "wrong-ca",
        &etcd.url(),
        &format!(
            "etcd_ca = {:?}\netcd_cert = {:?}\netcd_key = {:?}",
            other.arg("ca.pem"),
            pki.arg("client.pem"),
            pki.arg("client.key")
        ),
    ))
    .await;
    for (broker, says) in [
        (
            &no_cert,
            "(check cluster.etcd_cert and cluster.etcd_key: etcd asks for a client \
             certificate, and none is set)",
        ),
        (
            &wrong_ca,
            "(check cluster.etcd_ca: the CA that signed etcd's certificate; the one set did not)",
        ),
    ] {
        broker.until_logged(says).await;
        let http: SocketAddr = broker.http.as_deref().unwrap().parse().unwrap();
        let ready = get(http, "/readyz", &[]).await;
        assert_eq!(ready.status, 503, "{}", ready.body);
        assert!(
            ready.body.contains("not in the cluster") && ready.body.contains(says),
            "{}",
            ready.body
        );
    }
    for broker in [no_cert, wrong_ca] {
        // Running all along: stopped by the signal, not exited by itself.
        let (status, log) = broker.terminate().await;
        assert!(status.success(), "{status}: {log}");
        assert!(log.contains("cluster session failed"), "{log}");
    }
}
