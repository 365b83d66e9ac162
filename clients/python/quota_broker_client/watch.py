"""The stream of a Watch (``WatchStream``): the QuotaStatus messages a
broker sends, opened again on another broker (a cluster's leader, the next
configured one) when the first answers UNAVAILABLE before any message.
"""
import grpc

from . import errors


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
