"""Sentinel and Cluster, real: two gateways share activity and revocations, a failover
(SIGKILL of the master) is survived without a restart, and discovery does not depend on any
one sentinel (dead, or black-holed: accepting connections and never answering)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import GatewayFactory
from harness import GatewayUnderTest
from redis_topologies import ClusterSet, SentinelSet

from gateway.store.redis import RedisStore

ADMIN = {"Authorization": "Bearer adm1n"}


@pytest.fixture
def admin_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin.token"
    path.write_text("adm1n\n")
    return path


async def revoke(gw: GatewayUnderTest, **body: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(gw.admin_url + "/admin/revoke", json=body, headers=ADMIN) as response,
    ):
        return response.status


async def ready(gw: GatewayUnderTest) -> int:
    async with gw.http.get(gw.admin_url + "/readyz") as response:
        return response.status


async def until_ok(gw: GatewayUnderTest, token: str, timeout: float) -> float:
    """Seconds until a request is accepted again (fails past `timeout`); only 200 or 503
    store_unavailable on the way: a store fault is never a 500."""
    started = time.monotonic()
    while True:
        response = await gw.get("/api/x", token)
        if response.status == 200:
            return time.monotonic() - started
        assert response.status == 503, response.status
        assert (await response.json())["reason"] == "store_unavailable"
        assert time.monotonic() - started < timeout, "the gateway did not recover"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("topology", ["stable_sentinel", "redis_cluster"])
async def test_two_gateways_share_activity_and_revocations(
    gateways: GatewayFactory,
    request: pytest.FixtureRequest,
    admin_file: Path,
    clock: object,
    topology: str,
) -> None:
    store: SentinelSet | ClusterSet = request.getfixturevalue(topology)
    admin = {"token_file": str(admin_file)}
    policy = {"max_token_lifetime": "1h"}
    one = await gateways(store_url=store.url, admin=admin, policy=policy)
    two = await gateways(store_url=store.url, admin=admin, policy=policy)
    assert await ready(one) == 200
    token = one.token(ttl=3600, jti="j-shared")
    one.clock.advance(800)  # type: ignore[attr-defined]
    assert (await one.get("/api/x", token)).status == 200
    one.clock.advance(800)  # type: ignore[attr-defined]  # idle at `two` had it not seen it
    assert (await two.get("/api/x", token)).status == 200
    assert await revoke(one, jti="j-shared") == 204
    await asyncio.sleep(0.3)
    assert [(await gw.get("/api/x", token)).status for gw in (one, two)] == [401, 401]


def black_hole(sentinel_set: SentinelSet) -> None:
    """The URL's first sentinel stops answering (SIGSTOP: the kernel still accepts)."""
    process = sentinel_set.sentinels[0].process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)


def kill_first(sentinel_set: SentinelSet) -> None:
    sentinel_set.sentinels[0].stop()


@pytest.mark.parametrize("fault", [kill_first, black_hole], ids=["dead", "black-holed"])
async def test_an_instance_started_with_the_first_sentinel_down_serves_at_once(
    gateways: GatewayFactory, redis_sentinel: SentinelSet, fault: object
) -> None:
    fault(redis_sentinel)  # type: ignore[operator]
    try:
        gw = await gateways(store_url=redis_sentinel.url)
        token = gw.token()
        started = time.monotonic()
        statuses = [(await gw.get("/api/x", token)).status for _ in range(20)]
        assert statuses == [200] * 20
        assert time.monotonic() - started < 2.0
        assert await ready(gw) == 200
    finally:
        process = redis_sentinel.sentinels[0].process
        if process is not None:
            os.kill(process.pid, signal.SIGCONT)


@pytest.mark.parametrize("first_sentinel", ["alive", "dead"])
async def test_a_sentinel_failover_is_survived_without_restart(
    gateways: GatewayFactory, redis_sentinel: SentinelSet, first_sentinel: str
) -> None:
    if first_sentinel == "dead":
        kill_first(redis_sentinel)
    gw = await gateways(store_url=redis_sentinel.url, store={"timeout": "250ms"})
    token = gw.token()
    assert (await gw.get("/api/x", token)).status == 200
    old = redis_sentinel.master_port()
    redis_sentinel.kill_master()
    redis_sentinel.wait_failover(old)
    recovered = await until_ok(gw, token, timeout=10)
    assert recovered < 5
    # The activity written before the failover reached the replica now serving.
    assert (await gw.get("/api/x", token)).status == 200


