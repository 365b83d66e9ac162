// quota-broker dashboard: one panel per bucket, fed by the broker's
// server-sent events (/events: the last minutes of each bucket instance,
// then the Watch feed), which a browser's tabs of the dashboard share
// (dashboard-feed.js). An org-wide bucket has one instance; a per-client
// bucket has one per OAuth client, and its panel sums them and names the
// clients with a problem (400 clients make one panel, not 400). Charts are
// drawn on a canvas here; nothing is fetched from elsewhere.
"use strict";

const WINDOW_MS = 5 * 60 * 1000;   // chart span, at most
const MIN_SPAN_MS = 30 * 1000;     // chart span, at least (a fresh page zooms in)
const MAX_SAMPLES = 3000;          // per panel, oldest dropped
const SLOT_MS = 500;               // live chart samples: the last of each slot (a per-client
                                   // panel hears from every client; 300 of them must not
                                   // crowd five minutes out)
const USAGE_MS = 20 * 1000;        // granted per minute, over this trailing span
const MERGE_MS = 1000;             // a per-client panel's history: one point per this span
const LISTED = 4;                  // clients with a problem named under a per-client panel
const HOLD_MS = 10000;             // a panel keeps its place this long after its problem clears
const instances = new Map();       // instance key -> its state (figures, grants counted)
const panels = new Map();          // panel key -> panel (DOM, chart samples, its instances)
let feed = 0;                      // connections so far; an instance remembers the last that announced it
let lostAt = 0;                    // when the feed went down (0: it is up)
let refused = "";                  // why the broker refused the feed, when it did
let since = Date.now();            // the oldest data shown (the broker's history reaches back)

const params = new URLSearchParams(location.search);
let classes = {};                  // per tenant: [{name, order, reserve}] (the instances event)
let stream = null;                 // the feed, shared by the tabs or this page's own ({close})
const tenant = params.get("tenant") || "";

document.getElementById("scope").textContent = tenant ? "tenant " + tenant : "all tenants";

const compact = new Intl.NumberFormat("en", { notation: "compact", maximumFractionDigits: 1 });

function fmtRate(perMin) {
  if (perMin >= 10000) return compact.format(perMin);
  if (perMin >= 100) return Math.round(perMin).toLocaleString("en");
  return perMin.toFixed(1);
}

