"""Attacks on the two upstream transports (the lean pool for bodyless requests, aiohttp for the
rest): header bytes that one of them would alter on the way, and upstreams that write bytes
nobody asked for on a pooled connection. The upstream must receive exactly what the gateway
checked, one response must never become another request's answer, and a request's fate must
not depend on the transport that carries it. Raw client, raw keep-alive upstream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from attacks import exchange, parse, requests_counted
from conftest import GatewayFactory
from harness import GatewayUnderTest
from raw_server import RawServer

Parts = tuple[bytes | float, ...]  # written in order, a float pauses that many seconds


def answer(text: bytes, *fields: bytes) -> bytes:
    head = b"".join(field + b"\r\n" for field in fields)
    return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (head, len(text), text)


def own_answer(request_line: bytes) -> Parts:
    """The answer that belongs to a request: it names the request line."""
    return (answer(b"answer to " + request_line),)


@dataclass
class KeepAliveUpstream(RawServer):
    """Reads requests (head, and a Content-Length body) on kept-alive connections and answers
    each with `script(request line)`; keeps every request's bytes, by connection."""

    script: Callable[[bytes], Parts] = own_answer
    connections: list[list[bytes]] = field(default_factory=list)

    @property
    def requests(self) -> list[bytes]:
        return [one for connection in self.connections for one in connection]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received: list[bytes] = []
        self.connections.append(received)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                received.append(head + await reader.readexactly(length))
                for part in self.script(head.split(b"\r\n", 1)[0]):
                    if isinstance(part, float):
                        await asyncio.sleep(part)
                    else:
                        writer.write(part)
                        await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            return


@pytest.fixture
async def upstream() -> AsyncIterator[KeepAliveUpstream]:
    server = KeepAliveUpstream()
    await server.start()
    yield server
    await server.stop()


async def _gateway(gateways: GatewayFactory, upstream: KeepAliveUpstream) -> GatewayUnderTest:
    """/api/ (token required) and /pub/ (public) go to the upstream over the lean pool for
    bodyless requests; /cred/ (public) has credentials in its URL, so goes over aiohttp always;
    /ws/ relays WebSockets."""
    credentials = upstream.url.replace("http://", "http://user:pw@")
    routes = [
        {"prefix": "/api/", "upstream": upstream.url},
        {"prefix": "/pub/", "upstream": upstream.url, "auth": "none"},
        {"prefix": "/cred/", "upstream": credentials, "auth": "none"},
        {"prefix": "/ws/", "upstream": upstream.url, "websocket": True},
    ]
    return await gateways(routes=routes)


def _port(gw: GatewayUnderTest) -> int:
    return int(gw.running.proxy.addresses[0][1])


def _call(method: str, path: str, *lines: str | bytes, body: bytes | None = None) -> bytes:
    """A request as exact bytes (`lines` may hold bytes that are not UTF-8), the client's
    connection closed after its answer."""
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: gateway.test", b"Connection: close"]
    head += [line if isinstance(line, bytes) else line.encode() for line in lines]
    if body is not None:
        head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + (body or b"")


# Bodyless (the lean pool) and with a body (aiohttp), for one request.
TRANSPORTS = pytest.mark.parametrize("body", [None, b"x=1"], ids=["lean", "aiohttp"])


# -- F1: header bytes that are not UTF-8 ---------------------------------------------------------


@TRANSPORTS
@pytest.mark.parametrize(
    "line",
    [
        # aiohttp's writer dropped the byte: `TRACE` upstream, a method the gateway refuses.
        pytest.param(b"X-HTTP-Method-Override: TR\xffACE", id="method-override"),
        # Not a form to the gateway (no token scan), a form to the upstream.
        pytest.param(b"Content-Type: application/x-www-form-\xffurlencoded", id="form-type"),
    ],
)
async def test_a_request_header_that_is_not_utf8_is_refused_before_anything_is_sent(
    gateways: GatewayFactory, upstream: KeepAliveUpstream, line: bytes, body: bytes | None
):
    gw = await _gateway(gateways, upstream)
    # With a body: a form carrying a second, never verified token.
    form = None if body is None else f"access_token={gw.token(sub='mallory')}&a=1".encode()
    before = requests_counted("/api/", "rejected", "malformed_request")
    sent = _call("GET" if form is None else "POST", "/api/x", _bearer(gw), line, body=form)
    refused = parse(await exchange(_port(gw), sent))
    assert refused.status == 400, refused
    assert json.loads(refused.body)["reason"] == "malformed_request"
    assert upstream.requests == []  # nothing reached it, neither head nor body
    assert requests_counted("/api/", "rejected", "malformed_request") == before + 1


