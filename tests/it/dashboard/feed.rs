//! The dashboard's feed: eight tabs in one browser (headless Chromium)
//! all go live on the feed they share, and a browser without SharedWorker
//! opens its own; and the feed's watchdog, under Node.js alone, tells a
//! feed silent for three census intervals lost and opens it again.

use super::{install, spawn_node, LIMIT};
use crate::harness::req;
use crate::observe::start;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

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
    let args = [
        format!("http://{}/", b.http),
        TOKEN.to_string(),
        "1".to_string(),
    ];
    let mut node = spawn_node("dashboard-tabs-test.js", TABS_SCRIPT, &args, &playwright);
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
