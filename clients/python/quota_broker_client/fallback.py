"""The local fallback used while the broker cannot be reached.

The rule is the Rust client's (``clients/rust/src/fallback.rs``), with the
same defaults: calls are paced by a local limiter at ``fraction`` (0.5) of
the permits this client was granted over the last minute, never below
``floor_per_min`` (6 a minute, also the rate when nothing was granted yet)
and never unlimited; burst 1, so the first call goes at once and the next
ones one interval (60 s / rate) apart, to the calls waiting for them in
arrival order (:meth:`LocalFallback.take`). While falling back, the broker is
tried again (the call's own Acquire) at most every ``probe_every_s`` (1 s),
also while a call waits for the local limiter, and the client goes back to
the broker as soon as it answers.

A client whose broker leases held concurrency slots (a nonzero TTL) in the
minute before the outage also runs at most ceil(``fraction`` x the most such
leases it held at once in that minute), at least 1, calls at once while
falling back, counting its slot leases still held and its fallback leases
until each is released (or garbage-collected). A call beyond that waits in
the same line until one ends, or is told NotGranted once its wait runs out.
A client that held no slot lease in that minute is not capped. Only the
calls that may need a slot count and are capped: a route (tenant, method,
path; ids in the path taken as one) whose last grant by the broker held no
slot (rate buckets only) is paced by the rate alone, and holds no place;
a route the broker has not granted yet is taken to need one.

As in the Rust client, a 429 reported while falling back holds the local
limiter until its Retry-After, and the outcomes of calls made while falling
back are kept (at most ``buffer_size``, the oldest dropped and counted) and
reported to the broker once it is back.

One LocalFallback serves every client of the same brokers in a process
(:func:`shared`): clients made per request or per job pace together and
log an outage once, as one long-lived client would.

Every time read here comes from a clock object (``monotonic()`` and
``sleep(seconds)``), :class:`SystemClock` unless one is injected, so the
limiter can be driven by a fake clock in tests. A call waiting for a place
under the cap waits with the clock's ``wait(condition, seconds)`` (held,
notified when a lease ends) if it has one, else with ``sleep(seconds)``
(a lease that ended meanwhile is seen after it).
"""
import collections
import dataclasses
import logging
import math
import re
import threading
import time

log = logging.getLogger("quota_broker_client")

#: How far back grants count towards the fallback rate (the Rust client's minute).
GRANT_WINDOW_S = 60.0
#: A fallback entered again this soon after it was left (a broker that
#: answers its probe but not the calls: a cluster without a leader) goes
#: on where it was: the same pacing, logged once.
REENTRY_S = 60.0
#: How many routes' "held a slot when last granted" are remembered (the
#: least recently granted forgotten first).
ROUTES_REMEMBERED = 4096

# A path segment that is an id (a UUID, a number): routes differ by their
# other segments, so /api/v2/users/<id> is one route whatever the id.
_ID_SEGMENT = re.compile(r"^(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                         r"[0-9a-fA-F]{12}|[0-9]+)$")


def route_key(tenant, method, path):
    """What the fallback remembers a route's slot by: tenant, method, and the
    path with its ids (UUIDs, numbers) and query taken out."""
    path = path.split("?", 1)[0]
    shape = "/".join("{id}" if _ID_SEGMENT.match(seg) else seg for seg in path.split("/"))
    return tenant, method.upper(), shape


@dataclasses.dataclass(frozen=True)
class FallbackSettings:
    """How the client behaves while the broker is unreachable (defaults: the Rust client's)."""

    #: Share of the rate granted over the last minute to run at.
    fraction: float = 0.5
    #: Lowest fallback rate, per minute; also the rate if nothing was granted yet.
    floor_per_min: int = 6
    #: How often to try the broker again while falling back (seconds).
    probe_every_s: float = 1.0
    #: How many outcomes of fallback calls are kept for the broker; past it
    #: the oldest are dropped (and counted).
    buffer_size: int = 1000

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if int(self.floor_per_min) < 1:
            raise ValueError(f"floor_per_min must be at least 1 (never unlimited, never stopped), "
                             f"got {self.floor_per_min!r}")
        if not self.probe_every_s > 0:
            raise ValueError(f"probe_every_s must be > 0, got {self.probe_every_s!r}")
        if int(self.buffer_size) < 0:
            raise ValueError(f"buffer_size must be >= 0, got {self.buffer_size!r}")

    def rate_per_min(self, granted_last_minute):
        """The fallback rate for a client granted ``granted_last_minute`` permits in the last minute."""
        return max(int(max(granted_last_minute * self.fraction, float(self.floor_per_min))), 1)


