"""The local fallback while the broker is unreachable, against a real broker process that is killed.

Pacing is measured on a fake clock (``QuotaBroker(clock=...)``): the
client's local limiter sleeps on it, so a minute of fallback takes no real
time and the count of calls in a window is exact. Coming back to the
broker is measured on the real clock, against a broker restarted on the
same port.
"""
import logging
import queue
import socket
import threading
import time
import uuid

import grpc
import pytest

import quota_broker_client as qb
from conftest import ANALYTICS_QUERY, SINGLE_PATH, TENANT, Calls, FakeClock, watch_bucket

USERS = "/api/v2/users/me"  # matches only the per-client bucket (300/min)


def bucket(client, name, oauth_client=""):
    b = client.bucket(TENANT, name, oauth_client)
    assert b is not None, f"no bucket {name!r}: {[x.bucket for x in client.list_buckets(TENANT)]}"
    return b


def client_logs(caplog, level=logging.WARNING):
    return [r for r in caplog.records if r.name.startswith("quota_broker_client") and r.levelno >= level]


def most_in_any_window(times, window_s):
    """The largest number of calls in any window of ``window_s`` (starting at a call)."""
    return max((sum(1 for u in times if t <= u < t + window_s) for t in times), default=0)


def test_broker_killed_calls_continue_at_half_the_granted_rate(start_broker, fake_clock, caplog):
    caplog.set_level(logging.INFO, logger="quota_broker_client")
    proc = start_broker()
    client = qb.QuotaBroker(proc.addr, clock=fake_clock)
    try:
        for _ in range(40):  # 40 grants "in the last minute" (the fake clock stands still)
            with client.lease(TENANT, "GET", USERS, client_id="ingest-1", max_wait_ms=1000) as lease:
                assert not lease.is_fallback
                lease.report(200, {})
        assert bucket(client, "per-client").reports_total == 40

        proc.kill()
        start = fake_clock.now
        times = []
        for _ in range(200):  # an unpaced loop never moves the fake clock: bounded by count
            if fake_clock.now >= start + 60:
                break
            with client.lease(TENANT, "GET", USERS, client_id="ingest-1", max_wait_ms=None) as lease:
                assert lease.is_fallback and lease.lease_id == "" and not lease.holds_slot
                times.append(fake_clock.now)
                assert lease.report(200, {"inin-ratelimit-allowed": "300"}) is None  # kept
        else:
            pytest.fail(f"{len(times)} fallback calls without the clock reaching a minute: not paced")

        # 0.5 x 40 granted in the last minute = 20/min: one call every 3 s, the first at once.
        assert client.in_fallback
        assert client.fallback_rate_per_min == 20
        bound = 1 + 60 * 20 / 60
        in_first_minute = [t for t in times if t < start + 60]
        assert len(in_first_minute) == 20, times  # calls go on, at 0, 3, ... 57 s
        assert most_in_any_window(times, 60) <= bound
        assert min(b - a for a, b in zip(times, times[1:])) >= 3.0 - 1e-9
        assert client.pending_reports == len(times) and client.dropped_reports == 0

        # Logged once, when entering the fallback; nothing per call.
        warnings = client_logs(caplog)
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "unreachable" in warnings[0].getMessage() and "20/min" in warnings[0].getMessage()
    finally:
        client.close()


def test_only_the_last_minute_of_grants_counts(start_broker, fake_clock):
    proc = start_broker()
    with qb.QuotaBroker(proc.addr, clock=fake_clock) as client:
        for _ in range(40):
            client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=1000).release()
        fake_clock.advance(30)
        for _ in range(16):
            client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=1000).release()
        fake_clock.advance(31)  # the first 40 are now 61 s old
        proc.kill()
        assert client.acquire(TENANT, "GET", USERS, client_id="c").is_fallback
        assert client.fallback_rate_per_min == 8  # 0.5 x 16


def test_fallback_floor_max_wait_and_retry_after(start_broker, fake_clock):
    proc = start_broker()
    proc.kill()  # a broker that was never reached: nothing granted yet
    with qb.QuotaBroker(proc.addr, clock=fake_clock, timeout=5) as client:
        first = client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=0)
        assert first.is_fallback
        assert client.fallback_rate_per_min == 6  # the floor: one call every 10 s
        assert first.renew() is None and first.release() is False

        # The next permission is 10 s away: an explicit max_wait_ms is honoured.
        with pytest.raises(qb.NotGranted) as info:
            client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=5000)
        assert "unreachable" in info.value.reason
        # Try again at the next probe (every second): the broker may be back
        # by then; not at the local permit's 10 s.
        assert 0 < info.value.retry_after_ms <= 1_000
        assert fake_clock.slept == 0

        # A 429 while falling back holds the local limiter until its Retry-After,
        # and a caller that will not wait is told the upstream's word.
        t = fake_clock.now
        assert first.report(429, {"Retry-After": "30"}) is None
        with pytest.raises(qb.NotGranted) as info:
            client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=5000)
        assert info.value.retry_after_ms == 30_000
        second = client.acquire(TENANT, "GET", USERS, client_id="c")
        assert second.is_fallback
        assert fake_clock.now - t == pytest.approx(30)
        assert client.pending_reports == 1


