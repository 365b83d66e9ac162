"""Cluster mode: a real etcd (installed by conftest.ensure_etcd when missing)
and three broker processes, one leader per tenant. The client follows the
``x-quota-broker-leader`` answer of a follower, and keeps acquiring (fallback
leases or waits, never an exception) while the leader is killed with SIGKILL,
then gets its grants from the new leader.
"""
import logging
import threading
import time
import uuid

import grpc
import pytest

import quota_broker_client as qb
from conftest import CHANGES
from quota_broker_client.quota.v1 import broker_pb2_grpc as pb_grpc

TENANT = "demo"
RATE_PATH = "/api/v2/users/me"
SLOT_PATH = "/api/v2/analytics/conversations/details/query"
TTL_MS = 2000
MARGIN_MS = 500
LEADER_TIMEOUT_S = 20

NODE_CONFIG = """
[server]
listen = "127.0.0.1:{port}"
http_listen = ""
state_dir = ""
shutdown_grace_ms = 1000

[cluster]
etcd = ["@ETCD@"]
node = "@NODE@"
advertise = "http://127.0.0.1:{port}"
prefix = "@PREFIX@"
lease_ttl_ms = @TTL@
safety_margin_ms = @MARGIN@

[[tenants]]
id = "demo"

[[tenants.buckets]]
name = "rate"
routes = ["GET /api/v2/users/**"]
permits = 10
window_ms = 1000
burst = 5

[[tenants.buckets]]
name = "slots"
routes = ["POST /api/v2/analytics/**"]
max_in_flight = 3
lease_ttl_ms = 3000
"""


class Cluster:
    def __init__(self, etcd, start_broker, nodes=("b1", "b2", "b3")):
        prefix = f"/quota-broker-pytest-{uuid.uuid4().hex[:12]}"
        etcd.watch(prefix)
        self.brokers = {}
        for node in nodes:
            config = (NODE_CONFIG.replace("@ETCD@", etcd.url).replace("@NODE@", node)
                      .replace("@PREFIX@", prefix).replace("@TTL@", str(TTL_MS))
                      .replace("@MARGIN@", str(MARGIN_MS)))
            self.brokers[node] = start_broker(config_text=config)

    def addrs(self, alive_only=True):
        return [b.addr for b in self.brokers.values() if not (alive_only and b.killed)]

    def by_addr(self, addr):
        return next(b for b in self.brokers.values() if b.addr == addr)


@pytest.fixture
def cluster(etcd, start_broker):
    # etcd first: the brokers are stopped (SIGTERM, hand-over) before it is.
    return Cluster(etcd, start_broker)


def leads(addr, tenant=TENANT):
    """True if the broker at ``addr`` leads ``tenant``; else the leader URL it names, or None."""
    with grpc.insecure_channel(addr) as channel:
        stub = pb_grpc.QuotaBrokerStub(channel)
        try:
            stub.Report(qb.pb.ReportRequest(tenant=tenant, method="GET", path=RATE_PATH, http_status=200),
                        timeout=2)
            return True
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            for key, value in tuple(e.trailing_metadata() or ()) + tuple(e.initial_metadata() or ()):
                if key == "x-quota-broker-leader":
                    return value
            return None


def settled_leader(addrs, tenant=TENANT, timeout_s=LEADER_TIMEOUT_S):
    """``leader`` the same at every change (``CHANGES``) for a second, and at
    its end: a broker that joined last may still take the tenant over
    (hand-over on join)."""
    deadline = time.monotonic() + timeout_s
    seen = CHANGES.seen()
    last = leader(addrs, tenant, timeout_s)
    since = time.monotonic()
    while True:
        changed = CHANGES.wait(seen, since + 1 - time.monotonic())
        seen = CHANGES.seen()
        now = leader(addrs, tenant, max(deadline - time.monotonic(), 1))
        if now != last:
            last, since = now, time.monotonic()
        elif not changed:
            return now
        assert time.monotonic() < deadline, f"leader of {tenant} not stable within {timeout_s}s"


