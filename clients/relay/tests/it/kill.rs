//! kill -9 of the relay binary mid-burst, then a restart on the same
//! SQLite file: every record that got its 202 reaches the upstream.

use crate::common::*;

#[tokio::test]
async fn a_killed_relay_loses_no_acknowledged_record_and_writes_none_twice() {
    let dir = TempDir::new("kill");
    // 60×: a window is a real second; 100 a window enforced, 20 of them
    // the unmanaged consumer's, so the drain runs while records arrive.
    let sim = gcsim(sim_config(60.0, 100, 20)).await;
    let broker = broker(1_000).await;
    let args = serve_args(&dir.sqlite(), &sim, &broker.url);
    let (total, kill_after) = (600, 250);
    let acked = burst_and_kill(Child::start(&args).await, total, 16, kill_after).await;
    assert!(acked.len() >= kill_after);
    assert!(
        acked.len() < total,
        "the kill came after the burst: nothing was cut off"
    );

    // Restart on the same file; the flows send what was not acknowledged.
    let child = Child::start(&args).await;
    repost_and_drain(&child.url, total, &acked).await;
    let w = writes(&sim).await;
    let lost: Vec<&String> = acked.iter().filter(|c| !w.contains_key(*c)).collect();
    assert!(lost.is_empty(), "acknowledged but never written: {lost:?}");
    assert_eq!(w.len(), total);
    // A record the upstream took in the instant between its answer and the
    // relay's commit of "done" is sent again after the restart (the write
    // is idempotent by its key); only those can be written twice, so at
    // most what the drain had in flight.
    let twice: Vec<_> = w.iter().filter(|(_, &n)| n > 1).collect();
    let in_flight = gc_relay::DrainSettings::default().concurrency;
    assert!(
        twice.len() <= in_flight,
        "written more than once: {twice:?}"
    );
    if !twice.is_empty() {
        eprintln!("written twice (in flight at the kill): {twice:?}");
    }
    child.kill9().await;
    broker.stop().await;
    sim.shutdown().await;
}
