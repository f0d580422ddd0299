"""A pipelined connection to one standalone Redis, for the request path.

Every request's store call is one command on a shared connection: commands from concurrent
requests are written together once per event-loop turn, and Redis answers in order, so each
reply resolves the oldest waiting call. No per-call pool checkout, no per-call lock: a call
costs one small write and one parsed reply. A call abandoned by its timeout keeps its place in
the queue and its late reply is dropped, so replies can never be handed to the wrong caller.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable
from typing import Any

import hiredis


def _pack(*args: Any) -> bytes:
    """RESP-encode one command (hiredis does it in C)."""
    packed: bytes = hiredis.pack_command(args)
    return packed


class ConnectionLost(ConnectionError):
    pass


class ReplyError(Exception):
    """An error reply from Redis (e.g. NOSCRIPT, WRONGTYPE)."""


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: PipelinedConnection) -> None:
        self._owner = owner
        self._reader = hiredis.Reader(replyError=ReplyError)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self._owner.waiting
        self._owner.last_reply = asyncio.get_running_loop().time()
        while (reply := self._reader.gets()) is not False:
            if not waiting:
                break  # a reply nobody waits for: the connection is out of step
            future, _ = waiting.popleft()
            if future.done():
                continue  # its caller gave up (timeout); the reply is dropped
            if isinstance(reply, ReplyError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.lost(exc)


class PipelinedConnection:
    """One TCP (or TLS) connection, (re)opened on demand; `call` is safe to use concurrently."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        connect_timeout: float = 1.0,
        call_timeout: float = 1.0,
    ) -> None:
        self._host = host
        self._port = port
        self._db = db
        self._username = username
        self._password = password
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._transport: asyncio.Transport | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        # Calls sent and not yet answered, oldest first, each with its deadline (loop time). One
        # watchdog timer for all of them instead of a timer per call: a call fails with
        # TimeoutError at most call_timeout / 4 after its deadline.
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._call_timeout = call_timeout
        self._watchdog: asyncio.TimerHandle | None = None
        self.last_reply = 0.0  # loop time

    def call(
        self, *args: str | bytes | int | float, deadline: float | None = None
    ) -> Awaitable[Any]:
        """Send one command; await the result for its reply. Fails with TimeoutError once
        `deadline` (loop time; default now + call_timeout) passed, ConnectionLost, OSError or
        ReplyError. When connected it returns the reply's future itself (no coroutine)."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self._call_timeout
        if self._transport is None or self._transport.is_closing():
            return self._connect_and_send(_pack(*args), deadline)
        return self._send(_pack(*args), deadline)

    async def _connect_and_send(self, command: bytes, deadline: float) -> Any:
        async with asyncio.timeout_at(deadline):
            await self._connect()
        return await self._send(command, deadline)

    def _send(self, command: bytes, deadline: float) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.waiting.append((future, deadline))
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._call_timeout / 4, self._watch)
        self._out.append(command)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(out))

    def _watch(self) -> None:
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for future, deadline in self.waiting:
            if deadline <= now and not future.done():
                future.set_exception(TimeoutError())
        # Nothing heard for a whole timeout since the oldest call fell due: a half-open socket
        # would otherwise hold every later call hostage.
        if self.waiting and now - max(self.last_reply, self.waiting[0][1]) > self._call_timeout:
            self.close()
        if self.waiting:
            self._watchdog = loop.call_later(self._call_timeout / 4, self._watch)

    async def _connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            transport, _ = await loop.create_connection(
                lambda: _Protocol(self),
                self._host,
                self._port,
                ssl=self._tls,
                server_hostname=self._host if self._tls else None,
            )
        self._transport = transport
        self._out.clear()
        handshake = []
        deadline = loop.time() + self._connect_timeout
        if self._password is not None:
            credentials = (self._username, self._password) if self._username else (self._password,)
            handshake.append(self._send(_pack("AUTH", *credentials), deadline))
        if self._db:
            handshake.append(self._send(_pack("SELECT", self._db), deadline))
        if handshake:
            try:
                await asyncio.gather(*handshake)
            except BaseException:
                self.close()
                raise

    def lost(self, exc: Exception | None) -> None:
        self._transport = None
        waiting, self.waiting = self.waiting, deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(ConnectionLost(str(exc or "connection closed")))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self.lost(None)
