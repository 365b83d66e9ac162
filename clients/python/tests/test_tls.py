"""The client over TLS and mutual TLS, against a real broker with certificates made at test time.

``Pki`` (conftest.py) issues a CA, a server certificate for 127.0.0.1 and
localhost, and a client certificate, with ``cryptography``; the broker
reads them from ``[server.tls]``.
"""
import hashlib
import time

import pytest

import quota_broker_client as qb
from conftest import SINGLE_PATH, TENANT, Calls, Pki, non_loopback_ipv4, watch_bucket

USERS = "/api/v2/users/me"  # matches only the per-client bucket


def token_auth(token, name="python-tests"):
    digest = hashlib.sha256(token.encode()).hexdigest()
    return f"""
[[auth.tokens]]
name = "{name}"
sha256 = "{digest}"
role = "client"
tenants = ["demo"]
"""


def round_trip(client, client_id="tls"):
    """Acquire (a slot), report, release; returns the lease."""
    before = client.bucket(TENANT, "single")
    with client.lease(TENANT, "GET", SINGLE_PATH, client_id=client_id, max_wait_ms=0) as lease:
        assert not lease.is_fallback and lease.lease_id
        assert client.bucket(TENANT, "single").in_flight == 1
        resp = lease.report(200, {"inin-ratelimit-allowed": "300"})
        assert resp is not None and "single" in resp.buckets
    assert lease.released
    after = client.bucket(TENANT, "single")
    assert after.in_flight == 0
    assert after.reports_total == before.reports_total + 1
    return lease


def assert_refused(client):
    """The handshake fails: Unavailable without a fallback (never a hang)."""
    started = time.monotonic()
    with pytest.raises(qb.Unavailable):
        client.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=0)
    assert time.monotonic() - started < 8


def test_tls_round_trip(start_broker, pki):
    proc = start_broker(tls=pki.server_tls())
    assert proc.url.startswith("https://")
    # The CA as a file path, as PEM bytes, as a PEM str; https:// or tls=True.
    for url, ca in ((proc.url, str(pki.path("ca.pem"))),
                    (proc.url, pki.path("ca.pem")),
                    (proc.url, pki.ca_pem),
                    (proc.addr, pki.ca_pem.decode())):
        with qb.QuotaBroker(url, ca_cert=ca, tls=True, timeout=10) as client:
            assert client.tls
            round_trip(client)
    with qb.QuotaBroker(proc.url, ca_cert=pki.ca_pem, tls_server_name="localhost") as client:
        round_trip(client)  # the certificate also names localhost
    with qb.QuotaBroker(proc.url, ca_cert=pki.ca_pem) as client:
        with client.watch(TENANT, timeout=10) as stream:
            assert next(stream).tenant == TENANT


def assert_tls_refused(client, says):
    """The handshake cannot succeed: TlsError saying what to do, also with the fallback on."""
    started = time.monotonic()
    with pytest.raises(qb.TlsError, match=says):
        client.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=0)
    assert time.monotonic() - started < 8
    assert not client.in_fallback


def test_a_client_that_does_not_trust_the_broker_fails(start_broker, pki, tmp_path):
    proc = start_broker(tls=pki.server_tls())
    other = Pki(tmp_path / "other", name="another CA")
    # The system roots, another CA, a name the certificate does not have:
    # an error saying what to do, not the fallback rate.
    for kw, says in ((dict(), "give the CA that did as ca_cert"),
                     (dict(ca_cert=other.ca_pem), "give the CA that did as ca_cert"),
                     (dict(ca_cert=pki.ca_pem, tls_server_name="wrong.example"), "tls_server_name")):
        with qb.QuotaBroker(proc.url, timeout=5, **kw) as client:
            assert_tls_refused(client, says)
    # Plaintext to the TLS port: a closed connection, as from a broker going down.
    with qb.QuotaBroker(proc.addr, fallback=None, timeout=5) as plaintext:
        assert_refused(plaintext)
    # None of it cost the broker anything.
    with proc.client(ca_cert=pki.ca_pem) as client:
        round_trip(client)


