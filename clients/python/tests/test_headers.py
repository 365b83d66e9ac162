"""Header filtering and Retry-After parsing (no broker)."""
import email.utils

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


def test_retry_after_ms():
    assert qb.retry_after_ms({"Retry-After": "15"}) == 15_000
    assert qb.retry_after_ms({"retry-after": "0.5"}) == 500
    assert qb.retry_after_ms({"Retry-After": "soon"}) == 0
    assert qb.retry_after_ms({"Retry-After": "-3"}) == 0
    assert qb.retry_after_ms({}) == 0
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert qb.retry_after_ms({"Retry-After": date}, now=now) == 30_000
    assert qb.retry_after_ms({"Retry-After": email.utils.formatdate(now - 30, usegmt=True)}, now=now) == 0
