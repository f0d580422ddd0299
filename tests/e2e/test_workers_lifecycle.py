"""`serve --workers N` as an operator meets it: workers never outlive their supervisor, a
second instance cannot join ports one holds, a start-up refusal is one line with
single-process serve's exit code, and metrics files of the dead do not pile up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RedisServer, free_port
from harness import Upstream

from .conftest import Spawn
from .processes import GatewayProcess, e2e_config
from .test_workers import wait_for_workers, worker_pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped by whoever inherited it) has stopped serving.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return False


@contextlib.contextmanager
def killed_at_exit(pids: set[int]) -> Iterator[None]:
    """Orphans, if the gateway failed to take them along, do not outlive the test."""
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_workers_stop_when_their_supervisor_is_killed(
    spawn: Spawn, upstream: Upstream, key_file: Path, redis_server: RedisServer
):
    """An OOM kill of the parent: its workers must not serve on, re-parented and unseen."""
    gw = spawn(
        e2e_config(upstream.url, key_file, store={"url": redis_server.url}), "--workers", "2"
    )
    await wait_for_workers(gw, 2)
    workers = worker_pids(gw)
    assert len(workers) == 2
    with killed_at_exit(workers):
        gw.send(signal.SIGKILL)
        deadline = time.monotonic() + 3
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, f"workers outlived their parent: {workers}"
            await asyncio.sleep(0.05)
        with pytest.raises(ConnectionRefusedError):  # nobody listens any more
            socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()


def refusal(gw: GatewayProcess) -> list[str]:
    """The problem lines on stderr (each worker's own INFO log lines left out)."""
    text = gw.stderr()
    assert "Traceback" not in text and " ERROR " not in text, text
    return [line for line in text.splitlines() if not line[:4].isdigit()]


async def test_a_second_instance_on_the_ports_one_holds_is_refused_in_one_line(
    spawn: Spawn, upstream: Upstream, key_file: Path, redis_server: RedisServer
):
    """Without the check both would share the port (SO_REUSEPORT): half the traffic served by
    a config one of them no longer has."""
    data = e2e_config(upstream.url, key_file, store={"url": redis_server.url})
    first = spawn(data, "--workers", "2", name="first")
    await wait_for_workers(first, 2)
    second = spawn(data, "--workers", "2", name="second")
    assert await second.wait_exit(10) == 1, second.describe()
    port = data["listen"]["port"]
    assert refusal(second) == [
        f"idlegate: cannot listen (listen 127.0.0.1:{port}): address already in use"
    ]
    # The admin port alone held, too.
    data2 = {**data, "listen": {"host": "127.0.0.1", "port": free_port()}}
    third = spawn(data2, "--workers", "2", name="third")
    assert await third.wait_exit(10) == 1, third.describe()
    admin = data["admin"]["port"]
    assert refusal(third) == [
        f"idlegate: cannot listen (admin 127.0.0.1:{admin}): address already in use"
    ]
    assert len(worker_pids(first)) == 2  # the first one serves on
    assert await first.stop(signal.SIGTERM) == 0, first.describe()


async def test_a_port_in_use_with_workers_is_one_line_and_single_process_exit_code(
    spawn: Spawn, upstream: Upstream, key_file: Path, redis_server: RedisServer
):
    data = e2e_config(upstream.url, key_file, store={"url": redis_server.url})
    port = data["listen"]["port"]
    with socket.socket() as holder:  # something else, not idlegate, listens there
        holder.bind(("127.0.0.1", port))
        holder.listen()
        single = spawn(data, name="single")
        multi = spawn(data, "--workers", "2", name="multi")
        single_code = await single.wait_exit(10)
        assert await multi.wait_exit(10) == single_code == 1, multi.describe()
    assert refusal(multi) == refusal(single)
    assert len(refusal(multi)) == 1 and "cannot listen (listen 127.0.0.1:" in refusal(multi)[0]


async def test_a_start_up_refusal_with_workers_is_one_line_and_exit_code_2(
    spawn: Spawn, upstream: Upstream, key_file: Path, tmp_path: Path
):
    """An evicting Redis would drop activity records and revocations: refused at start, by
    every worker, reported once."""
    redis = RedisServer(
        port=free_port(), workdir=tmp_path, extra_args=("--maxmemory-policy", "allkeys-lru")
    )
    redis.start()
    try:
        data = e2e_config(upstream.url, key_file, store={"url": redis.url})
        single = spawn(data, name="single")
        multi = spawn(data, "--workers", "3", name="multi")
        single_code = await single.wait_exit(10)
        assert await multi.wait_exit(15) == single_code == 2, multi.describe()
    finally:
        redis.stop()
    lines = refusal(multi)
    assert lines == refusal(single), multi.describe()
    assert len(lines) == 1 and "maxmemory-policy" in lines[0]


async def test_a_dead_workers_gauges_stop_counting_and_stale_metrics_dirs_go(
    spawn: Spawn, upstream: Upstream, key_file: Path, redis_server: RedisServer, tmp_path: Path
):
    """A gauge file of a dead worker (idlegate_revocations, idlegate_jwks_keys) would keep its
    last value in every scrape; a killed serve's metrics directory would stay in /tmp."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    dead = _a_dead_pid()
    stale = scratch / f"idlegate-metrics-{dead}-abc"
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"x")
    live = scratch / f"idlegate-metrics-{os.getpid()}-abc"  # its owner still runs
    live.mkdir()
    gw = spawn(
        e2e_config(upstream.url, key_file, store={"url": redis_server.url}),
        "--workers",
        "2",
        env={"TMPDIR": str(scratch)},
    )
    await wait_for_workers(gw, 2)
    assert not stale.exists() and live.exists()
    (metrics_dir,) = scratch.glob(f"idlegate-metrics-{gw.pid}-*")
    victim = min(worker_pids(gw))
    assert list(metrics_dir.glob(f"gauge_*_{victim}.db"))  # it has gauges
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while gw.stderr().count(" listening on ") < 3:  # its replacement started
        assert time.monotonic() < deadline, gw.describe()
        await asyncio.sleep(0.05)
    assert list(metrics_dir.glob(f"gauge_*_{victim}.db")) == []
    assert await gw.stop(signal.SIGTERM) == 0, gw.describe()


def _a_dead_pid() -> int:
    pid = 4_000_000
    while _alive(pid):
        pid -= 1
    return pid
