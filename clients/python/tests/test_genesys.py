"""The Genesys Cloud SDK adapter, against the real PureCloudPlatformClientV2.

A tiny HTTP server on 127.0.0.1 plays the Genesys Cloud API (the SDK's
ApiClient takes its base URL as `host`); the broker is the real process.
"""
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import urllib3
import pytest

gc = pytest.importorskip("PureCloudPlatformClientV2")
from PureCloudPlatformClientV2.rest import ApiException  # noqa: E402

import quota_broker_client as qb  # noqa: E402
from quota_broker_client import genesys  # noqa: E402
from conftest import ANALYTICS_QUERY, SINGLE_PATH, TENANT  # noqa: E402

OAUTH_CLIENT = "my-oauth-client"


class FakeGenesys:
    """Answers each request with the next scripted (status, headers, body)."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fake.requests.append((self.command, self.path, dict(self.headers), body))
                status, headers, payload = fake.script.pop(0) if fake.script else (500, {}, {})
                data = json.dumps(payload).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def fake_api():
    servers = []

    def make(script):
        s = FakeGenesys(script)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def api_client_for(url):
    client = gc.api_client.ApiClient(host=url)
    client.access_token = "test-access-token"
    return client


def query_body():
    body = gc.ConversationQuery()
    body.interval = "2026-01-01T00:00:00Z/2026-01-02T00:00:00Z"
    return body


def bucket(broker, name, oauth_client=""):
    b = broker.bucket(TENANT, name, oauth_client)
    assert b is not None, f"no bucket {name!r}: {[x.bucket for x in broker.list_buckets(TENANT)]}"
    return b


THROTTLED = (429, {"Retry-After": "1"}, {"message": "Rate limit exceeded", "status": 429})
OK = (200, {"inin-ratelimit-allowed": "300", "inin-ratelimit-count": "2", "inin-ratelimit-reset": "60"},
      {"totalHits": 0})


def test_sdk_calls_are_leased_and_reported_and_429_not_retried(broker, fake_api):
    api = fake_api([THROTTLED, OK])
    api_client = api_client_for(api.url)
    wrapper = genesys.instrument(api_client, broker, TENANT, client_id="ingest-1",
                                 oauth_client=OAUTH_CLIENT, priority_class="critical",
                                 max_wait_ms=10_000)
    assert api_client.get_http_client() is wrapper
    assert genesys.instrument(api_client, broker, TENANT, client_id="ingest-1") is wrapper
    # urllib3 retries are off in the SDK's pool manager.
    assert wrapper.retries_disabled
    assert wrapper.inner.rest_client.pool_manager.connection_pool_kw["retries"] is genesys.NO_RETRIES
    conversations = gc.ConversationsApi(api_client)

    # 1. The upstream says 429: the SDK raises at once (no silent retry), the broker saw it.
    with pytest.raises(ApiException) as info:
        conversations.post_analytics_conversations_details_query(query_body())
    assert info.value.status == 429
    assert len(api.requests) == 1, "the SDK retried the 429 by itself"
    method, path, headers, _ = api.requests[0]
    assert (method, path) == ("POST", ANALYTICS_QUERY)
    assert headers.get("Authorization") == "Bearer test-access-token"
    aq = bucket(broker, "analytics-query")
    assert aq.throttled_total == 1
    assert aq.reports_total == 1
    assert aq.in_flight == 0  # lease released after the failed call
    assert aq.granted_total == 1

    # 2. The next call waits in the broker until the freeze is over and the
    # bucket (restarting paced, from empty) has a permit, then goes through.
    # "critical": no higher class's reserve is held back from it.
    result = conversations.post_analytics_conversations_details_query(query_body())
    assert result.total_hits == 0
    assert len(api.requests) == 2
    aq = bucket(broker, "analytics-query")
    assert aq.reports_total == 2
    assert aq.throttled_total == 1
    assert aq.granted_total == 2
    assert aq.in_flight == 0
    per_client = bucket(broker, "per-client", OAUTH_CLIENT)
    assert per_client.reports_total == 2
    assert per_client.granted_total == 2


def test_without_adapter_the_sdk_retries_429_silently(fake_api):
    # Control for the test above: the SDK's default urllib3 Retry sleeps out
    # Retry-After and resends, so the caller (and a broker) never sees the 429.
    api = fake_api([THROTTLED, OK])
    result = gc.ConversationsApi(api_client_for(api.url)).post_analytics_conversations_details_query(query_body())
    assert result.total_hits == 0
    assert len(api.requests) == 2


def test_not_granted_stops_the_call_before_it_is_sent(broker, fake_api):
    api = fake_api([(200, {}, {})])
    api_client = api_client_for(api.url)
    genesys.instrument(api_client, broker, TENANT, client_id="relay", max_wait_ms=0)
    with broker.lease(TENANT, "GET", SINGLE_PATH, client_id="holder", max_wait_ms=0):
        with pytest.raises(qb.NotGranted) as info:
            api_client.call_api(SINGLE_PATH, "GET", header_params={}, auth_settings=["PureCloud OAuth"])
    assert info.value.retry_after_ms > 0
    assert api.requests == []
    # Slot free again: the same call goes out and is reported.
    api_client.call_api(SINGLE_PATH, "GET", header_params={}, auth_settings=["PureCloud OAuth"])
    assert len(api.requests) == 1
    assert bucket(broker, "single").reports_total == 1
    assert bucket(broker, "single").in_flight == 0


def test_non_api_paths_are_not_leased(broker, fake_api):
    api = fake_api([(200, {}, {"access_token": "t"})])
    api_client = api_client_for(api.url)
    wrapper = genesys.instrument(api_client, broker, TENANT, client_id="c")
    from PureCloudPlatformClientV2.http_request_options import HttpRequestOptions

    wrapper.request(HttpRequestOptions(url=api.url + "/oauth/token", method="POST",
                                       headers={"Content-Type": "application/json"}, body={}))
    assert len(api.requests) == 1
    assert all(b.reports_total == 0 for b in broker.list_buckets(TENANT))


def test_fail_open_is_gone(broker, fake_api):
    api_client = api_client_for(fake_api([]).url)
    for value in (True, False):
        with pytest.raises(TypeError, match="fail_open was removed.*local fallback limiter"):
            genesys.instrument(api_client, broker, TENANT, client_id="c", fail_open=value)
        with pytest.raises(TypeError, match="fail_open was removed"):
            genesys.LeasedHttpClient(api_client.get_http_client(), broker, TENANT, client_id="c",
                                     fail_open=value)
    with pytest.raises(TypeError, match="unexpected keyword"):
        genesys.instrument(api_client, broker, TENANT, client_id="c", fail_closed=True)
    assert not isinstance(api_client.get_http_client(), genesys.LeasedHttpClient)


def test_broker_killed_sdk_calls_are_paced_and_reported_when_it_is_back(start_broker, fake_api,
                                                                        fake_clock, caplog):
    """The user's report: broker stopped, a worker that retries each 429 at once.

    Before: every call raised (no upstream calls for the whole outage), or,
    with fail_open, thousands of unleased calls. Now: the local fallback
    limiter paces the loop and the outcomes reach the broker when it is back.
    """
    caplog.set_level(logging.INFO, logger="quota_broker_client")
    proc = start_broker()
    api = fake_api([OK, OK] + [THROTTLED] * 50)
    broker = qb.QuotaBroker(proc.addr, clock=fake_clock)
    try:
        api_client = api_client_for(api.url)
        genesys.instrument(api_client, broker, TENANT, client_id="ingest-1", oauth_client=OAUTH_CLIENT,
                           priority_class="critical")
        conversations = gc.ConversationsApi(api_client)
        for _ in range(2):
            assert conversations.post_analytics_conversations_details_query(query_body()).total_hits == 0
        assert bucket(broker, "analytics-query").granted_total == 2

        proc.kill()
        start, sent_before, times = fake_clock.now, len(api.requests), []
        while fake_clock.now < start + 60:  # a minute of "retry the 429 at once"
            assert len(times) < 100, "the retry loop is not paced"
            with pytest.raises(ApiException) as info:
                conversations.post_analytics_conversations_details_query(query_body())
            assert info.value.status == 429
            times.append(fake_clock.now)  # when the call went out (the fake clock moves only in waits)
        assert len(api.requests) - sent_before == len(times)
        # 0.5 x 2 granted in the last minute is below the floor: 6/min, one call every 10 s,
        # the first at once: 0, 10, ... 50 s in the first minute (then 60 s, which ends the loop).
        assert broker.fallback_rate_per_min == 6
        assert times == [start + 10 * k for k in range(7)]
        assert broker.pending_reports == 7
        warnings = [r for r in caplog.records
                    if r.name.startswith("quota_broker_client") and r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage(), \
            [r.getMessage() for r in warnings]

        start_broker(port=proc.port)
        grpc.channel_ready_future(broker.channel).result(timeout=10)
        assert broker.flush_reports() == 7
        assert not broker.in_fallback
        aq = bucket(broker, "analytics-query")
        assert (aq.reports_total, aq.throttled_total) == (7, 7)
        assert bucket(broker, "per-client", OAUTH_CLIENT).reports_total == 7
    finally:
        broker.close()


@pytest.mark.parametrize("via", ["gateway", "host"])
def test_calls_behind_a_gateway_or_host_path_are_leased_on_the_api_path(broker, fake_api, via, caplog):
    # The SDK puts the gateway's path_params_api (or the host's path) before /api/v2/...;
    # the broker routes on /api/v2/..., so the adapter strips that prefix.
    caplog.set_level(logging.WARNING, logger="quota_broker_client")
    api = fake_api([OK])
    if via == "gateway":
        api_client = api_client_for("https://api.mypurecloud.example")
        port = api.server.server_address[1]
        api_client.set_gateway("127.0.0.1", "http", port, "genesys-login", "genesys")
    else:
        api_client = api_client_for(api.url + "/genesys")
    genesys.instrument(api_client, broker, TENANT, client_id="ingest-1", oauth_client=OAUTH_CLIENT)
    result = gc.ConversationsApi(api_client).post_analytics_conversations_details_query(query_body())
    assert result.total_hits == 0
    assert [(m, p) for m, p, _, _ in api.requests] == [("POST", "/genesys" + ANALYTICS_QUERY)]
    aq = bucket(broker, "analytics-query")
    assert (aq.granted_total, aq.reports_total, aq.in_flight) == (1, 1, 0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_unleased_non_api_request_warns_once(broker, fake_api, caplog):
    caplog.set_level(logging.WARNING, logger="quota_broker_client")
    api = fake_api([(200, {}, {})] * 3)
    wrapper = genesys.instrument(api_client_for(api.url), broker, TENANT, client_id="c")
    from PureCloudPlatformClientV2.http_request_options import HttpRequestOptions

    for path in ("/oauth/token", "/elsewhere/api/v2/x", "/elsewhere/api/v2/y"):
        wrapper.request(HttpRequestOptions(url=api.url + path, method="GET"))
    assert len(api.requests) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "/elsewhere/api/v2/x goes out unleased" in warnings[0], warnings
    assert all(b.reports_total == 0 for b in broker.list_buckets(TENANT))


class SilentServer:
    """Accepts connections and reads requests, never answers (a hung upstream)."""

    def __init__(self):
        import socket
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns = []
        self.accepted = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.accepted.set()

    def close(self):
        import socket
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            c.close()
        self.thread.join(5)


def test_a_hung_upstream_times_out_and_releases_the_slot(broker):
    # RESTClientObject never gives urllib3 a timeout: without the adapter's, this call
    # (and its renewed slot in the one-slot bucket) would hang for ever.
    server = SilentServer()
    try:
        api_client = api_client_for(server.url)
        wrapper = genesys.instrument(api_client, broker, TENANT, client_id="c", max_wait_ms=0)
        api_client.get_http_client().set_timeout(500)  # milliseconds, as the SDK's default 16000
        outcome = []

        def call():
            try:
                api_client.call_api(SINGLE_PATH, "GET", header_params={}, auth_settings=["PureCloud OAuth"])
                outcome.append("answered")
            except Exception as e:
                outcome.append(e)

        t = threading.Thread(target=call, daemon=True)
        t.start()
        assert server.accepted.wait(10)
        assert bucket(broker, "single").in_flight == 1
        t.join(10)
        assert not t.is_alive(), "the SDK call to a hung upstream did not time out"
        assert isinstance(outcome[0], urllib3.exceptions.HTTPError), outcome
        assert bucket(broker, "single").in_flight == 0
        with broker.lease(TENANT, "GET", SINGLE_PATH, client_id="next", max_wait_ms=0):
            pass
        assert wrapper.timeout == 500 and wrapper.timeout_applied
        assert genesys.instrument(api_client_for(server.url), broker, TENANT,
                                  client_id="c").timeout == genesys.DEFAULT_TIMEOUT_MS
    finally:
        server.close()


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_set_timeout_is_milliseconds_and_a_timeout_raises_max_retry_error(broker, method, caplog):
    """The trial: `set_timeout(30)` (seconds meant; the plain SDK ignores
    it) became a 30 ms read timeout after `instrument`, and a POST raised a
    bare ReadTimeoutError where the README said MaxRetryError. The unit is
    the SDK's (its default, 16000, is milliseconds); a value that reads
    like seconds is warned about; every method raises MaxRetryError."""
    caplog.set_level(logging.WARNING, logger="quota_broker_client")
    server = SilentServer()
    try:
        api_client = api_client_for(server.url)
        wrapper = genesys.instrument(api_client, broker, TENANT, client_id="c", max_wait_ms=0)
        pool_kw = wrapper.inner.rest_client.pool_manager.connection_pool_kw
        assert pool_kw["timeout"].total == genesys.DEFAULT_TIMEOUT_MS / 1000
        assert not caplog.records
        api_client.get_http_client().set_timeout(30)
        assert pool_kw["timeout"].total == 0.03  # as given: milliseconds
        (warning,) = [r.getMessage() for r in caplog.records]
        assert "set_timeout(30): the SDK's timeout is in milliseconds" in warning, warning
        assert "for 30 seconds pass set_timeout(30000)" in warning, warning
        with pytest.raises(urllib3.exceptions.MaxRetryError) as info:
            if method == "POST":  # the trial's call
                gc.ConversationsApi(api_client).post_analytics_conversations_details_query(query_body())
            else:
                api_client.call_api(SINGLE_PATH, "GET", header_params={}, auth_settings=["PureCloud OAuth"])
        assert isinstance(info.value.reason, urllib3.exceptions.ReadTimeoutError), info.value.reason
        assert server.accepted.is_set()
        assert all(b.in_flight == 0 for b in broker.list_buckets(TENANT))  # the lease was released

        # 0: no timeout (said in the README), not warned about; a negative one refused.
        caplog.clear()
        api_client.get_http_client().set_timeout(0)
        assert pool_kw["timeout"].total is None and pool_kw["timeout"].read_timeout is None
        assert wrapper.timeout == 0 and not caplog.records
        with pytest.raises(ValueError, match="milliseconds, >= 0"):
            api_client.get_http_client().set_timeout(-1)
        api_client.get_http_client().set_timeout(30_000)
        assert pool_kw["timeout"].total == 30 and not caplog.records
    finally:
        server.close()


def test_a_timeout_set_before_instrument_is_kept_and_checked(broker, fake_api, caplog):
    caplog.set_level(logging.WARNING, logger="quota_broker_client")
    for before, total in ((0, None), (45_000, 45)):
        api_client = api_client_for(fake_api([]).url)
        api_client.get_http_client().set_timeout(before)
        wrapper = genesys.instrument(api_client, broker, TENANT, client_id="c")
        assert wrapper.timeout == before
        assert wrapper.inner.rest_client.pool_manager.connection_pool_kw["timeout"].total == total
    assert not caplog.records
    api_client = api_client_for(fake_api([]).url)
    api_client.get_http_client().set_timeout(60)
    genesys.instrument(api_client, broker, TENANT, client_id="c")
    assert any("set_timeout(60)" in r.getMessage() for r in caplog.records), caplog.text


class HookFailed(Exception):
    pass


@pytest.mark.parametrize("when", ["before-instrument", "after-instrument"])
def test_a_raising_post_request_hook_does_not_lose_the_report(broker, fake_api, when):
    api = fake_api([OK, OK])
    api_client = api_client_for(api.url)
    seen = []

    def pre_hook(options):
        seen.append(("pre", options.url))
        return options

    def post_hook(response):
        seen.append(("post", response.status))
        raise HookFailed("the user's hook")

    if when == "before-instrument":
        api_client.get_http_client().set_pre_request_hook(pre_hook)
        api_client.get_http_client().set_post_request_hook(post_hook)
    genesys.instrument(api_client, broker, TENANT, client_id="ingest-1", oauth_client=OAUTH_CLIENT)
    if when == "after-instrument":
        api_client.get_http_client().set_pre_request_hook(pre_hook)
        api_client.get_http_client().set_post_request_hook(post_hook)
    conversations = gc.ConversationsApi(api_client)
    for n in (1, 2):
        with pytest.raises(HookFailed):
            conversations.post_analytics_conversations_details_query(query_body())
        assert len(api.requests) == n
        aq = bucket(broker, "analytics-query")
        assert (aq.granted_total, aq.reports_total, aq.in_flight) == (n, n, 0)
    assert seen == [("pre", api.url + ANALYTICS_QUERY), ("post", 200)] * 2


def test_instrument_twice_with_other_settings_warns_and_keeps_the_first(broker, fake_api, caplog):
    caplog.set_level(logging.WARNING, logger="quota_broker_client")
    api_client = api_client_for(fake_api([]).url)
    wrapper = genesys.instrument(api_client, broker, TENANT, client_id="ingest-1", priority_class="batch")
    assert genesys.instrument(api_client, broker, TENANT, client_id="ingest-1", priority_class="batch") is wrapper
    assert not caplog.records  # same settings: a silent no-op
    assert genesys.instrument(api_client, broker, TENANT, client_id="ingest-2", priority_class="batch",
                              max_wait_ms=0) is wrapper
    assert (wrapper.client_id, wrapper.max_wait_ms) == ("ingest-1", None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "already instrumented" in warnings[0], warnings
    assert "client_id, max_wait_ms" in warnings[0] and "priority_class" not in warnings[0]
