"""Client connections on the proxy port: a deadline for each request head, and a cap on open
connections per process that pauses accepting instead of accepting and dropping.

aiohttp bounds neither: its keep-alive timer only runs between requests, and a client that
sends one byte of a request head every few seconds holds its connection for as long as it
likes (slowloris); its listener accepts every connection the kernel has.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler

from gateway import metrics
from gateway.logs import RateLimitedLog, printable

log = logging.getLogger("idlegate")

# Sent when a started request head does not complete in time; a connection that sent nothing
# is closed without a word (a 408 there can confuse a client that never asked anything).
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n"
    b"Cache-Control: no-store\r\n\r\n"
)
# accept() failures that mean "out of a resource" (descriptors, buffers): stop accepting for a
# moment instead of spinning on a listener that stays readable (asyncio does the same).
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_RETRY_DELAY = 1.0
_ACCEPTS_PER_WAKEUP = 64  # like asyncio's batch: fair to the connections already open
_WARNING_INTERVAL = 10.0


# How a server answers a request its HTTP parser refused (`GuardedRequestHandler.handle_error`).
Unparsed = Callable[[web.BaseRequest], web.StreamResponse]
_QUOTED = re.compile(r"""\s*(?::\s*)?b?['"].*""")


def parser_complaint(exc: BaseException | None) -> str:
    """What aiohttp's parser said, without what it quotes: its messages repeat the bytes they
    refused (`Invalid header value char: b'Authorization: Bearer eyJ...'`, a request line with
    its query), and those may be a token. The first line, cut where a quotation starts."""
    if not isinstance(exc, HttpProcessingError):
        return type(exc).__name__
    first = str(exc.message or "").splitlines()[0] if exc.message else ""
    said = _QUOTED.sub("", first).strip(" :")[:120]
    return f"{type(exc).__name__}: {said}" if said else type(exc).__name__


def _plain_refusal(request: web.BaseRequest) -> web.StreamResponse:
    """The answer to an unparsed request where no pipeline renders one (the admin port)."""
    body = {"error": "malformed_http", "reason": "malformed_http", "message": "malformed request"}
    return web.json_response(body, status=400, headers={"Cache-Control": "no-store"})


class GuardedRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol with a deadline for the request head, and its own
    answer to a request the HTTP parser refused.

    The timer starts when the connection is made, and again at the first byte of the next
    request on a kept-alive connection (the wait before it is keepalive_timeout's). It is not
    reset by further bytes (a slowloris drips them), and it stops when a whole head has been
    parsed: a slow request body and a long upstream response are read_timeout's business.

    aiohttp answers a malformed request with a text page quoting the bytes it refused (a
    bearer token among them) and counts it nowhere; here `on_unparsed` answers it (the
    pipeline: the contract's refusal, counted and in the access log) and the log gets one line
    naming the peer and the parser's complaint without its quotation.
    """

    __slots__ = (
        "_bodyless", "_head_started", "_head_timer", "_header_timeout", "_on_unparsed", "_slot",
        "_unparsed_log",
    )  # fmt: skip

    def __init__(
        self,
        manager: web.Server,
        *,
        header_timeout: float,
        on_unparsed: Unparsed | None = None,
        unparsed_log: RateLimitedLog | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._on_unparsed = on_unparsed or _plain_refusal
        self._unparsed_log = unparsed_log or RateLimitedLog(log, interval=1.0)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False  # bytes of the awaited head have arrived
        self._bodyless = False  # the last head parsed has no body to come
        self._slot: Slot | None = None  # set by a CappedSite: released when the connection ends

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm(started=False)

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:  # a whole head (or a refused one) was parsed
            self._disarm()
            messages = self._messages
            # The last head has no body, so what followed it in `data` (it did not end the
            # head) is the start of a pipelined next head: its deadline runs from now.
            self._bodyless = bool(messages) and messages[-1][1] is EMPTY_PAYLOAD
            if self._bodyless and not data.endswith(b"\r\n\r\n"):
                self._arm(started=True)
        elif not data or self._upgraded or self._payload_parser is not None:
            return  # nothing, or a WebSocket's frames: no head of any request
        elif self._head_timer is not None:
            self._head_started = True
        elif self._awaiting_request() or self._bodyless:
            # The first byte of a kept-alive connection's next request; or, while a bodyless
            # request is being answered, of a pipelined one (no body of it is to come).
            self._arm(started=True)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()
        super().connection_lost(exc)

    def _awaiting_request(self) -> bool:
        """Idle between requests: the handler loop waits for the next parsed head (during a
        request the loop awaits the handler, and bytes that arrive are its body)."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    def _arm(self, *, started: bool) -> None:
        self._disarm()
        self._head_started = started
        self._head_timer = self._loop.call_later(self._header_timeout, self._head_overdue)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:  # a handler's exception (the pipeline's are its own): aiohttp's
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:  # as aiohttp: a response is on its way already
            raise ConnectionError("cannot answer a malformed request after a response began")
        self._unparsed_log.warning(
            "refused a malformed HTTP request (400) from %s: %s",
            request.remote,
            printable(parser_complaint(exc)),
        )
        response = self._on_unparsed(request)
        response.force_close()  # what follows a misparsed head cannot be trusted either
        return response

    def _head_overdue(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or self._force_close:
            return
        if self._head_started and not self._awaiting_request():
            # A pipelined head, begun while the request before it is still answered: that
            # answer is not cut. Its deadline starts again (at most twice header_timeout after
            # the answer went, never keepalive_timeout).
            self._head_timer = self._loop.call_later(self._header_timeout, self._head_overdue)
            return
        metrics.CLIENT_TIMEOUTS.labels("header_timeout").inc()
        if self._head_started:
            transport.write(_REQUEST_TIMEOUT)
        self.force_close()


class GuardedServer(web.Server):
    """aiohttp's low-level server whose connections are GuardedRequestHandlers."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        header_timeout: float,
        on_unparsed: Unparsed | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._header_timeout = header_timeout
        self._on_unparsed = on_unparsed
        # A flood of malformed requests is a line a second in the log, for all connections
        # (each is counted, and with the access log on, a line there).
        self._unparsed_log = RateLimitedLog(log, interval=1.0)

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(
            self,
            loop=self._loop,
            header_timeout=self._header_timeout,
            on_unparsed=self._on_unparsed,
            unparsed_log=self._unparsed_log,
            **self._kwargs,
        )


class GuardedAppRunner(web.AppRunner):
    """An AppRunner (the admin port) whose connections get the same head deadline."""

    __slots__ = ("_header_timeout",)

    def __init__(self, app: web.Application, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the app's startup, its handler and factory
        return GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            header_timeout=self._header_timeout,
            loop=plain._loop,
            **plain._kwargs,
        )


class Slot:
    """One accepted connection's place under the limit; released exactly once."""

    __slots__ = ("_limit",)

    def __init__(self, limit: ConnectionLimit) -> None:
        self._limit: ConnectionLimit | None = limit

    def release(self) -> None:
        limit, self._limit = self._limit, None
        if limit is not None:
            limit.release()


class ConnectionLimit:
    """At most `maximum` client connections over every listener that shares it (one per
    process: server.max_connections). While full, the listeners do not accept."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.open = 0
        self._listeners: list[_Listener] = []
        self._next_warning = 0.0  # monotonic: one line per _WARNING_INTERVAL at most

    @property
    def full(self) -> bool:
        return self.open >= self.maximum

    def take(self) -> Slot:
        self.open += 1
        metrics.CLIENT_CONNECTIONS.inc()
        if self.full:
            metrics.CONNECTION_LIMIT_REACHED.inc()
            now = time.monotonic()
            if now >= self._next_warning:
                self._next_warning = now + _WARNING_INTERVAL
                log.warning(
                    "server.max_connections (%d) reached: new connections wait in the listen "
                    "backlog until one closes (idlegate_connection_limit_reached_total counts)",
                    self.maximum,
                )
            for listener in self._listeners:
                listener.update()
        return Slot(self)

    def release(self) -> None:
        was_full = self.full
        self.open -= 1
        metrics.CLIENT_CONNECTIONS.dec()
        if was_full and not self.full:
            for listener in self._listeners:
                listener.update()

    def attach(self, listener: _Listener) -> None:
        self._listeners.append(listener)

    def detach(self, listener: _Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)


class _Listener:
    """One listening socket, accepted from in the event loop's reader callback; the reader is
    removed while the limit is full, so further connections stay in the kernel's backlog
    (clients see a slow connect, not a reset). Works alike on asyncio and uvloop."""

    def __init__(
        self,
        sock: socket.socket,
        protocol: Callable[[], RequestHandler],
        limit: ConnectionLimit,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.sock = sock
        self._protocol = protocol
        self._limit = limit
        self._loop = loop
        self._reading = False
        self._backoff: asyncio.TimerHandle | None = None
        self._closed = False
        self._connecting: set[asyncio.Task[None]] = set()
        limit.attach(self)
        self.update()

    def update(self) -> None:
        """Read from the socket exactly when a connection may be accepted."""
        wanted = not self._closed and not self._limit.full and self._backoff is None
        if wanted and not self._reading:
            self._loop.add_reader(self.sock.fileno(), self._accept)
        elif self._reading and not wanted:
            self._loop.remove_reader(self.sock.fileno())
        self._reading = wanted

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_WAKEUP):
            if self._limit.full or self._closed:
                break
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    continue  # the client went away before accept (ECONNABORTED, ...)
                log.error(
                    "cannot accept connections: %s; retrying in %.0fs",
                    exc.strerror,
                    _ACCEPT_RETRY_DELAY,
                )
                self._backoff = self._loop.call_later(_ACCEPT_RETRY_DELAY, self._retry)
                break
            conn.setblocking(False)
            task = self._loop.create_task(self._connect(conn, self._limit.take()))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)
        self.update()

    def _retry(self) -> None:
        self._backoff = None
        self.update()

    async def _connect(self, conn: socket.socket, slot: Slot) -> None:
        def protocol() -> RequestHandler:
            handler = self._protocol()
            if isinstance(handler, GuardedRequestHandler):
                handler._slot = slot
            return handler

        try:
            await self._loop.connect_accepted_socket(protocol, conn)
        except BaseException as exc:
            slot.release()  # no connection came of it (a no-op if the handler already did)
            conn.close()
            if not isinstance(exc, Exception):
                raise
            log.debug("an accepted connection failed to start: %s", exc)

    def close(self) -> None:
        self._closed = True
        self.update()
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
        self._limit.detach(self)
        self.sock.close()


class _Listening(asyncio.AbstractServer):
    """What aiohttp's BaseSite expects in `_server`: `close()` and `sockets`."""

    def __init__(self, listeners: list[_Listener], loop: asyncio.AbstractEventLoop) -> None:
        self._listeners = listeners
        self._loop = loop

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(listener.sock for listener in self._listeners)

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners = []

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return bool(self._listeners)

    async def start_serving(self) -> None:
        return None  # serving from construction

    async def serve_forever(self) -> None:
        raise NotImplementedError("the gateway's own loop runs the site")

    async def wait_closed(self) -> None:
        return None


def _bind(host: str, port: int, *, backlog: int, reuse_port: bool) -> list[socket.socket]:
    """Listening sockets for every address `host` names (as loop.create_server binds them)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class CappedSite(web.BaseSite):
    """A TCP site whose connections count against a ConnectionLimit (see _Listener)."""

    __slots__ = ("_host", "_limit", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        limit: ConnectionLimit,
        backlog: int = 1024,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._limit = limit
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        sockets = _bind(self._host, self._port, backlog=self._backlog, reuse_port=self._reuse_port)
        self._server = _Listening(
            [_Listener(sock, server, self._limit, loop) for sock in sockets], loop
        )
