"""A broker url that can never work is an error, not an outage.

The local fallback is for a broker that is down: it paces calls until the
broker is back. A url that cannot be parsed, or whose server answers but is
not a quota-broker's gRPC port (a broker's HTTP port, an HTTP/1 server,
another gRPC service), is never back: the client raises ``BadUrl`` /
``NotABroker`` (both ``ValueError``) with what to change, and logs it once
per address (until it answers as a broker), instead of running on the
fallback rate for good. In a list of brokers it is passed over, and tried
again every ``RECHECK_NOT_A_BROKER_S``. An outage
(connection refused) still falls back. Against real servers: a broker
process, Python's HTTP server, a gRPC server without the broker's services.
"""
import collections
import http.server
import logging
import os
import socket
import threading
import time
from concurrent import futures

import grpc
import pytest

import quota_broker_client as qb
from conftest import SINGLE_PATH, TENANT, Calls, bucket, free_port

USERS = "/api/v2/users/me"

# A broker with its HTTP port (metrics, dashboard, probes) on {http_port}.
WITH_HTTP_PORT = """
[server]
listen = "127.0.0.1:{port}"
http_listen = "127.0.0.1:%d"
state_dir = ""
shutdown_grace_ms = 2000

[[tenants]]
id = "demo"

[[tenants.buckets]]
name = "per-client"
scope = "oauth_client"
routes = ["* /**"]
permits = 300
window_ms = 60000
"""


def errors_logged(caplog):
    return [r for r in caplog.records
            if r.name.startswith("quota_broker_client") and r.levelno >= logging.ERROR]


def acquire(client):
    return client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=0)


@pytest.mark.parametrize("url, says", [
    ("127.0.0.1:5oo51", "the port '5oo51' is not a number"),
    ("127.0.0.1:70000", "the port '70000' is not a number"),
    ("http://127.0.0.1:5oo51", "the port '5oo51' is not a number"),
    ("127.0.0.1:50051:1", "more than one ':'"),
    ("broker host:50051", "characters a host name cannot have"),
    (":50051", "no host"),
    ("[::1:50051", "no ']'"),
    ("ftp://127.0.0.1:50051", "unsupported scheme"),
    # gRPC dials host:port only: a path would be dropped without a word.
    ("http://127.0.0.1:50051/foo", "a gRPC broker url has no path"),
    ("https://broker.example:443/quota", "a gRPC broker url has no path"),
    ("http://127.0.0.1:50051?tenant=demo", "a gRPC broker url has no path"),
])
def test_a_url_that_does_not_parse_is_an_error_when_the_client_is_built(url, says):
    with pytest.raises(qb.BadUrl) as info:
        qb.QuotaBroker(url)
    assert says in str(info.value)
    assert url in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_long_url_is_shown_clipped():
    for url in ("http://" + "h" * 5000 + " :50051", "ftp://" + "x" * 5000,
                "http://127.0.0.1:50051/" + "p" * 5000, "127.0.0.1:" + "9" * 5000):
        with pytest.raises(qb.BadUrl) as info:
            qb.QuotaBroker(url)
        said = str(info.value)
        assert len(said) < 500, said
        assert f"… ({len(url)} characters)" in said, said


@pytest.mark.parametrize("url, port", [("127.0.0.1", 443), ("http://127.0.0.1", 80),
                                       ("localhost", 443)])
def test_a_url_without_a_port_says_the_port_dialled_and_the_brokers(url, port, caplog):
    """A url without a port is dialled on the scheme's (gRPC's 443 for a
    bare host), where no broker listens: the fallback's warning says so."""
    with socket.socket() as s:
        s.settimeout(1)
        assert s.connect_ex(("127.0.0.1", port)) != 0, (
            f"this test needs nothing listening on 127.0.0.1:{port}, and something does: stop it")
    with qb.QuotaBroker(url, timeout=3) as client:
        assert acquire(client).is_fallback
    warned = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and "unreachable" in r.getMessage()]
    assert len(warned) == 1, warned
    assert f"the url gives no port, so {url!r} was dialled on port {port}" in warned[0], warned
    assert "a broker's gRPC port is 50051" in warned[0], warned
    # A url with its port: no such words.
    caplog.clear()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        with qb.QuotaBroker(f"http://127.0.0.1:{s.getsockname()[1]}", timeout=3) as client:
            assert acquire(client).is_fallback
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and not any("no port" in w for w in warned), warned


def test_url_forms_that_parse_are_taken():
    for url in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051", "::1", "http://[::1]:50051",
                "https://broker.example:443", "http://127.0.0.1:50051/", "unix:/run/qb.sock"):
        qb.QuotaBroker(url, fallback=None).close()


