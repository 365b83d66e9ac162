//! The dashboard in a real browser: headless Chromium (Debian `chromium`)
//! driven by Playwright (`playwright-core`, pinned, installed with npm under
//! target/), against a broker under load. It waits for the charts to move,
//! checks that the numbers shown match ListBuckets once the load stops,
//! that a frozen bucket is shown first and one at its limit says so (every
//! slot held, or batch held back by the reserve of the classes above it),
//! that a page opened later draws the minutes before it (the 429
//! included), saves a screenshot (`target/tmp/dashboard.png`; the README
//! shows a copy, docs/dashboard.png), and that a page whose broker stopped
//! says it has no data instead of showing the last figures as current;
//! that a page opened after a per-client bucket's OAuth clients were
//! dropped charts each only while it existed; that a paused per-client
//! bucket no client uses has its panel (PAUSED, 0 clients); and that eight
//! tabs of it in one browser all go live (they share one feed).
//! Anything that cannot be installed fails the test, saying what.

use super::harness::req;
use super::observe::start;
use quota_broker::pb::{ListBucketsRequest, ReportRequest};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The Playwright version installed (its Chromium protocol fits Debian
/// bookworm's Chromium).
const PLAYWRIGHT: &str = "playwright-core@1.65.1";
/// Bound on the whole browser session.
const LIMIT: Duration = Duration::from_secs(120);

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

/// Installs Chromium, Node.js, npm and Playwright; the Playwright directory.
fn install() -> PathBuf {
    // Both browser tests start at once: two npm runs writing one
    // node_modules would leave a half-written package to the first.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    testsvc::apt_install(&["chromium", "nodejs"]).unwrap_or_else(|e| {
        panic!("the dashboard test needs Chromium and Node.js: {e}");
    });
    let has_npm = std::process::Command::new("npm")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_npm {
        // Debian's nodejs comes without npm; some other builds bundle it.
        testsvc::apt_install(&["npm"])
            .unwrap_or_else(|e| panic!("the dashboard test needs npm: {e}"));
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("playwright");
    if !dir
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::process::Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg(PLAYWRIGHT)
            .output()
            .unwrap_or_else(|e| panic!("cannot run npm: {e}"));
        assert!(
            out.status.success(),
            "npm install {PLAYWRIGHT} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

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
    let script = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-test.js");
    std::fs::write(&script, SCRIPT).unwrap();
    let mut node = tokio::process::Command::new("node")
        .arg(&script)
        .arg(format!("http://{}/", b.http))
        .arg(&shot)
        .env("PW_DIR", &playwright)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run node: {e}"));
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

/// With tokens: a page opened with a wrong `#token=` says it was refused;
/// the right one typed into its address is traded for a cookie and taken
/// out of the address, never put in a request's URL; the page shows only
/// the token's tenants, and after a reload without it goes on with the
/// cookie. Prints OK.
const TOKEN_SCRIPT: &str = r##"
const { chromium } = require(process.env.PW_DIR + "/node_modules/playwright-core");
const [url, token] = process.argv.slice(2);
(async () => {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu"],
  });
  try {
    const page = await browser.newPage();
    page.on("console", (m) => console.error("page:", m.text()));
    const sent = [];
    page.on("request", (r) => sent.push(r.url()));
    const live = () => document.querySelectorAll("section.panel").length >= 1
      && document.getElementById("conn").textContent === "live";
    // A wrong token first: refused, and said so.
    await page.goto(url + "#token=wrong-token");
    await page.waitForFunction(() => !document.getElementById("problem").hidden
      && document.getElementById("conn").textContent === "refused", null, { timeout: 20000 });
    // Then the right one typed into the address, as the refusal advises.
    await page.evaluate((t) => { location.hash = "#token=" + encodeURIComponent(t); }, token);
    await page.waitForFunction(live, null, { timeout: 20000 });
    const state = () => ({ hash: location.hash, cookie: document.cookie,
      tenants: [...new Set([...document.querySelectorAll("section.panel")]
        .map((p) => p.dataset.tenant))].join() });
    const first = await page.evaluate(state);
    if (first.hash !== "" || first.cookie !== "" || first.tenants !== "t") {
      throw new Error("after opening with the token: " + JSON.stringify(first));
    }
    await page.reload();
    await page.waitForFunction(live, null, { timeout: 20000 });
    const again = await page.evaluate(state);
    if (again.tenants !== "t") throw new Error("after a reload: " + JSON.stringify(again));
    const leaked = sent.filter((u) => /\/(events|session)/.test(u) && u.includes(token));
    if (leaked.length) throw new Error("the token was in a request URL: " + leaked.join(" "));
    if (!sent.some((u) => u.endsWith("/session"))) throw new Error("no POST /session: " + sent.join(" "));
    console.log("OK");
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(String(e && e.stack || e)); process.exit(1); });
"##;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_keeps_its_token_out_of_urls() {
    use super::observe::{config, tokens_config, TOKEN};
    let playwright = tokio::task::spawn_blocking(install).await.unwrap();
    let b = start(&config(&tokens_config())).await;
    let args = [format!("http://{}/", b.http), TOKEN.to_owned()];
    let out = node("dashboard-token-test.js", TOKEN_SCRIPT, &args, &playwright).await;
    b.stop().await;
    assert_said_ok(&out);
}

