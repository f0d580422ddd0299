"""store.coalesce against a real redis-server: record_activity.lua's rules (on both stores),
Redis's own clock for batched writes, batching by chunk, flush failures, and two gateways on
one Redis whose decisions keep the bounds: never accepted late, at most D early, idle terminal.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from gateway.clock import ManualClock, SystemClock
from gateway.config import Store as StoreConfig
from gateway.store import Store, Touch
from gateway.store.base import Activity
from gateway.store.coalesce import CoalescingStore
from gateway.store.factory import open_store
from gateway.store.memory import MemoryStore
from gateway.store.redis import FLUSH_CHUNK, RedisStore

if TYPE_CHECKING:
    from tests.conftest import GatewayFactory, RedisServer

IDLE = 60.0
PREFIX = "ctest"


def activity(
    key: str, at: float, *, age: float = 0.0, initial: float, exp: float | None = None
) -> Activity:
    return Activity(
        key=key,
        at=at,
        age=age,
        initial=initial,
        idle_timeout=IDLE,
        expires_at=initial + 600 if exp is None else exp,
        linger=30.0,
    )


def touch(key: str, now: float, initial: float, *, exp: float | None = None) -> Touch:
    return Touch(
        key=key,
        initial=initial,
        now=now,
        idle_timeout=IDLE,
        extend=True,
        expires_at=initial + 600 if exp is None else exp,
        linger=30.0,
        remember_idle=False,
    )


def redis_store(server: RedisServer, *, caller_time: bool) -> RedisStore:
    store = open_store(StoreConfig(url=server.url, key_prefix=PREFIX, timeout=1.0))
    assert isinstance(store, RedisStore)
    store.caller_time = caller_time
    return store


def calls(server: RedisServer, command: str) -> int:
    info = server.command("INFO", "commandstats").decode()
    found = re.search(rf"cmdstat_{command}:calls=(\d+)", info)
    return int(found.group(1)) if found else 0


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


# As in test_store_redis.py: one redis-server, Sentinel and Cluster (a flush is one script call
# per hash slot there).
TOPOLOGIES = {"redis": "redis_server", "sentinel": "stable_sentinel", "cluster": "redis_cluster"}


@pytest.fixture(params=["memory", *TOPOLOGIES])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[MemoryStore | RedisStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    topology = request.getfixturevalue(TOPOLOGIES[request.param])
    opened = open_store(StoreConfig(url=topology.url, key_prefix=PREFIX, timeout=1.0))
    assert isinstance(opened, RedisStore)
    opened.caller_time = True  # simulated time: Redis decides with the caller's now
    yield opened
    await opened.close()


# --- record_activity, both stores (simulated time) --------------------------------------------


async def test_a_batched_write_moves_last_activity_forward_only(
    store: MemoryStore | RedisStore, clock: ManualClock
) -> None:
    iat = clock.now()
    await store.check_and_touch(touch("a", iat + 5, iat))
    await store.check_and_touch(touch("b", iat + 5, iat))
    now = iat + 20
    batch = [activity("a", iat + 12.25, initial=iat), activity("b", iat + 3, initial=iat)]
    assert await store.record_activity(batch, now) == []
    assert await store.last_activity("a") == iat + 12.25
    assert await store.last_activity("b") == iat + 5  # never backwards


async def test_a_batched_write_is_never_beyond_the_store_now(
    store: MemoryStore | RedisStore, clock: ManualClock
) -> None:
    iat = clock.now()
    await store.check_and_touch(touch("a", iat + 5, iat))
    await store.record_activity([activity("a", iat + 50, initial=iat)], iat + 20)
    assert await store.last_activity("a") == iat + 20


async def test_a_batched_write_never_revives_an_idle_record(
    store: MemoryStore | RedisStore, clock: ManualClock
) -> None:
    iat = clock.now()
    await store.check_and_touch(touch("a", iat, iat))
    late = iat + IDLE + 1  # the store considers it idle now
    await store.record_activity([activity("a", iat + 9, initial=iat)], late)
    assert await store.last_activity("a") == iat
    assert (await store.check_and_touch(touch("a", late, iat))).idle


async def test_a_batched_write_extends_the_record_as_an_accepted_request_would(
    store: MemoryStore | RedisStore, clock: ManualClock, request: pytest.FixtureRequest
) -> None:
    iat = clock.now()
    await store.check_and_touch(touch("a", iat + 10, iat, exp=iat + 20))
    # The record lives until max(exp, last + idle) + linger = iat + 100. The activity at
    # iat + 65 came from a (session's) token that expires at iat + 300: kept until iat + 330.
    at = iat + 65
    await store.record_activity([activity("a", at, initial=iat, exp=iat + 300)], at + 1)
    keep_until = iat + 330
    if isinstance(store, MemoryStore):
        assert store.expires_at("a") == keep_until
    else:
        topology = request.getfixturevalue(TOPOLOGIES[request.node.callspec.params["store"]])
        server = getattr(topology, "master", topology)  # Sentinel: the master answers
        ms = int(server.command("PTTL", store.activity_key("a")).strip().lstrip(b":"))
        assert ms / 1000 == pytest.approx(keep_until - (at + 1), abs=0.01)


async def test_a_batch_of_many_keys_is_written_whole(
    store: MemoryStore | RedisStore, clock: ManualClock
) -> None:
    """1000 keys: chunks of FLUSH_CHUNK on one Redis; on Cluster one call per hash slot (each
    script's keys in one slot), on all three masters."""
    iat = clock.now()
    batch = [activity(f"k{i}", iat + 1 + i / 1000, initial=iat) for i in range(1000)]
    assert await store.record_activity(batch, iat + 2) == []
    for i in (0, 1, 500, 999):
        assert await store.last_activity(f"k{i}") == iat + 1 + i / 1000


# --- Redis: its own clock, chunks, failures ---------------------------------------------------


async def test_redis_writes_batched_activity_on_its_own_clock(
    redis_server: RedisServer,
) -> None:
    """`at` (the replica's wall clock) is ignored with Redis's TIME: the activity is TIME - age,
    so a replica whose clock runs an hour ahead or behind writes the same, true moment."""
    store = redis_store(redis_server, caller_time=False)
    try:
        real = time.time()
        batch = [
            activity("ahead", real + 3600, age=2.0, initial=real - 10),
            activity("behind", real - 3600, age=2.0, initial=real - 10),
        ]
        assert await store.record_activity(batch, real) == []
        for key in ("ahead", "behind"):
            last = await store.last_activity(key)
            assert last == pytest.approx(time.time() - 2.0, abs=0.2)
    finally:
        await store.close()


async def test_redis_flushes_a_thousand_keys_in_four_commands(
    redis_server: RedisServer, clock: ManualClock
) -> None:
    store = redis_store(redis_server, caller_time=True)
    try:
        iat = clock.now()
        batch = [activity(f"k{i}", iat + 1, initial=iat) for i in range(1000)]
        await store.record_activity(batch[:1], iat + 1)  # redis-py loads the script once
        before = calls(redis_server, "evalsha") + calls(redis_server, "eval")
        assert await store.record_activity(batch, iat + 2) == []
        after = calls(redis_server, "evalsha") + calls(redis_server, "eval")
        assert after - before == -(-1000 // FLUSH_CHUNK) == 4
        assert await store.last_activity("k999") == iat + 1
    finally:
        await store.close()


async def test_a_flush_redis_fails_returns_its_writes_counts_and_logs_once(
    redis_server: RedisServer, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = redis_store(redis_server, caller_time=True)
    try:
        iat = clock.now()
        batch = [activity(f"k{i}", iat + 1, initial=iat) for i in range(300)]
        errors = metric("idlegate_store_errors_total", {"op": "flush"})
        redis_server.stop()
        with caplog.at_level(logging.ERROR, logger="idlegate.store"):
            failed = await store.record_activity(batch, iat + 2)
        assert sorted(a.key for a in failed) == sorted(a.key for a in batch)
        assert metric("idlegate_store_errors_total", {"op": "flush"}) - errors == 2  # 2 chunks
        assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    finally:
        await store.close()


async def test_pending_writes_survive_a_redis_outage(
    redis_server: RedisServer, clock: ManualClock
) -> None:
    inner = redis_store(redis_server, caller_time=True)
    store = CoalescingStore(inner, 10.0, clock, flush_interval=0)
    try:
        iat = clock.now()
        await store.check_and_touch(touch("a", iat, iat))
        clock.advance(4)
        await store.check_and_touch(touch("a", clock.now(), iat))  # local
        redis_server.stop()
        await store.flush()
        assert store.pending == 1
        redis_server.start()
        await store.flush()
        assert store.pending == 0
        assert await inner.last_activity("a") == iat + 4
    finally:
        await store.close()


# --- two gateways on one Redis ----------------------------------------------------------------

ROUTES = [
    {"prefix": "/api/", "upstream": None},
    {"prefix": "/short/", "upstream": None, "idle_timeout": "25s"},
    {"prefix": "/poll/", "upstream": None, "activity": "passive"},
]


# (path, its idle timeout, counts as activity), drawn at random: the long route twice as often.
REQUESTS = [
    ("/api/x", 60.0, True),
    ("/api/x", 60.0, True),
    ("/short/x", 25.0, True),
    ("/poll/x", 60.0, False),
]


def routes(upstream: str) -> list[dict[str, object]]:
    return [{**route, "upstream": upstream} for route in ROUTES]


def coalescing(gateway_store: Store) -> CoalescingStore:
    assert isinstance(gateway_store, CoalescingStore)
    return gateway_store


async def test_two_gateways_keep_the_bounds_on_random_schedules(
    redis_server: RedisServer, gateways: GatewayFactory, clock: ManualClock, upstream: object
) -> None:
    """Requests over HTTP at two coalescing gateways sharing one Redis, in simulated time: every
    decision is checked against the true last activity (every accepted request anywhere)."""
    window = 10.0
    options = {
        "store_url": redis_server.url,
        "store": {"url": redis_server.url, "coalesce": f"{window:g}s"},
        "policy": {"idle_timeout": "60s"},
        "routes": routes(upstream.url),  # type: ignore[attr-defined]
    }
    first = await gateways(**options)
    second = await gateways(**options)
    pair = [first, second]
    stores = [coalescing(gw.gateway.store) for gw in pair]
    rng = random.Random(7)
    start = clock.now()
    tokens: dict[str, tuple[str, float]] = {}  # name -> (token, iat)
    true_last: dict[str, float] = {}
    refused_long: set[str] = set()

    def fresh() -> None:
        name = f"t{len(tokens)}"
        token = first.token(ttl=900)
        tokens[name] = (token, clock.now())
        true_last[name] = float(int(clock.now()))

    for _ in range(2):
        fresh()
    live = sorted(tokens)
    next_flush = [start + rng.uniform(0, window / 2) for _ in pair]
    coalesced = metric("idlegate_store_coalesced_total")
    requests = refused = 0
    for _ in range(300):
        pick = rng.random()
        if pick < 0.6:
            gap = rng.uniform(0, 1.5)
        elif pick < 0.8:
            gap = rng.uniform(0, window)
        elif pick < 0.93:
            gap = rng.uniform(15, 30)  # around the short route's timeout
        else:
            gap = rng.uniform(13, 65)
        now = clock.now() + gap
        for i, store in enumerate(stores):
            while next_flush[i] <= now:
                clock.set(next_flush[i])
                await store.flush()
                next_flush[i] += window / 2
        clock.set(now)
        name = rng.choice(sorted(refused_long)) if refused_long and rng.random() < 0.1 else None
        name = name or rng.choice(live)
        path, timeout, extend = rng.choice(REQUESTS)
        # Each token mostly at its "home" gateway, as with sticky load balancing.
        home = int(name[1:]) % 2
        gw = pair[home] if rng.random() < 0.8 else pair[1 - home]
        response = await gw.get(path, tokens[name][0])
        requests += 1
        gap_to_truth = now - true_last[name]
        where = f"{name} at +{now - start:.2f}s on {path}"
        if response.status == 200:
            assert gap_to_truth <= timeout, f"{where}: accepted late ({gap_to_truth:.2f}s)"
            assert name not in refused_long, f"{where}: accepted after idling out"
            if extend:
                true_last[name] = max(true_last[name], now)
        else:
            assert response.status == 401, await response.text()
            refused += 1
            assert gap_to_truth > timeout - window, f"{where}: refused {gap_to_truth:.2f}s in"
            if timeout == 60.0 and name not in refused_long:
                refused_long.add(name)
                live.remove(name)
                fresh()
                live.append(f"t{len(tokens) - 1}")
    assert refused > 5
    for gw in pair:
        gw.gateway.publish_metrics()
    assert metric("idlegate_store_coalesced_total") - coalesced > requests / 4


async def test_another_gateway_sees_local_activity_once_flushed(
    redis_server: RedisServer, gateways: GatewayFactory, clock: ManualClock, upstream: object
) -> None:
    options = {
        "store_url": redis_server.url,
        "store": {"url": redis_server.url, "coalesce": "10s"},
        "policy": {"idle_timeout": "60s"},
    }
    first = await gateways(**options)
    second = await gateways(**options)
    token = first.token()
    before = calls(redis_server, "evalsha") - calls(redis_server, "hget")
    coalesced = metric("idlegate_store_coalesced_total")
    assert (await first.get("/api/x", token)).status == 200
    for _ in range(20):
        clock.advance(0.4)
        assert (await first.get("/api/x", token)).status == 200
    # One check_and_touch for 21 requests (revocation polls aside: scripts of one HGET each).
    assert calls(redis_server, "evalsha") - calls(redis_server, "hget") - before == 1
    first.gateway.publish_metrics()
    assert metric("idlegate_store_coalesced_total") - coalesced == 20
    last_local = clock.now()
    await coalescing(first.gateway.store).flush()
    # At the other gateway the token lives 60 s from the first gateway's last local request.
    clock.set(last_local + 60)
    assert (await second.get("/api/x", token)).status == 200


async def test_the_drain_writes_what_is_pending(
    redis_server: RedisServer, gateways: GatewayFactory, clock: ManualClock
) -> None:
    options = {
        "store_url": redis_server.url,
        "store": {"url": redis_server.url, "coalesce": "10s"},
        "policy": {"idle_timeout": "60s"},
    }
    first = await gateways(**options)
    second = await gateways(**options)
    token = first.token()
    assert (await first.get("/api/x", token)).status == 200
    clock.advance(5)
    assert (await first.get("/api/x", token)).status == 200  # local, pending
    assert coalescing(first.gateway.store).pending == 1
    await first.close()  # the drain flushes
    clock.advance(58)  # 63 s after the store's decision, 58 s after the local one
    assert (await second.get("/api/x", token)).status == 200


async def test_real_clocks_flush_in_the_background_at_the_time_of_the_activity(
    redis_server: RedisServer, gateways: GatewayFactory
) -> None:
    """Real time: windows on the monotonic clock, flushes every D/2 by the background task,
    the activity written on Redis's clock (TIME - age)."""
    gw = await gateways(
        store_url=redis_server.url,
        gateway_clock=SystemClock(),
        store={"url": redis_server.url, "coalesce": "400ms"},
        policy={"idle_timeout": "5s"},
    )
    issued = time.time()
    token = gw.token(iat=int(issued), exp=int(issued) + 600)
    assert (await gw.get("/api/x", token)).status == 200
    await asyncio.sleep(0.15)
    assert (await gw.get("/api/x", token)).status == 200  # local
    local_at = time.time()
    store = coalescing(gw.gateway.store)
    assert store.pending == 1
    await asyncio.sleep(0.35)  # past the flush at D/2 = 200 ms
    assert store.pending == 0
    client = Redis.from_url(redis_server.url)
    try:
        keys = await client.keys("idlegate:a:*")
        assert len(keys) == 1
        written = float(await client.get(keys[0]))
    finally:
        await client.aclose()
    assert written == pytest.approx(local_at, abs=0.05)
