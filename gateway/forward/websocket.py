"""WebSockets through the gateway, closed when the token that opened them may no longer be used.

The handshake is decided like any request (route, token, scopes, revocation, session age, one
store round trip that counts as activity) by `Gateway.handle`, which then hands it here. The
relay opens the upstream socket first (aiohttp client, ws:// or wss:// after the route's
http:// or https://), offering the client's subprotocols, and answers the client with the one
the upstream chose; the identity, X-Forwarded-* and X-Request-ID headers go upstream on the
handshake as on any request. Then messages are relayed both ways as they come: text stays text,
binary stays binary, pings and pongs are passed through (the gateway answers none itself, so
liveness is end to end), close codes and reasons are passed through both ways. A message over
`forward.websocket_max_message` closes its sender's side with 1009.

While the socket is open, the gateway closes it (1008, the reason code as close reason) at the
first of: the token's exp, its max_session_age, its revocation (`deadlines.py`), or its idle
timeout without client messages. Client text/binary messages are activity (pings and pongs are
not): written to the shared store at most once per token per
`forward.websocket_activity_interval` (the store's last activity lags by at most that much);
when the store says the token is idle (activity at other replicas counts), the socket closes.
If the store fails during those writes or checks, `store.on_error` applies: deny closes with
1011 store_unavailable (a retryable server condition, not a policy refusal); allow keeps the
socket open; grace keeps it open while the socket itself saw a client message within the idle
timeout. At drain the sockets get 1001 one second before shutdown_grace ends.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import re
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp._websocket.reader import WebSocketDataQueue
from aiohttp.connector import Connection
from aiohttp.helpers import set_exception
from aiohttp.http_websocket import WebSocketError, WebSocketReader, WebSocketWriter
from multidict import MultiMapping
from yarl import URL

from gateway import metrics
from gateway.clock import Clock
from gateway.config import Config
from gateway.forward.deadlines import LOG_FIELDS, Deadlines, Watched, reset
from gateway.forward.headers import UpstreamHeaders
from gateway.forward.transport import UpstreamFailureLog, check_sendable, describe_failure
from gateway.logs import printable, quoted
from gateway.reasons import Reason, Refusal
from gateway.store.base import Store, StoreUnavailable, TouchResult
from gateway.tokens import policy
from gateway.tokens.claims import VerifiedToken

log = logging.getLogger("idlegate.websocket")

# How long each side gets to answer the gateway's close frame before its connection is cut.
CLOSE_HANDSHAKE = 1.0
# Set on the client's WebSocketResponse: the handshake's own duration, for the request metrics.
HANDSHAKE_SECONDS = web.ResponseKey("idlegate.handshake_seconds", float)
# Close codes that may not be sent in a close frame (RFC 6455 §7.4.1).
_UNSENDABLE = frozenset({1004, 1005, 1006, 1015})
# Set by aiohttp's client on the upstream handshake, never taken from the client's. A handshake
# has no body (`check_handshake`), so no Content-Length of the client's goes along either: an
# upstream would wait for, or read WebSocket frames as, the body it announces.
_HANDSHAKE_HEADERS = (
    "Content-Length",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Accept",
)


class UnmaskedFrame(WebSocketError):
    """A client frame without the mask bit (RFC 6455 §5.1)."""

    def __init__(self) -> None:
        super().__init__(WSCloseCode.PROTOCOL_ERROR, "unmasked frame from the client")


# What a payload parser returns to aiohttp's RequestHandler when the stream has ended (it then
# reads no more from the connection): aiohttp's reader returns the same after an error.
_ENDED = (True, b"")


class MaskedFrames:
    """In front of aiohttp's reader of the client's frames (the RequestHandler's payload
    parser, compiled or not): passes the bytes on up to the first frame whose mask bit is
    clear, then ends the stream with `UnmaskedFrame`, which aiohttp answers with a 1002 close
    (`WebSocketResponse.receive`). The frames before it are delivered as sent.

    Reads frame heads only, however the frames fall across reads: per read, a few integer
    operations for each frame that starts in it, and the bytes go on to the reader as they
    came (never copied, except a frame head split across two reads)."""

    __slots__ = ("_head", "_next", "_queue", "_reader", "refused")

    def __init__(self, reader: WebSocketReader, queue: WebSocketDataQueue) -> None:
        self._reader = reader
        self._queue = queue  # the reader's message queue, which WebSocketResponse reads
        self._next = 0  # where the next frame head starts, counted from the next read's start
        self._head = b""  # the part of a frame head the last read ended in (< 14 bytes)
        self.refused = False

    def feed_eof(self) -> None:
        if not self.refused:  # else the queue ends with the refusal, not a plain end
            self._reader.feed_eof()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self.refused:
            return _ENDED
        size = len(data)
        at = self._next
        if self._head:
            # The last read ended inside a frame head (under 14 bytes): complete it from this one.
            head = self._head + data[:14]
            end = _frame_end(head, 0, len(head))
            if end < 0:
                return self._refuse(data, 0)
            if end == 0:  # still incomplete: this whole read is in `head`
                self._head = head
                return self._reader.feed_data(data)
            at = end - len(self._head)
            self._head = b""
        while at < size:
            second = data[at + 1] if at + 1 < size else 0
            if 0x80 <= second < 0xFE:  # masked, length in 7 bits: most frames, inline
                at += second - 0x7A  # 2 head bytes, 4 of mask key, (second - 0x80) of payload
                continue
            end = _frame_end(data, at, size)
            if end <= 0:
                if end < 0:
                    return self._refuse(data, at)
                self._head = data[at:]
                at = size
                break
            at = end
        self._next = at - size
        return self._reader.feed_data(data)

    def _refuse(self, data: bytes, at: int) -> tuple[bool, bytes]:
        """The frame starting at `data[at]` is unmasked: what precedes it goes to the reader,
        nothing of it or after it ever does."""
        self.refused = True
        if at:
            self._reader.feed_data(data[:at])
        if self._queue.exception() is None:  # the reader's own complaint, if any, came first
            set_exception(self._queue, UnmaskedFrame())
        return _ENDED


def _frame_end(data: bytes, at: int, size: int) -> int:
    """Where the frame whose head starts at `data[at]` ends (head, mask key and payload,
    possibly past `size`); 0 when its head is not all in `data[:size]`; -1 when its mask bit
    is clear."""
    if size - at < 2:
        return 0
    second = data[at + 1]
    if second < 0x80:
        return -1
    length = second & 0x7F
    if length < 126:
        return at + 6 + length
    if length == 126:
        if size - at < 4:
            return 0
        return at + 8 + (data[at + 2] << 8 | data[at + 3])
    if size - at < 10:
        return 0
    return at + 14 + int.from_bytes(data[at + 2 : at + 10], "big")


class _ClientSocket(web.WebSocketResponse):
    """aiohttp's server side of a WebSocket, its frame reader behind `MaskedFrames`. Relies on
    aiohttp internals (`_post_start`, the handler's `_payload_parser` and `_message_tail`):
    tests/integration/test_attacks_websocket_frames.py fails if an aiohttp upgrade moves them."""

    def _post_start(
        self, request: web.BaseRequest, protocol: str | None, writer: WebSocketWriter
    ) -> None:
        handler = request.protocol
        # Bytes the client sent after its handshake, before the 101 (aiohttp keeps them for
        # the reader, which `super()._post_start` creates and feeds them to): checked first.
        early, handler._message_tail = handler._message_tail, b""
        super()._post_start(request, protocol, writer)
        assert self._reader is not None and handler._payload_parser is self._parser is not None
        frames = MaskedFrames(self._parser, self._reader)
        handler._payload_parser = frames
        if early and frames.feed_data(early)[0]:
            handler.close()


def _has_token(headers: MultiMapping[str], name: str, token: str) -> bool:
    return any(
        part.strip().lower() == token
        for value in headers.getall(name, ())
        for part in value.split(",")
    )


def wants_websocket(headers: MultiMapping[str]) -> bool:
    """Does the request ask to upgrade to WebSocket: `websocket` in Upgrade, and `upgrade` in
    Connection (RFC 6455 §4.2.1; without it Upgrade is an inert hop-by-hop header, removed)?"""
    return _has_token(headers, "Upgrade", "websocket") and _has_token(
        headers, "Connection", "upgrade"
    )


def check_handshake(request: web.BaseRequest, method: str | None = None) -> None:
    """Refuse a request that asks to upgrade but is no WebSocket handshake (RFC 6455 §4.2.1):
    not a bodyless HTTP/1.1 GET, Upgrade other than exactly `websocket` (what aiohttp upgrades
    on), version other than 13, a key that is not 16 bytes in base64. Decided on the head
    alone, so called before the store: a refused handshake is no activity. Nothing of the
    client's text is echoed or logged (aiohttp's own check logs the offered subprotocols).
    `method`: forward-auth's original method, where the request's own is the edge's."""
    headers = request.headers
    if (method or request.method) != "GET" or request.body_exists or request.version < (1, 1):
        raise Refusal(Reason.MALFORMED_REQUEST, "a WebSocket handshake is a bodyless GET")
    if (
        len(headers.getall("Upgrade")) != 1
        or headers["Upgrade"].strip(" \t").lower() != "websocket"
        or headers.getall("Sec-WebSocket-Version", ()) != ["13"]
        or not _valid_key(headers.getall("Sec-WebSocket-Key", ()))
    ):
        raise Refusal(Reason.MALFORMED_REQUEST, "not a valid WebSocket handshake")
    if "Sec-WebSocket-Protocol" in headers and any(
        _TOKEN_PROTOCOL.fullmatch(protocol) for protocol in _offered_protocols(headers)
    ):
        # Browsers cannot set Authorization on a WebSocket, so some clients offer the token
        # as a subprotocol (`access_token, <jwt>`; Kubernetes' `base64url.bearer...`). The
        # upstream gets the list as offered and may use that token instead of the one
        # verified (and may pick it, when it would be logged as the subprotocol): a second
        # token, refused as one in the query is.
        raise Refusal(
            Reason.MALFORMED_REQUEST,
            "a token in Sec-WebSocket-Protocol is not accepted: send it in Authorization",
        )


