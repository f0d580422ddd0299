"""What the client gets when an upstream answers, over a raw upstream that writes scripted bytes
exactly as given: framing, keep-alive, interim and bodiless responses, malformed and slow
responses, hop-by-hop headers, and what the upstream itself received."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from conftest import GatewayFactory
from harness import GatewayUnderTest
from raw_server import RawServer

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
LEAK = b"leak"  # every malformed response carries it in a header and in its body


@dataclass(frozen=True)
class Reply:
    """One scripted answer: `parts` written in order (a float pauses that many seconds), then
    the connection is closed if `close`, else the next request is read from it."""

    parts: tuple[bytes | float, ...]
    close: bool = False


@dataclass
class RawUpstream(RawServer):
    """A TCP server on 127.0.0.1 that reads each request head and answers it with the next
    scripted `Reply` (the last one repeats); it keeps every request head and counts
    connections."""

    replies: list[Reply] = field(default_factory=lambda: [Reply((OK,))])
    received: list[bytes] = field(default_factory=list)
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    return
                self.received.append(head)
                reply = self.replies[min(len(self.received), len(self.replies)) - 1]
                for part in reply.parts:
                    if isinstance(part, float):
                        await asyncio.sleep(part)
                    else:
                        writer.write(part)
                        await writer.drain()
                if reply.close:
                    return
        except OSError:
            return


@dataclass
class RawResponse:
    """A response as the client's socket saw it, up to the gateway closing the connection."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes  # everything after the head, framing included

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name.lower()]

    def one(self, name: str) -> str:
        values = self.all(name)
        assert len(values) == 1, (name, self.headers)
        return values[0]


@pytest.fixture
async def raw() -> AsyncIterator[RawUpstream]:
    server = RawUpstream()
    await server.start()
    yield server
    await server.stop()


async def _gateway(
    gateways: GatewayFactory, raw: RawUpstream, **overrides: object
) -> GatewayUnderTest:
    """A gateway whose /raw/ (public) and /api/ (token required) routes go to the raw upstream."""
    routes = [
        {"prefix": "/raw/", "upstream": raw.url, "auth": "none"},
        {"prefix": "/api/", "upstream": raw.url},
    ]
    return await gateways(routes=routes, **overrides)


async def _exchange(gw: GatewayUnderTest, request: bytes) -> RawResponse:
    """Sends `request` on a fresh socket and reads until the gateway closes it (at most 3 s)."""
    port = gw.running.proxy.addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(3):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    version, status = status_line.split(b" ", 2)[:2]
    assert version == b"HTTP/1.1", data[:200]
    headers = []
    for line in lines:
        name, colon, value = line.partition(b":")
        assert colon and not line[:1].isspace(), f"a malformed header line: {line!r}"
        headers.append((name.decode().lower(), value.strip().decode("utf-8", "replace")))
    return RawResponse(int(status), headers, body)


