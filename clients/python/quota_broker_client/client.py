"""The quota-broker client: QuotaBroker, Lease, WatchStream."""
import atexit
import collections
import contextlib
import ipaddress
import logging
import math
import socket
import threading
import time
import uuid
import weakref
from urllib.parse import urlsplit

import grpc

from . import errors
from .errors import NotGranted, NotFound
from .fallback import SYSTEM_CLOCK, FallbackSettings, all_shared, route_key, shared as _shared_fallback
from .tls import channel_credentials
from .headers import aged_rate_limit_headers, rate_limit_headers, retry_after_ms as _retry_after_ms
from .quota.v1 import broker_pb2 as pb
from .quota.v1 import broker_pb2_grpc as pb_grpc

log = logging.getLogger("quota_broker_client")

# Client-side deadline of a unary call, on top of the server-side wait.
_CALL_TIMEOUT_S = 10.0
# Wait the broker caps every Acquire to by default (`server.max_wait_ms`).
_SERVER_MAX_WAIT_MS = 60_000
# Deadline of each Report sent by close() (the broker may be gone for good).
_CLOSE_FLUSH_TIMEOUT_S = 2.0
# While falling back, the broker is first asked for its health with this
# deadline (at most), so a broker that does not answer at all costs a probe
# this long, not an Acquire's wait plus the call timeout.
_PROBE_TIMEOUT_S = 2.0
#: A health answer of NOT_SERVING (HealthCheckResponse.status = 2), as
#: written on the wire.
_NOT_SERVING = b"\x08\x02"
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"

#: Channel options set unless given: gRPC's default reconnect backoff grows
#: to 120 s while the broker is down, so a client would come back to it up
#: to two minutes late. Reconnect attempts here are at most 2 s apart (the
#: min value is gRPC's minimum connect timeout, not a wait). And HTTP/2
#: pings every 2 s while calls are open, each given 3 s to be answered: a
#: broker whose host hangs (connections open, nothing answered) fails the
#: calls open on it within about 5 s, which then fall back or move to the
#: next broker, instead of waiting out an Acquire's whole deadline (up to
#: 70 s without a ``max_wait_ms``). As many pings as needed while a call
#: waits without data (gRPC stops after 2 by default), and every ping's
#: answer awaited 3 s (gRPC's own flow-control pings wait 60 s by default,
#: and while one is out no keepalive ping is sent).
DEFAULT_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 2000),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 3000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.ping_timeout_ms", 3000),
)

# The broker did not answer: these errors mean fall back, not fail.
_UNREACHABLE = (errors.Unavailable, errors.DeadlineExceeded)


# Clients not closed yet, for the one exit hook below (weak: an exit hook
# per client would keep one entry each for ever).
_LIVE = weakref.WeakSet()


@atexit.register
def _flush_all_at_exit():
    """At interpreter exit: each client not closed sends what it kept, all
    within one _CLOSE_FLUSH_TIMEOUT_S (in threads of their own: a broker
    slow to answer many kept outcomes holds the exit no longer), then says
    what was lost."""
    clients = [c for c in list(_LIVE) if not c._closed.is_set() and c._has_deferred()]
    if not clients:
        _warn_orphans_lost_at_exit()
        return
    deadline = time.monotonic() + _CLOSE_FLUSH_TIMEOUT_S
    threads = [threading.Thread(target=c._flush_at_exit, args=(deadline,), daemon=True,
                                name="quota-broker-exit") for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    for c in clients:
        c._warn_lost_at_exit()
    _warn_orphans_lost_at_exit()


def _warn_orphans_lost_at_exit():
    """Says what is kept in shared fallbacks that no open client can send
    any more (the last client of those brokers was closed with it)."""
    held = {id(c._fallback) for c in list(_LIVE) if not c._closed.is_set()}
    for fb in all_shared():
        if fb.pending and id(fb) not in held:
            log.warning("process exiting: %d outcomes kept for quota-broker at %s lost: the last "
                        "client of these brokers was closed while they could not be sent",
                        fb.pending, fb.target)


# HTTP/2's connection preface and an empty SETTINGS frame: what a gRPC client sends first.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"
# gRPC's words for a TLS handshake that met a closed connection or a non-TLS answer.
_HANDSHAKE_CUT = ("Handshake read failed", "WRONG_VERSION_NUMBER", "Socket closed",
                  "Connection reset")
# A url whose handshake failed so is asked what it speaks at most this often.
_ASK_EVERY_S = 30.0
#: How long an address of a list found not to be a quota-broker's gRPC port
#: (NotABroker) is passed over before calls try it again (a load balancer
#: that misrouted during a deploy, a broker still starting behind a proxy),
#: as the Rust client's ``RECHECK_NOT_A_BROKER``.
RECHECK_NOT_A_BROKER_S = 30.0


def _speaks_plaintext_http2(target, within=1.0):
    """Whether the server at ``target`` ("host:port") answers HTTP/2's preface
    in plaintext with a SETTINGS frame, as a broker without [server.tls]
    does (which resets a TLS handshake rather than answering it)."""
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=within) as s:
            s.settimeout(within)
            s.sendall(_H2_PREFACE)
            first = b""
            while len(first) < 9:
                chunk = s.recv(9 - len(first))
                if not chunk:
                    break
                first += chunk
    except (OSError, ValueError):
        return False
    return len(first) == 9 and first[3] == 4 and first[5:9] == b"\x00\x00\x00\x00"


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


def _may_have_reached_a_broker(err):
    """Whether a call that got no answer may have been read by a broker: its
    deadline passed, or the connection broke or went unanswered under it;
    not a connection that failed, nor a broker's own UNAVAILABLE (not the
    leader, shutting down: it carries the broker's request id)."""
    if isinstance(err, errors.DeadlineExceeded):
        return True
    details = (getattr(err, "details", "") or "").lower()
    if "failed to connect" in details or "connection refused" in details:
        return False
    call = getattr(err, "rpc_error", None)
    try:
        trailers = dict(call.trailing_metadata() or ()) if call is not None else {}
    except Exception:  # not a grpc.Call: nothing says the broker answered
        trailers = {}
    return "x-request-id" not in trailers


# After an Overloaded answer without retry-after-ms, the kept reports and
# releases wait this long (the broker's request rates are per second).
_OVERLOAD_BACKOFF_S = 1.0
# ...and never less than this between two tries of the background sender.
_MIN_OVERLOAD_BACKOFF_S = 0.05
# How long a call made while falling back waits for the probe it started.
_PROBE_WAIT_S = 0.25
# Most characters of a broker's reason a warning shows.
_SHOWN_REASON_CHARS = 300



def says_concurrency(body):
    """Whether a 429's body (bytes or text) says the refusal is about
    concurrent requests ("concurrent", "concurrency"), to report it with
    ``concurrency_limited=True``."""
    if body is None:
        return False
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", "replace")
    return "concurren" in str(body).lower()

#: gRPC target forms other than "host:port", passed to gRPC as they are.
_GRPC_TARGET_SCHEMES = ("unix:", "unix-abstract:", "vsock:", "ipv4:", "ipv6:", "dns:")


#: A broker's gRPC port unless its ``server.listen`` says another.
BROKER_DEFAULT_PORT = 50051
#: Most characters of a url (or a part of one) an error shows: it is what
#: was given, however long.
_SHOWN_CHARS = 100


def _shown(text):
    """``text`` as an error shows it (quoted): as is, or cut after
    _SHOWN_CHARS characters with its length."""
    text = str(text)
    if len(text) <= _SHOWN_CHARS:
        return repr(text)
    return f"{text[:_SHOWN_CHARS]!r}… ({len(text)} characters)"


def _check_host_port(hostport, url):
    """Raises BadUrl when ``hostport`` (of the broker url ``url``) can never
    be connected to: gRPC would fail every call on it, which reads as a
    broker that is down (the fallback, for good) instead of a mistake."""
    if hostport.startswith(_GRPC_TARGET_SCHEMES):
        return
    def bad(why):
        return errors.BadUrl(f"broker url {_shown(url)}: {why} (give host:port, http://host:port "
                             "or https://host:port; an IPv6 address in brackets, [::1]:50051)")
    if hostport.startswith("["):
        host, closed, rest = hostport[1:].partition("]")
        if not closed:
            raise bad("no ']' closes the IPv6 address")
        if rest and not rest.startswith(":"):
            raise bad(f"{_shown(rest)} after the IPv6 address")
        port = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{_shown(host)} in brackets is not an IPv6 address") from None
    elif hostport.count(":") > 1:
        try:
            ipaddress.IPv6Address(hostport)  # a bare IPv6 address (gRPC's default port)
            return
        except ValueError:
            raise bad("more than one ':'") from None
    else:
        host, colon, port = hostport.partition(":")
        port = port if colon else None
        if any(c.isspace() or c in "/?#@[]" for c in host):
            raise bad("the host has characters a host name cannot have (a space, '/', '?', '#', "
                      "'@', '[' or ']')")
    if not host:
        raise bad("no host")
    # (At most 5 digits before int(): Python refuses to convert thousands.)
    if port is not None and not (port.isascii() and port.isdigit() and len(port.lstrip("0")) <= 5
                                 and 1 <= int(port) <= 65535):
        raise bad(f"the port {_shown(port)} is not a number from 1 to 65535")


