"""A granted Acquire (``Lease``: report, renew, release) and the thread that
renews a lease's slots in the background while it is held.

A lease calls back into the QuotaBroker that granted it (``_broker``) to
report, renew and release, and to keep a release for later while the
broker is away or overloaded.
"""
import logging
import threading
import time
import weakref

import grpc

from . import errors
from .connections import _UNREACHABLE, _may_have_reached_a_broker
from .errors import NotFound
from .quota.v1 import broker_pb2 as pb
from .timeouts import _CALL_TIMEOUT_S, _MIN_OVERLOAD_BACKOFF_S, _OVERLOAD_BACKOFF_S

log = logging.getLogger("quota_broker_client")


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