def _get(path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: gateway.test", "Connection: close", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _dechunk(framed: bytes) -> tuple[bytes, bool]:
    """The payload of a chunked body, strictly parsed, and whether it ended properly: the last
    chunk, a trailer section, nothing after it."""
    payload = bytearray()
    rest = framed
    while True:
        size_line, crlf, rest = rest.partition(b"\r\n")
        if not crlf:
            return bytes(payload), False
        size_text = size_line.split(b";", 1)[0]
        assert size_text and all(c in b"0123456789abcdefABCDEF" for c in size_text), size_line
        size = int(size_text, 16)
        if size == 0:  # then trailer fields, if any, and an empty line
            return bytes(payload), rest == b"\r\n" or rest.endswith(b"\r\n\r\n")
        if len(rest) < size + 2:
            return bytes(payload) + rest[:size], False
        assert rest[size : size + 2] == b"\r\n", "chunk data not followed by CRLF"
        payload += rest[:size]
        rest = rest[size + 2 :]


def _assert_gateway_error(response: RawResponse, status: int, reason: str) -> None:
    """The gateway's own refusal, whole, and nothing of the upstream's answer."""
    assert response.status == status, (response.status, response.headers, response.body[:300])
    assert response.one("Cache-Control") == "no-store"
    assert int(response.one("Content-Length")) == len(response.body)
    body = json.loads(response.body)
    assert body["reason"] == reason
    assert body["error"] == reason  # no OAuth error for upstream failures: the code itself
    assert isinstance(body["message"], str) and body["message"]
    assert body["request_id"] == response.one("X-Request-ID")
    head = repr(response.headers).encode().lower()
    assert LEAK not in head and LEAK not in response.body.lower()


def _payload(size: int) -> bytes:
    """`size` bytes that are not a repetition of a short block (a reordering would show)."""
    blocks = (hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


# -- well-formed responses ---------------------------------------------------------------------


@pytest.mark.parametrize("route", ["public", "authenticated"])
async def test_content_length_response_is_relayed_exactly(
    gateways: GatewayFactory, raw: RawUpstream, route: str
):
    raw.replies = [
        Reply(
            (
                b"HTTP/1.1 201 Made It Here\r\nContent-Type: text/plain\r\nX-Custom: v1\r\n"
                b"Content-Length: 11\r\n\r\nhello world",
            )
        )
    ]
    gw = await _gateway(gateways, raw)
    path, token = ("/raw/item", None) if route == "public" else ("/api/item", gw.token())
    response = await gw.get(path, token)
    assert response.status == 201
    assert response.reason == "Made It Here"  # the upstream's reason phrase is kept
    assert response.headers["X-Custom"] == "v1"
    assert response.headers["Content-Type"] == "text/plain"
    assert response.headers["Content-Length"] == "11"
    assert await response.read() == b"hello world"


async def test_chunked_response_arrives_dechunked_with_valid_framing(
    gateways: GatewayFactory, raw: RawUpstream
):
    raw.replies = [
        Reply(
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
                b"5;foo=bar\r\nhello\r\n1\r\n \r\n",
                0.02,
                b"a;foo=bar\r\nchunked wo\r\n3\r\nrld\r\n0\r\nX-Checksum: abc\r\n\r\n",
            )
        )
    ]
    gw = await _gateway(gateways, raw)
    response = await gw.get("/raw/chunks")
    assert response.status == 200
    assert await response.read() == b"hello chunked world"

    relayed = await _exchange(gw, _get("/raw/chunks"))
    assert relayed.status == 200
    assert relayed.one("Transfer-Encoding") == "chunked"  # the gateway's own framing, once
    assert relayed.all("Content-Length") == []
    # Re-chunked by the gateway; the trailer field may be dropped (it is today) or relayed.
    assert _dechunk(relayed.body) == (b"hello chunked world", True)


async def test_close_delimited_response_arrives_intact_and_the_next_request_reconnects(
    gateways: GatewayFactory, raw: RawUpstream
):
    raw.replies = [
        Reply((b"HTTP/1.1 200 OK\r\nX-Kind: eof\r\n\r\nuntil the ", 0.02, b"end"), close=True),
        Reply((OK,)),
    ]
    gw = await _gateway(gateways, raw)
    response = await gw.get("/raw/eof")
    assert response.status == 200
    assert response.headers["X-Kind"] == "eof"
    assert await response.read() == b"until the end"
    second = await gw.get("/raw/after")
    assert second.status == 200 and await second.read() == b"ok"
    assert raw.connections == 2


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_one_mib_response_is_relayed_intact(
    gateways: GatewayFactory, raw: RawUpstream, framing: str
):
    body = _payload(1024 * 1024)
    if framing == "content-length":
        message = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    else:
        framed, offset = bytearray(), 0
        for size in (1, 4095, 65536, 100_000, 300_000):
            framed += b"%x\r\n%s\r\n" % (size, body[offset : offset + size])
            offset += size
        framed += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) - offset, body[offset:])
        message = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed
    raw.replies = [Reply((message,))]
    gw = await _gateway(gateways, raw)
    response = await gw.get("/raw/big")
    received = await response.read()
    assert response.status == 200
    assert len(received) == len(body)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(body).hexdigest()


