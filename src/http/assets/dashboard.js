// quota-broker dashboard: one panel per bucket instance, fed by the
// broker's server-sent events (/events: the last minutes of each instance,
// then the Watch feed). Charts are drawn on a canvas here; nothing is
// fetched from elsewhere.
"use strict";

const WINDOW_MS = 5 * 60 * 1000;   // chart span, at most
const MIN_SPAN_MS = 30 * 1000;     // chart span, at least (a fresh page zooms in)
let since = Date.now();            // the oldest data shown (the broker's history reaches back)
const MAX_SAMPLES = 3000;          // per panel, oldest dropped
const USAGE_MS = 20 * 1000;        // granted per minute, over this trailing span
const SWEEP_MS = 3000;             // after a (re)connect, panels not announced by then are gone
const panels = new Map();          // key -> panel state
let feed = 0;                      // connections so far; a panel remembers the last that announced it
let lostAt = 0;                    // when the feed went down (0: it is up)
let refused = "";                  // why the broker refused the feed, when it did

const params = new URLSearchParams(location.search);
const hash = new URLSearchParams(location.hash.slice(1));
const tenant = params.get("tenant") || "";
const token = hash.get("token") || "";
document.getElementById("scope").textContent = tenant ? "tenant " + tenant : "all tenants";