class SystemClock:
    """The real clock: ``time.monotonic`` and ``time.sleep``."""

    @staticmethod
    def monotonic():
        return time.monotonic()

    @staticmethod
    def sleep(seconds):
        time.sleep(seconds)

    @staticmethod
    def wait(condition, seconds):
        condition.wait(seconds)


#: The real clock every client without a ``clock=`` reads (one object: the
#: clients of the same brokers share their fallback, see :func:`shared`).
SYSTEM_CLOCK = SystemClock()


class LocalFallback:
    """State of the fallback: grant history, the local limiter, probes, buffered outcomes.

    Thread-safe. ``target`` only names the broker in log lines.
    """

    def __init__(self, settings, clock, target=""):
        self.settings = settings
        self.clock = clock
        self.target = target
        # Reentrant: a lease collected by the garbage collector ends its place
        # (``ended``) in whichever thread the collector runs, maybe one in here.
        self._lock = threading.RLock()
        # Notified when a lease ends and when the fallback is left.
        self._freed = threading.Condition(self._lock)
        self._grants = collections.deque()  # (time, permits) of the last minute
        self._granted = 0  # sum of permits in _grants
        # The places held now: one per broker lease holding slots, one per
        # fallback lease taken under a cap by a call that may need a slot
        # (see granted, take, ended).
        self._holding = set()
        # route_key -> whether the broker's last grant for it held a slot:
        # a rate-only route is not capped while falling back (needs_place).
        self._slot_routes = collections.OrderedDict()
        # (time, places held) at grants of slot leases in the last minute,
        # the held counts decreasing: the front is the minute's most.
        self._slot_peaks = collections.deque()
        self._cap = None  # calls at once while falling back (None: no cap)
        # While falling back (rate is None otherwise):
        self._rate = None
        self._interval = 0.0
        self._tat = 0.0  # earliest time the local limiter allows the next call
        self._held_until = 0.0  # an upstream Retry-After reported while falling back
        self._last_probe = 0.0
        self._entered_at = 0.0
        self._calls = 0
        self._left_at = None  # when the last fallback was left
        self._quiet = False  # this fallback goes on one left a moment ago: not logged again
        self._served_since_left = False  # the broker granted a call since the last fallback
        self._said_unserved = False  # this outage's "answers the probe, not the calls" was logged
        # The calls waiting for a local permission, in arrival order (their
        # tickets): only the first may take one, of those that can go now
        # (a call waiting for a place under the cap does not hold up the
        # rate-only calls behind it while every place is held).
        self._line = collections.deque()
        self._place_waiters = set()  # the tickets in _line of calls that need a place
        # Outcomes to report: (observed at, ReportRequest), oldest first.
        self._buffer = collections.deque()
        self._dropped_total = 0
        self._dropped_unflushed = 0
        self._warned_full = False
        self._said_closing = False  # a client closed with outcomes kept: said once an outage

    # -- state ---------------------------------------------------------------

    @property
    def active(self):
        return self._rate is not None

    @property
    def rate_per_min(self):
        """The local limiter's rate while falling back, else None."""
        return self._rate

    @property
    def max_in_flight(self):
        """While falling back, the most calls at once (slot leases and fallback
        leases), or None: not falling back, or no slot lease in the minute before."""
        with self._lock:
            return self._cap if self._rate is not None else None

    @property
    def pending(self):
        return len(self._buffer)

    @property
    def dropped_total(self):
        return self._dropped_total

    def _trim(self, now):
        while self._grants and now - self._grants[0][0] > GRANT_WINDOW_S:
            self._granted -= self._grants.popleft()[1]
        while self._slot_peaks and now - self._slot_peaks[0][0] > GRANT_WINDOW_S:
            self._slot_peaks.popleft()

    def granted(self, permits, holds_slot=False, route=None):
        """The broker granted ``permits``: they count towards the fallback rate for a minute.

        ``holds_slot``: the lease holds concurrency slots. It then holds a
        place, returned, until ``ended(place)``; the places held at once
        count towards the fallback's cap for a minute. ``route``: the
        call's ``route_key``; whether it held a slot is remembered (see
        ``needs_place``)."""
        now = self.clock.monotonic()
        with self._lock:
            self._grants.append((now, max(int(permits), 1)))
            self._granted += max(int(permits), 1)
            self._served_since_left = True
            if route is not None:
                self._slot_routes[route] = bool(holds_slot)
                self._slot_routes.move_to_end(route)
                while len(self._slot_routes) > ROUTES_REMEMBERED:
                    self._slot_routes.popitem(last=False)
            place = None
            if holds_slot:
                place = object()
                self._holding.add(place)
                held = len(self._holding)
                while self._slot_peaks and self._slot_peaks[-1][1] <= held:
                    self._slot_peaks.pop()
                self._slot_peaks.append((now, held))
            self._trim(now)
            return place

    def needs_place(self, route):
        """Whether a call of ``route`` (a ``route_key``) counts towards the cap
        while falling back: unless the broker's last grant for it held no
        slot (rate buckets only). A route not granted yet may need one."""
        with self._lock:
            return self._slot_routes.get(route, True)

    def ended(self, place):
        """The lease holding ``place`` ended (released, or gone): a call waiting for one may go."""
        with self._lock:
            if place in self._holding:
                self._holding.discard(place)
                self._freed.notify_all()

    def should_try_broker(self):
        """Whether to ask the broker: always, unless falling back and the last probe was too recent."""
        with self._lock:
            if self._rate is None:
                return True
            now = self.clock.monotonic()
            if now >= self._last_probe + self.settings.probe_every_s:
                self._last_probe = now
                return True
            return False

    def enter(self, error, hint="", what=None):
        """The broker did not answer: start the local limiter (logged once per outage).

        ``hint``: what to check if the url may be mistaken (appended to the warning).
        ``what``: what happened, when it is more than "unreachable" (a broker
        that sends the tenant's callers to a leader that does not answer)."""
        now = self.clock.monotonic()
        with self._lock:
            if self._rate is not None:
                return
            self._trim(now)
            recent = self._granted
            self._rate = self.settings.rate_per_min(recent)
            self._interval = 60.0 / self._rate
            # A permit the last fallback paced out stays paced: leaving and
            # entering again must not hand out a call at once each time.
            self._tat = max(self._tat, now)
            self._last_probe = now
            # Quiet only if nothing was granted between: the broker answered
            # the probe but not the calls. A new outage after real service
            # is said again.
            self._quiet = (self._left_at is not None and now - self._left_at < REENTRY_S
                           and not self._served_since_left)
            # A quiet entry goes on with the cap it left, as with the pacing.
            peak = self._slot_peaks[0][1] if self._slot_peaks else 0
            if not self._quiet:
                self._cap = max(math.ceil(peak * self.settings.fraction), 1) if peak else None
                self._entered_at = now
                self._calls = 0
                self._warned_full = False
                self._said_unserved = False
            rate, cap = self._rate, self._cap
            say_unserved = self._quiet and not self._said_unserved
            self._said_unserved = self._said_unserved or self._quiet
        if say_unserved:
            # The "answers again" just logged was its health check only.
            log.warning(
                "quota-broker at %s answers its health check but not the calls (%s); pacing "
                "calls with the local limiter again at %d/min (a cluster answers so while no "
                "broker leads the tenant yet)",
                self.target, error, rate,
            )
            return
        if self._quiet:
            log.debug("quota-broker at %s unreachable again (%s); still pacing at %d/min",
                      self.target, error, rate)
            return
        at_once = (f", at most {cap} at once for routes that held slots ({self.settings.fraction:.2f}"
                   f" x {peak} slot leases held at once in the last minute)" if cap is not None else "")
        said = (f"quota-broker: {what}{hint}" if what else
                f"quota-broker at {self.target} unreachable ({error}{hint})")
        log.warning(
            "%s; pacing calls with a local limiter at %d/min "
            "(%.2f x %d granted in the last minute, floor %d/min)%s and trying it again every %gs; "
            "outcomes are kept (at most %d) and reported when it is back; leases held are renewed "
            "on in the background",
            said, rate, self.settings.fraction, recent,
            self.settings.floor_per_min, at_once, self.settings.probe_every_s,
            self.settings.buffer_size,
        )

    def leave(self):
        """The broker answered: stop the local limiter (logged once). True if it was falling back."""
        with self._lock:
            if self._rate is None:
                return False
            now = self.clock.monotonic()
            elapsed = now - self._entered_at
            calls, pending, dropped = self._calls, len(self._buffer), self._dropped_unflushed
            self._rate = None
            self._left_at = now
            self._served_since_left = False
            self._said_closing = False
            quiet = self._quiet
            self._freed.notify_all()  # the calls waiting for a place ask the broker
        if quiet:
            log.debug("quota-broker at %s answers again", self.target)
            return True
        log.info(
            "quota-broker at %s answers again after %.1fs; leaving the local fallback limiter "
            "(%d calls made under it; %d outcomes to report, %d dropped)",
            self.target, elapsed, calls, pending, dropped,
        )
        return True

    def take(self, ticket=None, within=None, needs_place=True):
        """One call's permission from the local limiter, in arrival order.

        None: not falling back (ask the broker); 0.0: taken; ``math.inf``:
        the cap's places are all held (wait for one, ``wait_for_place``);
        else the seconds until the call's turn (as if each call ahead of it
        takes its own at its turn). A multi-permit call counts as one: the
        fallback rate is a trickle, not an account of the budget.

        ``ticket``: any object, the same on each try of one call. A call
        that has to wait joins the line with it, unless its turn is
        further than ``within`` seconds away (or, all places held, it will
        not wait at all); only the first in line is given the permission,
        so a later call never overtakes an earlier one. Call
        ``leave_line(ticket)`` when the call stops waiting. Without a
        ticket a call is served only when nobody waits. Taken under a cap
        by a call that ``needs_place`` (see ``needs_place()``), the call
        holds a place, the ticket, until ``ended(ticket)``; a call that
        does not is paced by the rate alone.
        """
        with self._lock:
            if self._rate is None:
                self._leave_line(ticket)
                return None
            now = self.clock.monotonic()
            full = self._cap is not None and len(self._holding) >= self._cap
            queued = ticket is not None and ticket in self._line
            # The calls ahead that may go now: while every place is held,
            # those waiting for one do not hold up the others.
            ahead = 0
            for other in self._line:
                if other is ticket:
                    break
                if not (full and other in self._place_waiters):
                    ahead += 1
            capped = needs_place and self._cap is not None
            if capped and full:
                wait, fits = math.inf, within is None or within > 0
            elif ahead == 0 and now >= self._tat:
                if queued:
                    self._leave_line(ticket)
                # Burst 1: a quiet spell does not save up calls.
                self._tat = max(self._tat, now) + self._interval
                self._calls += 1
                if capped:
                    self._holding.add(ticket)
                return 0.0
            else:
                wait = max(max(self._tat - now, 0.0) + ahead * self._interval, 1e-3)
                fits = within is None or wait <= within
            if ticket is not None and not queued and fits:
                self._line.append(ticket)
                if needs_place:
                    self._place_waiters.add(ticket)
            return wait

    def wait_for_place(self, seconds):
        """Waits at most ``seconds`` while the cap's places are all held; returns
        early when a lease ends or the fallback is left."""
        with self._lock:
            if seconds <= 0 or self._rate is None or self._cap is None \
                    or len(self._holding) < self._cap:
                return
            wait = getattr(self.clock, "wait", None)
            if wait is not None:
                wait(self._freed, seconds)
                return
            self._lock.release()
            try:
                self.clock.sleep(seconds)
            finally:
                self._lock.acquire()

    def leave_line(self, ticket):
        """The call holding ``ticket`` no longer waits for a local permission."""
        with self._lock:
            self._leave_line(ticket)

    def _leave_line(self, ticket):
        self._place_waiters.discard(ticket)
        try:
            self._line.remove(ticket)
        except ValueError:
            pass

    def until_probe(self):
        """Seconds until the next probe of the broker is due (0 when due or not falling back)."""
        with self._lock:
            if self._rate is None:
                return 0.0
            return max(self._last_probe + self.settings.probe_every_s - self.clock.monotonic(), 0.0)

    def throttled(self, retry_after_ms):
        """A 429 while falling back: no local permission before its Retry-After."""
        if retry_after_ms <= 0:
            return
        with self._lock:
            if self._rate is not None:
                until = self.clock.monotonic() + retry_after_ms / 1000.0
                self._tat = max(self._tat, until)
                self._held_until = max(self._held_until, until)

    def retry_after(self, wait):
        """When a caller that will not wait ``wait`` seconds may try again: the
        upstream's Retry-After while it holds, else the next probe of the broker
        (it may be back by then: a hand-over takes well under a second) if that
        comes first."""
        with self._lock:
            if self.clock.monotonic() < self._held_until:
                return wait
        return min(wait, max(self.until_probe(), 1e-3))

    # -- buffered outcomes -----------------------------------------------------

    def keep(self, request):
        """Keeps a ReportRequest the broker could not be sent, oldest dropped past the bound."""
        now = self.clock.monotonic()
        warn = False
        with self._lock:
            if self.settings.buffer_size <= 0:
                self._dropped_total += 1
                self._dropped_unflushed += 1
                return
            if len(self._buffer) >= self.settings.buffer_size:
                self._buffer.popleft()
                self._dropped_total += 1
                self._dropped_unflushed += 1
                warn, self._warned_full = not self._warned_full, True
            self._buffer.append((now, request))
        if warn:
            log.warning("quota-broker fallback: %d outcomes waiting to be reported; dropping the oldest",
                        self.settings.buffer_size)

    def pop_oldest(self):
        """(age in seconds, ReportRequest, kept at) of the oldest kept outcome, or None."""
        with self._lock:
            if not self._buffer:
                return None
            at, request = self._buffer.popleft()
            return self.clock.monotonic() - at, request, at

    def put_back(self, item):
        """Returns an item from ``pop_oldest`` to the front (it could not be sent)."""
        _, request, at = item
        with self._lock:
            if len(self._buffer) >= self.settings.buffer_size:
                # Newer outcomes filled the buffer meanwhile; this one is the oldest.
                self._dropped_total += 1
                self._dropped_unflushed += 1
                return
            self._buffer.appendleft((at, request))

    def say_closing(self):
        """Whether a client closed with outcomes kept here says so as a warning:
        the first one of an outage (clients made per job each close with them)."""
        with self._lock:
            said, self._said_closing = self._said_closing, True
            return not said

    def take_dropped(self):
        """Outcomes dropped since the last call (for the flush's log line)."""
        with self._lock:
            n, self._dropped_unflushed = self._dropped_unflushed, 0
            return n


