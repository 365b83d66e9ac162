//! The dashboard under load in headless Chromium: the charts move; the
//! numbers shown match ListBuckets once the load stops; the frozen buckets
//! come first, a per-client bucket's clients are one panel naming the
//! frozen one; a bucket at its limit says so (every slot held, or batch
//! held back by the reserve of the classes above it); a page opened later
//! draws the minutes before it (the 429 included); the screenshot is saved
//! (`target/tmp/dashboard.png`); and once the broker stops the page says it
//! has no data.

use super::{install, spawn_node, LIMIT};
use crate::harness::req;
use crate::observe::start;
use quota_broker::pb::{ListBucketsRequest, ReportRequest};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const CONFIG: &str = r#"
[server]
shutdown_grace_ms = 1000
state_dir = ""
[[tenants]]
id = "contact-centre"
[[tenants.buckets]]
name = "users"
routes = ["GET /api/v2/users/**"]
permits = 600
window_ms = 60000
burst = 20
max_in_flight = 12
lease_ttl_ms = 600000
[[tenants.buckets]]
name = "analytics-query"
routes = ["POST /api/v2/analytics/**/query"]
permits = 120
window_ms = 60000
burst = 5
max_in_flight = 8
lease_ttl_ms = 600000
[[tenants.buckets]]
name = "jobs"
routes = ["POST /api/v2/analytics/jobs/**"]
max_in_flight = 4
[[tenants.buckets]]
name = "routing"
scope = "oauth_client"
routes = ["GET /api/v2/routing/**"]
permits = 300
window_ms = 60000
burst = 10
[[tenants.buckets]]
name = "recordings"
routes = ["GET /api/v2/recording/**"]
permits = 60
window_ms = 60000
burst = 10
"#;

