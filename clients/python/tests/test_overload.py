"""Overloaded (RESOURCE_EXHAUSTED with retry-after-ms) against a real broker.

The broker's ``[overload] max_requests_per_sec`` is 1 here, so the
``tiny`` token gets one RPC a second; the ``observer`` token has its own
1000 a second to look at the buckets without being limited.
"""
import hashlib
import threading

import grpc
import pytest

import quota_broker_client as qb
from conftest import SINGLE_PATH, TENANT, watch_bucket

TINY, OBSERVER = "tiny-token", "observer-token"
OVERLOAD = "[overload]\nmax_requests_per_sec = 1\n"


def tokens():
    def one(name, token, extra=""):
        digest = hashlib.sha256(token.encode()).hexdigest()
        return f'[[auth.tokens]]\nname = "{name}"\nsha256 = "{digest}"\nrole = "client"\ntenants = ["demo"]\n{extra}'
    return one("tiny", TINY) + one("observer", OBSERVER, "max_requests_per_sec = 1000\n")


@pytest.fixture
def overload_proc(start_broker):
    # A long slot TTL: a slot that comes back within the test was released, not expired.
    return start_broker(auth=tokens(), extra=OVERLOAD, single_ttl_ms=60_000)


def overloaded(call, attempts=5):
    """Calls ``call`` until it raises Overloaded (the first of a second's calls passes); returns it."""
    for _ in range(attempts):
        try:
            call()
        except qb.Overloaded as e:
            return e
    pytest.fail(f"no Overloaded in {attempts} calls at 1 request a second")


def test_overloaded_acquire_is_raised_with_retry_after_not_a_fallback(overload_proc):
    with overload_proc.client(token=TINY) as client:
        err = overloaded(lambda: client.acquire(TENANT, "GET", SINGLE_PATH, client_id="c",
                                                max_wait_ms=0).release())
        assert isinstance(err, qb.BrokerRpcError) and isinstance(err, qb.QuotaBrokerError)
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 0 < err.retry_after_ms <= 1000, err.retry_after_ms
        assert "retry in" in err.details
        assert not client.in_fallback  # an answer, not an outage
        # The raw calls raise it too.
        err = overloaded(lambda: client.list_buckets(TENANT))
        assert 0 < err.retry_after_ms <= 1000
    with overload_proc.client(token=TINY, fallback=None) as client:
        err = overloaded(lambda: client.acquire_raw(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=0))
        assert 0 < err.retry_after_ms <= 1000


def test_a_refused_report_is_sent_after_retry_after_and_a_release_is_not_refused(overload_proc):
    observer = overload_proc.client(token=OBSERVER)
    client = overload_proc.client(token=TINY)
    attempts = {"Report": 0, "Release": 0}
    for name in attempts:
        real = getattr(client.stub, name)

        def counted(*a, _real=real, _name=name, **kw):
            attempts[_name] += 1
            return _real(*a, **kw)
        setattr(client.stub, name, counted)
    try:
        # The acquire takes this second's request; what follows at once is refused.
        lease = client.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=0)
        assert lease.report(200, {"inin-ratelimit-allowed": "300"}) is None, \
            "the report went through: over a second between two calls?"
        assert client.pending_reports == 1 and not client.in_fallback
        # A release is never refused for the token's rate: it frees the slot.
        assert lease.release() is True
        assert client.pending_releases == 0
        assert observer.bucket(TENANT, "single").in_flight == 0
        reports_before = observer.bucket(TENANT, "single").reports_total

        # The background sender waits the broker's retry-after-ms, then sends
        # the report: seen on the broker's Watch stream.
        sent, b = watch_bucket(observer, "single", lambda b: b.reports_total > reports_before, 5)
        assert sent, (
            f"not sent within 5 s: in_flight={b and b.in_flight}, reports={b and b.reports_total}, "
            f"pending={client.pending_reports}/{client.pending_releases}, attempts={attempts}")
        assert b.reports_total == reports_before + 1, (b.reports_total, reports_before, attempts)
        assert client.pending_reports == 0 and client.pending_releases == 0
        # Paced by retry-after-ms, not retried in a loop: at 1 request a second
        # a busy sender would have tried hundreds of times.
        assert attempts["Report"] <= 4 and attempts["Release"] == 1, attempts
    finally:
        client.close()
        observer.close()


