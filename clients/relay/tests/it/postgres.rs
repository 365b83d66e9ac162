//! Two relays on one PostgreSQL queue share the drain: every record
//! reaches the upstream once, and both relays deliver.

use std::time::Duration;

use crate::common::*;

#[tokio::test]
async fn two_relays_share_one_postgres_queue_and_handle_no_record_twice() {
    let pg = testsvc::Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    let url = pg
        .create_database("relay")
        .unwrap_or_else(|e| panic!("{e}"));
    let sim = gcsim(sim_config(60.0, 200, 0)).await;
    let broker = broker(1_000).await;
    let mut a = settings(&url, &sim, &broker.url);
    a.name = "relay-a".into();
    let mut b = settings(&url, &sim, &broker.url);
    b.name = "relay-b".into();
    let (a, b) = (relay(a).await, relay(b).await);
    let flows = [
        Flow::new(&format!("http://{}", a.addr())),
        Flow::new(&format!("http://{}", b.addr())),
    ];
    let n = 400;
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..n {
        let flow = flows[i % 2].clone();
        // Half the records are posted to both relays (a retry landing on
        // the other replica): still one record.
        let other = (i % 4 == 0).then(|| flows[(i + 1) % 2].clone());
        posts.spawn(async move {
            let r = wrapup(&format!("pg{i}"));
            let (s, first) = flow.post(&r).await.unwrap();
            assert_eq!(s, 202);
            if let Some(other) = other {
                let (s, again) = other.post(&r).await.unwrap();
                assert_eq!((s, &again["recordId"]), (202, &first["recordId"]));
            }
        });
    }
    while let Some(r) = posts.join_next().await {
        r.unwrap();
    }
    wait_until(
        "every record delivered",
        Duration::from_secs(60),
        || async { a.queue().depth().await.unwrap().records == 0 },
    )
    .await;
    let w = writes(&sim).await;
    assert_eq!(w.len(), n);
    let twice: Vec<_> = w.iter().filter(|(_, &c)| c > 1).collect();
    assert!(twice.is_empty(), "handled twice: {twice:?}");
    let (sa, sb) = (a.upstream().stats(), b.upstream().stats());
    assert_eq!(sa.ok_2xx + sb.ok_2xx, n as u64, "{sa:?} {sb:?}");
    assert!(
        sa.ok_2xx > 0 && sb.ok_2xx > 0,
        "one relay did all: {sa:?} {sb:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
    broker.stop().await;
    sim.shutdown().await;
}
