"""The fleet trial with the real Genesys Cloud Python SDK: ingestion workers
and wallboard pollers, each a PureCloudPlatformClientV2 ``ApiClient``
instrumented with ``quota_broker_client.genesys.instrument``, against the
``gcsim`` stand-in upstream through a real broker, for a number of simulated
minutes; one table of what the upstream saw and what the callers waited.

    python clients/python/bench/sdk_fleet.py \\
        --broker-bin target/release/quota-broker --gcsim-bin target/release/gcsim \\
        [--upstream testbed/scenario/upstreams/token-bucket-silent.toml] \\
        [--minutes 10] [--time-scale 10] [--repeats 3] [--seed 1] [--json OUT]

What runs (one run per repeat, seeds ``seed``, ``seed + 1``, ...):

- ``gcsim`` with the upstream file (org ``org-a``; the trial sets its
  analytics history: 3 days of 24,000 conversations, 1,000 an hour, more
  than the ingestion can page in the run, so it asks for more than the org
  allows all run), on a free loopback port, at ``--time-scale``.
- The broker with the scenario's config for that org (the documented
  limits only: 60 analytics queries a minute, 10 in flight; it has to learn
  the hidden ones), every ``*_ms`` divided by the time scale.
- ``--ingest`` workers (4): each takes the next hour of the history and pages it
  with ``AnalyticsApi.post_analytics_conversations_details_query`` (100 a
  page) as class ``batch``, OAuth client ``ingest``; a 429 or a refused
  lease is tried again (the broker paces the retry); a block whose pages do
  not add up to ``totalHits`` is fetched again. No block starts after the
  production time; the drain (2 simulated minutes) lets the started ones
  end, and cuts off what is left (``unfinished``).
- ``--wallboards`` pollers (2): each polls
  ``RoutingApi.post_analytics_queues_observations_query`` every 10
  simulated seconds as class ``critical``, OAuth client ``wallboard``;
  a poll still trying when the next is due makes that one skipped.

The table, per run and pooled (simulated time throughout):

- **429s**: what the upstream refused the fleet, of the fleet's requests
  (gcsim's count); beside it the 429s the SDK calls saw and the 429s the
  broker was told of (`quota_broker_reports_total`): the three are equal
  when no retry hides a 429 from the caller or from the broker.
- **goodput of what is left**: analytics queries served to the fleet over
  what the hidden limit left after the unmanaged consumer's demand, over
  the whole windows after the first (the first is the discovery of the
  hidden limit) up to the end of production.
- **wallboard wait p50 / p99 outside blocks**: from when a poll was due to
  when the request that succeeded was sent, of polls that began and ended
  in windows where the upstream refused the fleet nothing; **inside**: the
  others. (At time scale N each real millisecond of client overhead reads
  as N simulated ones.) **Of which Acquire**: the broker call's part, as
  the client timed it.
- **held by the broker over 50 ms**: the wallboards' Acquires the broker
  itself held past 50 simulated ms, from its wait histogram
  (``quota_broker_wait_seconds``, class ``critical``) scraped at each of
  the upstream's window ends: those of windows outside blocks / all, of
  all it granted them. What the client timed beyond that is its own.
- **batch p99**: the ingestion's wait per page, from when it was wanted to
  when the request that succeeded was sent.
- **records**: expected (gcsim's conversations of the blocks finished) /
  stored / lost, and the blocks the drain cut off.

Exits 1 if a run lost a record, its three 429 counts disagree or a call
failed otherwise, 2 on bad usage or when a server does not start.
"""
import argparse
import contextlib
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from statistics import median

import PureCloudPlatformClientV2 as gc
from PureCloudPlatformClientV2.rest import ApiException

from quota_broker_client import FallbackSettings, QuotaBroker, errors
from quota_broker_client.genesys import instrument

ORG = "org-a"
DAY = "2026-11-01"
OAUTH_SECRET = "gcsim-secret"
WINDOW_MS = 60_000
ANALYTICS = "analytics-query"
CONVERSATIONS_PER_DAY = 24_000
DAYS = 3
POLL_EVERY_MS = 10_000
DRAIN_MS = 120_000
PAGE_SIZE = 100
START_TIMEOUT_S = 30


