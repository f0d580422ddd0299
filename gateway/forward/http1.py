"""A lean HTTP/1.1 client for bodyless requests to http:// upstreams: the common case.

aiohttp's `ClientSession` costs more CPU per request than the rest of the gateway together
(bench/RESULTS.md); most of it is generality a proxy does not need (cookies, redirects,
auth, tracing, URL building). This client only sends a request head without a body and reads
one response, over a keep-alive pool of plain TCP connections per upstream origin. Requests
with a body, and https upstreams, go through aiohttp (`forward/aiohttp_transport.py`).

Responses are parsed by llhttp (`httptools`, uvicorn's parser), incrementally as bytes arrive,
plus the gateway's own refusals where llhttp is lenient (`ResponseReader`): anything malformed
or ambiguous is an `UpstreamBroken` (a 502 for the client), and a connection whose framing is
in any doubt is never reused, so a bad upstream cannot make one response bleed into another.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import socket
from collections.abc import AsyncGenerator
from typing import Any, Final, cast

import httptools
from multidict import CIMultiDict
from yarl import URL

from gateway.forward.headers import UpstreamHeaders
from gateway.forward.transport import (
    MAX_LENGTH_DIGITS,
    SMALL_BODY,
    UNRELAYABLE_RESPONSE,
    Body,
    RequestFields,
    RequestHeadInvalid,
    UpstreamBroken,
    UpstreamConnectTimeout,
    UpstreamPoolTimeout,
    UpstreamTimeout,
    UpstreamUnreachable,
    check_status_line,
    check_transfer_codings,
    unsendable,
)

MAX_HEAD: Final = 64 * 1024  # status line and header lines together (and the trailers apart)
MAX_HEADERS: Final = 200
_HIGH_WATER: Final = 256 * 1024  # stop reading from the upstream while this much is unread
_MAX_INTERIM: Final = 8  # 1xx responses before the final one
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# RFC 9110 §9.3: a bodyless request with these methods still declares its (empty) body.
_DECLARE_EMPTY_BODY: Final = frozenset({"POST", "PUT", "PATCH"})


class _Stop(Exception):
    """Raised from a parser callback to stop llhttp where the gateway knows better."""


class ResponseReader:
    """One connection's responses, parsed as the bytes arrive (push parsing, no re-scan).

    llhttp checks the syntax (status line, field lines, Content-Length, chunked framing, no
    obs-fold, no bare CR or LF, no Content-Length with Transfer-Encoding). On top, the gateway
    refuses what llhttp accepts but a proxy should not pass on: by the rules in `transport`
    that aiohttp's responses are held to as well, versions other than 1.0 and 1.1, status
    outside 100..599, 101 unasked, controls in the reason, transfer codings other than
    `chunked` (or any in HTTP/1.0), Content-Length over 18 digits; and more than 8 interim
    responses, more than `MAX_HEADERS` fields, and more than `MAX_HEAD` bytes of a head, of
    trailers or of framing between two chunks (llhttp's binding collects a field whole).
    """

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.body: collections.deque[bytes] = collections.deque()
        self.reusable = True  # False once anything rules out another request on the connection
        self._head_request = False
        self.begin(head_request=False)

    def begin(self, *, head_request: bool) -> None:
        """Expect the response to a new request (`head_request`: to a HEAD, so bodiless)."""
        if self._head_request:  # llhttp still waits for the last HEAD's body
            self._parser = httptools.HttpResponseParser(self)
        self._head_request = head_request
        self._interim = 0
        self._loose = 0  # bytes fed since the last head or chunk boundary, body not counted
        self._new_head()
        self.head_done = self.done = False  # the final (non-1xx) head is, the whole response is
        self.framing = "none"  # none | length | chunked | eof
        self.body.clear()
        self.buffered = 0
        self.error: UpstreamBroken | None = None

    def _new_head(self) -> None:
        self.status = 0
        self._reason = b""
        self.fields: list[tuple[str, str]] = []
        self._field_bytes = 0  # of this head's status line and fields, then of the trailers
        self.length: int | None = None
        self._codings: list[str] = []  # Transfer-Encoding field values

    @property
    def reason(self) -> str:
        return self._reason.decode()  # UTF-8: `on_headers_complete` checked

    def feed(self, data: bytes) -> None:
        """Parse what arrived; a refusal is kept in `error` (the connection is then done for)."""
        if self.error is not None:
            return
        self._loose += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            cause = exc.__context__
            if isinstance(cause, UpstreamBroken):
                self._fail(cause)
            elif self.done:
                self.reusable = False  # bytes after the response: never read as the next one
            else:
                self._fail(UpstreamBroken(f"malformed response: {exc}"))
            return
        if self._loose > MAX_HEAD:  # a field without end, which httptools would keep collecting
            self._fail(UpstreamBroken("the response head or a chunk's framing is too large"))

    def end_of_stream(self) -> None:
        """The upstream closed its side: the end of a close-delimited body, else a break."""
        self.reusable = False
        if self.done or self.error is not None:
            return
        if self.head_done and self.framing == "eof":
            self.done = True
        else:
            broke = "the response body broke off" if self.head_done else "the connection closed"
            self._fail(UpstreamBroken(broke))

    def take_body(self) -> bytes:
        body = b"".join(self.body)
        self.body.clear()
        self.buffered = 0
        return body

    def _fail(self, error: UpstreamBroken) -> None:
        self.error = error
        self.reusable = False

    # -- llhttp callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            raise _Stop  # a second response where one was asked for

    def on_status(self, status: bytes) -> None:
        self._reason += status  # llhttp may hand it over in pieces
        self.on_header(b"", status)  # counted as a field, one the final head skips

    def on_header(self, name: bytes, value: bytes) -> None:
        self._field_bytes += len(name) + len(value) + 4
        if self._field_bytes > MAX_HEAD:
            raise UpstreamBroken("the response head or its trailer section is too large")
        if self.head_done or not name:  # a trailer field: not relayed (nor are aiohttp's)
            return
        if len(self.fields) >= MAX_HEADERS:
            raise UpstreamBroken("too many response headers")
        value = value.rstrip(b" \t")  # llhttp strips leading whitespace only
        lower = name.lower()
        if lower == b"content-length":
            # llhttp checked it is digits (what `transport.content_length` checks on aiohttp's).
            if len(value) > MAX_LENGTH_DIGITS:
                raise UpstreamBroken("invalid Content-Length")
            self.length = int(value)
        elif lower == b"transfer-encoding":
            self._codings.append(value.decode("latin-1"))
        # Field names are tokens (ASCII): llhttp checked. A value that is not UTF-8 could not
        # be relayed as it is (`transport.UNRELAYABLE_RESPONSE`): refused, not altered.
        try:
            text = value.decode()
        except UnicodeDecodeError:
            raise UpstreamBroken(UNRELAYABLE_RESPONSE) from None
        self.fields.append((name.decode("latin-1"), text))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        version = parser.get_http_version()
        check_status_line(version, status, self._reason)
        if status < 200:  # interim: read and dropped, its fields are not the final response's
            self._interim += 1
            if self._interim > _MAX_INTERIM:
                raise UpstreamBroken("too many interim responses")
            self._new_head()
            self._loose = 0
            return
        if not self._reason.isascii():
            try:
                self._reason.decode()
            except UnicodeDecodeError:
                raise UpstreamBroken(UNRELAYABLE_RESPONSE) from None
        self.status = status
        if self._head_request or status in (204, 304):
            # No body, whatever the headers say (RFC 9112 §6.3). But one they announce may be
            # written all the same, by an upstream bug (a HEAD served by the GET handler), and
            # later than this head: after the next request went out on the connection, and so
            # read as its answer (no guard can tell them apart then). Never reused.
            if self.length or self._codings:
                self.reusable = False
        elif self._codings:
            # llhttp would read `gzip` to EOF and `gzip, chunked` de-chunked, and takes
            # `chunked` twice.
            check_transfer_codings(version, self._codings)
            self.framing = "chunked"
        else:
            self.framing = "eof" if self.length is None else "length"
        # llhttp's keep-alive: no `Connection: close` (any item of any such field), and not
        # delimited by the end of the stream (so neither is a HEAD answer without a length).
        if version == "1.0" or not parser.should_keep_alive():
            self.reusable = False
        self.head_done = True
        self._loose = self._field_bytes = 0  # from now on, of the trailer section
        # A HEAD's answer ends with its head: llhttp cannot be told so and reads on, into
        # a body that `on_body` refuses; a new parser reads the next response.
        self.done = self._head_request

    def on_body(self, body: bytes) -> None:
        if self.done:  # bytes after a HEAD's answer: never read as the next one
            self.reusable = False
            return
        self.body.append(body)
        self.buffered += len(body)
        self._loose -= len(body)

    def on_chunk_header(self) -> None:
        self._loose = 0

    on_chunk_complete = on_chunk_header

    def on_message_complete(self) -> None:
        self.done = self.head_done  # not after an interim response


class _State(enum.Enum):
    IDLE = "idle"  # in the pool (or still connecting), no request on it, no slot taken
    ACTIVE = "active"  # taken for a request, until its response is read to its end
    CLOSED = "closed"  # gone; its slot (if it held one) was given back when it got here


class _Connection(asyncio.Protocol):
    """One keep-alive connection: bytes are parsed as they arrive, the request task waits
    for what it needs (the head, the small body, the next piece of a streamed one)."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.state = _State.IDLE  # the pool's once connected
        self.reader = ResponseReader()
        self.reused = False  # taken from the pool (it may have been closed meanwhile)
        self.answered = False  # bytes arrived since the current request was sent
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # uvloop does it too; asyncio may not
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, head: bytes, *, head_request: bool) -> None:
        if self.state is _State.CLOSED or self.transport is None:
            raise UpstreamBroken("the upstream closed the connection")
        self.answered = False
        self.reader.begin(head_request=head_request)
        self.transport.write(head)

    def data_received(self, data: bytes) -> None:
        if self.state is not _State.ACTIVE:
            # Bytes nobody asked for, on an idle connection: whatever they are, they must never
            # be read as the answer to the next request sent on it.
            self.close()
            return
        self.answered = True
        reader = self.reader
        reader.feed(data)
        if reader.buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        """Also after the upstream's EOF (the transport then closes our side too)."""
        self.reader.end_of_stream()
        self._wake()
        self.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, read_timeout: float) -> None:
        """Until more of the response arrives or it fails (`UpstreamBroken`);
        `UpstreamTimeout` after `read_timeout` seconds of silence."""
        reader = self.reader
        if reader.error is not None:
            raise reader.error
        if self.state is _State.CLOSED:
            raise UpstreamBroken("the upstream closed the connection")
        if self._paused and reader.buffered < _HIGH_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(read_timeout, _expire, waiter, read_timeout)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        if reader.error is not None:
            raise reader.error

    def close(self) -> None:
        """Close it, never to be reused; the slot it held (if any) is free from now."""
        if self.state is _State.CLOSED:
            return
        state, self.state = self.state, _State.CLOSED
        if self.transport is not None:
            self.transport.close()
        self.pool._closed_conn(self, state)