/// Runs the node script `source` (written to `name`) with `args` and the
/// Playwright install at `playwright`, for at most [`LIMIT`].
async fn node(
    name: &str,
    source: &str,
    args: &[String],
    playwright: &Path,
) -> std::process::Output {
    let script = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&script, source).unwrap();
    let run = tokio::process::Command::new("node")
        .arg(&script)
        .args(args)
        .env("PW_DIR", playwright)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(LIMIT, run)
        .await
        .unwrap_or_else(|_| panic!("the browser session took over {LIMIT:?}"))
        .unwrap_or_else(|e| panic!("cannot run node: {e}"))
}

/// The script exited 0 having printed `OK` alone.
fn assert_said_ok(out: &std::process::Output) {
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "OK",
        "node said:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A per-client bucket of one OAuth client at a time: each new client
/// makes the broker drop the last one (idle and full) to make room.
const DROPPED_CONFIG: &str = r#"
[server]
shutdown_grace_ms = 1000
state_dir = ""
[[tenants]]
id = "t"
[[tenants.buckets]]
name = "pc"
scope = "oauth_client"
routes = ["GET /api/v2/routing/**"]
permits = 600
window_ms = 60000
burst = 2
max_clients = 1
"#;

/// A page opened after the broker dropped OAuth clients of a per-client
/// bucket (their history is sent, marked dropped): its chart never shows
/// more than the instances that existed at each point allowed (argv: that
/// most, per minute), and its figure says what ListBuckets says (one
/// client, that rate). Prints OK.
const DROPPED_SCRIPT: &str = r#"
const { chromium } = require(process.env.PW_DIR + "/node_modules/playwright-core");
const [url, most, dropped] = process.argv.slice(2).map((a, k) => k ? Number(a) : a);
(async () => {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu"],
  });
  try {
    const page = await browser.newPage();
    page.on("console", (m) => console.error("page:", m.text()));
    await page.goto(url);
    const read = () => {
      const p = document.querySelector('section.panel[data-bucket="pc"]');
      const panel = panels.get("t/pc/*");
      if (!p || !panel) return null;
      const rate = p.querySelector(".fig.rate .v").dataset;
      return { clients: p.dataset.clients, effective: Number(rate.effective),
        configured: Number(rate.configured), history: +p.querySelector("canvas").dataset.history,
        conn: document.getElementById("conn").textContent, gone: (panel.gone || []).length,
        samples: panel.samples.filter((q) => !q.gap).map(({ t, eff, conf }) => ({ t, eff, conf })) };
    };
    // (The figures are set by the first bucket event, which comes after
    // the history: the chart is drawn from all of it by then.)
    try {
      await page.waitForFunction((f) => {
        const r = eval(f)();
        return r && r.conn === "live" && r.configured > 0 && r.history >= 2;
      }, "(" + read.toString() + ")", { timeout: 20000 });
    } catch (e) {
      throw new Error("the per-client panel never showed: " + JSON.stringify(await page.evaluate(read)));
    }
    const r = await page.evaluate(read);
    const over = r.samples.filter((q) => q.eff > most || q.conf > most);
    const last = r.samples[r.samples.length - 1];
    if (over.length || r.clients !== "1" || r.effective !== most || r.configured !== most
      || last.eff !== most || last.conf !== most || r.gone !== dropped) {
      throw new Error("the chart should never exceed " + most + "/min (one client at a time) and "
        + "end at it, with " + dropped + " dropped clients' history drawn; it shows "
        + JSON.stringify({ ...r, over }));
    }
    console.log("OK");
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(String(e && e.stack || e)); process.exit(1); });
"#;