def test_kept_outcomes_are_bounded_oldest_dropped_then_reported(start_broker, fake_clock, caplog):
    caplog.set_level(logging.INFO, logger="quota_broker_client")
    proc = start_broker()
    settings = qb.FallbackSettings(buffer_size=3)
    client = qb.QuotaBroker(proc.addr, clock=fake_clock, fallback=settings)
    try:
        client.list_buckets(TENANT)  # connected before the crash
        proc.kill()
        # Two 429s first (to be dropped), then three successes.
        for status in (429, 429, 200, 200, 200):
            with client.lease(TENANT, "GET", USERS, client_id="c") as lease:
                assert lease.is_fallback
                lease.report(status, {"Retry-After": "1"} if status == 429 else {})
        assert client.pending_reports == 3
        assert client.dropped_reports == 2
        full = [r for r in client_logs(caplog) if "dropping the oldest" in r.getMessage()]
        assert len(full) == 1

        back = start_broker(port=proc.port)
        grpc.channel_ready_future(client.channel).result(timeout=10)
        assert client.flush_reports() == 3
        assert not client.in_fallback
        b = bucket(client, "per-client")
        assert (b.reports_total, b.throttled_total) == (3, 0)  # the newest three
        assert client.pending_reports == 0
        assert back.proc.poll() is None
    finally:
        client.close()


def test_back_to_the_broker_promptly_and_kept_outcomes_reported(start_broker, caplog):
    caplog.set_level(logging.INFO, logger="quota_broker_client")
    proc = start_broker()
    # 600/min: one fallback call every 0.1 s, so the real-clock test stays short.
    client = qb.QuotaBroker(proc.addr, fallback=qb.FallbackSettings(floor_per_min=600))
    try:
        held = client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=1000)
        assert not held.is_fallback and held.lease_id

        proc.kill()
        # The call made under that lease answers after the crash: kept, nothing raises.
        assert held.report(429, {"Retry-After": "1"}) is None
        assert held.release() is False  # the broker is away; its slot expires by itself
        for status in (200, 200, 429, 200, 200):
            with client.lease(TENANT, "GET", USERS, client_id="c", max_wait_ms=5000) as lease:
                assert lease.is_fallback
                headers = ({"Retry-After": "0.2"} if status == 429 else
                           {"inin-ratelimit-allowed": "300", "inin-ratelimit-count": "5",
                            "inin-ratelimit-reset": "30"})
                lease.report(status, headers)
        assert client.in_fallback
        assert client.pending_reports == 6
        warnings = client_logs(caplog)
        assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage(), \
            [r.getMessage() for r in warnings]

        start_broker(port=proc.port)  # returns once it logs "serving"
        back_at = time.monotonic()
        for _ in range(1000):
            try:
                lease = client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=2000)
            except qb.NotGranted:
                # The broker's own answer: the kept outcomes, its two 429s
                # among them, may have reached it first (sent as soon as a
                # probe found it back).
                assert not client.in_fallback
                break
            lease.release()
            if not lease.is_fallback:
                break
            assert time.monotonic() - back_at < 10, "still falling back 10 s after the broker came back"
        took = time.monotonic() - back_at
        assert not client.in_fallback
        assert took < 5, f"back to the broker {took:.1f}s after it came back"

        # The kept outcomes reach the broker (a background thread sends them):
        # seen on its Watch stream.
        reported, b = watch_bucket(client, "per-client",
                                   lambda b: not client.pending_reports and b.reports_total >= 6, 5)
        assert reported, (f"kept outcomes not reported within 5 s: pending {client.pending_reports}, "
                          f"reports {b and b.reports_total}")
        b = bucket(client, "per-client")
        assert (b.reports_total, b.throttled_total) == (6, 2)
        # Entering and leaving, once each.
        assert len([r for r in client_logs(caplog) if "unreachable" in r.getMessage()]) == 1
        assert len([r for r in caplog.records if "answers again" in r.getMessage()]) == 1
        assert len([r for r in caplog.records if r.getMessage().startswith("reported 6 outcomes")]) == 1
    finally:
        client.close()


def test_a_call_made_once_the_broker_is_back_is_leased_by_it(start_broker, fake_clock):
    # Falling back, nothing kept; the broker comes back and this client's
    # channel to it is ready again. The next call, whose probe is due, is
    # leased by the broker: it waits the moment its probe takes, where it
    # took a local fallback permit at once while the probe ran beside it.
    proc = start_broker()
    client = qb.QuotaBroker(proc.addr, clock=fake_clock)
    try:
        client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=1000).release()
        proc.kill()
        first = client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=0)
        assert first.is_fallback and client.in_fallback
        start_broker(port=proc.port)  # returns once it logs "serving"
        # The channel's reconnect backoff over: a real event, not a sleep.
        grpc.channel_ready_future(client._conn.channel).result(timeout=10)
        # The next probe due, and the local limiter's next permit too.
        fake_clock.advance(60)
        lease = client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=0)
        assert not lease.is_fallback and lease.lease_id, "a fallback lease with the broker back"
        assert not client.in_fallback
        lease.release()
    finally:
        client.close()


