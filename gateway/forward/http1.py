"""A lean HTTP/1.1 client for bodyless requests to http:// upstreams: the common case.

aiohttp's `ClientSession` costs more CPU per request than the rest of the gateway together
(bench/RESULTS.md); most of it is generality a proxy does not need (cookies, redirects,
auth, tracing, URL building). This client only sends a request head without a body and reads
one response, over a keep-alive pool of plain TCP connections per upstream origin. Requests
with a body, and https upstreams, go through aiohttp (`forward/aiohttp_transport.py`).

Responses are parsed strictly (RFC 9112): anything malformed or ambiguous is an
`UpstreamBroken` (a 502 for the client), and a connection whose framing is in any doubt is
never reused, so a bad upstream cannot make one response bleed into another.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import socket
from collections.abc import AsyncGenerator, AsyncIterable
from typing import Final, cast

from multidict import CIMultiDict
from yarl import URL

from gateway.forward.transport import (
    CHUNK,
    SMALL_BODY,
    UpstreamBroken,
    UpstreamConnectTimeout,
    UpstreamTimeout,
    UpstreamUnreachable,
)

MAX_HEAD: Final = 64 * 1024  # status line and header lines together
MAX_HEADERS: Final = 200
_HIGH_WATER: Final = 256 * 1024  # stop reading from the upstream while this much is unread
_MAX_INTERIM: Final = 8  # 1xx responses before the final one
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# RFC 9110 §9.3: a bodyless request with these methods still declares its (empty) body.
_DECLARE_EMPTY_BODY: Final = frozenset({"POST", "PUT", "PATCH"})

# RFC 9112 §4 and §5 in one pattern: the status line, then field lines of a token, a colon and
# visible characters, SP or HTAB (obs-text allowed); no bare CR or LF, no NUL or other control,
# no whitespace before the colon, no obs-fold (a line starting with whitespace).
_VCHARS = r"[\t\x20-\x7e\x80-\U0010ffff]"
_HEAD = re.compile(
    r"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: (" + _VCHARS + r"*))?\r\n"
    r"((?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:" + _VCHARS + r"*\r\n)*)"
)
_DIGITS = re.compile(r"[0-9]{1,18}")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?")


class _Connection(asyncio.Protocol):
    """One keep-alive connection; the request task reads its buffer (pull parsing)."""

    __slots__ = (
        "_paused",
        "_pool",
        "_waiter",
        "answered",
        "buffer",
        "busy",
        "closed",
        "counted",
        "reusable",
        "reused",
        "transport",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False  # EOF or connection lost: no more bytes will come
        self.reusable = True  # False once a response's framing rules out another request
        self.reused = False  # taken from the pool (it may have been closed meanwhile)
        self.answered = False  # bytes arrived since the current request was sent
        self.busy = False  # a request was sent and its response is not read to its end
        self.counted = False  # holds one of the pool's `limit` slots
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # uvloop does it too; asyncio may not
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            # Bytes nobody asked for, on an idle connection: whatever they are, they must never
            # be read as the answer to the next request sent on it.
            self.close()
            return
        self.buffer += data
        self.answered = True
        if len(self.buffer) > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        self._pool._lost(self)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, read_timeout: float) -> None:
        """Until more bytes arrive or the connection ends; `UpstreamTimeout` after
        `read_timeout` seconds of silence."""
        if self.closed:
            raise UpstreamBroken("the upstream closed the connection")
        if self._paused and len(self.buffer) < _HIGH_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(read_timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout())


class UpstreamResponse:
    """Status and headers of a response; `body` when it was small enough to be read whole,
    else `chunks()` yields it (and must be drained or `close()`d)."""

    __slots__ = ("_conn", "_framing", "_left", "_pool", "body", "headers", "reason", "status")

    def __init__(
        self,
        pool: UpstreamPool,
        conn: _Connection,
        status: int,
        reason: str,
        headers: CIMultiDict[str],
    ) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body: bytes | None = None
        self._framing = "none"  # none | length | chunked | eof
        self._left = 0

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body as it arrives (de-chunked); the connection goes back to the pool once
        the body has been read to its end."""
        conn = self._conn
        if conn is None:
            return
        pool = self._pool
        try:
            if self._framing == "length":
                while self._left:
                    if not conn.buffer:
                        if conn.closed:
                            raise UpstreamBroken("the response body broke off")
                        await conn.wait(pool.read_timeout)
                        continue
                    piece = bytes(conn.buffer[: min(self._left, CHUNK)])
                    del conn.buffer[: len(piece)]
                    self._left -= len(piece)
                    yield piece
            elif self._framing == "chunked":
                async for piece in _dechunk(conn, pool.read_timeout):
                    yield piece
            elif self._framing == "eof":
                while True:
                    if conn.buffer:
                        piece = bytes(conn.buffer[:CHUNK])
                        del conn.buffer[: len(piece)]
                        yield piece
                    elif conn.closed:
                        break
                    else:
                        await conn.wait(pool.read_timeout)
        except BaseException:
            self.close()
            raise
        self._conn = None
        pool._release(conn)

    def close(self) -> None:
        """Abandon the response: its connection is closed, never reused."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


async def _dechunk(conn: _Connection, read_timeout: float) -> AsyncGenerator[bytes, None]:
    """RFC 9112 §7.1 chunked transfer coding; extensions ignored, trailers discarded."""
    buffer = conn.buffer
    while True:
        end = buffer.find(b"\r\n")
        while end < 0:
            if len(buffer) > 4096:
                raise UpstreamBroken("a chunk size line is too long")
            await conn.wait(read_timeout)
            end = buffer.find(b"\r\n")
        match = _CHUNK_SIZE.fullmatch(buffer, 0, end)
        if match is None:
            raise UpstreamBroken("invalid chunk size")
        size = int(match.group(1), 16)
        del buffer[: end + 2]
        if size == 0:
            break
        while size:
            if not buffer:
                await conn.wait(read_timeout)
                continue
            piece = bytes(buffer[: min(size, CHUNK)])
            del buffer[: len(piece)]
            size -= len(piece)
            yield piece
        while len(buffer) < 2:
            await conn.wait(read_timeout)
        if buffer[:2] != b"\r\n":
            raise UpstreamBroken("a chunk is longer than its size")
        del buffer[:2]
    # Trailer section: header lines up to an empty line; not relayed (nor are aiohttp's).
    trailer_bytes = 0
    while True:
        end = buffer.find(b"\r\n")
        while end < 0:
            if len(buffer) + trailer_bytes > MAX_HEAD:
                raise UpstreamBroken("the trailer section is too large")
            await conn.wait(read_timeout)
            end = buffer.find(b"\r\n")
        trailer_bytes += end + 2
        if trailer_bytes > MAX_HEAD:
            raise UpstreamBroken("the trailer section is too large")
        del buffer[: end + 2]
        if end == 0:
            return


def _parse_head(head: str) -> tuple[int, int, str, list[tuple[str, str]]]:
    """(minor version, status, reason, headers) of a response head without its final CRLF
    CRLF; `UpstreamBroken` for anything RFC 9112 does not allow (obs-fold included)."""
    parsed = _HEAD.fullmatch(head + "\r\n")
    if parsed is None:
        raise UpstreamBroken("malformed response head")
    lines = parsed.group(4).split("\r\n")
    lines.pop()  # after the last CRLF
    if len(lines) > MAX_HEADERS:
        raise UpstreamBroken("too many response headers")
    fields = []
    for line in lines:
        name, _, value = line.partition(":")
        fields.append((name, value.strip(" \t")))
    return int(parsed.group(1)), int(parsed.group(2)), parsed.group(3) or "", fields


def _content_length(values: list[str]) -> int:
    """RFC 9110 §8.6: repeated or comma-listed values must all be the same number."""
    found = {part.strip(" \t") for value in values for part in value.split(",")}
    if len(found) != 1:
        raise UpstreamBroken("conflicting Content-Length values")
    (text,) = found
    if not _DIGITS.fullmatch(text):
        raise UpstreamBroken("invalid Content-Length")
    return int(text)


def _connection_tokens(headers: CIMultiDict[str]) -> set[str]:
    return {
        token.strip(" \t").lower()
        for value in headers.getall("Connection", ())
        for token in value.split(",")
    }


class UpstreamPool:
    """Keep-alive connections to one upstream origin (`host`, `port`), at most `limit` open.

    Idle connections are reused newest first and closed after `keepalive_timeout` seconds.
    """

    def __init__(
        self,
        host: str,
        port: int,
        host_header: str,
        *,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        keepalive_timeout: float = 30.0,
    ) -> None:
        self._host = host
        self._port = port
        self._host_line = f"Host: {host_header}\r\n"
        self._limit = limit
        self._connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._keepalive_timeout = keepalive_timeout
        self._idle: collections.deque[tuple[_Connection, float]] = collections.deque()
        self._open = 0  # connections open or being opened
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | None = None,
    ) -> UpstreamResponse:
        """Send a bodyless request and read the response head (and a small body whole).

        A request on a reused connection that the upstream had already closed is sent again
        once on a fresh connection, for idempotent methods only (RFC 9110 §9.2.2).
        """
        if body is not None:
            raise ValueError("the lean pool sends bodyless requests only")
        head = self._request_head(method, target, headers)
        conn = await self._acquire()
        try:
            return await self._exchange(conn, method, head)
        except UpstreamBroken:
            conn.close()
            if not (conn.reused and not conn.answered and method in IDEMPOTENT):
                raise
        except BaseException:
            conn.close()
            raise
        # The upstream had closed a pooled connection without answering: once more, afresh.
        conn = await self._acquire(fresh=True)
        try:
            return await self._exchange(conn, method, head)
        except BaseException:
            conn.close()
            raise

    @classmethod
    def for_url(
        cls,
        url: URL,
        *,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        keepalive_timeout: float = 30.0,
    ) -> UpstreamPool:
        """A pool for an http:// URL's origin; `Host` as aiohttp writes it (no default port,
        IPv6 in brackets, IDNA)."""
        assert url.raw_host is not None and url.port is not None
        return cls(
            url.raw_host,
            url.port,
            url.host_port_subcomponent or url.raw_host,
            limit=limit,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            keepalive_timeout=keepalive_timeout,
        )

    def _request_head(self, method: str, target: str, headers: CIMultiDict[str]) -> bytes:
        lines = [f"{method} {target} HTTP/1.1\r\n", self._host_line]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"newline in the value of request header {name}")
            lines.append(f"{name}: {value}\r\n")
        if method in _DECLARE_EMPTY_BODY and "Content-Length" not in headers:
            lines.append("Content-Length: 0\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    async def _exchange(self, conn: _Connection, method: str, head: bytes) -> UpstreamResponse:
        assert conn.transport is not None
        conn.answered = False
        conn.busy = True
        conn.transport.write(head)
        buffer = conn.buffer
        for _ in range(_MAX_INTERIM + 1):  # interim (1xx) responses are read and dropped
            end = buffer.find(b"\r\n\r\n")
            while end < 0:
                if len(buffer) > MAX_HEAD:
                    raise UpstreamBroken("the response head is too large")
                if conn.closed:
                    raise UpstreamBroken("the upstream closed the connection")
                await conn.wait(self.read_timeout)
                end = buffer.find(b"\r\n\r\n")
            if end > MAX_HEAD:
                raise UpstreamBroken("the response head is too large")
            text = buffer[:end].decode("utf-8", "surrogateescape")
            del buffer[: end + 4]
            minor, status, reason, fields = _parse_head(text)
            if status >= 200:
                break
            if status == 101:
                raise UpstreamBroken("the upstream switched protocols unasked")
        else:
            raise UpstreamBroken("too many interim responses")
        headers = CIMultiDict(fields)
        response = UpstreamResponse(self, conn, status, reason, headers)
        reusable = minor == 1 and (
            "Connection" not in headers or "close" not in _connection_tokens(headers)
        )
        if method == "HEAD" or status in (204, 304):
            pass  # no body, whatever the headers say (RFC 9112 §6.3)
        elif "Transfer-Encoding" in headers:
            codings = [
                c.strip(" \t").lower()
                for v in headers.getall("Transfer-Encoding")
                for c in v.split(",")
            ]
            if minor == 0:
                raise UpstreamBroken("Transfer-Encoding in an HTTP/1.0 response")
            if "Content-Length" in headers:
                # RFC 9112 §6.3 allows letting Transfer-Encoding win; a gateway treats the
                # pair as what it usually is, an attempt at response splitting.
                raise UpstreamBroken("both Transfer-Encoding and Content-Length")
            if codings != ["chunked"]:
                # Another coding (gzip, ...) would reach the client still applied but no
                # longer declared (Transfer-Encoding is hop-by-hop): refused, not mangled.
                raise UpstreamBroken(f"unsupported transfer coding {', '.join(codings)!r}")
            response._framing = "chunked"
        elif "Content-Length" in headers:
            length = _content_length(headers.getall("Content-Length"))
            if length <= SMALL_BODY:
                while len(buffer) < length:
                    if conn.closed:
                        raise UpstreamBroken("the response body broke off")
                    await conn.wait(self.read_timeout)
                response.body = bytes(buffer[:length])
                del buffer[:length]
            else:
                response._framing = "length"
                response._left = length
        else:
            response._framing = "eof"
            reusable = False
        if not reusable:
            conn.reusable = False  # closed once the body is read, never pooled
        if response._framing == "none":  # bodiless, or the body is read whole already
            response._conn = None
            self._release(conn)
        return response

    async def _acquire(self, *, fresh: bool = False) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = None if fresh else self._take_idle()
        while conn is None and self._open >= self._limit:
            if fresh and self._idle:
                self._idle.popleft()[0].close()  # its slot is freed when it is gone
            waiter: asyncio.Future[None] = loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_slot_waiter()  # pass the slot on
                raise
            conn = None if fresh else self._take_idle()
        if conn is not None:
            return conn
        self._open += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self._host, self._port
                )
        except BaseException as exc:
            self._open -= 1
            self._wake_slot_waiter()
            if isinstance(exc, TimeoutError):
                raise UpstreamConnectTimeout() from None
            if isinstance(exc, OSError):
                raise UpstreamUnreachable(str(exc)) from None
            raise
        conn.counted = True
        if self._sweeper is None and not self._closed:
            self._sweeper = loop.call_later(self._keepalive_timeout, self._sweep)
        return conn

    def _take_idle(self) -> _Connection | None:
        """The newest idle connection still open and within the keep-alive timeout."""
        now = asyncio.get_running_loop().time()
        while self._idle:
            conn, since = self._idle.pop()
            if not conn.closed and now - since < self._keepalive_timeout:
                conn.reused = True
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection) -> None:
        """A connection whose response was read to its end: pooled, or closed if in doubt."""
        conn.busy = False
        if conn.closed or not conn.reusable or conn.buffer or self._closed:
            conn.close()
            return
        self._idle.append((conn, asyncio.get_running_loop().time()))
        self._wake_slot_waiter()

    def _lost(self, conn: _Connection) -> None:
        if not conn.counted:
            return  # its connect was abandoned; the slot was given back there
        conn.counted = False
        self._open -= 1
        for i, (idle, _) in enumerate(self._idle):
            if idle is conn:
                del self._idle[i]
                break
        self._wake_slot_waiter()

    def _wake_slot_waiter(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        """Close connections idle for longer than the keep-alive timeout (oldest first)."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle and now - self._idle[0][1] >= self._keepalive_timeout:
            conn, _ = self._idle.popleft()
            conn.close()
        if self._open and not self._closed:
            self._sweeper = loop.call_later(self._keepalive_timeout / 2, self._sweep)

    def close(self) -> None:
        """Close every idle connection; busy ones are closed when released."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._idle:
            conn, _ = self._idle.popleft()
            conn.close()
