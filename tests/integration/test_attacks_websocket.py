"""Attacks on the WebSocket relay: handshakes that are not one, upstreams that answer wrongly or
send too much, a client that keeps talking after its 1008, and tokens in the URL. Real sockets
both sides: a raw client for malformed handshakes, raw upstreams for malformed answers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import pytest
from attacks import exchange, parse, request, requests_counted
from conftest import GatewayFactory
from harness import GatewayUnderTest
from raw_server import RawServer
from ws_upstream import WsUpstream

from gateway.clock import ManualClock

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def ws_gateway(gateways: GatewayFactory, upstream_url: str, **overrides: object):
    routes = [
        {"prefix": "/ws/", "upstream": upstream_url, "websocket": True},
        {"prefix": "/api/", "upstream": upstream_url},
    ]
    forward = {"websocket_max_message": "64KiB", "websocket_activity_interval": "500ms"}
    return await gateways(routes=routes, forward=forward, **overrides)


def port(gw: GatewayUnderTest) -> int:
    return int(gw.running.proxy.addresses[0][1])


def handshake(token: str, *lines: str, first: str = "GET /ws/x HTTP/1.1", body: bytes = b""):
    base = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": KEY,
        "Authorization": f"Bearer {token}",
    }
    for line in lines:  # "Name: value" replaces the default, "Name:" alone removes it
        name, _, value = line.partition(":")
        base.pop(name, None)
        if value.strip():
            base[name] = value.strip()
    return request(first, *(f"{k}: {v}" for k, v in base.items()), body=body)


MALFORMED = {
    "version-12": ("Sec-WebSocket-Version: 12",),
    "version-missing": ("Sec-WebSocket-Version:",),
    "key-missing": ("Sec-WebSocket-Key:",),
    "key-short": ("Sec-WebSocket-Key: c2hvcnQ=",),
    "key-not-base64": ("Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!!!",),
    "upgrade-list": ("Upgrade: websocket, h2c",),
    "body": ("Content-Length: 5",),
}


@pytest.mark.parametrize("lines", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_handshake_is_refused_and_never_reaches_the_upstream(
    gateways: GatewayFactory, ws_upstream: WsUpstream, lines: tuple[str, ...]
):
    # Finding for `body` (aiohttp upgraded it after reading the body, and the client's
    # Content-Length went upstream on the handshake: an upstream would read frames as a body).
    gw = await ws_gateway(gateways, ws_upstream.url)
    before = requests_counted("/ws/", "rejected", "malformed_request")
    body = b"hello" if "Content-Length: 5" in lines else b""
    raw = await exchange(port(gw), handshake(gw.token(), *lines, body=body), timeout=1)
    assert parse(raw).status == 400, raw[:300]
    assert ws_upstream.handshakes == []
    assert requests_counted("/ws/", "rejected", "malformed_request") == before + 1


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_upgrade_on_another_method_than_get_is_refused(
    gateways: GatewayFactory, ws_upstream: WsUpstream, method: str
):
    # Finding: a POST with a body was upgraded (RFC 6455 §4.1: the method MUST be GET).
    gw = await ws_gateway(gateways, ws_upstream.url)
    sent = handshake(
        gw.token(), "Content-Length: 5", first=f"{method} /ws/x HTTP/1.1", body=b"hello"
    )
    raw = await exchange(port(gw), sent, timeout=1)
    assert parse(raw).status == 400, raw[:300]
    assert ws_upstream.handshakes == []


async def test_a_refused_handshake_is_no_activity(
    gateways: GatewayFactory, ws_upstream: WsUpstream, clock: ManualClock
):
    # Finding: the handshake was checked only after the store had counted it as activity, so
    # a stream of broken handshakes kept an unused token alive.
    gw = await ws_gateway(gateways, ws_upstream.url, policy={"idle_timeout": "60s"})
    token = gw.token()
    clock.advance(50)
    raw = await exchange(port(gw), handshake(token, "Sec-WebSocket-Version: 12"), timeout=1)
    assert parse(raw).status == 400
    clock.advance(20)  # 70 s after iat, 20 s after the refused handshake
    response = await gw.get("/api/x", token)
    assert (response.status, (await response.json())["reason"]) == (401, "idle_timeout")


async def test_origin_and_a_long_subprotocol_list_pass_to_the_upstream_as_sent(
    gateways: GatewayFactory, ws_upstream: WsUpstream
):
    # Documents: the gateway does not judge Origin (cross-site WebSocket hijacking is the
    # upstream's to refuse, it sees the Origin the browser sent); the subprotocol offer is
    # bounded only by the header size limit, and the upstream's choice is what the client gets.
    gw = await ws_gateway(gateways, ws_upstream.url)
    offered = [f"p{i}" for i in range(500)] + ["chat.v1"]
    ws = await gw.http.ws_connect(
        gw.url + "/ws/o",
        headers={"Authorization": f"Bearer {gw.token()}", "Origin": "https://evil.example"},
        protocols=offered,
    )
    assert ws.protocol == "chat.v1"
    await ws.close()
    (received,) = ws_upstream.handshakes
    assert received["Origin"] == "https://evil.example"
    assert received["Sec-WebSocket-Protocol"].split(",")[-1] == "chat.v1"


def _frame(opcode: int, payload: bytes, *, fin: bool = True, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        return bytes([first, size]) + payload
    if size < 1 << 16:
        return bytes([first, 126]) + struct.pack("!H", size) + payload
    return bytes([first, 127]) + struct.pack("!Q", size) + payload


@dataclass
class RawWsUpstream(RawServer):
    """Answers the gateway's handshake with `accept(key)` as Sec-WebSocket-Accept, then writes
    `frames` and records whatever arrives."""

    frames: bytes
    accept: Callable[[bytes], bytes]
    received: bytes = b""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            start = head.lower().index(b"sec-websocket-key:") + len(b"sec-websocket-key:")
            key = head[start:].split(b"\r\n")[0].strip()
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + self.accept(key) + b"\r\n\r\n"
            )
            writer.write(self.frames)
            await writer.drain()
            while chunk := await reader.read(65536):
                self.received += chunk
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def _right_accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


async def test_upstream_answering_with_a_wrong_accept_is_502(gateways: GatewayFactory):
    # Regression guard: an upstream (or something in its place) that did not compute the
    # accept value did not read the handshake as one; nothing is relayed.
    raw_upstream = RawWsUpstream(_frame(1, b"unverified"), lambda _key: b"d3Jvbmc=")
    await raw_upstream.start()
    try:
        gw = await ws_gateway(gateways, raw_upstream.url)
        raw = await exchange(port(gw), handshake(gw.token()), timeout=1)
        assert parse(raw).status == 502
        assert b"unverified" not in raw
    finally:
        await raw_upstream.stop()


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(
            _frame(1, b"x" * 40_000, fin=False) + _frame(0, b"y" * 40_000), id="fragmented"
        ),
        pytest.param(_frame(2, b"", length=1 << 62), id="header-claims-2^62"),
    ],
)
async def test_upstream_message_over_the_limit_closes_1009_and_nothing_of_it_is_relayed(
    gateways: GatewayFactory, frames: bytes
):
    # Regression guard: the limit holds for a message in fragments (each under the limit) and
    # for a frame header announcing more than could ever be buffered.
    raw_upstream = RawWsUpstream(frames, _right_accept)
    await raw_upstream.start()
    try:
        gw = await ws_gateway(gateways, raw_upstream.url)
        ws = await gw.http.ws_connect(
            gw.url + "/ws/big", headers={"Authorization": f"Bearer {gw.token()}"}
        )
        async with asyncio.timeout(2):
            msg = await ws.receive()
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1009)
        await ws.close()
    finally:
        await raw_upstream.stop()


async def test_client_messages_after_the_1008_close_are_not_relayed(
    gateways: GatewayFactory, ws_upstream: WsUpstream, clock: ManualClock
):
    # Regression guard: once the gateway has closed for a deadline, what the client still
    # sends (before it answers the close) never reaches the upstream.
    gw = await ws_gateway(gateways, ws_upstream.url, policy={"leeway": "0s"})
    ws = await gw.http.ws_connect(
        gw.url + "/ws/late",
        headers={"Authorization": f"Bearer {gw.token(ttl=60)}"},
        autoclose=False,
    )
    await ws.send_str("before")
    assert (await ws.receive()).data == "before"
    clock.advance(61)
    async with asyncio.timeout(2):
        msg = await ws.receive()
    assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 1008, "expired")
    for text in ("after-1", "after-2"):
        try:
            await ws.send_str(text)
        except (ConnectionError, aiohttp.ClientError):
            break
    await ws.close()
    await asyncio.wait_for(ws_upstream.closed.wait(), 2)
    assert ws_upstream.messages == 1


async def test_a_token_in_the_query_is_refused_and_never_logged(
    gateways: GatewayFactory,
    ws_upstream: WsUpstream,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
):
    # Regression guard (browsers cannot set Authorization on a WebSocket, so a client may try
    # ?access_token=): refused, counted, and the token is in no access-log or log line.
    gw = await ws_gateway(gateways, ws_upstream.url, server={"access_log": True})
    token = gw.token()
    before = requests_counted("/ws/", "rejected", "malformed_request")
    sent = handshake(token, "Authorization:", first=f"GET /ws/x?access_token={token} HTTP/1.1")
    response = parse(await exchange(port(gw), sent, timeout=1))
    assert response.status == 400
    assert token not in response.body.decode()
    assert ws_upstream.handshakes == []
    assert requests_counted("/ws/", "rejected", "malformed_request") == before + 1
    await asyncio.sleep(0.05)  # the access log is flushed once per loop turn
    signature = token.rsplit(".", 1)[1]
    logged = capsys.readouterr().out
    assert '"reason":"malformed_request"' in logged and signature not in logged
    assert not [r for r in caplog.records if signature in r.getMessage()]


@pytest.mark.parametrize(
    "offered",
    [
        "access_token, {other}",  # the token after a marker protocol (a common client pattern)
        "{other}",
        "chat, {other}",
        "base64url.bearer.authorization.k8s.io.{other}",  # Kubernetes' spelling
    ],
    ids=["after-a-marker", "alone", "beside-a-protocol", "kubernetes"],
)
async def test_a_token_offered_as_a_subprotocol_is_refused_and_never_reaches_the_upstream(
    gateways: GatewayFactory,
    ws_upstream: WsUpstream,
    capsys: pytest.CaptureFixture[str],
    offered: str,
):
    """A second token beside the verified one (browsers cannot set Authorization, so some
    clients offer theirs as a subprotocol): the upstream gets the list as offered and might
    use it instead, unverified (revoked, forged); and an upstream that picked it would have it
    logged as the subprotocol. Refused as a second token in the query is."""
    gw = await ws_gateway(gateways, ws_upstream.url, server={"access_log": True})
    other = gw.token(sub="mallory")
    before = requests_counted("/ws/", "rejected", "malformed_request")
    sent = handshake(gw.token(), f"Sec-WebSocket-Protocol: {offered.format(other=other)}")
    response = parse(await exchange(port(gw), sent, timeout=1))
    assert response.status == 400
    assert ws_upstream.handshakes == []
    assert requests_counted("/ws/", "rejected", "malformed_request") == before + 1
    await asyncio.sleep(0.05)
    assert other.rsplit(".", 1)[1] not in capsys.readouterr().out


async def test_dotted_subprotocol_names_are_no_tokens(
    gateways: GatewayFactory, ws_upstream: WsUpstream
):
    gw = await ws_gateway(gateways, ws_upstream.url)
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            f"{gw.url}/ws/x",
            headers={"Authorization": f"Bearer {gw.token()}"},
            protocols=("wamp.2.json", "ocpp2.0.1", "v10.stomp"),
        ) as ws,
    ):
        await ws.send_str("hi")
        assert (await ws.receive(timeout=2)).data == "hi"
    assert ws_upstream.handshakes and "wamp.2.json" in ws_upstream.handshakes[-1].get(
        "Sec-WebSocket-Protocol", ""
    )
