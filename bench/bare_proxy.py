"""The reference: a bare aiohttp pass-through proxy, no auth, no store, no metrics.

Same server settings as gateway/serve.py (AppRunner, backlog) and the same ClientSession /
TCPConnector settings as gateway/forward/aiohttp_transport.py, on uvloop; small bodies are read
whole and returned, as the gateway does. That is the issue's reference ("bare").

`--client lean` forwards through the gateway's own lean client (gateway/forward/http1.py), as the
gateway does for bodyless requests: gateway / bare-lean is then what authentication, the
idle check and metrics cost on top of the same forwarding stack.

    python bench/bare_proxy.py --port 8001 --upstream http://127.0.0.1:8000 [--client lean]
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.forward.http1 import UpstreamPool

_DROP_RESPONSE = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


class BareProxy:
    def __init__(self, upstream: str) -> None:
        self._upstream = upstream.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=30, ttl_dns_cache=10)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=30.0),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    async def handle(self, request: web.Request) -> web.Response:
        assert self._session is not None
        headers = CIMultiDict(request.headers)
        headers.popall("Host", None)
        async with self._session.request(
            request.method,
            URL(self._upstream + request.raw_path, encoded=True),
            headers=headers,
            data=request.content if request.body_exists else None,
            allow_redirects=False,
            compress=None,
        ) as upstream:
            body = await upstream.read()
            out = CIMultiDict(
                (k, v) for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE
            )
            return web.Response(
                status=upstream.status, reason=upstream.reason, headers=out, body=body
            )


class LeanBareProxy:
    """The same pass-through over gateway/forward/http1.py's pool (bodyless requests only)."""

    def __init__(self, upstream: str) -> None:
        self._pool = UpstreamPool.for_url(
            URL(upstream),
            limit=256,
            connect_timeout=2.0,
            read_timeout=30.0,
        )

    async def start(self) -> None:
        pass

    async def handle(self, request: web.Request) -> web.Response:
        headers = CIMultiDict(request.headers)
        headers.popall("Host", None)
        upstream = await self._pool.request(request.method, request.raw_path, headers)
        body = upstream.body
        if body is None:
            body = b"".join([chunk async for chunk in upstream.chunks()])
        out = CIMultiDict(
            (k, v) for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE
        )
        return web.Response(
            status=upstream.status, reason=upstream.reason or None, headers=out, body=body
        )


async def serve(port: int, upstream: str, client: str) -> None:
    proxy = LeanBareProxy(upstream) if client == "lean" else BareProxy(upstream)
    await proxy.start()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app, access_log=None, auto_decompress=False, max_field_size=32 * 1024)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--client", choices=("aiohttp", "lean"), default="aiohttp")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream, args.client))


if __name__ == "__main__":
    main()
