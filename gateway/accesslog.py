"""One JSON line per request on stdout. Never a token: only its `jti` and `sub`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

# json.dumps with arguments builds a new encoder per call; one, made once, does the same.
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_QUOTE = json.encoder.encode_basestring_ascii  # a JSON string literal, escaped (the C one)
# POSIX keeps a pipe write of at most PIPE_BUF bytes whole: with --workers every worker writes
# to the same stdout pipe, and a larger write can be split by another worker's when the pipe is
# full (a log shipper falling behind). Lines are ASCII (every string is JSON-escaped to ASCII),
# so characters are bytes.
PIPE_BUF = 4096
# Parts of lines kept, each set at most this large, emptied when full: methods and statuses
# come from clients and upstreams, ids from tokens.
_KEPT = 4096


def _kept(parts: dict[Any, Any], key: Any, value: Any) -> Any:
    if len(parts) >= _KEPT:
        parts.clear()
    parts[key] = value
    return value


def _outcome_fields(
    method: str, route: str, status: int, decision: str, reason: str, mode: str
) -> tuple[str, str]:
    head = (
        f'"method":{_QUOTE(method)},"route":{_QUOTE(route)},"status":{status:d},'
        f'"decision":{_QUOTE(decision)},"reason":{_QUOTE(reason)}'
    )
    return head, f'"mode":{_QUOTE(mode)}'


def _id_fields(jti: str | None, sub: str | None) -> str:
    return (
        f'"jti":{"null" if jti is None else _QUOTE(jti)},'
        f'"sub":{"null" if sub is None else _QUOTE(sub)}'
    )


class AccessLog:
    """Lines are collected and written once per event-loop turn, in writes of at most PIPE_BUF
    bytes cut at line ends (one line longer than that is written alone, and only it can be
    interleaved with another worker's): stdout is unbuffered where PYTHONUNBUFFERED is set (the
    image sets it), and a write per line would be a syscall per request. Prompt when idle: a
    line is out by the end of its loop turn."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self._stream = stream or sys.stdout
        self.enabled = enabled
        self._pending: list[str] = []
        self._second = -1  # the whole second `_stamp` shows
        self._stamp = ""
        # (method, route, status, decision, reason, mode) -> their fields, as JSON: the
        # fields before `jti`, and `mode`.
        self._outcomes: dict[tuple[str, str, int, str, str, str], tuple[str, str]] = {}
        self._ids: dict[tuple[str | None, str | None], str] = {}  # (jti, sub) -> their fields

    def write(
        self,
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
        """`extra`: more fields for this line (a WebSocket's close: duration, messages, reason).
        The request path passes all of them by position (keywords cost a lookup each)."""
        if not self.enabled:
            return
        second = int(time.time())
        if second != self._second:  # formatted once a second, not once a request
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        if extra:  # more fields (a WebSocket's close): the record, JSON-encoded
            line = _ENCODE(
                {
                    "time": self._stamp,
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
                    **extra,
                }
            )
        else:
            # The common line, formatted directly: the same JSON, in parts made once and kept
            # (what the request ended as; the token's ids), milliseconds with three decimals.
            outcome = (method, route, status, decision, reason, mode)
            ended = self._outcomes.get(outcome)
            if ended is None:
                ended = _kept(self._outcomes, outcome, _outcome_fields(*outcome))
            ids = (jti, sub)
            held = self._ids.get(ids)
            if held is None:
                held = _kept(self._ids, ids, _id_fields(jti, sub))
            line = (
                f'{{"time":"{self._stamp}","request_id":{_QUOTE(request_id)},{ended[0]},'
                f'{held},"upstream_ms":{"null" if upstream_ms is None else f"{upstream_ms:.3f}"},'
                f'"total_ms":{total_ms:.3f},{ended[1]}}}'
            )
        pending = self._pending
        pending.append(line)
        if len(pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        """Write out the lines collected (the loop runs it each turn; `Gateway.close` last)."""
        lines, self._pending = self._pending, []
        if not lines:
            return
        lines.append("")
        text = "\n".join(lines)
        stream = self._stream
        with contextlib.suppress(OSError, ValueError):  # stdout closed: nothing to do about it
            if len(text) <= PIPE_BUF:
                stream.write(text)
                stream.flush()
                return
            # A flush per chunk: each is one write() to the fd, whatever the stream's buffer.
            start, size = 0, len(text)
            while start < size:
                end = start + PIPE_BUF
                if end >= size:
                    end = size
                else:
                    cut = text.rfind("\n", start, end)
                    # No line end within PIPE_BUF: that one line, alone.
                    end = (cut if cut >= 0 else text.index("\n", end)) + 1
                stream.write(text[start:end])
                stream.flush()
                start = end
