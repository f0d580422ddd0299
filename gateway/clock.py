"""Time, injected: the idle logic never calls `time.time()` itself, so tests control it."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (wall clock: compared with `iat`/`exp` and across instances)."""
        ...


class SystemClock:
    # time.time itself: read on every request, without a Python frame around it.
    now = staticmethod(time.time)


class ManualClock:
    """A clock that moves only when told; for tests and simulations."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def set(self, value: float) -> None:
        self._now = value
