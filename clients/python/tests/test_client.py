"""QuotaBroker against a real broker process (see conftest.py)."""
import hashlib
import logging
import time

import grpc
import pytest

import quota_broker_client as qb
from conftest import ANALYTICS_QUERY, SINGLE_PATH, TENANT, Calls, free_port, watch_bucket


def status(client, name, oauth_client=""):
    b = client.bucket(TENANT, name, oauth_client)
    assert b is not None, f"no bucket {name!r}: {[x.bucket for x in client.list_buckets(TENANT)]}"
    return b


def test_lease_context_manager_acquires_and_releases(broker):
    assert status(broker, "analytics-query").in_flight == 0
    with broker.lease(TENANT, "POST", ANALYTICS_QUERY, client_id="ingest-1", max_wait_ms=1000) as lease:
        assert isinstance(lease, qb.Lease)
        assert lease.lease_id
        assert lease.permits == 1
        assert lease.lease_ttl_ms > 0 and lease.holds_slot
        assert "analytics-query" in lease.buckets
        assert status(broker, "analytics-query").in_flight == 1
    assert lease.released
    assert status(broker, "analytics-query").in_flight == 0
    assert status(broker, "analytics-query").granted_total == 1


def test_a_lease_without_slots_is_released_without_a_call(broker):
    sent = []
    call = broker._call

    def counting(method, req, *a, **kw):
        sent.append(method)
        return call(method, req, *a, **kw)

    broker._call = counting
    with broker.lease(TENANT, "GET", "/api/v2/users/me", client_id="c", max_wait_ms=0) as lease:
        assert not lease.holds_slot and lease.buckets == ["per-client"]
    assert lease.released
    # Before: a Release, and one more with the Acquire when told nothing was released.
    assert "Release" not in sent, sent
    with broker.lease(TENANT, "POST", ANALYTICS_QUERY, client_id="c", max_wait_ms=0) as lease:
        assert lease.holds_slot
    assert sent.count("Release") == 1, sent


def test_lease_released_when_block_raises(broker):
    with pytest.raises(RuntimeError, match="upstream blew up"):
        with broker.lease(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=0):
            assert status(broker, "single").in_flight == 1
            raise RuntimeError("upstream blew up")
    assert status(broker, "single").in_flight == 0


def test_not_granted_when_slot_taken(broker):
    with broker.lease(TENANT, "GET", SINGLE_PATH, client_id="holder", max_wait_ms=0):
        with pytest.raises(qb.NotGranted) as info:
            broker.acquire(TENANT, "GET", SINGLE_PATH, client_id="second", max_wait_ms=0)
        err = info.value
        assert err.retry_after_ms > 0
        assert err.reason
        assert "single" in err.buckets
        assert "retry after" in str(err)
    # Free again: granted at once.
    lease = broker.acquire(TENANT, "GET", SINGLE_PATH, client_id="second", max_wait_ms=0)
    assert lease.release() is True
    assert lease.release() is False  # idempotent


def test_a_broker_holding_a_call_past_the_deadline_is_not_an_outage(broker_proc, monkeypatch):
    # The batch class waits up to 30 s; this client's deadline for a call
    # without max_wait_ms is made 0.5 s + its 1 s timeout.
    monkeypatch.setattr(qb.client, "_SERVER_MAX_WAIT_MS", 500)
    with broker_proc.client() as holder, qb.QuotaBroker(broker_proc.url, timeout=1.0) as client:
        with holder.lease(TENANT, "GET", SINGLE_PATH, client_id="holder", max_wait_ms=0):
            with pytest.raises(qb.NotGranted) as info:
                client.acquire(TENANT, "GET", SINGLE_PATH, client_id="second",
                               priority_class="batch")
            assert "deadline" in info.value.reason
            assert not client.in_fallback, "a fallback lease beside the broker's slot"


def test_a_released_lease_is_no_longer_renewed(broker):
    with broker.lease(TENANT, "GET", SINGLE_PATH, client_id="early", max_wait_ms=0) as lease:
        assert lease._renewer.is_alive()
        assert lease.release() is True
        assert not lease._renewer.is_alive()


