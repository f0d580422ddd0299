"""Pathological discovery and JWKS documents are fetch failures like any other: one clean
reason in `/readyz` and the log, no traceback, the keys held kept, retried with backoff."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import GatewayFactory
from jwks_server import claims, rsa_key

from gateway.clock import ManualClock
from gateway.config import Provider
from gateway.tokens.keys import KeyRing

K1 = rsa_key("k1")
DEEP = b"[" * 100_000  # RecursionError in json.loads, not a ValueError
AUDIENCE = "api"


@dataclass
class RawIdp:
    """Discovery and JWKS as raw bytes and headers, whatever a real IdP would never send."""

    discovery: bytes = b""
    jwks: bytes = json.dumps({"keys": [K1.public_jwk()]}).encode()
    jwks_headers: dict[str, str] = field(default_factory=dict)
    jwks_requests: list[float] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    def discovery_of(self, jwks_uri: str) -> bytes:
        return json.dumps({"issuer": self.url, "jwks_uri": jwks_uri}).encode()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self.discovery = self.discovery_of(self.url + "/jwks")

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.Response(body=self.discovery, content_type="application/json")

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_requests.append(time.monotonic())
        return web.Response(
            body=self.jwks, content_type="application/json", headers=self.jwks_headers
        )


@pytest.fixture
async def idp() -> AsyncIterator[RawIdp]:
    server = RawIdp()
    await server.start()
    yield server
    assert server._runner is not None
    await server._runner.cleanup()


@pytest.fixture
async def rings() -> AsyncIterator[list[KeyRing]]:
    made: list[KeyRing] = []
    yield made
    for ring in made:
        await ring.close()


def ring_for(idp: RawIdp, made: list[KeyRing], **fields: Any) -> KeyRing:
    fields.setdefault("discovery", "jwks_uri" not in fields)
    provider = Provider(
        name=f"idp-{uuid.uuid4().hex[:8]}",
        issuer=idp.url,
        audiences=[AUDIENCE],
        algorithms=["RS256"],
        **fields,
    )
    ring = KeyRing(provider, None, backoff_base=0.2)
    made.append(ring)
    return ring


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert not [record for record in caplog.records if record.exc_info]
    assert "unexpected" not in caplog.text and "Traceback" not in caplog.text


async def test_a_discovery_document_nested_too_deep_is_not_valid_json(
    idp: RawIdp, rings: list[KeyRing], caplog: pytest.LogCaptureFixture
) -> None:
    idp.discovery = DEEP
    ring = ring_for(idp, rings)
    await ring.start()
    assert not ring.ready
    assert ring.last_error is not None
    assert ring.last_error.endswith("/.well-known/openid-configuration is not valid JSON")
    no_traceback(caplog)


async def test_a_jwks_nested_too_deep_is_not_valid_json_and_the_keys_held_stay(
    idp: RawIdp, rings: list[KeyRing], caplog: pytest.LogCaptureFixture
) -> None:
    ring = ring_for(idp, rings, jwks_uri=idp.url + "/jwks")
    await ring.start()
    assert ring.lookup("k1") is not None
    idp.jwks = DEEP
    assert await ring.lookup_or_refresh("other") is None
    assert ring.lookup("k1") is not None
    assert ring.last_error is not None and "/jwks is not valid JSON" in ring.last_error
    no_traceback(caplog)


@pytest.mark.parametrize("host", ["a..b", "x" * 64 + ".example"])
async def test_a_discovered_jwks_uri_with_no_valid_host_name_is_a_clean_failure(
    idp: RawIdp, rings: list[KeyRing], caplog: pytest.LogCaptureFixture, host: str
) -> None:
    idp.discovery = idp.discovery_of(f"https://{host}/jwks")
    ring = ring_for(idp, rings)
    await ring.start()
    assert not ring.ready
    assert ring.last_error is not None
    assert ring.last_error.endswith("its host is not a valid DNS name")
    no_traceback(caplog)


async def test_a_freshness_too_large_for_a_float_still_schedules_the_next_refresh(
    idp: RawIdp, rings: list[KeyRing]
) -> None:
    # max-age and Age of 400 digits: each float("inf"), their difference NaN (never due).
    idp.jwks_headers = {"Cache-Control": "max-age=" + "9" * 400, "Age": "9" * 400}
    ring = ring_for(
        idp, rings, jwks_uri=idp.url + "/jwks", jwks_min_refresh=0.1, jwks_max_refresh=0.5
    )
    await ring.start()
    started = time.monotonic()
    while len(idp.jwks_requests) < 2:
        assert time.monotonic() - started < 2.0, "no refresh after the first fetch"
        await asyncio.sleep(0.02)


async def test_readyz_names_the_document_that_is_not_valid_json(
    gateways: GatewayFactory, idp: RawIdp, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    idp.discovery = DEEP
    provider = {
        "name": "deep",
        "issuer": idp.url,
        "audiences": [AUDIENCE],
        "algorithms": ["RS256"],
        "discovery": True,
    }
    caplog.set_level(logging.INFO, "idlegate.keys")
    gw = await gateways(providers=[provider])
    async with (
        aiohttp.ClientSession() as http,
        http.get(gw.admin_url + "/readyz") as response,
    ):
        assert response.status == 503
        reason = (await response.json())["reason"]
    assert reason.startswith("no usable keys for provider(s): deep (discovery document at ")
    assert reason.endswith("is not valid JSON)")
    refused = await gw.get("/api/x", K1.sign(claims(idp.url, AUDIENCE, now=clock.now())))
    assert (await refused.json())["reason"] == "unknown_key"
    no_traceback(caplog)
