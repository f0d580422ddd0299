"""Redis Cluster, real (three masters, three replicas): the request path's pipelined
connections route every call to its slot's master (one round trip each, spread over every
shard), follow ASK and MOVED while a slot migrates, and a lost shard refuses only its own
tokens: the other shards' are decided as usual, the revocation list last read keeps being
served while its own shard is down, and /readyz says degraded (200) instead of taking every
pod out of the Service."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import GatewayFactory
from harness import ISSUER, GatewayUnderTest
from redis.crc import key_slot
from redis_topologies import ClusterSet

from gateway.store.redis import RedisStore

ADMIN = {"Authorization": "Bearer adm1n"}


@pytest.fixture
def admin(tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "admin.token"
    path.write_text("adm1n\n")
    return {"token_file": str(path)}


def store_of(gw: GatewayUnderTest) -> RedisStore:
    store = gw.gateway.store
    assert isinstance(store, RedisStore)
    return store


def slot_of(gw: GatewayUnderTest, jti: str) -> int:
    """The hash slot of the activity record of the token with this jti."""
    store = store_of(gw)
    key = store.activity_key(gw.gateway.hasher.of_token("jti", ISSUER, jti))
    return key_slot(key.encode())


def revocation_slot(gw: GatewayUnderTest) -> int:
    return key_slot(f"{gw.gateway.config.store.key_prefix}:{{rev}}".encode())


def calls(node_stats: bytes, command: str) -> int:
    for line in node_stats.decode().splitlines():
        if line.startswith(f"cmdstat_{command}:calls="):
            return int(line.split("=")[1].split(",")[0])
    return 0


async def readyz(gw: GatewayUnderTest) -> tuple[int, dict[str, str]]:
    async with gw.http.get(gw.admin_url + "/readyz") as response:
        return response.status, await response.json()


async def revoke(gw: GatewayUnderTest, jti: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(gw.admin_url + "/admin/revoke", json={"jti": jti}, headers=ADMIN) as response,
    ):
        return response.status


async def test_requests_go_to_every_shard_one_round_trip_each_on_the_pipelined_path(
    gateways: GatewayFactory, redis_cluster: ClusterSet
) -> None:
    gw = await gateways(store_url=redis_cluster.url)
    tokens = [gw.token(jti=f"spread-{i}") for i in range(30)]
    for token in tokens:  # the slot map read, the script loaded on each master (NOSCRIPT once)
        assert (await gw.get("/api/x", token)).status == 200
    masters = redis_cluster.masters()
    for node in masters:
        node.command("CONFIG", "RESETSTAT")
    for token in tokens:
        assert (await gw.get("/api/x", token)).status == 200
    stats = [node.command("INFO", "commandstats") for node in masters]
    # check_and_touch.lua runs one GET per request: on each shard, for its own tokens only.
    gets = [calls(s, "get") for s in stats]
    assert sum(gets) == len(tokens)
    assert all(count > 0 for count in gets), gets
    # EVALSHA straight away (no EVAL resent, no redirection, no redis-py cluster client
    # initialising with COMMAND or CLUSTER SLOTS on the request path).
    assert sum(calls(s, "eval") for s in stats) == 0
    assert sum(calls(s, "command") + calls(s, "cluster|slots") for s in stats) == 0
    store = store_of(gw)
    assert store._cluster is not None


async def test_ask_and_moved_are_followed_while_a_slot_migrates(
    gateways: GatewayFactory, redis_cluster: ClusterSet
) -> None:
    gw = await gateways(store_url=redis_cluster.url)
    old = gw.token(jti="migrating-old")
    assert (await gw.get("/api/x", old)).status == 200
    slot = slot_of(gw, "migrating-old")
    # The second token in the same slot? Pick jtis until one is (CRC16 spreads them).
    jti = next(f"migrating-{i}" for i in range(100_000) if slot_of(gw, f"migrating-{i}") == slot)
    new = gw.token(jti=jti)
    source = redis_cluster.owner_of(slot)
    target = next(n for n in redis_cluster.masters() if n.port != source.port)
    source_id, target_id = redis_cluster.node_id(source), redis_cluster.node_id(target)
    assert target.command("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id) == b"+OK\r\n"
    assert source.command("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id) == b"+OK\r\n"
    # Migrating: a key still at the source is served there; one it lacks gets ASK, and the
    # gateway asks the target with ASKING first.
    target.command("CONFIG", "RESETSTAT")
    assert (await gw.get("/api/x", old)).status == 200
    assert (await gw.get("/api/x", new)).status == 200
    assert calls(target.command("INFO", "commandstats"), "asking") == 1
    assert calls(target.command("INFO", "commandstats"), "get") == 1
    # Done: the source's keys moved, the slot is the target's; the source answers MOVED.
    key = store_of(gw).activity_key(gw.gateway.hasher.of_token("jti", ISSUER, "migrating-old"))
    migrated = source.command("MIGRATE", "127.0.0.1", str(target.port), key, "0", "5000", "REPLACE")
    assert migrated == b"+OK\r\n", migrated
    for node in redis_cluster.masters():
        node.command("CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
    refreshes = store_of(gw)._cluster.refreshes  # type: ignore[union-attr]
    for token in (old, new, old):
        assert (await gw.get("/api/x", token)).status == 200
    # The first call after the move was redirected; the slot map is read again (in the
    # background, at most every REFRESH_INTERVAL).
    deadline = time.monotonic() + 2
    while store_of(gw)._cluster.refreshes == refreshes:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the slot map was not read again after MOVED"
        await asyncio.sleep(0.02)
    target_gets = calls(target.command("INFO", "commandstats"), "get")
    assert target_gets == 1 + 3


async def test_a_stale_slot_map_is_corrected_by_moved(
    gateways: GatewayFactory, redis_cluster: ClusterSet
) -> None:
    """A connection pointed at the wrong node: its MOVED answer is followed at once."""
    gw = await gateways(store_url=redis_cluster.url)
    token = gw.token(jti="stale-map")
    assert (await gw.get("/api/x", token)).status == 200
    cluster = store_of(gw)._cluster
    assert cluster is not None
    slot = slot_of(gw, "stale-map")
    right = redis_cluster.owner_of(slot)
    wrong = next(n for n in redis_cluster.masters() if n.port != right.port)
    cluster._owners[slot] = ("127.0.0.1", wrong.port)
    assert (await gw.get("/api/x", token)).status == 200
    assert cluster._owners[slot] == ("127.0.0.1", right.port)


async def statuses(gw: GatewayUnderTest, tokens: dict[str, str]) -> dict[str, int]:
    return {jti: (await gw.get("/api/x", token)).status for jti, token in tokens.items()}


@pytest.mark.parametrize("lost", ["another shard", "the revocation list's shard"])
async def test_a_lost_shard_refuses_only_its_own_tokens(
    gateways: GatewayFactory,
    partial_cluster: ClusterSet,
    admin: dict[str, str],
    lost: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await gateways(store_url=partial_cluster.url, admin=admin, forward_auth={"enabled": True})
    rev_owner = partial_cluster.owner_of(revocation_slot(gw))
    if lost == "another shard":
        victim = next(n for n in partial_cluster.masters() if n.port != rev_owner.port)
    else:
        victim = rev_owner
    tokens = {f"shard-{i}": gw.token(jti=f"shard-{i}") for i in range(24)}
    on_victim = {
        jti for jti in tokens if partial_cluster.owner_of(slot_of(gw, jti)).port == victim.port
    }
    assert on_victim and len(on_victim) < len(tokens)
    assert set((await statuses(gw, tokens)).values()) == {200}
    revoked = next(jti for jti in tokens if jti not in on_victim)
    assert await revoke(gw, revoked) == 204
    assert (await gw.get("/api/x", tokens[revoked])).status == 401

    partial_cluster.lose_shard(victim)
    # Every request answered at once, and only the lost shard's tokens refused, 503.
    started = time.monotonic()
    for _ in range(2):
        seen = await statuses(gw, tokens)
        expected = {jti: 503 if jti in on_victim else 200 for jti in tokens}
        expected[revoked] = 401
        assert seen == expected
    assert time.monotonic() - started < 5
    response = await gw.get("/api/x", tokens[next(iter(on_victim))])
    assert (await response.json())["reason"] == "store_unavailable"
    # Every other path through the store: the same answer, never a 500.
    lost_jti = next(iter(on_victim))
    healthy_jti = next(jti for jti in tokens if jti not in on_victim and jti != revoked)
    for jti, status in ((lost_jti, 503), (healthy_jti, 200)):
        session = await gw.get("/.idlegate/session", tokens[jti])
        assert session.status == status, await session.text()
        auth = await gw.get("/.idlegate/auth", tokens[jti], headers={"X-Original-URI": "/api/x"})
        assert auth.status == status, await auth.text()
        async with gw.http.get(
            f"{gw.admin_url}/admin/tokens/{jti}", params={"issuer": ISSUER}, headers=ADMIN
        ) as response:
            assert response.status == status, await response.text()
    # The lost shard is one outage (one line), however the healthy shards' answers interleave.
    # (A healthy node's own slow answer on a loaded machine is its own outage, not this one.)
    outages = [
        r
        for r in caplog.records
        if r.name == "idlegate.store" and f"127.0.0.1:{victim.port}" in r.getMessage()
    ]
    assert [r.levelname for r in outages] == ["ERROR"], [r.getMessage() for r in outages]
    assert "unavailable" in outages[0].getMessage()

    status, body = await readyz(gw)
    assert (status, body["status"]) == (200, "degraded"), body
    assert f"127.0.0.1:{victim.port}" in body["reason"]
    await asyncio.sleep(0.3)  # a few revocation polls (100 ms)
    assert (await gw.get("/api/x", tokens[revoked])).status == 401  # the list is kept
    other = next(jti for jti in tokens if jti not in on_victim and jti != revoked)
    if lost == "the revocation list's shard":
        # The list cannot take new entries: refused, so the list every instance serves stays
        # complete.
        assert await revoke(gw, other) == 503
        assert (await gw.get("/api/x", tokens[other])).status == 200
        status, body = await readyz(gw)
        assert (status, body["status"]) == (200, "degraded")
        assert "revocation list" in body["reason"]
        # An instance that never read the list is not ready.
        late = await gateways(store_url=partial_cluster.url, admin=admin)
        status, body = await readyz(late)
        assert (status, body["status"]) == (503, "not_ready"), body
    else:
        assert await revoke(gw, other) == 204
        assert (await gw.get("/api/x", tokens[other])).status == 401
        late = await gateways(store_url=partial_cluster.url, admin=admin)
        status, body = await readyz(late)
        assert (status, body["status"]) == (200, "degraded"), body
        assert (await late.get("/api/x", tokens[revoked])).status == 401


async def test_a_stalled_master_holds_up_only_its_own_tokens(
    gateways: GatewayFactory, own_cluster: ClusterSet
) -> None:
    """A master that accepts and never answers (SIGSTOP: a black-holed pod IP): its tokens
    wait store.timeout and get 503; the other shards' answer at once meanwhile."""
    gw = await gateways(store_url=own_cluster.url)
    tokens = {f"stall-{i}": gw.token(jti=f"stall-{i}") for i in range(24)}
    assert set((await statuses(gw, tokens)).values()) == {200}
    victim = own_cluster.owner_of(slot_of(gw, "stall-0"))
    stalled = [j for j in tokens if own_cluster.owner_of(slot_of(gw, j)).port == victim.port]
    healthy = [j for j in tokens if j not in stalled]
    assert victim.process is not None
    os.kill(victim.process.pid, signal.SIGSTOP)
    try:

        async def timed(jti: str) -> tuple[int, float]:
            started = time.monotonic()
            status = (await gw.get("/api/x", tokens[jti])).status
            return status, time.monotonic() - started

        results = await asyncio.gather(*map(timed, stalled + healthy))
    finally:
        os.kill(victim.process.pid, signal.SIGCONT)
    by_jti = dict(zip(stalled + healthy, results, strict=True))
    assert {by_jti[j][0] for j in stalled} == {503}
    assert {by_jti[j][0] for j in healthy} == {200}
    # The healthy ones did not wait behind the stalled shard's store.timeout (250 ms).
    assert max(by_jti[j][1] for j in healthy) < min(by_jti[j][1] for j in stalled), by_jti
    assert min(by_jti[j][1] for j in stalled) >= 0.2


async def test_readiness_sees_a_lost_shard_through_store_coalesce(
    gateways: GatewayFactory, partial_cluster: ClusterSet
) -> None:
    """The coalescing wrapper answers ping for itself; readiness asks the store behind it."""
    gw = await gateways(store_url=partial_cluster.url, store={"coalesce": "1s"})
    rev_owner = partial_cluster.owner_of(revocation_slot(gw))
    victim = next(n for n in partial_cluster.masters() if n.port != rev_owner.port)
    assert (await readyz(gw))[0] == 200
    partial_cluster.lose_shard(victim)
    status, body = await readyz(gw)
    assert (status, body["status"]) == (200, "degraded"), body
    assert f"127.0.0.1:{victim.port}" in body["reason"]