class Usage(Exception):
    """A bad argument or input file: exit 2 with the message."""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upstream_text(path):
    """The upstream file with org-a's history raised (unless the file sets it)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise Usage(f"--upstream {path}: {e.strerror}") from e
    if not re.search(r'^\s*id\s*=\s*"org-a"\s*$', text, re.M):
        raise Usage(f'--upstream {path}: no [[orgs]] with id = "org-a" (the org the fleet runs against)')
    for key in ("conversations_per_day", "day", "days"):
        if re.search(rf"^\s*{key}\s*=", text, re.M):
            raise Usage(f"--upstream {path}: sets {key}; the trial sets it (the history it pages)")
    return re.sub(r'^(\s*id\s*=\s*"org-a"\s*)$',
                  rf'\1\nconversations_per_day = {CONVERSATIONS_PER_DAY}\nday = "{DAY}"\ndays = {DAYS}',
                  text, count=1, flags=re.M)


def broker_config(scale, grpc_port, http_port):
    """The scenario's broker config for org-a (testbed/scenario/src/confgen.rs), scaled."""
    def ms(sim_ms):
        return max(1, round(sim_ms / scale))

    classes = "".join(
        f'[[classes]]\nname = "{name}"\norder = {order}\nweight = {weight}\nreserve = {reserve}\n'
        f"default_max_wait_ms = {ms(wait) if wait else 0}\n\n"
        for name, order, weight, reserve, wait in [
            ("critical", 0, 8, 0.1, 2_000),
            ("interactive", 1, 4, 0.1, 500),
            ("batch", 2, 2, 0.0, 30_000),
            ("best_effort", 3, 1, 0.0, 0),
        ])
    window = ms(WINDOW_MS)
    return f"""[server]
listen = "127.0.0.1:{grpc_port}"
http_listen = "127.0.0.1:{http_port}"
max_wait_ms = {ms(60_000)}
max_lease_ttl_ms = {ms(600_000)}
shutdown_grace_ms = 1000
state_dir = ""

[learning]
default_freeze_ms = {ms(10_000)}
episode_grace_ms = {ms(2_000)}
ratio_window_ms = {max(ms(60_000), 1000)}
cooldown_ms = {ms(3_600_000)}

{classes}[[tenants]]
id = "{ORG}"

[[tenants.buckets]]
name = "per-client"
scope = "oauth_client"
routes = ["* /**"]
permits = 300
window_ms = {window}
burst = 300

[[tenants.buckets]]
name = "{ANALYTICS}"
scope = "org"
routes = ["POST /api/v2/analytics/**/query"]
permits = 60
window_ms = {window}
burst = 10
max_in_flight = 10
lease_ttl_ms = {ms(30_000)}

[[tenants.buckets]]
name = "conversation-writes"
scope = "org"
routes = ["POST /api/v2/conversations/**"]
permits = 300
window_ms = {window}
"""


class Child:
    """A server process of the run; its stderr drained (and kept) in a thread."""

    def __init__(self, name, argv, ready, workdir):
        self.name = name
        self.lines = []
        self.ready_line = None
        self._ready = threading.Event()
        self._pattern = re.compile(ready)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, cwd=workdir,
                                     env={**os.environ, "NO_COLOR": "1", "RUST_LOG": "info"})
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise Usage(f"{name} did not start ({' '.join(argv)}):\n" + "\n".join(self.lines[-20:]))

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines.append(line)
            if self.ready_line is None and self._pattern.search(line):
                self.ready_line = line
                self._ready.set()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdin:
            self.proc.stdin.close()


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


class SimClock:
    """gcsim's simulated ms, read once from its control plane and then run on
    the real monotonic clock at the time scale."""

    def __init__(self, gcsim_url, scale):
        before = time.monotonic()
        sim = get_json(gcsim_url + "/_sim/stats")["sim_ms"]
        after = time.monotonic()
        self.scale = scale
        self.origin = (before + after) / 2 - sim / 1000 / scale

    def now(self):
        return (time.monotonic() - self.origin) * 1000 * self.scale

    def sleep_until(self, sim_ms, stop):
        """Waits for a simulated instant (or ``stop``); False if stopped."""
        return not stop.wait(max(0.0, (sim_ms - self.now()) / 1000 / self.scale))


class SendTimes:
    """Wraps the SDK http client the adapter calls once the lease is held,
    and the broker client's ``lease``: when each request was sent, and how
    long its Acquire took (the broker's part of the caller's wait; the rest
    is the client's own time, which the time scale magnifies)."""

    def __init__(self, inner, clock):
        self.inner = inner
        self.clock = clock
        self.last_sent = None
        self.last_acquire = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def request(self, options):
        self.last_sent = self.clock.now()
        return self.inner.request(options)


