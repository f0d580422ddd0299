"""Revocations only widen and end by their own `until`: an instance never forgets one because
the store lost it (a Redis restart without persistence, a failover to a replica that missed the
write, a restored backup); it writes back what the store is missing and says so, once. The
admin API answers 204 only once a replica has the revocation, where there are replicas."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import GatewayFactory, RedisServer, free_port
from harness import GatewayUnderTest
from prometheus_client import REGISTRY

from gateway.clock import ManualClock
from gateway.revocation import RevocationList
from gateway.store.base import Revocation
from gateway.store.memory import MemoryStore

ADMIN = {"Authorization": "Bearer adm1n"}
REV_KEY = "idlegate:{rev}"


@pytest.fixture
def admin_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin.token"
    path.write_text("adm1n\n")
    return path


@pytest.fixture
def replica(redis_server: RedisServer, tmp_path: Path) -> Iterator[RedisServer]:
    """A replica of `redis_server`, linked and in sync before the test starts."""
    workdir = tmp_path / "replica"
    workdir.mkdir()
    redis_server.command("CONFIG", "SET", "repl-diskless-sync-delay", "0")  # sync at once
    server = RedisServer(
        port=free_port(),
        workdir=workdir,
        extra_args=("--replicaof", "127.0.0.1", str(redis_server.port)),
    )
    server.start()
    deadline = time.monotonic() + 10
    while b"master_link_status:up" not in server.command("INFO", "replication"):
        assert time.monotonic() < deadline, "the replica did not sync"
        time.sleep(0.02)
    yield server
    if server.process is not None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


async def revoke(gw: GatewayUnderTest, **body: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(gw.admin_url + "/admin/revoke", json=body, headers=ADMIN) as response,
    ):
        return response.status


async def two_gateways(
    gateways: GatewayFactory, redis_server: RedisServer, admin_file: Path
) -> tuple[GatewayUnderTest, GatewayUnderTest]:
    one = await gateways(store_url=redis_server.url, admin={"token_file": str(admin_file)})
    two = await gateways(store_url=redis_server.url, admin={"token_file": str(admin_file)})
    return one, two


def lost_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and "lost" in r.getMessage()
    ]


@pytest.mark.parametrize("loss", ["flushall", "restart"])
async def test_a_store_that_lost_its_revocations_is_written_back(
    gateways: GatewayFactory,
    redis_server: RedisServer,
    admin_file: Path,
    caplog: pytest.LogCaptureFixture,
    loss: str,
) -> None:
    one, two = await two_gateways(gateways, redis_server, admin_file)
    token = one.token(jti="j-lost", sub="dora")
    assert (await one.get("/api/x", token)).status == 200
    assert await revoke(one, jti="j-lost") == 204
    await asyncio.sleep(0.3)  # both instances poll every 100 ms
    assert [(await gw.get("/api/x", token)).status for gw in (one, two)] == [401, 401]

    if loss == "flushall":
        redis_server.command("FLUSHALL")
    else:
        redis_server.stop()
        redis_server.start()  # no persistence: empty
    await asyncio.sleep(0.5)
    assert [(await gw.get("/api/x", token)).status for gw in (one, two)] == [401, 401]
    # Written back: an instance started now (which held nothing) refuses the token too.
    fields = redis_server.command("HKEYS", REV_KEY)
    assert fields.count(b"jti:") == 1, fields
    three = await gateways(store_url=redis_server.url)
    assert (await three.get("/api/x", token)).status == 401
    # Loudly, once per instance (each noticed the loss): not on every poll.
    await asyncio.sleep(0.3)
    assert 1 <= len(lost_lines(caplog)) <= 2, lost_lines(caplog)


async def test_a_restored_older_list_cannot_narrow_a_revocation(
    gateways: GatewayFactory, redis_server: RedisServer, admin_file: Path
) -> None:
    """A backup restored from before a revocation, or a replica that missed it: the store's list
    is older, with another version. The instances keep what they hold."""
    one, two = await two_gateways(gateways, redis_server, admin_file)
    early = one.token(jti="j-early")
    late = one.token(jti="j-late")
    assert await revoke(one, jti="j-early") == 204
    snapshot = redis_server.command("DUMP", REV_KEY)
    assert await revoke(one, jti="j-late") == 204
    await asyncio.sleep(0.3)
    restore = _restore(redis_server, snapshot)
    assert restore.startswith(b"+OK"), restore
    await asyncio.sleep(0.5)
    for gw in (one, two):
        assert (await gw.get("/api/x", early)).status == 401
        assert (await gw.get("/api/x", late)).status == 401
    assert redis_server.command("HKEYS", REV_KEY).count(b"jti:") == 2


def _restore(server: RedisServer, dump: bytes) -> bytes:
    """RESTORE <key> 0 <serialized> REPLACE, with the DUMP reply's bulk payload as it came."""
    assert dump.startswith(b"$")
    header, _, rest = dump.partition(b"\r\n")
    payload = rest[: int(header[1:])]
    import socket

    parts = [b"RESTORE", REV_KEY.encode(), b"0", payload, b"REPLACE"]
    command = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
        sock.sendall(command)
        return sock.recv(1024)


