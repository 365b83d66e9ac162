//! Bounds on limits and waits: slots and queues, a rate the bucket can
//! hold and pace, and values that contradict each other or outlast any
//! use.

use super::super::*;

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
