"""What a client keeps for later and how it is sent: the outcomes and
releases kept while the broker is unreachable or overloaded for this
caller, the background threads that probe the broker and send them once it
answers (after an Overloaded answer's retry-after-ms), the fallback's
state as QuotaBroker shows it, close(), and the one exit hook that sends
what the clients not closed kept.

QuotaBroker has these methods from ``_DeferredMixin``; the state they use
(``_fallback``, ``_deferred_releases``, ``_closed``...) is set by
``QuotaBroker.__init__``.
"""
import atexit
import collections
import logging
import threading
import time
import weakref

import grpc

from . import errors
from .connections import _UNREACHABLE, _may_have_reached_a_broker
from .fallback import all_shared
from .headers import aged_rate_limit_headers
from .quota.v1 import broker_pb2 as pb
from .timeouts import _CLOSE_FLUSH_TIMEOUT_S, _MIN_OVERLOAD_BACKOFF_S, _OVERLOAD_BACKOFF_S

log = logging.getLogger("quota_broker_client")


# Most characters of a broker's reason a warning shows.
_SHOWN_REASON_CHARS = 300


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


class _DeferredMixin:
    """QuotaBroker's kept outcomes and releases, its fallback's state, and its
    lifecycle (see the module's docstring)."""

    def _unreachable_hint(self, err):
        """What the fallback's warning adds for ``err``: what to check in the url, if anything."""
        return errors.unreachable_hint(err.details, self.tls) + self._port_hint

    def _enter_fallback(self, err):
        """No broker answered ``err``'s call: the shared fallback starts (its
        one warning says what happened and what to check in the url)."""
        self._fallback.enter(err, self._unreachable_hint(err), getattr(err, "what_happened", None))

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