/// The browser session: open the page, wait for the charts to move, print
/// MOVED; read the expected figures as one JSON line on stdin; wait until
/// the page shows them, print MATCHED; check the frozen `users` and
/// `routing` panels come first and the per-client `routing` panel names its
/// frozen client, print ORDERED; save the screenshot, print SHOT; on a line BUSY
/// wait for analytics-query's badge (every slot held) and recordings' (batch
/// callers held back by the reserve of the classes above them) to say they
/// are at their limit, print LIMIT; open a second page and check it drew the minutes before it
/// opened, the 429 marker on users included, print HISTORY; on a line
/// STOPPED wait for the page to say it has no data, print STALE.
const SCRIPT: &str = r#"
const { chromium } = require(process.env.PW_DIR + "/node_modules/playwright-core");
const readline = require("readline");
const [url, shot] = process.argv.slice(2);
const lines = readline.createInterface({ input: process.stdin });
const nextLine = () => new Promise((ok) => lines.once("line", ok));
const shown = () => [...document.querySelectorAll("section.panel")].map((p) => ({
  key: p.dataset.key,
  points: +p.querySelector("canvas").dataset.points,
  image: p.querySelector("canvas").toDataURL(),
  granted: p.querySelector(".fig.granted .v").dataset.value,
  throttled: p.querySelector(".fig.thr .v").dataset.value,
  configured: p.querySelector(".fig.rate .v").dataset.configured,
  in_flight: p.querySelector(".fig.slots .v").dataset.inFlight,
  max_in_flight: p.querySelector(".fig.slots .v").dataset.max,
  waiting: p.dataset.waiting,
}));
(async () => {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1920, height: 1080 } });
    page.on("console", (m) => console.error("page:", m.text()));
    await page.goto(url);
    await page.waitForFunction(() => document.querySelectorAll("section.panel").length >= 2,
      null, { timeout: 30000 });
    const before = await page.evaluate(shown);
    const most = Math.max(...before.map((p) => p.points));
    await page.waitForFunction((n) => [...document.querySelectorAll("section.panel canvas")]
      .some((c) => +c.dataset.points >= n + 5), most, { timeout: 30000 });
    const after = await page.evaluate(shown);
    const moved = after.some((p) => {
      const b = before.find((x) => x.key === p.key);
      return b && b.image !== p.image;
    });
    if (!moved) throw new Error("no chart changed while points arrived");
    console.log("MOVED");
    const expected = JSON.parse(await nextLine());
    try {
      await page.waitForFunction((exp) => {
        const now = [...document.querySelectorAll("section.panel")];
        return exp.every((e) => {
          const p = now.find((x) => x.dataset.key === e.key);
          if (!p) return false;
          const v = (sel, field) => p.querySelector(sel).dataset[field];
          return v(".fig.granted .v", "value") === String(e.granted)
            && v(".fig.thr .v", "value") === String(e.throttled)
            && Number(v(".fig.rate .v", "configured")) === e.configured
            && v(".fig.slots .v", "inFlight") === String(e.in_flight)
            && v(".fig.slots .v", "max") === String(e.max_in_flight)
            && p.dataset.waiting === String(e.waiting);
        });
      }, expected, { timeout: 20000 });
    } catch (e) {
      const got = (await page.evaluate(shown)).map(({ image, ...rest }) => rest);
      throw new Error("the page never showed " + JSON.stringify(expected)
        + "; it shows " + JSON.stringify(got));
    }
    console.log("MATCHED");
    // A bucket without a rate charts its slots, and says so.
    const jobs = await page.evaluate(() => {
      const p = document.querySelector('section.panel[data-bucket="jobs"]');
      return p && { rate: p.querySelector(".fig.rate .v").textContent,
        caption: p.querySelector(".caption").textContent };
    });
    if (!jobs || jobs.rate !== "—" || !jobs.caption.startsWith("slots in flight")) {
      throw new Error("the slot-only panel shows " + JSON.stringify(jobs));
    }
    const placed = () => [...document.querySelectorAll("section.panel")]
      .map((p) => ({ bucket: p.dataset.bucket, badge: p.querySelector(".badge").textContent,
        box: p.getBoundingClientRect().toJSON() }))
      .sort((a, b) => a.box.top - b.box.top || a.box.left - b.box.left);
    try {
      await page.waitForFunction((f) => {
        const first = eval(f)().slice(0, 2);
        return first.map((p) => p.bucket).sort().join() === "routing,users"
          && first.every((p) => p.badge.startsWith("FROZEN"));
      }, "(" + placed.toString() + ")", { timeout: 5000 });
    } catch (e) {
      throw new Error("the frozen panels are not shown first: "
        + JSON.stringify(await page.evaluate(placed)));
    }
    // One panel for the per-client bucket's two clients, naming the frozen one.
    const routing = await page.evaluate(() => {
      const p = [...document.querySelectorAll('section.panel[data-bucket="routing"]')];
      return p.map((x) => ({ clients: x.dataset.clients, key: x.dataset.key,
        title: x.querySelector(".title").textContent, badge: x.querySelector(".badge").textContent,
        problems: x.querySelector(".problems").textContent }));
    });
    if (routing.length !== 1 || routing[0].clients !== "2" || !routing[0].title.includes("2 clients")
      || !/^FROZEN \d+ s · 1 OF 2 CLIENTS$/.test(routing[0].badge)
      || !routing[0].problems.includes("wallboard-a: FROZEN")) {
      throw new Error("the per-client panel shows " + JSON.stringify(routing));
    }
    // The per-client panel hears from both clients; its chart keeps one
    // live point per half second however many announce.
    const crowded = await page.evaluate(() => {
      const live = panels.get("contact-centre/routing/*").samples.filter((q) => q.live);
      return live.filter((q, k) => k > 0
        && Math.floor(q.t / 500) === Math.floor(live[k - 1].t / 500)).length;
    });
    if (crowded) throw new Error(crowded + " chart points share a half second");
    // A frozen bucket allows nothing now, whatever its learned rate.
    const users = await page.evaluate(() => {
      const v = document.querySelector('section.panel[data-bucket="users"] .fig.rate .v');
      return v && { effective: v.dataset.effective, configured: v.dataset.configured };
    });
    if (!users || users.effective !== "0" || !(Number(users.configured) > 0)) {
      throw new Error("the frozen users panel shows its rate as allowed: " + JSON.stringify(users));
    }
    console.log("ORDERED");
    await page.screenshot({ path: shot });
    // AT LIMIT counts the reserves of the classes served before a waiting
    // one: batch cannot take the 20 of a 100 burst critical keeps back.
    const blockedAt = await page.evaluate(() => {
      const saved = classes;
      classes = { x: [{ name: "critical", order: 0, reserve: 0.2 },
        { name: "batch", order: 2, reserve: 0 }] };
      const r = (tokens, waiting) => ({ tenant: "x", configured_per_min: 600, burst: 100,
        tokens, max_in_flight: 0, in_flight: 0, waiting });
      const out = [blocked(r(15, { batch: 3 })), blocked(r(25, { batch: 3 })),
        blocked(r(15, { critical: 1 })), blocked(r(0.5, { critical: 1 }))];
      classes = saved;
      return out.join();
    });
    if (blockedAt !== "true,false,false,true") throw new Error("blocked(): " + blockedAt);
    console.log("SHOT");
    const badgeOf = (bucket) => document.querySelector(
      `section.panel[data-bucket="${bucket}"] .badge`).textContent;
    if ((await nextLine()) !== "BUSY") throw new Error("expected BUSY");
    try {
      await page.waitForFunction(() => document.querySelector(
        'section.panel[data-bucket="analytics-query"] .badge').textContent.startsWith("AT LIMIT"),
        null, { timeout: 20000 });
    } catch (e) {
      throw new Error("analytics-query never said AT LIMIT: "
        + await page.evaluate(badgeOf, "analytics-query"));
    }
    try {
      await page.waitForFunction(() => document.querySelector(
        'section.panel[data-bucket="recordings"] .badge').textContent.startsWith("AT LIMIT"),
        null, { timeout: 20000 });
    } catch (e) {
      throw new Error("recordings never said AT LIMIT: "
        + await page.evaluate(badgeOf, "recordings"));
    }
    console.log("LIMIT");
    // A page opened now (a wallboard switched on) draws what happened
    // before it opened: the broker sends its last minutes first.
    const later = await browser.newPage({ viewport: { width: 1920, height: 1080 } });
    await later.goto(url);
    const drawn = () => {
      const c = document.querySelector('section.panel[data-bucket="users"] canvas');
      return c && { history: +c.dataset.history, marks: +c.dataset.marks,
        points: +c.dataset.points };
    };
    try {
      await later.waitForFunction((f) => {
        const d = eval(f)();
        return d && d.history >= 2 && d.marks >= 1;
      }, "(" + drawn.toString() + ")", { timeout: 10000 });
    } catch (e) {
      throw new Error("a page opened later did not draw the minutes before it: "
        + JSON.stringify(await later.evaluate(drawn)));
    }
    await later.screenshot({ path: shot.replace(/\.png$/, "-later.png") });
    await later.close();
    console.log("HISTORY");
    if ((await nextLine()) !== "STOPPED") throw new Error("expected STOPPED");
    try {
      await page.waitForFunction(() => document.body.classList.contains("stale")
        && [...document.querySelectorAll("section.panel .badge")]
          .every((b) => b.textContent === "NO DATA")
        && document.getElementById("problem").textContent.startsWith("Not connected"),
        null, { timeout: 20000 });
    } catch (e) {
      throw new Error("the page did not say its data stopped: "
        + await page.evaluate(() => document.body.className + " | "
          + document.getElementById("problem").textContent));
    }
    console.log("STALE");
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(String(e && e.stack || e)); process.exit(1); });
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_what_list_buckets_says() {
    let playwright = tokio::task::spawn_blocking(install).await.unwrap();
    let b = start(CONFIG).await;

    // Load: workers that each hold one lease on a bucket and swap it for a
    // new one as soon as the broker grants it (paced by the buckets' rates,
    // so nothing here sleeps). Once the charts move, a 429 on analytics-query.
    let mut load = tokio::task::JoinSet::new();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for w in 0..8 {
        let mut client = b.client();
        let stop = stop.clone();
        let (method, path, oauth_client) = match w % 4 {
            0 => ("GET", "/api/v2/users/me", ""),
            1 => ("POST", "/api/v2/analytics/conversations/details/query", ""),
            // A per-client bucket: one instance per OAuth client.
            2 => ("GET", "/api/v2/routing/queues", "wallboard-a"),
            _ => ("GET", "/api/v2/routing/queues", "wallboard-b"),
        };
        load.spawn(async move {
            let mut held: Option<String> = None;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut r = req(method, path, 2_000);
                r.tenant = "contact-centre".into();
                r.oauth_client = oauth_client.into();
                let Ok(answer) = client.acquire(r).await else {
                    return;
                };
                let answer = answer.into_inner();
                if answer.granted {
                    if let Some(lease_id) = held.replace(answer.lease_id) {
                        let _ = client
                            .release(quota_broker::pb::ReleaseRequest {
                                lease_id,
                                ..Default::default()
                            })
                            .await;
                    }
                }
            }
        });
    }
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let args = [format!("http://{}/", b.http), shot.display().to_string()];
    let mut node = spawn_node("dashboard-test.js", SCRIPT, &args, &playwright);
    let mut stdin = node.stdin.take().unwrap();
    let mut out = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut errors = node.stderr.take().unwrap();
    let mut batch = tokio::task::JoinSet::new();
    let session = async {
        let line = out.next_line().await.unwrap();
        if line.as_deref() != Some("MOVED") {
            return Err(format!("the charts did not move (node said {line:?})"));
        }
        // A 429 on users: a marker on its chart, a cut rate and a freeze
        // countdown, and the panel moves to the top. And on one client of
        // the per-client bucket: that instance freezes.
        for (path, oauth_client) in [
            ("/api/v2/users/me", ""),
            ("/api/v2/routing/queues", "wallboard-a"),
        ] {
            b.client()
                .report(ReportRequest {
                    tenant: "contact-centre".into(),
                    method: "GET".into(),
                    path: path.into(),
                    oauth_client: oauth_client.into(),
                    http_status: 429,
                    retry_after_ms: 60_000,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        // Stop the load (each worker ends after its current call, so no
        // call is in flight), then tell the page what ListBuckets says.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        while load.join_next().await.is_some() {}
        let expected = settled(&b).await;
        assert_eq!(expected.len(), 5, "{expected:?}");
        assert!(
            expected.iter().any(|e| e["granted"].as_u64() > Some(0)),
            "the load was granted something: {expected:?}"
        );
        let in_flight = expected
            .iter()
            .find(|e| {
                e["key"]
                    .as_str()
                    .is_some_and(|k| k.contains("/analytics-query/"))
            })
            .and_then(|e| e["in_flight"].as_u64())
            .unwrap_or_default();
        stdin
            .write_all(format!("{}\n", serde_json::Value::from(expected)).as_bytes())
            .await
            .unwrap();
        for want in ["MATCHED", "ORDERED", "SHOT"] {
            let line = out.next_line().await.unwrap();
            if line.as_deref() != Some(want) {
                return Err(format!("expected {want}, node said {line:?}"));
            }
        }
        // Every analytics-query slot held (the load's workers still hold
        // theirs), and a caller waiting for one.
        let mut client = b.client();
        let analytics = |wait| {
            let mut r = req(
                "POST",
                "/api/v2/analytics/conversations/details/query",
                wait,
            );
            r.tenant = "contact-centre".into();
            r.priority_class = "critical".into();
            r
        };
        for _ in in_flight..8 {
            let answer = client.acquire(analytics(5_000)).await.unwrap().into_inner();
            if !answer.granted {
                return Err(format!(
                    "a free analytics slot was refused: {}",
                    answer.reason
                ));
            }
        }
        let r = analytics(60_000);
        let waiter = tokio::spawn(async move { client.acquire(r).await });
        // Batch callers drain recordings down to what critical and
        // interactive keep back (2 of its burst of 10), then wait for
        // the refill: permits are left, but not for them.
        for _ in 0..2 {
            let mut client = b.client();
            batch.spawn(async move {
                loop {
                    let mut r = req("GET", "/api/v2/recording/jobs", 60_000);
                    r.tenant = "contact-centre".into();
                    r.priority_class = "batch".into();
                    if client.acquire(r).await.is_err() {
                        return;
                    }
                }
            });
        }
        stdin.write_all(b"BUSY\n").await.unwrap();
        for want in ["LIMIT", "HISTORY"] {
            let line = out.next_line().await.unwrap();
            if line.as_deref() != Some(want) {
                return Err(format!("expected {want}, node said {line:?}"));
            }
        }
        Ok(waiter)
    };
    let outcome = tokio::time::timeout(LIMIT, session).await;
    batch.abort_all();
    // The broker stops: the page must not go on showing its last figures
    // as if they were current.
    let outcome = match outcome {
        Ok(Ok(waiter)) => {
            b.stop().await;
            waiter.abort();
            let stale = async {
                stdin.write_all(b"STOPPED\n").await.unwrap();
                out.next_line().await.unwrap()
            };
            match tokio::time::timeout(Duration::from_secs(30), stale).await {
                Ok(Some(line)) if line == "STALE" => Ok(Ok(())),
                Ok(line) => Ok(Err(format!("expected STALE, node said {line:?}"))),
                Err(e) => Err(e),
            }
        }
        Ok(Err(e)) => Ok(Err(e)),
        Err(e) => Err(e),
    };
    let _ = node.start_kill();
    let mut log = String::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_string(&mut errors, &mut log),
    )
    .await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e}\nnode's stderr:\n{log}"),
        Err(_) => panic!("the browser session took over {LIMIT:?}\nnode's stderr:\n{log}"),
    }
    assert!(shot.is_file(), "no screenshot at {}", shot.display());
}

