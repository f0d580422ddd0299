"""One clock for idle decisions: Redis decides with its own TIME, whatever the replicas' clocks
say, so a replica whose clock lags cannot accept a token that idled out (nor move its last
activity forward, reviving it for every replica), and one whose clock runs ahead cannot refuse
a token early. Real clocks here: the ManualClock tests pin the rules, these pin the clock.

redis-server here is 7.0 (effects replication is the only mode; from 5.0 it is the default,
and the script asks for it on older servers), so TIME before a write is allowed."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import GatewayFactory, RedisServer

from gateway.config import Store as StoreConfig
from gateway.store import Touch
from gateway.store.factory import open_store
from gateway.store.redis import RedisStore

IDLE = 900.0


class SkewedClock:
    """This host's clock, off by `offset` seconds: a replica on a badly synchronised node."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def now(self) -> float:
        return time.time() + self.offset


def touch(now: float, initial: float, *, expires_at: float | None = None) -> Touch:
    return Touch(
        key="k",
        initial=initial,
        now=now,
        idle_timeout=IDLE,
        extend=True,
        expires_at=initial + IDLE if expires_at is None else expires_at,
        linger=30,
        remember_idle=False,
    )


@pytest.fixture
async def store(redis_server: RedisServer):  # type: ignore[no-untyped-def]
    opened = open_store(StoreConfig(url=redis_server.url, key_prefix="clk", timeout=1))
    assert isinstance(opened, RedisStore)
    assert getattr(opened, "caller_time", False) is False  # as configured: Redis's clock
    yield opened
    await opened.close()


async def test_a_lagging_replica_cannot_accept_a_token_that_idled_out(store: RedisStore) -> None:
    real = time.time()
    idled_out = real - IDLE - 1  # its last activity: idle for a second already
    result = await store.check_and_touch(touch(real - 2, initial=idled_out))  # 2 s behind
    assert result.idle is True
    assert await store.last_activity("k") is None  # nothing moved


async def test_a_replica_ahead_cannot_refuse_early_nor_write_its_future(
    store: RedisStore,
) -> None:
    real = time.time()
    result = await store.check_and_touch(touch(real + 5, initial=real - IDLE + 2))  # 5 s ahead
    assert result.idle is False
    last = await store.last_activity("k")
    assert last is not None
    assert last == pytest.approx(time.time(), abs=0.5)  # Redis's now, not the replica's


async def test_record_lifetime_counts_from_redis_time(
    store: RedisStore, redis_server: RedisServer
) -> None:
    real = time.time()
    exp = real + 5000
    # The replica's clock is an hour behind: its now must not lengthen the record's life.
    await store.check_and_touch(touch(real - 3600, initial=real - 10, expires_at=exp))
    ttl = int(redis_server.command("PTTL", "clk:a:k").strip().lstrip(b":")) / 1000
    assert ttl == pytest.approx(exp + 30 - real, abs=1.0)


@pytest.mark.parametrize("first_offset", [+3.0, -3.0])
async def test_idling_out_is_terminal_whatever_the_replicas_clocks(
    gateways: GatewayFactory, redis_server: RedisServer, first_offset: float
) -> None:
    """Two gateways 6 s apart on one Redis, idle_timeout 1 s: the token used at one, idle for
    1.3 s, is refused at both, and stays refused."""
    policy = {"idle_timeout": "1s"}
    first = await gateways(
        store_url=redis_server.url, gateway_clock=SkewedClock(first_offset), policy=policy
    )
    other = await gateways(
        store_url=redis_server.url, gateway_clock=SkewedClock(-first_offset), policy=policy
    )
    issued = time.time()
    token = first.token(iat=int(issued), exp=int(issued) + 600)
    assert (await first.get("/api/x", token)).status == 200
    await asyncio.sleep(1.3)
    for gw in (other, first, other):
        response = await gw.get("/api/x", token)
        assert response.status == 401
        assert (await response.json())["reason"] == "idle_timeout"


async def test_a_replica_ahead_does_not_refuse_a_token_used_a_moment_ago(
    gateways: GatewayFactory, redis_server: RedisServer
) -> None:
    """The replicas 6 s apart, idle_timeout 2 s (room for a loaded machine): by the clock of
    the one ahead, a use the other recorded 0.4 s ago would look 6.4 s old."""
    policy = {"idle_timeout": "2s"}
    behind = await gateways(
        store_url=redis_server.url, gateway_clock=SkewedClock(-3), policy=policy
    )
    ahead = await gateways(store_url=redis_server.url, gateway_clock=SkewedClock(+3), policy=policy)
    issued = time.time()
    token = behind.token(iat=int(issued), exp=int(issued) + 600)
    assert (await behind.get("/api/x", token)).status == 200
    await asyncio.sleep(0.4)
    assert (await ahead.get("/api/x", token)).status == 200  # 0.4 s idle, not 6.4 s
    assert (await behind.get("/api/x", token)).status == 200
