"""The quota-broker client: QuotaBroker, Lease, WatchStream."""
import contextlib
import logging
import threading
import time
from urllib.parse import urlsplit

import grpc

from . import errors
from .errors import NotGranted, NotFound
from .headers import rate_limit_headers, retry_after_ms as _retry_after_ms
from .quota.v1 import broker_pb2 as pb
from .quota.v1 import broker_pb2_grpc as pb_grpc

log = logging.getLogger("quota_broker_client")

# Client-side deadline of a unary call, on top of the server-side wait.
_CALL_TIMEOUT_S = 10.0
# Wait the broker caps every Acquire to by default (`server.max_wait_ms`).
_SERVER_MAX_WAIT_MS = 60_000


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
    """

    def __init__(self, broker, response, *, tenant, method, path, oauth_client, client_id):
        self._broker = broker
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
        Returns the ReportResponse.
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
        """Extends the lease's slots; 0 means the lease's default TTL. Returns RenewResponse."""
        resp = self._broker.renew(self.lease_id, extend_ms)
        self.lease_ttl_ms = resp.lease_ttl_ms
        self.lease_expires_at_ms = resp.lease_expires_at_ms
        return resp

    def release(self):
        """Returns the slots (idempotent). True if this call returned slots."""
        if self.released:
            return False
        released = self._broker.release(self.lease_id)
        self.released = True
        return released

    def __repr__(self):
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
                # Transient (broker unreachable...): try again sooner.
                log.warning("renewing lease %s failed: %s", self.lease.lease_id, e)
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
    wait and used as is for the other unary calls.
    """

    def __init__(self, url, token=None, *, timeout=_CALL_TIMEOUT_S, credentials=None, options=None):
        target, secure = _target(url)
        if secure or credentials is not None:
            creds = credentials or grpc.ssl_channel_credentials()
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self.target = target
        self.timeout = timeout
        #: Call metadata (the bearer token), for calls on the raw stubs.
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        #: Raw generated stubs, for anything the wrapper does not cover.
        self.stub = pb_grpc.QuotaBrokerStub(self._channel)
        self.admin_stub = pb_grpc.QuotaAdminStub(self._channel)

    # -- lifecycle -----------------------------------------------------------

    def close(self):
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
        """Acquire returning the AcquireResponse as is (granted or not)."""
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
        """
        method = method.upper()
        resp = self.acquire_raw(tenant, method, path, client_id=client_id,
                                oauth_client=oauth_client, priority_class=priority_class,
                                permits=permits, max_wait_ms=max_wait_ms, timeout=timeout)
        if not resp.granted:
            raise NotGranted(resp.reason, resp.retry_after_ms, resp.buckets)
        return Lease(self, resp, tenant=tenant, method=method, path=path,
                     oauth_client=oauth_client or "", client_id=client_id)

    @contextlib.contextmanager
    def lease(self, tenant, method, path, *, client_id, oauth_client="",
              priority_class="", permits=1, max_wait_ms=None, renew=True):
        """Acquires on enter, renews the slots in the background, releases on exit.

        ``with broker.lease("demo", "POST", path, client_id="ingest-1") as lease:``
        make the upstream call, then ``lease.report(status, headers)``. The
        lease is released on exit, also when the block raises.
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
            except errors.QuotaBrokerError as e:
                # The slot comes back by itself at expiry; do not mask the block's outcome.
                log.warning("releasing lease %s failed: %s", lease.lease_id, e)

    def release(self, lease_id):
        """Returns a lease's slots. Idempotent; True if this call returned slots."""
        return self._call(self.stub.Release, pb.ReleaseRequest(lease_id=lease_id)).released

    def renew(self, lease_id, extend_ms=0):
        """Extends a lease's slots (0: the lease's default TTL). Returns RenewResponse."""
        return self._call(self.stub.Renew, pb.RenewRequest(lease_id=lease_id, extend_ms=int(extend_ms)))

    def report(self, tenant, method, path, status, headers=None, *, oauth_client="",
               lease_id="", retry_after_ms=None):
        """Tells the broker how an upstream call went. Returns ReportResponse.

        ``headers``: the raw response headers (mapping or pairs, names
        case-insensitive); Retry-After, inin-ratelimit-*, X-RateLimit-* and
        RateLimit* are sent, Retry-After also converted to ``retry_after_ms``
        unless given.
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
        return self._call(self.stub.Report, req)

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