# An offered subprotocol that is a token: a JWS (three base64url parts) or JWE (five) whose
# header is a JSON object (`ey...`: base64url of `{`), or Kubernetes'
# `base64url.bearer.authorization.k8s.io.<token>`. Dotted names (`wamp.2.json`) are not.
_TOKEN_PROTOCOL = re.compile(
    r"ey[A-Za-z0-9_-]{8,}(?:\.[A-Za-z0-9_-]*){2}(?:(?:\.[A-Za-z0-9_-]*){2})?"
    r"|(?i:base64url\.bearer\.authorization\.k8s\.io\.).*"
)


def _valid_key(keys: Sequence[str]) -> bool:
    if len(keys) != 1:
        return False
    try:
        return len(base64.b64decode(keys[0].strip(" \t"), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def _sendable(code: Any, fallback: int = WSCloseCode.OK) -> int:
    if isinstance(code, int) and 1000 <= code <= 4999 and code not in _UNSENDABLE:
        return code
    return fallback


def _offered_protocols(headers: MultiMapping[str]) -> list[str]:
    return [
        part.strip()
        for value in headers.getall("Sec-WebSocket-Protocol", ())
        for part in value.split(",")
        if part.strip()
    ]


class _End(Exception):
    """How a relay ended: the metric reason, and the close frame each side gets."""

    def __init__(
        self,
        reason: str,
        client: tuple[int, str] | None,
        upstream: tuple[int, str] | None,
        *,
        sent: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.client = client  # (code, reason) to send the client; None: it closed already
        self.upstream = upstream
        # The code aiohttp closed the client's side with (client None), for the access log:
        # the socket's own close_code says 1006 then, as aiohttp stops reading at once.
        self.sent = sent


class _Socket:
    """One relayed WebSocket: both ends, counters, and its activity/idle bookkeeping."""

    def __init__(
        self,
        client: web.WebSocketResponse,
        upstream: aiohttp.ClientWebSocketResponse,
        token: VerifiedToken | None,
        idle_timeout: float,
        extend: bool,
        now: float,
    ) -> None:
        self.client = client
        self.upstream = upstream
        # Each side's connection, aborted when its close cannot finish in time (`_close_side`).
        self.client_transport: asyncio.Transport | None = None
        self.upstream_transport: asyncio.Transport | None = None
        self.upstream_protocol: object = None
        self.token = token
        self.idle_timeout = idle_timeout
        self.extend = extend
        self.wake = asyncio.Event()
        self.handler: object = None  # the client connection's aiohttp RequestHandler
        self.watched: Watched | None = None
        self.messages_in = 0  # client -> upstream
        self.messages_out = 0  # upstream -> client
        self.end: _End | None = None  # set by a deadline, the store or the drain
        # Latest client message not written to the store yet (its time), if any.
        self.pending: float | None = None
        # The handshake was this socket's activity when it counted as one (extend).
        self.last_local = now if extend else -math.inf
        # Latest last_activity known to be in the store (a passive handshake knows none: the
        # first idle check then asks the store at once).
        self.known_last = now if extend else -math.inf

    def stop(self, end: _End) -> None:
        if self.end is None:
            self.end = end
        self.wake.set()

    def wake_at(self, when: float) -> None:
        watched = self.watched
        if watched is not None and (watched.wake_at is None or when < watched.wake_at):
            watched.wake_at = when


class WebSockets:
    """The process's WebSocket relays (one upstream ClientSession for all of them)."""

    def __init__(self, config: Config, store: Store, clock: Clock, deadlines: Deadlines) -> None:
        self._config = config
        self._policy = config.policy
        self._on_error = config.store.on_error
        self._store = store
        self._clock = clock
        self._deadlines = deadlines
        self._max_message = config.forward.websocket_max_message
        self._interval = config.forward.websocket_activity_interval
        self._session: aiohttp.ClientSession | None = None
        self._open: set[_Socket] = set()
        # Coalescing per token (track key), across this process's sockets of that token: when
        # its activity was last written, and how many open sockets share the entry.
        self._written: dict[str, float] = {}
        self._users: dict[str, int] = {}
        self._drain: asyncio.Task[None] | None = None
        self._closes: dict[tuple[str, str], Any] = {}
        # A handshake that cannot reach the upstream is logged like an HTTP request's failure
        # (a wss:// certificate the trust store refuses would otherwise be a bare 502).
        self.failures = UpstreamFailureLog()

    def __len__(self) -> int:
        return len(self._open)

    async def start(self) -> None:
        forward = self._config.forward
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=forward.connect_timeout, sock_read=forward.read_timeout
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent",),
        )

    def start_drain(self, grace: float) -> None:
        """SIGTERM: sockets keep working during the drain, then get 1001 going away one
        CLOSE_HANDSHAKE before `grace` ends (at once for a shorter grace), so that the drain,
        which waits for them as in-flight requests, ends within the grace."""
        if self._drain is None:
            self._drain = asyncio.create_task(
                self._close_all_after(max(0.0, grace - CLOSE_HANDSHAKE)), name="websocket-drain"
            )

    async def _close_all_after(self, delay: float) -> None:
        if self._open:
            await asyncio.sleep(delay)
        self._closing_all = True
        for socket in tuple(self._open):
            socket.stop(_End("drain", (WSCloseCode.GOING_AWAY, "drain"), _going_away("drain")))

    _closing_all = False

    def pre_shutdown(self, server: web.Server) -> None:
        """`server.pre_shutdown()` (idle keep-alives close, busy ones after their reply), except
        for connections relaying a WebSocket: aiohttp drops whatever a closing connection
        receives, and the sockets keep working until their 1001 (`start_drain`)."""
        relaying = {socket.handler for socket in self._open}
        for connection in server.connections:
            if connection not in relaying:
                connection.close()

    async def close(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
        if self._session is not None:
            await self._session.close()

    def _failed(
        self, route: str, url: URL, reason: Reason, error: str, detail: str | None = None
    ) -> Refusal:
        """The handshake's refusal, logged with the route and the upstream's origin (no
        credentials, path or query: the log never holds the request)."""
        self.failures.failed(route, str(url.origin()), reason, printable(error))
        return Refusal(reason, detail)

    async def relay(
        self,
        request: web.BaseRequest,
        target: str,
        headers: UpstreamHeaders,
        route: str,
        token: VerifiedToken | None,
        idle_timeout: float,
        *,
        extend: bool,
    ) -> web.StreamResponse:
        """Relay one authorised WebSocket handshake to `target` (the upstream URL) and then its
        messages, until either side closes or the token meets a deadline."""
        assert self._session is not None, "WebSockets.start() was not awaited"
        started = time.perf_counter()
        check_handshake(request)  # the pipeline has already; kept for any other caller
        upstream_headers = headers.merged()
        for name in _HANDSHAKE_HEADERS:
            upstream_headers.popall(name, None)
        # Refused as by the transports: aiohttp's writer would drop non-UTF-8 header bytes.
        check_sendable(upstream_headers)
        url = URL(target, encoded=True)  # the route's http(s):// URL, as the log names it
        try:
            upstream = await self._session.ws_connect(
                url.with_scheme("wss" if url.scheme == "https" else "ws"),
                protocols=_offered_protocols(request.headers),
                headers=upstream_headers,
                autoclose=False,
                autoping=False,
                max_msg_size=self._max_message,
                compress=0,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_HANDSHAKE),
            )
        except aiohttp.WSServerHandshakeError as exc:
            # The upstream answered, but not with a WebSocket: whatever it said (404, 403, a
            # plain 200), the client's socket cannot be relayed.
            said = f"the upstream refused the WebSocket handshake (status {exc.status})"
            raise self._failed(route, url, Reason.UPSTREAM_UNAVAILABLE, said, said) from None
        except aiohttp.ServerTimeoutError as exc:
            if isinstance(exc, aiohttp.ConnectionTimeoutError):
                said = "connecting timed out"
                error = f"{said}, connect_timeout {self._config.forward.connect_timeout:g}s"
                raise self._failed(route, url, Reason.UPSTREAM_UNAVAILABLE, error, said) from None
            error = (
                f"handshake answer timed out, read_timeout {self._config.forward.read_timeout:g}s"
            )
            raise self._failed(route, url, Reason.UPSTREAM_TIMEOUT, error) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # Refused, reset, or TLS: an untrusted wss:// certificate or a wrong host name.
            error = describe_failure(exc)
            raise self._failed(route, url, Reason.UPSTREAM_UNAVAILABLE, error) from None
        chosen = upstream.protocol
        client = _ClientSocket(
            protocols=(chosen,) if chosen is not None else (),  # the upstream's choice
            autoping=False,
            autoclose=False,
            max_msg_size=self._max_message,
            compress=False,
            timeout=CLOSE_HANDSHAKE,
        )
        try:
            await client.prepare(request)
        except ConnectionError:  # the client left before its handshake's answer went out
            await upstream.close(code=WSCloseCode.GOING_AWAY)
            raise Refusal(Reason.CLIENT_CLOSED, close_connection=True) from None
        except BaseException:
            await upstream.close(code=WSCloseCode.GOING_AWAY)
            raise
        now = self._clock.now()
        socket = _Socket(client, upstream, token, idle_timeout, extend, now)
        socket.handler = request.protocol
        socket.client_transport = request.transport
        connection = _upstream_connection(upstream)
        if connection is not None:
            socket.upstream_transport = connection.transport
            socket.upstream_protocol = connection.protocol
        client[HANDSHAKE_SECONDS] = time.perf_counter() - started
        opened = time.perf_counter()
        end = await self._run(socket, route)
        fields: dict[str, object] = {
            "websocket": {
                "duration_s": round(time.perf_counter() - opened, 3),
                "messages_in": socket.messages_in,
                "messages_out": socket.messages_out,
                "close_reason": end.reason,
                "close_code": end.client[0] if end.client else end.sent or client.close_code,
                "subprotocol": chosen,
            }
        }
        client[LOG_FIELDS] = fields
        return client

    # -- one socket ------------------------------------------------------------------------

    async def _run(self, socket: _Socket, route: str) -> _End:
        token = socket.token
        key = token.track_key if token is not None else None
        if key is not None:
            self._users[key] = self._users.get(key, 0) + 1
        if token is not None:
            socket.watched = self._deadlines.watch(
                token,
                lambda reason: socket.stop(_deadline_end(reason)),
                socket.wake.set,
            )
            self._schedule(socket)
        self._open.add(socket)
        metrics.WEBSOCKETS_OPEN.inc()
        pumps = (
            asyncio.create_task(self._from_client(socket)),
            asyncio.create_task(self._from_upstream(socket)),
        )
        for pump in pumps:
            pump.add_done_callback(lambda _task: socket.wake.set())
        if self._closing_all:
            socket.stop(_End("drain", (WSCloseCode.GOING_AWAY, "drain"), _going_away("drain")))
        end: _End | None = None
        try:
            while True:
                await socket.wake.wait()
                socket.wake.clear()
                end = socket.end or _finished(pumps)
                if end is not None:
                    break
                await self._activity(socket, key)
                end = socket.end
                if end is not None:
                    break
        finally:
            # No end: the handler itself was cancelled (the drain's cleanup after
            # shutdown_grace); the cancellation goes on once the socket is cleaned up.
            final = end or _End("cancelled", _going_away("drain"), _going_away("drain"))
            try:
                for pump in pumps:
                    pump.cancel()
                await asyncio.wait(pumps, timeout=CLOSE_HANDSHAKE)
                await self._close_both(socket, final)
            finally:
                # Never skipped (each side is closed or aborted by now, or is being: a
                # cancellation of this task aborts both in `_close_side`).
                self._forget(socket, key, route, final)
        return final

    def _forget(self, socket: _Socket, key: str | None, route: str, final: _End) -> None:
        self._open.discard(socket)
        metrics.WEBSOCKETS_OPEN.dec()
        if socket.watched is not None:
            self._deadlines.forget(socket.watched)
        if key is not None:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
                self._written.pop(key, None)
        self._count_close(route, final.reason)
        token = socket.token
        if token is not None and final.reason not in ("client_closed", "upstream_closed"):
            log.info(
                "websocket closed: %s (jti=%s sub=%s)",
                final.reason,
                quoted(token.jti),
                quoted(token.sub),
            )

    def _count_close(self, route: str, reason: str) -> None:
        counter = self._closes.get((route, reason))
        if counter is None:
            counter = self._closes[(route, reason)] = metrics.WEBSOCKET_CLOSES.labels(route, reason)
        counter.inc()

    async def _close_both(self, socket: _Socket, end: _End) -> None:
        """Send each side its close frame and wait for its answer, both within
        CLOSE_HANDSHAKE (+0.5 s); a side that cannot be closed so (it does not read, so the
        frame cannot be written; it does not answer) is aborted (a reset), never left open."""
        sides = (
            _close_side(socket.client, end.client, socket.client_transport, socket.handler),
            _close_side(
                socket.upstream, end.upstream, socket.upstream_transport, socket.upstream_protocol
            ),
        )
        results = await asyncio.gather(*sides, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result  # this task's own cancellation (both sides aborted by then)

    async def _from_client(self, socket: _Socket) -> _End:
        client, upstream = socket.client, socket.upstream
        note = self._note_activity if socket.extend and socket.token is not None else None
        while True:
            msg = await client.receive()
            try:
                relayed = await _pass_on(msg, upstream)
            except (ConnectionError, aiohttp.ClientError, RuntimeError):
                return _End("upstream_closed", (WSCloseCode.BAD_GATEWAY, "upstream_closed"), None)
            if relayed is None:
                if msg.type is WSMsgType.CLOSE:
                    code = _sendable(msg.data)
                    return _End("client_closed", (code, ""), (code, msg.extra or ""))
                return _broken(msg.data, "client")
            if relayed:
                socket.messages_in += 1
                if note is not None:
                    note(socket)

    async def _from_upstream(self, socket: _Socket) -> _End:
        client, upstream = socket.client, socket.upstream
        while True:
            msg = await upstream.receive()
            try:
                relayed = await _pass_on(msg, client)
            except (ConnectionError, aiohttp.ClientError, RuntimeError):
                return _End("client_closed", None, _going_away("client_closed"))
            if relayed is None:
                if msg.type is WSMsgType.CLOSE:
                    code = _sendable(msg.data)
                    return _End("upstream_closed", (code, msg.extra or ""), (code, ""))
                return _broken(msg.data, "upstream")
            if relayed:
                socket.messages_out += 1

    # -- activity and idleness -------------------------------------------------------------

    def _note_activity(self, socket: _Socket) -> None:
        """A client message: activity, written to the store at once if this token's last
        write is an interval old, else when it is (coalesced)."""
        now = self._clock.now()
        socket.last_local = now
        first = socket.pending is None
        socket.pending = now
        if first:
            assert socket.token is not None
            due = self._written.get(socket.token.track_key, -math.inf) + self._interval
            if now >= due:
                socket.wake.set()
            else:
                socket.wake_at(due)

    async def _activity(self, socket: _Socket, key: str | None) -> None:
        """Write pending activity when due, check idleness against the store when due, and
        set the next wake-up."""
        token = socket.token
        if token is None or key is None:
            return
        now = self._clock.now()
        pending = socket.pending
        if pending is not None and now >= self._written.get(key, -math.inf) + self._interval:
            socket.pending = None
            result = await self._touch(socket, token, pending, extend=True)
            self._written[key] = self._clock.now()
            if result is None:
                if socket.end is not None:
                    return
                socket.pending = socket.pending or pending  # retried after an interval
            else:
                socket.known_last = max(socket.known_last, pending, result.last_activity)
        if socket.pending is not None:
            socket.known_last = max(socket.known_last, socket.pending)  # local, written soon
        now = self._clock.now()
        if policy.is_idle(socket.known_last, now, socket.idle_timeout):
            result = await self._touch(socket, token, now, extend=False)
            if socket.end is not None:
                return
            if result is None:  # store failed, on_error allowed it: ask again in an interval
                socket.known_last = now - socket.idle_timeout + self._interval
            else:
                socket.known_last = max(socket.known_last, result.last_activity)
        self._schedule(socket)

    def _schedule(self, socket: _Socket) -> None:
        watched = socket.watched
        if watched is None:
            return
        # Idle from strictly after known_last + idle_timeout: the first tick past it checks
        # (the ticker wakes from `wake_at` on). A store check only happens once the clock is
        # past that point, and its answer moves known_last, so checks never repeat faster
        # than the clock moves (nor faster than a TICK).
        when = math.nextafter(socket.known_last + socket.idle_timeout, math.inf)
        if socket.pending is not None and socket.token is not None:
            flush = self._written.get(socket.token.track_key, -math.inf) + self._interval
            when = min(when, flush)
        watched.wake_at = when

    async def _touch(
        self, socket: _Socket, token: VerifiedToken, at: float, *, extend: bool
    ) -> TouchResult | None:
        """One store round trip; None when the store failed and on_error let the socket
        live (or ended it: then `socket.end` is set)."""
        touch = policy.touch_for(token, self._policy, socket.idle_timeout, at, extend=extend)
        try:
            result = await self._store.check_and_touch(touch)
        except StoreUnavailable:
            now = self._clock.now()
            if self._on_error == "allow":
                metrics.STORE_FALLBACKS.labels("allow").inc()
                log.warning(
                    "store unavailable: websocket of jti=%s kept unchecked", quoted(token.jti)
                )
                return None
            if self._on_error == "grace" and not policy.is_idle(
                socket.last_local, now, socket.idle_timeout
            ):
                metrics.STORE_FALLBACKS.labels("grace").inc()
                return None
            code = Reason.STORE_UNAVAILABLE.code
            socket.stop(_End(code, (WSCloseCode.INTERNAL_ERROR, code), _going_away(code)))
            return None
        if result.idle:
            code = policy.idle_reason(self._policy).code
            socket.stop(_End(code, (WSCloseCode.POLICY_VIOLATION, code), _going_away(code)))
        return result


async def _close_side(
    ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    frame: tuple[int, str] | None,
    transport: asyncio.Transport | None,
    protocol: object,
) -> None:
    """Close one side: its close frame (None: it closed already, an empty 1000 answers),
    its answer awaited, all within CLOSE_HANDSHAKE + 0.5 s; else its connection is aborted.

    A CancelledError out of `ws.close()` is not always this task's: cancelling the pump that
    was blocked writing to this side also cancels the protocol's drain future, which aiohttp
    shares between writers, so the close's own drain then raises it at once. Only when this
    task is being cancelled (`cancelling()`) does it propagate, after the abort."""
    code, reason = frame if frame is not None else (WSCloseCode.OK, "")
    try:
        _reset_drain(protocol)
        async with asyncio.timeout(CLOSE_HANDSHAKE + 0.5):
            await ws.close(code=code, message=reason.encode()[:123])
    except asyncio.CancelledError:
        _abort(transport)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception:  # timed out (the peer reads nothing or never answers), or gone
        _abort(transport)
    else:
        if transport is not None and transport.get_write_buffer_size():
            # aiohttp closed it (close(): the buffer is flushed first); bounded all the same.
            asyncio.get_running_loop().call_later(CLOSE_HANDSHAKE, reset, transport)


def _abort(transport: asyncio.Transport | None) -> None:
    if transport is not None:
        reset(transport)  # a no-op on a connection already lost


def _reset_drain(protocol: object) -> None:
    """Forget the drain future a cancelled pump left cancelled on this side's protocol
    (aiohttp's `BaseProtocol._drain_waiter`, resolved only on the next resume), so that a
    client that is slow but reads still gets its close frame instead of a reset. Without that
    attribute (another aiohttp) the close fails at once and the connection is aborted."""
    waiter = getattr(protocol, "_drain_waiter", None)
    if isinstance(waiter, asyncio.Future) and waiter.cancelled():
        protocol._drain_waiter = None  # type: ignore[attr-defined]


def _upstream_connection(upstream: aiohttp.ClientWebSocketResponse) -> Connection | None:
    """The upstream socket's connection (aiohttp keeps it on the handshake's response, where
    `get_extra_info` reads it); None if an aiohttp upgrade moves it: then an upstream that
    cannot be closed in time is left to aiohttp's own close."""
    connection = getattr(getattr(upstream, "_response", None), "connection", None)
    return connection if isinstance(connection, Connection) else None


def _going_away(reason: str) -> tuple[int, str]:
    return (WSCloseCode.GOING_AWAY, reason)


def _deadline_end(reason: Reason) -> _End:
    return _End(reason.code, (WSCloseCode.POLICY_VIOLATION, reason.code), _going_away(reason.code))


def _finished(pumps: tuple[asyncio.Task[_End], ...]) -> _End | None:
    for pump in pumps:
        if pump.done():
            if pump.cancelled():
                return _End("cancelled", _going_away("drain"), _going_away("drain"))
            exc = pump.exception()
            if exc is not None:
                log.error("websocket relay failed", exc_info=exc)
                return _End(
                    "internal_error",
                    (WSCloseCode.INTERNAL_ERROR, "internal_error"),
                    _going_away(""),
                )
            return pump.result()
    return None


def _broken(data: Any, side: str) -> _End:
    """A side's connection ended without a close frame, sent a message over the limit, or (the
    client) an unmasked frame."""
    if isinstance(data, UnmaskedFrame) and side == "client":
        # aiohttp already closed the client's side with 1002.
        return _End(
            "unmasked_frame", None, _going_away("unmasked_frame"), sent=WSCloseCode.PROTOCOL_ERROR
        )
    if isinstance(data, WebSocketError) and data.code == WSCloseCode.MESSAGE_TOO_BIG:
        # aiohttp already closed the sender's side with 1009.
        if side == "client":
            return _End(
                "message_too_big",
                None,
                _going_away("message_too_big"),
                sent=WSCloseCode.MESSAGE_TOO_BIG,
            )
        return _End("message_too_big", (WSCloseCode.MESSAGE_TOO_BIG, "message_too_big"), None)
    if side == "client":
        return _End("client_closed", None, _going_away("client_closed"))
    return _End("upstream_closed", (WSCloseCode.BAD_GATEWAY, "upstream_closed"), None)


async def _pass_on(msg: aiohttp.WSMessage, sink: Any) -> bool | None:
    """Relay one frame to the other side: True for a message (text or binary, as sent), False
    for a ping or pong, None for a frame that ends this direction (close, error) and is the
    caller's to answer."""
    kind = msg.type
    if kind is WSMsgType.TEXT:
        await sink.send_str(msg.data)
    elif kind is WSMsgType.BINARY:
        await sink.send_bytes(msg.data)
    elif kind is WSMsgType.PING:
        await sink.ping(msg.data)
        return False
    elif kind is WSMsgType.PONG:
        await sink.pong(msg.data)
        return False
    else:
        return None
    return True
