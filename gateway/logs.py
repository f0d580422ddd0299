"""Log lines that anyone can cause (an outage under load, a flood of malformed requests),
bounded: each kind at most once per interval, the next line saying how many were folded."""

from __future__ import annotations

import logging
import math
import time


class RateLimitedLog:
    """At most one WARNING per `interval`; the next line says how many were folded away."""

    def __init__(self, logger: logging.Logger, *, interval: float) -> None:
        self._log = logger
        self._interval = interval
        self._last = -math.inf
        self._folded = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._folded += 1
            return
        if self._folded:
            message += " (and %d more like it since the last such line)"
            args = (*args, self._folded)
        self._last, self._folded = now, 0
        self._log.warning(message, *args)
