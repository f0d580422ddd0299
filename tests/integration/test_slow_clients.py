"""Slow and idle clients on a real socket: server.header_timeout bounds the time to send a
request head (however the bytes are dripped), server.keepalive_timeout closes idle
connections, server.max_connections keeps further clients in the listen backlog. Neither
timeout cuts a slow request body or a long upstream response."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from conftest import GatewayFactory
from harness import GatewayUnderTest, Upstream
from prometheus_client import REGISTRY

HEAD = b"GET /public/x HTTP/1.1\r\nHost: gateway\r\nX-Filler: " + b"a" * 40 + b"\r\n\r\n"


async def _connect(gw: GatewayUnderTest) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", gw.running.proxy.addresses[0][1])


async def _drip(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    """One byte at a time; stops quietly once the gateway closed the connection."""
    for i in range(len(data)):
        if writer.is_closing():
            return
        writer.write(data[i : i + 1])
        try:
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(every)


async def _closed_after(reader: asyncio.StreamReader, limit: float) -> tuple[float, bytes]:
    """Seconds until the gateway closed the connection, and what it sent before (fails if it
    stays open for `limit`)."""
    started = time.monotonic()
    received = b""
    async with asyncio.timeout(limit):
        while chunk := await reader.read(65536):
            received += chunk
    return time.monotonic() - started, received


def _response_count(received: bytes) -> int:
    return received.count(b"HTTP/1.1 ")


async def test_a_slowloris_head_is_cut_at_header_timeout(
    gateways: GatewayFactory, upstream: Upstream
):
    """Bytes every 0.1 s never reset the deadline: 1 s after connecting, 408 and close."""
    gw = await gateways(server={"header_timeout": "1s", "keepalive_timeout": "60s"})
    reader, writer = await _connect(gw)
    drip = asyncio.create_task(_drip(writer, HEAD, every=0.1))  # 6.5 s for the whole head
    took, received = await _closed_after(reader, limit=2.5)
    drip.cancel()
    writer.close()
    assert 0.9 <= took <= 2.0, took
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert upstream.received == []
    assert REGISTRY.get_sample_value(
        "idlegate_client_timeouts_total", {"timeout": "header_timeout"}
    )


async def test_a_connection_that_sends_nothing_is_closed_at_header_timeout(
    gateways: GatewayFactory,
):
    gw = await gateways(server={"header_timeout": "1s", "keepalive_timeout": "60s"})
    reader, writer = await _connect(gw)
    took, received = await _closed_after(reader, limit=2.5)
    writer.close()
    assert 0.9 <= took <= 2.0, took
    assert received == b""  # no 408 to a client that asked nothing


async def test_the_next_head_on_a_kept_alive_connection_has_its_own_deadline(
    gateways: GatewayFactory, upstream: Upstream
):
    """Between requests keepalive_timeout applies; from the next request's first byte, the
    head must be complete within header_timeout."""
    gw = await gateways(server={"header_timeout": "1s", "keepalive_timeout": "2500ms"})
    reader, writer = await _connect(gw)
    writer.write(HEAD)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    await asyncio.sleep(0.5)  # idle, well within keepalive_timeout
    drip = asyncio.create_task(_drip(writer, HEAD, every=0.1))
    took, received = await _closed_after(reader, limit=2.5)
    drip.cancel()
    writer.close()
    assert 0.9 <= took <= 2.0, took  # header_timeout from the first byte, not keep-alive's
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert len(upstream.received) == 1


@pytest.mark.parametrize("split", ["same segment", "while answered"])
async def test_a_pipelined_partial_head_has_the_deadline_of_any_head(
    gateways: GatewayFactory, upstream: Upstream, split: str
):
    """The start of a next head sent behind a whole one (in the same segment, or while the
    first is being answered) is cut at header_timeout after the first answer, not held for
    keepalive_timeout; the first request is answered in full."""
    gw = await gateways(server={"header_timeout": "1s", "keepalive_timeout": "60s"})
    reader, writer = await _connect(gw)
    if split == "same segment":
        writer.write(HEAD + HEAD[:20])
    else:
        writer.write(b"GET /public/slow?s=0.6 HTTP/1.1\r\nHost: gateway\r\n\r\n")
        await asyncio.sleep(0.2)
        writer.write(HEAD[:20])
    took, received = await _closed_after(reader, limit=2.9)
    writer.close()
    assert received.startswith(b"HTTP/1.1 200 "), received
    assert _response_count(received) == 2 and b"HTTP/1.1 408 " in received, received
    assert took <= 2.8, took
    assert len(upstream.received) == 1


async def test_an_idle_kept_alive_connection_is_closed_at_keepalive_timeout(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways(server={"header_timeout": "10s", "keepalive_timeout": "1s"})
    reader, writer = await _connect(gw)
    writer.write(HEAD)
    took, received = await _closed_after(reader, limit=2.5)
    writer.close()
    assert _response_count(received) == 1 and received.startswith(b"HTTP/1.1 200 ")
    assert 0.9 <= took <= 2.0, took


async def test_a_slow_request_body_is_not_cut_by_header_timeout(
    gateways: GatewayFactory, upstream: Upstream
):
    """The head arrives at once; the body drips for twice header_timeout and gets through."""
    gw = await gateways(server={"header_timeout": "1s", "keepalive_timeout": "60s"})
    body = b"0123456789"
    reader, writer = await _connect(gw)
    writer.write(
        b"POST /public/upload HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    await _drip(writer, body, every=0.22)  # 2.2 s
    async with asyncio.timeout(3):
        received = await reader.read()
    writer.close()
    assert received.startswith(b"HTTP/1.1 200 "), received
    assert [r.body_length for r in upstream.received] == [len(body)]


async def test_a_long_upstream_response_is_not_cut_by_header_timeout(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways(server={"header_timeout": "1s", "keepalive_timeout": "1s"})
    reader, writer = await _connect(gw)
    writer.write(b"GET /public/slow?s=1.8 HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(3):
        received = await reader.read()
    writer.close()
    assert received.startswith(b"HTTP/1.1 200 "), received


async def test_beyond_max_connections_a_client_waits_until_one_closes(
    gateways: GatewayFactory, upstream: Upstream
):
    """At the cap the gateway stops accepting: the third client's connect completes in the
    kernel's backlog, but it is served only once one of the two open connections closes."""
    gw = await gateways(server={"max_connections": 2, "keepalive_timeout": "60s"})
    reached = REGISTRY.get_sample_value("idlegate_connection_limit_reached_total") or 0.0
    open_ones = []
    for _ in range(2):
        reader, writer = await _connect(gw)
        writer.write(HEAD)
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        open_ones.append((reader, writer))
    reader, writer = await _connect(gw)  # in the backlog
    writer.write(HEAD)
    waiting = asyncio.create_task(reader.readuntil(b"\r\n\r\n"))
    await asyncio.sleep(0.6)
    assert not waiting.done(), "the connection over the cap was served"
    assert len(upstream.received) == 2
    open_ones[0][1].close()
    async with asyncio.timeout(1):
        assert (await waiting).startswith(b"HTTP/1.1 200 ")
    assert len(upstream.received) == 3
    # Reached with the second connection, and again when the waiting one took the free place.
    assert REGISTRY.get_sample_value("idlegate_connection_limit_reached_total") == reached + 2
    writer.close()
    for _, other in open_ones[1:]:
        other.close()


