"""The lean upstream client's pool against a scripted upstream on a real socket: reuse, the
connection limit, idle expiry, retries, timeouts and cancellation."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from multidict import CIMultiDict

from gateway.forward.http1 import UpstreamPool
from gateway.forward.transport import (
    UpstreamBroken,
    UpstreamConnectTimeout,
    UpstreamTimeout,
    UpstreamUnreachable,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
# (request head, index of the request on its connection) -> what to send; None closes.
Script = Callable[[bytes, int], Awaitable[bytes | None]]


@dataclass
class Scripted:
    script: Script
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    closed_by_peer: int = 0
    server: asyncio.Server | None = None
    port: int = 0
    handlers: set[asyncio.Task[None]] = field(default_factory=set)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.writers.append(writer)
        self.connections += 1
        index = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_peer += 1
                    return
                self.heads.append(head)
                answer = await self.script(head, index)
                index += 1
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
        finally:
            writer.close()

    def pool(self, **options: float) -> UpstreamPool:
        settings = {"limit": 8, "connect_timeout": 1.0, "read_timeout": 1.0, **options}
        return UpstreamPool(
            "127.0.0.1",
            self.port,
            f"127.0.0.1:{self.port}",
            limit=int(settings.pop("limit")),
            **settings,
        )


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[Scripted]]]:
    servers: list[Scripted] = []

    async def start(script: Script) -> Scripted:
        upstream = Scripted(script)
        upstream.server = await asyncio.start_server(upstream._serve, "127.0.0.1", 0)
        upstream.port = upstream.server.sockets[0].getsockname()[1]
        servers.append(upstream)
        return upstream

    yield start
    for upstream in servers:
        assert upstream.server is not None
        upstream.server.close()
        for task in upstream.handlers:
            task.cancel()
        await asyncio.gather(*upstream.handlers, return_exceptions=True)


async def always_ok(_head: bytes, _index: int) -> bytes | None:
    return OK


async def close_after_first(_head: bytes, index: int) -> bytes | None:
    """Answers a connection's first request; reads the second and closes unanswered."""
    return OK if index == 0 else None


def headers(**values: str) -> CIMultiDict[str]:
    return CIMultiDict(values)


async def test_sequential_requests_share_one_connection_and_send_one_host(scripted):
    upstream = await scripted(always_ok)
    pool = upstream.pool()
    for _ in range(5):
        response = await pool.request("GET", "/a?b=1", headers(Accept="*/*"))
        assert (response.status, response.body) == (200, b"ok")
    assert upstream.connections == 1
    first = upstream.heads[0].decode()
    assert first.startswith("GET /a?b=1 HTTP/1.1\r\n")
    assert first.count("\r\nHost: ") == 1 and f"Host: 127.0.0.1:{upstream.port}" in first
    assert "Content-Length" not in first and "Transfer-Encoding" not in first
    pool.close()


async def test_a_bodyless_post_declares_an_empty_body(scripted):
    upstream = await scripted(always_ok)
    pool = upstream.pool()
    await pool.request("POST", "/p", headers())
    assert "\r\nContent-Length: 0\r\n" in upstream.heads[0].decode()
    pool.close()


async def test_a_header_value_with_a_newline_is_never_sent(scripted):
    upstream = await scripted(always_ok)
    pool = upstream.pool()
    with pytest.raises(ValueError, match="newline"):
        await pool.request("GET", "/", headers(X_A="1\r\nX-Injected: 1"))
    assert upstream.heads == []
    pool.close()


async def test_the_pool_never_opens_more_than_its_limit(scripted):
    in_flight = 0
    most = 0

    async def slow(_head: bytes, _index: int) -> bytes | None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return OK

    upstream = await scripted(slow)
    pool = upstream.pool(limit=2)
    results = await asyncio.gather(*(pool.request("GET", "/", headers()) for _ in range(10)))
    assert [r.status for r in results] == [200] * 10
    assert upstream.connections == 2 and most == 2
    pool.close()


async def test_a_waiter_cancelled_while_queued_does_not_lose_the_slot(scripted):
    release = asyncio.Event()

    async def held(_head: bytes, _index: int) -> bytes | None:
        await release.wait()
        return OK

    upstream = await scripted(held)
    pool = upstream.pool(limit=1)
    first = asyncio.ensure_future(pool.request("GET", "/1", headers()))
    queued = asyncio.ensure_future(pool.request("GET", "/2", headers()))
    await asyncio.sleep(0.05)
    queued.cancel()
    release.set()
    assert (await first).status == 200
    assert (await pool.request("GET", "/3", headers())).status == 200
    pool.close()


async def test_idle_connections_are_closed_after_the_keepalive_timeout(scripted):
    upstream = await scripted(always_ok)
    pool = upstream.pool(keepalive_timeout=0.2)
    await pool.request("GET", "/", headers())
    await asyncio.sleep(0.5)
    assert upstream.closed_by_peer == 1
    await pool.request("GET", "/", headers())
    assert upstream.connections == 2
    pool.close()


async def test_a_pooled_connection_closed_unanswered_is_retried_once_for_get(scripted):
    upstream = await scripted(close_after_first)
    pool = upstream.pool()
    await pool.request("GET", "/", headers())
    # Sent at once: the close may not have been seen yet; the retry hides it.
    assert (await pool.request("GET", "/again", headers())).status == 200
    assert upstream.connections == 2
    pool.close()