def test_mutual_tls(start_broker, pki, tmp_path):
    proc = start_broker(tls=pki.server_tls(mutual=True))
    # Files and bytes.
    with proc.client(ca_cert=pki.path("ca.pem"), client_cert=pki.path("client.pem"),
                     client_key=pki.path("client.key")) as client:
        round_trip(client)
    with proc.client(ca_cert=pki.ca_pem, client_cert=pki.client_pem, client_key=pki.client_key_pem) as client:
        round_trip(client)

    # No certificate, or one from a CA the broker does not know: refused,
    # an error naming the client certificate, not the fallback rate.
    with proc.client(ca_cert=pki.ca_pem) as client:
        assert_tls_refused(client, "client_cert")
    stranger = Pki(tmp_path / "stranger", name="a CA the broker does not know")
    with proc.client(ca_cert=pki.ca_pem, client_cert=stranger.client_pem,
                     client_key=stranger.client_key_pem) as client:
        assert_tls_refused(client, "client_cert")

    with proc.client(ca_cert=pki.ca_pem, client_cert=pki.client_pem, client_key=pki.client_key_pem) as client:
        round_trip(client)


def test_token_over_tls(start_broker, pki):
    token = "s3cret-over-tls"
    proc = start_broker(tls=pki.server_tls(), auth=token_auth(token))
    with proc.client(token=token, ca_cert=pki.ca_pem) as client:
        round_trip(client)
    with proc.client(token="wrong", ca_cert=pki.ca_pem) as client:
        with pytest.raises(qb.Unauthenticated):
            client.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=0)
    with proc.client(ca_cert=pki.ca_pem) as client:
        with pytest.raises(qb.Unauthenticated):
            client.list_buckets(TENANT)


def test_token_over_tls_from_another_host(start_broker, tmp_path):
    """A token from a non-loopback peer is accepted over TLS (over plaintext it would be refused)."""
    ip = non_loopback_ipv4()
    if ip is None:
        pytest.skip("no non-loopback IPv4 address on this host")
    pki = Pki(tmp_path / "pki", server_ips=[ip])
    token = "s3cret-off-loopback"
    proc = start_broker(tls=pki.server_tls(), auth=token_auth(token), listen_host=ip, host=ip)
    assert proc.url == f"https://{ip}:{proc.port}"
    with proc.client(token=token, ca_cert=pki.ca_pem) as client:
        round_trip(client)
    with proc.client(token="wrong", ca_cert=pki.ca_pem) as client:
        with pytest.raises(qb.Unauthenticated):
            client.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=0)


def test_fallback_and_return_over_tls(start_broker, pki):
    proc = start_broker(tls=pki.server_tls(mutual=True))
    tls = dict(ca_cert=pki.ca_pem, client_cert=pki.client_pem, client_key=pki.client_key_pem)
    client = proc.client(fallback=qb.FallbackSettings(floor_per_min=600), **tls)
    try:
        held = client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=1000)
        assert not held.is_fallback
        proc.kill()
        assert held.report(200, {}) is None  # kept
        with client.lease(TENANT, "GET", USERS, client_id="c", max_wait_ms=5000) as lease:
            assert lease.is_fallback
            assert lease.report(429, {"Retry-After": "0.2"}) is None
        assert client.in_fallback and client.pending_reports == 2

        start_broker(port=proc.port, tls=pki.server_tls(mutual=True))
        back_at = time.monotonic()
        for _ in range(1000):
            try:
                lease = client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=2000)
            except qb.NotGranted:
                # The broker's own answer (the kept 429 may have reached it first).
                break
            lease.release()
            if not lease.is_fallback:
                break
            assert time.monotonic() - back_at < 10, "still falling back 10 s after the broker came back"
        assert not client.in_fallback
        assert time.monotonic() - back_at < 5, "not back to the TLS broker within 5 s"
        # The client's report thread sends them: seen on the broker's Watch stream.
        reported, b = watch_bucket(client, "per-client",
                                   lambda b: not client.pending_reports and b.reports_total >= 2, 5)
        assert reported, (f"kept outcomes not reported within 5 s: pending {client.pending_reports}, "
                          f"reports {b and b.reports_total}")
        assert client.bucket(TENANT, "per-client").throttled_total == 1
    finally:
        client.close()