def test_a_closed_client_says_so_and_its_leases_end_quietly(broker_proc):
    client = broker_proc.client()
    lease = client.acquire(TENANT, "GET", SINGLE_PATH, client_id="closing", max_wait_ms=0)
    client.close()
    # The slot comes back by itself at its expiry; nothing is raised.
    assert lease.release() is False
    with pytest.raises(qb.Closed):
        client.acquire(TENANT, "GET", SINGLE_PATH, client_id="after", max_wait_ms=0)
    with pytest.raises(qb.Closed):
        client.report(TENANT, "GET", SINGLE_PATH, 200, {})


def test_a_call_waiting_when_the_client_is_closed_raises_closed(broker_proc):
    """close() from another thread while an Acquire waits on the broker:
    the waiting call raises Closed, as every call after close() does, not
    gRPC's CANCELLED or ValueError."""
    import threading
    client = broker_proc.client()
    holder = client.acquire(TENANT, "GET", SINGLE_PATH, client_id="holder", max_wait_ms=0)
    outcome = []

    def wait_for_the_slot():
        try:
            client.acquire(TENANT, "GET", SINGLE_PATH, client_id="waiter", max_wait_ms=5000,
                           priority_class="critical")
            outcome.append("granted")
        except Exception as e:  # what the caller would see
            outcome.append(e)

    waiter = threading.Thread(target=wait_for_the_slot)
    waiter.start()
    # The broker's queue, seen on its Watch stream.
    queued, _ = watch_bucket(client, "single", lambda b: b.waiting.get("critical", 0) >= 1, 10)
    assert queued, "the Acquire never queued"
    client.close()
    waiter.join(10)
    assert not waiter.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], qb.Closed), outcome
    holder.release()


def test_close_twice_after_the_broker_went_away_keeps_what_it_kept_and_raises_nothing(start_broker,
                                                                                      caplog):
    proc = start_broker(single_ttl_ms=60_000)
    client = proc.client()
    lease = client.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=0)
    proc.kill()
    assert lease.release() is False
    assert client.report(TENANT, "GET", SINGLE_PATH, 200, {}) is None
    assert (client.pending_releases, client.pending_reports) == (1, 1)
    client.close()  # the broker does not answer: both stay kept
    client.close()
    said = [r for r in caplog.records if "closing with" in r.getMessage()]
    assert len(said) == 1, "the second close() tried and said it again"
    # A with-block's own exception is what the caller sees, not Closed.
    with pytest.raises(RuntimeError, match="the block's own"):
        with client:
            raise RuntimeError("the block's own")
    # Sending them after close() neither raises nor loses them.
    assert client.flush_reports() == 0
    client._send_deferred()
    assert (client.pending_releases, client.pending_reports) == (1, 1)


def test_every_call_after_close_raises_closed(start_broker):
    proc = start_broker()
    client = proc.client()
    proc.kill()
    # Falling back: a report is kept.
    assert client.report(TENANT, "GET", SINGLE_PATH, 200, {}) is None and client.in_fallback
    client.close()
    for call in (lambda: client.report(TENANT, "GET", SINGLE_PATH, 200, {}),
                 lambda: client.watch(TENANT),
                 lambda: client.list_buckets(TENANT),
                 lambda: client.renew("some-lease"),
                 lambda: client.release("some-lease"),
                 lambda: client.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=0)):
        with pytest.raises(qb.Closed):
            call()
    assert client.pending_reports == 1