async def test_a_non_idempotent_request_is_never_sent_twice(scripted):
    upstream = await scripted(close_after_first)
    pool = upstream.pool()
    await pool.request("GET", "/", headers())
    with pytest.raises(UpstreamBroken):
        await pool.request("POST", "/once", headers())
    assert [h.split(b" ")[1] for h in upstream.heads].count(b"/once") == 1
    pool.close()


async def test_a_malformed_answer_is_not_retried(scripted):
    async def garbage_second(_head: bytes, index: int) -> bytes | None:
        return OK if index == 0 else b"HELLO\r\n\r\n"

    upstream = await scripted(garbage_second)
    pool = upstream.pool()
    await pool.request("GET", "/", headers())
    with pytest.raises(UpstreamBroken):
        await pool.request("GET", "/bad", headers())
    assert len(upstream.heads) == 2
    pool.close()


async def test_a_refused_connection_is_unreachable():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pool = UpstreamPool("127.0.0.1", port, "x", limit=1, connect_timeout=1.0, read_timeout=1.0)
    with pytest.raises(UpstreamUnreachable):
        await pool.request("GET", "/", headers())
    with pytest.raises(UpstreamUnreachable):  # the slot was given back
        await pool.request("GET", "/", headers())


async def test_a_connect_that_hangs_times_out(monkeypatch: pytest.MonkeyPatch):
    loop = asyncio.get_running_loop()

    async def never(*_args: object, **_kwargs: object) -> None:
        await asyncio.sleep(10)

    monkeypatch.setattr(loop, "create_connection", never)
    pool = UpstreamPool("127.0.0.1", 9, "x", limit=1, connect_timeout=0.1, read_timeout=1.0)
    with pytest.raises(UpstreamConnectTimeout):
        await pool.request("GET", "/", headers())
    monkeypatch.undo()
    with pytest.raises(UpstreamUnreachable):  # the slot was given back
        await pool.request("GET", "/", headers())


async def test_silence_longer_than_read_timeout_times_out_and_the_connection_is_dropped(
    scripted,
):
    answered = 0

    async def stall_first(_head: bytes, _index: int) -> bytes | None:
        nonlocal answered
        answered += 1
        if answered == 1:
            await asyncio.sleep(0.6)
        return OK

    upstream = await scripted(stall_first)
    pool = upstream.pool(read_timeout=0.2)
    with pytest.raises(UpstreamTimeout):
        await pool.request("GET", "/", headers())
    assert (await pool.request("GET", "/", headers())).status == 200
    assert upstream.connections == 2
    pool.close()


async def test_a_request_cancelled_mid_answer_closes_its_connection(scripted):
    async def slow(_head: bytes, _index: int) -> bytes | None:
        await asyncio.sleep(0.3)
        return OK

    upstream = await scripted(slow)
    pool = upstream.pool(limit=1)
    task = asyncio.ensure_future(pool.request("GET", "/", headers()))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await pool.request("GET", "/", headers())).status == 200  # slot freed
    assert upstream.connections == 2
    pool.close()


async def test_a_streamed_body_returns_its_connection_only_when_read_to_the_end(scripted):
    big = b"x" * (200 * 1024)

    async def large(_head: bytes, _index: int) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big

    upstream = await scripted(large)
    pool = upstream.pool()
    response = await pool.request("GET", "/", headers())
    assert response.body is None
    assert b"".join([chunk async for chunk in response.chunks()]) == big
    abandoned = await pool.request("GET", "/", headers())
    assert upstream.connections == 1  # the first one was reused
    abandoned.close()
    await pool.request("GET", "/", headers())
    assert upstream.connections == 2  # an abandoned body's connection is not
    pool.close()


async def test_bytes_sent_on_an_idle_connection_are_never_read_as_the_next_answer(scripted):
    async def answer_twice(head: bytes, _index: int) -> bytes | None:
        if head.split(b" ")[1] == b"/first":
            return OK
        return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh"

    upstream = await scripted(answer_twice)
    pool = upstream.pool()
    assert (await pool.request("GET", "/first", headers())).body == b"ok"
    # The smuggled answer arrives while the connection sits idle in the pool.
    assert upstream.writers
    upstream.writers[0].write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled")
    await asyncio.sleep(0.1)
    response = await pool.request("GET", "/second", headers())
    assert response.body == b"fresh"
    assert upstream.connections == 2
    pool.close()


@pytest.mark.parametrize(("interim", "accepted"), [(2, True), (8, True), (9, False), (50, False)])
async def test_interim_responses_are_skipped_up_to_a_bound(scripted, interim: int, accepted: bool):
    async def early_hints(_head: bytes, _index: int) -> bytes | None:
        return b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" * interim + OK

    upstream = await scripted(early_hints)
    pool = upstream.pool()
    if accepted:
        assert (await pool.request("GET", "/", headers())).body == b"ok"
    else:
        with pytest.raises(UpstreamBroken):
            await pool.request("GET", "/", headers())
    pool.close()


@pytest.mark.parametrize(
    ("coding", "accepted"),
    [("chunked", True), ("Chunked", True), ("gzip", False), ("gzip, chunked", False)],
)
async def test_only_the_chunked_transfer_coding_is_accepted(scripted, coding: str, accepted: bool):
    async def coded(_head: bytes, _index: int) -> bytes | None:
        return (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding.encode() + b"\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n"
        )

    upstream = await scripted(coded)
    pool = upstream.pool()
    if accepted:
        response = await pool.request("GET", "/", headers())
        assert b"".join([chunk async for chunk in response.chunks()]) == b"ok"
    else:
        with pytest.raises(UpstreamBroken):
            await pool.request("GET", "/", headers())
    pool.close()
