"""The request path's pipelined Redis connection: replies reach the right caller, forgotten
scripts are reloaded, credentials and database are honoured, stalls do not poison it."""

from __future__ import annotations

import asyncio

import pytest
from conftest import RedisServer

from gateway.config import Store as StoreConfig
from gateway.store import StoreUnavailable, Touch, open_store
from gateway.store.pipeline import PipelinedConnection, ReplyError


def touch(key: str, initial: float, now: float = 1000.0) -> Touch:
    return Touch(
        key=key,
        initial=initial,
        now=now,
        idle_timeout=900,
        extend=False,
        expires_at=now + 600,
        linger=30,
        remember_idle=False,
    )


async def test_concurrent_calls_each_get_their_own_reply(redis_server: RedisServer):
    store = open_store(StoreConfig(url=redis_server.url, timeout=2))
    try:
        results = await asyncio.gather(
            *(store.check_and_touch(touch(f"k{i}", initial=float(500 + i))) for i in range(2000))
        )
        assert [r.last_activity for r in results] == [float(500 + i) for i in range(2000)]
    finally:
        await store.close()


async def test_a_flushed_script_is_loaded_again(redis_server: RedisServer):
    store = open_store(StoreConfig(url=redis_server.url, timeout=2))
    try:
        await store.check_and_touch(touch("a", 900.0))
        redis_server.command("SCRIPT", "FLUSH")
        result = await store.check_and_touch(touch("a", 950.0))
        assert result.last_activity == 950.0
    finally:
        await store.close()


async def test_password_and_database_from_the_url(redis_server: RedisServer):
    redis_server.command("CONFIG", "SET", "requirepass", "pa:ss@word")
    url = f"redis://:pa%3Ass%40word@127.0.0.1:{redis_server.port}/3"
    store = open_store(StoreConfig(url=url, timeout=2))
    try:
        extend = Touch("k", 990.0, 1000.0, 900, True, 1600.0, 30, False)
        await store.check_and_touch(extend)
        assert await store.last_activity("k") == 1000.0
    finally:
        await store.close()
    wrong = open_store(StoreConfig(url=f"redis://:nope@127.0.0.1:{redis_server.port}/3"))
    try:
        with pytest.raises(StoreUnavailable):
            await wrong.check_and_touch(touch("k", 990.0))
    finally:
        await wrong.close()


async def test_a_late_reply_is_dropped_not_handed_to_the_next_caller(redis_server: RedisServer):
    connection = PipelinedConnection("127.0.0.1", redis_server.port)
    try:
        await connection.call("SET", "x", "first")
        redis_server.command("CLIENT", "PAUSE", "400", "ALL")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await connection.call("GET", "x")
        await asyncio.sleep(0.5)
        assert await connection.call("ECHO", "second") == b"second"
        with pytest.raises(ReplyError):
            await connection.call("NOSUCHCOMMAND")
    finally:
        connection.close()
