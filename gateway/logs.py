"""Log lines that anyone can cause (an outage under load, a flood of malformed requests),
bounded: each kind at most once per interval, the next line saying how many were folded.
And values that anyone can choose (token claims, paths, header values, an upstream's or a
store's text), rendered so that they cannot break a line or forge one."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

# JSON's short escapes; every other character that needs one is written \uXXXX.
_SHORT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    point = ord(char)
    if point > 0xFFFF:  # JSON spells it as a surrogate pair
        point -= 0x10000
        return f"\\u{0xD800 + (point >> 10):04x}\\u{0xDC00 + (point & 0x3FF):04x}"
    return f"\\u{point:04x}"


def printable(text: str) -> str:
    """`text` with every character that is not printable (`str.isprintable`: C0 and C1
    controls, DEL, line and paragraph separators, bidi and other format characters, lone
    surrogates) and every backslash written as a JSON escape: one line, no terminal control,
    and `text` unchanged in the common case. For free text inside a message (an exception's)."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(char if char.isprintable() and char != "\\" else _escape(char) for char in text)


def quoted(value: str | None) -> str:
    """`value` as a JSON string literal (`null` for None), printable characters other than
    `"` and `\\` kept as they are, every other one escaped: what a client or a token chose
    reads as one value on one line, and `json.loads` gives it back exactly."""
    if value is None:
        return "null"
    if value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    escaped = (
        char if char.isprintable() and char not in _SHORT else _escape(char) for char in value
    )
    return '"' + "".join(escaped) + '"'


class RateLimitedLog:
    """At most one WARNING per `interval`; the next line says how many were folded away."""

    def __init__(self, logger: logging.Logger, *, interval: float) -> None:
        self._log = logger
        self._interval = interval
        self._last = -math.inf
        self._folded = 0

    def warning(self, message: str, *args: object) -> None:
        self._emit(logging.WARNING, message, args)

    def exception(self, message: str, *args: object) -> None:
        """An ERROR with the traceback being handled, as `Logger.exception`."""
        self._emit(logging.ERROR, message, args, exc_info=True)

    def _emit(self, level: int, message: str, args: tuple[object, ...], **options: Any) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._folded += 1
            return
        if self._folded:
            message += " (and %d more like it since the last such line)"
            args = (*args, self._folded)
        self._last, self._folded = now, 0
        self._log.log(level, message, *args, **options)