async def test_the_admin_port_cuts_a_slowloris_too(gateways: GatewayFactory):
    """In Kubernetes the admin port listens on the pod IP (probes, Prometheus)."""
    gw = await gateways(server={"header_timeout": "1s", "keepalive_timeout": "60s"})
    host, port = gw.admin_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    drip = asyncio.create_task(_drip(writer, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n", 0.1))
    took, received = await _closed_after(reader, limit=2.5)
    drip.cancel()
    writer.close()
    assert 0.9 <= took <= 2.0, took
    assert received.startswith(b"HTTP/1.1 408 "), received


def _timeouts(kind: str) -> float:
    return REGISTRY.get_sample_value("idlegate_client_timeouts_total", {"timeout": kind}) or 0.0


def _counted(route: str, reason: str) -> float:
    labels = {"route": route, "decision": "rejected", "reason": reason}
    return REGISTRY.get_sample_value("idlegate_requests_total", labels) or 0.0


async def test_a_request_body_that_stops_is_cut_at_body_timeout_with_408(
    gateways: GatewayFactory, upstream: Upstream
):
    """One byte of a declared megabyte, then nothing: 408 request_timeout and close after
    body_timeout, counted; the upstream never gets the request."""
    gw = await gateways(server={"body_timeout": "1s", "keepalive_timeout": "60s"})
    before, counted = _timeouts("body_timeout"), _counted("/public/", "request_timeout")
    reader, writer = await _connect(gw)
    writer.write(
        b"POST /public/upload HTTP/1.1\r\nHost: gateway\r\nContent-Length: 1000000\r\n\r\nx"
    )
    took, received = await _closed_after(reader, limit=2.5)
    writer.close()
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert b'"reason": "request_timeout"' in received
    assert 0.9 <= took <= 2.0, took
    assert _timeouts("body_timeout") == before + 1
    assert _counted("/public/", "request_timeout") == counted + 1
    assert upstream.received == []


async def test_a_large_body_that_stops_midway_is_cut_at_body_timeout(
    gateways: GatewayFactory, upstream: Upstream
):
    """Past the part read whole (64 KiB) the body streams upstream; a stall there is cut too."""
    gw = await gateways(server={"body_timeout": "1s"})
    before = _timeouts("body_timeout")
    reader, writer = await _connect(gw)
    writer.write(
        b"POST /public/upload HTTP/1.1\r\nHost: gateway\r\nContent-Length: 1000000\r\n\r\n"
        + b"x" * 200_000
    )
    took, received = await _closed_after(reader, limit=2.5)
    writer.close()
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert 0.9 <= took <= 2.0, took
    assert _timeouts("body_timeout") == before + 1
    assert [r.body_length for r in upstream.received if r.body_length == 1000000] == []


async def test_a_small_body_is_read_whole_before_an_upstream_connection_is_taken(
    gateways: GatewayFactory, upstream: Upstream
):
    """With one upstream connection for bodies, three clients dribbling small bodies do not
    hold it: a fourth request gets through at once, and each body arrives whole, re-framed
    with a Content-Length."""
    gw = await gateways(server={"body_timeout": "5s"}, forward={"pool_size": 1})
    dribblers = []
    for _ in range(3):
        reader, writer = await _connect(gw)
        writer.write(
            b"POST /public/upload HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        dribblers.append((reader, writer))
    await asyncio.sleep(0.3)
    reader, writer = await _connect(gw)
    writer.write(
        b"POST /public/upload HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
        b"Content-Length: 3\r\n\r\nabc"
    )
    async with asyncio.timeout(1.5):
        received = await reader.read()
    writer.close()
    assert received.startswith(b"HTTP/1.1 200 "), received
    for _, writer in dribblers:  # now they finish
        writer.write(b"6\r\n world\r\n0\r\n\r\n")
    for reader, writer in dribblers:
        async with asyncio.timeout(2):
            assert (await reader.read()).startswith(b"HTTP/1.1 200 ")
        writer.close()
    assert sorted(r.body_length for r in upstream.received) == [3, 11, 11, 11]
    framed = [r.headers.get("Content-Length") for r in upstream.received]
    assert framed.count("11") == 3 and not any(
        "Transfer-Encoding" in r.headers for r in upstream.received
    )


@pytest.mark.parametrize("sent", [10, 200_000])  # read whole first, or streaming by then
async def test_a_client_that_leaves_midway_through_its_body_is_counted_not_an_error(
    gateways: GatewayFactory, upstream: Upstream, caplog: pytest.LogCaptureFixture, sent: int
):
    gw = await gateways()
    counted = _counted("/public/", "client_closed")
    _, writer = await _connect(gw)
    writer.write(
        b"POST /public/upload HTTP/1.1\r\nHost: gateway\r\nContent-Length: 1000000\r\n\r\n"
        + b"x" * sent
    )
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.transport.abort()  # an RST, mid-body
    for _ in range(40):
        if _counted("/public/", "client_closed") == counted + 1:
            break
        await asyncio.sleep(0.05)
    assert _counted("/public/", "client_closed") == counted + 1
    # The gateway's own log (the test upstream's server logs the upload it lost, as it should).
    gateway_errors = [r for r in caplog.records if r.name.startswith("idlegate")]
    assert not [r for r in gateway_errors if r.levelno >= logging.ERROR]
    assert [r.body_length for r in upstream.received if r.body_length == 1000000] == []
