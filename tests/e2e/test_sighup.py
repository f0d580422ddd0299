"""SIGHUP never kills the gateway: it is logged (configuration reload is not supported) and the
process keeps serving, in one process and with --workers; SIGTERM then drains and exits 0."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import RedisServer
from harness import Upstream
from jwks_server import SigningKey

from .conftest import Spawn
from .processes import GatewayProcess, bearer, e2e_config, mint
from .test_workers import wait_for_workers

IGNORED = "SIGHUP ignored: configuration reload is not supported"


async def _serves(gw: GatewayProcess, token: str) -> None:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
        http.get(gw.url + "/api/orders", headers=bearer(token)) as response,
    ):
        assert response.status == 200


async def _logged(gw: GatewayProcess, text: str, count: int) -> None:
    deadline = time.monotonic() + 5
    while gw.stderr().count(text) < count:
        assert time.monotonic() < deadline, gw.describe()
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_is_logged_and_the_gateway_keeps_serving(
    spawn: Spawn,
    upstream: Upstream,
    key_file: Path,
    signing_key: SigningKey,
    redis_server: RedisServer,
    workers: int,
):
    data = e2e_config(upstream.url, key_file, store={"url": redis_server.url})
    gw = spawn(data, "--workers", str(workers))
    if workers > 1:
        await wait_for_workers(gw, workers)
    else:
        await gw.wait_ready()
    token = mint(signing_key)
    await _serves(gw, token)
    for sent in (1, 2):
        gw.send(signal.SIGHUP)
        await _logged(gw, IGNORED, sent)
        assert gw.returncode() is None, gw.describe()
        await _serves(gw, token)
    assert await gw.stop(signal.SIGTERM) == 0, gw.describe()
    assert "Traceback" not in gw.stderr()