@TRANSPORTS
async def test_a_utf8_request_header_reaches_the_upstream_byte_for_byte(
    gateways: GatewayFactory, upstream: KeepAliveUpstream, body: bytes | None
):
    gw = await _gateway(gateways, upstream)
    method = "GET" if body is None else "POST"
    value = "caf\u00e9 \u212a".encode()
    sent = _call(method, "/pub/x", b"X-Note: " + value, body=body)
    relayed = parse(await exchange(_port(gw), sent))
    assert relayed.status == 200
    assert b"\r\nX-Note: " + value + b"\r\n" in upstream.requests[0]


async def test_a_websocket_handshake_header_that_is_not_utf8_is_refused_before_connecting(
    gateways: GatewayFactory, upstream: KeepAliveUpstream
):
    gw = await _gateway(gateways, upstream)
    handshake = _call(
        "GET",
        "/ws/x",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        f"Authorization: Bearer {gw.token()}",
        b"X-HTTP-Method-Override: TR\xffACE",
    )
    refused = parse(await exchange(_port(gw), handshake))
    assert refused.status == 400, refused
    assert json.loads(refused.body)["reason"] == "malformed_request"
    assert upstream.connections == []


@TRANSPORTS
@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(answer(b"ok", b"X-Foo: caf\xe9"), id="header-value"),
        pytest.param(b"HTTP/1.1 200 \xe9\xff\r\nContent-Length: 2\r\n\r\nok", id="reason"),
    ],
)
async def test_a_response_header_that_is_not_utf8_is_502_not_altered(
    gateways: GatewayFactory, upstream: KeepAliveUpstream, reply: bytes, body: bytes | None
):
    # Relayed, the byte would be dropped (`X-Foo: caf`, an empty reason): a Location or a
    # Set-Cookie could be changed so.
    upstream.script = lambda line: (reply,)
    gw = await _gateway(gateways, upstream)
    method = "GET" if body is None else "POST"
    relayed = parse(await exchange(_port(gw), _call(method, "/pub/x", body=body)))
    assert relayed.status == 502, relayed
    assert json.loads(relayed.body)["reason"] == "upstream_unavailable"
    assert relayed.all("X-Foo") == []
    assert len(upstream.requests) == 1


@TRANSPORTS
async def test_a_utf8_response_header_is_relayed_byte_for_byte(
    gateways: GatewayFactory, upstream: KeepAliveUpstream, body: bytes | None
):
    value = "caf\u00e9 \u212a".encode()
    upstream.script = lambda line: (answer(b"ok", b"X-Foo: " + value),)
    gw = await _gateway(gateways, upstream)
    method = "GET" if body is None else "POST"
    data = await exchange(_port(gw), _call(method, "/pub/x", body=body))
    assert parse(data).status == 200
    assert b"\r\nX-Foo: " + value + b"\r\n" in data


# -- F2, F3: bytes nobody asked for on a pooled connection ---------------------------------------

_POISON = answer(b"POISONED answer for anyone", b"X-Poison: 1")


