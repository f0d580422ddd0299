"""Sentinel discovery that no one sentinel can mislead, real: a master, a replica and three
sentinels (tests/redis_topologies.py), plus sentinels of the test's own (`FakeSentinel`) that
name a wrong master, as a stale one does. Every address a sentinel names is checked with
ROLE on connect; while no sentinel answers, the master last verified is used (and /readyz
says degraded); a discovery that finds nothing is one short line naming the sentinels."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import pytest
from conftest import GatewayFactory, free_port
from harness import GatewayUnderTest
from redis_topologies import SERVICE, FakeSentinel, SentinelSet, kill_clients

from gateway.preflight import problems
from gateway.store.redis import RedisStore


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[[str, int], FakeSentinel]]:
    started: list[FakeSentinel] = []

    def make(host: str, port: int) -> FakeSentinel:
        sentinel = FakeSentinel(host, port)
        started.append(sentinel)
        return sentinel

    yield make
    for sentinel in started:
        await sentinel.stop()


async def readyz(gw: GatewayUnderTest) -> tuple[int, dict[str, str]]:
    async with gw.http.get(gw.admin_url + "/readyz") as response:
        return response.status, await response.json()


async def readyz_settles(
    gw: GatewayUnderTest, settled: Callable[[int, dict[str, str]], bool], within: float = 2.0
) -> tuple[int, dict[str, str]]:
    """/readyz once `settled` holds, or its last answer after `within` seconds. Killing every
    client of the master also cuts the revocation poll's connection: until its next read (one
    revocation_poll later) readiness says so, as degraded, whatever the sentinels did."""
    deadline = time.monotonic() + within
    while True:
        status, body = await readyz(gw)
        if settled(status, body) or time.monotonic() > deadline:
            return status, body
        await asyncio.sleep(0.05)


def ready(status: int, body: dict[str, str]) -> bool:
    return (status, body["status"]) == (200, "ready")


def sentinel_url(ports: list[int], service: str = SERVICE) -> str:
    return f"redis+sentinel://{','.join(f'127.0.0.1:{p}' for p in ports)}/{service}/0"


@pytest.mark.parametrize("wrong", ["dead", "replica"])
@pytest.mark.parametrize("stale", [1, 2], ids=["one-stale-of-four", "two-stale-of-three"])
async def test_sentinels_naming_a_wrong_master_cost_no_request_across_reconnects(
    gateways: GatewayFactory,
    stable_sentinel: SentinelSet,
    fakes: Callable[[str, int], FakeSentinel],
    wrong: str,
    stale: int,
) -> None:
    """Stale sentinels first in the URL (answering first, in process), naming a dead node or
    the replica: one of four (the others outvote it) or two of three (a majority: the ROLE
    check discards their answer and the one real sentinel's is used)."""
    port = free_port() if wrong == "dead" else stable_sentinel.replica.port
    liars = [fakes("127.0.0.1", port) for _ in range(stale)]
    for liar in liars:
        await liar.start()
    real = [s.port for s in stable_sentinel.sentinels][: 3 if stale == 1 else 1]
    gw = await gateways(store_url=sentinel_url([liar.port for liar in liars] + real))
    tokens = [gw.token(jti=f"w-{i}") for i in range(3)]
    statuses = []
    for i in range(20):
        assert kill_clients(stable_sentinel.master) > 0
        await asyncio.sleep(0.02)
        statuses.append((await gw.get("/api/x", tokens[i % 3])).status)
    assert statuses == [200] * 20
    status, body = await readyz_settles(gw, ready)
    assert (status, body["status"]) == (200, "ready"), body
    store = gw.gateway.store
    assert isinstance(store, RedisStore) and store._pipelined is not None
    assert store._pipelined.address == ("127.0.0.1", stable_sentinel.master.port)
    # Nothing reached the replica (a write there would have been refused READONLY anyway).
    assert stable_sentinel.replica.command("DBSIZE") == stable_sentinel.master.command("DBSIZE")


async def test_with_every_sentinel_gone_the_last_verified_master_serves_and_readyz_is_degraded(
    gateways: GatewayFactory,
    stable_sentinel: SentinelSet,
    fakes: Callable[[str, int], FakeSentinel],
) -> None:
    """The gateway's sentinels (its own, naming the real master) all go; its connections to
    the master are killed: the master it last verified is used again (checked with ROLE),
    and /readyz says why (200 degraded, naming the sentinels); they come back: ready."""
    master = stable_sentinel.master
    sentinels = [fakes("127.0.0.1", master.port) for _ in range(3)]
    for sentinel in sentinels:
        await sentinel.start()
    gw = await gateways(store_url=sentinel_url([s.port for s in sentinels]))
    token = gw.token()
    assert (await gw.get("/api/x", token)).status == 200
    for sentinel in sentinels:
        await sentinel.stop()
    for _ in range(5):
        assert kill_clients(master) > 0
        await asyncio.sleep(0.02)
        assert (await gw.get("/api/x", token)).status == 200
    status, body = await readyz_settles(
        gw, lambda status, body: f"127.0.0.1:{sentinels[0].port}" in body.get("reason", "")
    )
    assert (status, body["status"]) == (200, "degraded"), body
    assert f"127.0.0.1:{sentinels[0].port}" in body["reason"]
    assert f"127.0.0.1:{master.port}" in body["reason"]  # the master used meanwhile
    for sentinel in sentinels:
        await sentinel.start()  # on the same ports
    status, body = await readyz_settles(gw, ready)
    assert (status, body["status"]) == (200, "ready"), body


async def test_a_wrong_service_name_is_one_short_line_naming_the_sentinels(
    gateways: GatewayFactory,
    stable_sentinel: SentinelSet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ports = [s.port for s in stable_sentinel.sentinels]
    url = sentinel_url(ports, service="nosuch")
    asked = ", ".join(f"127.0.0.1:{port}" for port in ports)
    expected = f"no sentinel knows a master named 'nosuch' (asked {asked})"
    caplog.set_level(logging.ERROR, logger="idlegate.store")
    gw = await gateways(store_url=url)
    status, body = await readyz(gw)
    assert status == 503
    assert expected in body["reason"] and len(body["reason"]) < 300, body
    logged = [r.getMessage() for r in caplog.records if r.name == "idlegate.store"]
    assert logged and all(expected in line and len(line) < 400 for line in logged), logged
    found = await problems(gw.gateway.config, connect=True)
    assert len(found) == 1 and expected in found[0] and "<redis" not in found[0], found
