"""`idlegate serve` against an evicting Redis: one `idlegate: ...` line, exit 2, no traceback,
before anything listens."""

from __future__ import annotations

from pathlib import Path

from conftest import RedisServer
from harness import Upstream

from .conftest import Spawn
from .processes import e2e_config


async def test_serve_refuses_an_evicting_redis_in_one_line(
    spawn: Spawn, upstream: Upstream, key_file: Path, redis_server: RedisServer
):
    redis_server.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    gw = spawn(e2e_config(upstream.url, key_file, store={"url": redis_server.url}))
    assert await gw.wait_exit(timeout=15) == 2
    lines = gw.stderr().strip().splitlines()
    verdict = [line for line in lines if line.startswith("idlegate: ")]
    assert verdict == [lines[-1]], gw.describe()
    assert verdict[0].startswith("idlegate: store.url: the Redis maxmemory-policy is allkeys-lru")
    assert "noeviction" in verdict[0]
    assert not [line for line in lines if "ERROR" in line], gw.describe()
    assert "Traceback" not in gw.describe()


async def test_serve_with_workers_refuses_an_evicting_redis_in_one_line(
    spawn: Spawn, upstream: Upstream, key_file: Path, redis_server: RedisServer
):
    """Each worker checks the store as it starts: its refusal is the same one line, not a
    worker's traceback, and the parent exits non-zero."""
    redis_server.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    gw = spawn(
        e2e_config(upstream.url, key_file, store={"url": redis_server.url}), "--workers", "2"
    )
    assert await gw.wait_exit(timeout=20) != 0
    verdicts = [line for line in gw.stderr().splitlines() if line.startswith("idlegate: ")]
    assert verdicts, gw.describe()
    assert all("maxmemory-policy is allkeys-lru" in line for line in verdicts), gw.describe()
    assert "Traceback" not in gw.describe()