@TRANSPORTS
@pytest.mark.parametrize(
    "stray",
    [
        pytest.param(_POISON, id="a-second-response"),
        # What some servers write on an idle keep-alive connection, without closing it.
        pytest.param(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n", id="408"),
    ],
)
async def test_a_response_written_on_an_idle_pooled_connection_is_nobodys_answer(
    gateways: GatewayFactory, upstream: KeepAliveUpstream, stray: bytes, body: bytes | None
):
    def script(line: bytes) -> Parts:
        if b"/first" in line:  # its answer, then, once the connection is idle, another one
            return (answer(b"ok"), 0.1, stray)
        return own_answer(line)

    upstream.script = script
    gw = await _gateway(gateways, upstream)
    method = "GET" if body is None else "POST"
    alice = parse(await exchange(_port(gw), _call(method, "/api/first", _bearer(gw), body=body)))
    assert alice.status == 200 and alice.body == b"ok"
    await asyncio.sleep(0.3)  # the stray bytes arrived long ago, on a connection nobody uses
    bob = parse(await exchange(_port(gw), _call(method, "/api/second", _bearer(gw), body=body)))
    assert bob.status == 200, bob
    assert bob.all("X-Poison") == []
    assert bob.body == b"answer to " + f"{method} /api/second HTTP/1.1".encode()
    assert len(upstream.connections) == 2  # the poisoned one was closed, not reused


def _bearer(gw: GatewayUnderTest) -> str:
    return f"Authorization: Bearer {gw.token()}"


@pytest.mark.parametrize("route", ["/pub/", "/cred/"], ids=["lean", "aiohttp"])
@pytest.mark.parametrize(
    "late", [_POISON, b'{"alice": "private"}'], ids=["a-response", "a-plain-body"]
)
async def test_a_late_body_after_a_head_answer_is_never_the_next_requests_answer(
    gateways: GatewayFactory, upstream: KeepAliveUpstream, route: str, late: bytes
):
    # A HEAD served by the GET handler: the head, then (later) the body it announced. The next
    # request, sent before that body came, must not read it as its answer.
    def script(line: bytes) -> Parts:
        if line.startswith(b"HEAD"):
            return (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(late), 0.15, late)
        return own_answer(line)

    upstream.script = script
    gw = await _gateway(gateways, upstream)
    alice = parse(await exchange(_port(gw), _call("HEAD", route + "a")))
    assert alice.status == 200 and alice.body == b""
    bob = parse(await exchange(_port(gw), _call("GET", route + "b")))
    assert bob.status == 200, bob
    assert bob.all("X-Poison") == []
    assert bob.body == b"answer to " + f"GET {route}b HTTP/1.1".encode()
    assert len(upstream.connections) == 2


@TRANSPORTS
async def test_a_304_with_a_body_is_relayed_bare_and_its_connection_not_reused(
    gateways: GatewayFactory, upstream: KeepAliveUpstream, body: bytes | None
):
    def script(line: bytes) -> Parts:
        if b"/cached" in line:
            return (b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 2\r\n\r\nok',)
        return own_answer(line)

    upstream.script = script
    gw = await _gateway(gateways, upstream)
    method = "GET" if body is None else "POST"
    cached = parse(await exchange(_port(gw), _call(method, "/pub/cached", body=body)))
    assert cached.status == 304, cached
    assert cached.all("ETag") == ['"v1"']
    assert cached.body == b""
    following = parse(await exchange(_port(gw), _call(method, "/pub/next", body=body)))
    assert following.body == b"answer to " + f"{method} /pub/next HTTP/1.1".encode()
    assert len(upstream.connections) == 2


# -- L1: what the upstream receives, whichever transport -----------------------------------------


async def test_both_transports_send_the_same_fields_and_none_of_aiohttps_own(
    gateways: GatewayFactory, upstream: KeepAliveUpstream
):
    gw = await _gateway(gateways, upstream)
    for method, body in (("GET", None), ("POST", b"x=1")):
        await exchange(_port(gw), _call(method, "/pub/x", "X-Mine: 1", body=body))
    names = [
        sorted(
            line.split(b":")[0].lower() for line in head.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]
        )
        for head in upstream.requests
    ]
    assert b"accept" not in names[1] and b"user-agent" not in names[1]
    assert b"accept-encoding" not in names[1]
    assert [n for n in names[1] if n != b"content-length"] == names[0]


@TRANSPORTS
async def test_a_well_behaved_upstreams_connection_is_still_reused(
    gateways: GatewayFactory, upstream: KeepAliveUpstream, body: bytes | None
):
    # The idle guard closes a connection only for bytes nobody asked for.
    gw = await _gateway(gateways, upstream)
    method = "GET" if body is None else "POST"
    for path in ("/pub/one", "/pub/two", "/pub/three"):
        relayed = parse(await exchange(_port(gw), _call(method, path, body=body)))
        assert relayed.body == b"answer to " + f"{method} {path} HTTP/1.1".encode()
    assert len(upstream.connections) == 1
