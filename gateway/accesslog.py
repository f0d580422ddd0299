"""One JSON line per request on stdout. Never a token: only its `jti` and `sub`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Mapping
from typing import TextIO


class AccessLog:
    """Buffered; flushed once per event-loop turn (cheap under load, prompt when idle)."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self._stream = stream or sys.stdout
        self.enabled = enabled
        self._flush_scheduled = False

    def write(
        self,
        *,
        request_id: str,
        method: str,
        route: str,
        status: int,
        decision: str,
        reason: str,
        jti: str | None,
        sub: str | None,
        upstream_ms: float | None,
        total_ms: float,
        mode: str = "proxy",
        extra: Mapping[str, object] | None = None,
    ) -> None:
        """`extra`: more fields for this line (a WebSocket's close: duration, messages, reason)."""
        if not self.enabled:
            return
        record: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "request_id": request_id,
            "method": method,
            "route": route,
            "status": status,
            "decision": decision,
            "reason": reason,
            "jti": jti,
            "sub": sub,
            "upstream_ms": None if upstream_ms is None else round(upstream_ms, 3),
            "total_ms": round(total_ms, 3),
            "mode": mode,  # the front door: proxy | forward_auth
        }
        if extra:
            record.update(extra)
        line = json.dumps(record, separators=(",", ":"))
        self._stream.write(line + "\n")
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self._flush)
            except RuntimeError:
                self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        with contextlib.suppress(OSError, ValueError):  # stdout closed: nothing to do about it
            self._stream.flush()
