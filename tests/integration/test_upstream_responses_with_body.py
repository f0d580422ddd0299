"""One response, one answer, whichever transport carried it: a bodyless GET goes through the
lean pool, a POST with a body through aiohttp, and a raw upstream answers both with the same
scripted bytes. What the lean pool refuses, aiohttp's lenient parser must not let through."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from conftest import GatewayFactory
from harness import GatewayUnderTest
from raw_server import RawServer

BODY = b"x=1"
LEAK = b"leak"  # every malformed response carries it in a header or its body
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class RawUpstream(RawServer):
    """Reads each request (head and body, sized or chunked) and answers it with the next of
    `replies` (the last one repeats), closing the connection after it if `close`; keeps the
    request bodies and counts connections."""

    replies: list[bytes] = field(default_factory=lambda: [OK])
    close: bool = True
    bodies: list[bytes] = field(default_factory=list)
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.bodies.append(await _read_body(reader, head.lower()))
                writer.write(self.replies[min(len(self.bodies), len(self.replies)) - 1])
                await writer.drain()
                if self.close:
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            return


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    if b"\r\ntransfer-encoding: chunked" in head:
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")  # no trailers: the gateway sends none
        return body
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name == b"content-length":
            return await reader.readexactly(int(value))
    return b""


@pytest.fixture
async def raw() -> AsyncIterator[RawUpstream]:
    server = RawUpstream()
    await server.start()
    yield server
    await server.stop()


@dataclass
class Relayed:
    status: int
    headers: list[tuple[str, str]]
    body: bytes  # everything after the head, framing included


async def _exchange(gw: GatewayUnderTest, method: str, body: bytes | None) -> Relayed:
    """`method /raw/x` on a fresh socket (with `body`, if any), read until the gateway closes
    it (at most 3 s)."""
    lines = [f"{method} /raw/x HTTP/1.1", "Host: gateway.test", "Connection: close"]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.running.proxy.addresses[0][1])
    try:
        writer.write(request)
        async with asyncio.timeout(3):
            data = await reader.read()
    finally:
        writer.close()
    assert data, f"{method}: the gateway closed the connection without a response"
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *fields = head.split(b"\r\n")
    headers = []
    for line in fields:
        name, colon, value = line.partition(b":")
        assert colon and not line[:1].isspace(), f"a malformed header line: {line!r}"
        headers.append((name.decode().lower(), value.strip().decode("utf-8", "replace")))
    return Relayed(int(status_line.split(b" ", 2)[1]), headers, rest)


async def _both(gw: GatewayUnderTest, raw: RawUpstream) -> dict[str, Relayed]:
    """The answer to a bodyless GET (the lean pool) and to a POST with a body (aiohttp)."""
    answers = {"GET": await _exchange(gw, "GET", None), "POST": await _exchange(gw, "POST", BODY)}
    assert raw.bodies == [b"", BODY]  # each reached the upstream, the POST with its body
    return answers


def _leaky(status_line: bytes, *fields: bytes, body: bytes = b"leak-body") -> bytes:
    lines = [status_line, b"X-Leak: leak-header", *fields]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


_CHUNKED_LEAK = b"9\r\nleak-body\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(
            _leaky(b"HTTP/1.1 200 OK", b"Transfer-Encoding: gzip, chunked", body=_CHUNKED_LEAK),
            id="transfer-coding-gzip-then-chunked",
        ),
        pytest.param(
            _leaky(b"HTTP/1.1 200 OK", b"Transfer-Encoding: identity"),
            id="transfer-coding-identity",
        ),
        pytest.param(
            _leaky(b"HTTP/1.1 200 OK", b"Transfer-Encoding: gzip"), id="transfer-coding-gzip"
        ),
        pytest.param(
            _leaky(
                b"HTTP/1.1 200 OK",
                b"Transfer-Encoding: chunked",
                b"Transfer-Encoding: chunked",
                body=_CHUNKED_LEAK,
            ),
            id="chunked-twice",
        ),
        pytest.param(
            # "chun\u212aed" (a Kelvin sign) lowercases to "chunked".
            _leaky(b"HTTP/1.1 200 OK", "Transfer-Encoding: chun\u212aed".encode()),
            id="chunked-with-a-kelvin-sign",
        ),
        pytest.param(
            _leaky(b"HTTP/1.0 200 OK", b"Transfer-Encoding: chunked", body=_CHUNKED_LEAK),
            id="transfer-encoding-in-http-1.0",
        ),
        pytest.param(_leaky(b"HTTP/0.9 200 OK", b"Content-Length: 9"), id="http-0.9"),
        pytest.param(_leaky(b"HTTP/1.1 099 Weird", b"Content-Length: 9"), id="status-099"),
        pytest.param(_leaky(b"HTTP/1.1 600 Weird", b"Content-Length: 9"), id="status-600"),
        pytest.param(_leaky(b"HTTP/1.1 999 Weird", b"Content-Length: 9"), id="status-999"),
        pytest.param(
            _leaky(b"HTTP/1.1 101 Switching Protocols", b"Upgrade: h2c", b"Connection: Upgrade"),
            id="switching-protocols-unasked",
        ),
        pytest.param(_leaky(b"HTTP/1.1 200 O\x01K", b"Content-Length: 9"), id="control-in-reason"),
        pytest.param(_leaky(b"HTTP/1.1 200 O\x7fK", b"Content-Length: 9"), id="del-in-reason"),
        pytest.param(
            _leaky(b"HTTP/1.1 200 OK", b"X-Bell: a\x07b", b"Content-Length: 9"),
            id="control-in-header-value",
        ),
        pytest.param(
            _leaky(b"HTTP/1.1 200 OK", b"X-Del: a\x7fb", b"Content-Length: 9"),
            id="del-in-header-value",
        ),
        pytest.param(
            _leaky(b"HTTP/1.1 200 OK", b"Content-Length: 0000000000000000009"),
            id="content-length-of-19-digits",
        ),
        pytest.param(
            _leaky(b"HTTP/1.1 200 OK", b"Content-Length: 9", b"Content-Length: 10"),
            id="two-content-lengths",
        ),
        pytest.param(
            _leaky(
                b"HTTP/1.1 200 OK",
                b"Content-Length: 3",
                b"Transfer-Encoding: chunked",
                body=_CHUNKED_LEAK,
            ),
            id="content-length-and-chunked",
        ),
    ],
)
async def test_malformed_response_is_502_on_both_transports(
    gateways: GatewayFactory, raw: RawUpstream, reply: bytes
):
    raw.replies = [reply]
    gw = await gateways(routes=[{"prefix": "/raw/", "upstream": raw.url, "auth": "none"}])
    for method, relayed in (await _both(gw, raw)).items():
        assert relayed.status == 502, (method, relayed)
        assert json.loads(relayed.body)["reason"] == "upstream_unavailable", method
        assert LEAK not in repr(relayed.headers).encode().lower(), method


@pytest.mark.parametrize(
    ("reply", "body"),
    [
        pytest.param(
            b"HTTP/1.1 201 Made It Here\r\nX-Tabbed: a\tb\r\nContent-Length: 11\r\n\r\nhello world",
            b"hello world",
            id="content-length",
        ),
        pytest.param(
            b"HTTP/1.1 201 Made It Here\r\nX-Tabbed: a\tb\r\nTransfer-Encoding: Chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
            b"hello world",
            id="chunked",
        ),
        pytest.param(
            b"HTTP/1.0 201 Made It Here\r\nX-Tabbed: a\tb\r\nContent-Length: 11\r\n\r\nhello world",
            b"hello world",
            id="http-1.0",
        ),
    ],
)
async def test_well_formed_response_is_relayed_on_both_transports(
    gateways: GatewayFactory, raw: RawUpstream, reply: bytes, body: bytes
):
    raw.replies = [reply]
    gw = await gateways(routes=[{"prefix": "/raw/", "upstream": raw.url, "auth": "none"}])
    for method in ("GET", "POST"):
        response = await gw.get("/raw/x", method=method, data=None if method == "GET" else BODY)
        assert response.status == 201, method
        assert response.reason == "Made It Here", method
        assert response.headers["X-Tabbed"] == "a\tb", method  # HTAB is no control to refuse
        assert await response.read() == body, method
    assert raw.bodies == [b"", BODY]


async def test_a_refused_response_leaves_its_upstream_connection_unused(
    gateways: GatewayFactory, raw: RawUpstream
):
    # Refused, but complete and keep-alive: aiohttp has pooled its connection again by the time
    # the head is checked. Whatever followed on it is never read as the next answer.
    raw.close = False
    raw.replies = [_leaky(b"HTTP/1.1 200 O\x01K", b"Content-Length: 9"), OK]
    gw = await gateways(routes=[{"prefix": "/raw/", "upstream": raw.url, "auth": "none"}])
    for method, data in (("GET", None), ("POST", BODY)):
        raw.bodies.clear()
        raw.connections = 0
        refused = await gw.get("/raw/x", method=method, data=data)
        assert refused.status == 502, method
        following = await gw.get("/raw/x", method=method, data=data)
        assert following.status == 200 and await following.read() == b"ok", method
        assert raw.connections == 2, method


async def test_obs_folded_header_is_refused_or_unfolded_on_both_transports(
    gateways: GatewayFactory, raw: RawUpstream
):
    # RFC 9112 §5.2: a proxy answers 502 or replaces the fold with spaces. The lean pool
    # refuses it; aiohttp joins the lines before the gateway sees them (so it cannot tell).
    raw.replies = [
        b"HTTP/1.1 200 OK\r\nX-Folded: first\r\n  second\r\nContent-Length: 4\r\n\r\nbody"
    ]
    gw = await gateways(routes=[{"prefix": "/raw/", "upstream": raw.url, "auth": "none"}])
    answers = await _both(gw, raw)  # asserts no header line starts with a space
    assert answers["GET"].status == 502
    for method, relayed in answers.items():
        if relayed.status == 502:
            assert json.loads(relayed.body)["reason"] == "upstream_unavailable", method
        else:
            assert relayed.status == 200, method
            folded = [value for name, value in relayed.headers if name == "x-folded"]
            assert [value.split() for value in folded] == [["first", "second"]], method
            assert relayed.body == b"body", method