def test_max_wait_ms_bounds_the_wait_on_the_fallback_and_the_broker_together(start_broker, fake_clock):
    # Falling back at 1/min; the broker comes back while a call waits for
    # the local limiter's next permit. The Acquire its probe lets through
    # asks the broker for what is left of max_wait_ms, not all of it again.
    proc = start_broker()
    client = qb.QuotaBroker(proc.addr, clock=fake_clock, fallback=qb.FallbackSettings(floor_per_min=1))
    try:
        client.list_buckets(TENANT)  # connected before the crash
        proc.kill()
        assert client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=0).is_fallback
        start_broker(port=proc.port)
        # The channel's reconnect backoff over: a real event, not a sleep.
        grpc.channel_ready_future(client._conn.channel).result(timeout=10)
        sent = []
        real = client.stub.Acquire

        def acquire(req, *a, **kw):
            sent.append((req.max_wait_ms, fake_clock.now))
            return real(req, *a, **kw)

        client.stub.Acquire = acquire
        started = fake_clock.now
        lease = client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=120_000)
        assert not lease.is_fallback
        lease.release()
        ((max_wait_ms, at),) = sent
        waited_ms = round((at - started) * 1000)
        assert waited_ms >= 1000, "the call did not wait for the probe"
        assert max_wait_ms == 120_000 - waited_ms
    finally:
        client.close()


def test_threads_sharing_a_client_share_its_fallback_rate(start_broker):
    proc = start_broker()
    proc.kill()
    # 600/min = 10/s on the real clock; 8 threads calling as fast as they are let.
    client = qb.QuotaBroker(proc.addr, fallback=qb.FallbackSettings(floor_per_min=600))
    times, lock = [], threading.Lock()
    start = time.monotonic()

    def worker():
        while time.monotonic() < start + 1.5:
            with client.lease(TENANT, "GET", USERS, client_id="w") as lease:
                assert lease.is_fallback
                with lock:
                    times.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads)
        assert len(times) >= 10
        # Each call is recorded at or after its permission, which come 0.1 s apart from
        # the first: over the span seen, at most 1 + 10/s (exact, whatever the scheduling).
        assert len(times) <= 1 + 10 * (max(times) - start) + 1e-6
    finally:
        client.close()


class HeldClock:
    """A clock whose ``sleep`` returns only when the test lets that thread go
    (``wake(name)``), saying ("sleeps", thread name) on ``events`` first; time
    moves only by ``advance``. ``release()`` lets every sleep return at once."""

    def __init__(self, events, start=1000.0):
        self.now = float(start)
        self.events = events
        self._go = {}
        self._lock = threading.Lock()
        self._released = False

    def monotonic(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds

    def sleep(self, seconds):
        name = threading.current_thread().name
        go = threading.Event()
        with self._lock:
            if self._released:
                self.now += seconds
                return
            self._go[name] = go
        self.events.put(("sleeps", name))
        go.wait(30)

    def wake(self, name):
        with self._lock:
            self._go.pop(name).set()

    def release(self):
        with self._lock:
            self._released = True
            for go in self._go.values():
                go.set()


def test_fallback_waiters_are_served_in_arrival_order():
    """A is waiting for the next local permission; it comes due while A is
    still asleep (or probing the broker), and B arrives then: B waits its
    turn behind A instead of taking A's permission."""
    events = queue.Queue()
    clock = HeldClock(events)
    fallback = qb.FallbackSettings(floor_per_min=6, probe_every_s=3600)  # one every 10 s
    with socket.socket() as down:
        down.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        client = qb.QuotaBroker(f"127.0.0.1:{down.getsockname()[1]}", timeout=3, clock=clock,
                                fallback=fallback)
        threads = []

        def call(name):
            # No max_wait_ms: waits for its turn.
            lease = client.acquire(TENANT, "GET", USERS, client_id=name)
            events.put(("granted" if lease.is_fallback else "not a fallback lease", name))

        def start(name):
            t = threading.Thread(target=call, args=(name,), name=name, daemon=True)
            threads.append(t)
            t.start()

        try:
            assert client.acquire(TENANT, "GET", USERS, client_id="first", max_wait_ms=0).is_fallback
            start("A")
            assert events.get(timeout=10) == ("sleeps", "A")
            clock.advance(10)  # the next permission is due; A has not woken yet
            start("B")
            assert events.get(timeout=10) == ("sleeps", "B"), "B overtook A"
            clock.wake("A")
            assert events.get(timeout=10) == ("granted", "A")
            clock.advance(10)
            clock.wake("B")
            assert events.get(timeout=10) == ("granted", "B")
        finally:
            clock.release()
            for t in threads:
                t.join(10)
            client.close()


def test_a_fallback_acquire_without_max_wait_waits_at_most_the_brokers_default_cap(fake_clock):
    """Without max_wait_ms a broker waits at most its default cap (60 s) and
    answers NotGranted past it; the fallback does the same, at once, instead
    of holding the call until a 429's long Retry-After is over."""
    with socket.socket() as down:
        down.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        with qb.QuotaBroker(f"127.0.0.1:{down.getsockname()[1]}", timeout=3, clock=fake_clock) as client:
            first = client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=0)
            assert first.is_fallback
            assert first.report(429, {"Retry-After": "90"}) is None
            with pytest.raises(qb.NotGranted) as info:
                client.acquire(TENANT, "GET", USERS, client_id="c")
            assert info.value.retry_after_ms == 90_000
            assert fake_clock.slept == 0
            fake_clock.advance(31)  # 59 s left: waited for
            assert client.acquire(TENANT, "GET", USERS, client_id="c").is_fallback
            assert fake_clock.slept == pytest.approx(59)


