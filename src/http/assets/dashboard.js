// quota-broker dashboard: one panel per bucket instance, fed by the
// broker's server-sent events (/events, the Watch feed). Charts are drawn
// on a canvas here; nothing is fetched from elsewhere.
"use strict";

const WINDOW_MS = 5 * 60 * 1000;   // chart span, at most
const MIN_SPAN_MS = 30 * 1000;     // chart span, at least (a fresh page zooms in)
const opened = Date.now();
const MAX_SAMPLES = 3000;          // per panel, oldest dropped
const panels = new Map();          // key -> panel state

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
  title.append(el("span", "name", r.bucket), el("span", "tenant", r.tenant));
  if (r.oauth_client) title.append(el("span", "client", "client " + r.oauth_client));
  title.append(badge);
  const figs = el("div", "figures");
  const rate = figure("per min / configured", "rate");
  const slots = figure("slots in flight", "slots");
  const granted = figure("granted", "granted");
  const thr = figure("429s", "thr");
  figs.append(rate.root, slots.root, granted.root, thr.root);
  const canvas = el("canvas");
  canvas.dataset.points = "0";
  const waiting = el("div", "waiting");
  root.append(title, figs, canvas, waiting);
  insertSorted(root, key);
  p = { key, root, badge, rate, slots, granted, thr, canvas, waiting,
        samples: [], marks: [], last: null, frozenUntil: 0 };
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

function update(r) {
  const p = panelFor(r);
  const now = Date.now();
  if (p.last && r.throttled_total > p.last.throttled_total) p.marks.push(now);
  p.last = r;
  p.samples.push({ t: now, eff: r.effective_per_min, conf: r.configured_per_min });
  if (p.samples.length > MAX_SAMPLES) p.samples.splice(0, p.samples.length - MAX_SAMPLES);
  p.frozenUntil = r.frozen_ms > 0 ? now + r.frozen_ms : 0;
  p.canvas.dataset.points = String(p.samples.length);
  p.rate.v.innerHTML = "";
  p.rate.v.append(fmtRate(r.effective_per_min), el("small", "", " / " + fmtRate(r.configured_per_min)));
  p.rate.v.dataset.effective = String(r.effective_per_min);
  p.rate.v.dataset.configured = String(r.configured_per_min);
  p.slots.v.textContent = r.max_in_flight ? r.in_flight + " / " + r.max_in_flight : "—";
  p.slots.v.dataset.inFlight = String(r.in_flight);
  p.slots.v.dataset.max = String(r.max_in_flight);
  p.granted.v.textContent = r.granted_total.toLocaleString("en");
  p.granted.v.dataset.value = String(r.granted_total);
  p.thr.v.textContent = r.throttled_total.toLocaleString("en");
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
}

function badge(p, now) {
  const left = p.frozenUntil - now;
  let text = "OK", cls = "badge";
  if (p.last && p.last.paused) { text = "PAUSED"; cls += " paused"; }
  else if (left > 0) { text = "FROZEN " + Math.ceil(left / 1000) + " s"; cls += " frozen"; }
  if (p.badge.textContent !== text) p.badge.textContent = text;
  p.badge.className = cls;
  p.root.classList.toggle("frozen", left > 0);
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
  const span = Math.min(WINDOW_MS, Math.max(MIN_SPAN_MS, now - opened));
  const from = now - span;
  while (p.samples.length > 1 && p.samples[1].t < now - WINDOW_MS) p.samples.shift();
  while (p.marks.length && p.marks[0] < from) p.marks.shift();
  let top = 1;
  for (const s of p.samples) top = Math.max(top, s.eff, s.conf);
  top *= 1.15;
  const pad = { l: 52, r: 8, t: 8, b: 20 };
  const x = (t) => pad.l + (w - pad.l - pad.r) * (t - from) / span;
  const y = (v) => pad.t + (h - pad.t - pad.b) * (1 - v / top);
  const css = getComputedStyle(document.documentElement);
  g.strokeStyle = css.getPropertyValue("--line");
  g.fillStyle = css.getPropertyValue("--dim");
  g.font = "13px system-ui, sans-serif";
  g.lineWidth = 1;
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
  const line = (field, color, dash) => {
    if (p.samples.length === 0) return;
    g.strokeStyle = color; g.lineWidth = 3; g.setLineDash(dash);
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
  line("eff", css.getPropertyValue("--eff"), []);
}

function render() {
  const now = Date.now();
  for (const p of panels.values()) { badge(p, now); draw(p, now); }
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
  });
  src.addEventListener("bucket", (e) => update(JSON.parse(e.data)));
  src.addEventListener("error", () => {
    conn.textContent = "reconnecting…"; conn.className = "conn down";
    if (src.readyState === EventSource.CLOSED) {
      // Refused (a token is needed, or it is not scoped to the tenant):
      // say so, and try again later in case the broker restarts.
      fetch("/events?" + q.toString()).then((r) => r.ok ? "" : r.text()).then((t) => {
        if (t) problem(t + (token ? "" : " — add #token=YOUR_TOKEN to this page's address"));
      }).catch(() => {});
      setTimeout(connect, 5000);
    }
  });
}

// Redraws move the time axis and count freezes down; the data itself
// arrives only as events.
setInterval(render, 250);
connect();
