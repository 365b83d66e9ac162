//! The embedded default config: valid, with the documented buckets,
//! plaintext and open to every caller, with the documented connection
//! limits, which a config that leaves their keys out gets too.

use super::super::*;

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
