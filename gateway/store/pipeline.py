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
import math
import socket
import ssl
import struct
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from time import monotonic
from typing import Any, cast

import hiredis


def pack_command(*args: Any) -> bytes:
    """RESP-encode one command (hiredis does it in C)."""
    packed: bytes = hiredis.pack_command(args)
    return packed


_pack = pack_command
Address = tuple[str, int]
_ASKING = _pack("ASKING")
_TIME = _pack("TIME")
_ROLE = _pack("ROLE")
EMPTY_BULK = b"$0\r\n\r\n"  # the empty bulk string: '' for a script


class ServerTime:
    """A moment on this process's monotonic clock (the event loop's), as an argument of
    `PipelinedConnection.call`: sent as the same moment on the Redis server's clock (seconds,
    a literal), or as '' while the connection knows no offset to it (`ServerClock`)."""

    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at


class _Deadline:
    """`PipelinedConnection.call`'s argument for the call's own deadline, on the server's
    clock (as ServerTime): a script told it does nothing once Redis's TIME is past it."""


DEADLINE: Any = _Deadline()


class ServerClock:
    """Where one Redis server's clock stands against ours: `offset` = its TIME minus our
    monotonic clock, None until a reply told it. Each sample is a lower bound (the server read
    its clock before the reply came in), so the estimate is the largest sample of the current
    and the previous window (WINDOW seconds each): a moment sent as the server's is then never
    later than ours, by at most how late the best recent reply came in. A clock step of the
    server forward is followed at the next reply; one backward within two windows.

    What it is for: a call Redis runs late (a stalled or slow server, a full socket buffer)
    must not act on a time the caller gave up on. check_and_touch.lua does nothing past its
    call's deadline; record_activity.lua stamps activity at the flush's moment, not at TIME."""

    WINDOW = 10.0

    __slots__ = ("_current", "_previous", "_window_ends", "offset")

    def __init__(self) -> None:
        self.offset: float | None = None
        self._current = -math.inf
        self._previous = -math.inf
        self._window_ends = -math.inf

    def sample(self, server_now: float) -> None:
        """A reply carrying the server's TIME (seconds) has just come in (once per request:
        its common case, no better bound inside the window, is two comparisons)."""
        local = monotonic()
        value = server_now - local
        if value > self._current or local >= self._window_ends:
            self._update(local, value)

    def _update(self, local: float, value: float) -> None:
        if local >= self._window_ends:
            # A gap of more than a window leaves nothing recent to keep.
            fresh = local - self._window_ends < self.WINDOW
            self._previous = self._current if fresh else -math.inf
            self._current = -math.inf
            self._window_ends = local + self.WINDOW
        if value > self._current:
            self._current = value
        self.offset = max(self._current, self._previous)

    def literal(self, at: float) -> bytes:
        """`at` (our monotonic clock) on the server's, to the microsecond; b"" if unknown."""
        offset = self.offset
        return b"" if offset is None else b"%.6f" % (at + offset)


_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class ConnectionLost(ConnectionError):
    pass


class ReplyError(Exception):
    """An error reply from Redis (e.g. NOSCRIPT, WRONGTYPE)."""


class NotMaster(ConnectionLost):
    """The node a sentinel named answered ROLE with another role (a replica, a sentinel)."""


def role_name(reply: Any) -> str:
    """ROLE's first element (master, slave, sentinel), or what else the reply was."""
    if isinstance(reply, list | tuple) and reply:
        first = reply[0]
        return first.decode(errors="replace") if isinstance(first, bytes) else str(first)
    return f"an unexpected ROLE reply ({type(reply).__name__})"