class TimedBroker:
    """The broker client, its ``lease`` timed: how long the Acquire took
    (see ``SendTimes``)."""

    def __init__(self, broker, times):
        self._broker = broker
        self._times = times

    def __getattr__(self, name):
        return getattr(self._broker, name)

    @contextlib.contextmanager
    def lease(self, *args, **kwargs):
        start = self._times.clock.now()
        with self._broker.lease(*args, **kwargs) as lease:
            self._times.last_acquire = self._times.clock.now() - start
            yield lease


def api_client(gcsim_url, oauth_client, broker, client_id, priority_class, clock):
    client = gc.api_client.ApiClient(host=gcsim_url)
    client.get_client_credentials_token(f"{oauth_client}@{ORG}", OAUTH_SECRET)
    leased = instrument(client, broker, ORG, client_id=client_id, oauth_client=oauth_client,
                        priority_class=priority_class)
    times = SendTimes(leased.inner, clock)
    leased.inner = times
    leased.broker = TimedBroker(broker, times)
    return client, times


class Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.calls = 0
        self.throttled = 0
        self.not_granted = 0
        self.other_errors = []
        self.batch_waits = []
        self.polls = []  # (due, sent, its Acquire), simulated ms
        self.polls_skipped = 0
        self.records = {}  # block index -> list of conversation ids (finished blocks)
        self.blocks_started = set()

    def error(self, e):
        with self.lock:
            if len(self.other_errors) < 5:
                self.other_errors.append(f"{type(e).__name__}: {e}"[:300])


class Stopped(Exception):
    """The run ended while a call was still being tried."""


def call(counters, fn, stop):
    """One API call until it succeeds: a 429 or a lease not granted is tried
    again at once (the broker, told of the 429, paces the next lease)."""
    while True:
        if stop.is_set():
            raise Stopped()
        try:
            result = fn()
            with counters.lock:
                counters.calls += 1
            return result
        except ApiException as e:
            with counters.lock:
                counters.calls += 1
            if e.status != 429:
                counters.error(e)
                raise
            with counters.lock:
                counters.throttled += 1
        except errors.NotGranted:
            with counters.lock:
                counters.not_granted += 1


def hour_interval(block):
    """The ``block``-th hour of the history, as the details query's interval."""
    first = datetime.datetime.fromisoformat(DAY).replace(tzinfo=datetime.timezone.utc)
    start = first + datetime.timedelta(hours=block)
    end = start + datetime.timedelta(hours=1)
    return f"{start:%Y-%m-%dT%H:%M:%S}.000Z/{end:%Y-%m-%dT%H:%M:%S}.000Z"


def ingest_worker(ctx, index, blocks, counters, stop_production, stop_all):
    broker = QuotaBroker(ctx["broker"], fallback=FallbackSettings())
    try:
        client, times = api_client(ctx["gcsim"], "ingest", broker, f"ingest-{index}", "batch", ctx["clock"])
        analytics = gc.AnalyticsApi(client)
        while not stop_production.is_set() and not stop_all.is_set():
            with counters.lock:
                if not blocks:
                    return
                block = blocks.pop(0)
                counters.blocks_started.add(block)
            ids = fetch_block(analytics, times, block, counters, ctx["clock"], stop_all)
            if ids is None:
                return
            with counters.lock:
                counters.records[block] = ids
    except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
        counters.error(e)
    finally:
        broker.close()


def fetch_block(analytics, times, block, counters, clock, stop_all):
    """Every page of one hour; None if the drain's end cut it off."""
    while True:
        ids, total, page = [], None, 1
        while total is None or (page - 1) * PAGE_SIZE < total:
            if stop_all.is_set():
                return None
            body = gc.ConversationQuery()
            body.interval = hour_interval(block)
            paging = gc.PagingSpec()
            paging.page_size, paging.page_number = PAGE_SIZE, page
            body.paging = paging
            wanted = clock.now()
            try:
                result = call(counters, lambda: analytics.post_analytics_conversations_details_query(body),
                              stop_all)
            except Stopped:
                return None
            with counters.lock:
                counters.batch_waits.append(times.last_sent - wanted)
            total = result.total_hits or 0
            ids.extend(c.conversation_id for c in (result.conversations or []))
            page += 1
        if len(ids) == total:
            return ids
        # An upstream still settling: fetch the hour again, as the next run of a tool would.