/// The broker's history (what `/events` sends first, up to its first
/// `instances` event) has a point of `client`.
async fn in_history(http: std::net::SocketAddr, client: &str) -> bool {
    use tokio::io::AsyncReadExt;
    let mut feed = tokio::net::TcpStream::connect(http).await.unwrap();
    feed.write_all(format!("GET /events HTTP/1.1\r\nHost: {http}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("event: instances") {
        match feed.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&seen);
    let history = text.split("event: instances").next().unwrap_or_default();
    history.contains(&format!("\"oauth_client\":\"{client}\""))
}

/// The dropped clients' points are made on a paused clock (the broker's
/// clock is the test's): a page opening samples the history unless a
/// sample was read within half a second (the sampler's `OPEN_SAMPLE`),
/// and a client's instance is full again, so dropped by the next client's
/// call, once its permit has refilled (600/min: 100 ms). The browser runs
/// on the real clock, resumed.
#[tokio::test(start_paused = true)]
async fn a_page_opened_later_counts_dropped_oauth_clients_only_while_they_existed() {
    let playwright = tokio::task::spawn_blocking(install).await.unwrap();
    let b = start(DROPPED_CONFIG).await;
    let clients = ["o1", "o2", "a", "b", "c"];
    for client in clients {
        let mut r = req("GET", "/api/v2/routing/queues", 2_000);
        r.oauth_client = client.into();
        assert!(b.client().acquire(r).await.unwrap().into_inner().granted);
        // The one before was dropped: only this client's instance exists.
        let list = b
            .admin()
            .list_buckets(ListBucketsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .buckets;
        let names: Vec<&str> = list.iter().map(|s| s.oauth_client.as_str()).collect();
        assert_eq!(names, [client], "{list:?}");
        // Half a second on: a page opening samples the history again...
        tokio::time::advance(Duration::from_millis(500)).await;
        // ...so the client is in the broker's history...
        assert!(
            in_history(b.http, client).await,
            "{client} is not in the history"
        );
        // ...and idle and full again, so the next client's call drops it.
        let list = b
            .admin()
            .list_buckets(ListBucketsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .buckets;
        assert!(
            list.iter().all(|s| s.tokens_available >= 2.0),
            "{client} is not full again: {list:?}"
        );
    }
    tokio::time::resume();
    let args = [
        format!("http://{}/", b.http),
        // One instance at a time, of 600/min each.
        "600".to_owned(),
        // The dropped clients, and the bucket's unused row before the first.
        clients.len().to_string(),
    ];
    let out = node(
        "dashboard-dropped-test.js",
        DROPPED_SCRIPT,
        &args,
        &playwright,
    )
    .await;
    b.stop().await;
    assert_said_ok(&out);
}

/// Eight tabs of the dashboard in one browser (one context), each opened
/// with `#token=`: over HTTP/1.1 a browser opens at most 6 connections to
/// a host, and each tab's feed would hold one. Every tab loads and shows
/// the figures (argv: the bucket's granted total), prints OPEN; on a line
/// with the new total every tab shows it (the feed is live in each), and
/// so does a page whose browser has no SharedWorker (its own feed); prints
/// OK.
const TABS_SCRIPT: &str = r##"
const { chromium } = require(process.env.PW_DIR + "/node_modules/playwright-core");
const readline = require("readline");
const [url, token, first] = process.argv.slice(2);
const lines = readline.createInterface({ input: process.stdin });
const nextLine = () => new Promise((ok) => lines.once("line", ok));
const TABS = 8;
const shows = (want) => {
  const p = document.querySelector("section.panel");
  return document.getElementById("conn").textContent === "live" && !!p
    && p.querySelector(".fig.granted .v").dataset.value === want;
};
const state = () => document.getElementById("conn").textContent + " | "
  + document.getElementById("problem").textContent + " | "
  + [...document.querySelectorAll(".fig.granted .v")].map((v) => v.dataset.value).join();
const everyTab = async (tabs, want) => {
  for (const [k, page] of tabs.entries()) {
    try {
      await page.waitForFunction(shows, want, { timeout: 20000 });
    } catch (e) {
      throw new Error("tab " + k + " never showed " + want + " granted: " + await page.evaluate(state));
    }
  }
};
(async () => {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu"],
  });
  try {
    const context = await browser.newContext();
    const tabs = [];
    for (let k = 0; k < TABS; k++) {
      const page = await context.newPage();
      page.on("console", (m) => console.error("tab " + k + ":", m.text()));
      try {
        await page.goto(url + "#token=" + encodeURIComponent(token), { timeout: 15000 });
      } catch (e) {
        throw new Error("tab " + k + " never loaded: " + e.message);
      }
      tabs.push(page);
    }
    await everyTab(tabs, first);
    console.log("OPEN");
    const now = await nextLine();
    await everyTab(tabs, now);
    // Without SharedWorker: the page's own feed.
    const plain = await browser.newContext();
    await plain.addInitScript(() => { delete window.SharedWorker; });
    const alone = await plain.newPage();
    alone.on("console", (m) => console.error("alone:", m.text()));
    await alone.goto(url + "#token=" + encodeURIComponent(token));
    if (await alone.evaluate(() => typeof SharedWorker) !== "undefined") {
      throw new Error("SharedWorker is still there");
    }
    await everyTab([alone], now);
    console.log("OK");
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(String(e && e.stack || e)); process.exit(1); });
"##;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_tabs_of_the_dashboard_in_one_browser_all_go_live() {
    use super::observe::{config, tokens_config, TOKEN};
    let playwright = tokio::task::spawn_blocking(install).await.unwrap();
    let b = start(&config(&tokens_config())).await;
    let grant = || async {
        let mut r = tonic::Request::new(req("GET", "/api/v2/users/1", 0));
        r.metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        assert!(b.client().acquire(r).await.unwrap().into_inner().granted);
    };
    grant().await;
    let script = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-tabs-test.js");
    std::fs::write(&script, TABS_SCRIPT).unwrap();
    let mut node = tokio::process::Command::new("node")
        .arg(&script)
        .arg(format!("http://{}/", b.http))
        .arg(TOKEN)
        .arg("1")
        .env("PW_DIR", &playwright)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run node: {e}"));
    let mut stdin = node.stdin.take().unwrap();
    let mut out = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut errors = node.stderr.take().unwrap();
    let session = async {
        let line = out.next_line().await.unwrap();
        if line.as_deref() != Some("OPEN") {
            return Err(format!("expected OPEN, node said {line:?}"));
        }
        grant().await;
        stdin.write_all(b"2\n").await.unwrap();
        let line = out.next_line().await.unwrap();
        if line.as_deref() != Some("OK") {
            return Err(format!("expected OK, node said {line:?}"));
        }
        Ok(())
    };
    let outcome = tokio::time::timeout(LIMIT, session).await;
    let _ = node.start_kill();
    let mut log = String::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_string(&mut errors, &mut log),
    )
    .await;
    b.stop().await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e}\nnode's stderr:\n{log}"),
        Err(_) => panic!("the browser session took over {LIMIT:?}\nnode's stderr:\n{log}"),
    }
}