// A count, short enough to read from across a room (53.3K beyond 9,999).
function fmtCount(n) {
  return n >= 10000 ? compact.format(n) : n.toLocaleString("en");
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

// A per-client bucket's instances share a panel.
function perClient(r) {
  return r.scope === "oauth_client";
}

function panelKey(r) {
  return r.tenant + "/" + r.bucket + "/" + (perClient(r) ? "*" : r.oauth_client);
}

function instanceFor(r) {
  const key = r.tenant + "/" + r.bucket + "/" + r.oauth_client;
  let i = instances.get(key);
  if (i) return i;
  const p = panelFor(r);
  i = { key, panel: p, client: r.oauth_client, last: null, grants: [], since: Date.now(),
        feed: 0, frozenUntil: 0, pts: [], histFeed: 0, histTotal: 0, histThr: 0 };
  instances.set(key, i);
  p.members.add(i);
  return i;
}

function panelFor(r) {
  const key = panelKey(r);
  let p = panels.get(key);
  if (p) return p;
  const group = perClient(r);
  const root = el("section", "panel");
  root.dataset.key = key;
  root.dataset.tenant = r.tenant;
  root.dataset.bucket = r.bucket;
  root.dataset.oauthClient = group ? "*" : r.oauth_client;
  const title = el("div", "title");
  const badge = el("span", "badge", "OK");
  const name = el("span", "name", r.bucket);
  name.title = r.bucket;
  title.append(name, el("span", "tenant", r.tenant));
  const clients = el("span", "client");
  if (group) title.append(clients);
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
  const problems = el("div", "problems");
  root.append(title, figs, caption, canvas, waiting, problems);
  insertSorted(root, key);
  p = { key, group, root, badge, clients, rate, slots, granted, thr, caption, canvas, waiting,
        problems, members: new Set(), samples: [], marks: [], last: null, histDirty: false,
        histSlots: false, retired: { granted: 0, thr: 0 }, gone: [] };
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

// What the panel shows: its one instance, or the sum of a per-client
// bucket's instances.
function combined(p) {
  const rs = [...p.members].map((i) => i.last).filter(Boolean);
  if (rs.length === 0) return null;
  if (!p.group) return rs[0];
  const sum = (f) => rs.reduce((a, r) => a + r[f], 0);
  // Totals also count what instances the broker dropped had counted (an
  // idle client's instance is dropped, and re-created at 0), as /metrics
  // does.
  const waiting = {};
  for (const r of rs) for (const [c, n] of Object.entries(r.waiting)) waiting[c] = (waiting[c] || 0) + n;
  return {
    tenant: rs[0].tenant, bucket: rs[0].bucket, scope: rs[0].scope, oauth_client: "*",
    configured_per_min: sum("configured_per_min"), effective_per_min: sum("effective_per_min"),
    in_flight: sum("in_flight"), held_over: sum("held_over"), max_in_flight: sum("max_in_flight"),
    granted_total: sum("granted_total") + p.retired.granted,
    throttled_total: sum("throttled_total") + p.retired.thr,
    waiting, paused: rs.every((r) => r.paused), clients: rs.filter((r) => !r.unused).length,
  };
}

// Permits granted per minute over the trailing USAGE_MS, from the totals
// the feed announced (it announces every change).
function usage(i, now) {
  while (i.grants.length > 1 && i.grants[1].t <= now - USAGE_MS) i.grants.shift();
  if (!i.last || i.grants.length === 0) return 0;
  const first = i.grants[0];
  const from = first.t <= now - USAGE_MS ? first.total : first.before;
  // Over the whole span even when less of it is known (a page just
  // opened, a broker just restarted): the line then rises to the rate
  // instead of spiking above it.
  return Math.max(0, i.last.granted_total - from) * 60000 / USAGE_MS;
}

function panelUsage(p, now) {
  let used = 0;
  for (const i of p.members) used += usage(i, now);
  return used;
}

// What an instance showed over the last minutes, as the broker remembers
// it (a point per change, at most one every 2 s): the chart and its 429
// marks start there instead of empty. Each point is [ms ago, allowed per
// minute, configured per minute, granted total, 429s total, slots in
// flight, slot limit, paused (1 or 0)]; the panel's chart is rebuilt from its instances'
// points on the next redraw, replacing what the page drew before (the
// broker's memory also covers a time the feed was down). An instance the
// broker dropped (an idle OAuth client's, `dropped`) is no member of the
// panel: its points are part of the chart up to its last one only.
function fromHistory(h) {
  if (!h.points.length) return;
  const now = Date.now();
  // (A paused instance allows nothing, whatever its rate.)
  const pts = h.points.map((a) => ({ t: now - a[0], eff: a[7] ? 0 : a[1], conf: a[2], granted: a[3],
    thr: a[4], inFlight: a[5], max: a[6] }));
  since = Math.min(since, Math.max(pts[0].t, now - WINDOW_MS));
  if (h.dropped) {
    const p = panelFor(h);
    p.gone = p.gone.filter((g) => g.feed === feed).concat([{ feed, pts }]);
    p.histDirty = true;
    return;
  }
  const i = instanceFor(h);
  i.pts = pts;
  // The live granted line goes on from these totals.
  i.grants = i.pts.map((q, k) => ({ t: q.t, total: q.granted, before: k ? i.pts[k - 1].granted : q.granted }));
  i.since = i.pts[0].t;
  i.histFeed = feed;
  i.histTotal = i.pts[i.pts.length - 1].granted;
  i.histThr = i.pts[i.pts.length - 1].thr;
  i.panel.histDirty = true;
}

// A panel's chart from its instances' history: at each point of any of
// them, the sum of each one's latest (for a per-client panel, at most one
// point per MERGE_MS). An instance the broker dropped counts up to its
// last point and in no point after it (the chart says so MERGE_MS later
// at most): carried forward, the OAuth clients a per-client bucket had
// over five minutes would add up to a multiple of what it allows. Its
// totals stay in the sums, as the broker's counts of dropped instances
// stay in the figures.
function rebuild(p) {
  p.histDirty = false;
  const now = Date.now();
  const series = [...p.members].filter((i) => i.histFeed === feed && i.pts.length)
    .map((i) => ({ pts: i.pts, end: Infinity }))
    .concat(p.gone.filter((g) => g.feed === feed)
      .map((g) => ({ pts: g.pts, end: g.pts[g.pts.length - 1].t })));
  if (series.length === 0) return;
  const events = [];
  series.forEach((s, k) => {
    // An instance re-created by the broker starts its totals at 0 again:
    // carry what it had counted, so sums never go down.
    let carry = { granted: 0, thr: 0 }, prev = null;
    for (const q of s.pts) {
      if (prev && q.granted < prev.granted) carry.granted += prev.granted;
      if (prev && q.thr < prev.thr) carry.thr += prev.thr;
      prev = q;
      events.push({ k, q: { ...q, granted: q.granted + carry.granted, thr: q.thr + carry.thr } });
    }
    if (s.end + MERGE_MS <= now) events.push({ k, q: { t: s.end + MERGE_MS }, end: true });
  });
  events.sort((a, b) => a.q.t - b.q.t);
  const latest = new Array(series.length).fill(null);
  const pts = [];
  for (let e = 0; e < events.length; e++) {
    if (!events[e].end) latest[events[e].k] = events[e].q;
    const t = events[e].q.t;
    // One point per MERGE_MS slot for a per-client panel (every point for
    // one instance).
    const slot = (u) => p.group ? Math.floor(u / MERGE_MS) : u;
    if (e + 1 < events.length && slot(events[e + 1].q.t) === slot(t)) continue;
    const sum = (f, all) => latest.reduce((a, q, k) =>
      a + (q && (all || series[k].end >= t) ? q[f] : 0), 0);
    pts.push({ t, eff: sum("eff"), conf: sum("conf"), granted: sum("granted", true),
      thr: sum("thr", true), inFlight: sum("inFlight"), max: sum("max") });
  }
  const last = pts[pts.length - 1];
  const slots = !(last.conf > 0) && last.max > 0;
  p.histSlots = slots;
  // What the page drew before the broker's memory begins (a broker that
  // restarted remembers only since then) stays, with a gap between.
  const begins = pts[0].t;
  const before = p.samples.filter((q) => q.t < begins);
  const marksBefore = p.marks.filter((t) => t < begins);
  if (slots) {
    p.samples = pts.map((q) => ({ t: q.t, eff: q.inFlight, conf: q.max, used: q.inFlight }));
  } else {
    // Granted per minute over the trailing USAGE_MS, as the live line:
    // evaluated at each point and again USAGE_MS after it (when what it
    // counted leaves the span), the totals between points being those of
    // the point before.
    const times = [...new Set(pts.flatMap((q) => [q.t, q.t + USAGE_MS]))]
      .filter((t) => t <= now).sort((a, b) => a - b);
    let k = 0, back = 0;
    p.samples = times.map((t) => {
      while (k + 1 < pts.length && pts[k + 1].t <= t) k += 1;
      while (back + 1 < pts.length && pts[back + 1].t <= t - USAGE_MS) back += 1;
      const q = pts[k];
      const base = pts[back].t <= t - USAGE_MS ? pts[back] : pts[0];
      return { t, eff: q.eff, conf: q.conf,
        used: Math.max(0, q.granted - base.granted) * 60000 / USAGE_MS };
    });
  }
  if (before.length) {
    const gap = begins - before[before.length - 1].t > 5000
      ? [{ t: before[before.length - 1].t + 1, gap: true }] : [];
    p.samples = before.concat(gap, p.samples);
    // The broker's totals start again with it: the figures say so, since
    // the chart still shows the 429s before.
    if (gap.length) p.restarted = true;
  }
  p.marks = marksBefore.concat(pts.filter((q, k) => k > 0 && q.thr > pts[k - 1].thr).map((q) => q.t));
  p.canvas.dataset.points = String(p.samples.length);
  p.canvas.dataset.history = String(pts.length);
  p.canvas.dataset.marks = String(p.marks.length);
  draw(p, Date.now());
}

function update(r) {
  const i = instanceFor(r);
  const p = i.panel;
  const now = Date.now();
  if (p.histDirty) rebuild(p);
  // A per-client bucket's unused row stands for it while no client's
  // instance is there: the two never hold at once.
  for (const o of [...p.members]) {
    if (o !== i && (r.unused || (o.last && o.last.unused))) {
      instances.delete(o.key);
      p.members.delete(o);
    }
  }
  // Counted from the first announcement of this connection (or the
  // history it sent): grants made while the feed was down (or before the
  // instance was re-created) are not this span's.
  const prior = i.feed === feed && i.last ? i.last.granted_total
    : i.histFeed === feed ? i.histTotal : null;
  const counted = prior !== null && r.granted_total >= prior;
  // 429s since what this connection's history or last announcement said
  // (the history already marked the ones before).
  const priorThr = i.feed === feed && i.last ? i.last.throttled_total
    : i.histFeed === feed ? i.histThr : i.last ? i.last.throttled_total : null;
  i.feed = feed;
  if (priorThr !== null && r.throttled_total > priorThr) {
    p.marks.push(now);
    p.canvas.dataset.marks = String(p.marks.length);
  }
  if (!counted) { i.grants = []; i.since = now; }
  i.grants.push({ t: now, total: r.granted_total, before: counted ? prior : r.granted_total });
  usage(i, now);  // trims what is older than the span
  i.last = r;
  i.frozenUntil = r.frozen_ms > 0 ? now + r.frozen_ms : 0;
  show(p, now);
}

// A live chart sample: the last of its SLOT_MS slot replaces the earlier
// ones (a burst of announcements, a snapshot arriving one client at a
// time, draws one point).
function sample(p, q) {
  const last = p.samples[p.samples.length - 1];
  if (last && last.live && Math.floor(last.t / SLOT_MS) === Math.floor(q.t / SLOT_MS)) {
    p.samples[p.samples.length - 1] = { ...q, live: true };
  } else {
    p.samples.push({ ...q, live: true });
  }
  if (p.samples.length > MAX_SAMPLES) p.samples.splice(0, p.samples.length - MAX_SAMPLES);
  p.canvas.dataset.points = String(p.samples.length);
}

// The panel's figures, and a chart sample, from its instances now.
function show(p, now) {
  const r = combined(p);
  if (!r) return;
  p.last = r;
  const slots = slotsOnly(r);
  // A paused or frozen bucket allows nothing now, whatever its rate.
  const allowed = [...p.members].reduce((a, i) => a
    + (i.last && !i.last.paused && !(i.frozenUntil > now) ? i.last.effective_per_min : 0), 0);
  sample(p, slots
    ? { t: now, eff: r.in_flight, conf: r.max_in_flight, used: r.in_flight }
    : { t: now, eff: allowed, conf: r.configured_per_min, used: panelUsage(p, now) });
  p.canvas.dataset.points = String(p.samples.length);
  if (p.group) p.clients.textContent = r.clients + (r.clients === 1 ? " client" : " clients");
  p.root.dataset.clients = String(p.group ? r.clients : 1);
  p.rate.v.innerHTML = "";
  if (slots) p.rate.v.append("—");
  else p.rate.v.append(fmtRate(allowed), el("small", "", " / " + fmtRate(r.configured_per_min)));
  p.rate.root.querySelector(".l").textContent = slots ? "no rate limit"
    : p.group ? "per min / configured, Σ" : "per min / configured";
  p.caption.textContent = slots
    ? "slots in flight (solid) and the limit (dashed)"
    : "per minute: allowed now (solid), configured (dashed), granted (thin)";
  p.rate.v.dataset.effective = String(allowed);
  p.rate.v.dataset.configured = String(r.configured_per_min);
  p.slots.v.textContent = r.max_in_flight ? fmtCount(r.in_flight) + " / " + fmtCount(r.max_in_flight) : "—";
  p.slots.root.querySelector(".l").textContent = r.held_over > 0
    ? "slots in flight · " + r.held_over + " held over from before a restart"
    : "slots in flight";
  p.slots.v.dataset.inFlight = String(r.in_flight);
  p.slots.v.dataset.max = String(r.max_in_flight);
  p.granted.v.textContent = fmtCount(r.granted_total);
  p.granted.v.dataset.value = String(r.granted_total);
  p.thr.v.textContent = fmtCount(r.throttled_total);
  if (p.restarted) {
    p.granted.root.querySelector(".l").textContent = "granted since restart";
    p.thr.root.querySelector(".l").textContent = "429s since restart";
  }
  p.thr.v.dataset.value = String(r.throttled_total);
  p.root.dataset.waiting = String(Object.values(r.waiting).reduce((a, n) => a + n, 0));
  p.waiting.innerHTML = "";
  const classes = Object.entries(r.waiting).filter(([, n]) => n > 0);
  if (classes.length === 0) {
    p.waiting.textContent = "nothing waiting";
  } else {
    p.waiting.append("waiting: ");
    classes.forEach(([c, n], k) => {
      p.waiting.append((k ? " · " : "") + c + " ", el("b", "", String(n)));
    });
  }
  p.root.classList.toggle("paused", r.paused);
  badge(p, now);
}

// What an instance has that a lead must see, most urgent first ("" if
// nothing). AT LIMIT only when this bucket is what callers wait for (no
// permit left, or every slot held): a call waits on every bucket it
// draws on, so callers may queue here for another bucket's sake.
function trouble(i, now) {
  const r = i.last;
  if (!r) return "";
  const left = i.frozenUntil - now;
  const waiting = Object.values(r.waiting).reduce((a, n) => a + n, 0);
  const full = r.max_in_flight > 0 && r.in_flight >= r.max_in_flight;
  if (left > 0) return "FROZEN " + Math.ceil(left / 1000) + " s";
  if (r.paused) return "PAUSED";
  if (waiting > 0 && (full || blocked(r))) return "AT LIMIT · " + waiting + " WAITING";
  if (full) return "SLOTS FULL";
  if (waiting > 0) return waiting + " WAITING";
  return "";
}

// Whether a class waiting here cannot draw from this bucket now: what is
// left is within what the classes served before it keep back (their
// reserves, shares of the burst and of the slots).
function blocked(r) {
  const list = classes[r.tenant] || [];
  for (const [name, n] of Object.entries(r.waiting)) {
    if (!(n > 0)) continue;
    const own = list.find((c) => c.name === name);
    const order = own ? own.order : Infinity;
    const kept = list.filter((c) => c.order < order).reduce((a, c) => a + c.reserve, 0);
    if (r.configured_per_min > 0 && r.tokens < kept * r.burst + 1) return true;
    if (r.max_in_flight > 0 && r.in_flight >= r.max_in_flight - Math.floor(kept * r.max_in_flight)) return true;
  }
  return false;
}

// Most urgent first; the last kind is callers waiting for another bucket.
const KINDS = [/^FROZEN/, /^PAUSED/, /^AT LIMIT/, /^SLOTS FULL/, /WAITING$/];
const kindOf = (t) => KINDS.findIndex((k) => k.test(t));
const KIND_NAMES = ["FROZEN", "PAUSED", "AT LIMIT", "SLOTS FULL", "WAITING"];
const KIND_CLASSES = [" frozen", " paused", " limit", " limit", " waiting"];

// What a lead must see first: frozen after 429s, paused, callers waiting
// at the bucket's limit, or no data at all (the feed is down). A
// per-client panel shows its worst client and how many clients share
// that problem, and names them. Panels with a problem come first, the
// most urgent kind first.
function badge(p, now) {
  const troubled = [...p.members].map((i) => ({ i, t: trouble(i, now) })).filter((x) => x.t);
  // A per-client bucket no client uses has no clients to count or name.
  const clients = [...p.members].filter((i) => !(i.last && i.last.unused)).length;
  troubled.sort((a, b) => kindOf(a.t) - kindOf(b.t) || a.i.client.localeCompare(b.i.client));
  let text = "OK", cls = "badge", kind = -1;
  if (lostAt) { text = "NO DATA"; cls += " stale"; }
  else if (troubled.length) {
    const worst = troubled[0].t;
    kind = kindOf(worst);
    const alike = troubled.filter((x) => kindOf(x.t) === kind).length;
    const waiting = p.last ? Object.values(p.last.waiting).reduce((a, n) => a + n, 0) : 0;
    if (!p.group || (alike === 1 && kind !== 2 && kind !== 4)) text = worst;
    // Callers waiting on every client, not only the worst one's.
    else if (kind === 2) text = "AT LIMIT · " + waiting + " WAITING";
    else if (kind === 4) text = waiting + " WAITING";
    else text = KIND_NAMES[kind];
    if (p.group && clients > 0) text += " · " + alike + " OF " + clients + " CLIENTS";
    cls += KIND_CLASSES[kind];
  }
  if (p.badge.textContent !== text) p.badge.textContent = text;
  p.badge.className = cls;
  const alert = !lostAt && kind >= 0 && kind < 4;
  p.root.classList.toggle("frozen", !lostAt && kind === 0);
  p.root.classList.toggle("limit", !lostAt && (kind === 1 || kind === 2 || kind === 3));
  // Problems first: a wallboard shows the top of the page. A panel keeps
  // its place for HOLD_MS after its problem clears (a bucket at its limit
  // on and off must not move the whole wall about).
  p.root.classList.toggle("alert", alert);
  if (alert) { p.held = { order: Math.min(kind - 4, p.held && p.held.until > now ? p.held.order : 0), until: now + HOLD_MS }; }
  const order = alert || (p.held && p.held.until > now) ? String(p.held.order) : "";
  if (p.root.style.order !== order) p.root.style.order = order;
  p.thr.root.classList.toggle("recent", p.marks.length > 0);
  if (p.group && clients === 0) {
    if (p.problems.textContent !== "") p.problems.textContent = "";
  } else if (p.group) {
    const named = troubled.slice(0, LISTED).map((x) => (x.i.client || "(no client)") + ": " + x.t);
    const more = troubled.length - named.length;
    const text = (more > 0 ? troubled.length + " of " + p.members.size + " clients — " : "")
      + named.join("; ") + (more > 0 ? "; and " + more + " more" : "");
    if (p.problems.textContent !== text) p.problems.textContent = text;
  }
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
  for (const s of p.samples) if (!s.gap) top = Math.max(top, s.eff, s.conf, s.used || 0);
  top *= 1.15;
  const pad = { l: 52, r: 8, t: 8, b: 20 };
  const x = (t) => pad.l + (w - pad.l - pad.r) * (t - from) / span;
  const y = (v) => pad.t + (h - pad.t - pad.b) * (1 - v / top);
  const css = getComputedStyle(document.documentElement);
  g.strokeStyle = css.getPropertyValue("--line");
  g.fillStyle = css.getPropertyValue("--dim");
  g.lineWidth = 1;
  g.font = "15px system-ui, sans-serif";
  for (let k = 0; k <= 4; k++) {
    const v = top * k / 4;
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
      if (s.gap) {
        // The broker restarted: nothing is known between.
        if (prev !== null) g.lineTo(sx, y(prev));
        prev = null;
        continue;
      }
      if (prev === null) g.moveTo(sx, y(s[field]));
      else { g.lineTo(sx, y(prev)); g.lineTo(sx, y(s[field])); }
      prev = s[field];
    }
    // (Known until the feed was lost, not since.)
    if (prev !== null) g.lineTo(x(lostAt || now), y(prev));
    g.stroke(); g.setLineDash([]);
  };
  line("conf", css.getPropertyValue("--conf"), [8, 6]);
  if (p.last ? !slotsOnly(p.last) : !p.histSlots) line("used", css.getPropertyValue("--info"), [], 1.5);
  line("eff", css.getPropertyValue("--eff"), []);
}

function render() {
  const now = Date.now();
  for (const p of panels.values()) {
    if (p.histDirty) rebuild(p);
    // The granted line moves with time even when nothing is announced.
    if (!lostAt && p.last && !slotsOnly(p.last)) {
      const s = p.samples[p.samples.length - 1];
      const used = panelUsage(p, now);
      if (s && !s.gap && s.t < now - 1000 && Math.abs(s.used - used) > 1e-9) {
        sample(p, { t: now, eff: s.eff, conf: s.conf, used });
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

// Which instances the broker has (sent as the feed opens, then every
// 15 s; Watch announces no removals), and what the dropped ones of each
// bucket had counted. Instances it no longer has go (an OAuth client's
// instance dropped while idle, a bucket gone after a restart), and a
// panel left with none.
function census(m) {
  classes = m.classes || {};
  elsewhere(m.elsewhere || [], m.elsewhere_total || 0);
  const alive = new Set(m.instances);
  for (const [key, i] of instances) {
    if (alive.has(key)) continue;
    // Their history is part of the panel's chart: drawn before they go.
    if (i.panel.histDirty) rebuild(i.panel);
    instances.delete(key);
    i.panel.members.delete(i);
  }
  const retired = new Map(m.retired.map((x) => [x.tenant + "/" + x.bucket,
    { granted: x.granted, thr: x.throttled }]));
  const now = Date.now();
  for (const [key, p] of panels) {
    if (p.members.size === 0) { p.root.remove(); panels.delete(key); continue; }
    p.retired = retired.get(p.root.dataset.tenant + "/" + p.root.dataset.bucket)
      || { granted: 0, thr: 0 };
    show(p, now);
  }
}

// In a cluster each broker shows the tenants it leads: the others are
// named, with the broker that leads each (its gRPC address, which is what
// the cluster knows; its dashboard is on that host's HTTP port).
function elsewhere(list, total) {
  const e = document.getElementById("elsewhere");
  e.hidden = total === 0;
  if (total === 0) { e.textContent = ""; return; }
  const named = list.map((x) => x.tenant + (x.leader ? " (led by the broker at " + x.leader + ")"
    : " (no broker leads it right now)"));
  const more = total > list.length ? " and " + (total - list.length) + " more" : "";
  e.textContent = "This broker of the cluster shows only the tenants it leads. Led elsewhere: "
    + named.join(", ") + more + ". Open the dashboard on that broker's HTTP port to see them.";
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

// What the feed says (see dashboard-feed.js), however it comes.
function heard(m) {
  const conn = document.getElementById("conn");
  if (m.type === "open") {
    conn.textContent = "live"; conn.className = "conn up"; problem("");
    lostAt = 0; refused = ""; feed += 1;
    document.body.classList.remove("stale");
  } else if (m.type === "history") {
    fromHistory(JSON.parse(m.data));
  } else if (m.type === "instances") {
    census(JSON.parse(m.data));
  } else if (m.type === "bucket") {
    update(JSON.parse(m.data));
  } else if (m.type === "error") {
    conn.textContent = "reconnecting…"; conn.className = "conn down";
    lost();
  } else if (m.type === "refused") {
    conn.textContent = "refused";
    refused = m.text.trim() + (m.status === 401
      ? " — add #token=YOUR_TOKEN to this page's address" : "");
    problem(refused);
  }
}

// The feed: the one this browser's tabs of the dashboard share (each
// EventSource holds a connection for good, and a browser opens at most 6
// to a host over HTTP/1.1), else, where there is no SharedWorker, this
// page's own.
function connect() {
  const q = new URLSearchParams();
  if (tenant) q.set("tenant", tenant);
  const url = "/events?" + q.toString();
  if (stream) stream.close();
  stream = shared(url) || own(url);
}

function own(url) {
  const s = openFeed(url, (m) => { if (stream === s) heard(m); });
  return s;
}

// The tabs' feed, through their SharedWorker (null without one).
function shared(url) {
  if (typeof SharedWorker === "undefined") return null;
  let worker;
  try {
    worker = new SharedWorker("/dashboard-feed.js", { name: url });
  } catch (e) {
    return null;
  }
  const port = worker.port;
  const s = { close() { port.postMessage({ type: "leave" }); port.close(); } };
  port.onmessage = (e) => { if (stream === s) heard(e.data); };
  // A worker that cannot run: this page's own feed.
  worker.addEventListener("error", () => {
    if (stream !== s) return;
    s.close();
    stream = own(url);
  });
  port.postMessage({ type: "join" });
  return s;
}

// A tab that goes leaves the shared feed; one brought back from the
// browser's cache joins again.
window.addEventListener("pagehide", () => { if (stream) { stream.close(); stream = null; } });
window.addEventListener("pageshow", (e) => { if (e.persisted && !stream && !refused) connect(); });

// A token in the address (#token=...) is traded for a cookie the feed
// sends (an EventSource cannot send headers, and a token in the feed's
// URL would be written to access logs), then taken out of the address
// bar. A reload without it goes on with the cookie.
function start() {
  const hash = new URLSearchParams(location.hash.slice(1));
  const token = hash.get("token") || "";
  if (!token) { connect(); return; }
  hash.delete("token");
  const rest = hash.toString();
  window.history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
  fetch("/session", { method: "POST", headers: { Authorization: "Bearer " + token } })
    .then((r) => r.ok ? "" : r.text())
    .then((t) => {
      // A token refused is said, not replaced by an older session's.
      if (t) {
        if (stream) { stream.close(); stream = null; }
        refused = t.trim(); problem(refused);
        document.getElementById("conn").textContent = "refused";
        return;
      }
      connect();
    })
    .catch(() => setTimeout(start, 5000));
}

// A token typed into the address later (as the refusal advises) is
// traded the same way.
window.addEventListener("hashchange", () => {
  if (new URLSearchParams(location.hash.slice(1)).get("token")) start();
});

// Redraws move the time axis and count freezes down; the data itself
// arrives only as events.
setInterval(render, 250);
start();
