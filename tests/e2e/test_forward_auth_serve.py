"""`idlegate serve` with forward_auth.listen: the dedicated port is announced, answers decisions
(and only decisions: nothing is forwarded), the proxy port's /.idlegate/auth too, and SIGTERM
closes both."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import aiohttp
from harness import Upstream
from jwks_server import SigningKey

from .conftest import Spawn
from .processes import bearer, e2e_config, mint


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_serve_answers_forward_auth_on_its_own_port_and_drains_it(
    spawn: Spawn, upstream: Upstream, key_file: Path, signing_key: SigningKey
):
    port = free_port()
    config = e2e_config(
        upstream.url,
        key_file,
        forward_auth={"enabled": True, "listen": {"host": "127.0.0.1", "port": port}},
    )
    gw = spawn(config)
    await gw.wait_ready()
    own = f"http://127.0.0.1:{port}"
    assert f"forward-auth decisions on {own}" in gw.stderr(), gw.describe()

    token = mint(signing_key, sub="dora")
    original = {"X-Original-URI": "/api/orders", "X-Original-Method": "GET"}
    async with aiohttp.ClientSession() as http:
        async with http.get(own + "/verify", headers={**original, **bearer(token)}) as answer:
            assert answer.status == 200
            assert answer.headers["X-Auth-Subject"] == "dora"
            assert await answer.read() == b""
        async with http.get(own + "/verify", headers=original) as answer:
            assert answer.status == 401
            assert answer.headers["X-Idlegate-Reason"] == "missing_token"
        async with http.get(
            gw.url + "/.idlegate/auth", headers={**original, **bearer(token)}
        ) as answer:
            assert answer.status == 200
        async with http.get(gw.admin_url + "/metrics") as scrape:
            text = await scrape.text()
        assert (
            'idlegate_forward_auth_requests_total{decision="allowed",reason="ok",route="/api/"} 2.0'
            in text
        )
    assert upstream.received == []
    assert await gw.stop(signal.SIGTERM) == 0, gw.describe()
    assert "Traceback" not in gw.stderr()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "the forward-auth port is still open"
