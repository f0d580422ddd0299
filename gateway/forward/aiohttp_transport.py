"""aiohttp's `ClientSession` behind the `Transport` interface: for requests with a body,
https upstreams and upstream URLs with credentials (everything the lean pool does not do).

aiohttp's exceptions become the one `UpstreamError` family here, so the relay never sees
them; their text is kept only where it names the connection, never the request's URL.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.config import Forward
from gateway.forward.headers import UpstreamHeaders
from gateway.forward.transport import (
    CHUNK,
    SMALL_BODY,
    Body,
    RequestFields,
    UpstreamBroken,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)

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
            connector=aiohttp.TCPConnector(
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
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
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
            if response.status == 101:
                # Only the WebSocket relay asks to switch protocols (aiohttp's client hands a 101
                # over as a response): relayed, the client's connection would become a tunnel to
                # the upstream that no later request of it is decided on.
                response.close()
                raise UpstreamBroken("the upstream switched protocols unasked")
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