def wallboard(ctx, index, counters, stop_production):
    broker = QuotaBroker(ctx["broker"], fallback=FallbackSettings())
    try:
        client, times = api_client(ctx["gcsim"], "wallboard", broker, f"wallboard-{index}", "critical",
                                   ctx["clock"])
        routing = gc.RoutingApi(client)
        query = gc.QueueObservationQuery()
        query.filter = gc.QueueObservationQueryFilter()
        query.filter.type = "or"
        predicate = gc.QueueObservationQueryPredicate()
        predicate.dimension, predicate.value = "queueId", f"queue-{index}"
        query.filter.predicates = [predicate]
        query.metrics = ["oOnQueueUsers"]
        clock = ctx["clock"]
        # Staggered so the pollers do not ask in the same millisecond.
        due = clock.now() + POLL_EVERY_MS * index / max(1, ctx["wallboards"])
        while clock.sleep_until(due, stop_production):
            try:
                call(counters, lambda: routing.post_analytics_queues_observations_query(query), stop_production)
            except Stopped:
                return
            with counters.lock:
                counters.polls.append((due, times.last_sent, times.last_acquire))
            due += POLL_EVERY_MS
            while due < clock.now():
                with counters.lock:
                    counters.polls_skipped += 1
                due += POLL_EVERY_MS
    except Exception as e:  # noqa: BLE001
        counters.error(e)
    finally:
        broker.close()


def percentile(values, p):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def scrape(http_url):
    with urllib.request.urlopen(http_url + "/metrics", timeout=10) as r:
        return r.read().decode()


def reported_429s(metrics):
    pattern = re.compile(r'^quota_broker_reports_total\{(?=[^}]*bucket="' + ANALYTICS
                         + r'")(?=[^}]*status="429")[^}]*\} (\S+)$', re.M)
    return int(sum(float(v) for v in pattern.findall(metrics)))


def broker_held(metrics, scale, sim_ms=50.0):
    """The wallboards' Acquires (class ``critical``) the broker itself held
    longer than about `sim_ms` simulated ms, from its own wait histogram:
    (held, granted, the threshold in simulated ms), so that a wait the
    client measured splits into the broker's part and the client's. The
    threshold is the histogram's largest bucket bound at or under `sim_ms`;
    (None, granted, None) when no bound is that small, (0, granted, None)
    before any Acquire queued."""
    def series(name):
        pattern = re.compile(r"^" + name + r'\{([^}]*)\} (\S+)$', re.M)
        for labels, value in pattern.findall(metrics):
            if 'class="critical"' in labels:
                le = re.search(r'le="([^"]+)"', labels)
                yield (float(le.group(1)) if le else None), float(value)

    granted = int(sum(v for _, v in series("quota_broker_grants_total")))
    bounds = sorted({float(b) for b in re.findall(
        r'^quota_broker_wait_seconds_bucket\{[^}]*le="([^"]+)"', metrics, re.M)} - {float("inf")})
    if not bounds:
        # No Acquire has queued yet (the histogram is made at its first use).
        return 0, granted, None
    fits = [b for b in bounds if b * scale * 1000 <= sim_ms + 1e-9]
    if not fits:
        return None, granted, None
    bound = fits[-1]
    # Only Acquires that queued are in the histogram; none queued, none held.
    queued = sum(v for _, v in series("quota_broker_wait_seconds_count"))
    within = sum(v for le, v in series("quota_broker_wait_seconds_bucket")
                 if le is not None and abs(le - bound) <= 1e-12)
    return int(queued - within), granted, bound * scale * 1000


