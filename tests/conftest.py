"""One fixture per real component: a redis-server of the tests' own, free ports, a clock."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import GatewayUnderTest, Upstream, base_config, start_gateway
from jwks_server import SigningKey, rsa_key
from ws_upstream import WsUpstream

from gateway.clock import Clock, ManualClock


@pytest.fixture(scope="session", autouse=True)
def temp_dir_left_clean(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every temporary file of the run (this process's and those of the processes it starts)
    goes to one directory, which must hold no key file and no demo directory at the end: a
    key left in /tmp by every test run piles up, readable by anyone on the machine."""
    scratch = tmp_path_factory.mktemp("tmpdir")
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = str(scratch)
    yield scratch
    tempfile.tempdir = saved_tempdir
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env
    left = sorted(
        str(path.relative_to(scratch))
        for path in scratch.rglob("*")
        if path.suffix in (".pem", ".key") or path.name.startswith("idlegate-demo-")
    )
    assert left == [], f"tests left key files or demo directories in the temp dir: {left}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A redis-server the tests own: no persistence, its own free port, stoppable."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = ()  # further redis-server options, e.g. rename-command

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (the README's test command installs it)")
        self.process = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--loglevel", "warning",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def command(self, *args: str) -> bytes:
        """A raw RESP command through a fresh socket (no client library involved)."""
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(b"".join(parts))
            return sock.recv(65536)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), workdir=tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=1_800_000_000.0)


@pytest.fixture(scope="session")
def signing_key() -> SigningKey:
    return rsa_key(kid="main-1")


@pytest.fixture(scope="session")
def key_file(signing_key: SigningKey, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "public.pem"
    path.write_bytes(signing_key.public_pem())
    return path


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.stop()


GatewayFactory = Callable[..., Awaitable[GatewayUnderTest]]


@pytest.fixture
async def gateways(
    upstream: Upstream, key_file: Path, signing_key: SigningKey, clock: ManualClock
) -> AsyncIterator[GatewayFactory]:
    """Start gateways in process on real sockets, config overrides as keyword arguments.

    `store_url` picks the store, `gateway_clock` another clock; every one started is drained
    when the test ends.
    """
    started: list[GatewayUnderTest] = []

    async def make(
        store_url: str = "memory://",
        environ: dict[str, str] | None = None,
        gateway_clock: Clock | None = None,
        **overrides: Any,
    ) -> GatewayUnderTest:
        data = base_config(upstream.url, key_file, store_url, **overrides)
        under_test = await start_gateway(data, signing_key, gateway_clock or clock, environ)
        started.append(under_test)
        return under_test

    yield make
    for under_test in started:
        await under_test.close()


# Sentinel and Cluster fixtures (after RedisServer and free_port, which they build on).
from redis_topologies import (  # noqa: E402, F401
    own_cluster,
    partial_cluster,
    redis_cluster,
    redis_sentinel,
    shared_cluster,
    shared_sentinel,
    stable_sentinel,
)


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    """A real aiohttp WebSocket server (tests/ws_upstream.py) for a test's upstream."""
    server = WsUpstream()
    await server.start()
    yield server
    await server.stop()
