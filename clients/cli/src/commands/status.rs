//! `quotactl status`: one table (or JSON array) of every bucket; over
//! every tenant, the answers of every broker given merged into one.

use super::cluster::{Cluster, Conn};
use super::{pretty, print};
use crate::cli::StatusArgs;
use crate::error::Error;
use crate::table::{self, BucketKey};
use quota_broker::pb::{ListBucketsRequest, QuotaStatus};
use std::collections::BTreeMap;

/// Merges bucket states from several brokers: one per bucket (the latest
/// snapshot, should two brokers show the same bucket), sorted.
fn merge(answers: impl IntoIterator<Item = QuotaStatus>) -> Vec<QuotaStatus> {
    let mut by_key: BTreeMap<BucketKey, QuotaStatus> = BTreeMap::new();
    for s in answers {
        match by_key.get(&table::key(&s)) {
            Some(old) if old.at_ms >= s.at_ms => {}
            _ => {
                by_key.insert(table::key(&s), s);
            }
        }
    }
    by_key.into_values().collect()
}

pub(super) async fn status(c: &mut Cluster, a: StatusArgs) -> Result<(), Error> {
    let list = |conn: &Conn, tenant: String| {
        let mut admin = conn.admin.clone();
        async move { admin.list_buckets(ListBucketsRequest { tenant }).await }
    };
    let (mut buckets, partial) = match &a.tenant {
        Some(t) => (
            c.call(t, |conn| list(conn, t.clone())).await?.1.buckets,
            None,
        ),
        None => {
            let (answers, partial) = c.each(|conn| list(conn, String::new())).await?;
            (
                merge(answers.into_iter().flat_map(|(_, r)| r.buckets)),
                partial,
            )
        }
    };
    table::sort(&mut buckets);
    // Every tenant has buckets (a per-client bucket no client uses is
    // listed too, as unused): none listed over every tenant means no
    // broker leads any, not an empty org (said without an empty table).
    if a.tenant.is_none() && buckets.is_empty() && partial.is_none() {
        return Err(Error::NothingLed {
            asked: c.urls.len(),
        });
    }
    if a.json {
        let all: Vec<_> = buckets.iter().map(table::status_json).collect();
        print(&format!("{}\n", pretty(&serde_json::Value::Array(all))))?;
    } else {
        print(&table::render_status(&buckets))?;
    }
    partial.map_or(Ok(()), Err)
}
