"""The gateway as users run it: `python -m gateway ...` in a subprocess, a YAML config in
tmp_path, free ports on 127.0.0.1, readiness polled on the admin port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import free_port
from harness import AUDIENCE, ISSUER, base_config, merge
from jwks_server import SigningKey, claims

READY_TIMEOUT = 10.0


def clean_environ(**extra: str) -> dict[str, str]:
    """The test runner's environment without anything that would reconfigure the gateway."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("IDLEGATE_") and name != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m gateway ARGS` to completion, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env=clean_environ(**env),
        check=False,
    )


def mint(key: SigningKey, *, ttl: float = 600, now: float | None = None, **extra: Any) -> str:
    """A token for the e2e gateways' provider, issued now unless `now`/`iat` say otherwise."""
    payload = claims(ISSUER, AUDIENCE, ttl=ttl, now=time.time() if now is None else now)
    payload.update(extra)
    return key.sign({k: v for k, v in payload.items() if v is not None})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class GatewayProcess:
    """One `idlegate serve` subprocess; stdout and stderr go to files (no pipe can fill up)."""

    workdir: Path
    data: dict[str, Any]
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def port(self) -> int:
        return int(self.data["listen"]["port"])

    @property
    def admin_port(self) -> int:
        return int(self.data["admin"]["port"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "gateway.yaml"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _log(self, stream: str) -> Path:
        return self.workdir / f"{stream}-{self.starts}.log"

    def start(self) -> None:
        """Write the config and start the process (again, after `stop`, with fresh log files)."""
        assert self.process is None or self.process.poll() is not None, "still running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.data, sort_keys=False))
        self.starts += 1
        with self._log("stdout").open("wb") as out, self._log("stderr").open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "-c", str(self.config_path), *self.args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=clean_environ(**self.env),
            )

    def stdout(self) -> str:
        return self._log("stdout").read_text(errors="replace")

    def stderr(self) -> str:
        return self._log("stderr").read_text(errors="replace")

    def describe(self) -> str:
        return f"exit={self.returncode()}\n--- stdout\n{self.stdout()}\n--- stderr\n{self.stderr()}"

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll /readyz until 200; fail with the process's output if it dies or stays unready."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.returncode() is not None:
                    pytest.fail(f"the gateway exited before it was ready:\n{self.describe()}")
                try:
                    async with http.get(
                        self.admin_url + "/readyz", timeout=aiohttp.ClientTimeout(total=1)
                    ) as response:
                        if response.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.05)
        pytest.fail(f"the gateway was not ready within {timeout}s:\n{self.describe()}")

    async def wait_exit(self, timeout: float) -> int:
        """The exit code, without blocking the event loop (the upstream may live in it)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"the gateway did not exit within {timeout}s:\n{self.describe()}")
            await asyncio.sleep(0.02)
        return self.process.returncode

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        self.send(signum)
        return await self.wait_exit(timeout)

    def send(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """Teardown: the process and, with --workers, its worker children."""
        if self.process is None or self.process.poll() is not None:
            return
        descendants = _descendants(self.process.pid)
        self.process.kill()
        self.process.wait(timeout=10)
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    """Children of `pid`, their children, ... (Linux /proc; empty elsewhere)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    children = [int(child) for child in text.split()]
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def e2e_config(upstream_url: str, key_file: Path, **overrides: Any) -> dict[str, Any]:
    """The harness's config with real free ports (a subprocess cannot report port 0 back)."""
    data = base_config(upstream_url, key_file, **overrides)
    ports = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "server": {"shutdown_grace": "5s"},
    }
    return merge(merge(data, ports), overrides)
