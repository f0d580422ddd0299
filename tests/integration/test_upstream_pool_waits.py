"""Waiting for a connection of the lean pool, against a real upstream socket: connections go to
the caller that has waited longest, and nobody waits longer than `connect_timeout`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from multidict import CIMultiDict

from gateway.forward.http1 import UpstreamPool
from gateway.forward.transport import UpstreamConnectTimeout, UpstreamPoolTimeout

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class SlowUpstream:
    """Answers every request after `delay` seconds (a path starting /hold waits `hold`)."""

    def __init__(self, delay: float, hold: float = 0.0) -> None:
        self.delay = delay
        self.hold = hold
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                held = head.split(b" ", 2)[1].startswith(b"/hold")
                await asyncio.sleep(self.hold if held else self.delay)
                writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.close()

    def pool(self, *, limit: int, connect_timeout: float = 2.0) -> UpstreamPool:
        return UpstreamPool(
            "127.0.0.1",
            self.port,
            f"127.0.0.1:{self.port}",
            limit=limit,
            connect_timeout=connect_timeout,
            read_timeout=5.0,
        )


@pytest.fixture
async def upstreams() -> AsyncIterator[list[SlowUpstream]]:
    started: list[SlowUpstream] = []
    yield started
    for upstream in started:
        if upstream._server is not None:
            upstream._server.close()
        for task in upstream._tasks:
            task.cancel()
        await asyncio.gather(*upstream._tasks, return_exceptions=True)


async def start(upstreams: list[SlowUpstream], delay: float, hold: float = 0.0) -> SlowUpstream:
    upstream = SlowUpstream(delay, hold)
    upstream._server = await asyncio.start_server(upstream._serve, "127.0.0.1", 0)
    upstream.port = upstream._server.sockets[0].getsockname()[1]
    upstreams.append(upstream)
    return upstream


async def test_a_released_connection_goes_to_the_longest_waiter_not_the_next_caller(upstreams):
    # A closed-loop caller asks again in the same loop turn its answer freed the connection;
    # the caller already waiting must still be next (aiohttp's per-connection handler
    # serving a pipelining client is such a caller).
    upstream = await start(upstreams, delay=0.01)
    pool = upstream.pool(limit=1)
    served: list[str] = []

    async def closed_loop() -> None:
        for i in range(5):
            await pool.request("GET", f"/a{i}", CIMultiDict())
            served.append(f"a{i}")

    async def once() -> None:
        await pool.request("GET", "/b", CIMultiDict())
        served.append("b")

    looping = asyncio.ensure_future(closed_loop())
    await asyncio.sleep(0.003)  # a0 is on the connection now; b queues behind it
    async with asyncio.timeout(3):
        await asyncio.gather(looping, once())
    assert served[:2] == ["a0", "b"], served
    assert upstream.connections == 1
    pool.close()


async def test_waiters_are_served_in_the_order_they_came(upstreams):
    upstream = await start(upstreams, delay=0.02)
    pool = upstream.pool(limit=1)
    served: list[int] = []

    async def one(index: int) -> None:
        await pool.request("GET", f"/{index}", CIMultiDict())
        served.append(index)

    tasks = []
    for index in range(6):
        tasks.append(asyncio.ensure_future(one(index)))
        await asyncio.sleep(0.001)
    async with asyncio.timeout(3):
        await asyncio.gather(*tasks)
    assert served == list(range(6))
    pool.close()


async def test_waiting_for_a_busy_pool_is_bounded_by_connect_timeout(upstreams):
    upstream = await start(upstreams, delay=0.0, hold=1.0)
    pool = upstream.pool(limit=1, connect_timeout=0.2)
    holder = asyncio.ensure_future(pool.request("GET", "/hold", CIMultiDict()))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    async with asyncio.timeout(2):
        with pytest.raises(UpstreamPoolTimeout) as raised:
            await pool.request("GET", "/queued", CIMultiDict())
    waited = time.monotonic() - started
    assert 0.15 < waited < 0.6
    assert isinstance(raised.value, UpstreamConnectTimeout)  # the family's connect member
    assert (await holder).status == 200
    # The timed-out waiter left no trace: the connection is reused by the next caller.
    assert (await pool.request("GET", "/after", CIMultiDict())).status == 200
    assert upstream.connections == 1
    pool.close()
