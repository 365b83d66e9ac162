//! The dashboard with tokens in headless Chromium: a wrong `#token=` is
//! refused and said so; the right one is traded for a session cookie, taken
//! out of the address and put in no request's URL; the page shows only the
//! token's tenants and goes on with the cookie after a reload.

use super::{assert_said_ok, install, node};
use crate::observe::start;

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