def test_a_lease_released_by_two_threads_at_once_is_released_once(broker):
    import threading
    lease = broker.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=0)
    sent, results = [], []
    # Told when the second thread finds the lease's lock held, or has ended.
    changed = threading.Condition()
    seen = {"blocked": False, "ended": False}

    def tell(what):
        with changed:
            seen[what] = True
            changed.notify_all()

    def release_too():
        try:
            results.append(lease.release())
        finally:
            tell("ended")

    second = threading.Thread(target=release_too)
    real = broker.stub.Release

    class Watched:
        """The lease's lock, saying when a thread finds it held."""

        def __init__(self, lock):
            self.lock = lock

        def __enter__(self):
            if not self.lock.acquire(blocking=False):
                tell("blocked")
                self.lock.acquire()
            return self

        def __exit__(self, *exc):
            self.lock.release()

    lease._release_lock = Watched(lease._release_lock)

    def release(*a, **kw):
        sent.append(threading.current_thread().name)
        if second.ident is None:
            # The other thread releases while this one's Release is out: it
            # waits on the lease's lock (without it, it sends its own at once
            # and ends first). Either is a real event.
            second.start()
            with changed:
                assert changed.wait_for(lambda: seen["blocked"] or seen["ended"], 10), \
                    "the second release neither sent nor waited"
        return real(*a, **kw)

    broker.stub.Release = release
    results.append(lease.release())
    second.join(10)
    assert not second.is_alive()
    assert sorted(results) == [False, True], results
    assert len(sent) == 1, sent
    assert status(broker, "single").in_flight == 0


def test_lease_renews_slot_past_its_ttl(broker):
    # The "single" bucket's lease TTL is 1.5 s; held through three renewals
    # (one every half TTL), well past it.
    # Each Renew the renewer sends wakes the wait, as it goes out and as it
    # is answered (the renewer counts it just after: at worst seen when the
    # next one goes out).
    renews = Calls().wrap(broker.stub, "Renew")
    with broker.lease(TENANT, "GET", SINGLE_PATH, client_id="long-call", max_wait_ms=0) as lease:
        granted = time.monotonic()
        assert 0 < lease.lease_ttl_ms <= 1500
        assert renews.wait(lambda: lease._renewer.renewals >= 3, granted + 10 - time.monotonic()), \
            "the lease was not renewed three times in 10 s"
        assert time.monotonic() - granted > lease.lease_ttl_ms / 1000
        assert status(broker, "single").in_flight == 1
        with pytest.raises(qb.NotGranted):
            broker.acquire(TENANT, "GET", SINGLE_PATH, client_id="other", max_wait_ms=0)
    assert status(broker, "single").in_flight == 0


def test_report_429_freezes_bucket(broker):
    with broker.lease(TENANT, "POST", ANALYTICS_QUERY, client_id="ingest-1", max_wait_ms=1000) as lease:
        resp = lease.report(429, {
            "Retry-After": "15",
            "inin-ratelimit-allowed": "60",
            "ININ-RateLimit-Count": "60",
            "inin-ratelimit-reset": "15",
            "Content-Type": "application/json",
        })
    assert resp.attributed_to == "analytics-query"
    b = status(broker, "analytics-query")
    assert b.throttled_total == 1
    assert b.reports_total == 1
    assert b.frozen_until_ms > b.at_ms
    assert b.frozen_until_ms - b.at_ms <= 16_000
    # Frozen: an immediate Acquire is not granted, retry_after points past the freeze.
    with pytest.raises(qb.NotGranted) as info:
        broker.acquire(TENANT, "POST", ANALYTICS_QUERY, client_id="ingest-2", max_wait_ms=0)
    assert info.value.retry_after_ms > 10_000


def test_report_429_about_concurrency_lowers_the_slot_limit(broker):
    body = b'{"message":"Too many concurrent requests for this endpoint"}'
    assert qb.says_concurrency(body) and not qb.says_concurrency(b"rate limit exceeded")
    held = [broker.acquire(TENANT, "POST", ANALYTICS_QUERY, client_id=f"w{i}", max_wait_ms=1000)
            for i in range(3)]
    try:
        resp = held[0].report(429, {"Retry-After": "1"}, concurrency_limited=qb.says_concurrency(body))
        assert resp.attributed_to == "analytics-query"
        b = status(broker, "analytics-query")
        assert (b.in_flight, b.max_in_flight) == (3, 2)
        assert b.frozen_until_ms == 0  # the rate is left alone
    finally:
        for lease in held:
            lease.release()