/// The feed's watchdog (dashboard-feed.js), under Node.js with a stand-in
/// EventSource and a clock the script moves: a feed that stays open but
/// says nothing for three of the broker's 15 s census intervals (a broker
/// that hangs, a network that drops packets) is told lost, so the page
/// shows NO DATA, and opened again; one that hears the census is not.
#[tokio::test]
async fn a_feed_silent_for_45_seconds_is_told_lost_and_opened_again() {
    testsvc::apt_install(&["nodejs"]).unwrap_or_else(|e| {
        panic!("the dashboard feed test needs Node.js: {e}");
    });
    let feed = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http/assets/dashboard-feed.js");
    let script = format!(
        "const FEED = {:?};\n{}",
        feed.display().to_string(),
        r#"
let now = 0;
const timers = [];
let nextId = 1;
globalThis.setInterval = (f, ms) => { const id = nextId++; timers.push({ id, f, ms, at: now + ms, every: true }); return id; };
globalThis.setTimeout = (f, ms) => { const id = nextId++; timers.push({ id, f, ms, at: now + ms, every: false }); return id; };
globalThis.clearInterval = globalThis.clearTimeout = (id) => {
  const i = timers.findIndex((t) => t.id === id); if (i >= 0) timers.splice(i, 1);
};
Date.now = () => now;
const advance = (ms) => {
  const end = now + ms;
  for (;;) {
    const due = timers.filter((t) => t.at <= end).sort((a, b) => a.at - b.at)[0];
    if (!due) break;
    now = due.at;
    if (due.every) due.at += due.ms; else timers.splice(timers.indexOf(due), 1);
    due.f();
  }
  now = end;
};
const opened = [];
class EventSource {
  constructor(url) { this.url = url; this.readyState = 0; this.on = {}; opened.push(this); }
  addEventListener(type, f) { (this.on[type] = this.on[type] || []).push(f); }
  close() { this.readyState = 2; }
  fire(type, data) { if (type === "open") this.readyState = 1; for (const f of this.on[type] || []) f({ data }); }
}
EventSource.CONNECTING = 0; EventSource.OPEN = 1; EventSource.CLOSED = 2;
globalThis.EventSource = EventSource;
globalThis.fetch = () => Promise.reject(new Error("no fetch here"));
const src = require("fs").readFileSync(FEED, "utf8");
const openFeed = new Function(src + "\nreturn openFeed;")();
const told = [];
openFeed("/events", (m) => told.push(m.type));
const check = (ok, what) => { if (!ok) { console.error(what, JSON.stringify({ told, opened: opened.length })); process.exit(1); } };
opened[0].fire("open");
// Two minutes of a census every 15 s: live all along.
for (let k = 0; k < 8; k++) { advance(15000); opened[0].fire("instances", "{}"); }
check(!told.includes("error") && opened.length === 1, "a feed that hears its census was told lost");
// Then nothing: lost within 50 s, and opened again.
advance(50000);
check(told.includes("error"), "a silent feed was never told lost");
check(opened.length === 2 && opened[0].readyState === 2, "the silent feed was not opened again");
opened[1].fire("open");
check(told[told.length - 1] === "open", "the new feed did not open");
console.log("OK");
"#
    );
    let out = tokio::process::Command::new("node")
        .arg("-e")
        .arg(script)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), out)
        .await
        .expect("node finished within 60 s")
        .expect("node runs");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("OK"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A paused per-client bucket no client uses: its panel says PAUSED and
/// 0 clients (argv: the page), prints SEEN; on a line (a client used it,
/// the bucket resumed) it says OK and 1 client, prints OK.
const UNUSED_SCRIPT: &str = r#"
const { chromium } = require(process.env.PW_DIR + "/node_modules/playwright-core");
const readline = require("readline");
const [url] = process.argv.slice(2);
const lines = readline.createInterface({ input: process.stdin });
const nextLine = () => new Promise((ok) => lines.once("line", ok));
(async () => {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu"],
  });
  try {
    const page = await browser.newPage();
    page.on("console", (m) => console.error("page:", m.text()));
    await page.goto(url);
    const state = () => {
      const p = document.querySelector('section.panel[data-bucket="pc"]');
      return p ? p.querySelector(".badge").textContent + " | " + p.querySelector(".client").textContent
        : "no panel (" + document.querySelectorAll("section.panel").length + " panels)";
    };
    const shows = async (want, what) => {
      try {
        await page.waitForFunction((w) => {
          const p = document.querySelector('section.panel[data-bucket="pc"]');
          return !!p && p.querySelector(".badge").textContent + " | "
            + p.querySelector(".client").textContent === w;
        }, want, { timeout: 20000 });
      } catch (e) {
        throw new Error(what + ": the panel shows " + await page.evaluate(state) + ", not " + want);
      }
    };
    await shows("PAUSED | 0 clients", "paused, no client");
    console.log("SEEN");
    await nextLine();
    await shows("OK | 1 client", "resumed, one client");
    console.log("OK");
  } finally {
    await browser.close();
    lines.close();
  }
})().catch((e) => { console.error(String(e && e.stack || e)); process.exit(1); });
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_per_client_bucket_no_client_uses_has_its_panel() {
    use quota_broker::pb::{PauseBucketRequest, ResumeBucketRequest};
    let playwright = tokio::task::spawn_blocking(install).await.unwrap();
    let b = start(DROPPED_CONFIG).await;
    b.admin()
        .pause_bucket(PauseBucketRequest {
            tenant: "t".into(),
            bucket: "pc".into(),
            reason: "maintenance".into(),
        })
        .await
        .unwrap();
    let script = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-unused-test.js");
    std::fs::write(&script, UNUSED_SCRIPT).unwrap();
    let mut child = tokio::process::Command::new("node")
        .arg(&script)
        .arg(format!("http://{}/", b.http))
        .env("PW_DIR", &playwright)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run node: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(LIMIT, out.next_line()).await;
    if !matches!(&first, Ok(Ok(Some(l))) if l == "SEEN") {
        let rest = child.wait_with_output().await.unwrap();
        panic!(
            "node said {first:?}:\n{}",
            String::from_utf8_lossy(&rest.stderr)
        );
    }
    b.admin()
        .resume_bucket(ResumeBucketRequest {
            tenant: "t".into(),
            bucket: "pc".into(),
        })
        .await
        .unwrap();
    let mut r = req("GET", "/api/v2/routing/queues", 2_000);
    r.oauth_client = "o1".into();
    assert!(b.client().acquire(r).await.unwrap().into_inner().granted);
    stdin.write_all(b"go\n").await.unwrap();
    let last = tokio::time::timeout(LIMIT, out.next_line()).await;
    let rest = tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .expect("the browser session ends")
        .unwrap();
    b.stop().await;
    assert!(
        matches!(&last, Ok(Ok(Some(l))) if l == "OK") && rest.status.success(),
        "node said {last:?}:\n{}",
        String::from_utf8_lossy(&rest.stderr)
    );
}