def leader(addrs, tenant=TENANT, timeout_s=LEADER_TIMEOUT_S):
    """The addr of ``tenant``'s leader once exactly one of ``addrs`` leads it and
    every other one names it (asked again at each change; at most ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = CHANGES.seen()
        answers = {a: leads(a, tenant) for a in addrs}
        leading = [a for a, v in answers.items() if v is True]
        assert len(leading) <= 1, f"{tenant} led by {leading} at once"
        if leading:
            url = f"http://{leading[0]}"
            if all(v is True or v == url for v in answers.values()):
                return leading[0]
        assert CHANGES.wait(seen, deadline - time.monotonic()), \
            f"no settled leader of {tenant} within {timeout_s}s: {answers}"


def test_urls_list_or_comma_separated():
    # No broker needed: channels connect lazily.
    with qb.QuotaBroker("127.0.0.1:1, http://127.0.0.1:2 ,", fallback=None) as c:
        assert c.targets == ["127.0.0.1:1", "127.0.0.1:2"]
        assert c.target == "127.0.0.1:1" and not c.tls
    with qb.QuotaBroker(["http://127.0.0.1:1", "127.0.0.1:2,127.0.0.1:3"], fallback=None) as c:
        assert c.targets == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    with qb.QuotaBroker("127.0.0.1:4", fallback=None) as c:  # a single address, as before
        assert c.targets == ["127.0.0.1:4"] and c.target == "127.0.0.1:4"
    with pytest.raises(ValueError, match="mix"):
        qb.QuotaBroker("http://127.0.0.1:1,https://127.0.0.1:2")
    with pytest.raises(ValueError, match="no broker url"):
        qb.QuotaBroker(" , ")
    with qb.QuotaBroker("127.0.0.1:1", fallback=None) as c:
        # A leader named with another scheme than this client speaks is not followed.
        assert c._leader_target("http://127.0.0.1:9") == "127.0.0.1:9"
        assert c._leader_target("https://127.0.0.1:9") is None
        assert c._leader_target("127.0.0.1:9") == "127.0.0.1:9"


def test_client_given_a_follower_follows_the_leader(cluster):
    addrs = cluster.addrs()
    leader = settled_leader(addrs)
    follower = next(a for a in addrs if a != leader)

    # Only the follower's address; no fallback, so a failure would raise.
    with qb.QuotaBroker(f"http://{follower}", fallback=None, timeout=5) as client:
        lease = client.acquire(TENANT, "GET", RATE_PATH, client_id="py-a", max_wait_ms=2000)
        assert not lease.is_fallback
        assert lease.target == leader, (lease.target, leader, follower)
        assert client.target == leader  # later calls go straight there
        lease.report(200)
        assert any(b.bucket == "rate" for b in client.list_buckets(TENANT))
        # A slot lease: renewed and released at the leader.
        # A leader that took the tenant over counts its slots as held for one
        # lease TTL (3 s; phantoms of the restart learning mode): wait past it.
        slot = client.acquire(TENANT, "POST", SLOT_PATH, client_id="py-a", max_wait_ms=5000)
        assert slot.holds_slot and slot.target == leader
        assert slot.renew().lease_ttl_ms > 0
        assert slot.release() is True
        # Watch follows too (before its first message).
        fresh = qb.QuotaBroker(follower, fallback=None, timeout=5)
        try:
            with fresh.watch(TENANT, timeout=10) as stream:
                first = next(stream)
            assert first.tenant == TENANT
            assert fresh.target == leader
        finally:
            fresh.close()

    # The leader's own view: the grant and the release happened there.
    with qb.QuotaBroker(leader, fallback=None) as direct:
        rate = next(b for b in direct.list_buckets(TENANT) if b.bucket == "rate")
    assert rate.granted_total >= 1


def test_leader_killed_acquires_go_on_then_come_from_the_new_leader(cluster):
    addrs = cluster.addrs()
    first = settled_leader(addrs)
    # Every address, the leader last: the client finds it by the followers' answers.
    ordered = [a for a in addrs if a != first] + [first]
    client = qb.QuotaBroker(",".join(f"http://{a}" for a in ordered), timeout=5)

    events = []  # (time.monotonic(), "fallback" | target) per lease
    errors = []
    killed_at = [None]
    new_leader = [None]
    enough = threading.Event()  # 5 grants before the kill
    stop = threading.Event()
    stop_by = time.monotonic() + 40  # bound of the whole loop, whatever happens

    def acquire_loop():
        try:
            while not stop.is_set() and time.monotonic() < stop_by:
                # max_wait_ms=None: the broker's default wait, or the fallback's (at most 60 s).
                lease = client.acquire(TENANT, "GET", RATE_PATH, client_id="py-b")
                now = time.monotonic()
                events.append((now, "fallback" if lease.is_fallback else lease.target))
                lease.report(200)
                if len(events) >= 5:
                    enough.set()
                if (new_leader[0] is not None
                        and sum(1 for t, by in events if t > killed_at[0] and by == new_leader[0]) >= 3):
                    return
        except BaseException as e:  # noqa: BLE001 - any exception escaping acquire fails the test
            errors.append(e)

    with client:
        # A slot lease held across the kill (renewed in the background).
        with client.lease(TENANT, "POST", SLOT_PATH, client_id="py-holder", max_wait_ms=5000) as held:
            assert held.target == first
            worker = threading.Thread(target=acquire_loop, name="acquire-loop", daemon=True)
            worker.start()
            assert enough.wait(15), f"no 5 grants within 15 s: {events} {errors}"
            assert all(by == first for _, by in events), events

            killed_at[0] = time.monotonic()
            cluster.by_addr(first).kill()
            rest = [a for a in addrs if a != first]
            new_leader[0] = leader(rest)
            took_over_s = time.monotonic() - killed_at[0]

            worker.join(30)
            stop.set()
            assert not worker.is_alive(), "the acquire loop did not end within 30 s"
            assert not errors, f"exception escaped acquire: {errors!r}"

            after = [(t - killed_at[0], by) for t, by in events if t > killed_at[0]]
            assert all(by in ("fallback", new_leader[0]) for _, by in after), after
            from_new = [t for t, by in after if by == new_leader[0]]
            assert len(from_new) >= 3, f"not 3 grants by the new leader {new_leader[0]}: {after}"
            # Not before the dead leader's etcd lease could have expired, and within a few seconds.
            assert (TTL_MS - MARGIN_MS) / 1000.0 <= from_new[0] < 10, after
            assert client.target == new_leader[0]

            # The slot lease is renewed at the new leader (adopted from acquired_with)...
            resp = held.renew()
            assert resp.lease_ttl_ms > 0
            # ...and released there.
            assert held.release() is True
        print(f"takeover after SIGKILL: leader settled in {took_over_s:.2f}s, first grant by the "
              f"new leader {from_new[0]:.2f}s after the kill; "
              f"{sum(1 for _, by in after if by == 'fallback')} fallback leases meanwhile")


def _two_nodes_advertising_dead_urls(etcd, start_broker, dead_urls):
    """Two brokers in cluster mode whose cluster.advertise URLs (``dead_urls``)
    reach nothing, as with a mistaken advertise: a follower sends the
    tenant's callers to a leader URL that does not answer. Returns
    (leader's BrokerProcess, follower's, the dead URL the follower names)."""
    prefix = f"/quota-broker-pytest-{uuid.uuid4().hex[:12]}"
    etcd.watch(prefix)
    nodes = []
    for node, url in zip(("b1", "b2"), dead_urls):
        config = (NODE_CONFIG.replace("@ETCD@", etcd.url).replace("@NODE@", node)
                  .replace("@PREFIX@", prefix).replace("@TTL@", str(TTL_MS))
                  .replace("@MARGIN@", str(MARGIN_MS))
                  .replace('advertise = "http://127.0.0.1:{port}"', f'advertise = "{url}"'))
        nodes.append(start_broker(config_text=config))
    deadline = time.monotonic() + LEADER_TIMEOUT_S
    while True:
        seen = CHANGES.seen()
        answers = [leads(b.addr) for b in nodes]
        if answers.count(True) == 1 and all(a is True or a in dead_urls for a in answers):
            leader = nodes[answers.index(True)]
            follower = nodes[1 - answers.index(True)]
            return leader, follower, answers[nodes.index(follower)]
        assert CHANGES.wait(seen, deadline - time.monotonic()), \
            f"no leader of {TENANT} named within {LEADER_TIMEOUT_S}s: {answers}"


def test_a_leader_named_that_does_not_answer_the_other_urls_are_tried(etcd, start_broker, caplog):
    """The trial: a broker answered with a redirect to its tenant's leader
    (x-quota-broker-leader) whose URL did not answer, and the client went to
    the fallback instead of trying the other URLs it was given (quotactl
    does). And its warning called the brokers "unreachable": it says what
    happened instead."""
    import socket
    with socket.socket() as d1, socket.socket() as d2:
        for d in (d1, d2):
            d.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        dead = [f"http://127.0.0.1:{d.getsockname()[1]}" for d in (d1, d2)]
        leader, follower, named = _two_nodes_advertising_dead_urls(etcd, start_broker, dead)

        # The follower first: it names the dead URL; the leader's own
        # address, given second, answers.
        with qb.QuotaBroker([follower.addr, leader.addr], fallback=None, timeout=5) as client:
            lease = client.acquire(TENANT, "GET", RATE_PATH, client_id="py-c", max_wait_ms=2000)
            assert not lease.is_fallback and lease.target == leader.addr
            assert client.target == leader.addr

        # Only the follower given: nothing else to try, so the fallback; its
        # one warning says what happened.
        with qb.QuotaBroker(follower.addr, timeout=5) as client:
            assert client.acquire(TENANT, "GET", RATE_PATH, client_id="py-c", max_wait_ms=0).is_fallback
        warned = [r.getMessage() for r in caplog.records
                  if r.name == "quota_broker_client" and r.levelno >= logging.WARNING]
        assert len(warned) == 1, warned
        said = f"{follower.addr} sends tenant {TENANT}'s callers to {named}, which does not answer " \
               "(connection refused)"
        assert said in warned[0], warned
        assert "unreachable" not in warned[0], warned
