"""Real components for gateway tests: a recording upstream and an in-process gateway, both on
real sockets (127.0.0.1, free ports), with an injectable clock."""

from __future__ import annotations

import asyncio
import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from jwks_server import SigningKey, claims

from gateway import config as config_module
from gateway.app import Gateway
from gateway.clock import Clock, ManualClock
from gateway.serve import Running, start
from gateway.store.coalesce import CoalescingStore
from gateway.store.redis import RedisStore

ISSUER = "https://issuer.test/"
AUDIENCE = "orders-api"


@dataclass
class Received:
    method: str
    path_qs: str
    headers: dict[str, str]
    header_list: list[tuple[str, str]]
    body_sha256: str
    body_length: int


@dataclass
class Upstream:
    """An aiohttp app that records what reached it.

    /slow?s=N sleeps N seconds; /download?n=BYTES streams that many bytes; /hop answers with
    hop-by-hop headers; anything else echoes what it received as JSON.
    """

    received: list[Received] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_chunked(256 * 1024):
            digest.update(chunk)
            length += len(chunk)
        record = Received(
            method=request.method,
            path_qs=request.raw_path,
            headers=dict(request.headers),
            header_list=list(request.headers.items()),
            body_sha256=digest.hexdigest(),
            body_length=length,
        )
        self.received.append(record)
        if request.path == "/slow" or request.path.endswith("/slow"):
            await asyncio.sleep(float(request.query.get("s", "1")))
        if request.path.endswith("/download"):
            return await self._download(request, int(request.query["n"]))
        headers = {}
        if request.path.endswith("/hop"):
            headers = {
                "Connection": "close, X-Upstream-Private",
                "X-Upstream-Private": "secret",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic",
                "X-Kept": "yes",
            }
        body = {
            "method": record.method,
            "path": record.path_qs,
            "length": length,
            "sha256": record.body_sha256,
        }
        return web.json_response(body, headers=headers)

    async def _download(self, request: web.Request, size: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        block = bytes(range(256)) * 1024  # 256 KiB
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def start(self) -> None:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def base_config(
    upstream: str, key_file: Path, store_url: str = "memory://", **overrides: Any
) -> dict[str, Any]:
    """A gateway config as data: protected /api/, public /public/, free ports."""
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "server": {"shutdown_grace": "2s", "access_log": False},
        "store": {"url": store_url, "timeout": "250ms", "revocation_poll": "100ms"},
        "policy": {"idle_timeout": "15m", "max_token_lifetime": "15m", "leeway": "30s"},
        "providers": [
            {
                "name": "main",
                "issuer": ISSUER,
                "audiences": [AUDIENCE],
                "algorithms": ["RS256", "ES256"],
                "public_key_file": str(key_file),
            }
        ],
        "routes": [
            {"prefix": "/api/", "upstream": upstream},
            {"prefix": "/public/", "upstream": upstream, "auth": "none"},
        ],
    }
    return merge(data, overrides)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(base)
    for name, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(name), dict):
            result[name] = merge(result[name], value)
        else:
            result[name] = value
    return result


@dataclass
class GatewayUnderTest:
    running: Running
    key: SigningKey
    clock: Clock
    http: aiohttp.ClientSession

    @property
    def gateway(self) -> Gateway:
        return self.running.gateway

    @property
    def url(self) -> str:
        return self.running.addresses()[0]

    @property
    def admin_url(self) -> str:
        return self.running.addresses()[1]

    def token(self, *, ttl: float = 600, key: SigningKey | None = None, **extra: Any) -> str:
        """A valid token issued now (by the injected clock) unless `extra` says otherwise."""
        payload = claims(ISSUER, AUDIENCE, ttl=ttl, now=self.clock.now())
        payload.update(extra)
        return (key or self.key).sign({k: v for k, v in payload.items() if v is not None})

    async def get(
        self, path: str, token: str | None = None, **kwargs: Any
    ) -> aiohttp.ClientResponse:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        method = kwargs.pop("method", "GET")
        response = await self.http.request(method, self.url + path, headers=headers, **kwargs)
        await response.read()
        return response

    async def close(self) -> None:
        await self.http.close()
        await self.running.drain()


async def start_gateway(
    data: dict[str, Any], key: SigningKey, clock: Clock, environ: dict[str, str] | None = None
) -> GatewayUnderTest:
    config = config_module.from_data(data, environ={} if environ is None else environ)
    gateway = Gateway(config, clock=clock, environ=environ or {})
    store = gateway.store
    if isinstance(store, CoalescingStore):  # store.coalesce: the configured store inside
        store = store.store
    if isinstance(clock, ManualClock) and isinstance(store, RedisStore):
        # Simulated time: Redis decides idleness with the gateway's (fake) now instead of its
        # own TIME, so tests can move minutes in no time. Tests of the store's own clock use
        # real clocks (tests/integration/test_store_clock.py).
        store.caller_time = True
    running = await start(config, gateway=gateway)
    http = aiohttp.ClientSession(auto_decompress=False)
    return GatewayUnderTest(running=running, key=key, clock=clock, http=http)
