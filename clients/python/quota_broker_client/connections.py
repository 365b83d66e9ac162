"""The client's connections to its brokers, and how a call finds one that
answers: a channel and stubs per broker address, following a cluster's
leader (``x-quota-broker-leader``) or moving on to the next configured
broker, an address found not to be a quota-broker's gRPC port (passed over
for ``RECHECK_NOT_A_BROKER_S``), the health probe, and what an error says
about whether a broker answered or may have read the call.

QuotaBroker has these methods from ``_ConnectionsMixin``; the state they
use (``_conns``, ``_conn``, ``targets``...) is set by ``QuotaBroker.__init__``.
"""
import logging
import socket
import time

import grpc

from . import errors
from .quota.v1 import broker_pb2_grpc as pb_grpc
from .timeouts import _PROBE_TIMEOUT_S
from .urls import _target

log = logging.getLogger("quota_broker_client")


#: A health answer of NOT_SERVING (HealthCheckResponse.status = 2), as
#: written on the wire.
_NOT_SERVING = b"\x08\x02"
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"

# The broker did not answer: these errors mean fall back, not fail.
_UNREACHABLE = (errors.Unavailable, errors.DeadlineExceeded)


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


#: Response metadata in which a broker of a cluster that does not lead the
#: call's tenant names the leader's URL (with an UNAVAILABLE status).
LEADER_METADATA_KEY = "x-quota-broker-leader"


def _leader_of(err):
    """The leader URL of an UNAVAILABLE answer's ``x-quota-broker-leader`` metadata, or None."""
    value = errors._metadata_value(err, LEADER_METADATA_KEY)
    return (value.strip() or None) if value is not None else None


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


class _ConnectionsMixin:
    """QuotaBroker's connections and calls (see the module's docstring)."""

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

    # -- calls ---------------------------------------------------------------

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