def test_report_without_lease(broker):
    resp = broker.report(TENANT, "POST", ANALYTICS_QUERY, 200,
                         [("X-RateLimit-Limit", "60"), ("x-ratelimit-remaining", "50")])
    assert "analytics-query" in resp.buckets
    assert status(broker, "analytics-query").reports_total == 1
    assert status(broker, "analytics-query").throttled_total == 0


def test_errors_are_typed_with_broker_message(broker):
    with pytest.raises(qb.NotFound) as info:
        broker.acquire("no-such-tenant", "GET", "/api/v2/users/me", client_id="c", max_wait_ms=0)
    assert "no-such-tenant" in info.value.details or "demo" in info.value.details
    with pytest.raises(qb.InvalidArgument) as info:
        broker.acquire(TENANT, "GET", "/api/v2/users/me", client_id="", max_wait_ms=0)
    assert "client_id" in str(info.value)
    with pytest.raises(qb.InvalidArgument) as info:
        broker.acquire(TENANT, "GET", "/api/v2/users/me", client_id="c", priority_class="vip", max_wait_ms=0)
    assert "batch" in info.value.details  # lists the tenant's classes
    assert isinstance(info.value, qb.BrokerRpcError) and isinstance(info.value, qb.QuotaBrokerError)


def test_token_auth(start_broker):
    token = "s3cret-client-token"
    digest = hashlib.sha256(token.encode()).hexdigest()
    proc = start_broker(auth=f"""
[[auth.tokens]]
name = "python-tests"
sha256 = "{digest}"
role = "client"
tenants = ["demo"]
""")
    with proc.client() as anonymous:
        with pytest.raises(qb.Unauthenticated):
            anonymous.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=0)
        with pytest.raises(qb.Unauthenticated):
            anonymous.list_buckets(TENANT)
    with proc.client(token="wrong-token") as wrong:
        with pytest.raises(qb.Unauthenticated):
            wrong.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=0)
    # Read from a file, newline and all.
    with proc.client(token=token + "\n") as from_file:
        assert from_file.list_buckets(TENANT)
    with proc.client(token=token) as good:
        with good.lease(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=0) as lease:
            assert lease.lease_id
            lease.report(200, {})
        assert status(good, "single").reports_total == 1
        assert good.list_buckets(TENANT)  # a client token may list its tenants' buckets
        # ...but not use the admin RPCs (raw stub, with the wrapper's metadata).
        with pytest.raises(grpc.RpcError) as info:
            good.admin_stub.PauseBucket(qb.pb.PauseBucketRequest(tenant=TENANT, bucket="single"),
                                        timeout=10, metadata=good.metadata)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_watch_yields_first_snapshot(broker):
    expected = {b.bucket for b in broker.list_buckets(TENANT)}
    assert {"analytics-query", "single"} <= expected
    seen = set()
    with broker.watch(TENANT, timeout=10) as stream:
        for st in stream:
            assert isinstance(st, qb.pb.QuotaStatus)
            assert st.tenant == TENANT
            assert st.at_ms > 0
            seen.add(st.bucket)
            if seen >= expected:
                break
    assert seen >= expected


def test_watch_sees_change(broker):
    with broker.watch(TENANT, timeout=10) as stream:
        first = next(stream)
        assert first.tenant == TENANT
        broker.report(TENANT, "GET", SINGLE_PATH, 429, {"Retry-After": "1"})
        for st in stream:
            if st.bucket == "single" and st.throttled_total == 1:
                break
        else:
            pytest.fail("watch ended without the change")


def test_url_forms(broker_proc):
    for url in (broker_proc.addr, f"http://{broker_proc.addr}", f"http://{broker_proc.addr}/",
                f"grpc://{broker_proc.addr}"):
        with qb.QuotaBroker(url) as c:
            assert c.list_buckets(TENANT) and not c.tls
    # grpcs:// is https:// (TLS); without a port, the scheme's as for http(s)://.
    with qb.QuotaBroker("grpcs://broker.example", fallback=None) as c:
        assert c.tls and c.targets == ["broker.example:443"]
    with qb.QuotaBroker("grpc://broker.example", fallback=None) as c:
        assert not c.tls and c.targets == ["broker.example:80"]