class WaitClock:
    """A fake clock (``sleep`` advances it at once) whose ``wait`` for a lease
    to end says ("waits", thread name) on ``events`` and waits for the real
    notification: 10 s at most, then says ("not woken", thread name) and
    the time asked for passes."""

    def __init__(self, events, start=1000.0):
        self.now = float(start)
        self.events = events

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds

    def wait(self, condition, seconds):
        self.events.put(("waits", threading.current_thread().name))
        if not condition.wait(10):
            self.events.put(("not woken", threading.current_thread().name))
            self.now += seconds


# 1000 calls a second and no probe while the test runs: only the cap holds calls.
UNPACED = qb.FallbackSettings(floor_per_min=60_000, probe_every_s=3600)


def test_falling_back_a_client_that_held_slots_runs_at_most_half_as_many_at_once(start_broker,
                                                                                  fake_clock):
    events = queue.Queue()
    clock = WaitClock(events)
    proc = start_broker()
    client = qb.QuotaBroker(proc.addr, timeout=3, clock=clock, fallback=UNPACED)
    rate_only = qb.QuotaBroker(proc.addr, timeout=3, clock=fake_clock, fallback=UNPACED)
    waiter = None
    try:
        held = client.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=1000)
        assert held.holds_slot and not held.is_fallback
        rate_only.acquire(TENANT, "GET", USERS, client_id="r", max_wait_ms=1000).release()
        proc.kill()

        # Half of the one slot lease held, rounded up: one at once, and the held lease has it.
        with pytest.raises(qb.NotGranted) as info:
            client.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=0)
        assert "local fallback limit of 1 at once" in info.value.reason, info.value.reason
        assert client.fallback_max_in_flight == 1

        def wait_for_a_place():
            lease = client.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=30_000)
            events.put(("granted", lease))

        waiter = threading.Thread(target=wait_for_a_place, name="B", daemon=True)
        waiter.start()
        assert events.get(timeout=10) == ("waits", "B")
        assert held.release() is False  # kept for the broker; its place is free now
        kind, first = events.get(timeout=10)
        assert kind == "granted" and first.is_fallback

        # The one place is taken: a route the broker did not grant this
        # client yet (USERS: rate_only's grant is another fallback, on
        # another clock) may need a slot, so it waits for a place.
        with pytest.raises(qb.NotGranted) as info:
            client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=0)
        assert "1 at once" in info.value.reason, info.value.reason
        first.release()
        with client.lease(TENANT, "GET", USERS, client_id="c", max_wait_ms=1000) as lease:
            assert lease.is_fallback
        clock.now += 1  # the local limiter's next permit, so only the cap could refuse
        assert client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=0).is_fallback

        # Never held a slot lease: not capped.
        leases = [rate_only.acquire(TENANT, "GET", USERS, client_id="r", max_wait_ms=1000)
                  for _ in range(3)]
        assert all(lease.is_fallback for lease in leases)
        assert rate_only.fallback_max_in_flight is None
    finally:
        if waiter is not None:
            waiter.join(30)
        client.close()
        rate_only.close()


def test_the_cap_is_the_fraction_of_the_most_slot_leases_held_at_once_in_the_last_minute(
        start_broker, fake_clock):
    proc = start_broker()
    client = qb.QuotaBroker(proc.addr, timeout=3, clock=fake_clock, fallback=UNPACED)
    # Another process (a clock of its own: clients of the same brokers on
    # the same clock share one fallback), whose time runs alike.
    earlier_clock = FakeClock(fake_clock.now)
    earlier = qb.QuotaBroker(proc.addr, timeout=3, clock=earlier_clock, fallback=UNPACED)

    def advance(seconds):
        fake_clock.advance(seconds)
        earlier_clock.advance(seconds)

    try:
        def hold(c, n, path=ANALYTICS_QUERY):
            leases = [c.acquire(TENANT, "POST", path, client_id="c", max_wait_ms=1000) for _ in range(n)]
            assert all(lease.holds_slot for lease in leases)
            return leases

        earlier.acquire(TENANT, "GET", SINGLE_PATH, client_id="e", max_wait_ms=1000).release()
        for lease in hold(client, 5):
            lease.release()
        advance(31)
        kept, *others = hold(client, 3)
        for lease in others:
            lease.release()
        hold(client, 1)[0].release()  # 2 held at once then: the minute's most is still 3
        advance(30)  # the 5 at once (and earlier's one) are now 61 s old
        proc.kill()

        # ceil(0.5 x 3) = 2 at once, the broker lease still held among them.
        second = client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=0)
        assert second.is_fallback
        assert client.fallback_max_in_flight == 2
        with pytest.raises(qb.NotGranted) as info:
            client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=0)
        assert "local fallback limit of 2 at once" in info.value.reason, info.value.reason
        kept.release()
        third = client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=1000)
        assert third.is_fallback
        with pytest.raises(qb.NotGranted):
            client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=0)
        del third  # dropped unreleased: its place ends with it
        advance(1)
        assert client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=0).is_fallback

        # Its slot lease more than a minute before the outage: not capped.
        both = [earlier.acquire(TENANT, "GET", USERS, client_id="e", max_wait_ms=1000) for _ in range(2)]
        assert all(lease.is_fallback for lease in both)
        assert earlier.fallback_max_in_flight is None
    finally:
        client.close()
        earlier.close()