def test_a_brokers_http_port_is_an_error_not_an_outage(start_broker, caplog):
    http_port = free_port()
    broker = start_broker(config_text=WITH_HTTP_PORT % http_port)
    assert any(f"http=127.0.0.1:{http_port}" in line for line in broker.lines), broker.log()
    with qb.QuotaBroker(f"127.0.0.1:{http_port}", timeout=5) as client:
        for _ in range(2):
            with pytest.raises(qb.NotABroker) as info:
                acquire(client)
            assert f"127.0.0.1:{http_port} is not a quota-broker's gRPC port" in str(info.value)
            assert "server.listen" in str(info.value)
        assert not client.in_fallback
        with pytest.raises(qb.NotABroker):
            client.report(TENANT, "GET", USERS, 200)
        assert client.pending_reports == 0
    # Said once, loudly, for the address.
    assert len(errors_logged(caplog)) == 1, [r.getMessage() for r in caplog.records]
    # The right port, for contrast.
    with broker.client() as client:
        assert not acquire(client).is_fallback


def test_https_to_a_broker_without_tls_is_an_error_not_an_outage(start_broker, caplog):
    # The broker's plaintext port resets a TLS handshake, which alone reads
    # as a broker going down; asked in plaintext it answers in HTTP/2.
    broker = start_broker()
    with qb.QuotaBroker(f"https://{broker.addr}", timeout=5) as client:
        for _ in range(2):
            with pytest.raises(qb.NotABroker) as info:
                acquire(client)
            assert "answers in plaintext HTTP/2, not TLS" in str(info.value)
            assert "use http://" in str(info.value)
        assert not client.in_fallback
    assert len(errors_logged(caplog)) == 1, [r.getMessage() for r in caplog.records]


def test_an_http1_server_is_an_error_not_an_outage(caplog):
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        addr = f"127.0.0.1:{server.server_address[1]}"
        with qb.QuotaBroker(addr, timeout=5) as client:
            with pytest.raises(qb.NotABroker) as info:
                acquire(client)
            assert "HTTP/1 server" in str(info.value)
            assert not client.in_fallback
        with qb.QuotaBroker(addr, timeout=5, fallback=None) as client:
            with pytest.raises(qb.NotABroker):
                acquire(client)
    finally:
        server.shutdown()
        server.server_close()


def test_another_grpc_service_is_an_error_not_an_outage(caplog):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with qb.QuotaBroker(f"127.0.0.1:{port}", timeout=5) as client:
            with pytest.raises(qb.NotABroker) as info:
                acquire(client)
            assert info.value.code == grpc.StatusCode.UNIMPLEMENTED
            assert "another gRPC service" in str(info.value)
            assert not client.in_fallback
            with pytest.raises(qb.NotABroker):
                client.report(TENANT, "GET", USERS, 200)
    finally:
        server.stop(0)
    assert len(errors_logged(caplog)) == 1, [r.getMessage() for r in caplog.records]


def test_a_mistaken_url_among_brokers_is_said_once_and_the_others_serve(start_broker, caplog):
    http_port = free_port()
    broker = start_broker(config_text=WITH_HTTP_PORT % http_port)
    with qb.QuotaBroker([f"127.0.0.1:{http_port}", broker.addr], timeout=5) as client:
        for _ in range(3):
            lease = acquire(client)
            assert not lease.is_fallback and lease.target == broker.addr
    logged = errors_logged(caplog)
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    assert f"127.0.0.1:{http_port}" in logged[0].getMessage()


