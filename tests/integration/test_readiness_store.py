"""/readyz against a store that answers PING but serves no call, real: a Redis out of memory
under noeviction (every write refused OOM) and a Cluster node that serves no slot (its slot
map gone: CLUSTERDOWN). Readiness writes (a key that expires) instead of pinging, so both are
503 with the store's reason; and the outage the failing calls log ends only when a write
succeeds again, not when a read does."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GatewayFactory, RedisServer, free_port
from harness import GatewayUnderTest


async def readyz(gw: GatewayUnderTest) -> tuple[int, dict[str, str]]:
    async with gw.http.get(gw.admin_url + "/readyz") as response:
        return response.status, await response.json()


async def test_a_redis_out_of_memory_is_not_ready_and_its_outage_ends_with_a_write(
    gateways: GatewayFactory, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="idlegate.store")
    gw = await gateways(store_url=redis_server.url)
    token = gw.token()
    assert (await gw.get("/api/x", token)).status == 200
    assert (await readyz(gw))[0] == 200
    redis_server.command("CONFIG", "SET", "maxmemory", "1")  # noeviction: writes refused
    token = gw.token(jti="new")  # its first request must write its record
    try:
        assert (await gw.get("/api/x", token)).status == 503
        status, body = await readyz(gw)
        assert (status, body["status"]) == (503, "not_ready"), body
        assert "maxmemory" in body["reason"], body
        await asyncio.sleep(0.3)  # revocation polls (reads) succeed meanwhile
        assert (await gw.get("/api/x", token)).status == 503
        again = [r for r in caplog.records if "available again" in r.getMessage()]
        assert again == [], [r.getMessage() for r in again]
    finally:
        redis_server.command("CONFIG", "SET", "maxmemory", "0")
    assert (await gw.get("/api/x", token)).status == 200
    assert (await readyz(gw))[0] == 200
    again = [r.getMessage() for r in caplog.records if "available again" in r.getMessage()]
    assert len(again) == 1, again


@pytest.fixture
def one_node_cluster(tmp_path: Path) -> Iterator[RedisServer]:
    """A Cluster of one master serving every slot (fast to start, and ours to break)."""
    node = RedisServer(
        port=free_port(),
        workdir=tmp_path,
        extra_args=(
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(free_port()),
        ),
    )  # fmt: skip
    node.start()
    try:
        assert node.command("CLUSTER", "ADDSLOTSRANGE", "0", "16383").startswith(b"+OK")
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in node.command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the cluster did not get ok"
            time.sleep(0.05)
        yield node
    finally:
        node.stop()


async def test_a_cluster_whose_nodes_serve_no_slot_is_not_ready(
    gateways: GatewayFactory, one_node_cluster: RedisServer
) -> None:
    """The node still answers PING (and CLUSTER SLOTS: none), every call CLUSTERDOWN."""
    gw = await gateways(store_url=f"redis+cluster://127.0.0.1:{one_node_cluster.port}")
    token = gw.token()
    assert (await gw.get("/api/x", token)).status == 200
    assert (await readyz(gw))[0] == 200
    assert one_node_cluster.command("CLUSTER", "DELSLOTSRANGE", "0", "16383").startswith(b"+OK")
    assert (await gw.get("/api/x", token)).status == 503
    status, body = await readyz(gw)
    assert (status, body["status"]) == (503, "not_ready"), body
    assert "CLUSTERDOWN" in body["reason"] or "no slot" in body["reason"], body