/// ListBuckets as the page should show it, once nothing waits and two
/// reads in a row agree (bounded).
async fn settled(b: &super::observe::Observed) -> Vec<serde_json::Value> {
    let read = || async {
        let list = b
            .admin()
            .list_buckets(ListBucketsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let waiting: u32 = list.buckets.iter().flat_map(|s| s.waiting.values()).sum();
        // One panel per bucket: a per-client bucket's instances summed.
        let mut panels = std::collections::BTreeMap::<String, [f64; 6]>::new();
        for s in &list.buckets {
            let client = if s.scope == "oauth_client" {
                "*"
            } else {
                &s.oauth_client
            };
            let sum = panels
                .entry(format!("{}/{}/{}", s.tenant, s.bucket, client))
                .or_default();
            for (k, v) in [
                s.granted_total as f64,
                s.throttled_total as f64,
                s.configured_rate_per_min,
                f64::from(s.in_flight),
                f64::from(s.max_in_flight),
                f64::from(s.waiting.values().sum::<u32>()),
            ]
            .into_iter()
            .enumerate()
            {
                sum[k] += v;
            }
        }
        let figures: Vec<serde_json::Value> = panels
            .into_iter()
            .map(|(key, f)| {
                serde_json::json!({
                    "key": key,
                    "granted": f[0] as u64,
                    "throttled": f[1] as u64,
                    "configured": f[2],
                    "in_flight": f[3] as u64,
                    "max_in_flight": f[4] as u64,
                    "waiting": f[5] as u64,
                })
            })
            .collect();
        (waiting, figures)
    };
    tokio::time::timeout(Duration::from_secs(20), async {
        let mut last = read().await;
        loop {
            let now = read().await;
            if now.0 == 0 && now == last {
                return now.1;
            }
            last = now;
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the broker settled after the load stopped")
}