function fmtRate(perMin) {
  if (perMin >= 100) return Math.round(perMin).toLocaleString("en");
  return perMin.toFixed(1);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function figure(label, cls) {
  const f = el("div", "fig " + (cls || ""));
  const v = el("div", "v");
  f.append(v, el("div", "l", label));
  return { root: f, v };
}

function panelFor(r) {
  const key = r.tenant + "/" + r.bucket + "/" + r.oauth_client;
  let p = panels.get(key);
  if (p) return p;
  const root = el("section", "panel");
  root.dataset.key = key;
  root.dataset.tenant = r.tenant;
  root.dataset.bucket = r.bucket;
  root.dataset.oauthClient = r.oauth_client;
  const title = el("div", "title");
  const badge = el("span", "badge", "OK");
  const name = el("span", "name", r.bucket);
  name.title = r.bucket;
  title.append(name, el("span", "tenant", r.tenant));
  if (r.oauth_client) title.append(el("span", "client", "client " + r.oauth_client));
  title.append(badge);
  const figs = el("div", "figures");
  const rate = figure("per min / configured", "rate");
  const slots = figure("slots in flight", "slots");
  const granted = figure("granted", "granted");
  const thr = figure("429s", "thr");
  figs.append(rate.root, slots.root, granted.root, thr.root);
  const caption = el("div", "caption");
  const canvas = el("canvas");
  canvas.dataset.points = "0";
  canvas.dataset.history = "0";
  canvas.dataset.marks = "0";
  const waiting = el("div", "waiting");
  root.append(title, figs, caption, canvas, waiting);
  insertSorted(root, key);
  p = { key, root, badge, rate, slots, granted, thr, caption, canvas, waiting,
        samples: [], marks: [], grants: [], since: Date.now(), last: null, frozenUntil: 0,
        histFeed: 0, histTotal: 0, histSlots: false,
        feed: 0 };
  panels.set(key, p);
  return p;
}

function insertSorted(root, key) {
  const main = document.getElementById("panels");
  for (const other of main.children) {
    if (other.dataset.key > key) { main.insertBefore(root, other); return; }
  }
  main.append(root);
}

// A bucket with no rate charts its slots instead.
function slotsOnly(r) {
  return !(r.configured_per_min > 0) && r.max_in_flight > 0;
}

// What the instance showed over the last minutes, as the broker remembers
// it (a point per change, at most one every 2 s): the chart and its 429
// marks start there instead of empty. Each point is [ms ago, allowed per
// minute, configured per minute, granted total, 429s total, slots in
// flight, slot limit]; it replaces what the page drew before (the broker's
// memory also covers a time the feed was down).
function history(h) {
  if (!h.points.length) return;
  const p = panelFor(h);
  const now = Date.now();
  const pts = h.points.map((a) => ({ t: now - a[0], eff: a[1], conf: a[2], granted: a[3],
    thr: a[4], inFlight: a[5], max: a[6] }));
  const last = pts[pts.length - 1];
  const slots = !(last.conf > 0) && last.max > 0;
  p.histSlots = slots;
  let base = 0;
  p.samples = pts.map((q, i) => {
    if (slots) return { t: q.t, eff: q.inFlight, conf: q.max, used: q.inFlight };
    // Granted per minute over the trailing USAGE_MS, as the live line.
    while (base + 1 < i && pts[base + 1].t <= q.t - USAGE_MS) base += 1;
    const from = pts[base];
    const span = Math.max(q.t - from.t, 1000);
    return { t: q.t, eff: q.eff, conf: q.conf,
      used: i === 0 ? 0 : Math.max(0, q.granted - from.granted) * 60000 / span };
  });
  p.marks = pts.filter((q, i) => i > 0 && q.thr > pts[i - 1].thr).map((q) => q.t);
  // The live granted line goes on from these totals.
  p.grants = pts.map((q, i) => ({ t: q.t, total: q.granted, before: i ? pts[i - 1].granted : q.granted }));
  p.since = pts[0].t;
  p.histFeed = feed;
  p.histTotal = last.granted;
  since = Math.min(since, Math.max(pts[0].t, now - WINDOW_MS));
  p.canvas.dataset.points = String(p.samples.length);
  p.canvas.dataset.history = String(pts.length);
  p.canvas.dataset.marks = String(p.marks.length);
  draw(p, now);
}

// Permits granted per minute over the trailing USAGE_MS, from the totals
// the feed announced (it announces every change).
function usage(p, now) {
  while (p.grants.length > 1 && p.grants[1].t <= now - USAGE_MS) p.grants.shift();
  if (!p.last || p.grants.length === 0) return 0;
  const first = p.grants[0];
  const since = first.t <= now - USAGE_MS ? first.total : first.before;
  const span = Math.min(Math.max(now - p.since, 1000), USAGE_MS);
  return Math.max(0, p.last.granted_total - since) * 60000 / span;
}

function update(r) {
  const p = panelFor(r);
  const now = Date.now();
  // Counted from the first announcement of this connection: grants made
  // while the feed was down (or before the instance was re-created) are
  // not this span's.
  const prior = p.feed === feed && p.last ? p.last.granted_total
    : p.histFeed === feed ? p.histTotal : null;
  const counted = prior !== null && r.granted_total >= prior;
  p.feed = feed;
  if (p.last && r.throttled_total > p.last.throttled_total) p.marks.push(now);
  p.canvas.dataset.marks = String(p.marks.length);
  if (!counted) { p.grants = []; p.since = now; }
  p.grants.push({ t: now, total: r.granted_total, before: counted ? prior : r.granted_total });
  usage(p, now);  // trims what is older than the span
  p.last = r;
  const slots = slotsOnly(r);
  p.samples.push(slots
    ? { t: now, eff: r.in_flight, conf: r.max_in_flight, used: r.in_flight }
    : { t: now, eff: r.effective_per_min, conf: r.configured_per_min, used: usage(p, now) });
  if (p.samples.length > MAX_SAMPLES) p.samples.splice(0, p.samples.length - MAX_SAMPLES);
  p.frozenUntil = r.frozen_ms > 0 ? now + r.frozen_ms : 0;
  p.canvas.dataset.points = String(p.samples.length);
  p.rate.v.innerHTML = "";
  if (slots) p.rate.v.append("—");
  else p.rate.v.append(fmtRate(r.effective_per_min), el("small", "", " / " + fmtRate(r.configured_per_min)));
  p.rate.root.querySelector(".l").textContent = slots ? "no rate limit" : "per min / configured";
  p.caption.textContent = slots
    ? "slots in flight (solid) and the limit (dashed)"
    : "per minute: allowed now (solid), configured (dashed), granted (thin)";
  p.rate.v.dataset.effective = String(r.effective_per_min);
  p.rate.v.dataset.configured = String(r.configured_per_min);
  p.slots.v.textContent = r.max_in_flight ? r.in_flight + " / " + r.max_in_flight : "—";
  p.slots.root.querySelector(".l").textContent = r.held_over > 0
    ? "slots in flight · " + r.held_over + " held over from before a restart"
    : "slots in flight";
  p.slots.v.dataset.inFlight = String(r.in_flight);
  p.slots.v.dataset.max = String(r.max_in_flight);
  p.granted.v.textContent = r.granted_total.toLocaleString("en");
  p.granted.v.dataset.value = String(r.granted_total);
  p.thr.v.textContent = r.throttled_total.toLocaleString("en");
  p.root.dataset.waiting = String(Object.values(r.waiting).reduce((a, n) => a + n, 0));
  p.thr.v.dataset.value = String(r.throttled_total);
  p.waiting.innerHTML = "";
  const classes = Object.entries(r.waiting).filter(([, n]) => n > 0);
  if (classes.length === 0) {
    p.waiting.textContent = "nothing waiting";
  } else {
    p.waiting.append("waiting: ");
    classes.forEach(([c, n], i) => {
      p.waiting.append((i ? " · " : "") + c + " ", el("b", "", String(n)));
    });
  }
  p.root.classList.toggle("paused", r.paused);
  badge(p, now);
}

// What a lead must see first: paused, frozen after 429s, callers waiting
// (the bucket is at its limit), or no data at all (the feed is down).
function badge(p, now) {
  const left = p.frozenUntil - now;
  const r = p.last;
  const waiting = r ? Object.values(r.waiting).reduce((a, n) => a + n, 0) : 0;
  const full = r && r.max_in_flight > 0 && r.in_flight >= r.max_in_flight;
  let text = "OK", cls = "badge";
  if (lostAt) { text = "NO DATA"; cls += " stale"; }
  else if (r && r.paused) { text = "PAUSED"; cls += " paused"; }
  else if (left > 0) { text = "FROZEN " + Math.ceil(left / 1000) + " s"; cls += " frozen"; }
  else if (waiting > 0) { text = "AT LIMIT · " + waiting + " WAITING"; cls += " limit"; }
  else if (full) { text = "SLOTS FULL"; cls += " limit"; }
  if (p.badge.textContent !== text) p.badge.textContent = text;
  p.badge.className = cls;
  p.root.classList.toggle("frozen", !lostAt && left > 0);
  p.root.classList.toggle("limit", !lostAt && left <= 0 && (waiting > 0 || !!full));
  // Problems first: a wallboard shows the top of the page.
  p.root.classList.toggle("alert", !lostAt && text !== "OK");
  p.thr.root.classList.toggle("recent", p.marks.length > 0);
}

function draw(p, now) {
  const c = p.canvas;
  const w = c.clientWidth, h = c.clientHeight, dpr = window.devicePixelRatio || 1;
  if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
    c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
  }
  const g = c.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const span = Math.min(WINDOW_MS, Math.max(MIN_SPAN_MS, now - since));
  const from = now - span;
  while (p.samples.length > 1 && p.samples[1].t < now - WINDOW_MS) p.samples.shift();
  while (p.marks.length && p.marks[0] < from) p.marks.shift();
  let top = 1;
  for (const s of p.samples) top = Math.max(top, s.eff, s.conf, s.used || 0);
  top *= 1.15;
  const pad = { l: 52, r: 8, t: 8, b: 20 };
  const x = (t) => pad.l + (w - pad.l - pad.r) * (t - from) / span;
  const y = (v) => pad.t + (h - pad.t - pad.b) * (1 - v / top);
  const css = getComputedStyle(document.documentElement);
  g.strokeStyle = css.getPropertyValue("--line");
  g.fillStyle = css.getPropertyValue("--dim");
  g.lineWidth = 1;
  g.font = "15px system-ui, sans-serif";
  for (let i = 0; i <= 4; i++) {
    const v = top * i / 4;
    g.beginPath(); g.moveTo(pad.l, y(v)); g.lineTo(w - pad.r, y(v)); g.stroke();
    g.fillText(fmtRate(v), 4, y(v) + 4);
  }
  const step = [5000, 10000, 30000, 60000].find((s) => span / s <= 6) || 60000;
  for (let ago = 0; ago <= span; ago += step) {
    const label = ago === 0 ? "now" : ago < 60000 ? "-" + ago / 1000 + " s" : "-" + ago / 60000 + " min";
    g.fillText(label, Math.min(x(now - ago) - 12, w - 30), h - 4);
  }
  g.strokeStyle = css.getPropertyValue("--thr");
  g.lineWidth = 2;
  for (const t of p.marks) {
    g.beginPath(); g.moveTo(x(t), pad.t); g.lineTo(x(t), h - pad.b); g.stroke();
  }
  const line = (field, color, dash, width) => {
    if (p.samples.length === 0) return;
    g.strokeStyle = color; g.lineWidth = width || 3; g.setLineDash(dash);
    g.beginPath();
    let prev = null;
    for (const s of p.samples) {
      const sx = x(Math.max(s.t, from));
      if (prev === null) g.moveTo(sx, y(s[field]));
      else { g.lineTo(sx, y(prev)); g.lineTo(sx, y(s[field])); }
      prev = s[field];
    }
    g.lineTo(x(now), y(prev));
    g.stroke(); g.setLineDash([]);
  };
  line("conf", css.getPropertyValue("--conf"), [8, 6]);
  if (p.last ? !slotsOnly(p.last) : !p.histSlots) line("used", css.getPropertyValue("--info"), [], 1.5);
  line("eff", css.getPropertyValue("--eff"), []);
}

