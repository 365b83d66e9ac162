//! Unit tests of the commands: `class set` arguments and the `watch` table's rows.

use super::classes::class_to_set;
use super::watch::{keep_live, Feed};
use crate::cli::ClassSetArgs;
use crate::error::Error;
use crate::table::BucketKey;
use quota_broker::pb::{PriorityClass, QuotaStatus};
use std::collections::BTreeMap;
use tokio::time::Instant;
use tokio_stream::StreamMap;

fn set_args(
    order: Option<u32>,
    weight: Option<u32>,
    reserve: Option<f64>,
    default_max_wait_ms: Option<u64>,
) -> ClassSetArgs {
    ClassSetArgs {
        tenant: Some("t".into()),
        name: "reports".into(),
        order,
        weight,
        reserve,
        default_max_wait_ms,
        json: false,
    }
}

/// `class set` keeps what is not given of a class in force, and gives
/// a new one the config's defaults (and needs its order).
#[test]
fn class_set_keeps_what_is_not_given() {
    let now = PriorityClass {
        name: "reports".into(),
        order: 1,
        weight: 3,
        reserve: 0.05,
        default_max_wait_ms: 1000,
    };
    let class = class_to_set(&set_args(Some(4), None, None, None), "t", Some(now.clone())).unwrap();
    assert_eq!(
        class,
        PriorityClass {
            order: 4,
            ..now.clone()
        }
    );
    let class = class_to_set(&set_args(None, Some(2), Some(0.0), Some(0)), "t", Some(now)).unwrap();
    assert_eq!(
        (
            class.order,
            class.weight,
            class.reserve,
            class.default_max_wait_ms
        ),
        (1, 2, 0.0, 0)
    );
    let new = class_to_set(&set_args(Some(7), None, None, None), "t", None).unwrap();
    assert_eq!(
        new,
        PriorityClass {
            name: "reports".into(),
            order: 7,
            weight: 1,
            reserve: 0.0,
            default_max_wait_ms: 0,
        }
    );
    let e = class_to_set(&set_args(None, Some(2), None, None), "t", None).unwrap_err();
    assert!(matches!(e, Error::Usage(_)), "{e:?}");
    assert!(e.to_string().contains("a new class needs --order"), "{e}");
}

fn row(tenant: &str, bucket: &str, client: &str) -> QuotaStatus {
    QuotaStatus {
        tenant: tenant.into(),
        bucket: bucket.into(),
        oauth_client: client.into(),
        ..Default::default()
    }
}

fn rows(state: &BTreeMap<BucketKey, QuotaStatus>) -> Vec<String> {
    state
        .keys()
        .map(|(t, b, c)| format!("{t}/{b}/{c}"))
        .collect()
}

/// A feed of `watch` over every tenant with no stream yet.
fn empty_feed() -> Feed {
    Feed {
        streams: StreamMap::new(),
        tenant: None,
        watched: None,
        lost: None,
        switched: false,
        dropped: Vec::new(),
        reopen_at: Instant::now(),
        gone: Vec::new(),
    }
}

/// The table of `watch` over every tenant keeps only live rows: a
/// tenant's rows from the broker that led it before go once another
/// broker sends it (a per-client row the new leader has not made
/// among them), and a broker's rows go once its stream ended.
#[test]
fn rows_of_a_tenant_led_elsewhere_or_of_a_gone_broker_are_dropped() {
    let mut feed = empty_feed();
    let (mut state, mut source) = (BTreeMap::new(), BTreeMap::new());
    let (b1, b2) = ("http://b1".to_owned(), "http://b2".to_owned());
    for s in [
        row("t0", "rate", ""),
        row("t0", "per-client", "app1"),
        row("t1", "rate", ""),
    ] {
        keep_live(&mut feed, &mut state, &mut source, b1.clone(), s);
    }
    keep_live(
        &mut feed,
        &mut state,
        &mut source,
        b2.clone(),
        row("t2", "rate", ""),
    );
    assert_eq!(
        rows(&state),
        ["t0/per-client/app1", "t0/rate/", "t1/rate/", "t2/rate/"]
    );
    // t0 moved to b2, which has not seen app1.
    keep_live(
        &mut feed,
        &mut state,
        &mut source,
        b2.clone(),
        row("t0", "rate", ""),
    );
    assert_eq!(rows(&state), ["t0/rate/", "t1/rate/", "t2/rate/"]);
    // b2's stream ended: its rows go with the next update.
    feed.gone.push(b2.clone());
    keep_live(
        &mut feed,
        &mut state,
        &mut source,
        b1.clone(),
        row("t1", "rate", ""),
    );
    assert_eq!(rows(&state), ["t1/rate/"]);
}

#[test]
fn a_per_client_buckets_unused_row_and_its_clients_rows_replace_each_other() {
    let mut feed = empty_feed();
    let (mut state, mut source) = (BTreeMap::new(), BTreeMap::new());
    let b1 = "http://b1".to_owned();
    let per_client = |client: &str, unused| QuotaStatus {
        scope: "oauth_client".into(),
        unused,
        ..row("t", "pc", client)
    };
    for s in [
        row("t", "rate", ""),
        per_client("", true),
        per_client("app1", false),
        per_client("app2", false),
    ] {
        keep_live(&mut feed, &mut state, &mut source, b1.clone(), s);
    }
    assert_eq!(rows(&state), ["t/pc/app1", "t/pc/app2", "t/rate/"]);
    // Both clients dropped while idle: the bucket's row is back alone.
    keep_live(
        &mut feed,
        &mut state,
        &mut source,
        b1.clone(),
        per_client("", true),
    );
    assert_eq!(rows(&state), ["t/pc/", "t/rate/"]);
    assert_eq!(source.len(), 2);
}