def _target(url):
    """Returns (target, tls) for "host:port" (tls None: not said), "http://..." (False), "https://..." (True).

    A url that can never be connected to is BadUrl (a ValueError)."""
    if "://" not in url:
        _check_host_port(url, url)
        return url, None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "grpc", "grpcs"):
        raise errors.BadUrl(f"unsupported scheme in broker url {_shown(url)} (use http:// or "
                            "https://)")
    if not parts.netloc:
        raise errors.BadUrl(f"no host in broker url {_shown(url)}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        # gRPC dials host:port and calls its own paths: a path here would be dropped.
        raise errors.BadUrl(f"broker url {_shown(url)}: a gRPC broker url has no path, query or "
                            f"fragment (got {_shown(url[len(parts.scheme) + 3 + len(parts.netloc):])}); "
                            "give http://host:port or https://host:port")
    secure = parts.scheme in ("https", "grpcs")
    netloc = parts.netloc
    try:
        port = parts.port
    except ValueError:  # urllib's words: "Port could not be cast...", "Port out of range..."
        port = netloc.rpartition(":")[2]
        raise errors.BadUrl(f"broker url {_shown(url)}: the port {_shown(port)} is not a number "
                            "from 1 to 65535") from None
    if port is None:
        # No port (or an empty one): the scheme's.
        netloc = f"{netloc.rstrip(':')}:{443 if secure else 80}"
    _check_host_port(netloc, url)
    return netloc, secure


def _implicit_port(url):
    """The port a broker url that gives none is dialled on (the scheme's, 80
    for http://, 443 for https://; gRPC's default, 443, for a bare host), or
    None when it gives one (or is another gRPC target form). For a url that
    parses (see _target)."""
    if "://" in url:
        parts = urlsplit(url)
        try:
            if parts.port is not None:
                return None
        except ValueError:
            return None
        return 443 if parts.scheme in ("https", "grpcs") else 80
    if url.startswith(_GRPC_TARGET_SCHEMES):
        return None
    if url.startswith("["):
        return None if "]:" in url else 443
    if url.count(":") > 1 or ":" not in url:  # a bare IPv6 address, or a bare host
        return 443
    return None


def _no_port_hint(urls):
    """What a fallback warning adds when a broker url gives no port: the
    port used and the broker's default ("" when every url gives one)."""
    portless = [(u, p) for u in urls for p in [_implicit_port(u)] if p is not None]
    if not portless:
        return ""
    used = ", ".join(f"{_shown(u)} was dialled on port {p}" for u, p in portless)
    return (f"; the url gives no port, so {used}: a broker's gRPC port is "
            f"{BROKER_DEFAULT_PORT} unless its server.listen says another: give the port in the url "
            f"(host:{BROKER_DEFAULT_PORT})")


#: Response metadata in which a broker of a cluster that does not lead the
#: call's tenant names the leader's URL (with an UNAVAILABLE status).
LEADER_METADATA_KEY = "x-quota-broker-leader"


def _split_urls(url):
    """The broker urls of ``url``: a str (several comma-separated) or a list/tuple of str."""
    if isinstance(url, (bytes, bytearray)):
        url = url.decode("utf-8")
    items = [url] if isinstance(url, str) else list(url)
    urls = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"broker url must be a str, got {type(item).__name__}")
        urls.extend(u.strip() for u in item.split(",") if u.strip())
    if not urls:
        raise ValueError(f"no broker url given in {_shown(url)}")
    return urls


def _leader_of(err):
    """The leader URL of an UNAVAILABLE answer's ``x-quota-broker-leader`` metadata, or None."""
    for getter in ("trailing_metadata", "initial_metadata"):
        fn = getattr(err, getter, None)
        if not callable(fn):
            continue
        try:
            md = fn() or ()
        except Exception:  # pragma: no cover - not every RpcError carries metadata
            continue
        for item in md:
            key, value = (item.key, item.value) if hasattr(item, "key") else item
            if str(key).lower() != LEADER_METADATA_KEY:
                continue
            if isinstance(value, (bytes, bytearray)):
                value = value.decode("ascii", "replace")
            value = str(value).strip()
            return value or None
    return None


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


def _tenant_of(request):
    """The tenant a request is for ("" when it names none)."""
    tenant = getattr(request, "tenant", "") or ""
    if not tenant and hasattr(request, "acquired_with"):
        tenant = request.acquired_with.tenant
    return tenant


def _no_answer(err):
    """Why a call got no answer, in a few words (for the fallback's warning)."""
    if isinstance(err, errors.DeadlineExceeded) or getattr(err, "code", None) == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer within the call's deadline"
    text = getattr(err, "details", "") or ""
    low = text.lower()
    if "connection refused" in low:
        return "connection refused"
    if "domain name not found" in low or "dns resolution failed" in low:
        return "its host name does not resolve"
    if "socket closed" in low or "connection reset" in low:
        return "the connection was closed without an answer"
    return f"{getattr(getattr(err, 'code', None), 'name', 'UNAVAILABLE')}: {text[:150]}"


def _answered(err):
    """Whether an UNAVAILABLE came from a broker (its request id or a leader
    named), not from a connection that failed or went unanswered."""
    if _leader_of(err) is not None:
        return True
    try:
        trailers = dict(err.trailing_metadata() or ())
    except Exception:  # not a grpc.Call: nothing says a broker answered
        return False
    return "x-request-id" in trailers


class _Trail:
    """The brokers one call tried, following the cluster: where it goes
    next (a leader that did not answer is not asked again on another's
    word, as quotactl does) and, when none answered, what happened."""

    def __init__(self, tenant):
        self.tenant = tenant
        # (target, leader URL named or None, the grpc.RpcError, answered by a broker)
        self.steps = []

    def add(self, target, err):
        self.steps.append((target, _leader_of(err), err, _answered(err)))

    def tried(self, target):
        return any(t == target for t, _, _, _ in self.steps)

    def given_up(self, target):
        """Whether ``target`` was tried and gave no answer (unreachable, no answer in time)."""
        return any(t == target and not answered for t, _, _, answered in self.steps)

    def last_configured(self, targets):
        """The last of ``targets`` this call tried, or None."""
        for t, _, _, _ in reversed(self.steps):
            if t in targets:
                return t
        return None

    def describe(self, leader_target):
        """What happened, when a broker sent the call to a leader (None
        otherwise: "unreachable" says it). ``leader_target`` maps a leader
        URL to its "host:port" (None when this client cannot reach it)."""
        if not any(leader for _, leader, _, _ in self.steps):
            return None
        said, i = [], 0
        tenant = f"tenant {self.tenant}'s" if self.tenant else "its"
        while i < len(self.steps):
            target, leader, err, answered = self.steps[i]
            i += 1
            if leader is None:
                said.append(f"{target} {self._outcome(err, answered)}")
                continue
            part = f"{target} sends {tenant} callers to {leader}"
            at = leader_target(leader)
            if i < len(self.steps) and at is not None and self.steps[i][0] == at:
                _, _, next_err, next_answered = self.steps[i]
                i += 1
                part += f", which {self._outcome(next_err, next_answered)}"
            elif at is not None and self.given_up(at):
                part += ", which did not answer either"
            said.append(part)
        return "; ".join(said)

    @staticmethod
    def _outcome(err, answered):
        details = err.details() if callable(getattr(err, "details", None)) else ""
        code = err.code() if callable(getattr(err, "code", None)) else None
        if errors.not_a_broker(code, details) is not None:
            return "is not a quota-broker's gRPC port"
        if not answered:
            return f"does not answer ({_no_answer(errors.from_rpc_error(err))})"
        return f"answers UNAVAILABLE ({(details or '')[:150]})"


class _Conn:
    """One broker address: its channel and stubs (cached per target by QuotaBroker)."""

    def __init__(self, target, channel):
        self.target = target
        self.channel = channel
        self.stub = pb_grpc.QuotaBrokerStub(channel)
        self.admin_stub = pb_grpc.QuotaAdminStub(channel)
        # grpc.health.v1 Check with an empty HealthCheckRequest (service ""), as raw bytes.
        self.health_check = channel.unary_unary(_HEALTH_CHECK)