def test_the_renewer_waits_retry_after_between_overloaded_renewals(start_broker):
    # A slot TTL of 200 ms: the first renewal, 100 ms after the Acquire took
    # this second's request, is refused for about 900 ms. The next one goes
    # after that, not every 100 ms meanwhile (the lease is gone by then).
    proc = start_broker(auth=tokens(), extra=OVERLOAD, single_ttl_ms=200)
    with proc.client(token=TINY) as client:
        answers = []
        answered = threading.Condition()
        real = client.stub.Renew

        def answer(code):
            with answered:
                answers.append(code)
                answered.notify_all()

        def renew(*a, **kw):
            try:
                resp = real(*a, **kw)
            except grpc.RpcError as e:
                answer(e.code())
                raise
            answer(grpc.StatusCode.OK)
            return resp

        client.stub.Renew = renew
        with client.lease(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=0) as lease:
            with answered:  # woken by each answer the renewer gets
                past = answered.wait_for(
                    lambda: any(code != grpc.StatusCode.RESOURCE_EXHAUSTED for code in answers), 10)
                assert past, f"no renewal past the overload in 10 s: {answers}"
            lease._renewer.stop()
        refused = answers.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert 1 <= refused <= 2, answers


def test_without_fallback_a_report_raises_overloaded(overload_proc):
    with overload_proc.client(token=TINY, fallback=None) as client:
        err = overloaded(lambda: client.report(TENANT, "GET", SINGLE_PATH, 200, {}))
        assert err.retry_after_ms is not None
        # Release is not limited by a token's rate: the broker reads it.
        with pytest.raises(qb.InvalidArgument, match="no-such-lease"):
            client.release("no-such-lease")


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code, trailing=(), initial=(),
                 details="overloaded: token tiny over 1 requests/s; retry in 250 ms"):
        self._code, self._trailing, self._initial = code, trailing, initial
        self._details = details

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing

    def initial_metadata(self):
        return self._initial


def test_retry_after_ms_is_read_from_metadata_only():
    from quota_broker_client.errors import from_rpc_error

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    err = from_rpc_error(_FakeRpcError(code, trailing=(("retry-after-ms", "250"),)))
    assert isinstance(err, qb.Overloaded) and err.retry_after_ms == 250
    err = from_rpc_error(_FakeRpcError(code, initial=(("Retry-After-Ms", b"40"),)))
    assert err.retry_after_ms == 40
    # None without the metadata (the message is not parsed), or with junk in it.
    assert from_rpc_error(_FakeRpcError(code)).retry_after_ms is None
    assert from_rpc_error(_FakeRpcError(code, trailing=(("retry-after-ms", "soon"),))).retry_after_ms is None
    assert type(from_rpc_error(_FakeRpcError(grpc.StatusCode.UNAVAILABLE))) is qb.Unavailable


def test_a_deadline_the_broker_saw_pass_first_is_the_deadline():
    from quota_broker_client.errors import from_rpc_error

    # tonic's answer to the gRPC timeout a call carries, which races with
    # the client's own DEADLINE_EXCEEDED.
    err = from_rpc_error(_FakeRpcError(grpc.StatusCode.CANCELLED, details="Timeout expired"))
    assert isinstance(err, qb.DeadlineExceeded)
    other = from_rpc_error(_FakeRpcError(grpc.StatusCode.CANCELLED, details="client went away"))
    assert not isinstance(other, qb.DeadlineExceeded)
