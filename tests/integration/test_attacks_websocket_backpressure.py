"""Attacks on the WebSocket relay's close: a client that stops reading while the upstream
floods it. At the token's deadline the socket must still be closed and counted within a few
seconds (gauge, close counter, handshake request count, upstream connection), and the client's
connection reset when its 1008 cannot be written, never held open by its zero window.

Real sockets: a raw client with a small receive buffer that reads nothing after its handshake,
and an aiohttp upstream that sends as fast as the gateway takes it."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import WSMsgType, web
from attacks import requests_counted
from conftest import GatewayFactory
from prometheus_client import REGISTRY

from gateway.clock import ManualClock

TCP_ESTABLISHED = 1


@dataclass
class Flooder:
    """An upstream that, on the text `flood`, sends 4 KB messages until its socket ends."""

    port: int = 0
    closes: list[int | None] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        flood: asyncio.Task[None] | None = None
        try:
            while True:
                msg = await ws.receive()
                if msg.type is WSMsgType.TEXT and msg.data == "flood":
                    flood = asyncio.create_task(self._flood(ws))
                elif msg.type is WSMsgType.CLOSE:
                    self.closes.append(msg.data)
                    break
                elif msg.type in (WSMsgType.CLOSED, WSMsgType.ERROR):
                    self.closes.append(None)
                    break
        finally:
            if flood is not None:
                flood.cancel()
            await ws.close()
            self.ended.set()
        return ws

    @staticmethod
    async def _flood(ws: web.WebSocketResponse) -> None:
        payload = "x" * 4000
        while not ws.closed:
            await ws.send_str(payload)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def flooder() -> AsyncIterator[Flooder]:
    server = Flooder()
    await server.start()
    yield server
    await server.stop()


def masked_text(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + body


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


async def eventually(check: object, timeout: float = 3.0) -> None:
    assert callable(check)
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


async def test_a_client_that_stops_reading_is_closed_counted_and_reset_at_exp(
    gateways: GatewayFactory, flooder: Flooder, clock: ManualClock
):
    url = f"http://127.0.0.1:{flooder.port}"
    gw = await gateways(
        routes=[{"prefix": "/ws/", "upstream": url, "websocket": True}], policy={"leeway": "0s"}
    )
    expired = {"route": "/ws/", "reason": "expired"}
    closes_before = sample("idlegate_websocket_closes_total", expired)
    requests_before = requests_counted("/ws/", "allowed", "ok")
    open_before = sample("idlegate_websockets_open")

    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(client, ("127.0.0.1", int(gw.running.proxy.addresses[0][1])))
    head = (
        "GET /ws/flood HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Authorization: Bearer {gw.token(ttl=60)}\r\n\r\n"
    )
    await loop.sock_sendall(client, head.encode())
    answer = b""
    async with asyncio.timeout(2):
        while b"\r\n\r\n" not in answer:
            answer += await loop.sock_recv(client, 1)  # byte by byte: no frame read past it
    assert answer.startswith(b"HTTP/1.1 101")
    await loop.sock_sendall(client, masked_text("flood"))
    await asyncio.sleep(1.0)  # the flood fills the client's window and the gateway's buffer
    try:
        assert sample("idlegate_websockets_open") == open_before + 1
        clock.advance(61)  # past exp: the 1008 cannot be written to a client that reads nothing
        await eventually(lambda: sample("idlegate_websockets_open") == open_before)
        assert sample("idlegate_websocket_closes_total", expired) == closes_before + 1
        assert requests_counted("/ws/", "allowed", "ok") == requests_before + 1
        await asyncio.wait_for(flooder.ended.wait(), 3)
        assert flooder.closes[0] in (1001, None)
        # Reset, not a FIN queued behind megabytes the client will never read.
        await eventually(lambda: tcp_state(client) != TCP_ESTABLISHED)
    finally:
        client.close()