async def test_the_merge_is_the_same_over_the_memory_store() -> None:
    """The list held in memory is merged the same way whatever the store: what the store no
    longer lists (here: dropped behind its back) stays in force and is written back."""
    clock = ManualClock(start=1_800_000_000.0)
    store = MemoryStore()
    revocations = RevocationList(store, clock, poll_interval=60)
    now = clock.now()
    entry = Revocation(kind="jti", key="k", issued_before=None, until=now + 900)
    await revocations.revoke(entry)
    store._revocations.clear()  # the store lost it
    store._version += 1
    await revocations.refresh()
    assert revocations.is_key_revoked("jti", "k")
    _, listed = await store.revocations(-1)
    assert listed == [entry]
    # A revocation still ends at its own `until`.
    clock.advance(901)
    await revocations.refresh()
    assert not revocations.is_key_revoked("jti", "k")


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_revoke_waits_for_a_replica_before_204(
    gateways: GatewayFactory, redis_server: RedisServer, replica: RedisServer, admin_file: Path
) -> None:
    # A whole second for the replica to acknowledge: this machine's cores are shared.
    gw = await gateways(
        store_url=redis_server.url,
        admin={"token_file": str(admin_file)},
        store={"timeout": "1s"},
    )
    redis_server.command("CONFIG", "RESETSTAT")
    assert await revoke(gw, jti="j-replicated") == 204
    assert b"cmdstat_wait:calls=1" in redis_server.command("INFO", "commandstats")
    assert replica.command("HKEYS", REV_KEY).count(b"jti:") == 1


async def test_a_replica_that_does_not_acknowledge_still_gets_204_logged_and_counted(
    gateways: GatewayFactory,
    redis_server: RedisServer,
    replica: RedisServer,
    admin_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The revocation is in force at the master and reaches every instance within the poll;
    a 503 would tell the operator it failed when it did not. The wait is bounded."""
    gw = await gateways(store_url=redis_server.url, admin={"token_file": str(admin_file)})
    before = metric("idlegate_revocations_unreplicated_total")
    assert replica.process is not None
    os.kill(replica.process.pid, signal.SIGSTOP)  # connected, never acknowledging
    started = time.monotonic()
    assert await revoke(gw, jti="j-unacked") == 204
    assert time.monotonic() - started < 2.5  # REPLICA_WAIT (1 s) and the rest
    assert metric("idlegate_revocations_unreplicated_total") == before + 1
    assert any("no replica acknowledged" in r.getMessage() for r in caplog.records)


async def test_no_wait_without_replicas(
    gateways: GatewayFactory, redis_server: RedisServer, admin_file: Path
) -> None:
    gw = await gateways(store_url=redis_server.url, admin={"token_file": str(admin_file)})
    redis_server.command("CONFIG", "RESETSTAT")
    started = time.monotonic()
    assert await revoke(gw, jti="j-alone") == 204
    assert time.monotonic() - started < 0.5
    assert b"cmdstat_wait" not in redis_server.command("INFO", "commandstats")
