"""The token deadlines of open exchanges: exp, max_session_age and revocation, checked while the
exchange lasts rather than once at its start.

Every relayed WebSocket and every response on a `stream_deadline` route registers a `Watched`
with the process's one `Deadlines`. Its ticker checks all of them every `TICK` seconds against
the injected clock: a plain loop of comparisons and in-memory revocation lookups, no I/O and no
task or timer per exchange. Revocations come from the `RevocationList`, which every instance
refreshes every `store.revocation_poll`, so a revocation cuts open exchanges at every replica
within `revocation_poll + TICK` (0.5 s with the defaults). exp and max_session_age are met
within `TICK` of the moment a request would be refused for them (the same leeway applies).

A `Watched` can also ask to be woken at a clock time (`wake_at`): WebSockets use it for their
idle checks and coalesced activity writes (`websocket.py`), so those follow the injected clock too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from gateway import metrics
from gateway.clock import Clock
from gateway.config import Policy
from gateway.reasons import Reason, Refusal

if TYPE_CHECKING:  # types only: forwarding does not import the token and revocation steps
    from gateway.revocation import RevocationList
    from gateway.tokens.claims import VerifiedToken

log = logging.getLogger("idlegate.deadlines")

TICK = 0.25
# How long a cut response's last whole chunk gets to reach the client before its connection
# is reset (a client that reads nothing would hold it open for ever).
CUT_FLUSH = 1.0
# Set on a response by the modules here: extra fields for its access-log line.
LOG_FIELDS: web.ResponseKey[dict[str, object]] = web.ResponseKey("idlegate.log", dict)


def reset(transport: asyncio.Transport) -> None:
    """End a connection now with a TCP reset: unsent bytes are dropped, and the peer sees an
    error, never the clean end a FIN would be (asyncio's `abort()` alone closes the socket,
    which sends a FIN behind the bytes still queued in the kernel). A no-op once lost."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class Watched:
    """One open exchange's token deadlines; `cut` is called once, with the first one met."""

    __slots__ = ("_on_cut", "_on_wake", "expires_at", "reason", "token", "too_old_after", "wake_at")

    def __init__(
        self,
        token: VerifiedToken,
        policy: Policy,
        on_cut: Callable[[Reason], None],
        on_wake: Callable[[], None] | None,
    ) -> None:
        self.token = token
        # The same instants at which a request with this token is refused (tokens.verify and
        # tokens.policy.check_session_age): exp is refused from exp + leeway on...
        self.expires_at = token.exp + policy.leeway
        # ...and a session once strictly more than max_session_age + leeway old.
        self.too_old_after: float | None = None
        if policy.max_session_age is not None and token.auth_time is not None:
            self.too_old_after = token.auth_time + policy.max_session_age + policy.leeway
        self.wake_at: float | None = None
        self.reason: Reason | None = None
        self._on_cut = on_cut
        self._on_wake = on_wake

    def due(self, now: float, revocations: RevocationList) -> Reason | None:
        if revocations.is_revoked(self.token):
            return Reason.REVOKED
        if now >= self.expires_at:
            return Reason.EXPIRED
        if self.too_old_after is not None and now > self.too_old_after:
            return Reason.SESSION_TOO_OLD
        return None

    def cut(self, reason: Reason) -> None:
        if self.reason is None:
            self.reason = reason
            self._on_cut(reason)

    def wake(self) -> None:
        self.wake_at = None
        if self._on_wake is not None:
            self._on_wake()


class Deadlines:
    """The process's watcher of open exchanges (one ticker task for all of them)."""

    def __init__(
        self, clock: Clock, revocations: RevocationList, policy: Policy, tick: float = TICK
    ) -> None:
        self._clock = clock
        self._revocations = revocations
        self._policy = policy
        self._tick = tick
        self._open: set[Watched] = set()
        self._task: asyncio.Task[None] | None = None

    def watch(
        self,
        token: VerifiedToken,
        on_cut: Callable[[Reason], None],
        on_wake: Callable[[], None] | None = None,
    ) -> Watched:
        watched = Watched(token, self._policy, on_cut, on_wake)
        self._open.add(watched)
        return watched

    def forget(self, watched: Watched) -> None:
        self._open.discard(watched)

    def __len__(self) -> int:
        return len(self._open)

    def check(self) -> None:
        """One pass over every open exchange: cut those past a deadline, wake those due."""
        now = self._clock.now()
        for watched in tuple(self._open):
            if watched.reason is not None:
                continue
            reason = watched.due(now, self._revocations)
            if reason is not None:
                watched.cut(reason)
            elif watched.wake_at is not None and now >= watched.wake_at:
                watched.wake()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            try:
                self.check()
            except Exception:
                log.exception("checking the deadlines of open exchanges failed")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="exchange-deadlines")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def stream(
        self,
        request: web.BaseRequest,
        token: VerifiedToken,
        route: str,
        forwarding: Awaitable[web.StreamResponse],
    ) -> web.StreamResponse:
        """Forward (`forwarding`: the whole relay, headers and body) until it ends or the
        token meets a deadline, whichever comes first.

        Cut before anything reached the client (a long poll still waiting for its upstream),
        the client gets the refusal a new request would get (e.g. 401 expired). Cut later,
        the relay stops after the last chunk it wrote whole and the connection is closed
        without the response's end (no terminating chunk; fewer bytes than Content-Length):
        the client sees an incomplete response, never a complete-looking one it could mistake
        for the whole stream or file. An SSE client reconnects and is refused.
        """
        loop = asyncio.get_running_loop()
        scope = asyncio.timeout(None)
        entered = False

        def cut(_reason: Reason) -> None:
            if entered:
                scope.reschedule(loop.time())  # cancels the relay now, in its own task

        watched = self.watch(token, cut)
        try:
            async with scope:
                entered = True
                return await forwarding
        except TimeoutError:
            if watched.reason is None or not scope.expired():
                raise
        finally:
            entered = False
            self.forget(watched)
        reason = watched.reason
        metrics.STREAM_CUTS.labels(route, reason.code).inc()
        log.info("response cut at a token deadline: %s (jti=%s)", reason.code, token.jti)
        writer = request.writer
        if writer.output_size == 0 and getattr(writer, "_headers_buf", None) is None:
            raise Refusal(reason, f"{reason.message} (while the response was pending)")
        transport = request.transport
        if transport is not None:
            if writer.length is None and not getattr(writer, "chunked", False):
                # Neither chunked nor sized (an HTTP/1.0 client: the body ends with the
                # connection): a clean close would be the body's normal end. A reset is not.
                reset(transport)
            else:
                # close(), not abort(): what was written whole (the last complete chunk)
                # still goes out, then the connection ends before the response does...
                transport.close()
                # ...unless the client reads nothing: then it is reset, never held open.
                loop.call_later(CUT_FLUSH, reset, transport)
        # Never written (the transport is closing); for the access log and the request count.
        placeholder = web.Response(status=200)
        fields: dict[str, object] = {"cut": reason.code}
        placeholder[LOG_FIELDS] = fields
        return placeholder