def test_a_rate_only_route_is_paced_by_the_rate_alone_while_slot_leases_fill_the_cap(start_broker):
    """The trial: during an outage a long-held slot lease of one route took
    the fallback's one place ("local fallback limit of 1 at once"), and the
    calls of a route that needs no slot got nothing. A route the broker
    granted without a slot (rate buckets only) is paced by the rate alone,
    also past a call waiting for a place; slot routes, and routes not
    granted yet, are still capped."""
    events = queue.Queue()
    clock = WaitClock(events)
    proc = start_broker()
    # 60/min: one call a second of the fake clock; no probe while the test runs.
    client = qb.QuotaBroker(proc.addr, timeout=3, clock=clock,
                            fallback=qb.FallbackSettings(floor_per_min=60, probe_every_s=3600))
    user = "/api/v2/users/{}"
    waiter = None
    try:
        held = client.acquire(TENANT, "POST", ANALYTICS_QUERY, client_id="c", max_wait_ms=1000)
        assert held.holds_slot  # analytics-query: slots (and a rate)
        rate = client.acquire(TENANT, "GET", user.format(uuid.uuid4()), client_id="c", max_wait_ms=1000)
        assert not rate.holds_slot  # per-client only: a rate bucket
        rate.release()
        proc.kill()

        # ceil(0.5 x 1) = 1 at once, and the held slot lease has it.
        with pytest.raises(qb.NotGranted) as info:
            client.acquire(TENANT, "POST", ANALYTICS_QUERY, client_id="c", max_wait_ms=0)
        assert "local fallback limit of 1 at once" in info.value.reason, info.value.reason
        assert client.fallback_max_in_flight == 1

        # A call of the slot route waits for the place...
        def wait_for_a_place():
            lease = client.acquire(TENANT, "POST", ANALYTICS_QUERY, client_id="c", max_wait_ms=30_000)
            events.put(("granted", lease))

        waiter = threading.Thread(target=wait_for_a_place, name="B", daemon=True)
        waiter.start()
        assert events.get(timeout=10) == ("waits", "B")

        # ...and the rate-only route (another user id: ids are one route)
        # goes by, at the fallback's rate: one a second, the first at once.
        start, times = clock.now, []
        for _ in range(4):
            lease = client.acquire(TENANT, "GET", user.format(uuid.uuid4()), client_id="c")
            assert lease.is_fallback
            times.append(clock.now - start)
            lease.release()
        assert times == [0.0, 1.0, 2.0, 3.0], times
        assert events.empty(), "the call waiting for a place was let through"
        # A route the broker has not granted yet may need a slot: capped.
        with pytest.raises(qb.NotGranted) as info:
            client.acquire(TENANT, "GET", "/api/v2/not/granted/yet", client_id="c", max_wait_ms=0)
        assert "1 at once" in info.value.reason, info.value.reason

        clock.now += 1  # the next permit is due: only the cap holds B
        assert held.release() is False  # kept for the broker; the place is free now
        kind, second = events.get(timeout=10)
        assert kind == "granted" and second.is_fallback
        second.release()
    finally:
        if waiter is not None:
            waiter.join(30)
        client.close()


