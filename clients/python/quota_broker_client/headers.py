"""Rate-limit response headers: which ones the broker wants, Retry-After parsing."""
import datetime
import email.utils
import time

_PREFIXES = ("inin-ratelimit-", "x-ratelimit-", "ratelimit")


def is_rate_limit_header(name):
    """True for Retry-After, inin-ratelimit-*, X-RateLimit-*, RateLimit and RateLimit-*."""
    n = name.strip().lower()
    return n == "retry-after" or n.startswith(_PREFIXES)


def _items(headers):
    if headers is None:
        return []
    if hasattr(headers, "items"):
        items = headers.items()
    else:
        items = headers  # an iterable of (name, value) pairs
    return [(str(k), str(v)) for k, v in items]


def rate_limit_headers(headers):
    """Picks the rate-limit headers out of a response's headers.

    ``headers`` may be a dict, an ``http.client.HTTPMessage``, a urllib3
    ``HTTPHeaderDict``, a requests ``CaseInsensitiveDict`` or a list of
    ``(name, value)`` pairs. Names are lower-cased (the broker treats them
    case-insensitively); repeated headers are joined with ", ".
    """
    out = {}
    for name, value in _items(headers):
        if not is_rate_limit_header(name):
            continue
        key = name.strip().lower()
        value = value.strip()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def retry_after_ms(headers, now=None):
    """Retry-After (delta seconds or HTTP-date) in ms from now; 0 if absent or garbage."""
    value = None
    for name, v in _items(headers):
        if name.strip().lower() == "retry-after":
            value = v.strip()
            break
    if not value:
        return 0
    try:
        seconds = float(value)
        if seconds != seconds or seconds < 0:  # NaN or negative
            return 0
        return int(round(seconds * 1000))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return 0
    if when is None:
        return 0
    if when.tzinfo is None:  # "-0000" parses naive; HTTP-dates are UTC
        when = when.replace(tzinfo=datetime.timezone.utc)
    now = time.time() if now is None else now
    return max(0, int(round((when.timestamp() - now) * 1000)))
