"""Header filtering and Retry-After parsing (no broker)."""
import email.utils

import pytest

import quota_broker_client as qb


def test_rate_limit_headers_filters_and_lowercases():
    got = qb.rate_limit_headers({
        "Retry-After": "15",
        "inin-ratelimit-allowed": "300",
        "ININ-RATELIMIT-COUNT": "12",
        "X-RateLimit-Remaining": "4",
        "RateLimit": "limit=10, remaining=3, reset=5",
        "RateLimit-Policy": "10;w=60",
        "Content-Type": "application/json",
        "inin-correlation-id": "abc",
    })
    assert got == {
        "retry-after": "15",
        "inin-ratelimit-allowed": "300",
        "inin-ratelimit-count": "12",
        "x-ratelimit-remaining": "4",
        "ratelimit": "limit=10, remaining=3, reset=5",
        "ratelimit-policy": "10;w=60",
    }


def test_rate_limit_headers_accepts_pairs_and_none():
    assert qb.rate_limit_headers(None) == {}
    assert qb.rate_limit_headers([("RateLimit-Policy", "a"), ("ratelimit-policy", "b")]) == {
        "ratelimit-policy": "a, b"
    }


def test_bytes_headers_are_decoded_and_other_types_refused():
    # Raw HTTP/1 headers come as bytes: taken as latin-1, not dropped silently.
    assert qb.rate_limit_headers({b"Retry-After": b"2"}) == {"retry-after": "2"}
    assert qb.rate_limit_headers([(b"X-RateLimit-Remaining", b"4"), ("Content-Type", b"x")]) == {
        "x-ratelimit-remaining": "4"}
    assert qb.rate_limit_headers({"Retry-After": 2}) == {"retry-after": "2"}  # a number as written
    assert qb.rate_limit_headers({"RateLimit": "r=\xe9".encode("latin-1")}) == {"ratelimit": "r=\xe9"}
    assert qb.retry_after_ms({b"Retry-After": b"2"}) == 2_000
    for wrong, says in [({1: "2"}, "header names must be str or bytes, got int"),
                        ({"Retry-After": None}, "header values must be str or bytes, got NoneType"),
                        ("Retry-After: 2", "headers must be a mapping or a list of"),
                        (b"Retry-After: 2", "headers must be a mapping or a list of"),
                        (["Retry-After"], "headers must be a mapping or a list of"),
                        (42, "headers must be a mapping or a list of")]:
        with pytest.raises(TypeError, match=says):
            qb.rate_limit_headers(wrong)


def test_retry_after_ms():
    assert qb.retry_after_ms({"Retry-After": "15"}) == 15_000
    assert qb.retry_after_ms({"retry-after": "0.5"}) == 500
    assert qb.retry_after_ms({"Retry-After": "soon"}) == 0
    assert qb.retry_after_ms({"Retry-After": "-3"}) == 0
    assert qb.retry_after_ms({}) == 0
    # Beyond any real wait (and beyond int() or a uint64): capped, not a crash.
    year_ms = 365 * 24 * 3600 * 1000
    for huge in ("inf", "Infinity", "1e400", "1e20"):
        assert qb.retry_after_ms({"Retry-After": huge}) == year_ms, huge
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert qb.retry_after_ms({"Retry-After": date}, now=now) == 30_000
    assert qb.retry_after_ms({"Retry-After": email.utils.formatdate(now - 30, usegmt=True)}, now=now) == 0


def test_aged_headers_count_from_when_the_answer_came():
    from quota_broker_client.headers import aged_rate_limit_headers

    now = 1_700_000_000.0
    genesys = {"retry-after": "15", "inin-ratelimit-allowed": "300", "inin-ratelimit-count": "300",
               "inin-ratelimit-reset": "15"}
    # 5 s later: 10 s of freeze and window left.
    got, ms = aged_rate_limit_headers(genesys, 15_000, 5.0, now=now)
    assert ms == 10_000
    assert got == {"retry-after": "10", "inin-ratelimit-allowed": "300", "inin-ratelimit-count": "300",
                   "inin-ratelimit-reset": "10"}
    # A minute later: the freeze is over (0, not "absent": no default freeze), the
    # window has reset so its count says nothing any more; the limit still holds.
    got, ms = aged_rate_limit_headers(genesys, 15_000, 60.0, now=now)
    assert ms == 0
    assert got == {"retry-after": "0", "inin-ratelimit-allowed": "300"}
    # A converted Retry-After with no header of its own still gets one.
    assert aged_rate_limit_headers({}, 2_500, 1.25, now=now) == ({"retry-after": "1.25"}, 1_250)
    # Epoch resets are absolute: kept while in the future, dropped (with the count) once past.
    x = {"x-ratelimit-limit": "60", "x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(now + 30))}
    assert aged_rate_limit_headers(x, 0, 10.0, now=now) == (x, 0)
    assert aged_rate_limit_headers(x, 0, 10.0, now=now + 31) == ({"x-ratelimit-limit": "60"}, 0)
    # Structured RateLimit: the reset parameter is aged, the header dropped once it passed.
    ietf = {"ratelimit": "limit=10, remaining=0, reset=30", "ratelimit-policy": "10;w=60",
            "ratelimit-reset": "garbage"}
    got, _ = aged_rate_limit_headers(ietf, 0, 12.5, now=now)
    assert got == {"ratelimit": "limit=10, remaining=0, reset=17.5", "ratelimit-policy": "10;w=60",
                   "ratelimit-reset": "garbage"}
    got, _ = aged_rate_limit_headers({"ratelimit": '"default";r=0;t=30'}, 0, 40.0, now=now)
    assert got == {}
    # Nothing time-bound: unchanged.
    assert aged_rate_limit_headers({"ratelimit-policy": "10;w=60"}, 0, 99.0, now=now) == (
        {"ratelimit-policy": "10;w=60"}, 0)
