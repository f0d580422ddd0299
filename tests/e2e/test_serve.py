"""`idlegate serve` as a process: it says where it listens, forwards a valid token, refuses an
over-long one, keeps /admin/* closed without a token file, and stops cleanly on SIGINT."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp
from harness import Upstream
from jwks_server import SigningKey

from .conftest import Spawn
from .processes import bearer, e2e_config, mint


async def test_serve_prints_one_startup_line_then_forwards_and_refuses(
    spawn: Spawn, upstream: Upstream, key_file: Path, signing_key: SigningKey
):
    gw = spawn(e2e_config(upstream.url, key_file))
    await gw.wait_ready()

    startup = [line for line in gw.stderr().splitlines() if "listening on" in line]
    assert len(startup) == 1, gw.describe()
    assert gw.url in startup[0] and gw.admin_url in startup[0]

    async with aiohttp.ClientSession() as http:
        token = mint(signing_key, sub="alice")
        async with http.get(gw.url + "/api/orders", headers=bearer(token)) as response:
            assert response.status == 200
            assert (await response.json())["path"] == "/api/orders"
        assert upstream.received[-1].headers["X-Auth-Subject"] == "alice"

        over_long = mint(signing_key, ttl=3600)
        async with http.get(gw.url + "/api/orders", headers=bearer(over_long)) as response:
            assert response.status == 401
            assert (await response.json())["reason"] == "lifetime_too_long"
        assert len(upstream.received) == 1

        # No admin.token_file: the admin API does not exist, metrics and health do.
        async with http.post(gw.admin_url + "/admin/revoke", json={"jti": "x"}) as response:
            assert response.status == 404
        async with http.get(gw.admin_url + "/admin/tokens/x") as response:
            assert response.status == 404
        async with http.get(gw.admin_url + "/healthz") as response:
            assert response.status == 200

    assert await gw.stop(signal.SIGTERM) == 0
    assert "Traceback" not in gw.stderr()


async def test_sigint_stops_serve_with_exit_0(spawn: Spawn, upstream: Upstream, key_file: Path):
    gw = spawn(e2e_config(upstream.url, key_file))
    await gw.wait_ready()
    assert await gw.stop(signal.SIGINT, timeout=5) == 0, gw.describe()
    assert "Traceback" not in gw.stderr()


async def test_a_malformed_request_is_one_log_line_not_a_traceback(
    spawn: Spawn, upstream: Upstream, key_file: Path
):
    import asyncio

    gw = spawn(e2e_config(upstream.url, key_file))
    await gw.wait_ready()
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert (await reader.read()).split(b" ", 2)[1] == b"400"
    writer.close()
    assert await gw.stop(signal.SIGTERM) == 0
    logged = [line for line in gw.stderr().splitlines() if "malformed HTTP request" in line]
    assert len(logged) == 1, gw.describe()
    assert "WARNING" in logged[0]
    assert "Traceback" not in gw.stderr()
    assert upstream.received == []