def brief(exc: BaseException) -> str:
    """A connection failure in a few words: the system's reason where there is one (redis-py
    wraps it in a sentence repeating the address), else the error's own text."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return "no answer in time"
    cause = exc.__cause__ or exc.__context__
    for error in (exc, cause):
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


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
        resolve: Callable[[], Awaitable[Address] | AsyncGenerator[Address, None]] | None = None,
        on_master: Callable[[Address], None] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        # Sentinel: the master's address (or the addresses the sentinels name, best first,
        # as an async generator) is asked for on every (re)connect, so a failover is followed
        # as soon as the old connection drops (or answers READONLY). Each is checked with
        # ROLE after the handshake; one that is no master is left for the next
        # (`on_master`: told the one that is).
        self._resolve = resolve
        self._on_master = on_master
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
        # The server's clock (for DEADLINE and ServerTime arguments): kept across reconnects
        # to the same address (a retry on a fresh connection to a stalled server still sends
        # its deadline), learnt anew for another (a failover's new master).
        self.clock = ServerClock()
        self._clock_of: tuple[str, int] | None = None
        self._deadline_step = -1  # `send_until`'s last deadline, in 10 ms steps, and its bulk
        self._deadline_bulk = EMPTY_BULK

    def _connected(self) -> _Protocol | None:
        current = self._current
        if current is None or current.transport is None or current.transport.is_closing():
            return None
        return current

    def call(self, *args: Any, deadline: float | None = None) -> Awaitable[Any]:
        """Send one command; await the result for its reply. Fails with TimeoutError once
        `deadline` (loop time; default now + call_timeout) passed, ConnectionLost, OSError or
        ReplyError. When connected it returns the reply's future itself (no coroutine).
        A ServerTime or DEADLINE argument is sent on the server's clock (`ServerClock`),
        resolved once connected."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self._call_timeout
        if self._connected() is None:
            return self._connect_and_send(args, deadline)
        return self.send(self._packed(args, deadline), deadline)

    def _packed(self, args: tuple[Any, ...], deadline: float) -> bytes:
        clock = self.clock
        return _pack(
            *(
                clock.literal(deadline)
                if arg is DEADLINE
                else clock.literal(arg.at)
                if isinstance(arg, ServerTime)
                else arg
                for arg in args
            )
        )

    def send(self, command: bytes, deadline: float) -> Awaitable[Any]:
        """`call` for a command RESP-encoded already (`pack_command`)."""
        current = self._current  # `_connected`, written out: once per request
        if current is None or current.transport is None or current.transport.is_closing():
            return self._connect_and_send(command, deadline)
        return self._send(current, command, deadline)

    def send_until(self, command: bytes, deadline: float) -> Awaitable[Any]:
        """`send` for a command RESP-encoded but for its last argument, DEADLINE: the call's
        deadline on the server's clock, rounded up to 10 ms (so that the requests of one turn
        share one encoding; the watchdog's own slack is call_timeout / 4)."""
        current = self._current
        if current is None or current.transport is None or current.transport.is_closing():
            return self._connect_and_send(command, deadline, until=True)
        offset = self.clock.offset  # `_deadline_of`, written out: once per request
        if offset is None:
            return self._send(current, command + EMPTY_BULK, deadline)
        step = math.ceil((deadline + offset) * 100)
        if step != self._deadline_step:
            self._encode_deadline(step)
        return self._send(current, command + self._deadline_bulk, deadline)

    def _deadline_of(self, deadline: float) -> bytes:
        offset = self.clock.offset
        if offset is None:
            return EMPTY_BULK
        step = math.ceil((deadline + offset) * 100)
        if step != self._deadline_step:
            self._encode_deadline(step)
        return self._deadline_bulk

    def _encode_deadline(self, step: int) -> None:
        literal = b"%d.%02d" % divmod(step, 100)
        self._deadline_bulk = b"$%d\r\n%s\r\n" % (len(literal), literal)
        self._deadline_step = step

    def call_asking(self, *args: Any, deadline: float | None = None) -> Awaitable[Any]:
        """`ASKING`, then the command, in one write (Redis Cluster's ASK redirection: the
        node importing a slot serves a key of it only to a command that follows ASKING on the
        same connection). The result is the command's."""
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self._call_timeout
        return self._connect_and_send(args, deadline, asking=True)

    async def _connect_and_send(
        self,
        command: bytes | tuple[Any, ...],
        deadline: float,
        asking: bool = False,
        until: bool = False,
    ) -> Any:
        """The command (packed, or its arguments: packed once connected, on that server's
        clock) on the connection, opened first if need be."""
        connection = self._connected()
        if connection is None:
            async with asyncio.timeout_at(deadline):
                connection = await self._connect()
        if isinstance(command, tuple):
            command = self._packed(command, deadline)
        elif until:
            command += self._deadline_of(deadline)
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
        connect_by = loop.time() + self._connect_timeout  # resolving and connecting
        if self._resolve is None:
            await self._open_at(self._host, self._port, connect_by, check_role=False)
            return
        found = self._resolve()
        if not isinstance(found, AsyncGenerator):
            async with asyncio.timeout_at(connect_by):
                host, port = await found
            await self._open_at(str(host), int(port), connect_by, check_role=True)
            if self._on_master is not None:
                self._on_master((str(host), int(port)))
            return
        refused: list[str] = []
        try:
            while True:
                async with asyncio.timeout_at(connect_by):
                    try:
                        host, port = await anext(found)
                    except StopAsyncIteration:
                        break
                try:
                    await self._open_at(str(host), int(port), connect_by, check_role=True)
                except (OSError, TimeoutError, ReplyError) as exc:
                    refused.append(f"{host}:{port}: {brief(exc)}")
                    continue
                if self._on_master is not None:
                    self._on_master((str(host), int(port)))
                return
        finally:
            await found.aclose()
        raise ConnectionLost(
            f"no master at the address(es) the sentinels name ({'; '.join(refused)})"
        )

    async def _open_at(self, host: str, port: int, connect_by: float, *, check_role: bool) -> None:
        """Connect to host:port (by `connect_by`, loop time), then AUTH, SELECT and (with
        `check_role`) ROLE, which must answer master, then `on_connect`."""
        loop = asyncio.get_running_loop()
        self._host, self._port = host, port
        if self._fixed_hostname is None:
            self._server_hostname = host
        async with asyncio.timeout_at(connect_by):
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
        role = self._send(connection, _ROLE, deadline) if check_role else None
        if role is not None:  # awaited after the handshake: never an unretrieved failure
            role.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._learn_clock(connection, loop.time() + self._call_timeout)  # after AUTH
        try:
            if handshake:
                await asyncio.gather(*handshake)
            if role is not None:
                try:
                    answer = await role
                except ReplyError:  # ROLE refused (an ACL): cannot check; READONLY would tell
                    answer = [b"master"]
                name = role_name(answer)
                if name != "master":
                    raise NotMaster(f"{name}, not the master")
            if self.on_connect is not None:
                async with asyncio.timeout_at(deadline):
                    await self.on_connect(self)
        except BaseException:
            self._drop(connection)
            raise

    def _learn_clock(self, connection: _Protocol, deadline: float) -> None:
        """The server's clock, from a TIME sent first, not waited for. On a new server (a new
        address) the calls sent before its reply (one round trip) go without a time on that
        clock, as do all while an ACL forbids TIME, until a script's reply tells it
        (check_and_touch.lua answers its)."""
        clock = self.clock
        if self._clock_of != (self._host, self._port):
            clock = self.clock = ServerClock()
            self._clock_of = (self._host, self._port)
            self._deadline_step = -1

        def learnt(reply: asyncio.Future[Any]) -> None:
            if reply.cancelled() or reply.exception() is not None:
                return
            answer = reply.result()
            if isinstance(answer, list) and len(answer) == 2:
                with contextlib.suppress(ValueError, TypeError):
                    clock.sample(int(answer[0]) + int(answer[1]) / 1e6)

        self._send(connection, _TIME, deadline).add_done_callback(learnt)

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
