"""WebSockets through `idlegate serve` as a process, on the real clock: closed at exp and at idle
timeout, kept open by client messages, 1001 at SIGTERM with exit 0, and one access-log line at
close."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
from conftest import RedisServer
from harness import Upstream
from jwks_server import SigningKey
from ws_upstream import WsUpstream

from .conftest import Spawn
from .processes import GatewayProcess, bearer, e2e_config, mint


async def ws_process(
    spawn: Spawn, upstream: Upstream, ws_upstream: WsUpstream, key_file: Path, **overrides: Any
) -> GatewayProcess:
    routes = [{"prefix": "/ws/", "upstream": ws_upstream.url, "websocket": True}]
    data = e2e_config(
        upstream.url,
        key_file,
        routes=routes,
        forward={"websocket_activity_interval": "300ms"},
        **overrides,
    )
    gw = spawn(data)
    await gw.wait_ready()
    return gw


async def close_frame(ws: aiohttp.ClientWebSocketResponse, timeout: float) -> tuple[Any, str]:
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.CLOSE:
                return msg.data, msg.extra or ""
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return ws.close_code, "(no close frame)"


def access_lines(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gw.stdout().splitlines() if line.startswith("{")]


async def test_closed_at_exp_and_logged_at_close(
    spawn: Spawn, upstream: Upstream, ws_upstream: WsUpstream, key_file: Path,
    signing_key: SigningKey,
):  # fmt: skip
    gw = await ws_process(
        spawn, upstream, ws_upstream, key_file,
        policy={"leeway": "0s"}, server={"access_log": True},
    )  # fmt: skip
    now = time.time()
    issued = int(now)
    token = mint(signing_key, now=issued, ttl=2, jti="e2e-ws-exp", sub="bob")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(gw.url + "/ws/e", headers=bearer(token))
        for text in ("one", "two"):
            await ws.send_str(text)
            assert (await ws.receive()).data == text
        assert await close_frame(ws, timeout=issued + 2 - time.time() + 1.0) == (1008, "expired")
        closed_at = time.time()
    assert closed_at >= issued + 2  # not before exp
    await asyncio.sleep(0.3)
    (line,) = [entry for entry in access_lines(gw) if entry.get("websocket")]
    assert line["status"] == 101 and line["jti"] == "e2e-ws-exp" and line["sub"] == "bob"
    assert line["websocket"]["close_reason"] == "expired"
    assert line["websocket"]["close_code"] == 1008
    assert line["websocket"]["messages_in"] == 2 and line["websocket"]["messages_out"] == 2
    assert line["websocket"]["duration_s"] > 0.5
    assert token not in gw.stdout() + gw.stderr()
    async with aiohttp.ClientSession() as http, http.get(gw.admin_url + "/metrics") as response:
        text = await response.text()
    assert 'idlegate_websocket_closes_total{reason="expired",route="/ws/"} 1.0' in text
    assert "idlegate_websockets_open 0.0" in text


async def test_client_messages_keep_it_open_then_idle_closes_it(
    spawn: Spawn, upstream: Upstream, ws_upstream: WsUpstream, key_file: Path,
    signing_key: SigningKey,
):  # fmt: skip
    gw = await ws_process(spawn, upstream, ws_upstream, key_file, policy={"idle_timeout": "1s"})
    token = mint(signing_key)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(gw.url + "/ws/i", headers=bearer(token))
        started = time.monotonic()
        while True:  # twice the idle timeout, talking
            await ws.send_str("x")
            silent = time.monotonic()
            assert (await ws.receive()).data == "x"
            if silent - started > 2.0:
                break
            await asyncio.sleep(0.25)
        assert await close_frame(ws, timeout=2.5) == (1008, "idle_timeout")
        assert 1.0 <= time.monotonic() - silent <= 2.0
        response = await http.get(gw.url + "/ws/plain", headers=bearer(token))
        assert (await response.json())["reason"] == "idle_timeout"


async def test_sigterm_closes_open_sockets_with_1001_and_exits_0(
    spawn: Spawn, upstream: Upstream, ws_upstream: WsUpstream, key_file: Path,
    signing_key: SigningKey,
):  # fmt: skip
    grace = 2.0
    gw = await ws_process(
        spawn, upstream, ws_upstream, key_file, server={"shutdown_grace": f"{grace}s"}
    )
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(gw.url + "/ws/d", headers=bearer(mint(signing_key)))
        gw.send(signal.SIGTERM)
        signalled = time.monotonic()
        await asyncio.sleep(0.2)
        await ws.send_str("during the drain")  # still relayed while the grace lasts
        assert (await ws.receive()).data == "during the drain"
        assert await close_frame(ws, timeout=grace + 1) == (1001, "drain")
        assert time.monotonic() - signalled < grace
    assert await gw.wait_exit(timeout=grace + 3) == 0
    await asyncio.wait_for(ws_upstream.closed.wait(), 2)
    assert ws_upstream.closes == [(1001, "drain")]


async def test_revocation_closes_sockets_at_every_replica_within_1s(
    spawn: Spawn, upstream: Upstream, ws_upstream: WsUpstream, key_file: Path,
    signing_key: SigningKey, redis_server: RedisServer, tmp_path: Path,
):  # fmt: skip
    token_file = tmp_path / "admin.token"
    token_file.write_text("ws-admin\n")
    routes = [{"prefix": "/ws/", "upstream": ws_upstream.url, "websocket": True}]

    def config() -> dict[str, Any]:
        return e2e_config(
            upstream.url,
            key_file,
            routes=routes,
            admin={"token_file": str(token_file)},
            store={"url": redis_server.url, "revocation_poll": "250ms"},  # the default
        )

    a, b = spawn(config(), name="a"), spawn(config(), name="b")
    await asyncio.gather(a.wait_ready(), b.wait_ready())
    token = mint(signing_key, sub="erin")  # revoked by sub: every token of erin's so far
    async with aiohttp.ClientSession() as http:
        at_a = await http.ws_connect(a.url + "/ws/r", headers=bearer(token))
        at_b = await http.ws_connect(b.url + "/ws/r", headers=bearer(token))
        revoked_at = time.monotonic()
        async with http.post(
            a.admin_url + "/admin/revoke",
            json={"sub": "erin"},
            headers={"Authorization": "Bearer ws-admin"},
        ) as response:
            assert response.status == 204
        closed = await asyncio.gather(close_frame(at_a, 1.5), close_frame(at_b, 1.5))
        elapsed = time.monotonic() - revoked_at
    assert closed == [(1008, "revoked"), (1008, "revoked")]
    assert elapsed < 1.0, f"closed {elapsed:.2f}s after the revocation"


async def test_closed_at_max_session_age(
    spawn: Spawn, upstream: Upstream, ws_upstream: WsUpstream, key_file: Path,
    signing_key: SigningKey,
):  # fmt: skip
    gw = await ws_process(
        spawn, upstream, ws_upstream, key_file,
        policy={"leeway": "0s", "max_session_age": "1h"},
    )  # fmt: skip
    authenticated = int(time.time()) - 3600 + 2  # the session turns 1 h old in about 2 s
    token = mint(signing_key, auth_time=authenticated)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(gw.url + "/ws/a", headers=bearer(token))
        assert await close_frame(ws, timeout=3.0) == (1008, "session_too_old")
    assert time.time() > authenticated + 3600