def test_clients_made_per_call_share_the_fallback_of_their_brokers(start_broker, fake_clock, caplog):
    """The trial: with no broker reachable, a new QuotaBroker per request
    got 1,354 fallback leases in 3 s (the floor is 6/min) and logged 1,405
    warnings: each instance started the outage afresh. Clients of the same
    brokers (settings and clock) share the fallback: they are paced as one,
    the outage is logged once, and what they kept is reported by a later
    client once a broker answers."""
    caplog.set_level(logging.INFO, logger="quota_broker_client")
    with socket.socket() as down:
        down.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        port = down.getsockname()[1]
        addr = f"127.0.0.1:{port}"
        start, times = fake_clock.now, []
        for _ in range(200):  # an unpaced loop never moves the fake clock: bounded by count
            if fake_clock.now >= start + 60:
                break
            with qb.QuotaBroker(addr, timeout=3, clock=fake_clock) as broker:
                with broker.lease(TENANT, "GET", USERS, client_id="job") as lease:
                    assert lease.is_fallback
                    times.append(fake_clock.now - start)
                    assert lease.report(200, {}) is None  # kept
        else:
            pytest.fail(f"{len(times)} fallback leases without the clock reaching a minute: not paced")
        # The floor, 6/min: the first at once, then one every 10 s: 0, 10, ...
        # 50 s in the first minute (then 60 s, which ends the loop).
        assert times == [10.0 * k for k in range(7)], times
        warnings = [r.getMessage() for r in client_logs(caplog)]
        assert len([w for w in warnings if "unreachable" in w]) == 1, warnings
        # Each job closed with its outcome kept: said once, not per client.
        assert len([w for w in warnings if w.startswith("closing with")]) == 1, warnings
        assert len(warnings) == 2, warnings

        # Other brokers are another budget: their own fallback, a call at once.
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            with qb.QuotaBroker(f"127.0.0.1:{other.getsockname()[1]}", timeout=3,
                                clock=fake_clock) as broker:
                assert broker.acquire(TENANT, "GET", USERS, client_id="job", max_wait_ms=0).is_fallback
    # The broker comes up there: the next client reports what the jobs kept.
    back = start_broker(port=port)
    with qb.QuotaBroker(addr, timeout=3, clock=fake_clock) as broker:
        assert broker.pending_reports == 7
        grpc.channel_ready_future(broker.channel).result(timeout=10)
        deadline = time.monotonic() + 10
        while broker.pending_reports:
            assert time.monotonic() < deadline, "kept outcomes not reported within 10 s"
            broker.flush_reports()
        assert bucket(broker, "per-client").reports_total == 7
    assert back.proc.poll() is None


def test_outcomes_the_broker_refuses_after_an_outage_are_warned_with_its_reason(start_broker, fake_clock,
                                                                                 caplog):
    """The trial: reports kept during an outage for a mistyped tenant were
    refused by the broker once back (and dropped), said only at INFO as a
    count, the reason at DEBUG. Now a warning gives the reason, once per
    distinct reason per flush."""
    caplog.set_level(logging.INFO, logger="quota_broker_client")
    proc = start_broker()
    # No probe of its own while the test runs: the flush below sends them.
    client = qb.QuotaBroker(proc.addr, timeout=3, clock=fake_clock,
                            fallback=qb.FallbackSettings(probe_every_s=3600))
    try:
        client.list_buckets(TENANT)  # connected before the crash
        proc.kill()
        for tenant in ("dmeo", "dmeo", "deom", TENANT):
            assert client.report(tenant, "GET", USERS, 200) is None
        assert client.pending_reports == 4
        start_broker(port=proc.port)
        grpc.channel_ready_future(client.channel).result(timeout=10)
        caplog.clear()
        assert client.flush_reports() == 1
        assert client.pending_reports == 0
        refused = [r.getMessage() for r in client_logs(caplog) if "refused" in r.getMessage()]
        assert len(refused) == 2, refused
        (dmeo,) = [w for w in refused if '"dmeo"' in w]
        assert "refused 2 outcomes" in dmeo and "NOT_FOUND" in dmeo and "not configured" in dmeo, dmeo
        (deom,) = [w for w in refused if '"deom"' in w]
        assert "refused 1 outcome " in deom, deom
        assert bucket(client, "per-client").reports_total == 1
    finally:
        client.close()


def test_without_fallback_an_unreachable_broker_raises(start_broker):
    proc = start_broker()
    proc.kill()
    with qb.QuotaBroker(proc.addr, timeout=3, fallback=None) as client:
        with pytest.raises((qb.Unavailable, qb.DeadlineExceeded)):
            client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=0)
        with pytest.raises((qb.Unavailable, qb.DeadlineExceeded)):
            client.report(TENANT, "GET", USERS, 200, {})
        assert not client.in_fallback and client.pending_reports == 0


def test_fallback_settings_are_checked():
    s = qb.FallbackSettings()
    assert (s.fraction, s.floor_per_min, s.probe_every_s) == (0.5, 6, 1.0)  # the Rust client's
    assert s.rate_per_min(0) == 6 and s.rate_per_min(40) == 20 and s.rate_per_min(13) == 6
    for bad in (dict(fraction=0), dict(fraction=1.5), dict(floor_per_min=0), dict(probe_every_s=0),
                dict(buffer_size=-1)):
        with pytest.raises(ValueError):
            qb.FallbackSettings(**bad)
    with pytest.raises(TypeError):
        qb.QuotaBroker("127.0.0.1:1", fallback={"fraction": 0.5})