SECRET = "s3cret-token-value"


@pytest.mark.parametrize("token, says", [
    ("Bearer " + SECRET, "starts with 'Bearer ': give the token alone; the client sends"),
    ("bearer " + SECRET, "starts with 'Bearer '"),
    (SECRET + "é", "has a non-ASCII character (character 19 of 19)"),
    (SECRET[:4] + "\t" + SECRET[4:], "has a control character (character 5 of 19)"),
    (SECRET + "\x00", "has a control character"),
    (SECRET * 300, "is 5400 characters long, more than the 4096"),
])
def test_token_mistakes_are_refused_when_the_client_is_built(token, says):
    """A token gRPC cannot send (INTERNAL "Invalid metadata" plus C-core
    noise on stderr), one the broker's HTTP/2 server refuses (431, seen as
    UNKNOWN), or one with the "Bearer " the client adds itself: BadToken
    (a ConfigError, a ValueError) when the client is built, naming the
    parameter, never the token."""
    with pytest.raises(qb.BadToken) as info:
        qb.QuotaBroker("127.0.0.1:50051", token=token)
    said = str(info.value)
    assert says in said and "token=" in said, said
    assert SECRET not in said and SECRET[:8] not in said, said
    assert isinstance(info.value, qb.ConfigError) and isinstance(info.value, ValueError)
    with pytest.raises(TypeError, match="token must be a str or None, got bytes"):
        qb.QuotaBroker("127.0.0.1:50051", token=SECRET.encode())


def test_a_timeout_not_above_max_wait_is_refused_naming_the_mistake(broker):
    """The trial: acquire(max_wait_ms=5000, timeout=1) ended in a bare
    DEADLINE_EXCEEDED. timeout is the whole call's deadline in seconds,
    the broker's wait included."""
    held = broker.acquire(TENANT, "GET", SINGLE_PATH, client_id="holder", max_wait_ms=0)
    try:
        calls = [
            lambda: broker.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=5000, timeout=1),
            lambda: broker.acquire_raw(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=5000,
                                       timeout=5),
            lambda: broker.lease(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=5000,
                                 timeout=1).__enter__(),
        ]
        for call in calls:
            with pytest.raises(ValueError, match=r"timeout=\d s is not above max_wait_ms=5000 \(5 s\)"):
                call()
        with pytest.raises(ValueError, match="timeout must be > 0"):
            broker.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", timeout=0)
        with pytest.raises(TypeError, match="timeout must be a number of seconds"):
            broker.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", timeout="1")
        # Without max_wait_ms the class's default wait may be longer than the
        # timeout: the DeadlineExceeded says so.
        with pytest.raises(qb.DeadlineExceeded) as info:
            broker.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", timeout=0.3)
        assert "timeout=0.3 s given to acquire ran out" in str(info.value), info.value
        assert "pass max_wait_ms below it" in str(info.value), info.value
        # A timeout above the wait: the broker's own answer.
        with pytest.raises(qb.NotGranted):
            with broker.lease(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=100, timeout=5):
                pass
    finally:
        held.release()
    with broker.lease(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=100, timeout=5) as lease:
        assert lease.lease_id


def test_asyncio_callers_run_the_blocking_calls_in_threads(broker):
    """As the README shows: every call of the client blocks its thread (an
    Acquire up to its max_wait_ms), so a coroutine awaits it with
    asyncio.to_thread. The event loop runs meanwhile: here the coroutine
    that releases the slot the Acquire waits for runs while it waits."""
    import asyncio

    async def main():
        held = await asyncio.to_thread(broker.acquire, TENANT, "GET", SINGLE_PATH, client_id="holder",
                                       max_wait_ms=0)
        waiting = asyncio.create_task(asyncio.to_thread(
            broker.acquire, TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=10_000))
        # The broker holds the Acquire (slot taken): the loop still runs.
        await asyncio.sleep(0)
        assert not waiting.done()
        assert await asyncio.to_thread(held.release) is True
        lease = await asyncio.wait_for(waiting, 15)
        try:
            await asyncio.to_thread(lease.report, 200, {"Retry-After": "0"})
        finally:
            await asyncio.to_thread(lease.release)
        return lease

    lease = asyncio.run(main())
    assert lease.lease_id and lease.released
    assert status(broker, "single").in_flight == 0


