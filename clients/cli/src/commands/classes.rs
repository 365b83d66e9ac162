//! `quotactl class list|set|reset`: a tenant's priority classes.

use super::cluster::Cluster;
use super::{given, pretty, print};
use crate::cli::{
    ClassListArgs, ClassResetArgs, ClassSetArgs, NEW_CLASS_RESERVE, NEW_CLASS_WEIGHT,
};
use crate::error::{clip, Error};
use crate::table;
use quota_broker::pb::{ListPriorityClassesRequest, PriorityClass, SetPriorityClassRequest};

pub(super) async fn class_list(c: &mut Cluster, a: ClassListArgs) -> Result<(), Error> {
    let tenant = given(a.tenant);
    let req = ListPriorityClassesRequest {
        tenant: tenant.clone(),
    };
    let list = c
        .call(&tenant, |conn| {
            let (mut admin, req) = (conn.admin.clone(), req.clone());
            async move { admin.list_priority_classes(req).await }
        })
        .await?
        .1;
    if a.json {
        let classes: Vec<_> = list.classes.iter().map(table::class_json).collect();
        print(&format!(
            "{}\n",
            pretty(&serde_json::json!({
                "tenant": tenant,
                "classes": classes,
                "default_class": list.default_class,
            }))
        ))
    } else {
        print(&table::render_classes(
            &list.classes,
            Some(list.default_class.as_str()),
        ))
    }
}

pub(super) async fn class_set(c: &mut Cluster, a: ClassSetArgs) -> Result<(), Error> {
    let tenant = given(a.tenant.clone());
    let all_given = a.order.is_some()
        && a.weight.is_some()
        && a.reserve.is_some()
        && a.default_max_wait_ms.is_some();
    // Fields not given keep the class's values: read them as `class list` does.
    let now = if all_given {
        None
    } else {
        let req = ListPriorityClassesRequest {
            tenant: tenant.clone(),
        };
        c.call(&tenant, |conn| {
            let (mut admin, req) = (conn.admin.clone(), req.clone());
            async move { admin.list_priority_classes(req).await }
        })
        .await?
        .1
        .classes
        .into_iter()
        .find(|class| class.name == a.name)
    };
    let class = class_to_set(&a, &tenant, now)?;
    let none = format!("class {} set for tenant {}\n", a.name, tenant);
    send_class(c, &tenant, class, false, a.json, &none).await
}

/// The class `class set` sends: the fields given, the others those of the
/// class `now` in force, or for a new class the config's defaults (a new
/// class has no default order: [`Error::Usage`] without `--order`).
pub(super) fn class_to_set(
    a: &ClassSetArgs,
    tenant: &str,
    now: Option<PriorityClass>,
) -> Result<PriorityClass, Error> {
    let now = match now {
        Some(now) => now,
        None => PriorityClass {
            name: a.name.clone(),
            order: a.order.ok_or_else(|| {
                Error::Usage(format!(
                    "class {:?} is not one of tenant {:?}'s classes yet: a new class needs \
                     --order (the others default to weight {NEW_CLASS_WEIGHT}, reserve \
                     {NEW_CLASS_RESERVE}, default-max-wait-ms 0)",
                    clip(&a.name, 64),
                    clip(tenant, 64)
                ))
            })?,
            weight: NEW_CLASS_WEIGHT,
            reserve: NEW_CLASS_RESERVE,
            default_max_wait_ms: 0,
        },
    };
    Ok(PriorityClass {
        name: a.name.clone(),
        order: a.order.unwrap_or(now.order),
        weight: a.weight.unwrap_or(now.weight),
        reserve: a.reserve.unwrap_or(now.reserve),
        default_max_wait_ms: a.default_max_wait_ms.unwrap_or(now.default_max_wait_ms),
    })
}

pub(super) async fn class_reset(c: &mut Cluster, a: ClassResetArgs) -> Result<(), Error> {
    let tenant = given(a.tenant);
    let class = PriorityClass {
        name: a.name.clone(),
        ..Default::default()
    };
    let none = format!(
        "class {} removed from tenant {} (Acquires waiting in it are still served)\n",
        a.name, tenant
    );
    send_class(c, &tenant, class, true, a.json, &none).await
}

/// Sends SetPriorityClass and prints the class now in force (`none`
/// when the answer has none).
async fn send_class(
    c: &mut Cluster,
    tenant: &str,
    class: PriorityClass,
    reset: bool,
    json: bool,
    none: &str,
) -> Result<(), Error> {
    let req = SetPriorityClassRequest {
        tenant: tenant.to_owned(),
        class: Some(class),
        reset,
    };
    let class = c
        .call(tenant, |conn| {
            let (mut admin, req) = (conn.admin.clone(), req.clone());
            async move { admin.set_priority_class(req).await }
        })
        .await?
        .1
        .class;
    match (class, json) {
        (Some(c), true) => print(&format!("{}\n", pretty(&table::class_json(&c)))),
        (Some(c), false) => print(&table::render_class(&c)),
        (None, true) => print("null\n"),
        (None, false) => print(none),
    }
}
