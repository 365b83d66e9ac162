//! A per-client bucket's panel in headless Chromium: a page opened after
//! the broker dropped OAuth clients charts each only while it existed, and
//! a paused bucket no client uses has its panel (PAUSED, 0 clients) until a
//! client uses it (OK, 1 client).

use super::{assert_said_ok, install, node, spawn_node, LIMIT};
use crate::harness::req;
use crate::observe::start;
use quota_broker::pb::ListBucketsRequest;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

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
    let args = [format!("http://{}/", b.http)];
    let mut child = spawn_node(
        "dashboard-unused-test.js",
        UNUSED_SCRIPT,
        &args,
        &playwright,
    );
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
