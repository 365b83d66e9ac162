"""The quota-broker client: QuotaBroker, Lease, WatchStream."""
import contextlib
import logging
import math
import threading
from urllib.parse import urlsplit

import grpc

from . import errors
from .errors import NotGranted, NotFound
from .fallback import FallbackSettings, LocalFallback, SystemClock
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
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"

#: Channel options set unless given: gRPC's default reconnect backoff grows
#: to 120 s while the broker is down, so a client would come back to it up
#: to two minutes late. Reconnect attempts here are at most 2 s apart (the
#: min value is gRPC's minimum connect timeout, not a wait).
DEFAULT_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 2000),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

# The broker did not answer: these errors mean fall back, not fail.
_UNREACHABLE = (errors.Unavailable, errors.DeadlineExceeded)


def _target(url):
    """Returns (target, secure) for "host:port", "http://host:port" or "https://host:port"."""
    if "://" not in url:
        return url, False
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "grpc", "grpcs"):
        raise ValueError(f"unsupported scheme in broker url {url!r} (use http:// or https://)")
    if not parts.netloc:
        raise ValueError(f"no host in broker url {url!r}")
    secure = parts.scheme in ("https", "grpcs")
    netloc = parts.netloc
    if parts.port is None:
        netloc = f"{netloc}:{443 if secure else 80}"
    return netloc, secure


class Lease:
    """A granted Acquire. Use ``report()`` after the upstream call, ``release()`` when done.

    Attributes mirror AcquireResponse (``lease_id``, ``permits``,
    ``lease_ttl_ms``, ``lease_expires_at_ms``, ``buckets``) plus the request's
    ``tenant``, ``method``, ``path``, ``oauth_client`` and ``client_id``.

    ``is_fallback``: the broker was unreachable and the local fallback
    limiter gave the permission (no lease id, no slot; ``report()`` keeps
    the outcome for the broker, ``release()`` and ``renew()`` do nothing).
    """

    def __init__(self, broker, response, *, tenant, method, path, oauth_client, client_id,
                 priority_class="", is_fallback=False):
        self._broker = broker
        self.is_fallback = is_fallback
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

    @property
    def holds_slot(self):
        """Whether the lease holds concurrency slots (which expire unless renewed)."""
        return self.lease_ttl_ms > 0

    def report(self, status, headers=None, *, retry_after_ms=None):
        """Reports the upstream's answer to this lease's call.

        ``headers`` are the raw response headers (any mapping or list of
        pairs); the rate-limit ones are picked out and Retry-After converted.
        Returns the ReportResponse, or None when the broker is unreachable
        (the outcome is kept and reported when it is back).
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

        With the broker unreachable (and a fallback) it returns False: the
        slots come back by themselves at their expiry.
        """
        if self.released:
            return False
        if self.is_fallback:
            self.released = True
            return False
        try:
            released = self._broker.release(self.lease_id)
        except _UNREACHABLE as e:
            if self._broker._fallback is None:
                raise
            # The broker is away; the slot comes back by itself at its expiry.
            log.debug("releasing lease %s failed: %s", self.lease_id, e)
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


class _Renewer(threading.Thread):
    """Renews a lease's slots at half their remaining TTL until stopped."""

    def __init__(self, lease):
        super().__init__(name=f"quota-lease-renew-{lease.lease_id}", daemon=True)
        self.lease = lease
        self._halt = threading.Event()
        self.renewals = 0
        self._warned = False

    def run(self):
        ttl_ms = self.lease.lease_ttl_ms
        while ttl_ms > 0:
            if self._halt.wait(max(ttl_ms / 2.0, 50) / 1000.0):
                return
            try:
                resp = self.lease.renew(0)
                self.renewals += 1
                ttl_ms = resp.lease_ttl_ms
            except NotFound as e:
                log.warning("lease %s can no longer be renewed: %s", self.lease.lease_id, e)
                return
            except errors.QuotaBrokerError as e:
                # Transient (broker unreachable...): try again sooner; say so once.
                (log.debug if self._warned else log.warning)(
                    "renewing lease %s failed: %s", self.lease.lease_id, e)
                self._warned = True
                ttl_ms = max(ttl_ms / 2.0, 100)

    def stop(self):
        self._halt.set()
        if self is not threading.current_thread():
            self.join(timeout=_CALL_TIMEOUT_S + 5)