function render() {
  const now = Date.now();
  for (const p of panels.values()) {
    // The granted line moves with time even when nothing is announced.
    if (!lostAt && p.last && !slotsOnly(p.last)) {
      const s = p.samples[p.samples.length - 1];
      const used = usage(p, now);
      if (s && s.t < now - 1000 && Math.abs(s.used - used) > 1e-9) {
        p.samples.push({ t: now, eff: s.eff, conf: s.conf, used });
      }
    }
    badge(p, now);
    draw(p, now);
  }
  if (refused) {
    problem(refused);
  } else if (lostAt) {
    problem("Not connected to the broker since " + new Date(lostAt).toLocaleTimeString("en-GB")
      + ": the figures below are from then (" + Math.round((now - lostAt) / 1000) + " s ago). Reconnecting…");
  }
}

// Panels the feed did not announce since it (re)connected: bucket
// instances the broker dropped (an OAuth client no longer seen, a bucket
// gone from the config after a restart). The feed announces every
// instance at once when it opens.
function sweep(connection) {
  if (connection !== feed || lostAt) return;
  for (const [key, p] of panels) {
    if (p.feed !== connection) { p.root.remove(); panels.delete(key); }
  }
}

function lost() {
  if (!lostAt) lostAt = Date.now();
  document.body.classList.add("stale");
}