def test_tls_settings_are_checked_when_the_client_is_built(pki, tmp_path):
    url = "https://127.0.0.1:1"
    with pytest.raises(qb.TlsError, match="/nonexistent/ca.pem"):
        qb.QuotaBroker(url, ca_cert="/nonexistent/ca.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(qb.TlsError, match="no PEM certificate"):
        qb.QuotaBroker(url, ca_cert=junk)
    with pytest.raises(qb.TlsError, match="no PEM private key"):
        qb.QuotaBroker(url, client_cert=pki.client_pem, client_key=junk)
    with pytest.raises(qb.TlsError, match="go together"):
        qb.QuotaBroker(url, client_cert=pki.client_pem)
    # A key that is not the certificate's, as files and as bytes.
    with pytest.raises(qb.TlsError, match="does not fit"):
        qb.QuotaBroker(url, client_cert=pki.path("client.pem"), client_key=pki.path("server.key"))
    with pytest.raises(qb.TlsError, match="does not fit"):
        qb.QuotaBroker(url, client_cert=pki.client_pem, client_key=pki.server_key_pem)
    assert isinstance(qb.TlsError("x"), ValueError) and isinstance(qb.TlsError("x"), qb.QuotaBrokerError)

    # TLS settings must not be silently ignored.
    with pytest.raises(ValueError, match="https://"):
        qb.QuotaBroker("http://127.0.0.1:1", ca_cert=pki.ca_pem)
    with pytest.raises(ValueError, match="https://"):
        qb.QuotaBroker("http://127.0.0.1:1", tls=True)
    with pytest.raises(ValueError, match="tls=False"):
        qb.QuotaBroker(url, tls=False)
    with pytest.raises(ValueError, match="tls=False"):
        qb.QuotaBroker("127.0.0.1:1", tls=False, ca_cert=pki.ca_pem)
    with pytest.raises(ValueError, match="not both"):
        qb.QuotaBroker(url, credentials=object(), ca_cert=pki.ca_pem)

    # Plaintext stays plaintext; TLS material or tls=True with host:port means TLS.
    for target, kw, expect in (("127.0.0.1:1", {}, False), ("http://127.0.0.1:1", {}, False),
                               ("127.0.0.1:1", dict(tls=True), True),
                               ("127.0.0.1:1", dict(ca_cert=pki.ca_pem), True),
                               ("https://127.0.0.1:1", {}, True)):
        with qb.QuotaBroker(target, **kw) as client:
            assert client.tls is expect, (target, kw)


def test_a_fallback_probe_that_meets_a_certificate_it_does_not_trust_ends_the_fallback(
        start_broker, pki, tmp_path):
    # Falling back from a broker that went away, which comes back with a
    # certificate from a CA the client does not trust (rotated): the probe's
    # handshake ends the fallback and calls raise TlsError, instead of
    # running on the fallback rate for good.
    proc = start_broker(tls=pki.server_tls())
    client = proc.client(ca_cert=pki.ca_pem,
                         fallback=qb.FallbackSettings(floor_per_min=600, probe_every_s=0.1))
    client.acquire(TENANT, "GET", USERS, client_id="c", max_wait_ms=0).release()
    proc.kill()
    assert client.acquire(TENANT, "GET", USERS, client_id="c").is_fallback
    other = Pki(tmp_path / "rotated", name="another CA")
    start_broker(tls=other.server_tls(), port=proc.port)
    deadline = time.monotonic() + 10
    with pytest.raises(qb.TlsError, match="ca_cert"):
        while True:
            # Each fallback lease is paced (10 a second): no busy loop.
            assert client.acquire(TENANT, "GET", USERS, client_id="c").is_fallback
            assert time.monotonic() < deadline, "still on the fallback rate 10 s after it came back"
    client.close()


def test_kept_releases_and_reports_stay_kept_while_the_handshake_fails(start_broker, pki, tmp_path, caplog):
    # Kept while the broker was away, which comes back with a certificate
    # from a CA the client does not trust: each background pass meets
    # TlsError, and nothing kept is lost to it.
    proc = start_broker(tls=pki.server_tls(), single_ttl_ms=60_000)
    client = proc.client(ca_cert=pki.ca_pem, fallback=qb.FallbackSettings(probe_every_s=0.1))
    try:
        lease = client.acquire(TENANT, "GET", SINGLE_PATH, client_id="c", max_wait_ms=0)
        proc.kill()
        assert lease.release() is False
        assert client.report(TENANT, "GET", USERS, 200, {}) is None
        assert (client.pending_releases, client.pending_reports) == (1, 1)
        # Each pass of the client's sender over what it keeps wakes the wait
        # below; a release or outcome taken out for its call is back when a
        # pass ends.
        senders = Calls().wrap(client, "_release_deferred").wrap(client, "flush_reports")
        sent = []
        for name in ("Release", "Report"):
            real = getattr(client.stub, name)

            def counted(*a, _real=real, _name=name, **kw):
                with senders.cond:
                    sent.append(_name)
                return _real(*a, **kw)
            setattr(client.stub, name, counted)
        other = Pki(tmp_path / "rotated", name="another CA")
        start_broker(tls=other.server_tls(), port=proc.port)
        assert senders.wait_idle(lambda: len(sent) >= 4, 10), f"not sent twice within 10 s: {sent}"
        assert (client.pending_releases, client.pending_reports) == (1, 1), sent
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    finally:
        client.close()
