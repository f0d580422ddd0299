"""A call Redis runs late: the gateway gave up on it (store_unavailable), yet the command sat in
a socket buffer of a stalled server and runs when the server resumes. It must not record what
the gateway never accepted: check_and_touch.lua does nothing past its call's deadline (sent on
Redis's own clock, `ServerClock`), and a coalesced flush stamps each activity when it
happened, not when Redis got to it. The stall is a SIGSTOP of the tests' own redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest
from conftest import RedisServer

from gateway.config import Store as StoreConfig
from gateway.store import StoreUnavailable, Touch
from gateway.store.base import Activity
from gateway.store.factory import open_store
from gateway.store.pipeline import PipelinedConnection
from gateway.store.redis import RedisStore

IDLE = 900.0
TIMEOUT = 0.25
STALL = 0.8  # longer than the call's deadline and the watchdog's slack


def touch(now: float, initial: float, key: str = "k") -> Touch:
    return Touch(
        key=key,
        initial=initial,
        now=now,
        idle_timeout=IDLE,
        extend=True,
        expires_at=initial + IDLE,
        linger=30,
        remember_idle=False,
    )


@contextmanager
def stalled(server: RedisServer) -> Iterator[None]:
    """redis-server stopped (not dead: what it was sent waits in its socket), then resumed."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


async def resumed_and_settled(server: RedisServer) -> None:
    """After SIGCONT: Redis has run whatever it had queued once it answers a fresh PING."""
    for _ in range(50):
        if server.command("PING").startswith(b"+PONG"):
            return
        await asyncio.sleep(0.02)


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    opened = open_store(StoreConfig(url=redis_server.url, key_prefix="late", timeout=TIMEOUT))
    assert isinstance(opened, RedisStore)
    assert opened.caller_time is False  # as configured: Redis's clock decides
    yield opened
    await opened.close()


async def test_a_touch_redis_runs_after_its_deadline_records_no_activity(
    store: RedisStore, redis_server: RedisServer
) -> None:
    now = time.time()
    accepted = await store.check_and_touch(touch(now, initial=now - 10))
    assert accepted.idle is False
    before = await store.last_activity("k")
    assert before is not None

    with stalled(redis_server):
        with pytest.raises(StoreUnavailable):  # refused store_unavailable: not activity
            await store.check_and_touch(touch(now, initial=now - 10))
        await asyncio.sleep(STALL)
    await resumed_and_settled(redis_server)

    # Without its deadline, the queued call would have run now and stamped last_activity
    # STALL seconds after the last accepted request.
    assert await store.last_activity("k") == before
    # And the store serves again at once.
    again = await store.check_and_touch(touch(time.time(), initial=now - 10))
    assert again.idle is False and again.last_activity == before


async def test_a_fresh_connection_to_the_same_server_keeps_what_it_knew_of_its_clock(
    redis_server: RedisServer,
) -> None:
    """A retry on a fresh connection (the watchdog dropped the last) goes to a server that may
    be stalled still, and may never answer the new connection's TIME: its calls carry the
    deadline on the clock learnt before (Cluster's node connections send at once, with no
    handshake to wait for). Another address (a failover's new master) is learnt anew."""
    connection = PipelinedConnection("127.0.0.1", redis_server.port, call_timeout=1.0)
    try:
        assert await connection.call("PING") == b"PONG"
        await asyncio.sleep(0.05)  # TIME's answer came with PING's
        offset = connection.clock.offset
        assert offset is not None

        learnt = connection.clock
        connection.close()
        assert await connection.call("PING") == b"PONG"  # on a new connection
        assert connection.clock is learnt  # kept: known before the new one's TIME answered
        assert connection.clock.offset is not None
        assert abs(connection.clock.offset - offset) < 0.05
    finally:
        connection.close()


async def test_a_flush_redis_runs_late_stamps_activity_when_it_happened(
    store: RedisStore, redis_server: RedisServer
) -> None:
    now = time.time()
    await store.check_and_touch(touch(now, initial=now - 10))  # the server's clock, learnt
    activity = Activity(
        key="k",
        at=now,
        age=0.0,  # accepted locally just now
        initial=now - 10,
        idle_timeout=IDLE,
        expires_at=now - 10 + IDLE,
        linger=30,
    )
    assert await store.record_activity([activity], now) == []  # its connection, opened
    with stalled(redis_server):
        flushed_at = time.time()
        failed = await store.record_activity([activity], flushed_at)
        assert failed == [activity]  # timed out: kept for the next flush
        await asyncio.sleep(STALL)
    await resumed_and_settled(redis_server)

    written = await store.last_activity("k")
    assert written is not None
    # The late call wrote the activity's own time (on Redis's clock: within the loopback's
    # skew of ours), not the time Redis resumed (STALL later).
    assert abs(written - flushed_at) < 0.1, written - flushed_at


def connection_of(store: RedisStore, key: str) -> PipelinedConnection:
    if store._cluster is not None:
        found = store._cluster.for_key(store.activity_key(key))
        assert found is not None
        return found
    assert store._pipelined is not None
    return store._pipelined


@pytest.mark.parametrize("topology", ["redis_server", "stable_sentinel", "redis_cluster"])
async def test_every_topology_sends_the_deadline_on_the_servers_clock(
    topology: str, request: pytest.FixtureRequest
) -> None:
    """Sentinel's master and each Cluster node get the deadline on their own clock: a call
    whose deadline is past on it (made so by telling the connection its server's clock is far
    behind) is answered late, refused store_unavailable, and writes nothing."""
    servers = request.getfixturevalue(topology)
    opened = open_store(StoreConfig(url=servers.url, key_prefix=f"late-{topology}", timeout=1))
    assert isinstance(opened, RedisStore)
    try:
        key = f"k-{time.monotonic_ns()}"
        now = time.time()
        await opened.check_and_touch(touch(now, initial=now - 10, key=key))
        before = await opened.last_activity(key)
        clock = connection_of(opened, key).clock
        assert clock.offset is not None  # learnt from TIME and the script's answers
        assert abs(clock.offset + time.monotonic() - time.time()) < 0.5

        clock.offset -= 3600  # any deadline sent now lies an hour in the server's past
        with pytest.raises(StoreUnavailable, match=r"timed out|after its deadline"):
            await opened.check_and_touch(touch(time.time(), initial=now - 10, key=key))
        assert await opened.last_activity(key) == before
    finally:
        await opened.close()