function problem(text) {
  const e = document.getElementById("problem");
  e.hidden = !text;
  e.textContent = text || "";
}

function connect() {
  const q = new URLSearchParams();
  if (tenant) q.set("tenant", tenant);
  if (token) q.set("token", token);
  const conn = document.getElementById("conn");
  const src = new EventSource("/events?" + q.toString());
  src.addEventListener("open", () => {
    conn.textContent = "live"; conn.className = "conn up"; problem("");
    lostAt = 0; refused = ""; feed += 1;
    document.body.classList.remove("stale");
    setTimeout(sweep, SWEEP_MS, feed);
  });
  src.addEventListener("history", (e) => history(JSON.parse(e.data)));
  src.addEventListener("bucket", (e) => update(JSON.parse(e.data)));
  src.addEventListener("error", () => {
    conn.textContent = "reconnecting…"; conn.className = "conn down";
    lost();
    if (src.readyState === EventSource.CLOSED) {
      // Refused (a token is needed, or it is not scoped to the tenant):
      // say so, and try again later in case the broker restarts.
      fetch("/events?" + q.toString()).then((r) => r.ok ? "" : r.text()).then((t) => {
        if (t) {
          refused = t + (token ? "" : " — add #token=YOUR_TOKEN to this page's address");
          problem(refused);
        }
      }).catch(() => {});
      setTimeout(connect, 5000);
    }
  });
}

// Redraws move the time axis and count freezes down; the data itself
// arrives only as events.
setInterval(render, 250);
connect();
