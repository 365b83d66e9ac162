//! The dashboard of a cluster member that leads none of its tenants names
//! the broker that leads each (its feed cannot show them), so a lead who
//! opened the dashboard on the wrong member is told where to look. Real
//! etcd, two broker processes.

use crate::child::{temp_config, Broker};

/// Tenants rendezvous hashing places on b1 rather than b2 (checked below:
/// b2 never takes one over).
const TENANTS: [&str; 3] = ["t1", "t3", "t4"];

fn config(node: &str, port: u16, http: u16, etcd: &str) -> String {
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nhttp_listen = \"127.0.0.1:{http}\"\n\
         state_dir = \"\"\nshutdown_grace_ms = 1000\n[cluster]\netcd = [\"{etcd}\"]\n\
         node = \"{node}\"\nadvertise = \"http://127.0.0.1:{port}\"\n\
         prefix = \"/qb-test-dashboard-elsewhere\"\nlease_ttl_ms = 2000\nsafety_margin_ms = 500\n"
    );
    for t in TENANTS {
        toml.push_str(&format!(
            "[[tenants]]\nid = \"{t}\"\n[[tenants.buckets]]\nname = \"rate\"\n\
             routes = [\"GET /x\"]\npermits = 10\nwindow_ms = 1000\nburst = 10\n"
        ));
    }
    toml
}

#[tokio::test]
async fn a_member_that_leads_nothing_names_where_its_tenants_are_led() {
    let etcd = testsvc::Etcd::start().unwrap();
    let port = |_| testsvc::free_port().unwrap();
    let (p1, h1, p2, h2) = (port(1), port(2), port(3), port(4));
    let b1 = Broker::start(&temp_config(
        "elsewhere-b1",
        &config("b1", p1, h1, &etcd.url()),
    ))
    .await;
    b1.until_logged("first tick in the cluster: leading 3 of 3 tenants")
        .await;
    let b2 = Broker::start(&temp_config(
        "elsewhere-b2",
        &config("b2", p2, h2, &etcd.url()),
    ))
    .await;
    b2.until_logged("first tick in the cluster: leading 0 of 3 tenants")
        .await;

    let http = std::net::SocketAddr::from(([127, 0, 0, 1], h2));
    let (head, mut feed) = crate::observe::open(http, "/events", &[]).await;
    assert_eq!(head.status, 200);
    let census = crate::observe::next_of(&mut feed, "instances", |_| true).await;
    assert_eq!(census["instances"], serde_json::json!([]), "{census}");
    assert_eq!(census["elsewhere_total"], 3, "{census}");
    let named: Vec<(String, String)> = census["elsewhere"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["tenant"].as_str().unwrap().to_owned(),
                e["leader"].as_str().unwrap_or("none").to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> =
        TENANTS.iter().map(|t| (t.to_string(), b1.url())).collect();
    assert_eq!(named, expected);
    drop(feed);

    // b1's own census names nothing elsewhere.
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], h1));
    let (_, mut feed) = crate::observe::open(http, "/events", &[]).await;
    let census = crate::observe::next_of(&mut feed, "instances", |_| true).await;
    assert_eq!(census["elsewhere_total"], 0, "{census}");
    assert_eq!(
        census["instances"].as_array().map(Vec::len),
        Some(3),
        "{census}"
    );
    drop(feed);
    let (_, log) = b2.terminate().await;
    assert!(!log.contains("took the tenant over"), "{log}");
    drop(b1);
}
