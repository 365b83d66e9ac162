"""How long the client waits: the deadline of its calls, the timeouts of
the health probe and of close(), the backoff after an Overloaded answer,
and the gRPC channel options (reconnect backoff, keepalive pings) set on
every channel unless given.

(The broker's default cap on an Acquire's wait, ``_SERVER_MAX_WAIT_MS``,
is in ``client``, next to the Acquire that reads it.)
"""


# Client-side deadline of a unary call, on top of the server-side wait.
_CALL_TIMEOUT_S = 10.0
# Deadline of each Report sent by close() (the broker may be gone for good).
_CLOSE_FLUSH_TIMEOUT_S = 2.0
# While falling back, the broker is first asked for its health with this
# deadline (at most), so a broker that does not answer at all costs a probe
# this long, not an Acquire's wait plus the call timeout.
_PROBE_TIMEOUT_S = 2.0

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

# After an Overloaded answer without retry-after-ms, the kept reports and
# releases wait this long (the broker's request rates are per second).
_OVERLOAD_BACKOFF_S = 1.0
# ...and never less than this between two tries of the background sender.
_MIN_OVERLOAD_BACKOFF_S = 0.05
# How long a call made while falling back waits for the probe it started.
_PROBE_WAIT_S = 0.25
