"""Rate-limit response headers: which ones the broker wants, Retry-After parsing."""
import datetime
import email.utils
import re
import time

_PREFIXES = ("inin-ratelimit-", "x-ratelimit-", "ratelimit")


def is_rate_limit_header(name):
    """True for Retry-After, inin-ratelimit-*, X-RateLimit-*, RateLimit and RateLimit-*."""
    n = name.strip().lower()
    return n == "retry-after" or n.startswith(_PREFIXES)


def _text(what, x):
    """A header name or value as text: bytes (as raw HTTP/1 headers, e.g.
    ``http.client``'s or a socket's) are decoded as latin-1, numbers taken
    as written (``{"Retry-After": 2}``); anything else is a TypeError."""
    if isinstance(x, str):
        return x
    if isinstance(x, (bytes, bytearray)):
        return bytes(x).decode("latin-1")
    if what == "value" and isinstance(x, (int, float)) and not isinstance(x, bool):
        return str(x)
    raise TypeError(f"header {what}s must be str or bytes, got {type(x).__name__}")


def _items(headers):
    if headers is None:
        return []
    if hasattr(headers, "items"):
        items = headers.items()
    elif isinstance(headers, (str, bytes, bytearray)) or not hasattr(headers, "__iter__"):
        raise TypeError("headers must be a mapping or a list of (name, value) pairs, "
                        f"got {type(headers).__name__}")
    else:
        items = headers  # an iterable of (name, value) pairs
    out = []
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise TypeError("headers must be a mapping or a list of (name, value) pairs, "
                            f"got an item of type {type(item).__name__}")
        out.append((_text("name", item[0]), _text("value", item[1])))
    return out


def rate_limit_headers(headers):
    """Picks the rate-limit headers out of a response's headers.

    ``headers`` may be a dict, an ``http.client.HTTPMessage``, a urllib3
    ``HTTPHeaderDict``, a requests ``CaseInsensitiveDict`` or a list of
    ``(name, value)`` pairs. Names and values are ``str``, or ``bytes``
    (decoded as latin-1, as HTTP/1 headers are); other types are a
    TypeError. Names are lower-cased (the broker treats them
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


# Longest Retry-After passed on (a year, the broker's own cap on freezes
# is far shorter).
_MAX_RETRY_AFTER_S = 365 * 24 * 3600


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
        # "inf", "1e400", "1e20": far beyond any real wait (and beyond what
        # int() or the uint64 field can take); the broker caps it anyway.
        return int(round(min(seconds, _MAX_RETRY_AFTER_S) * 1000))
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


# Resets above this many seconds are Unix times, not deltas (as the broker reads them).
_EPOCH_THRESHOLD = 1_000_000_000
# Per header form: its reset header, and the headers that describe the
# window that reset ends (a limit is not time-bound and is kept).
_WINDOW_FORMS = (
    ("inin-ratelimit-reset", ("inin-ratelimit-count",)),
    ("x-ratelimit-reset", ("x-ratelimit-remaining",)),
    ("ratelimit-reset", ("ratelimit-remaining",)),
)
_STRUCTURED_RESET = re.compile(r'(?i)(^|[,;])(\s*)(t|reset)(\s*=\s*)"?(\d*\.?\d+)"?')


def _seconds(s):
    """Seconds as the broker parses them (``15``, ``0.25``)."""
    return f"{max(s, 0.0):.3f}".rstrip("0").rstrip(".") or "0"


def _reset_left(value, elapsed_s, wall_now):
    """(seconds left now, is_delta) of a reset value read ``elapsed_s`` ago; None if garbage."""
    try:
        v = float(value.strip())
    except ValueError:
        return None
    if v != v or v < 0:
        return None
    if v > _EPOCH_THRESHOLD:
        return v - wall_now, False
    return v - elapsed_s, True


def aged_rate_limit_headers(headers, retry_after_ms, elapsed_s, now=None):
    """The rate-limit headers of an answer received ``elapsed_s`` ago, as of now.

    For outcomes reported late (kept while the broker was unreachable): a
    Report carries no time of its own, and the broker reads Retry-After and
    resets as counted from the moment it gets the report. So Retry-After
    becomes what is left of it (``0`` when it has passed: no freeze any
    more), delta resets what is left of them, and a window that has reset
    since loses its used/remaining count (its limit is kept). ``headers`` is
    what :func:`rate_limit_headers` returns; ``retry_after_ms`` the
    conversion made when the answer came. Returns ``(headers, retry_after_ms)``.
    """
    out = dict(headers)
    elapsed_s = max(float(elapsed_s), 0.0)
    wall_now = time.time() if now is None else now
    if retry_after_ms > 0:
        retry_after_ms = max(0, int(retry_after_ms - elapsed_s * 1000))
        out["retry-after"] = _seconds(retry_after_ms / 1000.0)
    for reset_name, counts in _WINDOW_FORMS:
        if reset_name not in out:
            continue
        left = _reset_left(out[reset_name], elapsed_s, wall_now)
        if left is None:
            continue  # garbage: the broker skips it too
        left, is_delta = left
        if left <= 0:
            for name in (reset_name, *counts):
                out.pop(name, None)
        elif is_delta:
            out[reset_name] = _seconds(left)
    structured = out.get("ratelimit")
    if structured is not None:
        expired = False

        def age(m):
            nonlocal expired
            left, is_delta = _reset_left(m.group(5), elapsed_s, wall_now)
            expired |= left <= 0
            value = _seconds(left) if is_delta else m.group(5)
            return f"{m.group(1)}{m.group(2)}{m.group(3)}{m.group(4)}{value}"

        aged = _STRUCTURED_RESET.sub(age, structured)
        if expired:
            del out["ratelimit"]  # describes a window that is over
        else:
            out["ratelimit"] = aged
    return out, retry_after_ms