async def test_head_response_does_not_wait_for_the_announced_body(
    gateways: GatewayFactory, raw: RawUpstream
):
    raw.replies = [
        Reply((b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nX-Head: yes\r\n\r\n",)),
        Reply((OK,)),
    ]
    gw = await _gateway(gateways, raw)
    async with asyncio.timeout(2):
        head = await gw.get("/raw/doc", method="HEAD")
        assert head.status == 200
        assert head.headers["X-Head"] == "yes"
        assert head.headers["Content-Length"] == "1234"
        assert await head.read() == b""
        following = await gw.get("/raw/doc")
    assert following.status == 200 and await following.read() == b"ok"
    assert raw.received[0].startswith(b"HEAD /raw/doc HTTP/1.1\r\n")
    # The body the HEAD answer announced might still come, later, and would be read as the next
    # request's answer: its connection is not reused.
    assert raw.connections == 2


@pytest.mark.parametrize(
    ("status", "head"),
    [
        (204, b"HTTP/1.1 204 No Content\r\nX-Bodiless: 204\r\n\r\n"),
        (304, b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nX-Bodiless: 304\r\n\r\n'),
    ],
    ids=["204", "304"],
)
async def test_bodiless_status_is_relayed_and_keep_alive_survives(
    gateways: GatewayFactory, raw: RawUpstream, status: int, head: bytes
):
    raw.replies = [Reply((head,)), Reply((OK,))]
    gw = await _gateway(gateways, raw)
    async with asyncio.timeout(2):
        relayed = await _exchange(gw, _get("/raw/cached", 'If-None-Match: "v1"'))
        following = await gw.get("/raw/next")
    assert relayed.status == status
    assert relayed.one("X-Bodiless") == str(status)
    assert relayed.body == b""
    assert relayed.all("Transfer-Encoding") == []
    if status == 304:
        assert relayed.one("ETag") == '"v1"'
    assert following.status == 200 and await following.read() == b"ok"
    assert raw.connections == 1


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\nX-Interim: 1\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n",
    ],
    ids=["103", "100"],
)
async def test_interim_response_is_followed_by_the_final_one(
    gateways: GatewayFactory, raw: RawUpstream, interim: bytes
):
    final = b"HTTP/1.1 200 OK\r\nX-Final: 1\r\nContent-Length: 5\r\n\r\nfinal"
    raw.replies = [Reply((interim, 0.02, final))]
    gw = await _gateway(gateways, raw)
    response = await gw.get("/raw/hints")
    assert response.status == 200
    assert response.headers["X-Final"] == "1"
    assert "X-Interim" not in response.headers  # interim fields are not the final response's
    assert await response.read() == b"final"


# -- the upstream connection pool --------------------------------------------------------------


async def test_sequential_requests_reuse_one_upstream_connection(
    gateways: GatewayFactory, raw: RawUpstream
):
    gw = await _gateway(gateways, raw)
    for _ in range(2):
        response = await gw.get("/raw/again")
        assert response.status == 200 and await response.read() == b"ok"
    assert len(raw.received) == 2
    assert raw.connections == 1


@pytest.mark.parametrize("pause", [0.1, 0.0], ids=["after-a-pause", "immediately"])
async def test_upstream_closing_an_idle_connection_does_not_fail_the_next_request(
    gateways: GatewayFactory, raw: RawUpstream, pause: float
):
    # The upstream answers and closes, without announcing it (no Connection: close).
    raw.replies = [Reply((OK,), close=True), Reply((b"HTTP/1.1 200 OK\r\n\r\nsecond",), close=True)]
    gw = await _gateway(gateways, raw)
    first = await gw.get("/raw/one")
    assert first.status == 200 and await first.read() == b"ok"
    await asyncio.sleep(pause)
    second = await gw.get("/raw/two")
    assert second.status == 200 and await second.read() == b"second"
    assert raw.connections == 2


async def test_upstream_closing_the_reused_connection_on_the_next_request_is_retried(
    gateways: GatewayFactory, raw: RawUpstream
):
    # The race a keep-alive pool cannot avoid: the upstream drops the idle connection just as
    # the next request arrives on it, answering nothing. A GET may be retried (RFC 9112 §9.3.1).
    raw.replies = [
        Reply((OK,)),
        Reply((), close=True),
        Reply((b"HTTP/1.1 200 OK\r\n\r\nretried",), close=True),
    ]
    gw = await _gateway(gateways, raw)
    assert (await gw.get("/raw/one")).status == 200
    second = await gw.get("/raw/two")
    assert second.status == 200 and await second.read() == b"retried"
    assert [head.split(b"\r\n", 1)[0] for head in raw.received] == [
        b"GET /raw/one HTTP/1.1",
        b"GET /raw/two HTTP/1.1",
        b"GET /raw/two HTTP/1.1",
    ]
    assert raw.connections == 2


# -- malformed and broken responses ------------------------------------------------------------

_LEAKY = b"X-Leak: leak-header\r\n"


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(Reply((b"HELLO\r\n\r\n",)), id="garbage-status-line"),
        pytest.param(
            Reply((b"HTTP/1.1 abc OK\r\n" + _LEAKY + b"Content-Length: 9\r\n\r\nleak-body",)),
            id="non-numeric-status",
        ),
        pytest.param(
            Reply(
                (
                    b"HTTP/1.1 200 OK\r\n"
                    + _LEAKY
                    + b"NoColonHere\r\nContent-Length: 9\r\n\r\nleak-body",
                )
            ),
            id="header-without-colon",
        ),
        pytest.param(
            Reply((b"HTTP/1.1 099 Odd\r\n" + _LEAKY + b"Content-Length: 9\r\n\r\nleak-body",)),
            id="status-below-100",
        ),
        pytest.param(
            Reply((b"HTTP/1.1 200 OK\r\n" + _LEAKY + b"Content-Length: 12abc\r\n\r\nleak-body",)),
            id="invalid-content-length",
        ),
        pytest.param(
            Reply(
                (
                    b"HTTP/1.1 200 OK\r\n"
                    + _LEAKY
                    + b"Content-Length: 9\r\nContent-Length: 10\r\n\r\nleak-body",
                )
            ),
            id="two-content-lengths",
        ),
        pytest.param(
            Reply(
                (
                    b"HTTP/1.1 200 OK\r\n"
                    + _LEAKY
                    + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + b"9\r\nleak-body\r\n0\r\n\r\n",
                )
            ),
            id="content-length-and-chunked",
        ),
        pytest.param(
            Reply(
                (
                    b"HTTP/1.1 200 OK\r\nX-Leak: leak\rX-Split: 1\r\n"
                    b"Content-Length: 9\r\n\r\nleak-body",
                )
            ),
            id="bare-cr-in-header-value",
        ),
        pytest.param(
            Reply(
                (
                    b"HTTP/1.1 200 OK\r\n"
                    + _LEAKY
                    + b"X-Big: "
                    + b"a" * (65 * 1024)
                    + b"\r\nContent-Length: 9\r\n\r\nleak-body",
                )
            ),
            id="head-over-64KiB-in-one-field",
        ),
        pytest.param(
            Reply(
                (
                    b"HTTP/1.1 200 OK\r\n"
                    + _LEAKY
                    + b"".join(b"X-Many-%d: %s\r\n" % (i, b"m" * 400) for i in range(200))
                    + b"Content-Length: 9\r\n\r\nleak-body",
                )
            ),
            id="head-over-64KiB-in-200-fields",
        ),
        pytest.param(Reply((), close=True), id="closed-before-any-byte"),
        pytest.param(
            Reply(
                (b"HTTP/1.1 200 OK\r\n" + _LEAKY + b"Content-Length: 100\r\n\r\nleak-body0",),
                close=True,
            ),
            id="closed-mid-body",
        ),
    ],
)
async def test_malformed_response_is_502_and_nothing_of_it_leaks(
    gateways: GatewayFactory, raw: RawUpstream, reply: Reply
):
    raw.replies = [reply]
    gw = await _gateway(gateways, raw)
    response = await _exchange(gw, _get("/raw/broken"))
    _assert_gateway_error(response, 502, "upstream_unavailable")


