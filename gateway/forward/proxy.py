"""Forwarding: one relay over two transports, streaming both ways.

Bodyless requests to http:// upstreams (the common case) go through the lean keep-alive pool
(`forward/http1.py`), one per upstream origin; requests with a body, https upstreams and URLs
with credentials through aiohttp (`forward/aiohttp_transport.py`). Whichever answered, the
response is relayed the same way: a small body in one piece, anything else chunk by chunk
(never read whole). A request body is cut off at `max_body`; on a route with auth required, a
form-encoded one is also cut off at an `access_token` parameter (`FormTokenScan`).
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NamedTuple

from aiohttp import HttpVersion11, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from gateway import metrics
from gateway.config import Forward
from gateway.forward.aiohttp_transport import AiohttpTransport
from gateway.forward.headers import RequestHeaders, UpstreamHeaders, response_headers
from gateway.forward.http1 import UpstreamPool
from gateway.forward.transport import (
    CHUNK,
    SMALL_BODY,
    Transport,
    UpstreamError,
    UpstreamFailureLog,
)
from gateway.metrics import BatchedHistogram
from gateway.reasons import Reason, Refusal
from gateway.tokens.extract import _has_query_token  # the query's rule, applied to form bodies

if TYPE_CHECKING:
    from gateway.routing import Match


FORM = "application/x-www-form-urlencoded"
_FORM_SEPARATOR = re.compile(rb"[&;]")  # as `_has_query_token` splits
# What `str.strip()` removes (`str.isspace`) around a parameter name.
_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


def _percent(byte: int) -> tuple[bytes, ...]:
    """`%XX` for `byte`, one pattern a character (a hex letter in either case)."""
    hexes = f"{byte:02x}"
    return (b"%", *(f"[{d}{d.upper()}]".encode() if d.isalpha() else d.encode() for d in hexes))


def _ways(chars: str) -> list[tuple[bytes, ...]]:
    """How a form body spells each of `chars`, as `unquote_plus` reads it: raw UTF-8,
    percent-encoded UTF-8, `+` for a space; one pattern a character of the spelling."""
    ways = []
    for char in chars:
        raw = char.encode()
        ways.append(tuple(re.escape(bytes([byte])) for byte in raw))
        ways.append(tuple(part for byte in raw for part in _percent(byte)))
        if char == " ":
            ways.append((rb"\+",))
    return ways


def _one_of(ways: list[tuple[bytes, ...]]) -> bytes:
    """A pattern for any of `ways`, as a trie: at each byte, one cheap test per distinct next
    byte (a flat alternation retries each way from its start, a hundred times slower here)."""
    heads: dict[bytes, list[tuple[bytes, ...]]] = {}
    for way in ways:
        heads.setdefault(way[0], []).append(way[1:])
    ends: list[bytes] = []  # ways that end with their head
    branches: list[bytes] = []
    for head, rests in heads.items():
        longer = [rest for rest in rests if rest]
        if not longer:
            ends.append(head)
        else:
            branches.append(head + _one_of(longer) + (b"?" if len(longer) < len(rests) else b""))
    if len(ends) > 1 and not any(head.startswith(b"[") for head in ends):
        ends = [b"[" + b"".join(ends) + b"]"]  # one set test for the bytes that end a way
    return b"(?:" + b"|".join(ends + branches) + b")"


_SPACES = _one_of(_ways(_WHITESPACE)) + b"*"
# A parameter whose name the query rule might read as `access_token` (spaces stripped, any
# case, the Kelvin sign a `k` to `lower()`, ` `, `.` and an unclosed `[` as `_`, anything from
# a `[` or a NUL on dropped), from the separator before it: searched in the body with a
# separator put in front. A superset: `_has_query_token` decides on what it finds.
_TOKEN_NAME = re.compile(
    b"[&;]"
    + _SPACES
    + b"".join(_one_of(_ways(c)) for c in ("aA", "cC", "cC", "eE", "sS", "sS", "_ .["))
    + b"".join(_one_of(_ways(c)) for c in ("tT", "oO", "kK\u212a", "eE", "nN"))
    + b"(?:"
    + _one_of(_ways("["))
    + b"|"
    + _SPACES
    + rb"(?:[=&;]|\Z|"
    + _one_of(_ways("\0"))
    + b"))"
)
# A body holding none of these once lower-cased (a raw `token`, a percent-encoded letter of
# it, a Kelvin sign) has no name that spells `token`: the common case, a few memchr scans.
_TOKEN_HINTS = (
    b"token",
    b"to\xe2\x84\xaaen",
    b"%e2%84%aa",
    *(b"%%%02x" % ord(char) for char in "tokenTOKEN"),
)


def is_form(request: web.BaseRequest) -> bool:
    """Whether a Content-Type of the request declares a form-encoded body (RFC 6750 §2.2's
    carrier of a token): in any case, whatever its parameters (`; charset=UTF-8`)."""
    return any(
        value.partition(";")[0].strip(" \t").lower() == FORM
        for value in request.headers.getall("Content-Type", ())
    )


@functools.lru_cache(maxsize=256)
def _ascii_transparent(charset: str) -> bool:
    """Whether a charset reads ASCII bytes as themselves (`_reads_ascii_as_ascii`): then the
    bytes the scan reads are the characters the upstream reads. An unknown charset is no known
    reading. Cached per name, the test itself per codec (aliases share it)."""
    try:
        codec = codecs.lookup(charset)
    except LookupError:
        return False
    return _reads_ascii_as_ascii(codec.name)


_ASCII = [bytes([byte]) for byte in range(0x80)]


@functools.lru_cache(maxsize=256)
def _reads_ascii_as_ascii(codec_name: str) -> bool:
    """Whether every ASCII byte, alone and next to any other, decodes to itself. Single bytes
    catch UTF-16/32 (no character alone), UTF-7 (`+AF8-` is a `_`) and ISO-2022's ESC shifts;
    pairs catch escapes (`raw_unicode_escape` reads `\\u0065` as `e`; Django decodes a form
    with any codec Python knows). Some 15 ms, once per codec."""
    decode = codecs.lookup(codec_name).decode
    try:
        return all(decode(one)[0] == one.decode() for one in _ASCII) and all(
            decode(one + two)[0] == (one + two).decode() for one in _ASCII for two in _ASCII
        )
    except (ValueError, TypeError):  # a UnicodeDecodeError; a bytes-to-bytes codec (hex)
        return False


def unscannable_form(request: web.BaseRequest) -> str | None:
    """Why a form body could hold an `access_token` the scan cannot see, or None: compressed
    (Express and others inflate it; `max_body` would bound only the compressed size), or in
    a charset that is not ASCII-transparent (ASP.NET Core decodes forms with it)."""
    for coding in request.headers.getall("Content-Encoding", ()):
        if any(token.strip(" \t").lower() not in ("", "identity") for token in coding.split(",")):
            return "a compressed form body is not accepted"
    for value in request.headers.getall("Content-Type", ()):
        for parameter in value.split(";")[1:]:
            name, _, charset = parameter.partition("=")
            if name.strip(" \t").lower() == "charset":
                charset = charset.strip(" \t").strip('"').lower()
                if len(charset) > 40 or not _ascii_transparent(charset):
                    return "a form body in that charset is not accepted"
    return None


def _holds_token(form: bytes) -> bool:
    """Whether one of the whole parameters in `form` is an access_token by the query rule
    (`_has_query_token`). That rule decides, but only for the parameters `_TOKEN_NAME` finds
    in C: never a Python step per parameter, whatever the body holds."""
    lowered = form.lower()
    if not any(hint in lowered for hint in _TOKEN_HINTS):
        return False
    form = b"&" + form
    found = _TOKEN_NAME.search(form)
    while found is not None:
        after = _FORM_SEPARATOR.search(form, found.end() - 1)
        end = len(form) if after is None else after.start()
        if _has_query_token(form[found.start() + 1 : end].decode("utf-8", "replace")):
            return True
        found = _TOKEN_NAME.search(form, end)
    return False


class FormTokenScan:
    """Finds an `access_token` parameter in a form-encoded body fed piece by piece, under the
    query's spelling rules (`_has_query_token`: percent-encoded, any case, after `;`, PHP's
    `access.token`): what it finds in a body it would find in the same text as a query.

    Only a parameter name is carried from one piece to the next (a value is skipped up to the
    next separator), so a streamed body is judged without being held; only a name that never
    ends (no `=`, `&` or `;`) grows, up to `max_body`. Pieces are cut at those ASCII bytes, so
    no UTF-8 sequence is ever decoded in two halves."""

    __slots__ = ("_in_value", "_name")

    def __init__(self) -> None:
        self._name = bytearray()  # the start of a parameter whose name has not ended yet
        self._in_value = False  # inside a value: nothing matters before the next separator

    def feed(self, piece: bytes, *, final: bool = False) -> bool:
        """Whether the body holds an access_token parameter, judged as far as `piece`
        (`final`: the body ends with it)."""
        if self._in_value:
            separator = _FORM_SEPARATOR.search(piece)
            if separator is None:
                return False
            piece, self._in_value = piece[separator.end() :], False
        last = max(piece.rfind(b"&"), piece.rfind(b";"))
        if last >= 0:  # whole parameters, the first one continuing the carried name
            whole, self._name = bytes(self._name) + piece[:last], bytearray()
            if _holds_token(whole):
                return True
            piece = piece[last + 1 :]
        equals = piece.find(b"=")
        if equals >= 0:  # the name ended: its value is skipped
            name, self._name = bytes(self._name) + piece[:equals], bytearray()
            self._in_value = True
            return _holds_token(name)
        self._name += piece
        if final:  # a last parameter without `=`: a name alone, as the query rule reads it
            name, self._name = bytes(self._name), bytearray()
            return _holds_token(name)
        return False


class BodyLimit:
    """Reads a request body: cut off once it grows past `max_body` (413), or once it goes
    `timeout` seconds without a byte (408, as nginx's client_body_timeout), or, with `scan`,
    at the piece that holds an `access_token` parameter (400 malformed_request). A body that
    ends within SMALL_BODY is read whole before anything goes upstream (`read_small`), so a
    client that dribbles it holds no upstream connection meanwhile; a larger one streams on."""

    def __init__(
        self,
        request: web.BaseRequest,
        max_body: int,
        timeout: float,
        scan: FormTokenScan | None = None,
    ) -> None:
        self._content = request.content
        self._max_body = max_body
        self._timeout = timeout
        self._scan = scan
        self._length = request.content_length  # declared: its last byte ends the body
        self._read: list[bytes] = []  # what read_small took, for chunks() to send first
        self._total = 0
        self.refusal: Refusal | None = None  # why the body was cut off, once it was

    async def _next(self) -> bytes:
        """The next piece (b"" at the end), within the limits."""
        try:
            async with asyncio.timeout(self._timeout):
                chunk = await self._content.read(CHUNK)
        except TimeoutError:
            # The body is dead: so marked, aiohttp sends the 408 and closes, instead of lingering
            # (up to 10 s) to read what the client stopped sending.
            self._content.set_exception(TimeoutError("server.body_timeout"))
            metrics.CLIENT_TIMEOUTS.labels("body_timeout").inc()
            self.refusal = Refusal(Reason.REQUEST_TIMEOUT, close_connection=True)
            raise self.refusal from None
        except (ConnectionError, HttpProcessingError):
            # The client went away (or broke its framing) before its body was complete: no
            # fault of the gateway's or the upstream's, and nobody left to answer.
            self.refusal = Refusal(Reason.CLIENT_CLOSED, close_connection=True)
            raise self.refusal from None
        self._total += len(chunk)
        if self._total > self._max_body:
            self.refusal = Refusal(Reason.PAYLOAD_TOO_LARGE)
            raise self.refusal
        scan = self._scan
        # Judged before the piece goes on: the upstream never gets the parameter's name, and
        # a body cut off here never ends (as for max_body, the upstream connection is aborted).
        if scan is not None and scan.feed(chunk, final=not chunk or self._total == self._length):
            self.refusal = Refusal(
                Reason.MALFORMED_REQUEST, "a token in the form body is not accepted"
            )
            raise self.refusal
        return chunk

    async def read_small(self) -> bytes | None:
        """The whole body when it ends within SMALL_BODY bytes, else None (what was read is
        then the start of `chunks()`). Raises the refusal."""
        while self._total <= SMALL_BODY:
            chunk = await self._next()
            if not chunk:
                body, self._read = b"".join(self._read), []
                return body
            self._read.append(chunk)
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        read, self._read = self._read, []
        for chunk in read:
            yield chunk
        while chunk := await self._next():
            yield chunk


def _check_transfer_coding(request: web.BaseRequest) -> None:
    """The body goes upstream de-chunked and re-framed, so a transfer coding other than
    `chunked` (aiohttp accepts `gzip, chunked` and passes the body still gzip-coded) would
    arrive applied but undeclared: refused, not mangled (RFC 9112 §6.1). In HTTP/1.0
    Transfer-Encoding means faulty framing (same section). Either way the connection is closed
    after the refusal: another hop may have framed the body, and so what follows, otherwise."""
    codings = [
        coding.strip(" \t").lower()
        for value in request.headers.getall("Transfer-Encoding")
        for coding in value.split(",")
    ]
    if request.version < (1, 1) or codings != ["chunked"]:
        raise Refusal(Reason.UNSUPPORTED_TRANSFER_CODING, close_connection=True)


class _Upstream(NamedTuple):
    """How a route's upstream URL is reached by bodyless requests: the transport, and what the
    target starts with (requests with a body go to aiohttp, the URL itself); its origin for
    the log."""

    bodyless: Transport
    bodyless_base: str
    origin: str  # scheme://host:port, no credentials or path
    # The URL's credentials are the upstream's authorization: a client's Authorization
    # cannot go along with them (aiohttp refuses both, and they would contradict).
    drops_authorization: bool


class Forwarder:
    def __init__(self, config: Forward, *, body_timeout: float = 15.0) -> None:
        self._config = config
        self._pool_options = {
            "limit": config.pool_size,
            "connect_timeout": config.connect_timeout,
            "read_timeout": config.read_timeout,
            "keepalive_timeout": config.keepalive_timeout,
        }
        self._body_timeout = body_timeout
        self._aiohttp = AiohttpTransport(config)
        self._pools: dict[tuple[str, int], UpstreamPool] = {}
        self._upstreams: dict[str, _Upstream] = {}  # route upstream URL -> how it is reached
        self._upstream_durations: dict[str, BatchedHistogram] = {}
        self.failures = UpstreamFailureLog()
        self.upstream_headers = RequestHeaders(config).for_request  # what goes upstream

    async def start(self) -> None:
        await self._aiohttp.start()

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        await self._aiohttp.close()

    def _upstream(self, upstream: str) -> _Upstream:
        """How a route's upstream URL is reached, worked out the first time it is forwarded to
        (then kept in `_upstreams`)."""
        url = URL(upstream)
        transport: Transport = self._aiohttp
        base = upstream
        # https, and credentials in the URL (aiohttp sends them as Basic auth), stay on aiohttp.
        if url.scheme == "http" and url.raw_host and url.port is not None and url.user is None:
            key = (url.raw_host, url.port)
            if key not in self._pools:
                self._pools[key] = UpstreamPool.for_url(url, **self._pool_options)
            transport, base = self._pools[key], "" if url.raw_path == "/" else url.raw_path
        found = self._upstreams[upstream] = _Upstream(
            transport, base, str(url.origin()), url.user is not None
        )
        return found

    def check_request(self, request: web.BaseRequest) -> None:
        """Refuse what the request head alone decides (a body declared over `max_body`).
        Called before any token or store work, so such a refused request is no activity."""
        if (request.content_length or 0) > self._config.max_body:
            raise Refusal(Reason.PAYLOAD_TOO_LARGE)
        if "Transfer-Encoding" in request.headers:
            _check_transfer_coding(request)

    async def forward(
        self,
        request: web.BaseRequest,
        match: Match,
        query: str,
        headers: UpstreamHeaders,
        request_id: str,
    ) -> web.StreamResponse:
        """`request` to its route's upstream: `match.upstream_path`, `query` (raw, without
        `?`), `headers` as `upstream_headers` made them."""
        base_url = match.route.upstream
        assert base_url is not None, "Gateway.handle refuses routes without an upstream"
        upstream = self._upstreams.get(base_url) or self._upstream(base_url)
        path = match.upstream_path + ("?" + query if query else "")
        if upstream.drops_authorization:
            headers.client.popall("Authorization", None)
        transport, target = upstream.bodyless, upstream.bodyless_base + path
        limit: BodyLimit | None = None
        body: bytes | AsyncIterator[bytes] | None = None
        if request.body_exists:
            transport, target = self._aiohttp, base_url + path
            # A second token in the body (RFC 6750 §2.2), which the upstream might use instead
            # of the one verified: refused where one in the query is (routes with auth).
            scan = None
            if match.route.auth == "required" and is_form(request):
                problem = unscannable_form(request)
                if problem is not None:  # judged from the head: no byte of the body is read
                    raise Refusal(Reason.MALFORMED_REQUEST, problem)
                scan = FormTokenScan()
            limit = BodyLimit(request, self._config.max_body, self._body_timeout, scan)
            if request.headers.get("Expect", "").lower() == "100-continue":
                # Only now, with the request routed, authorised and within max_body, does the
                # client get to send its body (RFC 9110 §10.1.1).
                try:
                    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                except ConnectionError:
                    raise _client_closed(request) from None
            body = await limit.read_small()  # before any upstream connection is taken
            if body is None:
                body = limit.chunks()
        started = time.perf_counter()
        try:
            response = await transport.request(request.method, target, headers, body)
        except UpstreamError as exc:
            if limit is not None and limit.refusal is not None:  # the client's body, cut off
                raise limit.refusal from None
            raise self.failures.refusal(match.label, upstream.origin, exc) from None
        durations = self._upstream_durations.get(match.label) or self._durations(match.label)
        durations.observe(time.perf_counter() - started)
        if limit is not None and limit.refusal is not None:
            response.close()
            raise limit.refusal
        whole = response.body is not None
        fields = response_headers(response.headers, request_id, whole_body=whole)
        reason = response.reason or None  # none sent: aiohttp writes the standard phrase
        if whole:
            # Small bodies (the common case) are relayed here, without another coroutine level.
            return web.Response(
                status=response.status, reason=reason, headers=fields, body=response.body
            )
        # Large, unsized or bodiless responses: relayed chunk by chunk, never held whole.
        out = web.StreamResponse(status=response.status, reason=reason, headers=fields)
        if request.version < HttpVersion11 and hdrs.CONTENT_LENGTH not in fields:
            # HTTP/1.0 has no chunked coding: the body ends where the connection does (RFC 9112
            # §6.3). aiohttp writes it so but keeps a keep-alive client's connection open, and
            # the next response would run on as part of this body.
            out.force_close()
        chunks = response.chunks()
        try:
            await out.prepare(request)
            async for chunk in chunks:
                await out.write(chunk)
            await out.write_eof()
            return out
        except UpstreamError as exc:
            # Headers are gone already: the only honest signal left is to cut the
            # connection; the log says why.
            context = "the response broke off after its head"
            self.failures.refusal(match.label, upstream.origin, exc, context)
            if request.transport is not None:
                request.transport.close()
            return out
        except ConnectionError:
            # Writing to the client failed: it went away (a cancelled download). The upstream
            # fails only with UpstreamError, so this is the client's side, no fault of ours.
            raise _client_closed(request) from None
        finally:
            await chunks.aclose()
            response.close()  # its connection is pooled only if the body was read to its end

    def _durations(self, label: str) -> BatchedHistogram:
        found = self._upstream_durations[label] = metrics.batched(
            metrics.UPSTREAM_DURATION.labels(label)
        )
        return found


def _client_closed(request: web.BaseRequest) -> Refusal:
    """The refusal for a client that went away while being written to: counted and logged
    `client_closed`, no traceback. Its rendering is never sent, whatever was sent before: the
    connection is aborted first, so aiohttp's attempt to write it fails (quietly)."""
    if request.transport is not None:
        request.transport.abort()
    return Refusal(Reason.CLIENT_CLOSED, "the client closed the connection", close_connection=True)