def test_unreachable_broker_means_fallback_or_unavailable():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        with qb.QuotaBroker(f"127.0.0.1:{port}", timeout=3) as c:
            lease = c.acquire(TENANT, "GET", "/api/v2/users/me", client_id="c", max_wait_ms=0)
            assert lease.is_fallback and c.in_fallback
        with qb.QuotaBroker(f"127.0.0.1:{port}", timeout=3, fallback=None) as c:
            with pytest.raises((qb.Unavailable, qb.DeadlineExceeded)):
                c.acquire(TENANT, "GET", "/api/v2/users/me", client_id="c", max_wait_ms=0)


def test_a_restarted_broker_adopts_a_held_lease(start_broker, tmp_path):
    state = tmp_path / "state"
    b = start_broker(state_dir=str(state), single_ttl_ms=5000)
    client = b.client()
    lease = client.acquire(TENANT, "GET", SINGLE_PATH, client_id="holder", max_wait_ms=0)
    # The broker wrote its state file before serving: the next start is a restart.
    assert (state / "learned.toml").exists()
    b.kill()
    start_broker(state_dir=str(state), single_ttl_ms=5000, port=b.port)
    # The held call goes on: its renewal is adopted, not NotFound.
    try:
        lease.renew()
    except qb.Unavailable:
        _reconnected(client, 10)
        lease.renew()
    # The slot is held by the adopted lease (and the rate bucket restarts
    # drained: its first permit comes one interval after the start).
    with pytest.raises(qb.NotGranted) as info:
        client.acquire(TENANT, "GET", SINGLE_PATH, client_id="second",
                       priority_class="critical", max_wait_ms=0)
    assert "concurrency slots" in info.value.reason
    assert lease.release() is True
    client.acquire(TENANT, "GET", SINGLE_PATH, client_id="second",
                   priority_class="critical", max_wait_ms=10_000).release()
    client.close()


def test_a_lease_released_after_its_broker_crashed_frees_its_slot_at_once(start_broker, tmp_path):
    # Killed while a lease is held, back before any renewal: the release
    # says which Acquire granted the lease, so the new run frees the slot
    # at once instead of counting it held for the whole TTL (10 minutes).
    state = tmp_path / "state"
    b = start_broker(state_dir=str(state), single_ttl_ms=600_000)
    client = b.client()
    lease = client.acquire(TENANT, "GET", SINGLE_PATH, client_id="holder", max_wait_ms=0)
    b.kill()
    start_broker(state_dir=str(state), single_ttl_ms=600_000, port=b.port)
    try:
        assert lease.release() is True
    except qb.Unavailable:
        _reconnected(client, 10)
        lease.released = False
        assert lease.release() is True
    # A few seconds' wait: the restarted rate bucket starts drained.
    client.acquire(TENANT, "GET", SINGLE_PATH, client_id="second",
                   priority_class="critical", max_wait_ms=5_000).release()
    client.close()