class Lease:
    """A granted Acquire. Use ``report()`` after the upstream call, ``release()`` when done.

    Attributes mirror AcquireResponse (``lease_id``, ``permits``,
    ``lease_ttl_ms``, ``lease_expires_at_ms``, ``buckets``) plus the request's
    ``tenant``, ``method``, ``path``, ``oauth_client`` and ``client_id``.

    ``target``: the broker ("host:port") that granted it; with a cluster,
    the tenant's leader then (renewals and the release go to whichever
    broker leads the tenant when they are sent).

    ``is_fallback``: the broker was unreachable and the local fallback
    limiter gave the permission (no lease id, no slot; ``report()`` keeps
    the outcome for the broker, ``release()`` and ``renew()`` do nothing).

    A lease holding slots, and a fallback lease under the fallback's cap on
    calls at once, counts towards that cap until released (or garbage-collected).
    """

    def __init__(self, broker, response, *, tenant, method, path, oauth_client, client_id,
                 priority_class="", is_fallback=False, target=None, place=None):
        self._broker = broker
        self.is_fallback = is_fallback
        #: The broker ("host:port") that granted the lease (None for a fallback lease).
        self.target = target
        self.response = response
        self.lease_id = response.lease_id
        self.permits = response.permits
        self.lease_ttl_ms = response.lease_ttl_ms
        self.lease_expires_at_ms = response.lease_expires_at_ms
        self.buckets = list(response.buckets)
        self.tenant = tenant
        self.method = method
        self.path = path
        self.oauth_client = oauth_client
        self.client_id = client_id
        self.priority_class = priority_class
        self.released = False
        #: The last ReportResponse sent through this lease (None before).
        self.last_report = None
        self._renewer = None
        # Held from the check of ``released`` to its setting: a lease is released once.
        self._release_lock = threading.Lock()
        # Ends its place in the fallback's count (once: on release, or when collected).
        self._end_place = (weakref.finalize(self, broker._fallback.ended, place)
                           if place is not None else None)

    @property
    def holds_slot(self):
        """Whether the lease holds concurrency slots (which expire unless renewed)."""
        return self.lease_ttl_ms > 0

    def report(self, status, headers=None, *, retry_after_ms=None, concurrency_limited=False):
        """Reports the upstream's answer to this lease's call.

        ``headers`` are the raw response headers (any mapping or list of
        pairs); the rate-limit ones are picked out and Retry-After converted.
        ``concurrency_limited``: a 429 whose body says it is about concurrent
        requests (see ``says_concurrency``); the broker then lowers the
        learned concurrency limit instead of the rate.
        Returns the ReportResponse, or None when the outcome was kept for
        later: the broker is unreachable (reported when it is back) or
        overloaded for this caller (reported after its retry-after-ms).
        """
        self.last_report = self._broker.report(
            self.tenant,
            self.method,
            self.path,
            status,
            headers,
            oauth_client=self.oauth_client,
            lease_id=self.lease_id,
            retry_after_ms=retry_after_ms,
            concurrency_limited=concurrency_limited,
        )
        return self.last_report

    def renew(self, extend_ms=0):
        """Extends the lease's slots; 0 means the lease's default TTL. Returns RenewResponse.

        A fallback lease holds no slot: returns None.
        """
        if self.is_fallback:
            return None
        resp = self._broker.renew(self.lease_id, extend_ms, acquired_with=self._acquired_with())
        self.lease_ttl_ms = resp.lease_ttl_ms
        self.lease_expires_at_ms = resp.lease_expires_at_ms
        return resp

    def _acquired_with(self):
        """The Acquire that granted this lease: a restarted broker adopts the lease from it."""
        return pb.AcquireRequest(
            tenant=self.tenant,
            client_id=self.client_id,
            priority_class=self.priority_class,
            method=self.method,
            path=self.path,
            oauth_client=self.oauth_client,
            permits=self.permits,
        )

    def release(self):
        """Returns the slots (idempotent). True if this call returned slots.

        A lease that holds no slot (rate buckets only) has nothing to return:
        no call is made.

        With the broker unreachable (and a fallback) it returns False and the
        release is sent once a broker answers again (``pending_releases``). With the broker
        overloaded for this caller (and a fallback) it also returns False
        and the release is sent in the background after the broker's
        retry-after-ms.
        """
        with self._release_lock:
            if self.released:
                return False
            if self._end_place is not None:
                self._end_place()
            renewer = getattr(self, "_renewer", None)
            if renewer is not None:
                renewer.stop()  # a released lease is not renewed
            if self.is_fallback or not self.holds_slot:
                # Nothing to give back: no call (a lease of rate buckets only
                # was sent a release, then, told nothing was released, another).
                self.released = True
                return False
            try:
                # Without the Acquire first: sent with it, a release a broker
                # already processed (its answer lost, then sent again) could be
                # adopted and free a slot since granted to someone else. Only a
                # broker that answers it does not know the lease (restarted after
                # a crash, or leading since a failover) is told, to free it now.
                released = self._broker.release(self.lease_id)
                if not released:
                    released = self._broker.release(self.lease_id,
                                                    acquired_with=self._acquired_with())
            except errors.Closed:
                # The client is gone; the slot comes back by itself at its expiry.
                released = False
            except _UNREACHABLE as e:
                if self._broker._fallback is None:
                    raise
                # The broker is away (restarting, a cluster between leaders): sent
                # once a broker answers again, so one that took the lease over
                # frees its slot then rather than at its expiry.
                log.debug("releasing lease %s failed, kept for later: %s", self.lease_id, e)
                kept = pb.ReleaseRequest(lease_id=self.lease_id)
                if not _may_have_reached_a_broker(e):
                    # No broker read it (the connection failed): kept with the
                    # Acquire, so a broker that restarted after a crash and
                    # does not know the lease frees its slot when it is sent.
                    kept.acquired_with.CopyFrom(self._acquired_with())
                self._broker._keep_release(kept)
                self._broker._await_broker()
                released = False
            except errors.Overloaded as e:
                if self._broker._fallback is None:
                    raise
                # Over this caller's request rate: released in the background
                # once its retry-after-ms has passed (else the slot is held to expiry).
                self._broker._defer_release(pb.ReleaseRequest(lease_id=self.lease_id), e)
                released = False
            self.released = True
            return released

    def __repr__(self):
        if self.is_fallback:
            return f"Lease(fallback, tenant={self.tenant!r}, {self.method} {self.path})"
        return (
            f"Lease(id={self.lease_id!r}, tenant={self.tenant!r}, {self.method} {self.path}, "
            f"permits={self.permits}, ttl_ms={self.lease_ttl_ms}, buckets={self.buckets})"
        )


def _renewal_may_pass_later(err):
    """Whether a renewal refused with ``err`` may pass if tried again (the Rust
    client's rule): the broker unreachable, busy or failing, not a refusal of
    the caller, a request it cannot take, or a TLS handshake that cannot succeed."""
    if isinstance(err, (errors.Unavailable, errors.DeadlineExceeded, errors.Internal)):
        return True
    code = getattr(err, "code", None)
    return code in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED)


class _Renewer(threading.Thread):
    """Renews a lease's slots at half their remaining TTL until stopped."""

    def __init__(self, lease):
        super().__init__(name=f"quota-lease-renew-{lease.lease_id}", daemon=True)
        self.lease = lease
        self._halt = threading.Event()
        self.renewals = 0
        self._warned = False
        self._past_expiry = False

    def run(self):
        ttl_ms = self.lease.lease_ttl_ms
        wait_ms = ttl_ms / 2.0
        # When the slot expires unless a renewal gets through.
        expires = time.monotonic() + ttl_ms / 1000.0
        while ttl_ms > 0:
            if self._halt.wait(max(wait_ms, 50) / 1000.0):
                return
            try:
                resp = self.lease.renew(0)
                self.renewals += 1
                if self._past_expiry:
                    log.info("lease %s renewed again after its expiry: the broker kept or adopted it",
                             self.lease.lease_id)
                self._warned = self._past_expiry = False
                ttl_ms = resp.lease_ttl_ms
                wait_ms = ttl_ms / 2.0
                expires = time.monotonic() + ttl_ms / 1000.0
            except errors.Closed:
                return
            except (NotFound, errors.InvalidArgument, errors.PermissionDenied,
                    errors.Unauthenticated) as e:
                # No renewal can pass: the lease is gone, or this caller may not.
                log.warning("lease %s can no longer be renewed: %s", self.lease.lease_id, e)
                return
            except errors.Overloaded as e:
                # Over this caller's request rate: again once the broker says so
                # (sooner would be refused too); say so once.
                (log.debug if self._warned else log.warning)(
                    "renewing lease %s refused, broker overloaded: %s", self.lease.lease_id, e)
                self._warned = True
                retry_ms = e.retry_after_ms if e.retry_after_ms is not None else _OVERLOAD_BACKOFF_S * 1000
                wait_ms = max(retry_ms, _MIN_OVERLOAD_BACKOFF_S * 1000)
            except errors.QuotaBrokerError as e:
                if not _renewal_may_pass_later(e):
                    log.warning("lease %s can no longer be renewed: %s", self.lease.lease_id, e)
                    return
                broker = self.lease._broker
                # Transient: try again sooner. No broker answers: the outage
                # is the fallback's one warning (entered here if no call did
                # yet), each lease's failures debug lines; else say it once.
                outage = broker._fallback is not None and isinstance(e, _UNREACHABLE)
                if outage:
                    broker._enter_fallback(e)
                (log.debug if self._warned or outage else log.warning)(
                    "renewing lease %s failed: %s", self.lease.lease_id, e)
                self._warned = True
                # Again every eighth of the TTL (at least every 100 ms), also
                # past the slot's expiry: the call still runs, so the slot is
                # still in use upstream, and a restarted broker or a cluster's
                # next leader adopts a lease renewed within one TTL of its
                # start, which an election longer than a short TTL would miss.
                left_ms = (expires - time.monotonic()) * 1000.0
                if left_ms <= 0 and not self._past_expiry:
                    self._past_expiry = True
                    (log.debug if outage else log.warning)(
                        "lease %s passed its expiry while renewals failed; renewing on while it is "
                        "held", self.lease.lease_id)
                wait_ms = max(ttl_ms / 8.0, 100)
                if left_ms > 0:
                    wait_ms = min(wait_ms, left_ms)

    def stop(self):
        self._halt.set()
        if self is not threading.current_thread():
            self.join(timeout=_CALL_TIMEOUT_S + 5)


class WatchStream:
    """Iterator over QuotaStatus messages of a Watch; ``cancel()`` (or ``with``) ends it."""

    def __init__(self, call, reopen=None, target=None):
        self._call = call
        # The "host:port" the stream is open on now, for errors' messages.
        self._target = target or (lambda: None)
        self._cancelled = False
        # Before the first message, an UNAVAILABLE answer (a broker that does
        # not lead the tenant, or is down) opens the stream again where
        # reopen(error, hop) says (None: nowhere, raise).
        self._reopen = reopen
        self._hops = 0
        self._started = False

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            try:
                msg = next(self._call)
                self._started = True
                return msg
            except grpc.RpcError as e:
                if self._cancelled or e.code() == grpc.StatusCode.CANCELLED:
                    raise StopIteration from None
                if (not self._started and self._reopen is not None
                        and e.code() == grpc.StatusCode.UNAVAILABLE):
                    self._hops += 1
                    call = self._reopen(e, self._hops)
                    if call is not None and not self._cancelled:
                        self._call = call
                        continue
                raise errors.from_rpc_error(e, self._target()) from None

    def cancel(self):
        self._cancelled = True
        self._call.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()
        return False


