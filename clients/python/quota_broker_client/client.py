"""The quota-broker client: QuotaBroker, Lease, WatchStream.

This module holds QuotaBroker itself (its settings, its data plane:
acquire, lease, release, renew, report, watch, and its operator plane) and
``says_concurrency``. The rest is in modules of its own (the package
exports the public names):

- ``timeouts``: call deadlines, probe and close timeouts, the overload
  backoff, ``DEFAULT_CHANNEL_OPTIONS``;
- ``urls``: what a broker url means (BadUrl), the no-port hint;
- ``arguments``: checks of the callers' arguments and of the token;
- ``connections``: a channel per broker, following a cluster, the health
  probe, addresses that are not a broker (QuotaBroker's
  ``_ConnectionsMixin``);
- ``deferred``: outcomes and releases kept for later, the background
  sender and prober, close() and the exit hook (``_DeferredMixin``);
- ``leases``: ``Lease`` and the thread that renews it;
- ``watch``: ``WatchStream``.
"""
import collections
import contextlib
import logging
import math
import threading
import time
import uuid

import grpc

from . import errors
from .errors import NotGranted
from .fallback import SYSTEM_CLOCK, FallbackSettings, route_key, shared as _shared_fallback
from .tls import channel_credentials
from .headers import rate_limit_headers, retry_after_ms as _retry_after_ms
from .quota.v1 import broker_pb2 as pb
from .timeouts import DEFAULT_CHANNEL_OPTIONS, _CALL_TIMEOUT_S, _PROBE_WAIT_S
from .urls import _no_port_hint, _shown, _split_urls, _target
from .arguments import (
    _UINT32_MAX, _UINT64_MAX, _check_acquire_timeout, _check_count, _check_headers, _check_str,
    _check_token,
)
from .connections import (
    _UNREACHABLE, _ConnectionsMixin, _Trail, _may_have_reached_a_broker,
)
from .deferred import _LIVE, _DeferredMixin
from .leases import Lease, _Renewer
from .watch import WatchStream

log = logging.getLogger("quota_broker_client")


# Wait the broker caps every Acquire to by default (`server.max_wait_ms`).
# Defined here, where acquire() and _acquire_at() read it: a test lowers it
# on this module (monkeypatch.setattr(qb.client, "_SERVER_MAX_WAIT_MS", ...)).
_SERVER_MAX_WAIT_MS = 60_000


def says_concurrency(body):
    """Whether a 429's body (bytes or text) says the refusal is about
    concurrent requests ("concurrent", "concurrency"), to report it with
    ``concurrency_limited=True``."""
    if body is None:
        return False
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", "replace")
    return "concurren" in str(body).lower()


class QuotaBroker(_ConnectionsMixin, _DeferredMixin):
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
