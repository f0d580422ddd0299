"""aiohttp's `ClientSession` behind the `Transport` interface: for requests with a body,
https upstreams and upstream URLs with credentials (everything the lean pool does not do).

aiohttp's exceptions become the one `UpstreamError` family here, so the relay never sees
them; their text is kept only where it names the connection, never the request's URL.

aiohttp's response parser is lenient where the lean pool's is not: each response head is held
to the lean pool's rules (the checks in `transport`) as far as aiohttp hands it over, so a
response gets one answer whichever transport carried it. Its pool is held to the lean pool's
rule too (`_OneAnswer`): a connection that receives a byte after its response was complete and
before the next request is closed, never to be read as another request's answer.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, cast

import aiohttp
from aiohttp import hdrs
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import RawResponseMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDict
from yarl import URL

from gateway.config import Forward
from gateway.forward.headers import UpstreamHeaders
from gateway.forward.transport import (
    CHUNK,
    CONTROLS,
    SMALL_BODY,
    UNRELAYABLE_RESPONSE,
    Body,
    RequestFields,
    UpstreamBroken,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
    check_sendable,
    check_status_line,
    check_transfer_codings,
    content_length,
    is_utf8,
)

if TYPE_CHECKING:
    from aiohttp.connector import Connection

_FAILURES = (TimeoutError, aiohttp.ClientError, OSError)


def _upstream_error(exc: BaseException, config: Forward, *, answered: bool) -> UpstreamError:
    """The family member for an aiohttp (or socket) failure; `answered` once the response
    head has arrived, when a connection error means the response broke off."""
    text = type(exc).__name__
    # An OSError's text names host and port. aiohttp's timeouts (OSErrors too) name the request's
    # URL, query and all, as do ClientResponseError, InvalidURL and ClientPayloadError.
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # covers waiting for a pool slot
        return UpstreamConnectTimeout(f"{text}, connect_timeout {config.connect_timeout:g}s")
    if isinstance(exc, TimeoutError):  # ServerTimeoutError (sock_read) is one
        return UpstreamTimeout(f"{text}, read_timeout {config.read_timeout:g}s")
    if isinstance(exc, aiohttp.ClientConnectorError):  # "Cannot connect to host h:p ..."
        text += f": {exc.os_error}"
    elif isinstance(exc, OSError) and not isinstance(exc, aiohttp.ClientError) and str(exc):
        text += f": {exc}"  # a socket's own error: errno and text, no URL
    # Any other ClientOSError goes by class: "Can not write request body for <the URL>".
    return UpstreamBroken(text) if answered else UpstreamUnreachable(text)


def _check_head(response: aiohttp.ClientResponse) -> None:
    """Refuse (`UpstreamBroken`) what the lean pool refuses and aiohttp's parser lets through,
    as far as a `ClientResponse` shows it. It does not show, so this path passes: an obs-fold
    (aiohttp joins the lines, keeping the whitespace, as RFC 9112 §5.2 allows a proxy to),
    bare LF line ends, and how many interim responses came first."""
    version = response.version
    release = "?" if version is None else f"{version.major}.{version.minor}"
    check_status_line(release, response.status, response.reason or "")
    if response.status < 200:
        raise UpstreamBroken("a 1xx status as the final response")
    headers = response.headers
    # Every name and value in one scan, HTAB (allowed in values) between them.
    text = "\t".join(itertools.chain.from_iterable(headers.items()))
    if CONTROLS.search(text):
        raise UpstreamBroken("a control character in a response header")
    # A byte that is not UTF-8 is a lone surrogate here, which the relay's writer would drop.
    if not is_utf8(text) or not is_utf8(response.reason or ""):
        raise UpstreamBroken(UNRELAYABLE_RESPONSE)
    lengths = headers.getall(hdrs.CONTENT_LENGTH, [])
    codings = headers.getall(hdrs.TRANSFER_ENCODING, [])
    # aiohttp's C parser refuses both as llhttp does; its pure-Python one takes repeats.
    if len(lengths) > 1:
        raise UpstreamBroken("repeated Content-Length")
    if lengths and codings:
        raise UpstreamBroken("Content-Length with Transfer-Encoding")
    length = content_length(lengths[0]) if lengths else 0
    if response.method != "HEAD" and response.status not in (204, 304):
        if codings:
            check_transfer_codings(release, codings)
    elif length or codings:
        # A body announced where none is read may still be written, later (the lean pool's
        # `ResponseReader.on_headers_complete`): raised to have the connection closed.
        raise _AnnouncedBody


class _AnnouncedBody(Exception):
    """A bodiless response (to a HEAD, or 204, 304) that announced a body: relayed, but its
    connection is never reused."""


class _CheckedResponse(aiohttp.ClientResponse):
    """A `ClientResponse` whose head is checked as soon as it is parsed. aiohttp has pooled
    the connection again by then if the body was complete already: a refused response's is
    closed here, before another request can take it (and read what follows as its answer)."""

    async def start(self, connection: Connection) -> aiohttp.ClientResponse:
        protocol = connection.protocol  # `connection` lets go of it once released
        await super().start(connection)
        try:
            _check_head(self)
        except UpstreamBroken:
            if protocol is not None:
                protocol.close()
            raise  # and aiohttp closes the response, and the connection if still held
        except _AnnouncedBody:
            if protocol is not None:
                protocol.close()  # nothing left to read: the response stands
        return self


class _OneAnswer(ResponseHandler):
    """aiohttp's protocol, held to the lean pool's rule (`http1._Connection.data_received`):
    bytes that arrive once the final response to the last request is complete, and before the
    next request, are nobody's answer. aiohttp would parse and queue them for the next request
    on the pooled connection (another user's); here they are never parsed and the connection
    closes (the pool skips a closed one). The same goes for bytes after a bodiless response
    (HEAD, 204, 304) in its own read, which aiohttp would refuse with the response (the lean
    pool relays it): a head is parsed apart from what follows it in a read."""

    _asked = False  # a request went out on it (`set_response_params`) ...
    _answer: StreamReader | None = None  # ... and this is its final response's body, once parsed

    def set_response_params(self, **options: Any) -> None:
        self._asked, self._answer = True, None
        super().set_response_params(**options)

    def feed_data(self, data: tuple[RawResponseMessage, StreamReader], size: int = 0) -> None:
        if data[0].code >= 200:  # interim responses come before the answer
            self._answer = data[1]
        super().feed_data(data, size)

    def _answered(self) -> bool:
        """Whether the last request's final response is complete (or none was asked for)."""
        answer = self._answer
        return not self._asked or (answer is not None and answer.is_eof())

    def data_received(self, data: bytes) -> None:
        if not data:  # aiohttp resuming a paused body
            super().data_received(data)
            return
        # Still reading heads: one that ends in this read is parsed first, so that what
        # follows a complete bodiless answer is seen as the unasked bytes it is.
        while self._asked and self._answer is None and not self.upgraded:
            end = data.find(b"\r\n\r\n") + 4
            if not 4 <= end < len(data):
                break
            super().data_received(data[:end])
            if self.transport is None or self.exception() is not None:
                return  # refused: closed
            data = data[end:]
        if self._answered():
            self.force_close()
            self.close()
            return
        super().data_received(data)


class _Connector(aiohttp.TCPConnector):
    """aiohttp's pool, its connections `_OneAnswer`s (aiohttp's protocol factory is a
    `functools.partial` of `ResponseHandler`, which this one replaces)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        factory = functools.partial(_OneAnswer, loop=self._loop)
        self._factory = cast("functools.partial[ResponseHandler]", factory)


class AiohttpResponse:
    """An aiohttp response as an `UpstreamResponse`."""

    __slots__ = ("_config", "_response", "body", "headers", "reason", "status")

    def __init__(self, response: aiohttp.ClientResponse, body: bytes | None, config: Forward):
        self._response = response
        self._config = config
        self.status = response.status
        self.reason = response.reason or ""
        self.headers: CIMultiDict[str] = CIMultiDict(response.headers)
        self.body = body

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK):
                yield chunk
        except _FAILURES as exc:
            raise _upstream_error(exc, self._config, answered=True) from exc

    def close(self) -> None:
        self._response.release()


class AiohttpTransport:
    """One `ClientSession` for every upstream; targets are absolute URLs."""

    def __init__(self, config: Forward) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        config = self._config
        self._session = aiohttp.ClientSession(
            connector=_Connector(
                limit=config.pool_size, keepalive_timeout=config.keepalive_timeout, ttl_dns_cache=10
            ),
            # `connect` bounds waiting for a free pooled connection as well as connecting.
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=config.connect_timeout,
                sock_connect=config.connect_timeout,
                sock_read=config.read_timeout,
            ),
            auto_decompress=False,  # pass bodies through exactly as the upstream sent them
            response_class=_CheckedResponse,
            cookie_jar=aiohttp.DummyCookieJar(),
            # The client's fields and ours, as the lean pool sends: none of aiohttp's own.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self, method: str, target: str, headers: RequestFields, body: Body = None
    ) -> AiohttpResponse:
        assert self._session is not None, "AiohttpTransport.start() was not awaited"
        if isinstance(headers, UpstreamHeaders):
            headers = headers.merged()
        check_sendable(headers)  # aiohttp's writer drops lone surrogates (non-UTF-8 bytes)
        response = None
        try:
            response = await self._session.request(
                method,
                URL(target, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=None,
            )
            length = response.content_length
            bodiless = method == "HEAD" or response.status in (204, 304)
            if length is None or length > SMALL_BODY or bodiless:
                return AiohttpResponse(response, None, self._config)
            whole = await response.read()
            response.release()
            return AiohttpResponse(response, whole, self._config)
        except _FAILURES as exc:
            if response is not None:
                response.release()
            raise _upstream_error(exc, self._config, answered=response is not None) from exc