async def test_obs_folded_header_is_refused_or_unfolded(gateways: GatewayFactory, raw: RawUpstream):
    # RFC 9112 §5.2 lets a proxy either answer 502 or replace the fold with spaces; never
    # pass the continuation line on.
    raw.replies = [
        Reply((b"HTTP/1.1 200 OK\r\nX-Folded: first\r\n  second\r\nContent-Length: 4\r\n\r\nbody",))
    ]
    gw = await _gateway(gateways, raw)
    response = await _exchange(gw, _get("/raw/folded"))  # asserts no line starts with a space
    if response.status == 502:
        _assert_gateway_error(response, 502, "upstream_unavailable")
    else:
        assert response.status == 200
        assert response.one("X-Folded").split() == ["first", "second"]
        assert response.body == b"body"


async def test_an_http10_keep_alive_client_gets_an_unsized_body_ended_by_the_close(
    gateways: GatewayFactory, raw: RawUpstream
):
    """HTTP/1.0 has no chunked coding: an upstream answer of unknown length reaches a 1.0
    client unframed, so the connection must end with it, keep-alive asked or not. Else the
    client waits for a close that never comes, and the next response on the connection runs on
    as part of this body."""
    raw.replies = [
        Reply((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",))
    ]
    gw = await _gateway(gateways, raw, server={"keepalive_timeout": "30s"})
    port = gw.running.proxy.addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"GET /raw/one HTTP/1.0\r\nHost: gateway.test\r\nConnection: keep-alive\r\n\r\n"
        )
        async with asyncio.timeout(2):  # the close, not keepalive_timeout's 30 s
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"200"
    assert b"content-length" not in head.lower() and b"transfer-encoding" not in head.lower()
    assert body == b"hello"


async def test_invalid_chunk_size_never_reaches_the_client_as_a_complete_response(
    gateways: GatewayFactory, raw: RawUpstream
):
    # Whether the head went out before the bad chunk size was parsed is up to the client's
    # read pattern: either the gateway's 502, or a 200 whose chunked body never completes.
    raw.replies = [
        Reply(
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nleak-body\r\n0\r\n\r\n",)
        )
    ]
    gw = await _gateway(gateways, raw)
    response = await _exchange(gw, _get("/raw/chunks"))
    if response.status == 502:
        _assert_gateway_error(response, 502, "upstream_unavailable")
    else:
        assert response.status == 200
        payload, complete = _dechunk(response.body)
        assert not complete and LEAK not in payload


async def test_invalid_chunk_size_after_the_head_went_out_cuts_the_connection(
    gateways: GatewayFactory, raw: RawUpstream
):
    raw.replies = [
        Reply(
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n",
                0.1,
                b"zz\r\nleak-body\r\n0\r\n\r\n",
            )
        )
    ]
    gw = await _gateway(gateways, raw, forward={"read_timeout": "500ms"})
    started = time.monotonic()
    response = await _exchange(gw, _get("/raw/chunks"))  # fails if not cut within 3 s
    assert time.monotonic() - started < 2
    assert response.status == 200
    payload, complete = _dechunk(response.body)
    assert payload == b"first" and not complete  # no last chunk: the client sees the break


