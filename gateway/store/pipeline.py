"""A pipelined connection to one standalone Redis, for the request path.

Every request's store call is one command on a shared connection: commands from concurrent
requests are written together once per event-loop turn, and Redis answers in order, so each
reply resolves the oldest waiting call. No per-call pool checkout, no per-call lock: a call
costs one small write and one parsed reply. A call abandoned by its timeout keeps its place in
the queue and its late reply is dropped, so replies can never be handed to the wrong caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

import hiredis


def pack_command(*args: Any) -> bytes:
    """RESP-encode one command (hiredis does it in C)."""
    packed: bytes = hiredis.pack_command(args)
    return packed


_pack = pack_command
_ASKING = _pack("ASKING")
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class ConnectionLost(ConnectionError):
    pass


class ReplyError(Exception):
    """An error reply from Redis (e.g. NOSCRIPT, WRONGTYPE)."""


class _Protocol(asyncio.Protocol):
    """One TCP (or TLS) connection and the calls sent on it. Everything it does touches only
    its own transport and calls: a connection the owner already replaced (the watchdog closed
    it) can fail late without disturbing its successor."""

    def __init__(self, owner: PipelinedConnection) -> None:
        self._owner = owner
        self._reader = hiredis.Reader(replyError=ReplyError)
        self.transport: asyncio.Transport | None = None
        # Calls sent and not yet answered, oldest first, each with its deadline (loop time).
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.out: list[bytes] = []  # commands of this connection not yet written
        self.last_reply = 0.0  # loop time

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's TCP transport is no asyncio.Transport
        # subclass, though it has every method of one.
        self.transport = cast(asyncio.Transport, transport)
        # Kept: asyncio.get_running_loop() makes a getpid() syscall, and _send runs per request.
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self.waiting
        self.last_reply = self.loop.time()
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
        self._owner.lost(self, exc)

    def flush(self) -> None:
        out, self.out = self.out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def fail(self, exc: Exception | None) -> None:
        waiting, self.waiting = self.waiting, deque()
        self.out.clear()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(ConnectionLost(str(exc or "connection closed")))

    def abort(self) -> None:
        """Close now, with a reset: close() would keep the socket until a stalled peer read
        the unsent bytes (that is, for ever), and even abort() leaves the kernel holding them
        behind a FIN the peer never sees; SO_LINGER 0 makes the close an RST."""
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            self.transport.abort()
        self.fail(None)


class PipelinedConnection:
    """A connection to one Redis, (re)opened on demand; `call` is safe to use concurrently."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        connect_timeout: float = 1.0,
        call_timeout: float = 1.0,
        on_connect: Callable[[PipelinedConnection], Awaitable[None]] | None = None,
        resolve: Callable[[], Awaitable[tuple[str, int]]] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        # Sentinel: the master's address is asked for on every (re)connect, so a failover
        # is followed as soon as the old connection drops (or answers READONLY).
        self._resolve = resolve
        self._db = db
        self._username = username
        self._password = password
        self._tls = tls
        # The name the certificate must hold: the one given, else the host connected to (for
        # Sentinel, the master's address as the sentinels name it, at every connect).
        self._fixed_hostname = server_hostname
        self._server_hostname = server_hostname if server_hostname is not None else host
        self._connect_timeout = connect_timeout
        self.on_connect = on_connect  # run on every new connection, after AUTH/SELECT
        self._current: _Protocol | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._flush_scheduled = False
        # One watchdog timer for all calls instead of a timer per call: a call fails with
        # TimeoutError at most call_timeout / 4 after its deadline.
        self._call_timeout = call_timeout
        self._watchdog: asyncio.TimerHandle | None = None

    def _connected(self) -> _Protocol | None:
        current = self._current
        if current is None or current.transport is None or current.transport.is_closing():
            return None
        return current

    def call(
        self, *args: str | bytes | int | float, deadline: float | None = None
    ) -> Awaitable[Any]:
        """Send one command; await the result for its reply. Fails with TimeoutError once
        `deadline` (loop time; default now + call_timeout) passed, ConnectionLost, OSError or
        ReplyError. When connected it returns the reply's future itself (no coroutine)."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self._call_timeout
        return self.send(_pack(*args), deadline)

    def send(self, command: bytes, deadline: float) -> Awaitable[Any]:
        """`call` for a command RESP-encoded already (`pack_command`)."""
        current = self._current  # `_connected`, written out: once per request
        if current is None or current.transport is None or current.transport.is_closing():
            return self._connect_and_send(command, deadline)
        return self._send(current, command, deadline)

    def call_asking(
        self, *args: str | bytes | int | float, deadline: float | None = None
    ) -> Awaitable[Any]:
        """`ASKING`, then the command, in one write (Redis Cluster's ASK redirection: the
        node importing a slot serves a key of it only to a command that follows ASKING on the
        same connection). The result is the command's."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self._call_timeout
        return self._connect_and_send(_pack(*args), deadline, asking=True)

    async def _connect_and_send(self, command: bytes, deadline: float, asking: bool = False) -> Any:
        connection = self._connected()
        if connection is None:
            async with asyncio.timeout_at(deadline):
                connection = await self._connect()
        if asking:
            # Its reply (+OK) is nobody's; a failure of it shows in the command's own reply.
            ignored = self._send(connection, _ASKING, deadline)
            ignored.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await self._send(connection, command, deadline)

    def _send(self, connection: _Protocol, command: bytes, deadline: float) -> asyncio.Future[Any]:
        loop = connection.loop
        future: asyncio.Future[Any] = loop.create_future()
        connection.waiting.append((future, deadline))
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._call_timeout / 4, self._watch)
        connection.out.append(command)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._current is not None:
            self._current.flush()

    def _watch(self) -> None:
        self._watchdog = None
        current = self._current
        if current is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for future, deadline in current.waiting:
            if deadline <= now and not future.done():
                future.set_exception(TimeoutError())
        # Nothing heard for a whole timeout since the oldest call fell due: a half-open socket
        # would otherwise hold every later call hostage.
        waiting = current.waiting
        if waiting and now - max(current.last_reply, waiting[0][1]) > self._call_timeout:
            self._drop(current)
        if current.waiting:
            self._watchdog = loop.call_later(self._call_timeout / 4, self._watch)

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            # Every waiter may have given up (timeout, cancellation) before it fails: its
            # failure is theirs, never an "exception was never retrieved" at exit.
            self._connecting.add_done_callback(lambda done: done.cancelled() or done.exception())
        connecting = self._connecting
        try:
            await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None
        connection = self._connected()
        if connection is None:
            raise ConnectionLost("connection closed while opening")
        return connection

    @property
    def address(self) -> tuple[str, int]:
        """Where the connection goes (Sentinel: the master found at the last connect)."""
        return self._host, self._port

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            if self._resolve is not None:
                host, port = await self._resolve()
                self._host, self._port = host, int(port)
                if self._fixed_hostname is None:
                    self._server_hostname = host
            _, connection = await loop.create_connection(
                lambda: _Protocol(self),
                self._host,
                self._port,
                ssl=self._tls,
                server_hostname=self._server_hostname if self._tls else None,
            )
        if self._current is not None:
            self._drop(self._current)
        self._current = connection
        handshake = []
        deadline = loop.time() + self._connect_timeout
        if self._password is not None:
            credentials = (self._username, self._password) if self._username else (self._password,)
            handshake.append(self._send(connection, _pack("AUTH", *credentials), deadline))
        if self._db:
            handshake.append(self._send(connection, _pack("SELECT", self._db), deadline))
        try:
            if handshake:
                await asyncio.gather(*handshake)
            if self.on_connect is not None:
                async with asyncio.timeout_at(deadline):
                    await self.on_connect(self)
        except BaseException:
            self._drop(connection)
            raise

    def lost(self, connection: _Protocol, exc: Exception | None) -> None:
        """`connection` is gone: fail its own calls; forget it only if it is still ours."""
        connection.fail(exc)
        if self._current is connection:
            self._current = None

    def _drop(self, connection: _Protocol) -> None:
        connection.abort()
        if self._current is connection:
            self._current = None

    def close(self) -> None:
        if self._current is not None:
            self._drop(self._current)
