"""`serve --workers N`: N processes on one port (SO_REUSEPORT) sharing Redis, whose metrics any
worker reports summed; with the memory store more than one worker is refused."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import aiohttp
import yaml
from conftest import RedisServer
from harness import Upstream
from jwks_server import SigningKey
from prometheus_client.mmap_dict import MmapedDict

from .conftest import Spawn
from .processes import GatewayProcess, bearer, e2e_config, mint, run_cli

REQUESTS = 40
SCRAPES = 6
ALLOWED = re.compile(
    r'^idlegate_requests_total\{(?=[^}]*decision="allowed")(?=[^}]*route="/api/")[^}]*\}'
    r" ([0-9.e+]+)$",
    re.MULTILINE,
)


async def wait_for_workers(gw: GatewayProcess, workers: int) -> None:
    """Ready, and every worker said it listens (the ports are shared: any one answers /readyz)."""
    await gw.wait_ready()
    deadline = time.monotonic() + 10
    while not all(f"worker {i} listening on" in gw.stderr() for i in range(workers)):
        assert time.monotonic() < deadline, gw.describe()
        await asyncio.sleep(0.05)


def allowed_per_process(metrics_dir: Path) -> dict[str, float]:
    """Allowed /api/ requests each process wrote to its own multiprocess file."""
    counted: dict[str, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            name, labels = json.loads(key)[1:3]
            if name == "idlegate_requests_total" and labels.get("decision") == "allowed":
                counted[path.stem] = counted.get(path.stem, 0.0) + value
    return counted


def allowed_count(metrics_text: str) -> float:
    return sum(float(value) for value in ALLOWED.findall(metrics_text))


async def test_two_workers_share_the_port_and_sum_their_metrics(
    spawn: Spawn,
    upstream: Upstream,
    key_file: Path,
    signing_key: SigningKey,
    redis_server: RedisServer,
    tmp_path: Path,
):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    gw = spawn(
        e2e_config(upstream.url, key_file, store={"url": redis_server.url}),
        "--workers",
        "2",
        env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
    )
    await wait_for_workers(gw, 2)

    token = mint(signing_key)
    # A fresh connection per request: the kernel spreads new connections over the workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for _ in range(REQUESTS):
            async with http.get(gw.url + "/api/orders", headers=bearer(token)) as response:
                assert response.status == 200
        assert len(upstream.received) == REQUESTS

        # Whichever worker answers a scrape, it reports every worker's requests.
        counts = []
        for _ in range(SCRAPES):
            async with http.get(gw.admin_url + "/metrics") as response:
                assert response.status == 200
                counts.append(allowed_count(await response.text()))
    assert counts == [REQUESTS] * SCRAPES
    # ... and the requests really were spread: each worker counted some of them itself.
    per_worker = allowed_per_process(metrics_dir)
    assert len(per_worker) == 2 and all(n > 0 for n in per_worker.values()), per_worker

    assert await gw.stop(signal.SIGTERM) == 0, gw.describe()
    assert "Traceback" not in gw.stderr()


async def test_workers_leave_no_metrics_directory_behind(
    spawn: Spawn, upstream: Upstream, key_file: Path, redis_server: RedisServer, tmp_path: Path
):
    """Without PROMETHEUS_MULTIPROC_DIR the CLI makes a temporary one; it goes at exit (else
    every restart leaves a directory of mmap files, and stale ones would skew a reused dir)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    gw = spawn(
        e2e_config(upstream.url, key_file, store={"url": redis_server.url}),
        "--workers",
        "2",
        env={"TMPDIR": str(scratch)},
    )
    await wait_for_workers(gw, 2)
    assert [p.name.startswith("idlegate-metrics-") for p in scratch.iterdir()] == [True]
    assert await gw.stop(signal.SIGTERM) == 0, gw.describe()
    assert list(scratch.iterdir()) == []


def worker_pids(gw: GatewayProcess) -> set[int]:
    """The supervisor's worker processes (spawned: `multiprocessing.spawn` in their command)."""
    children = Path(f"/proc/{gw.pid}/task/{gw.pid}/children").read_text().split()
    return {
        int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    }


async def test_a_worker_killed_unasked_is_logged_and_replaced(
    spawn: Spawn,
    upstream: Upstream,
    key_file: Path,
    signing_key: SigningKey,
    redis_server: RedisServer,
):
    """The OOM killer's SIGKILL: logged, and the pod serves on with all its workers."""
    gw = spawn(
        e2e_config(upstream.url, key_file, store={"url": redis_server.url}), "--workers", "2"
    )
    await wait_for_workers(gw, 2)
    before = worker_pids(gw)
    assert len(before) == 2
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while gw.stderr().count(" listening on ") < 3:  # its replacement started
        assert time.monotonic() < deadline, gw.describe()
        await asyncio.sleep(0.1)
    assert "was killed by SIGKILL unasked; starting another in its place" in gw.stderr()
    after = worker_pids(gw)
    assert len(after) == 2 and victim not in after
    token = mint(signing_key)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for _ in range(10):
            async with http.get(gw.url + "/api/orders", headers=bearer(token)) as response:
                assert response.status == 200
    assert await gw.stop(signal.SIGTERM) == 0, gw.describe()
    assert "Traceback" not in gw.stderr()


def test_several_workers_with_the_memory_store_are_refused(tmp_path: Path, key_file: Path):
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(e2e_config("http://127.0.0.1:9", key_file)))
    result = run_cli("serve", "-c", str(config), "--workers", "2")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--workers" in lines[0] and "memory" in lines[0] and "redis://" in lines[0]