async def test_upstream_closing_mid_body_after_the_head_went_out_cuts_the_connection(
    gateways: GatewayFactory, raw: RawUpstream
):
    # Over 64 KiB, so streamed: the head is relayed before the body is complete.
    raw.replies = [
        Reply((b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10,), close=True)
    ]
    gw = await _gateway(gateways, raw)
    response = await _exchange(gw, _get("/raw/cut"))
    assert response.status == 200
    assert response.one("Content-Length") == "100000"
    assert response.body == b"x" * 10  # then the connection closed, short of the length

    async with gw.http.get(gw.url + "/raw/cut") as streamed:
        assert streamed.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await streamed.read()


# -- headers -----------------------------------------------------------------------------------


async def test_hop_by_hop_response_headers_are_not_relayed(
    gateways: GatewayFactory, raw: RawUpstream
):
    raw.replies = [
        Reply(
            (
                b"HTTP/1.1 200 OK\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n"
                b"Keep-Alive: timeout=5, max=100\r\nX-Request-ID: chosen-by-upstream\r\n"
                b"X-Kept: yes\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            ),
            close=True,
        )
    ]
    gw = await _gateway(gateways, raw)
    relayed = await _exchange(gw, _get("/raw/hop", "X-Request-ID: client-id-1"))
    assert relayed.status == 200
    names = {name for name, _ in relayed.headers}
    assert "x-secret" not in names and "keep-alive" not in names
    assert relayed.one("X-Request-ID") == "client-id-1"
    assert relayed.one("X-Kept") == "yes"
    assert relayed.all("Transfer-Encoding") in ([], ["chunked"])  # at most the gateway's own
    assert "x-secret" not in " ".join(relayed.all("Connection")).lower()
    assert _dechunk(relayed.body) == (b"hello", True)

    # Keep-alive towards the client: the upstream's `Connection: close` is not passed on,
    # and the connection the upstream said it would close is not reused.
    response = await gw.get("/raw/hop")
    assert response.status == 200 and await response.read() == b"hello"
    assert "close" not in response.headers.get("Connection", "").lower()
    assert "X-Secret" not in response.headers
    generated = response.headers.getall("X-Request-ID")
    assert len(generated) == 1 and generated[0] != "chosen-by-upstream"
    assert raw.connections == 2


# -- timeouts ----------------------------------------------------------------------------------


async def test_no_response_head_within_read_timeout_is_504(
    gateways: GatewayFactory, raw: RawUpstream
):
    raw.replies = [Reply((1.5, OK))]
    gw = await _gateway(gateways, raw, forward={"read_timeout": "500ms"})
    started = time.monotonic()
    response = await _exchange(gw, _get("/raw/slow"))
    _assert_gateway_error(response, 504, "upstream_timeout")
    assert time.monotonic() - started < 1.4


async def test_body_stalling_past_read_timeout_before_anything_was_relayed_is_504(
    gateways: GatewayFactory, raw: RawUpstream
):
    # A small sized body is read whole before the client gets anything.
    raw.replies = [Reply((b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nleak", 1.5, b"-body!"))]
    gw = await _gateway(gateways, raw, forward={"read_timeout": "500ms"})
    started = time.monotonic()
    response = await _exchange(gw, _get("/raw/stall"))
    _assert_gateway_error(response, 504, "upstream_timeout")
    assert time.monotonic() - started < 1.4


async def test_body_stalling_past_read_timeout_after_the_head_went_out_cuts_the_connection(
    gateways: GatewayFactory, raw: RawUpstream
):
    raw.replies = [
        Reply(
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n",
                1.5,
                b"4\r\nlate\r\n0\r\n\r\n",
            )
        )
    ]
    gw = await _gateway(gateways, raw, forward={"read_timeout": "500ms"})
    started = time.monotonic()
    response = await _exchange(gw, _get("/raw/stall"))
    assert time.monotonic() - started < 1.4  # cut at the read timeout, not at the upstream's pace
    assert response.status == 200
    payload, complete = _dechunk(response.body)
    assert payload == b"first" and not complete


# -- what the upstream received ----------------------------------------------------------------


def _request_head(raw_head: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    request_line, *lines = raw_head.rstrip(b"\r\n").split(b"\r\n")
    headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.append((name.decode().lower(), value.strip().decode()))
    return request_line, headers


def _values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key == name.lower()]


async def test_authenticated_get_reaches_the_upstream_as_one_clean_request(
    gateways: GatewayFactory, raw: RawUpstream
):
    gw = await _gateway(gateways, raw)
    token = gw.token(sub="alice", jti="token-1", scope="orders:read")
    response = await gw.get(
        "/api/orders?id=7&q=a%20b&empty=",
        token,
        headers={"X-Auth-Subject": "mallory", "X-Auth-Token-Id": "forged", "X-Custom": "kept"},
    )
    assert response.status == 200
    request_line, headers = _request_head(raw.received[-1])
    assert request_line == b"GET /api/orders?id=7&q=a%20b&empty= HTTP/1.1"
    assert _values(headers, "Host") == [f"127.0.0.1:{raw.port}"]
    assert _values(headers, "Transfer-Encoding") == []
    assert _values(headers, "Content-Length") == []
    assert _values(headers, "X-Auth-Subject") == ["alice"]
    assert _values(headers, "X-Auth-Token-Id") == ["token-1"]
    assert _values(headers, "X-Auth-Scope") == ["orders:read"]
    assert _values(headers, "Authorization") == [f"Bearer {token}"]
    assert _values(headers, "X-Custom") == ["kept"]
    assert _values(headers, "X-Request-ID") == [response.headers["X-Request-ID"]]
    assert _values(headers, "X-Forwarded-For") == ["127.0.0.1"]
    assert _values(headers, "X-Forwarded-Host") == [gw.url.removeprefix("http://")]


async def test_public_get_reaches_the_upstream_without_identity_headers(
    gateways: GatewayFactory, raw: RawUpstream
):
    gw = await _gateway(gateways, raw)
    response = await _exchange(
        gw, _get("/raw/path/x?a=1&a=2&b=%2F", "X-Auth-Subject: mallory", "X-Custom: kept")
    )
    assert response.status == 200
    request_line, headers = _request_head(raw.received[-1])
    assert request_line == b"GET /raw/path/x?a=1&a=2&b=%2F HTTP/1.1"
    assert _values(headers, "Host") == [f"127.0.0.1:{raw.port}"]
    assert _values(headers, "X-Forwarded-Host") == ["gateway.test"]
    assert _values(headers, "X-Auth-Subject") == []
    assert _values(headers, "Transfer-Encoding") == []
    assert _values(headers, "Content-Length") == []
    assert _values(headers, "X-Custom") == ["kept"]