def test_entering_the_fallback_again_soon_after_leaving_it_keeps_its_pacing(fake_clock, caplog):
    """A broker that answers the probe but not the calls (a cluster with no
    leader): each round of leaving and entering the fallback must not hand
    out a call at once, nor log the outage again."""
    from quota_broker_client.fallback import LocalFallback
    fb = LocalFallback(qb.FallbackSettings(), fake_clock, target="t")  # 6/min: one per 10 s
    with caplog.at_level(logging.INFO, logger="quota_broker_client"):
        fb.enter("down")
        assert fb.take() == 0.0
        granted = 1
        for _ in range(30):  # 60 s of a probe answering every 2 s
            fake_clock.advance(2.0)
            fb.leave()
            fb.enter("down again")
            if fb.take() == 0.0:
                granted += 1
    assert granted == 1 + 6, granted  # the 6/min pace, not one per round
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()
                and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    # The first "answers again" was the probe only: said once, at once.
    unserved = [r for r in caplog.records if "answers its health check but not the calls"
                in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(unserved) == 1, [r.getMessage() for r in caplog.records]
    # A fallback left longer ago is a new outage: logged again.
    fb.leave()
    fake_clock.advance(120.0)
    with caplog.at_level(logging.INFO, logger="quota_broker_client"):
        caplog.clear()
        fb.enter("down later")
        assert fb.take() == 0.0
    assert any(r.levelno >= logging.WARNING for r in caplog.records)
    # Left a moment ago, but the broker granted calls since: a new outage,
    # logged again (a leader move and an etcd outage 20 s apart).
    fb.leave()
    fb.granted(1)
    fake_clock.advance(2.0)
    with caplog.at_level(logging.INFO, logger="quota_broker_client"):
        caplog.clear()
        fb.enter("down once more")
    assert any(r.levelno >= logging.WARNING for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


def test_reconnect_backoff_is_bounded():
    opts = dict(qb.DEFAULT_CHANNEL_OPTIONS)
    assert opts["grpc.max_reconnect_backoff_ms"] <= 5000
    assert opts["grpc.initial_reconnect_backoff_ms"] <= opts["grpc.max_reconnect_backoff_ms"]


def test_a_report_a_frozen_broker_received_and_the_client_kept_counts_once(start_broker):
    """A broker stopped (SIGSTOP) receives a Report into its socket but
    answers only once thawed; the client gave up at its deadline and kept
    the outcome. Both reach the broker; its idempotency key counts it once."""
    proc = start_broker()
    with qb.QuotaBroker(proc.addr, timeout=1) as client:
        client.list_buckets(TENANT)  # connected: the Report goes out at once
        proc.freeze()
        try:
            assert client.report(TENANT, "GET", USERS, 429, {"Retry-After": "1"},
                                 oauth_client="frozen") is None
            assert client.pending_reports == 1
        finally:
            proc.thaw()
        assert client.flush_reports() == 1
        b = bucket(client, "per-client", "frozen")
        assert (b.reports_total, b.throttled_total) == (1, 1)


def test_a_hung_broker_is_given_up_within_seconds_not_at_the_deadline(start_broker):
    """A broker stopped (SIGSTOP) while an Acquire waits on it: the HTTP/2
    pings go unanswered and the call falls back within seconds, not at its
    deadline (60 s of the broker's default cap plus the call timeout)."""
    proc = start_broker()
    with qb.QuotaBroker(proc.addr) as client:
        client.list_buckets(TENANT)  # connected before the broker hangs
        proc.freeze()
        try:
            started = time.monotonic()
            lease = client.acquire(TENANT, "GET", USERS, client_id="c")
            took = time.monotonic() - started
        finally:
            proc.thaw()
        assert lease.is_fallback
        assert took < 20, f"fell back after {took:.1f} s"


def test_falling_back_from_a_hung_broker_no_call_waits_for_the_probe(start_broker):
    """Falling back from a hung broker (SIGSTOP), the probe that asks it
    again hangs up to its timeout in a thread of its own: calls made
    meanwhile are answered from the fallback without waiting for it, and
    no second probe starts while one is out."""
    proc = start_broker()
    fallback = qb.FallbackSettings(probe_every_s=0.01, floor_per_min=60000)
    with qb.QuotaBroker(proc.addr, fallback=fallback) as client:
        client.list_buckets(TENANT)  # connected before the broker hangs
        proc.freeze()
        try:
            assert client.acquire(TENANT, "GET", USERS, client_id="c").is_fallback

            def probes():
                return [t for t in threading.enumerate() if t.name == "quota-broker-probe"]

            deadline = time.monotonic() + 10
            while not probes():
                assert time.monotonic() < deadline, "no probe of the hung broker within 10 s"
                assert client.acquire(TENANT, "GET", USERS, client_id="c").is_fallback
            (probe,) = probes()
            for _ in range(20):
                assert client.acquire(TENANT, "GET", USERS, client_id="c").is_fallback
                client.report(TENANT, "GET", USERS, 200)
            # Still out on the hung broker: the calls above did not wait for it.
            assert probe.is_alive() and probes() == [probe]
        finally:
            proc.thaw()


def _senders(client):
    """The client's sender passes over its kept releases and its probes of
    the broker, as events to wait on (see ``Calls``)."""
    return Calls().wrap(client, "_release_deferred").wrap(client, "_probe")


def _until_the_slot_is_released_by_key(client, senders):
    """After the thaw: the broker's answers send the kept release by key, and
    the one slot of "single" the frozen broker granted comes free. After
    each call, waits for the client's sender or prober (``_senders``) to
    end a pass."""
    deadline = time.monotonic() + 10
    while client.pending_releases or bucket(client, "single").in_flight:
        assert time.monotonic() < deadline, (
            f"slot still held 10 s after the thaw: pending {client.pending_releases}, "
            f"in flight {bucket(client, 'single').in_flight}")
        passes = senders.count()
        client.acquire(TENANT, "GET", USERS, client_id="c").release()  # an answer: sends them
        senders.wait(lambda: senders.count() > passes, deadline - time.monotonic())
    assert bucket(client, "single").granted_total == 1


def test_a_lease_a_frozen_broker_granted_after_the_client_gave_up_is_released(start_broker):
    """A broker stopped (SIGSTOP) reads an Acquire but answers only once
    thawed; the client fell back meanwhile. The slot the broker granted is
    released by the Acquire's idempotency key once it answers again, not
    held until the lease expires."""
    proc = start_broker(single_ttl_ms=60000)
    with qb.QuotaBroker(proc.addr, timeout=1) as client:
        senders = _senders(client)
        client.list_buckets(TENANT)  # connected: the Acquire goes out at once
        proc.freeze()
        try:
            lease = client.acquire(TENANT, "GET", "/api/v2/test/single", client_id="c",
                                   max_wait_ms=0)
            assert lease.is_fallback
            assert client.pending_releases == 1
        finally:
            proc.thaw()
        _until_the_slot_is_released_by_key(client, senders)


def test_without_a_fallback_a_lease_granted_after_the_client_gave_up_is_released(start_broker):
    """The same without a fallback: the Acquire the frozen broker read raises
    to the caller, and the slot it granted meanwhile is released by the
    Acquire's key at the broker's next answer."""
    proc = start_broker(single_ttl_ms=60000)
    with qb.QuotaBroker(proc.addr, timeout=1, fallback=None) as client:
        senders = _senders(client)
        client.list_buckets(TENANT)  # connected: the Acquire goes out at once
        proc.freeze()
        try:
            with pytest.raises((qb.DeadlineExceeded, qb.Unavailable)):
                client.acquire(TENANT, "GET", "/api/v2/test/single", client_id="c", max_wait_ms=0)
            assert client.pending_releases == 1
        finally:
            proc.thaw()
        _until_the_slot_is_released_by_key(client, senders)


def test_reports_alone_fall_back_on_a_hung_broker_and_find_it_back(start_broker):
    """A client that only reports: the first report a hung broker does not
    answer enters the fallback, so the next ones are kept at once instead
    of each waiting out its deadline; once the broker answers, a report
    goes to it again and the kept ones follow."""
    proc = start_broker()
    with qb.QuotaBroker(proc.addr, fallback=qb.FallbackSettings(probe_every_s=0.2)) as client:
        # Each probe of the broker (from a report, or the thread that waits
        # for the broker while outcomes are kept) wakes the waits below.
        probes = Calls().wrap(client, "_probe")
        client.list_buckets(TENANT)  # connected before the broker hangs
        proc.freeze()
        try:
            assert client.report(TENANT, "GET", USERS, 200, oauth_client="r") is None
            assert client.in_fallback
            started = time.monotonic()
            for _ in range(5):
                assert client.report(TENANT, "GET", USERS, 200, oauth_client="r") is None
            assert time.monotonic() - started < 2.0 * 5, "each report waited on the hung broker"
        finally:
            proc.thaw()
        deadline = time.monotonic() + 10
        while client.in_fallback:
            assert time.monotonic() < deadline, "still falling back 10 s after the thaw"
            ended = probes.count()
            client.report(TENANT, "GET", USERS, 200, oauth_client="r")
            # The next probe's end (the broker's answer, or none).
            probes.wait(lambda: not client.in_fallback or probes.count() > ended,
                        deadline - time.monotonic())
        client.flush_reports()
        b = bucket(client, "per-client", "r")
        assert b.reports_total >= 7


EXIT_WITHOUT_CLOSE = r"""
import logging, sys
import quota_broker_client as qb
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
broker = qb.QuotaBroker(sys.argv[1])
assert broker.report("demo", "GET", "/api/v2/users/me", 429, {"Retry-After": "1"}) is None
assert broker.pending_reports == 1
print("kept", flush=True)
sys.stdin.readline()
# exits without broker.close()
"""


def test_clients_not_closed_add_no_exit_hook_each(broker_proc):
    import atexit
    before = atexit._ncallbacks()
    clients = [qb.QuotaBroker(broker_proc.addr) for _ in range(3)]
    # One hook for every client, registered at import: none per client.
    assert atexit._ncallbacks() == before
    for c in clients:
        c.close()


@pytest.mark.parametrize("broker_back", [True, False])
def test_kept_outcomes_are_sent_or_counted_at_exit_without_close(start_broker, broker_back, tmp_path):
    import subprocess
    import sys

    from conftest import free_port

    port = free_port()
    script = tmp_path / "exit_without_close.py"
    script.write_text(EXIT_WITHOUT_CLOSE)
    proc = subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "kept", proc.stderr.read()
        if broker_back:
            broker = start_broker(port=port)
        proc.stdin.write("exit\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lost = [line for line in err.splitlines() if "exiting without QuotaBroker.close()" in line]
    if broker_back:
        assert not lost, err
        with broker.client() as client:
            b = bucket(client, "per-client")
            assert (b.reports_total, b.throttled_total) == (1, 1)
    else:
        assert len(lost) == 1 and "1 outcomes kept" in lost[0] and "lost" in lost[0], err
