//! `quotactl bucket set-limit` and `quotactl clear`: a bucket's limit, and
//! what the broker learned about a bucket.

use super::cluster::Cluster;
use super::{given, pretty, print, print_status};
use crate::cli::{ClearArgs, SetLimitArgs};
use crate::error::Error;
use crate::table;
use quota_broker::pb::{ClearLearnedRequest, SetBucketLimitRequest};

pub(super) async fn set_limit(c: &mut Cluster, a: SetLimitArgs) -> Result<(), Error> {
    let tenant = given(a.tenant);
    let req = SetBucketLimitRequest {
        tenant: tenant.clone(),
        bucket: a.bucket.clone(),
        permits: a.permits.unwrap_or(0),
        window_ms: a.window_ms.unwrap_or(0),
        burst: a.burst.unwrap_or(0),
        max_in_flight: a.max_in_flight.unwrap_or(0),
        reset: a.reset,
    };
    let status = c
        .call(&tenant, |conn| {
            let (mut admin, req) = (conn.admin.clone(), req.clone());
            async move { admin.set_bucket_limit(req).await }
        })
        .await?
        .1
        .status;
    let what = if a.reset {
        "limit reset to the config's"
    } else {
        "limit changed"
    };
    print_status(status, a.json, &tenant, &a.bucket, what)
}

pub(super) async fn clear(c: &mut Cluster, a: ClearArgs) -> Result<(), Error> {
    let tenant = given(a.tenant);
    let req = ClearLearnedRequest {
        tenant: tenant.clone(),
        bucket: a.bucket.clone(),
        oauth_client: a.oauth_client.unwrap_or_default(),
    };
    let statuses = c
        .call(&tenant, |conn| {
            let (mut admin, req) = (conn.admin.clone(), req.clone());
            async move { admin.clear_learned(req).await }
        })
        .await?
        .1
        .statuses;
    if a.json {
        let all: Vec<_> = statuses.iter().map(table::status_json).collect();
        return print(&format!("{}\n", pretty(&serde_json::Value::Array(all))));
    }
    if statuses.is_empty() {
        return print(&format!("{}/{}: no instance to clear\n", tenant, a.bucket));
    }
    print(&table::render_status(&statuses))
}
