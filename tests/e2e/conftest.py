"""Fixtures for the CLI as a subprocess. Every gateway process started here is killed when its
test ends, whatever happened."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .processes import GatewayProcess

Spawn = Callable[..., GatewayProcess]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """`spawn(data, *args, name=..., env=...)` -> a GatewayProcess, started; killed at teardown."""
    started: list[GatewayProcess] = []

    def make(
        data: dict[str, Any],
        *args: str,
        name: str = "gateway",
        env: dict[str, str] | None = None,
    ) -> GatewayProcess:
        gateway = GatewayProcess(workdir=tmp_path / name, data=data, args=list(args), env=env or {})
        started.append(gateway)
        gateway.start()
        return gateway

    yield make
    for gateway in started:
        gateway.kill()