# The fallbacks of this process, by what identifies the budget they pace.
# Process-wide on purpose: a QuotaBroker made per request or per job must
# not start each outage afresh (a call at once each, a warning each), so
# every client of the same brokers finds the same pacing, grant history,
# cap and kept outcomes here. Kept for the life of the process (one per
# set of brokers and settings a process uses): a new client made after the
# last one was closed goes on where it left off.
_SHARED = {}
_SHARED_LOCK = threading.Lock()


def shared(settings, clock, targets, tls):
    """The LocalFallback of the brokers ``targets`` (their order aside) over
    TLS or not, with ``settings``, on ``clock``: one per process, shared by
    every client made so."""
    # The clock by identity (the entry holds it, so its id stays its own).
    key = (tuple(sorted(targets)), bool(tls), settings, id(clock))
    with _SHARED_LOCK:
        fb = _SHARED.get(key)
        if fb is None:
            fb = _SHARED[key] = LocalFallback(settings, clock, ", ".join(targets))
        return fb


def all_shared():
    """Every shared fallback of the process."""
    with _SHARED_LOCK:
        return list(_SHARED.values())


def forget_shared():
    """Forgets the shared fallbacks: the next client starts as in a new
    process (for tests, each of which plays a process of its own)."""
    with _SHARED_LOCK:
        _SHARED.clear()
