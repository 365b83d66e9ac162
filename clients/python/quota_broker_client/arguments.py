"""Checks of what callers pass to QuotaBroker, before anything is sent:
text and whole-number arguments, response headers, an Acquire's timeout
against its wait, and the bearer token (BadToken). A mistake is a
TypeError, ValueError or ConfigError naming the argument.
"""
from . import errors
from .timeouts import _CALL_TIMEOUT_S


_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1


def _check_str(name, value):
    """A text argument, or a TypeError naming it (not protobuf's own, which names nothing)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def _check_count(name, value, most):
    """A whole-number argument from 0 to ``most``, or a TypeError/ValueError naming it
    (a str such as "100" is not taken for a number)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= most:
        raise ValueError(f"{name} must be from 0 to {most}, got {value}")
    return value


def _check_headers(headers):
    """None, a mapping, or (name, value) pairs, or a TypeError saying what was given."""
    if headers is None or hasattr(headers, "items"):
        return headers
    if isinstance(headers, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in headers):
        return headers
    raise TypeError("headers must be a mapping or a list of (name, value) pairs, "
                    f"got {type(headers).__name__}")


def _check_acquire_timeout(timeout, max_wait_ms):
    """An Acquire's ``timeout`` (seconds, None: the wait plus the client's
    timeout), or a TypeError/ValueError naming the mistake: a deadline not
    above the wait ends the call while the broker may still hold it for
    that wait (a bare DEADLINE_EXCEEDED, never the broker's answer)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, got {type(timeout).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if max_wait_ms is not None and timeout * 1000 <= max_wait_ms:
        raise ValueError(
            f"timeout={timeout:g} s is not above max_wait_ms={max_wait_ms} ({max_wait_ms / 1000:g} s): "
            "timeout is the call's whole deadline in seconds, the broker's wait included, so the "
            "call would end while the broker may still hold it; give a timeout above the wait "
            f"(e.g. {max_wait_ms / 1000 + _CALL_TIMEOUT_S:g}), or leave it None (the wait plus "
            "the client's timeout)")
    return timeout


#: Most characters of a token the client sends. No broker token is near
#: it; HTTP/2 servers and proxies refuse a header much longer (431, which
#: gRPC reports as UNKNOWN), so a longer one is a mistake (a file, a
#: certificate pasted instead).
MAX_TOKEN_CHARS = 4096


def _check_token(token):
    """The token as sent (surrounding whitespace stripped), or None; a
    mistake gRPC would only report at the first call (or never clearly) is
    BadToken, naming the parameter, never the token."""
    if token is None:
        return None
    if not isinstance(token, str):
        raise TypeError(f"token must be a str or None, got {type(token).__name__}")
    # A token read from a file keeps its trailing newline, which gRPC
    # refuses as metadata ("Invalid metadata"): the broker's hashes and
    # `quota-broker hash-token` strip it too.
    token = token.strip()
    if token[:7].lower() == "bearer ":
        raise errors.BadToken("token= starts with 'Bearer ': give the token alone; the client sends "
                              "'authorization: Bearer <token>' itself")
    for at, c in enumerate(token, 1):
        if not " " <= c <= "~":
            what = "a control character" if c < " " or c == "\x7f" else "a non-ASCII character"
            raise errors.BadToken(f"token= has {what} (character {at} of {len(token)}): gRPC metadata "
                                  "carries printable ASCII only; check what was read into it")
    if len(token) > MAX_TOKEN_CHARS:
        raise errors.BadToken(f"token= is {len(token)} characters long, more than the {MAX_TOKEN_CHARS} "
                              "a client sends (HTTP/2 servers refuse such a header with 431): is it "
                              "the broker token?")
    return token
