"""Attacks on `stream_deadline` cuts, seen from a raw client socket: the cut response must end on
a complete chunk and take its connection with it (a pipelined request behind it is never
answered on it), and a long poll refused before its head leaves both the client's connection and
the upstream pool in a clean state. Regression guards."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from attacks import parse, request
from conftest import GatewayFactory
from harness import GatewayUnderTest
from ws_upstream import WsUpstream

from gateway.clock import ManualClock


@pytest.fixture
async def events() -> AsyncIterator[WsUpstream]:
    server = WsUpstream()
    await server.start()
    yield server
    await server.stop()


async def live_gateway(gateways: GatewayFactory, upstream: WsUpstream) -> GatewayUnderTest:
    routes = [
        {"prefix": "/live/", "upstream": upstream.url, "stream_deadline": True},
        {"prefix": "/plain/", "upstream": upstream.url},
    ]
    return await gateways(routes=routes, policy={"leeway": "0s"})


def chunks(framed: bytes) -> tuple[list[bytes], bytes]:
    """The complete chunks of a chunked body, and what follows the last complete one."""
    found = []
    rest = framed
    while True:
        size_line, crlf, after = rest.partition(b"\r\n")
        if not crlf:
            return found, rest
        size = int(size_line.split(b";")[0], 16)
        if len(after) < size + 2 or size == 0:
            return found, rest
        assert after[size : size + 2] == b"\r\n"
        found.append(after[:size])
        rest = after[size + 2 :]


async def test_a_cut_stream_ends_on_a_complete_chunk_and_closes_its_connection(
    gateways: GatewayFactory, events: WsUpstream, clock: ManualClock
):
    gw = await live_gateway(gateways, events)
    token = gw.token(ttl=60)
    auth = f"Authorization: Bearer {token}"
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.running.proxy.addresses[0][1])
    # Pipelined: a second request behind the stream, on the same connection.
    writer.write(
        request("GET /live/events?n=1000&every=0.02 HTTP/1.1", auth)
        + request("GET /plain/after HTTP/1.1", f"Authorization: Bearer {gw.token()}")
    )
    data = b""
    async with asyncio.timeout(3):
        while data.count(b"data: event") < 3:
            data += await reader.read(65536)
        clock.advance(60)
        while chunk := await reader.read(65536):
            data += chunk
    writer.close()
    response = parse(data)
    assert response.status == 200 and response.all("transfer-encoding") == ["chunked"]
    complete, rest = chunks(response.body)
    assert rest == b"", "the connection ended right after a complete chunk"
    assert b"".join(complete).endswith(b"\n\n")
    assert b"0\r\n\r\n" not in response.body, "no terminating chunk: the client sees a cut"
    assert b"HTTP/1.1" not in response.body, "the pipelined request got no answer on it"


async def test_a_long_poll_refused_before_its_head_leaves_everything_clean(
    gateways: GatewayFactory, events: WsUpstream, clock: ManualClock
):
    gw = await live_gateway(gateways, events)
    token = gw.token(ttl=60)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.running.proxy.addresses[0][1])
    writer.write(request("GET /live/events?wait=1&n=1 HTTP/1.1", f"Authorization: Bearer {token}"))
    await asyncio.sleep(0.3)
    clock.advance(61)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert head.startswith(b"HTTP/1.1 401")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    # The same client connection answers its next request with that request's response...
    writer.write(request("GET /plain/next HTTP/1.1", f"Authorization: Bearer {gw.token()}"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    # ... and once the upstream answers the abandoned poll, no other request gets that answer.
    await asyncio.sleep(0.8)
    for i in range(3):
        response = await gw.get(f"/plain/p{i}", gw.token())
        assert (await response.json())["path"] == f"/plain/p{i}"


async def test_a_cut_stream_to_an_http_1_0_client_ends_in_a_reset_not_a_clean_close(
    gateways: GatewayFactory, events: WsUpstream, clock: ManualClock
):
    # HTTP/1.0: no chunking, no Content-Length, so the body ends with the connection. A clean
    # close at the cut would read as the stream's normal end; a reset reads as an error.
    gw = await live_gateway(gateways, events)
    token = gw.token(ttl=60)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.running.proxy.addresses[0][1])
    writer.write(
        b"GET /live/events?n=1000&every=0.02 HTTP/1.0\r\nHost: gw\r\n"
        + f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    data = b""
    async with asyncio.timeout(3):
        while data.count(b"data: event") < 3:
            data += await reader.read(65536)
        assert data.startswith(b"HTTP/1.0 200")
        head = data.partition(b"\r\n\r\n")[0].lower()
        assert b"content-length" not in head and b"transfer-encoding" not in head
        clock.advance(60)
        with pytest.raises(ConnectionResetError):
            await read_to_the_end(reader)
    writer.close()


async def read_to_the_end(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass
