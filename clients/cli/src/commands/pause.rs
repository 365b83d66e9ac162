//! `quotactl pause` and `quotactl resume`: stop granting from a bucket, and
//! grant from it again.

use super::cluster::Cluster;
use super::{given, print_status};
use crate::cli::{PauseArgs, ResumeArgs};
use crate::error::Error;
use quota_broker::pb::{PauseBucketRequest, ResumeBucketRequest};

pub(super) async fn pause(c: &mut Cluster, a: PauseArgs) -> Result<(), Error> {
    let tenant = given(a.tenant);
    let req = PauseBucketRequest {
        tenant: tenant.clone(),
        bucket: a.bucket.clone(),
        reason: a.reason.unwrap_or_default(),
    };
    let status = c
        .call(&tenant, |conn| {
            let (mut admin, req) = (conn.admin.clone(), req.clone());
            async move { admin.pause_bucket(req).await }
        })
        .await?
        .1
        .status;
    print_status(status, a.json, &tenant, &a.bucket, "paused")
}

pub(super) async fn resume(c: &mut Cluster, a: ResumeArgs) -> Result<(), Error> {
    let tenant = given(a.tenant);
    let req = ResumeBucketRequest {
        tenant: tenant.clone(),
        bucket: a.bucket.clone(),
    };
    let status = c
        .call(&tenant, |conn| {
            let (mut admin, req) = (conn.admin.clone(), req.clone());
            async move { admin.resume_bucket(req).await }
        })
        .await?
        .1
        .status;
    print_status(status, a.json, &tenant, &a.bucket, "resumed")
}
