"""aiohttp's `ClientSession` behind the `Transport` interface: for requests with a body,
https upstreams and upstream URLs with credentials (everything the lean pool does not do).

aiohttp's exceptions become the one `UpstreamError` family here, so the relay never sees
them; their text is kept only where it names the connection, never the request's URL.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.config import Forward
from gateway.forward.transport import (
    CHUNK,
    SMALL_BODY,
    UpstreamBroken,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)


def _upstream_error(exc: BaseException, *, answered: bool) -> UpstreamError:
    """The family member for an aiohttp (or socket) failure; `answered` once the response
    head has arrived, when a connection error means the response broke off."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # covers waiting for a pool slot
        return UpstreamConnectTimeout(_text(exc))
    if isinstance(exc, TimeoutError):  # ServerTimeoutError (sock_read) is one
        return UpstreamTimeout(_text(exc))
    if answered:
        return UpstreamBroken(_text(exc))
    return UpstreamUnreachable(_text(exc))


def _text(exc: BaseException) -> str:
    # ClientConnectionError texts name host and port; ClientResponseError, InvalidURL and
    # ClientPayloadError may name the request's URL: only their class is kept.
    if isinstance(exc, (OSError, aiohttp.ClientConnectionError)) and str(exc):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


class AiohttpResponse:
    """An aiohttp response as an `UpstreamResponse`."""

    __slots__ = ("_response", "body", "headers", "reason", "status")

    def __init__(self, response: aiohttp.ClientResponse, body: bytes | None) -> None:
        self._response = response
        self.status = response.status
        self.reason = response.reason or ""
        self.headers: CIMultiDict[str] = CIMultiDict(response.headers)
        self.body = body

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK):
                yield chunk
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _upstream_error(exc, answered=True) from exc

    def close(self) -> None:
        self._response.release()


class AiohttpTransport:
    """One `ClientSession` for every upstream; targets are absolute URLs."""

    def __init__(self, config: Forward) -> None:
        self._config = config
        # `connect` bounds waiting for a free pooled connection as well as connecting.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout,
            sock_connect=config.connect_timeout,
            sock_read=config.read_timeout,
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._config.pool_size,
            keepalive_timeout=self._config.keepalive_timeout,
            ttl_dns_cache=10,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,  # pass bodies through exactly as the upstream sent them
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | None = None,
    ) -> AiohttpResponse:
        assert self._session is not None, "AiohttpTransport.start() was not awaited"
        try:
            response = await self._session.request(
                method,
                URL(target, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=None,
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _upstream_error(exc, answered=False) from exc
        length = response.content_length
        bodiless = method == "HEAD" or response.status in (204, 304)
        if length is None or length > SMALL_BODY or bodiless:
            return AiohttpResponse(response, None)
        try:
            whole = await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _upstream_error(exc, answered=True) from exc
        finally:
            response.release()
        return AiohttpResponse(response, whole)
