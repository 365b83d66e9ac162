// quota-broker dashboard: its event feed (/events), one connection for all
// of a browser's tabs of the dashboard. A feed holds its connection open
// for good, and over HTTP/1.1 (this port's; browsers speak HTTP/2 only
// over TLS) a browser opens at most 6 connections to a host: a seventh
// tab would never load. So the tabs share one feed: this script runs as
// their SharedWorker (one per feed address, its name) and passes every
// event to every tab. The page loads it too: where there is no
// SharedWorker, a tab opens its own feed with openFeed().
"use strict";

// Opens the feed at `url`, telling `tell` what it says: {type: "open"},
// {type: "history" | "instances" | "bucket", data} (the event's data, a
// JSON string), {type: "error"} (lost: the browser reconnects by itself)
// and {type: "refused", text, status} (the broker answered with an error:
// tried again 5 s later, in case it restarts).
function openFeed(url, tell) {
  let src = null;
  let retry = 0;
  // The broker sends its census every 15 s: a feed silent for three of
  // them is lost (a broker that hangs, a network that drops packets
  // without closing the connection), though the browser still holds it
  // open. Said so, and opened again.
  const QUIET_MS = 45000;
  let heardAt = 0;
  const watchdog = setInterval(() => {
    if (src && src.readyState === EventSource.OPEN && Date.now() - heardAt > QUIET_MS) {
      tell({ type: "error" });
      connect();
    }
  }, 5000);
  const connect = () => {
    clearTimeout(retry);
    if (src) src.close();
    const s = new EventSource(url);
    src = s;
    heardAt = Date.now();
    const mine = (f) => (e) => { if (src === s) { heardAt = Date.now(); f(e); } };
    s.addEventListener("open", mine(() => tell({ type: "open" })));
    for (const type of ["history", "instances", "bucket"]) {
      s.addEventListener(type, mine((e) => tell({ type, data: e.data })));
    }
    s.addEventListener("error", mine(() => {
      tell({ type: "error" });
      if (s.readyState !== EventSource.CLOSED) return;
      // Refused (a token is needed, it is not scoped to the tenant, over
      // max_watch_streams): ask why, and try again later.
      fetch(url).then((r) => {
        // (Answered this time: not a stream to hold open.)
        if (r.ok) return r.body ? r.body.cancel() : null;
        return r.text().then((text) => {
          if (src === s) tell({ type: "refused", text, status: r.status });
        });
      }).catch(() => {});
      retry = setTimeout(() => { if (src === s) connect(); }, 5000);
    }));
  };
  connect();
  return {
    // Opens it again: a tab that joins is sent the last minutes first.
    restart: connect,
    // Waiting for the broker (the first time, or after it was lost):
    // what a tab that joins needs comes when it opens.
    connecting: () => src !== null && src.readyState === EventSource.CONNECTING,
    close() { clearTimeout(retry); clearInterval(watchdog); if (src) src.close(); src = null; },
  };
}

// As the tabs' SharedWorker: a tab posts {type: "join"} when it opens (or
// has traded a token for a new session cookie) and {type: "leave"} when
// it goes; each is sent every event from then on. A tab that joins an open
// feed needs the history a feed starts with, so the feed opens again (the
// other tabs redraw from that history, as after a reconnect); one that
// joins while the feed is down is told so.
if (typeof SharedWorkerGlobalScope !== "undefined" && self instanceof SharedWorkerGlobalScope) {
  const tabs = new Set();
  let feed = null;
  // Since the feed last opened: the last "error" and "refused" told.
  let down = [];
  const tell = (m) => {
    if (m.type === "open") down = [];
    else if (m.type === "error" || m.type === "refused") {
      down = down.filter((d) => d.type !== m.type).concat([m]);
    }
    for (const port of tabs) port.postMessage(m);
  };
  self.addEventListener("connect", (e) => {
    const port = e.ports[0];
    port.onmessage = (m) => {
      if (m.data.type === "leave") {
        tabs.delete(port);
        port.close();
        if (tabs.size === 0 && feed) { feed.close(); feed = null; }
        return;
      }
      tabs.add(port);
      if (!feed) feed = openFeed(self.name, tell);
      else if (feed.connecting()) for (const d of down) port.postMessage(d);
      else feed.restart();
    };
  });
}