def held_outside(held_at, blocked):
    """The broker's holds in windows outside `blocked`, from its counts
    (sim ms, held so far) scraped at each window's end: the holds between
    two scrapes are those of the window the second one closed (the first
    scrape, at the start, may close part of one). None where unknown."""
    if any(held is None for _, held in held_at):
        return None
    return sum(now - then for (_, then), (at, now) in zip(held_at, held_at[1:])
               if int((at - 1) // WINDOW_MS) not in blocked)


def held_total(metrics, scale):
    """`broker_held`'s count alone (None where it is not known)."""
    return broker_held(metrics, scale)[0]


def fleet_refusals(gcsim_url):
    """Every 429 the upstream sent the fleet: (sim ms, client, reason), from gcsim's log."""
    out, since = [], 0
    while True:
        page = get_json(f"{gcsim_url}/_sim/log?since={since}")
        out += [(e["sim_ms"], e["client"], e["reason"]) for e in page["entries"] if e["status"] == 429]
        if not page["entries"]:
            return out
        since = page["next"]


def run_once(args, seed, workdir, progress=print):
    """One run: returns its row (a dict)."""
    upstream = os.path.join(workdir, "upstream.toml")
    with open(upstream, "w", encoding="utf-8") as f:
        f.write(upstream_text(args.upstream))
    gcsim = Child("gcsim", [args.gcsim_bin, "--config", upstream, "--listen", "127.0.0.1:0",
                            "--time-scale", str(args.time_scale), "--seed", str(seed), "--log", "warn"],
                  r"gcsim listening on (http://\S+)", workdir)
    broker = None
    try:
        gcsim_url = re.search(r"(http://\S+)", gcsim.ready_line).group(1)
        grpc_port, http_port = free_port(), free_port()
        http_url = f"http://127.0.0.1:{http_port}"
        config = os.path.join(workdir, "broker.toml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(broker_config(args.time_scale, grpc_port, http_port))
        broker = Child("quota-broker", [args.broker_bin, "--config", config], r"broker started", workdir)
        clock = SimClock(gcsim_url, args.time_scale)
        ctx = {"gcsim": gcsim_url, "broker": f"127.0.0.1:{grpc_port}", "clock": clock,
               "wallboards": args.wallboards}
        counters = Counters()
        stop_production, stop_all = threading.Event(), threading.Event()
        blocks = list(range(24 * DAYS))
        start = clock.now()
        end = start + args.minutes * 60_000
        threads = [threading.Thread(target=ingest_worker,
                                    args=(ctx, i, blocks, counters, stop_production, stop_all))
                   for i in range(args.ingest)]
        threads += [threading.Thread(target=wallboard, args=(ctx, i, counters, stop_production))
                    for i in range(args.wallboards)]
        for t in threads:
            t.start()
        # At each of the upstream's window ends: the progress line, and what
        # the broker had held of the wallboards' Acquires by then, so that
        # its holds can be told apart inside and outside blocks.
        held_at = [(start, held_total(scrape(http_url), args.time_scale))]
        boundary = (int(start // WINDOW_MS) + 1) * WINDOW_MS
        while True:
            at = min(end, boundary)
            clock.sleep_until(at, stop_all)
            held_at.append((at, held_total(scrape(http_url), args.time_scale)))
            with counters.lock:
                progress(f"  seed {seed}: {(at - start) / 60_000:.1f} of {args.minutes:g} simulated minutes, "
                         f"{counters.calls} calls, {counters.throttled} 429s, "
                         f"{len(counters.records)} hours stored")
            if at >= end:
                break
            boundary += WINDOW_MS
        stop_production.set()
        # The drain: started blocks may end until its deadline, then are cut off.
        for t in threads:
            t.join(timeout=max(0.0, (end + DRAIN_MS - clock.now()) / 1000 / args.time_scale))
        stop_all.set()
        for t in threads:
            t.join(timeout=30)
        stats = get_json(gcsim_url + "/_sim/stats")
        metrics = scrape(http_url)
        row = measure(stats, counters, gcsim_url, start, end, held_at)
        held, granted, held_over = broker_held(metrics, args.time_scale)
        row.update(seed=seed, reported_429s=reported_429s(metrics), refusals=fleet_refusals(gcsim_url),
                   broker_held=held, critical_granted=granted, held_over_ms=held_over)
        if args.keep_logs:
            os.makedirs(args.keep_logs, exist_ok=True)
            with open(os.path.join(args.keep_logs, f"gcsim-stats-{seed}.json"), "w", encoding="utf-8") as f:
                json.dump(stats, f, indent=1)
            with open(os.path.join(args.keep_logs, f"broker-{seed}.log"), "w", encoding="utf-8") as f:
                f.write("\n".join(broker.lines) + "\n")
        return row
    finally:
        if broker is not None:
            broker.stop()
        gcsim.stop()


def measure(stats, counters, gcsim_url, start, end, held_at=()):
    org = next(o for o in stats["orgs"] if o["id"] == ORG)
    family = next(f for f in org["families"] if f["name"] == ANALYTICS)
    windows = family["windows"]
    fleet_tokens = [t for t in org["tokens"] if t["client"] in ("ingest", "wallboard")]
    requests = sum(t["served"] + t["refused"] for t in fleet_tokens)
    refused = sum(t["refused"] for t in fleet_tokens)
    # Whole windows after the first, up to the end of production.
    counted = [w for w in windows if 1 <= w["index"] and w["start_ms"] + WINDOW_MS <= end]
    served = sum(w["served_fleet"] for w in counted)
    left = sum(max(0, w["enforced_permits"] - w["served_unmanaged"] - w["refused_unmanaged"])
               for w in counted)
    blocked = {w["index"] for w in windows if w["refused_fleet"] > 0}

    def outside(due, sent):
        return int(due // WINDOW_MS) not in blocked and int(sent // WINDOW_MS) not in blocked

    held_out = held_outside(held_at, blocked)
    waits_out = [sent - due for due, sent, _ in counters.polls if outside(due, sent)]
    waits_in = [sent - due for due, sent, _ in counters.polls if not outside(due, sent)]
    acquire_out = [acquire for due, sent, acquire in counters.polls if outside(due, sent)]
    expected = stored = lost = 0
    for block, ids in counters.records.items():
        want = get_json(f"{gcsim_url}/_sim/orgs/{ORG}/conversations?interval="
                        + urllib.request.quote(hour_interval(block)))
        have = set(ids)
        expected += len(want)
        stored += len(have & set(want))
        lost += len(set(want) - have)
    return {
        "requests": requests,
        "upstream_429s": refused,
        "seen_429s": counters.throttled,
        "not_granted": counters.not_granted,
        "served": served,
        "left": left,
        "unmanaged_refused": sum(w["refused_unmanaged"] for w in counted),
        "unmanaged_sent": sum(w["refused_unmanaged"] + w["served_unmanaged"] for w in counted),
        "polls": len(counters.polls),
        "polls_skipped": counters.polls_skipped,
        "wait_out": waits_out,
        "wait_in": waits_in,
        "acquire_out": acquire_out,
        "broker_held_out": held_out,
        "batch_waits": counters.batch_waits,
        "expected": expected,
        "stored": stored,
        "lost": lost,
        "unfinished_blocks": len(counters.blocks_started - set(counters.records)),
        "errors": counters.other_errors,
        "production_ms": end - start,
    }


def fmt_ms(v):
    return "-" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.1f}")


def table(rows):
    head = ("| run | 429s (ratio) | seen / reported | goodput of what is left | unmanaged refused "
            "| wallboard p50 / p99 outside blocks (polls) | of which Acquire p50 / p99 "
            "| held by the broker over 50 ms: outside blocks / all (of its critical grants) "
            "| inside (polls) | batch p99 "
            "| records exp / stored / lost (+ blocks cut) |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]

    def held(r):
        if r.get("broker_held") is None:
            return "-"
        threshold = r["held_over_ms"]
        over = "" if threshold is None or abs(threshold - 50) < 1e-6 else f" (over {fmt_ms(threshold)} ms)"
        out = "-" if r["broker_held_out"] is None else r["broker_held_out"]
        return f"{out} / {r['broker_held']} (of {r['critical_granted']}){over}"

    def line(label, r):
        ratio = r["upstream_429s"] / r["requests"] if r["requests"] else 0.0
        good = r["served"] / r["left"] if r["left"] else float("nan")
        return (f"| {label} | {r['upstream_429s']} of {r['requests']} ({ratio:.2%}) "
                f"| {r['seen_429s']} / {r['reported_429s']} "
                f"| {good:.1%} ({r['served']} of {r['left']}) "
                f"| {r['unmanaged_refused']} of {r['unmanaged_sent']} "
                f"| {fmt_ms(percentile(r['wait_out'], 50))} / {fmt_ms(percentile(r['wait_out'], 99))} ms "
                f"({len(r['wait_out'])}) "
                f"| {fmt_ms(percentile(r['acquire_out'], 50))} / {fmt_ms(percentile(r['acquire_out'], 99))} ms "
                f"| {held(r)} "
                f"| {fmt_ms(percentile(r['wait_in'], 99))} ms ({len(r['wait_in'])}) "
                f"| {fmt_ms(percentile(r['batch_waits'], 99))} ms "
                f"| {r['expected']} / {r['stored']} / {r['lost']} (+{r['unfinished_blocks']}) |")

    for r in rows:
        lines.append(line(f"seed {r['seed']}", r))
    if len(rows) > 1:
        pooled = {k: sum(r[k] for r in rows) for k in (
            "requests", "upstream_429s", "seen_429s", "reported_429s", "served", "left", "unmanaged_refused",
            "unmanaged_sent", "expected", "stored", "lost", "unfinished_blocks", "polls")}
        if len({r["held_over_ms"] for r in rows}) == 1 and all(
                r["broker_held"] is not None and r["broker_held_out"] is not None for r in rows):
            pooled.update(broker_held=sum(r["broker_held"] for r in rows),
                          broker_held_out=sum(r["broker_held_out"] for r in rows),
                          critical_granted=sum(r["critical_granted"] for r in rows),
                          held_over_ms=rows[0]["held_over_ms"])
        for k in ("wait_out", "wait_in", "acquire_out", "batch_waits"):
            pooled[k] = [v for r in rows for v in r[k]]
        lines.append(line("pooled", pooled))
    return "\n".join(lines)


def problems(row):
    """What makes a run fail (exit 1): a lost record, 429 counts that disagree."""
    out = []
    if row["lost"]:
        out.append(f"seed {row['seed']}: {row['lost']} records lost")
    if not row["upstream_429s"] == row["seen_429s"] == row["reported_429s"]:
        out.append(f"seed {row['seed']}: the upstream refused {row['upstream_429s']}, the SDK calls saw "
                   f"{row['seen_429s']}, the broker was told of {row['reported_429s']}")
    if row["errors"]:
        out.append(f"seed {row['seed']}: calls failed: " + "; ".join(row["errors"]))
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.abspath(os.path.join(here, "..", "..", ".."))
    p.add_argument("--broker-bin", default=os.path.join(root, "target", "release", "quota-broker"))
    p.add_argument("--gcsim-bin", default=os.path.join(root, "target", "release", "gcsim"))
    p.add_argument("--upstream", default=os.path.join(root, "testbed", "scenario", "upstreams",
                                                       "token-bucket-silent.toml"))
    p.add_argument("--minutes", type=float, default=10.0, help="simulated minutes of production")
    p.add_argument("--time-scale", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ingest", type=int, default=4)
    p.add_argument("--wallboards", type=int, default=2)
    p.add_argument("--json", help="also write every run's figures to this file")
    p.add_argument("--keep-logs", metavar="DIR",
                   help="write each run's broker log and gcsim's stats into DIR")
    args = p.parse_args(argv)
    args.upstream = os.path.abspath(args.upstream)
    for name in ("broker_bin", "gcsim_bin"):
        path = os.path.abspath(getattr(args, name))
        setattr(args, name, path)
        if not os.access(path, os.X_OK):
            raise Usage(f"--{name.replace('_', '-')} {path}: not an executable (build it: "
                        "cargo build --release -p quota-broker -p gcsim)")
    if not 0 < args.time_scale <= 60:
        raise Usage("--time-scale must be above 0 and at most 60")
    if args.minutes < 2:
        raise Usage("--minutes must be at least 2 (the first window is not counted)")
    if args.repeats < 1 or args.ingest < 1 or args.wallboards < 0:
        raise Usage("--repeats and --ingest must be at least 1, --wallboards at least 0")
    return args


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        rows = []
        for i in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="sdk-fleet-") as workdir:
                print(f"run {i + 1} of {args.repeats} (seed {args.seed + i}): {args.minutes:g} simulated "
                      f"minutes at x{args.time_scale:g}", file=sys.stderr)
                rows.append(run_once(args, args.seed + i, workdir,
                                     progress=lambda s: print(s, file=sys.stderr)))
    except Usage as e:
        print(f"sdk_fleet: {e}", file=sys.stderr)
        return 2
    print(f"upstream {os.path.basename(args.upstream)}, {args.ingest} ingestion workers, {args.wallboards} "
          f"wallboards, {args.minutes:g} simulated minutes at x{args.time_scale:g}, simulated ms\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    failed = [p for r in rows for p in problems(r)]
    for r in rows:
        print(f"seed {r['seed']}: the fleet's 429s (simulated s, client, reason): "
              + ", ".join(f"{ms / 1000:.1f} {client} {reason}" for ms, client, reason in r["refusals"]))
    for p in failed:
        print(f"sdk_fleet: {p}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