def _reconnected(client, timeout_s):
    """Waits for the client's channel to connect again (gRPC's connectivity
    event, state READY: the broker restarted on its port), at most ``timeout_s``."""
    try:
        grpc.channel_ready_future(client.channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        pytest.fail(f"the client did not reconnect within {timeout_s} s")


class _Wake(logging.Handler):
    """Keeps each record of the client's logger and wakes ``cond``."""

    def __init__(self, cond):
        super().__init__(logging.NOTSET)
        self.cond, self.records = cond, []

    def emit(self, record):
        with self.cond:
            self.records.append(record)
            self.cond.notify_all()


def _logged(caplog, text, deadline_s):
    """Waits (woken by each client log record, at most `deadline_s`) until a client log line contains `text`."""
    import threading
    logger = logging.getLogger("quota_broker_client")
    cond = threading.Condition()
    wake = _Wake(cond)
    logger.addHandler(wake)
    try:
        with cond:
            assert cond.wait_for(
                lambda: any(text in r.getMessage() for r in caplog.records + wake.records
                            if r.name == "quota_broker_client"), deadline_s), \
                f"no log line saying {text!r}"
    finally:
        logger.removeHandler(wake)


def test_a_lease_whose_broker_is_back_only_after_its_ttl_is_renewed_and_adopted(
        start_broker, tmp_path, caplog):
    # A broker killed while a lease is held and back only after the lease's
    # 1 s TTL has passed (as a cluster's election can outlast a short TTL):
    # the renewer goes on past the expiry and the restarted broker adopts it.
    # Its failures are debug lines: the outage is the fallback's one warning.
    caplog.set_level(logging.DEBUG, logger="quota_broker_client")
    state = tmp_path / "state"
    b = start_broker(state_dir=str(state), single_ttl_ms=1000)
    client = b.client()
    with client.lease(TENANT, "GET", SINGLE_PATH, client_id="holder", max_wait_ms=0) as lease:
        assert lease.holds_slot
        b.kill()
        _logged(caplog, "passed its expiry while renewals failed", 10)
        start_broker(state_dir=str(state), single_ttl_ms=1000, port=b.port)
        _logged(caplog, "renewed again after its expiry", 10)
        # Past the restart's one-TTL learning window the adopted lease still
        # holds the slot: a caller waiting 3 s (three TTLs) does not get it.
        with pytest.raises(qb.NotGranted) as info:
            client.acquire(TENANT, "GET", SINGLE_PATH, client_id="second",
                           priority_class="critical", max_wait_ms=3000)
        assert "concurrency slots" in info.value.reason
    # Released on exit: free at once.
    client.acquire(TENANT, "GET", SINGLE_PATH, client_id="second",
                   priority_class="critical", max_wait_ms=1000).release()
    client.close()
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "quota_broker_client" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0], warnings


@pytest.mark.parametrize("down", ["stop", "kill"])
def test_a_release_that_finds_the_broker_away_is_sent_when_it_is_back(start_broker, tmp_path, down):
    # The broker stopped gracefully (it recorded the lease: the next run
    # holds its slot) or crashed (the next run counts the slot held for an
    # unknown lease); a TTL of 10 minutes, so only the release can free it.
    # Released while it is away (the connection refused: no broker read
    # it), the release is kept with the Acquire that granted the lease and
    # sent once the broker answers, with no further call from this client;
    # the run after the crash, which never knew the lease, frees the slot by
    # that Acquire.
    state = tmp_path / "state"
    b = start_broker(state_dir=str(state), single_ttl_ms=600_000)
    client = b.client()
    lease = client.acquire(TENANT, "GET", SINGLE_PATH, client_id="holder", max_wait_ms=0)
    getattr(b, down)()
    assert lease.release() is False
    assert client.pending_releases == 1
    # Each pass of the client's sender over its kept releases wakes the wait below.
    senders = Calls().wrap(client, "_release_deferred")
    b2 = start_broker(state_dir=str(state), single_ttl_ms=600_000, port=b.port)
    observer = b2.client()
    assert senders.wait_idle(lambda: not client.pending_releases, 10), \
        "the kept release was not sent once the broker was back"
    # The slot is free ten minutes before the lease would have expired (a
    # few seconds' wait: the restarted rate bucket starts drained); held,
    # this wait would end NotGranted.
    observer.acquire(TENANT, "GET", SINGLE_PATH, client_id="second",
                     priority_class="critical", max_wait_ms=5_000).release()
    client.close()
    observer.close()