def test_a_mistaken_url_first_and_the_broker_down_is_an_outage(caplog):
    """A mistaken address first in the list and the broker behind the other
    down: an outage (the fallback) on every call, not NotABroker (the hops
    through the list used to end at the mistaken address)."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
            down = f"127.0.0.1:{s.getsockname()[1]}"
            wrong = f"127.0.0.1:{server.server_address[1]}"
            fallback = qb.FallbackSettings(floor_per_min=6000)
            with qb.QuotaBroker([wrong, down], timeout=3, fallback=fallback) as client:
                for _ in range(4):
                    try:
                        assert acquire(client).is_fallback
                    except qb.NotGranted as e:
                        assert "unreachable" in str(e), e
                assert client.in_fallback
    finally:
        server.shutdown()
        server.server_close()


def test_a_proxys_404_is_an_outage_not_another_service():
    """gRPC reads a proxy's HTTP 404 (an ingress with no broker behind it
    while one restarts) as UNIMPLEMENTED: an outage, not NotABroker."""
    from quota_broker_client import errors

    class Err(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNIMPLEMENTED

        def details(self):
            return "Received http2 header with status: 404"

    assert errors.not_a_broker(grpc.StatusCode.UNIMPLEMENTED, Err().details()) is None
    assert isinstance(errors.from_rpc_error(Err(), "127.0.0.1:1"), errors.Unavailable)


class Http2NotFound:
    """A plaintext HTTP/2 server answering every request 404 without a gRPC
    status (another service, the upstream itself, a proxy with no broker
    behind it): the few frames of HTTP/2 it takes, by hand."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests = 0
        self.conns = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @staticmethod
    def _frame(kind, flags, stream, payload=b""):
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        def read(n):
            data = b""
            while len(data) < n:
                chunk = conn.recv(n - len(data))
                if not chunk:
                    raise OSError("closed")
                data += chunk
            return data

        try:
            read(24)  # the client's connection preface
            conn.sendall(self._frame(4, 0, 0))  # our SETTINGS (none)
            while True:
                head = read(9)
                length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
                stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = read(length)
                if kind == 4 and not flags & 1:  # SETTINGS: acknowledged
                    conn.sendall(self._frame(4, 1, 0))
                elif kind == 6 and not flags & 1:  # PING: answered
                    conn.sendall(self._frame(6, 1, 0, payload))
                elif kind == 1:  # HEADERS of a request: ":status: 404" (HPACK static 13), end
                    self.requests += 1
                    conn.sendall(self._frame(1, 0x4 | 0x1, stream, b"\x8d"))
        except OSError:
            pass

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            c.close()
        self.thread.join(5)


def test_an_http2_server_answering_404_falls_back_with_a_hint(caplog):
    """The trial: a url reaching another HTTP/2 server (the upstream instead
    of the broker) got "unreachable (UNIMPLEMENTED: Received http2 header
    with status: 404)" and ran on the fallback for good, with no word on
    the url. It still falls back (a proxy's 404 while its broker restarts
    looks the same), and the one warning asks about the port."""
    server = Http2NotFound()
    try:
        with qb.QuotaBroker(server.addr, timeout=5) as client:
            assert acquire(client).is_fallback and client.in_fallback
        assert server.requests >= 1
    finally:
        server.close()
    warned = [r.getMessage() for r in caplog.records
              if r.name == "quota_broker_client" and r.levelno >= logging.WARNING]
    assert len(warned) == 1, warned
    assert "status: 404" in warned[0], warned
    assert ("is this the broker's gRPC port? an HTTP/2 server there answered 404: another service"
            in warned[0]), warned
    assert not errors_logged(caplog)


def test_a_broker_that_refuses_connections_is_still_an_outage(caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        with qb.QuotaBroker(f"127.0.0.1:{s.getsockname()[1]}", timeout=3) as client:
            assert acquire(client).is_fallback and client.in_fallback
    assert not errors_logged(caplog)


def test_a_broker_still_starting_is_an_outage_not_a_mistake(start_broker, tmp_path, caplog):
    """A broker still starting answers its calls UNAVAILABLE "starting": the
    fallback, not NotABroker; once it has started the client is back on it.
    The start is held: the state directory's admin.toml is a named pipe,
    which gives nothing until the test writes to it."""
    state = tmp_path / "held-start"
    state.mkdir()
    pipe = state / "admin.toml"
    os.mkfifo(pipe)
    broker = start_broker(state_dir=str(state), started=False)
    with broker.client(fallback=qb.FallbackSettings(probe_every_s=0.1)) as client:
        assert acquire(client).is_fallback
        with open(pipe, "w") as f:  # the start goes on
            f.write("version = 1\n")
        deadline = time.monotonic() + 20
        while True:
            try:
                if not acquire(client).is_fallback:
                    break
            except qb.NotGranted as e:
                # The broker's refusal (a start on a state directory begins
                # with an empty bucket), not the fallback's.
                if "fallback" not in str(e):
                    break
            assert time.monotonic() < deadline, "the client stayed on the fallback"
            time.sleep(0.02)  # paces the polling; the loop ends on what the broker does
    assert any("broker started" in line for line in broker.lines), broker.log()
    assert not errors_logged(caplog)


class _Calls(grpc.GenericRpcHandler):
    """Serves no method (UNIMPLEMENTED, as another gRPC service) and records which were called."""

    def __init__(self):
        self._seen = collections.defaultdict(threading.Event)
        self._counts = collections.Counter()
        self._lock = threading.Lock()

    def _event(self, method):
        with self._lock:
            return self._seen[method]

    def service(self, handler_call_details):
        with self._lock:
            self._counts[handler_call_details.method] += 1
        self._event(handler_call_details.method).set()
        return None

    def wait(self, method, timeout):
        return self._event(method).wait(timeout)

    def count(self, method):
        with self._lock:
            return self._counts[method]


def test_kept_release_and_report_that_meet_another_service_are_sent_once_the_broker_is_back(
        start_broker, tmp_path):
    """A deploy: the broker crashes with a slot lease held, then its address
    answers for a while as another gRPC service (a load balancer misrouting),
    then as the broker again. The release and the report kept during the
    outage meet the other service first: kept, not dropped as a broker's
    refusal, they free the slot and count at the broker once it is back."""
    state = tmp_path / "state"
    first = start_broker(state_dir=str(state), single_ttl_ms=600_000)
    fallback = qb.FallbackSettings(probe_every_s=0.1)
    with qb.QuotaBroker(first.addr, timeout=5, fallback=fallback) as client:
        # Each pass of the client's sender over what it keeps wakes the wait below.
        senders = Calls().wrap(client, "_release_deferred").wrap(client, "flush_reports")
        lease = client.acquire(TENANT, "GET", SINGLE_PATH, client_id="holder", max_wait_ms=0)
        assert lease.holds_slot
        first.kill()
        assert lease.release() is False
        assert client.report(TENANT, "GET", USERS, 200, oauth_client="kept") is None
        assert (client.pending_releases, client.pending_reports) == (1, 1)

        calls = _Calls()
        other = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[calls])
        assert other.add_insecure_port(first.addr), f"{first.addr} not free again"
        other.start()
        try:
            for method in ("Release", "Report"):
                assert calls.wait(f"/quota.v1.QuotaBroker/{method}", 10), \
                    f"the kept {method} was not sent to the other service"
        finally:
            other.stop(0).wait()

        back = start_broker(state_dir=str(state), single_ttl_ms=600_000, port=first.port)
        assert senders.wait_idle(lambda: not (client.pending_releases or client.pending_reports), 10), \
            "kept release and report not sent 10 s after the broker was back"
        with back.client() as observer:
            # The slot is free (the lease's TTL is 10 minutes; the restarted
            # run counts it held until the kept release names its Acquire);
            # a few seconds' wait: the restarted rate bucket starts drained.
            observer.acquire(TENANT, "GET", SINGLE_PATH, client_id="second",
                             priority_class="critical", max_wait_ms=5_000).release()
            assert bucket(observer, "per-client", "kept").reports_total == 1