class WatchStream:
    """Iterator over QuotaStatus messages of a Watch; ``cancel()`` (or ``with``) ends it."""

    def __init__(self, call):
        self._call = call
        self._cancelled = False

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._call)
        except grpc.RpcError as e:
            if self._cancelled or e.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise errors.from_rpc_error(e) from None

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

    ``url`` is "host:port", "http://host:port" (plaintext) or
    "https://host:port" (TLS with the system roots). ``token`` is sent as
    ``authorization: Bearer <token>`` on every call. ``timeout`` is the
    client-side deadline (seconds) added on top of an Acquire's server-side
    wait and used as is for the other unary calls. ``options`` are gRPC
    channel options, on top of :data:`DEFAULT_CHANNEL_OPTIONS` (reconnect
    backoff bounded to 2 s).

    ``fallback``: when the broker is unreachable (UNAVAILABLE, or no answer
    within the deadline), ``acquire``/``lease`` pace calls with a local
    limiter instead of failing (see :class:`FallbackSettings`: half the rate
    granted over the last minute, at least 6/min, never unlimited), try the
    broker again every second, keep the outcomes reported meanwhile and
    report them once it is back. ``fallback=None`` raises ``Unavailable``
    instead. ``clock``: an object with ``monotonic()`` and ``sleep(s)`` that
    the fallback reads time from (default: the real clock).
    """

    def __init__(self, url, token=None, *, timeout=_CALL_TIMEOUT_S, credentials=None, options=None,
                 fallback=FallbackSettings(), clock=None):
        target, secure = _target(url)
        channel_options = dict(DEFAULT_CHANNEL_OPTIONS)
        channel_options.update(dict(options or ()))
        channel_options = list(channel_options.items())
        if secure or credentials is not None:
            creds = credentials or grpc.ssl_channel_credentials()
            self._channel = grpc.secure_channel(target, creds, options=channel_options)
        else:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        self.target = target
        self.timeout = timeout
        #: Call metadata (the bearer token), for calls on the raw stubs.
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        #: Raw generated stubs, for anything the wrapper does not cover.
        self.stub = pb_grpc.QuotaBrokerStub(self._channel)
        self.admin_stub = pb_grpc.QuotaAdminStub(self._channel)
        # grpc.health.v1 Check with an empty HealthCheckRequest (service ""), as raw bytes.
        self._health_check = self._channel.unary_unary(_HEALTH_CHECK)
        self._clock = clock if clock is not None else SystemClock()
        if fallback is not None and not isinstance(fallback, FallbackSettings):
            raise TypeError(f"fallback must be a FallbackSettings or None, got {type(fallback).__name__}")
        self._fallback = LocalFallback(fallback, self._clock, target) if fallback is not None else None
        self._flush_lock = threading.Lock()
        self._flusher = None
        self._flusher_lock = threading.Lock()

    @property
    def channel(self):
        """The underlying ``grpc.Channel``."""
        return self._channel

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
    def pending_reports(self):
        """Outcomes kept while the broker was unreachable, not reported yet."""
        return self._fallback.pending if self._fallback is not None else 0

    @property
    def dropped_reports(self):
        """Outcomes dropped so far because more than ``buffer_size`` were waiting."""
        return self._fallback.dropped_total if self._fallback is not None else 0

    def _answers(self):
        """Whether the broker answers at all (any status but UNAVAILABLE / DEADLINE_EXCEEDED)."""
        try:
            self._health_check(b"", timeout=min(self.timeout, _PROBE_TIMEOUT_S), metadata=self.metadata)
        except grpc.RpcError as e:
            return e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        return True

    def _broker_answered(self):
        fb = self._fallback
        if fb is None:
            return
        fb.leave()
        if fb.pending:
            self._start_flusher()

    def _start_flusher(self):
        with self._flusher_lock:
            if self._flusher is not None and self._flusher.is_alive():
                return
            self._flusher = threading.Thread(target=self._flush_in_background,
                                             name="quota-broker-report-flush", daemon=True)
            self._flusher.start()

    def _flush_in_background(self):
        try:
            self.flush_reports()
        except Exception:  # pragma: no cover - a bug must not go unnoticed, nor kill a caller
            log.exception("reporting kept outcomes failed")

    def flush_reports(self, timeout=None):
        """Reports the outcomes kept while the broker was unreachable, oldest first.

        Done by itself in the background when the broker answers again;
        call it to do it now. Retry-After and rate-limit resets are aged by
        the time the outcome was kept (see
        :func:`~quota_broker_client.headers.aged_rate_limit_headers`). Stops
        at the first report the broker does not answer or answers
        RESOURCE_EXHAUSTED (the rest stay kept, and go at its next answer);
        one it refuses otherwise (e.g. a tenant no longer configured) is dropped.
        Returns how many were reported by this call.
        """
        fb = self._fallback
        if fb is None:
            return 0
        sent = refused = 0
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
                    self._call(self.stub.Report, aged, timeout)
                except _UNREACHABLE:
                    fb.put_back(item)
                    break
                except errors.BrokerRpcError as e:
                    fb.leave()  # it answers
                    if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        fb.put_back(item)  # over its request rate: the rest go later
                        break
                    refused += 1
                    log.debug("kept outcome %s %s -> %s refused: %s", req.method, req.path, req.http_status, e)
                    continue
                fb.leave()
                sent += 1
            dropped = fb.take_dropped()
        if sent or refused or dropped:
            log.info("reported %d outcomes kept while quota-broker at %s was unreachable "
                     "(%d refused by it; %d dropped, more than %d waiting; %d still kept)",
                     sent, self.target, refused, dropped, fb.settings.buffer_size, fb.pending)
        return sent

    # -- lifecycle -----------------------------------------------------------

    def close(self):
        """Reports kept outcomes if the broker answers (briefly), then closes the channel."""
        if self.pending_reports:
            self.flush_reports(timeout=min(self.timeout, _CLOSE_FLUSH_TIMEOUT_S))
            if self.pending_reports:
                log.warning("closing with %d outcomes kept for quota-broker at %s unreported "
                            "(it does not answer)", self.pending_reports, self.target)
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _call(self, fn, request, timeout=None):
        try:
            return fn(request, timeout=self.timeout if timeout is None else timeout,
                      metadata=self.metadata)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None

    # -- data plane ----------------------------------------------------------

    def acquire_raw(self, tenant, method, path, *, client_id, oauth_client="",
                    priority_class="", permits=1, max_wait_ms=None, timeout=None):
        """Acquire returning the AcquireResponse as is (granted or not); no fallback."""
        req = pb.AcquireRequest(
            tenant=tenant,
            client_id=client_id,
            priority_class=priority_class or "",
            method=method.upper(),
            path=path,
            oauth_client=oauth_client or "",
            permits=permits,
        )
        if max_wait_ms is not None:
            req.max_wait_ms = int(max_wait_ms)
        if timeout is None:
            wait_ms = _SERVER_MAX_WAIT_MS if max_wait_ms is None else min(int(max_wait_ms), _SERVER_MAX_WAIT_MS)
            timeout = wait_ms / 1000.0 + self.timeout
        return self._call(self.stub.Acquire, req, timeout)

    def acquire(self, tenant, method, path, *, client_id, oauth_client="",
                priority_class="", permits=1, max_wait_ms=None, timeout=None):
        """Asks for permission to make an upstream call.

        Returns a Lease; raises NotGranted (with ``reason`` and
        ``retry_after_ms``) when the broker says not now, and a BrokerRpcError
        subclass (InvalidArgument, NotFound, Unauthenticated...) on errors.
        ``max_wait_ms=None`` uses the priority class's default wait.

        When the broker is unreachable the permission comes from the local
        fallback limiter (``lease.is_fallback``), waiting for it as long as
        needed, or raising NotGranted when it is further away than an explicit
        ``max_wait_ms``; the broker is tried again meanwhile. Without a
        fallback (``fallback=None``) it raises Unavailable / DeadlineExceeded.
        An explicit ``timeout`` that runs out is DeadlineExceeded, not a fallback.
        """
        method = method.upper()
        fb = self._fallback
        started = self._clock.monotonic()
        while True:
            if fb is None or (fb.should_try_broker() and (not fb.active or self._answers())):
                try:
                    resp = self.acquire_raw(tenant, method, path, client_id=client_id,
                                            oauth_client=oauth_client, priority_class=priority_class,
                                            permits=permits, max_wait_ms=max_wait_ms, timeout=timeout)
                except _UNREACHABLE as e:
                    if fb is None or (timeout is not None and isinstance(e, errors.DeadlineExceeded)):
                        raise  # no fallback, or the caller's own deadline
                    fb.enter(e)
                except errors.BrokerRpcError:
                    self._broker_answered()  # an error, but an answer
                    raise
                else:
                    self._broker_answered()
                    if not resp.granted:
                        raise NotGranted(resp.reason, resp.retry_after_ms, resp.buckets)
                    if fb is not None:
                        fb.granted(resp.permits or permits)
                    return Lease(self, resp, tenant=tenant, method=method, path=path,
                                 oauth_client=oauth_client or "", client_id=client_id,
                                 priority_class=priority_class or "")
            wait = fb.take()
            if wait is None:
                continue  # no longer falling back: ask the broker
            if wait == 0:
                return Lease(self, pb.AcquireResponse(granted=True, permits=permits), tenant=tenant,
                             method=method, path=path, oauth_client=oauth_client or "",
                             client_id=client_id, is_fallback=True)
            if max_wait_ms is not None and self._clock.monotonic() + wait > started + max_wait_ms / 1000.0:
                raise NotGranted(
                    f"quota-broker unreachable: local fallback limit of {fb.rate_per_min}/min",
                    int(math.ceil(wait * 1000)),
                )
            # Wait for the local permission, trying the broker again meanwhile.
            self._clock.sleep(min(wait, fb.until_probe()))

    @contextlib.contextmanager
    def lease(self, tenant, method, path, *, client_id, oauth_client="",
              priority_class="", permits=1, max_wait_ms=None, renew=True):
        """Acquires on enter, renews the slots in the background, releases on exit.

        ``with broker.lease("demo", "POST", path, client_id="ingest-1") as lease:``
        make the upstream call, then ``lease.report(status, headers)``. The
        lease is released on exit, also when the block raises. While the
        broker is unreachable the lease is a fallback one (see ``acquire``).
        """
        lease = self.acquire(tenant, method, path, client_id=client_id,
                             oauth_client=oauth_client, priority_class=priority_class,
                             permits=permits, max_wait_ms=max_wait_ms)
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

    def release(self, lease_id):
        """Returns a lease's slots. Idempotent; True if this call returned slots."""
        return self._call(self.stub.Release, pb.ReleaseRequest(lease_id=lease_id)).released

    def renew(self, lease_id, extend_ms=0, *, acquired_with=None):
        """Extends a lease's slots (0: the lease's default TTL). Returns RenewResponse.

        ``acquired_with``: the AcquireRequest that granted the lease, so that a
        broker restarted since adopts the lease instead of answering NotFound.
        """
        req = pb.RenewRequest(lease_id=lease_id, extend_ms=int(extend_ms))
        if acquired_with is not None:
            req.acquired_with.CopyFrom(acquired_with)
        return self._call(self.stub.Renew, req)

    def report(self, tenant, method, path, status, headers=None, *, oauth_client="",
               lease_id="", retry_after_ms=None):
        """Tells the broker how an upstream call went. Returns ReportResponse.

        ``headers``: the raw response headers (mapping or pairs, names
        case-insensitive); Retry-After, inin-ratelimit-*, X-RateLimit-* and
        RateLimit* are sent, Retry-After also converted to ``retry_after_ms``
        unless given.

        While the broker is unreachable (and with a fallback) the outcome is
        kept, to be reported when it is back, and None is returned; a 429's
        Retry-After also holds the local fallback limiter.
        """
        picked = rate_limit_headers(headers)
        if retry_after_ms is None:
            retry_after_ms = _retry_after_ms(picked)
        req = pb.ReportRequest(
            tenant=tenant,
            lease_id=lease_id or "",
            method=method.upper(),
            path=path,
            oauth_client=oauth_client or "",
            http_status=int(status),
            retry_after_ms=int(retry_after_ms),
            headers=picked,
        )
        fb = self._fallback
        if fb is None:
            return self._call(self.stub.Report, req)
        if not fb.active:
            try:
                return self._call(self.stub.Report, req)
            except _UNREACHABLE as e:
                log.debug("report %s %s -> %s kept: %s", req.method, path, status, e)
        if int(status) == 429:
            fb.throttled(int(retry_after_ms))
        fb.keep(req)
        return None

    def watch(self, tenant="", *, timeout=None):
        """Streams QuotaStatus: a snapshot of every bucket, then each change.

        Returns a WatchStream (iterate it; ``cancel()`` or use ``with`` to
        stop). ``timeout`` bounds the whole stream (seconds; None: no bound).
        """
        try:
            call = self.stub.Watch(pb.WatchRequest(tenant=tenant), timeout=timeout,
                                   metadata=self.metadata)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None
        return WatchStream(call)

    # -- operator plane ------------------------------------------------------

    def list_buckets(self, tenant=""):
        """Every bucket instance (QuotaStatus messages) the caller may see."""
        return list(self._call(self.admin_stub.ListBuckets, pb.ListBucketsRequest(tenant=tenant)).buckets)

    def bucket(self, tenant, name, oauth_client=""):
        """The QuotaStatus of one bucket instance, or None."""
        for b in self.list_buckets(tenant):
            if b.bucket == name and b.oauth_client == oauth_client:
                return b
        return None