def _expire(waiter: asyncio.Future[None], after: float) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(f"read_timeout {after:g}s"))


class UpstreamResponse:
    """Status and headers of a response; `body` when it was small enough to be read whole,
    else `chunks()` yields it (and must be drained or `close()`d)."""

    __slots__ = ("_conn", "body", "headers", "reason", "status")

    def __init__(self, conn: _Connection) -> None:
        reader = conn.reader
        self._conn: _Connection | None = conn
        self.status = reader.status
        self.reason = reader.reason
        self.headers = CIMultiDict(reader.fields)
        self.body: bytes | None = None

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body as it arrives (de-chunked); the connection goes back to the pool once
        the body has been read to its end."""
        conn = self._conn
        if conn is None:
            return
        reader = conn.reader
        pending = reader.body
        try:
            while True:
                if pending:
                    piece = pending.popleft()
                    reader.buffered -= len(piece)
                    yield piece
                elif reader.done:
                    break
                else:
                    await conn.wait(conn.pool.read_timeout)
        except BaseException:
            self.close()
            raise
        self._conn = None
        conn.pool._release(conn)

    def close(self) -> None:
        """Abandon the response: its connection is closed, never reused."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class UpstreamPool:
    """Keep-alive connections to one upstream origin (`host`, `port`), at most `limit` open.

    Idle connections are reused newest first and closed after `keepalive_timeout` seconds.
    A request takes one of `limit` slots until its response is read; callers that find none
    free wait in line: a slot that comes free goes to the one that has waited longest (with
    the connection just released, if any), and none waits longer than `connect_timeout`.
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
        # One per connection in use (from sending a request to the end of its response) or
        # being opened; idle ones take none. Given out in the order asked for.
        self._slots = asyncio.Semaphore(limit)
        self._idle: dict[_Connection, float] = {}  # since when, oldest first
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(
        self, method: str, target: str, headers: RequestFields, body: Body = None
    ) -> UpstreamResponse:
        """Send a bodyless request and read the response head (and a small body whole).

        A request on a reused connection that the upstream had already closed is sent again
        once on a fresh connection, for idempotent methods only (RFC 9110 §9.2.2).
        """
        if body is not None:
            raise ValueError("the lean pool sends bodyless requests only")
        head = self._request_head(method, target, headers)
        fresh = False
        while True:
            conn = await self._acquire(fresh=fresh)
            try:
                return await self._exchange(conn, method, head)
            except BaseException as exc:
                conn.close()
                # The upstream had closed a pooled connection without answering: once more,
                # on a fresh one.
                retry = isinstance(exc, UpstreamBroken) and conn.reused and not conn.answered
                if fresh or not retry or method not in IDEMPOTENT:
                    raise
                fresh = True

    @classmethod
    def for_url(cls, url: URL, **options: Any) -> UpstreamPool:
        """A pool for an http:// URL's origin (`options` as for the constructor); `Host` as
        aiohttp writes it (no default port, IPv6 in brackets, IDNA)."""
        assert url.raw_host is not None and url.port is not None
        return cls(url.raw_host, url.port, url.host_port_subcomponent or url.raw_host, **options)

    def _request_head(self, method: str, target: str, headers: RequestFields) -> bytes:
        if isinstance(headers, UpstreamHeaders):  # ours are rendered and checked already
            ours, headers = headers.lines, headers.client
        else:
            ours = ""
        lines = list(map(": ".join, headers.items()))  # joined in C, field by field
        # A CR or LF in any name or value, found by memchr over them all.
        if "\r" in (probe := "".join(lines)) or "\n" in probe:
            raise RequestHeadInvalid("newline in a request header field")
        if method in _DECLARE_EMPTY_BODY and "Content-Length" not in headers:
            lines.append("Content-Length: 0")
        lines.append("")
        fields = "\r\n".join(lines)
        head = f"{method} {target} HTTP/1.1\r\n{self._host_line}{fields}{ours}\r\n"
        try:
            # Strict: a header byte that was not UTF-8 (a lone surrogate here) is refused as on
            # the aiohttp transport, which could not send it as it is (`transport.unsendable`).
            # No cost in the common case: ASCII text encodes as a copy.
            return head.encode()
        except UnicodeEncodeError:
            raise unsendable() from None

    async def _exchange(self, conn: _Connection, method: str, head: bytes) -> UpstreamResponse:
        conn.send(head, head_request=method == "HEAD")
        reader = conn.reader
        while not reader.head_done:
            await conn.wait(self.read_timeout)
        response = UpstreamResponse(conn)
        framing = reader.framing
        if framing == "length" and reader.length is not None and reader.length <= SMALL_BODY:
            while not reader.done:
                await conn.wait(self.read_timeout)
            response.body = reader.take_body()
        elif framing != "none":
            return response  # streamed: the connection is the response's until it is read
        response._conn = None  # bodiless, or the body is read whole already
        self._release(conn)
        return response

    async def _acquire(self, *, fresh: bool = False) -> _Connection:
        """A slot (waiting in line for it, at most `connect_timeout`), then the newest idle
        connection (unless `fresh`) or a new one."""
        if self._slots.locked():  # a free slot is taken without a timer
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise UpstreamPoolTimeout(
                    f"all {self._limit} stayed busy, connect_timeout {self._connect_timeout:g}s"
                ) from None
        else:
            await self._slots.acquire()
        if not fresh:
            conn = self._take_idle()
            if conn is not None:
                return conn
        elif self._idle:  # the slot we were given may have come with one, which we pass over
            next(iter(self._idle)).close()  # the oldest, so the pool stays within its limit
        return await self._connect()

    async def _connect(self) -> _Connection:
        """A new connection on the slot just taken."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self._host, self._port
                )
        except BaseException as exc:
            self._slots.release()
            if isinstance(exc, TimeoutError):
                raise UpstreamConnectTimeout(
                    f"connect_timeout {self._connect_timeout:g}s"
                ) from None
            if isinstance(exc, OSError):
                raise UpstreamUnreachable(str(exc)) from None
            raise
        conn.state = _State.ACTIVE  # from now, closing it gives the slot back
        return conn

    def _take_idle(self) -> _Connection | None:
        """The newest idle connection still open and within the keep-alive timeout."""
        now = asyncio.get_running_loop().time()
        while self._idle:  # a connection that closes leaves it
            conn, since = self._idle.popitem()
            if now - since < self._keepalive_timeout:
                conn.state, conn.reused = _State.ACTIVE, True
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection) -> None:
        """A connection whose response was read to its end: pooled, or closed if in doubt;
        either way its slot goes to the longest waiter."""
        if conn.state is _State.CLOSED or not conn.reader.reusable or self._closed:
            conn.close()
            return
        conn.state = _State.IDLE
        loop = asyncio.get_running_loop()
        self._idle[conn] = loop.time()
        self._slots.release()
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._keepalive_timeout, self._sweep)

    def _closed_conn(self, conn: _Connection, state: _State) -> None:
        """`conn` was closed: out of the idle ones, or its slot to the longest waiter."""
        if state is _State.ACTIVE:
            self._slots.release()
        self._idle.pop(conn, None)

    def _sweep(self) -> None:
        """Close connections idle for longer than the keep-alive timeout (oldest first)."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn, since in list(self._idle.items()):  # oldest first
            if now - since < self._keepalive_timeout:
                break
            conn.close()
        if self._idle and not self._closed:  # again when the oldest left expires
            oldest = next(iter(self._idle.values()))
            self._sweeper = loop.call_later(oldest + self._keepalive_timeout - now, self._sweep)

    def close(self) -> None:
        """Close every idle connection; busy ones are closed when released."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._idle):
            conn.close()
