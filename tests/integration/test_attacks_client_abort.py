"""A client that leaves while a large response is relayed to it (a cancelled download), on a
real socket: counted `client_closed`, never a 500 `internal_error` with a traceback (which any
client, without a token, could repeat to flood the log), the upstream connection given up
half-read, and the gateway serving on."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any

import pytest
from attacks import requests_counted
from conftest import GatewayFactory
from harness import GatewayUnderTest, Upstream

SIZE = 10_000_000  # announced with Content-Length: relayed chunk by chunk, never read whole
PIECE = b"x" * 100_000


class BigUpstream:
    """Answers every request with a 200 of SIZE bytes, written piece by piece; counts the
    connections cut before the whole response went out, and those that got it all."""

    def __init__(self) -> None:
        self.cut = 0
        self.completed = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    await reader.readexactly(int(value))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % SIZE)
            for _ in range(SIZE // len(PIECE)):
                writer.write(PIECE)
                await writer.drain()
            self.completed += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            self.cut += 1
        finally:
            writer.close()


@pytest.fixture
async def big() -> Any:
    server = BigUpstream()
    await server.start()
    yield server
    await server.stop()


async def _until(condition: Any, limit: float = 2.5) -> bool:
    async with asyncio.timeout(limit):
        while not condition():
            await asyncio.sleep(0.02)
    return True


async def _download_then_leave(gw: GatewayUnderTest, request: bytes, *, reset: bool) -> bytes:
    """Send `request`, read a little over the first 64 KiB of the answer, then leave: an RST
    (`reset`) or a plain close."""
    port = gw.running.proxy.addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    received = b""
    while len(received) < 70_000:
        chunk = await reader.read(65536)
        assert chunk, received[:200]
        received += chunk
    if reset:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()
    return received


@pytest.mark.parametrize("reset", [True, False], ids=["reset", "closed"])
@pytest.mark.parametrize("way", ["lean", "aiohttp", "stream_deadline"])
async def test_a_client_leaving_a_streamed_response_is_client_closed_not_an_error(
    gateways: GatewayFactory,
    upstream: Upstream,
    big: BigUpstream,
    caplog: pytest.LogCaptureFixture,
    way: str,
    reset: bool,
):
    gw = await gateways(
        routes=[
            {"prefix": "/public/", "upstream": upstream.url, "auth": "none"},
            {"prefix": "/video/", "upstream": big.url, "auth": "none"},
            {"prefix": "/live/", "upstream": big.url, "stream_deadline": True},
        ]
    )
    # Bodyless to the lean pool; with a body through aiohttp; cut at deadlines (with a token).
    route, head = "/video/", b"GET /video/movie.mp4 HTTP/1.1\r\nHost: gw\r\n"
    if way == "aiohttp":
        head = b"POST /video/movie.mp4 HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n"
    elif way == "stream_deadline":
        route = "/live/"
        head = b"GET /live/feed HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\n" % (
            gw.token().encode()
        )
    request = head + b"\r\n" + (b"{}" if way == "aiohttp" else b"")
    closed, failed = (
        requests_counted(route, "rejected", "client_closed"),
        requests_counted(route, "error", "internal_error"),
    )
    caplog.set_level(logging.INFO)

    received = await _download_then_leave(gw, request, reset=reset)

    assert received.startswith(b"HTTP/1.1 200 ")  # the head went out before it left
    await _until(lambda: requests_counted(route, "rejected", "client_closed") == closed + 1)
    assert requests_counted(route, "error", "internal_error") == failed
    # The upstream connection is given up half-read, not kept for another request.
    await _until(lambda: big.cut == 1)
    assert big.completed == 0
    # Nothing above INFO from any logger (the gateway's, aiohttp's), no traceback.
    assert [r for r in caplog.records if r.levelno > logging.INFO or r.exc_info] == []
    # And the gateway serves on.
    response = await gw.get("/public/next")
    assert response.status == 200
    assert upstream.received[-1].path_qs == "/public/next"


async def test_many_cancelled_downloads_leave_no_error_line(
    gateways: GatewayFactory, big: BigUpstream, caplog: pytest.LogCaptureFixture
):
    """The finding's loop, shortened: twenty aborts, twenty counts, no line at all."""
    gw = await gateways(routes=[{"prefix": "/video/", "upstream": big.url, "auth": "none"}])
    closed = requests_counted("/video/", "rejected", "client_closed")
    request = b"GET /video/movie.mp4 HTTP/1.1\r\nHost: gw\r\n\r\n"
    for _ in range(20):
        await _download_then_leave(gw, request, reset=True)
    await _until(lambda: requests_counted("/video/", "rejected", "client_closed") == closed + 20)
    assert requests_counted("/video/", "error", "internal_error") == 0
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