def test_an_address_misrouted_for_a_while_is_tried_again_then_serves(start_broker, fake_clock, caplog):
    """A list of three: one address answers as another gRPC service for a
    while (a load balancer misrouting during a deploy), then as a broker.
    Meanwhile it is passed over, tried again every RECHECK_NOT_A_BROKER_S of
    the client's clock and said once; once it is a broker again, calls go
    there (here the only broker left up). Misrouted again later: said again."""
    caplog.set_level(logging.INFO, logger="quota_broker_client")
    calls = _Calls()
    other = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[calls])
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    misrouted = f"127.0.0.1:{port}"
    acquires = "/quota.v1.QuotaBroker/Acquire"
    serving = start_broker()
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
            down = f"127.0.0.1:{s.getsockname()[1]}"
            with qb.QuotaBroker([misrouted, serving.addr, down], timeout=5, fallback=None,
                                clock=fake_clock) as client:
                assert acquire(client).target == serving.addr
                assert calls.count(acquires) == 1
                serving.kill()
                with pytest.raises(qb.Unavailable):
                    acquire(client)
                assert calls.count(acquires) == 1, "passed over within the recheck interval"

                fake_clock.advance(qb.RECHECK_NOT_A_BROKER_S)
                with pytest.raises(qb.Unavailable):
                    acquire(client)
                assert calls.count(acquires) == 2, "not tried again after the recheck interval"
                with pytest.raises(qb.Unavailable):
                    acquire(client)
                assert calls.count(acquires) == 2, "tried again on every call"
                assert len(errors_logged(caplog)) == 1, [r.getMessage() for r in caplog.records]

                other.stop(0).wait()
                back = start_broker(port=port)
                with pytest.raises(qb.Unavailable):
                    acquire(client)  # the last try was less than the interval ago
                fake_clock.advance(qb.RECHECK_NOT_A_BROKER_S)
                lease = acquire(client)
                assert not lease.is_fallback and lease.target == misrouted == client.target
                assert acquire(client).target == misrouted
                assert any(misrouted in r.getMessage() and "again" in r.getMessage()
                           for r in caplog.records if r.levelno == logging.INFO)

                back.stop()
                again = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
                assert again.add_insecure_port(misrouted), f"{misrouted} not free again"
                again.start()
                try:
                    with pytest.raises(qb.Unavailable):
                        acquire(client)
                finally:
                    again.stop(0).wait()
    finally:
        other.stop(0)
    logged = errors_logged(caplog)
    assert len(logged) == 2, [r.getMessage() for r in caplog.records]
    assert all(misrouted in r.getMessage() for r in logged)