async def test_a_cluster_master_failover_is_survived_without_restart(
    gateways: GatewayFactory, own_cluster: ClusterSet
) -> None:
    gw = await gateways(store_url=own_cluster.url)
    tokens = [gw.token(jti=f"j-{i}") for i in range(12)]  # spread over the three shards
    for token in tokens:
        assert (await gw.get("/api/x", token)).status == 200
    victim = own_cluster.masters()[0]
    assert victim.process is not None
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(timeout=10)
    victim.process = None
    started = time.monotonic()
    for token in tokens:
        await until_ok(gw, token, timeout=15)
    assert time.monotonic() - started < 10


async def test_an_evicting_cluster_node_is_refused_at_start(
    gateways: GatewayFactory, redis_cluster: ClusterSet
) -> None:
    """Every primary is checked, not only the one the client asks first."""
    from gateway.store.factory import StoreConfigError

    node = redis_cluster.masters()[-1]
    node.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(StoreConfigError, match=f"on 127.0.0.1:{node.port} is allkeys-lru"):
            await gateways(store_url=redis_cluster.url, store={"timeout": "1s"})
    finally:
        node.command("CONFIG", "SET", "maxmemory-policy", "noeviction")


async def test_sentinel_requests_take_the_pipelined_fast_path_one_round_trip_each(
    gateways: GatewayFactory, stable_sentinel: SentinelSet
) -> None:
    gw = await gateways(store_url=stable_sentinel.url)
    store = gw.gateway.store
    assert isinstance(store, RedisStore)
    assert store._pipelined is not None
    token = gw.token()
    assert (await gw.get("/api/x", token)).status == 200  # connects, loads the script
    stable_sentinel.master.command("CONFIG", "RESETSTAT")
    for _ in range(20):
        assert (await gw.get("/api/x", token)).status == 200
    stats = stable_sentinel.master.command("INFO", "commandstats").decode()
    # One script run each (its one GET); EVALSHA also counts the revocation poll's.
    assert "cmdstat_get:calls=20," in stats
    assert store._pipelined.address == ("127.0.0.1", stable_sentinel.master.port)


async def test_a_graceful_sentinel_failover_is_followed(
    gateways: GatewayFactory, redis_sentinel: SentinelSet
) -> None:
    """SENTINEL FAILOVER: the old master stays up as a replica, so the open connection is not
    lost but answers READONLY; the gateway asks the sentinels again and goes on."""
    gw = await gateways(store_url=redis_sentinel.url)
    token = gw.token()
    assert (await gw.get("/api/x", token)).status == 200
    old = redis_sentinel.master_port()
    reply = redis_sentinel.sentinels[0].command("SENTINEL", "FAILOVER", "mymaster")
    assert reply.startswith(b"+OK"), reply
    redis_sentinel.wait_failover(old)
    # The sentinels demote a live old master only some 8 s later (until then it still takes
    # writes: Sentinel's own window); do now what they will do then.
    new = redis_sentinel.master_port()
    demoted = redis_sentinel.node(old).command("REPLICAOF", "127.0.0.1", str(new))
    assert demoted.startswith(b"+OK"), demoted
    recovered = await until_ok(gw, token, timeout=10)
    assert recovered < 5
    # The open connection to the demoted node answered READONLY: it moved to the new master.
    store = gw.gateway.store
    assert isinstance(store, RedisStore)
    assert store._pipelined is not None
    assert (await gw.get("/api/x", token)).status == 200
    assert store._pipelined.address == ("127.0.0.1", new)


async def test_an_unreachable_cluster_is_store_unavailable_never_a_500(
    gateways: GatewayFactory,
) -> None:
    """redis-py's cluster client raises its own RedisClusterException (no RedisError) when
    no node answers, or a slot is not covered: it must still be a store fault."""
    from conftest import free_port

    gw = await gateways(store_url=f"redis+cluster://127.0.0.1:{free_port()}")
    response = await gw.get("/api/x", gw.token())
    assert response.status == 503
    assert (await response.json())["reason"] == "store_unavailable"
    assert await ready(gw) == 503