class QuotaBroker:
    """A connection to a quota-broker.

    Make one per process (per set of brokers), share it between threads
    (it is thread-safe) and close it at the end. Every call blocks its
    thread: from asyncio, ``await asyncio.to_thread(broker.acquire, ...)``.
    Clients made per request or per job work too: the fallback (pacing,
    grant history, kept outcomes, the outage's one warning) is shared by
    every client of the same brokers, settings and clock in the process.

    ``url`` is "host:port", "http://host:port" (plaintext) or
    "https://host:port" (TLS); for a cluster, several of them (a list, or
    one string comma-separated; all plaintext or all TLS). A broker that
    does not lead the call's tenant answers UNAVAILABLE naming the leader
    (``x-quota-broker-leader``): the call goes there, with this client's TLS
    settings, and later calls too. UNAVAILABLE without a leader (the broker
    is down, no leader elected yet): the next configured broker. After
    (number of urls + 2) hops the call counts as an unreachable broker
    (the fallback below). Channels are made once per broker and kept. ``token`` is sent as
    ``authorization: Bearer <token>`` on every call (over TLS too). ``timeout`` is the
    client-side deadline (seconds) added on top of an Acquire's server-side
    wait and used as is for the other unary calls. A ``token`` that cannot
    be sent (starting with "Bearer ", non-ASCII or control characters,
    over MAX_TOKEN_CHARS) is :class:`BadToken` here. ``options`` are gRPC
    channel options, on top of :data:`DEFAULT_CHANNEL_OPTIONS` (reconnect
    backoff bounded to 2 s).

    TLS: an ``https://`` url, or ``tls=True`` with "host:port". ``ca_cert``
    (a private CA; default: gRPC's trusted roots), ``client_cert`` and
    ``client_key`` (mutual TLS; both or neither) are PEM ``bytes``, a ``str``
    holding PEM, or file paths; giving any of them with "host:port" also
    means TLS. They are read and checked here (:class:`TlsError`).
    ``tls_server_name`` checks the broker's certificate for that name
    instead of the url's host. ``credentials``: ready-made
    ``grpc.ChannelCredentials`` instead (not with the PEM arguments).

    ``fallback``: when the broker is unreachable (UNAVAILABLE, or no answer
    within the deadline), ``acquire``/``lease`` pace calls with a local
    limiter instead of failing (see :class:`FallbackSettings`: half the rate
    granted over the last minute, at least 6/min, never unlimited), try the
    broker again every second, keep the outcomes reported meanwhile and
    report them once it is back. ``fallback=None`` raises ``Unavailable``
    instead. ``clock``: an object with ``monotonic()`` and ``sleep(s)`` that
    the fallback, and the recheck of an address found not to be a broker
    (see :data:`RECHECK_NOT_A_BROKER_S`), read time from (default: the real
    clock).
    """

    def __init__(self, url, token=None, *, timeout=_CALL_TIMEOUT_S, credentials=None, options=None,
                 fallback=FallbackSettings(), clock=None, tls=None, ca_cert=None, client_cert=None,
                 client_key=None, tls_server_name=None):
        urls = _split_urls(url)
        parsed = [_target(u) for u in urls]
        said = {t for _, t in parsed if t is not None}
        if len(said) > 1:
            raise ValueError(f"broker urls {_shown(url)} mix http:// and https://: use one or the "
                             "other")
        url_tls = said.pop() if said else None
        pem_given = any(v is not None for v in (ca_cert, client_cert, client_key))
        tls_given = pem_given or tls_server_name is not None
        if credentials is not None and pem_given:
            raise ValueError("pass either credentials= or ca_cert/client_cert/client_key, not both")
        if url_tls is False and (tls or tls_given):
            raise ValueError(f"TLS settings given for the plaintext url {_shown(url)}: use "
                             "https://")
        if tls is False and (url_tls or tls_given or credentials is not None):
            raise ValueError(f"tls=False contradicts {'the https:// url' if url_tls else 'the TLS settings'}")
        secure = bool(url_tls or tls or tls_given or credentials is not None)
        channel_options = dict(DEFAULT_CHANNEL_OPTIONS)
        if tls_server_name is not None:
            channel_options["grpc.ssl_target_name_override"] = tls_server_name
        channel_options.update(dict(options or ()))
        self._channel_options = list(channel_options.items())
        self._creds = (credentials or channel_credentials(ca_cert, client_cert, client_key)) if secure else None
        #: Whether the channels speak TLS.
        self.tls = secure
        #: The configured broker targets ("host:port"), in order: calls move
        #: to the next one when the current one does not answer.
        self.targets = list(dict.fromkeys(t for t, _ in parsed))
        # Channels per target (configured ones, and leaders the brokers named),
        # created on first use; _conn is the one calls go to now.
        self._conns_lock = threading.Lock()
        self._conns = {}
        # Addresses found not to be a quota-broker's gRPC port, and when
        # (self._clock): passed over for RECHECK_NOT_A_BROKER_S after it;
        # logged once until the address answers as a broker again.
        self._said_not_a_broker = {}
        # https:// urls asked in plaintext what they speak, and when (see _plaintext_at).
        self._asked_plaintext = {}
        self._channels_closed = False
        token = _check_token(token)
        if fallback is not None and not isinstance(fallback, FallbackSettings):
            raise TypeError(f"fallback must be a FallbackSettings or None, got {type(fallback).__name__}")
        self._conn = self._conn_for(self.targets[0])
        self.timeout = timeout
        #: Call metadata (the bearer token), for calls on the raw stubs.
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._clock = clock if clock is not None else SYSTEM_CLOCK
        # Shared by every client of these brokers in the process (with the
        # same settings and clock): short-lived clients pace together and
        # log an outage once (see fallback.shared).
        self._fallback = (_shared_fallback(fallback, self._clock, self.targets, self.tls)
                          if fallback is not None else None)
        # Added to the fallback's warning: a url without a port is dialled
        # on the scheme's (80, 443), where a broker seldom listens.
        self._port_hint = _no_port_hint(urls)
        self._flush_lock = threading.Lock()
        self._flusher = None
        self._flusher_lock = threading.Lock()
        self._flush_again = False
        self._closed = threading.Event()
        # Overload: until when (time.monotonic(), real time: the broker's
        # limiter runs on real time) the kept reports and releases wait, and
        # how many Overloaded answers were seen.
        self._hold_until = 0.0
        self._overloads = 0
        # Releases refused as Overloaded, sent by the background sender.
        self._deferred_releases = collections.deque()
        self._prober = None
        # Probes an unreachable broker while something is kept for it.
        self._awaiter = None
        # A process that exits without close() (or `with`) would lose the kept
        # outcomes silently: at exit they are sent if a broker answers within
        # _CLOSE_FLUSH_TIMEOUT_S, and what is left is logged. A weak reference,
        # so the hook does not keep the client alive.
        _LIVE.add(self)

    def _unreachable_hint(self, err):
        """What the fallback's warning adds for ``err``: what to check in the url, if anything."""
        return errors.unreachable_hint(err.details, self.tls) + self._port_hint

    def _enter_fallback(self, err):
        """No broker answered ``err``'s call: the shared fallback starts (its
        one warning says what happened and what to check in the url)."""
        self._fallback.enter(err, self._unreachable_hint(err), getattr(err, "what_happened", None))

    # -- connections -------------------------------------------------------------

    @property
    def channel(self):
        """The ``grpc.Channel`` calls go to now."""
        return self._conn.channel

    @property
    def target(self):
        """The broker calls go to now ("host:port"): the first configured one
        until a broker names another as the tenant's leader or does not answer."""
        return self._conn.target

    @property
    def stub(self):
        """Raw generated QuotaBroker stub on the current broker, for anything the wrapper does not cover."""
        return self._conn.stub

    @property
    def admin_stub(self):
        """Raw generated QuotaAdmin stub on the current broker."""
        return self._conn.admin_stub

    def _conn_for(self, target):
        """The (cached) channel and stubs of ``target``; Closed once close() closed the channels."""
        with self._conns_lock:
            if self._channels_closed:
                raise errors.Closed()
            conn = self._conns.get(target)
            if conn is None:
                if self.tls:
                    channel = grpc.secure_channel(target, self._creds, options=self._channel_options)
                else:
                    channel = grpc.insecure_channel(target, options=self._channel_options)
                conn = self._conns[target] = _Conn(target, channel)
            return conn

    def _leader_target(self, leader_url):
        """The target of a leader URL a broker named, or None when this client cannot reach it
        with its TLS settings (an ``http://`` leader for a TLS client, or the reverse)."""
        try:
            target, url_tls = _target(leader_url)
        except ValueError:
            return None
        if url_tls is not None and url_tls != self.tls:
            return None
        return target

    def _next_target(self, after, trail=None):
        """The configured target after ``after`` (when ``after`` is not
        configured, a leader a broker named: after the last configured one
        the call tried, else the first), passing over those found not to be a
        broker within the last RECHECK_NOT_A_BROKER_S and those the call
        (``trail``) tried already; None when there is no other."""
        start = after if after in self.targets else (
            trail.last_configured(self.targets) if trail is not None else None)
        at = self.targets.index(start) + 1 if start is not None else 0
        n = len(self.targets)
        now = self._clock.monotonic()
        with self._conns_lock:
            for k in range(n):
                target = self.targets[(at + k) % n]
                if target == after or (trail is not None and trail.tried(target)):
                    continue
                found = self._said_not_a_broker.get(target)
                if found is None or now >= found + RECHECK_NOT_A_BROKER_S:
                    return target
        return None

    def _move(self, frm, to, why):
        """Calls go to ``to`` from now on (unless another thread moved them off ``frm`` meanwhile)."""
        conn = self._conn_for(to)
        with self._conns_lock:
            if self._conn is frm:
                self._conn = conn
        log.debug("quota-broker: following the cluster from %s to %s (%s)", frm.target, to, why)
        return conn

    def _follow(self, conn, err, hop, trail):
        """Where to send a call again after ``conn`` answered UNAVAILABLE (``err``), or None.

        With the ``x-quota-broker-leader`` metadata: that leader, unless this
        call found it not answering already. Without it (the broker is down,
        or no leader is elected yet), or when the leader named did not
        answer: the next configured broker this call has not tried
        (``trail``, which has ``conn``'s answer already), as quotactl does.
        At most (number of configured brokers + 2) hops per call, as the
        Rust client.
        """
        if hop > len(self.targets) + 2:
            return None
        leader = _leader_of(err)
        if leader is not None:
            self._broker_at(conn.target)  # only a broker names a leader
            target = self._leader_target(leader)
            if target is None:
                log.warning("quota-broker at %s names %s as the leader, which this client cannot "
                            "reach with its TLS settings (tls=%s)", conn.target, leader, self.tls)
                return None
            if target == conn.target:
                # "I lead it" cannot come with UNAVAILABLE: do not loop.
                log.debug("quota-broker at %s names itself as the leader in an UNAVAILABLE answer", conn.target)
                return None
            if not trail.given_up(target):
                return self._move(conn, target, f"leader {leader}")
            # The leader named did not answer this call: the others given may
            # (one elected since, or one that knows a newer leader).
        target = self._next_target(conn.target, trail)
        if target is None:
            return None
        return self._move(conn, target, "no answer / no leader" if leader is None else
                          f"the leader named, {leader}, does not answer")

    # -- fallback state --------------------------------------------------------

    @property
    def in_fallback(self):
        """Whether calls are paced by the local fallback limiter (the broker is unreachable)."""
        return self._fallback is not None and self._fallback.active

    @property
    def fallback_rate_per_min(self):
        """The local limiter's rate while falling back, else None."""
        return self._fallback.rate_per_min if self._fallback is not None else None

    @property
    def fallback_max_in_flight(self):
        """While falling back, the most calls at once (None: no cap, or not falling back)."""
        return self._fallback.max_in_flight if self._fallback is not None else None

    @property
    def pending_reports(self):
        """Outcomes kept while the broker was unreachable, not reported yet."""
        return self._fallback.pending if self._fallback is not None else 0

    @property
    def dropped_reports(self):
        """Outcomes dropped so far because more than ``buffer_size`` were waiting."""
        return self._fallback.dropped_total if self._fallback is not None else 0

    @property
    def pending_releases(self):
        """Releases waiting to be sent: those the broker refused as Overloaded (sent
        after its retry-after-ms), and those that found it unreachable or were
        of Acquires that got no answer (sent when a broker answers again)."""
        return len(self._deferred_releases)

    # -- overload ----------------------------------------------------------------

    def _overloaded(self, err):
        """The broker answered Overloaded: the background sender waits its retry-after-ms."""
        delay = err.retry_after_ms / 1000.0 if err.retry_after_ms is not None else _OVERLOAD_BACKOFF_S
        with self._flusher_lock:
            self._overloads += 1
            self._hold_until = max(self._hold_until, time.monotonic() + delay)

    def _held(self):
        """Whether an Overloaded answer's retry-after-ms has not passed yet."""
        return time.monotonic() < self._hold_until

    def _defer_release(self, req, err):
        """Sends a release refused as Overloaded later, in the background (at most ``buffer_size``)."""
        self._overloaded(err)
        self._keep_release(req)
        log.debug("release of lease %s deferred: %s", req.lease_id, err)
        self._start_flusher()

    def _release_unanswered(self, tenant, key):
        """An Acquire got no answer, yet the broker may have read it (frozen or
        cut off after): once it answers again, a lease it granted that nobody
        holds is released by the Acquire's idempotency key."""
        self._keep_release(pb.ReleaseRequest(tenant=tenant, acquire_key=key))
        self._await_broker()

    def _keep_release(self, req):
        cap = max(self._fallback.settings.buffer_size, 1) if self._fallback is not None else 1000
        with self._flusher_lock:
            if len(self._deferred_releases) >= cap:
                dropped = self._deferred_releases.popleft()  # its slot expires by itself
                log.debug("deferred release %s dropped (%d waiting)", dropped, cap)
            self._deferred_releases.append(req)

    def _release_deferred(self, timeout=None):
        """Sends the deferred releases, oldest first; stops at an Overloaded or
        unreachable broker, or a server that is not a broker (NotABroker)."""
        while True:
            with self._flusher_lock:
                if not self._deferred_releases:
                    return
                req = self._deferred_releases.popleft()
            try:
                self._send_release_adopting(req, timeout)
            except errors.Overloaded as e:
                self._overloaded(e)
                with self._flusher_lock:
                    self._deferred_releases.appendleft(req)
                return
            except _UNREACHABLE as e:
                if _may_have_reached_a_broker(e):
                    # Sent again later, it must not be adopted (see below).
                    req.ClearField("acquired_with")
                with self._flusher_lock:
                    self._deferred_releases.appendleft(req)
                return
            except errors.NotABroker as e:
                # The address answers but is not a broker (a load balancer
                # misrouting during a deploy): no broker read it; the broker
                # may be back there later.
                log.debug("deferred release %s kept: %s", req, e)
                with self._flusher_lock:
                    self._deferred_releases.appendleft(req)
                self._await_broker()
                return
            except errors.BrokerRpcError as e:
                log.debug("deferred release %s refused: %s", req, e)
            except errors.QuotaBrokerError as e:
                # Closed, or a TLS handshake that cannot succeed: not sent.
                log.debug("deferred release %s not sent: %s", req, e)
                with self._flusher_lock:
                    self._deferred_releases.appendleft(req)
                return

    def _send_release_adopting(self, req, timeout=None):
        """Sends a kept release. One kept with the Acquire that granted its
        lease goes without it first, and with it only if the broker answered
        that it does not know the lease (restarted after a crash, or leading
        since a failover): adopted and released on a release some broker had
        already processed (its answer lost), it would free a slot since
        granted to someone else (the Rust client's rule)."""
        if not req.HasField("acquired_with"):
            return self._call("Release", req, timeout)
        bare = pb.ReleaseRequest()
        bare.CopyFrom(req)
        bare.ClearField("acquired_with")
        answer = self._call("Release", bare, timeout)
        if answer.released:
            return answer
        return self._call("Release", req, timeout)

    def _await_broker(self):
        """While releases or outcomes are kept for an unreachable broker:
        probes it every ``probe_every_s`` (one thread at a time), so they are
        sent once it answers again, not only at this client's next call."""
        with self._flusher_lock:
            if self._awaiter is not None or self._closed.is_set():
                return
            self._awaiter = threading.Thread(target=self._await_in_background,
                                             name="quota-broker-await", daemon=True)
            self._awaiter.start()

    def _await_in_background(self):
        every = self._fallback.settings.probe_every_s if self._fallback is not None else 1.0
        try:
            while not self._closed.wait(every):
                if not self._has_deferred():
                    return
                self._probe_in_background()
        finally:
            with self._flusher_lock:
                self._awaiter = None

    def _send_deferred(self, timeout=None):
        """Releases first (they free slots for the fleet), then the kept reports."""
        self._release_deferred(timeout)
        self.flush_reports(timeout)

    def _has_deferred(self):
        return bool(self._deferred_releases) or self.pending_reports > 0

    def _answers(self):
        """Whether a broker answers at all (any status but UNAVAILABLE / DEADLINE_EXCEEDED).

        The current broker first, then the other configured ones in turn;
        calls move to the first that answers.
        """
        first = self._conn
        order = [first.target] + [t for t in self.targets if t != first.target]
        for target in order:
            conn = self._conn_for(target)
            try:
                status = conn.health_check(b"", timeout=min(self.timeout, _PROBE_TIMEOUT_S),
                                           metadata=self.metadata)
                if status == _NOT_SERVING:
                    continue  # shutting down
            except grpc.RpcError as e:
                # A handshake that cannot succeed (a certificate rotated to
                # one this client does not trust) is an answer: the next
                # call then raises TlsError instead of running on the
                # fallback rate for good.
                refused = self.tls and errors.tls_refusal(e.details()) is not None
                # So is a server that is not a quota-broker's gRPC port: the
                # next call raises NotABroker.
                refused = refused or errors.not_a_broker(e.code(), e.details()) is not None
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                        and not refused:
                    continue
            if conn is not first:
                self._move(first, target, "answers the health probe")
            return True
        return False

    def _probe_in_background(self):
        """While falling back: probes the brokers in a thread of its own, one
        probe at a time, so that no call waits on a broker that hangs (its
        probe may take the probe's whole timeout); when one answers, calls
        go to it again and what was kept is sent."""
        with self._flusher_lock:
            if self._prober is not None or self._closed.is_set():
                return self._prober
            self._prober = threading.Thread(target=self._probe, name="quota-broker-probe",
                                            daemon=True)
            self._prober.start()
            return self._prober

    def _probe(self):
        try:
            if self._answers():
                self._broker_answered()
        except Exception:  # after close() the channels are gone: expected
            if not self._closed.is_set():
                log.exception("probing the broker failed")
        finally:
            with self._flusher_lock:
                self._prober = None

    def _broker_answered(self):
        fb = self._fallback
        if fb is not None:
            fb.leave()
        if (fb is not None and fb.pending) or self._deferred_releases:
            self._start_flusher()

    def _start_flusher(self):
        """Starts the background sender, or has the running one make another pass."""
        with self._flusher_lock:
            self._flush_again = True
            if self._flusher is not None or self._closed.is_set():
                return
            self._flusher = threading.Thread(target=self._flush_in_background,
                                             name="quota-broker-report-flush", daemon=True)
            self._flusher.start()

    def _flush_in_background(self):
        """Passes over the kept reports and deferred releases until nothing asks for another.

        A pass stopped by an Overloaded answer is followed by another once
        its retry-after-ms has passed; one stopped by an unreachable broker
        ends the thread (the broker's next answer starts it again).
        """
        try:
            while True:
                with self._flusher_lock:
                    if self._closed.is_set() or not self._flush_again:
                        self._flusher = None
                        return
                    self._flush_again = False
                wait = self._hold_until - time.monotonic()
                if wait > 0 and self._closed.wait(wait):
                    continue
                overloads = self._overloads
                self._send_deferred()
                if self._overloads != overloads and self._has_deferred():
                    with self._flusher_lock:
                        self._flush_again = True
                        self._hold_until = max(self._hold_until,
                                               time.monotonic() + _MIN_OVERLOAD_BACKOFF_S)
        except Exception:
            with self._flusher_lock:
                self._flusher = None
            if not self._closed.is_set():  # after close() the channel is gone: expected
                log.exception("reporting kept outcomes failed")

    def flush_reports(self, timeout=None):
        """Reports the outcomes kept while the broker was unreachable, oldest first.

        Done by itself in the background when the broker answers again;
        call it to do it now. Retry-After and rate-limit resets are aged by
        the time the outcome was kept (see
        :func:`~quota_broker_client.headers.aged_rate_limit_headers`). Stops
        at the first report the broker does not answer or answers
        RESOURCE_EXHAUSTED, or that meets a server that is not a broker
        (:class:`NotABroker`: a load balancer misrouting, say) (the rest stay
        kept, and go at its next answer); one a broker refuses otherwise
        (e.g. a tenant no longer configured, or one mistyped) is dropped,
        and logged as a warning with the broker's reason, once per reason
        per call. After RESOURCE_EXHAUSTED (:class:`Overloaded`) the background sender
        tries again once its ``retry_after_ms`` has passed.
        Returns how many were reported by this call.
        """
        fb = self._fallback
        if fb is None:
            return 0
        sent = refused = 0
        # The broker's reasons for the outcomes it refused, and how many each.
        reasons = collections.Counter()
        with self._flush_lock:
            while True:
                item = fb.pop_oldest()
                if item is None:
                    break
                age_s, req, _ = item
                headers, retry_after = aged_rate_limit_headers(dict(req.headers), req.retry_after_ms, age_s)
                aged = pb.ReportRequest()
                aged.CopyFrom(req)
                aged.retry_after_ms = retry_after
                aged.headers.clear()
                aged.headers.update(headers)
                try:
                    self._call("Report", aged, timeout)
                except _UNREACHABLE:
                    fb.put_back(item)
                    break
                except errors.Overloaded as e:
                    fb.leave()  # it answers
                    fb.put_back(item)  # over this caller's request rate: the rest go later
                    self._overloaded(e)
                    break
                except errors.NotABroker as e:
                    # Not a refusal by a broker (see _release_deferred): kept.
                    log.debug("kept outcome %s %s -> %s not sent: %s", req.method, req.path, req.http_status, e)
                    fb.put_back(item)
                    self._await_broker()
                    break
                except errors.BrokerRpcError as e:
                    fb.leave()  # it answers
                    refused += 1
                    reasons[str(e)[:_SHOWN_REASON_CHARS]] += 1
                    log.debug("kept outcome %s %s -> %s refused: %s", req.method, req.path, req.http_status, e)
                    continue
                except errors.QuotaBrokerError as e:
                    # Closed, or a TLS handshake that cannot succeed: not sent.
                    log.debug("kept outcome %s %s -> %s not sent: %s", req.method, req.path, req.http_status, e)
                    fb.put_back(item)
                    break
                fb.leave()
                sent += 1
            dropped = fb.take_dropped()
        for reason, n in reasons.items():
            # Dropped for good: say why, so a mistake (a tenant mistyped, a
            # token not scoped to it) is seen, not only counted.
            log.warning("quota-broker at %s refused %d outcome%s kept while it was unreachable or "
                        "overloaded, now dropped: %s", self.target, n, "" if n == 1 else "s", reason)
        if sent or refused or dropped:
            log.info("reported %d outcomes kept while quota-broker at %s was unreachable or overloaded "
                     "(%d refused by it; %d dropped as the oldest past the %d the client keeps; "
                     "%d still kept)",
                     sent, self.target, refused, dropped, fb.settings.buffer_size, fb.pending)
        return sent

    # -- lifecycle -----------------------------------------------------------

    def close(self):
        """Sends kept outcomes and deferred releases if the broker answers (briefly), then closes.

        When the broker answers Overloaded, waits its retry-after-ms once
        (if at most 2 s) and tries again.
        """
        with self._flusher_lock:
            if self._closed.is_set():
                return
            self._closed.set()  # the background sender stops after its current call
        _LIVE.discard(self)
        timeout = min(self.timeout, _CLOSE_FLUSH_TIMEOUT_S)
        for attempt in range(2):
            if not self._has_deferred():
                break
            self._send_deferred(timeout=timeout)
            wait = self._hold_until - time.monotonic()
            if attempt or not self._has_deferred() or not 0 < wait <= _CLOSE_FLUSH_TIMEOUT_S:
                break
            time.sleep(wait)
        if self.pending_reports:
            # Kept in the fallback the brokers' clients share: said once an
            # outage (clients made per job each close with them).
            (log.warning if self._fallback.say_closing() else log.debug)(
                "closing with %d outcomes kept for quota-broker at %s unreported (it does not "
                "answer, or is overloaded); a client of the same brokers made later in this "
                "process reports them", self.pending_reports, self.target)
        if self._deferred_releases:
            log.debug("closing with %d releases unsent (their slots expire by themselves)",
                      len(self._deferred_releases))
        with self._conns_lock:
            conns = list(self._conns.values())
            # From here on every call raises Closed, not gRPC's ValueError.
            self._channels_closed = True
        for conn in conns:
            conn.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _flush_at_exit(self, deadline):
        """At interpreter exit without close(): sends the kept outcomes and deferred
        releases if a broker answers before ``deadline`` (time.monotonic())."""
        try:
            # A broker back since the last call: the channel may still be in its
            # reconnect backoff (up to 2 s), where calls fail at once.
            grpc.channel_ready_future(self.channel).result(
                timeout=max(0.0, deadline - time.monotonic()))
            self._send_deferred(timeout=max(0.1, deadline - time.monotonic()))
        except Exception as e:  # grpc.FutureTimeoutError: nothing answers
            log.debug("sending kept outcomes at exit failed: %s", e)

    def _warn_lost_at_exit(self):
        """Says what the exit hook could not send."""
        if self.pending_reports or self._deferred_releases:
            log.warning("process exiting without QuotaBroker.close(): %d outcomes kept for quota-broker "
                        "at %s lost (%d releases unsent); it did not answer within %g s "
                        "(close() it, or use `with QuotaBroker(...)`, while it answers)",
                        self.pending_reports, self.target, len(self._deferred_releases),
                        _CLOSE_FLUSH_TIMEOUT_S)

    def _plaintext_at(self, target, err):
        """Whether a TLS call to ``target`` that failed with ``err`` met a broker
        without TLS: its handshake cut short, and the port, asked in
        plaintext (at most every _ASK_EVERY_S), answers in HTTP/2."""
        if not self.tls or err.code() != grpc.StatusCode.UNAVAILABLE:
            return False
        if not any(s in (err.details() or "") for s in _HANDSHAKE_CUT):
            return False
        now = time.monotonic()
        asked = self._asked_plaintext.get(target)
        if asked is True:
            return True
        if asked is not None and now - asked < _ASK_EVERY_S:
            return False
        found = _speaks_plaintext_http2(target)
        self._asked_plaintext[target] = True if found else now
        return found

    def _say_not_a_broker(self, target, err):
        """Notes that ``target`` is not a quota-broker's gRPC port now (passed
        over in a list until RECHECK_NOT_A_BROKER_S from now); logs it once,
        until it answers as a broker again."""
        with self._conns_lock:
            known = target in self._said_not_a_broker
            self._said_not_a_broker[target] = self._clock.monotonic()
        if known:
            return
        if len(self.targets) < 2:
            log.error("%s (calls there fail, never fall back; fix the url)", err)
        else:
            log.error("%s (calls there fail, never fall back; fix the url; passed over, "
                      "tried again every %g s)", err, RECHECK_NOT_A_BROKER_S)

    def _broker_at(self, target):
        """``target`` answered as a broker: if it was found not to be one, it is again."""
        if target not in self._said_not_a_broker:
            return
        with self._conns_lock:
            if self._said_not_a_broker.pop(target, None) is None:
                return
        log.info("the server at %s answers as a quota-broker again", target)

    def _call(self, name, request, timeout=None, *, admin=False):
        """Runs the unary RPC ``name`` following the cluster (see ``_call_at``); returns its response."""
        return self._call_at(name, request, timeout, admin=admin)[0]

    def _call_at(self, name, request, timeout=None, *, admin=False):
        """Runs the unary RPC ``name`` on the current broker, following the cluster.

        UNAVAILABLE with ``x-quota-broker-leader``: again at that leader;
        without it: again at the next configured broker; at most (number of
        configured brokers + 2) hops, then the last answer is raised (and is
        an unreachable broker to the fallback). ``timeout`` is per hop.
        Returns (response, target of the broker that answered).
        """
        if self._channels_closed:
            raise errors.Closed()
        hop = 0
        conn = self._conn
        # A broker found away on the way: with one, a list's mistaken
        # address is not what the call met (an outage is).
        away = None
        trail = _Trail(_tenant_of(request))
        while True:
            fn = getattr(conn.admin_stub if admin else conn.stub, name)
            try:
                response = fn(request, timeout=self.timeout if timeout is None else timeout,
                              metadata=self.metadata)
                self._broker_at(conn.target)
                return response, conn.target
            except ValueError:
                # gRPC's "Cannot invoke RPC on closed channel": close() ran
                # between the check above and the call.
                if self._channels_closed:
                    raise errors.Closed() from None
                raise
            except grpc.RpcError as e:
                if self._channels_closed and e.code() == grpc.StatusCode.CANCELLED:
                    raise errors.Closed() from None  # in flight when close() closed the channel
                mistake = errors.not_a_broker(e.code(), e.details())
                if mistake is None and self._plaintext_at(conn.target, e):
                    err = errors.NotABroker(
                        e.code(),
                        f"the server at {conn.target} is not a quota-broker's gRPC port: it answers in "
                        "plaintext HTTP/2, not TLS: a broker without [server.tls] addressed with "
                        "https:// (use http://)", e)
                    self._say_not_a_broker(conn.target, err)
                    if len(self.targets) < 2:
                        raise err from None
                if e.code() != grpc.StatusCode.UNAVAILABLE and (mistake is None or len(self.targets) < 2):
                    err = errors.from_rpc_error(e, conn.target)
                    if isinstance(err, errors.NotABroker):
                        self._say_not_a_broker(conn.target, err)
                    raise err from None
                if mistake is not None:
                    # Said once per address, also when another broker of
                    # the list answers the call (then nothing is raised).
                    self._say_not_a_broker(conn.target, errors.from_rpc_error(e, conn.target))
                else:
                    away = (e, conn.target)
                hop += 1
                failed = conn
                trail.add(conn.target, e)
                conn = self._follow(conn, e, hop, trail)
                if conn is None and mistake is not None and away is not None:
                    raise self._no_broker_answered(trail, *away) from None
                if conn is None:
                    # No broker answered: a handshake that cannot succeed
                    # says what to do rather than read as an outage.
                    refusal = errors.tls_refusal(e.details()) if self.tls else None
                    if refusal is not None:
                        raise errors.TlsError(
                            f"TLS handshake with the broker at {failed.target}: {refusal}") from None
                    raise self._no_broker_answered(trail, e, failed.target) from None

    def _no_broker_answered(self, trail, err, target):
        """The error a call raises when no broker answered it (``err`` at
        ``target`` the last one), with ``what_happened`` on its way through
        the cluster when a broker sent it to a leader (None otherwise)."""
        raised = errors.from_rpc_error(err, target)
        raised.what_happened = trail.describe(self._leader_target)
        return raised

    # -- data plane ----------------------------------------------------------

    def acquire_raw(self, tenant, method, path, *, client_id, oauth_client="",
                    priority_class="", permits=1, max_wait_ms=None, timeout=None):
        """Acquire returning the AcquireResponse as is (granted or not); no fallback."""
        _check_acquire_timeout(timeout, max_wait_ms)
        return self._acquire_at(tenant, method, path, client_id=client_id, oauth_client=oauth_client,
                                priority_class=priority_class, permits=permits,
                                max_wait_ms=max_wait_ms, timeout=timeout)[0]

    def _acquire_at(self, tenant, method, path, *, client_id, oauth_client="",
                    priority_class="", permits=1, max_wait_ms=None, timeout=None, key=""):
        """``acquire_raw`` returning (AcquireResponse, target of the broker that answered)."""
        for name, value in (("tenant", tenant), ("method", method), ("path", path),
                            ("client_id", client_id), ("oauth_client", oauth_client or ""),
                            ("priority_class", priority_class or "")):
            _check_str(name, value)
        _check_count("permits", permits, _UINT32_MAX)
        if max_wait_ms is not None:
            _check_count("max_wait_ms", max_wait_ms, _UINT64_MAX)
        req = pb.AcquireRequest(
            tenant=tenant,
            client_id=client_id,
            priority_class=priority_class or "",
            method=method.upper(),
            path=path,
            oauth_client=oauth_client or "",
            permits=permits,
            idempotency_key=key,
        )
        if max_wait_ms is not None:
            req.max_wait_ms = int(max_wait_ms)
        if timeout is None:
            # An explicit wait as asked (the broker caps it at its own
            # server.max_wait_ms); the class's default wait, which this
            # client does not know, at the broker's default cap.
            wait_ms = _SERVER_MAX_WAIT_MS if max_wait_ms is None else int(max_wait_ms)
            timeout = wait_ms / 1000.0 + self.timeout
        return self._call_at("Acquire", req, timeout)

    def acquire(self, tenant, method, path, *, client_id, oauth_client="",
                priority_class="", permits=1, max_wait_ms=None, timeout=None):
        """Asks for permission to make an upstream call.

        Returns a Lease; raises NotGranted (with ``reason`` and
        ``retry_after_ms``) when the broker says not now, and a BrokerRpcError
        subclass (InvalidArgument, NotFound, Unauthenticated...) on errors.
        ``max_wait_ms=None`` uses the priority class's default wait.

        Overloaded (RESOURCE_EXHAUSTED: this caller is over its request
        rate at the broker) is raised to the caller, never answered from the
        fallback: the broker is up. Wait its ``retry_after_ms`` and retry.

        When the broker is unreachable the permission comes from the local
        fallback limiter (``lease.is_fallback``), to the calls waiting for it
        in arrival order; NotGranted (with ``retry_after_ms``) when it is
        further away than ``max_wait_ms``, or without one than the broker's
        default cap of 60 s; the broker is tried again meanwhile. A client
        whose leases held slots in the minute before also waits for one of
        its leases to end while it holds ``fallback_max_in_flight`` at once.
        Without a fallback (``fallback=None``) it raises Unavailable / DeadlineExceeded.
        ``timeout`` (seconds) is the whole call's deadline, the broker's wait
        included: it must be above ``max_wait_ms`` (a ValueError otherwise);
        None is the wait plus the client's ``timeout``. An explicit
        ``timeout`` that runs out is DeadlineExceeded, not a fallback.
        """
        if self._channels_closed:
            raise errors.Closed()
        method = _check_str("method", method).upper()
        for name, value in (("tenant", tenant), ("path", path), ("client_id", client_id)):
            _check_str(name, value)
        _check_count("permits", permits, _UINT32_MAX)
        if max_wait_ms is not None:
            _check_count("max_wait_ms", max_wait_ms, _UINT64_MAX)
        _check_acquire_timeout(timeout, max_wait_ms)
        fb = self._fallback
        route = route_key(tenant, method, path)
        started = self._clock.monotonic()
        # Without max_wait_ms the fallback waits at most the broker's default
        # cap: an Acquire's wait is bounded alike, broker up or down.
        fallback_wait_s = (_SERVER_MAX_WAIT_MS if max_wait_ms is None else max_wait_ms) / 1000.0
        turn = object()  # this call's place in the fallback's line (see LocalFallback.take)
        try:
            while True:
                if fb is not None and fb.active and fb.should_try_broker():
                    prober = self._probe_in_background()
                    # A broker that is back answers its probe within
                    # milliseconds: wait that long, so this call is leased by it
                    # rather than by the fallback (or told "unreachable"); never
                    # longer than _PROBE_WAIT_S, so a broker that hangs holds no
                    # call up.
                    if prober is not None:
                        prober.join(_PROBE_WAIT_S)
                if fb is None or not fb.active:
                    if fb is not None:
                        fb.leave_line(turn)  # no place in the line while asking the broker
                    key = uuid.uuid4().hex
                    left_ms = max_wait_ms
                    if max_wait_ms is not None:
                        # Part of it may have gone waiting on the fallback limiter.
                        waited_ms = (self._clock.monotonic() - started) * 1000.0
                        left_ms = max(math.ceil(max_wait_ms - waited_ms), 0)
                    try:
                        resp, granted_by = self._acquire_at(
                            tenant, method, path, client_id=client_id, oauth_client=oauth_client,
                            priority_class=priority_class, permits=permits, max_wait_ms=left_ms,
                            timeout=timeout, key=key)
                    except _UNREACHABLE as e:
                        if _may_have_reached_a_broker(e):
                            self._release_unanswered(tenant, key)
                        if timeout is not None and isinstance(e, errors.DeadlineExceeded):
                            # The caller's own deadline: say which (a wait the
                            # class's default sets may be longer than it).
                            raise errors.DeadlineExceeded(
                                e.code,
                                f"{e.details} (the timeout={timeout:g} s given to acquire ran out; "
                                + ("it is the whole call's deadline, the broker's wait included: "
                                   "without max_wait_ms the priority class's default wait applies, "
                                   "up to the broker's cap of "
                                   f"{_SERVER_MAX_WAIT_MS // 1000} s: pass max_wait_ms below it)"
                                   if max_wait_ms is None else "the broker did not answer in time)"),
                                e.rpc_error) from None
                        if fb is None:
                            raise  # no fallback
                        if isinstance(e, errors.DeadlineExceeded) and self._answers():
                            # The broker is up and held the call past this
                            # client's deadline (a wait longer than the broker's
                            # default cap): not an outage, so no fallback lease
                            # beside the broker's own grants.
                            raise NotGranted(
                                f"no answer within the client's deadline of {_SERVER_MAX_WAIT_MS // 1000} s "
                                "plus its timeout while the broker is up; pass max_wait_ms (or timeout) "
                                "for waits longer than that", 0) from e
                        self._enter_fallback(e)
                    except errors.Overloaded as e:
                        self._overloaded(e)  # kept reports and releases wait as well
                        self._broker_answered()  # refused, but an answer: not an outage
                        raise
                    except errors.BrokerRpcError:
                        self._broker_answered()  # an error, but an answer
                        raise
                    else:
                        self._broker_answered()
                        if not resp.granted:
                            raise NotGranted(resp.reason, resp.retry_after_ms, resp.buckets)
                        place = None
                        if fb is not None:
                            place = fb.granted(resp.permits or permits, holds_slot=resp.lease_ttl_ms > 0,
                                               route=route)
                        return Lease(self, resp, tenant=tenant, method=method, path=path,
                                     oauth_client=oauth_client or "", client_id=client_id,
                                     priority_class=priority_class or "", target=granted_by,
                                     place=place)
                left = started + fallback_wait_s - self._clock.monotonic()
                wait = fb.take(turn, within=left, needs_place=fb.needs_place(route))
                if wait is None:
                    continue  # no longer falling back: ask the broker
                if wait == 0:
                    return Lease(self, pb.AcquireResponse(granted=True, permits=permits), tenant=tenant,
                                 method=method, path=path, oauth_client=oauth_client or "",
                                 client_id=client_id, is_fallback=True, place=turn)
                if wait == math.inf:
                    cap = fb.max_in_flight
                    if cap is None:
                        continue  # no longer falling back
                    if left <= 0:
                        raise NotGranted(
                            f"quota-broker unreachable: local fallback limit of {cap} at once for "
                            f"routes that held slots ({fb.settings.fraction:g} x the most slot leases "
                            "the clients of these brokers held at once)",
                            int(math.ceil(max(fb.until_probe(), 1e-3) * 1000)),
                        )
                    # Until a lease ends, or the next probe of the broker is due.
                    fb.wait_for_place(min(left, fb.until_probe()))
                    continue
                if self._clock.monotonic() + wait > started + fallback_wait_s:
                    raise NotGranted(
                        f"quota-broker unreachable: local fallback limit of {fb.rate_per_min}/min",
                        int(math.ceil(fb.retry_after(wait) * 1000)),
                    )
                # Wait for the local permission, trying the broker again meanwhile.
                self._clock.sleep(min(wait, fb.until_probe()))
        finally:
            if fb is not None:
                fb.leave_line(turn)

    @contextlib.contextmanager
    def lease(self, tenant, method, path, *, client_id, oauth_client="",
              priority_class="", permits=1, max_wait_ms=None, timeout=None, renew=True):
        """Acquires on enter, renews the slots in the background, releases on exit.

        ``with broker.lease("demo", "POST", path, client_id="ingest-1") as lease:``
        make the upstream call, then ``lease.report(status, headers)``. The
        lease is released on exit, also when the block raises. While the
        broker is unreachable the lease is a fallback one (see ``acquire``,
        whose arguments these are, ``timeout`` included).
        """
        lease = self.acquire(tenant, method, path, client_id=client_id,
                             oauth_client=oauth_client, priority_class=priority_class,
                             permits=permits, max_wait_ms=max_wait_ms, timeout=timeout)
        renewer = None
        try:
            if renew and lease.holds_slot:
                renewer = _Renewer(lease)
                lease._renewer = renewer
                renewer.start()
            yield lease
        finally:
            if renewer is not None:
                renewer.stop()
            try:
                lease.release()
            except _UNREACHABLE as e:
                # The slot comes back by itself at expiry (the outage is logged once, elsewhere).
                log.debug("releasing lease %s failed: %s", lease.lease_id, e)
            except errors.QuotaBrokerError as e:
                # Do not mask the block's outcome.
                log.warning("releasing lease %s failed: %s", lease.lease_id, e)

    def release(self, lease_id, *, acquired_with=None):
        """Returns a lease's slots. Idempotent; True if this call returned slots.

        ``acquired_with``: the AcquireRequest that granted the lease, so that a
        broker restarted after a crash since frees its slots at once instead of
        counting them as held by an unknown lease for one lease TTL.
        """
        if not _check_str("lease_id", lease_id):
            # The broker takes an empty id as a probe and releases nothing.
            raise ValueError("lease_id is empty: give the lease_id of a lease this client was granted")
        req = pb.ReleaseRequest(lease_id=lease_id)
        if acquired_with is not None:
            req.acquired_with.CopyFrom(acquired_with)
        return self._call("Release", req).released

    def renew(self, lease_id, extend_ms=0, *, acquired_with=None):
        """Extends a lease's slots (0: the lease's default TTL). Returns RenewResponse.

        ``acquired_with``: the AcquireRequest that granted the lease, so that a
        broker restarted since adopts the lease instead of answering NotFound.
        """
        _check_str("lease_id", lease_id)
        _check_count("extend_ms", extend_ms, _UINT64_MAX)
        req = pb.RenewRequest(lease_id=lease_id, extend_ms=extend_ms)
        if acquired_with is not None:
            req.acquired_with.CopyFrom(acquired_with)
        return self._call("Renew", req)

    def report(self, tenant, method, path, status, headers=None, *, oauth_client="",
               lease_id="", retry_after_ms=None, concurrency_limited=False):
        """Tells the broker how an upstream call went. Returns ReportResponse.

        ``headers``: the raw response headers (mapping or pairs, names
        case-insensitive); Retry-After, inin-ratelimit-*, X-RateLimit-* and
        RateLimit* are sent, Retry-After also converted to ``retry_after_ms``
        unless given.

        While the broker is unreachable (and with a fallback) the outcome is
        kept, to be reported when it is back, and None is returned; a 429's
        Retry-After also holds the local fallback limiter. When the broker
        answers Overloaded (or did so less than its retry-after-ms ago) the
        outcome is kept too and reported in the background once that time
        has passed. Without a fallback both raise (Unavailable, Overloaded).
        """
        if self._channels_closed:
            raise errors.Closed()
        for name, value in (("tenant", tenant), ("method", method), ("path", path),
                            ("oauth_client", oauth_client or ""), ("lease_id", lease_id or "")):
            _check_str(name, value)
        _check_count("status", status, 999)
        picked = rate_limit_headers(_check_headers(headers))
        if retry_after_ms is None:
            retry_after_ms = _retry_after_ms(picked)
        else:
            _check_count("retry_after_ms", retry_after_ms, _UINT64_MAX)
        req = pb.ReportRequest(
            tenant=tenant,
            lease_id=lease_id or "",
            method=method.upper(),
            path=path,
            oauth_client=oauth_client or "",
            http_status=int(status),
            retry_after_ms=int(retry_after_ms),
            headers=picked,
            concurrency_limited=bool(concurrency_limited) and int(status) == 429,
            # Kept with the outcome: sent again after no answer, it counts
            # once even if the broker received the first.
            idempotency_key=uuid.uuid4().hex,
        )
        fb = self._fallback
        if fb is None:
            return self._call("Report", req)
        if fb.active and fb.should_try_broker():
            # A client that only reports finds the broker back too.
            self._probe_in_background()
        if not fb.active:
            if self._held():
                # Overloaded a moment ago: after the outcomes kept before it.
                fb.keep(req)
                self._start_flusher()
                return None
            try:
                return self._call("Report", req)
            except _UNREACHABLE as e:
                log.debug("report %s %s -> %s kept: %s", req.method, path, status, e)
                # The next calls fall back at once instead of each waiting
                # out its deadline on a broker that does not answer.
                self._enter_fallback(e)
            except errors.Overloaded as e:
                log.debug("report %s %s -> %s kept: %s", req.method, path, status, e)
                self._overloaded(e)
                fb.keep(req)
                self._start_flusher()
                return None
        if int(status) == 429:
            fb.throttled(int(retry_after_ms))
        fb.keep(req)
        self._await_broker()
        return None

    def watch(self, tenant="", *, timeout=None):
        """Streams QuotaStatus: a snapshot of every bucket, then each change.

        Returns a WatchStream (iterate it; ``cancel()`` or use ``with`` to
        stop). ``timeout`` bounds the whole stream (seconds; None: no bound).
        """
        if self._channels_closed:
            raise errors.Closed()
        _check_str("tenant", tenant)
        deadline = None if timeout is None else time.monotonic() + timeout
        opened_on = [self._conn]
        trail = _Trail(tenant)

        def open_stream(conn):
            opened_on[0] = conn
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            return conn.stub.Watch(pb.WatchRequest(tenant=tenant), timeout=left, metadata=self.metadata)

        def reopen(err, hop):
            # Follows the cluster like a unary call (leader named, else the next broker).
            trail.add(opened_on[0].target, err)
            conn = self._follow(opened_on[0], err, hop, trail)
            return None if conn is None else open_stream(conn)

        try:
            call = open_stream(self._conn)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e, opened_on[0].target) from None
        return WatchStream(call, reopen, lambda: opened_on[0].target)

    # -- operator plane ------------------------------------------------------

    def list_buckets(self, tenant=""):
        """Every bucket instance (QuotaStatus messages) the caller may see."""
        _check_str("tenant", tenant)
        return list(self._call("ListBuckets", pb.ListBucketsRequest(tenant=tenant), admin=True).buckets)

    def bucket(self, tenant, name, oauth_client=""):
        """The QuotaStatus of one bucket instance, or None."""
        for b in self.list_buckets(tenant):
            if b.bucket == name and b.oauth_client == oauth_client:
                return b
        return None