def test_a_release_kept_for_an_acquire_without_answer_is_sent_with_no_further_call(start_broker):
    """Without a fallback, an Acquire a frozen broker read raises; the release
    by its key kept meanwhile is sent once the broker answers again, also
    when this client makes no other call."""
    proc = start_broker(single_ttl_ms=60000)
    observer = proc.client()
    with qb.QuotaBroker(proc.addr, timeout=1, fallback=None) as client:
        # Each pass of the client's sender over its kept releases wakes the wait below.
        senders = Calls().wrap(client, "_release_deferred")
        client.list_buckets(TENANT)  # connected: the Acquire goes out at once
        proc.freeze()
        try:
            with pytest.raises((qb.DeadlineExceeded, qb.Unavailable)):
                client.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=0)
            assert client.pending_releases == 1
        finally:
            proc.thaw()
        assert senders.wait_idle(lambda: not client.pending_releases, 10), \
            "the kept release was not sent 10 s after the thaw"
    b = status(observer, "single")
    assert (b.granted_total, b.in_flight) == (1, 0)
    observer.close()


def test_a_closed_client_opens_no_channel():
    client = qb.QuotaBroker(f"127.0.0.1:{free_port()}", timeout=1)
    client.close()
    # A probe racing close() asks for another broker's channel.
    with pytest.raises(qb.Closed):
        client._conn_for(f"127.0.0.1:{free_port()}")
    assert len(client._conns) == 1


def test_the_renewer_retries_only_what_may_pass_later():
    from quota_broker_client.leases import _renewal_may_pass_later
    from quota_broker_client import errors
    assert _renewal_may_pass_later(errors.Unavailable(grpc.StatusCode.UNAVAILABLE, "restarting"))
    assert _renewal_may_pass_later(errors.DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, "slow"))
    assert _renewal_may_pass_later(errors.BrokerRpcError(grpc.StatusCode.ABORTED, "busy"))
    # A refusal of the request or of the caller, or a handshake that cannot
    # succeed, is the same next time: the renewer stops.
    assert not _renewal_may_pass_later(
        errors.FailedPrecondition(grpc.StatusCode.FAILED_PRECONDITION, "too many permits"))
    assert not _renewal_may_pass_later(errors.BrokerRpcError(grpc.StatusCode.OUT_OF_RANGE, "too big"))
    assert not _renewal_may_pass_later(errors.TlsError("no CA this client trusts signed it"))


def test_arguments_of_the_wrong_type_or_range_are_refused_naming_them():
    # Refused before any call: no broker at this address is needed.
    with qb.QuotaBroker(f"127.0.0.1:{free_port()}", timeout=1, fallback=None) as c:
        for kw, error, says in [
            (dict(tenant=123), TypeError, "tenant must be a str, got int"),
            (dict(method=None), TypeError, "method must be a str, got NoneType"),
            (dict(max_wait_ms=10**30), ValueError, "max_wait_ms must be from 0 to"),
            (dict(max_wait_ms=-5), ValueError, "max_wait_ms must be from 0 to"),
            (dict(max_wait_ms="100"), TypeError, "max_wait_ms must be an int, got str"),
            (dict(permits=1.5), TypeError, "permits must be an int, got float"),
        ]:
            args = dict(tenant=TENANT, method="GET", path="/api/v2/users/me", client_id="c")
            args.update(kw)
            tenant, method, path = args.pop("tenant"), args.pop("method"), args.pop("path")
            with pytest.raises(error, match=says):
                c.acquire(tenant, method, path, **args)
        with pytest.raises(TypeError, match="headers must be a mapping or a list of"):
            c.report(TENANT, "GET", "/x", 200, ["a"])
        with pytest.raises(TypeError, match="status must be an int"):
            c.report(TENANT, "GET", "/x", "200", {})
        with pytest.raises(ValueError, match="lease_id is empty"):
            c.release("")
        for call, error, says in [
            (lambda: c.renew("x", extend_ms="100"), TypeError, "extend_ms must be an int, got str"),
            (lambda: c.renew("x", extend_ms=-1), ValueError, "extend_ms must be from 0 to"),
            (lambda: c.renew(123), TypeError, "lease_id must be a str, got int"),
            (lambda: c.watch(tenant=5), TypeError, "tenant must be a str, got int"),
            (lambda: c.list_buckets(b"demo"), TypeError, "tenant must be a str, got bytes"),
        ]:
            with pytest.raises(error, match=says):
                call()
