"""Client frames the relay must refuse: a frame without the mask bit (RFC 6455 §5.1: the server
MUST close, 1002), however it is sent (after some masked frames, with the handshake itself,
its head split across TCP reads). A real gateway and a real upstream; the client is a raw
socket, since no WebSocket client library sends unmasked frames."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct

import pytest
from attacks import request
from conftest import GatewayFactory
from harness import GatewayUnderTest
from prometheus_client import REGISTRY
from ws_upstream import WsUpstream

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


async def ws_gateway(gateways: GatewayFactory, upstream_url: str, **overrides: object):
    routes = [{"prefix": "/ws/", "upstream": upstream_url, "websocket": True}]
    forward = {"websocket_max_message": "256KiB", "websocket_activity_interval": "500ms"}
    return await gateways(routes=routes, forward=forward, **overrides)


def closes(reason: str) -> float:
    labels = {"route": "/ws/", "reason": reason}
    return REGISTRY.get_sample_value("idlegate_websocket_closes_total", labels) or 0.0


def handshake(token: str) -> bytes:
    return request(
        "GET /ws/frames HTTP/1.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Key: {KEY}",
        f"Authorization: Bearer {token}",
    )


def frame(opcode: int, payload: bytes, *, masked: bool = True) -> bytes:
    size = len(payload)
    bit = 0x80 if masked else 0
    if size < 126:
        head = bytes([0x80 | opcode, bit | size])
    elif size < 1 << 16:
        head = bytes([0x80 | opcode, bit | 126]) + struct.pack("!H", size)
    else:
        head = bytes([0x80 | opcode, bit | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawClient:
    """A WebSocket client on a bare TCP connection: sends what it is given, reads the
    server's (unmasked) frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, gw: GatewayUnderTest, *, after_handshake: bytes = b"") -> RawClient:
        port = int(gw.running.proxy.addresses[0][1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(handshake(gw.token()) + after_handshake)
        async with asyncio.timeout(2):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(reader, writer)

    async def send(self, *pieces: bytes, pause: float = 0.0) -> None:
        """Each piece in its own write; with `pause`, in its own TCP read at the gateway."""
        for piece in pieces:
            self.writer.write(piece)
            await self.writer.drain()
            if pause:
                await asyncio.sleep(pause)

    async def receive(self) -> tuple[int, bytes]:
        """The next frame's (opcode, payload); (-1, b"") when the connection ends."""
        async with asyncio.timeout(2):
            try:
                first, second = await self.reader.readexactly(2)
                size = second & 0x7F
                if size == 126:
                    (size,) = struct.unpack("!H", await self.reader.readexactly(2))
                elif size == 127:
                    (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
                assert not second & 0x80, "a server frame is never masked"
                return first & 0x0F, await self.reader.readexactly(size)
            except (asyncio.IncompleteReadError, ConnectionError):
                return -1, b""

    async def close_code(self) -> int | None:
        """Reads up to the server's close frame: its code."""
        while True:
            opcode, payload = await self.receive()
            if opcode == -1:
                return None
            if opcode == 8:
                return int(struct.unpack("!H", payload[:2])[0])

    def close(self) -> None:
        self.writer.close()


async def closed_by_both(ws_upstream: WsUpstream, before: float) -> None:
    await asyncio.wait_for(ws_upstream.closed.wait(), 2)
    async with asyncio.timeout(2):  # counted once the gateway has closed both sides
        while closes("unmasked_frame") < before + 1:
            await asyncio.sleep(0.01)


async def test_an_unmasked_client_frame_closes_1002_and_never_reaches_the_upstream(
    gateways: GatewayFactory,
    ws_upstream: WsUpstream,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
):
    # Finding F8: aiohttp's reader accepted it and the relay passed it on.
    caplog.set_level(logging.INFO, "idlegate.websocket")
    gw = await ws_gateway(gateways, ws_upstream.url, server={"access_log": True})
    before = closes("unmasked_frame")
    client = await RawClient.open(gw)
    try:
        await client.send(frame(1, b"masked"))
        assert await client.receive() == (1, b"masked")  # masked frames are relayed
        # The unmasked frame, and a masked one in the same write after it.
        await client.send(frame(1, b"unmasked", masked=False) + frame(1, b"after"))
        assert await client.close_code() == 1002
    finally:
        client.close()
    await closed_by_both(ws_upstream, before)
    assert ws_upstream.messages == 1  # "masked" only
    assert ws_upstream.closes == [(1001, "unmasked_frame")]
    assert closes("unmasked_frame") == before + 1
    await asyncio.sleep(0.05)  # the access log is flushed once per loop turn
    (line,) = [
        json.loads(text) for text in capsys.readouterr().out.splitlines() if '"websocket"' in text
    ]
    assert line["websocket"]["close_reason"] == "unmasked_frame"
    assert line["websocket"]["close_code"] == 1002
    assert line["websocket"]["messages_in"] == 1
    (logged,) = [r.getMessage() for r in caplog.records if "websocket closed" in r.getMessage()]
    assert logged.startswith("websocket closed: unmasked_frame (jti=")


async def test_an_unmasked_frame_sent_along_with_the_handshake_is_refused(
    gateways: GatewayFactory, ws_upstream: WsUpstream
):
    # The bytes a client sends before the 101 wait in aiohttp until the reader exists, which
    # then parses them at once: they are checked too.
    gw = await ws_gateway(gateways, ws_upstream.url)
    before = closes("unmasked_frame")
    early = frame(1, b"first") + frame(1, b"unmasked", masked=False)
    client = await RawClient.open(gw, after_handshake=early)
    try:
        assert await client.close_code() == 1002  # its echo may or may not come before
    finally:
        client.close()
    await closed_by_both(ws_upstream, before)
    assert ws_upstream.messages == 1  # the masked frame before it was relayed


async def test_an_unmasked_frame_whose_head_is_split_across_reads_is_refused(
    gateways: GatewayFactory, ws_upstream: WsUpstream
):
    gw = await ws_gateway(gateways, ws_upstream.url)
    before = closes("unmasked_frame")
    client = await RawClient.open(gw)
    sent = frame(1, b"", masked=False)  # two bytes, a whole (empty) message
    try:
        await client.send(sent[:1], sent[1:], pause=0.02)
        assert await client.close_code() == 1002
    finally:
        client.close()
    await closed_by_both(ws_upstream, before)
    assert ws_upstream.messages == 0


async def test_masked_frames_split_anywhere_are_relayed_as_sent(
    gateways: GatewayFactory, ws_upstream: WsUpstream
):
    # Regression guard for the mask check's own parsing: 7-, 16- and 64-bit lengths, heads
    # split byte by byte across TCP reads, several frames in one read.
    gw = await ws_gateway(gateways, ws_upstream.url)
    client = await RawClient.open(gw)
    payloads = [b"s" * 5, b"m" * 300, b"l" * 70_000]
    try:
        for payload in payloads:
            sent = frame(2, payload)
            head = 14 if len(payload) > 65535 else 8 if len(payload) > 125 else 6
            await client.send(*(sent[i : i + 1] for i in range(head)), pause=0.005)
            await client.send(sent[head:])
            assert await client.receive() == (2, payload)
        await client.send(b"".join(frame(1, p) for p in payloads))
        for payload in payloads:
            assert await client.receive() == (1, payload)
    finally:
        client.close()
    assert ws_upstream.messages == 2 * len(payloads)
