"""The one interface both upstream clients offer, their one family of errors, and the one
place those errors become reason codes and log lines.

In the spirit of httpx's `AsyncBaseTransport.handle_async_request`: a request (method,
target, headers, body stream) in, a response (status, reason, headers, body whole or as a
stream, close) out. `forward/proxy.py` relays any `UpstreamResponse` the same way, whichever
transport produced it.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable
from typing import ClassVar, Final, Protocol, TypeAlias

from multidict import CIMultiDict, MultiMapping

from gateway.forward.headers import UpstreamHeaders
from gateway.logs import printable
from gateway.reasons import Reason, Refusal

Body: TypeAlias = bytes | AsyncIterable[bytes] | None  # a request body: whole, or streamed
# A request's header fields: as one multidict, or as `RequestHeaders` made them (in two parts).
RequestFields: TypeAlias = CIMultiDict[str] | UpstreamHeaders
SMALL_BODY: Final = 64 * 1024  # a sized response body up to this is read whole, larger ones stream
CHUNK: Final = 64 * 1024  # the most read or relayed at once


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer properly."""

    reason: ClassVar[Reason] = Reason.UPSTREAM_UNAVAILABLE
    detail: ClassVar[str | None] = None  # what the client is told, if more than the reason


class UpstreamUnreachable(UpstreamError):
    """Connecting failed (refused, unresolvable, reset)."""


class UpstreamConnectTimeout(UpstreamError):
    """Connecting took longer than `connect_timeout`."""

    detail = "connecting timed out"


class UpstreamPoolTimeout(UpstreamConnectTimeout):
    """No pooled connection came free within `connect_timeout` (every one stayed busy)."""

    detail = "no upstream connection came free in time"


class UpstreamTimeout(UpstreamError):
    """The upstream went quiet for longer than `read_timeout`."""

    reason = Reason.UPSTREAM_TIMEOUT


class UpstreamBroken(UpstreamError):
    """The response is malformed, or the connection ended before it was complete."""


class RequestHeadInvalid(UpstreamError, ValueError):
    """A request head that cannot be sent as it is (a newline in a header value): never
    sent, so nothing the upstream could misread."""


# A header byte that is not UTF-8 reaches the gateway as a lone surrogate (aiohttp's parsers
# decode with `surrogateescape`), and aiohttp's writers drop lone surrogates: sent or relayed by
# aiohttp, the value would differ from the one the gateway judged (`TR\xffACE` is `TRACE`
# upstream). Refused on every transport and both ways, so a request's fate does not depend on
# which transport carries it.
UNSENDABLE_REQUEST: Final = "a request header holds bytes that are not UTF-8"
UNRELAYABLE_RESPONSE: Final = "a response header or reason holds bytes that are not UTF-8"


def unsendable() -> Refusal:
    """The refusal (400 malformed_request) for a request whose header fields cannot be sent
    byte for byte as the gateway judged them: raised before anything is sent, by the
    transport (a client's fault, not the upstream's: no upstream failure is logged)."""
    return Refusal(Reason.MALFORMED_REQUEST, UNSENDABLE_REQUEST)


def check_sendable(headers: MultiMapping[str]) -> None:
    """Raise `unsendable()` when a header name or value holds a lone surrogate: a writer
    that drops those (aiohttp's) would send other values than the ones judged."""
    if not is_utf8("".join(itertools.chain.from_iterable(headers.items()))):
        raise unsendable()


def is_utf8(text: str) -> bool:
    """Whether `text` (header names and values, joined) can be written as the bytes it was
    read from: ASCII (a constant-time flag of a `str`), or UTF-8 without lone surrogates."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# Controls but HTAB: in no reason phrase (RFC 9112 §4) nor field (RFC 9110 §5.5), and what
# aiohttp's writer refuses to send on, once the handler has returned.
_CONTROL_CHARACTERS = r"[\x00-\x08\x0a-\x1f\x7f]"
CONTROLS: Final = re.compile(_CONTROL_CHARACTERS)
_CONTROL_BYTES: Final = re.compile(_CONTROL_CHARACTERS.encode())  # the same, in bytes
MAX_LENGTH_DIGITS: Final = 18  # a Content-Length that fits in a signed 64-bit integer
_CONTENT_LENGTH = re.compile(rf"[0-9]{{1,{MAX_LENGTH_DIGITS}}}")


def check_status_line(version: str, status: int, reason: str | bytes) -> None:
    """Refuse (`UpstreamBroken`) a status line, interim or final, that is not relayed: a
    version other than 1.0 and 1.1, a status outside 100..599 (RFC 9110 §15), controls in the
    reason phrase, and 101: no request a transport sends asks to switch protocols, and
    relayed, the client's connection would become a tunnel no later request is decided on."""
    controls = (
        _CONTROL_BYTES.search(reason) if isinstance(reason, bytes) else CONTROLS.search(reason)
    )
    if version not in ("1.1", "1.0") or not 100 <= status <= 599 or controls:
        raise UpstreamBroken(f"invalid status line (HTTP/{version} {status})")
    if status == 101:
        raise UpstreamBroken("the upstream switched protocols unasked")


def check_transfer_codings(version: str, values: list[str]) -> None:
    """Refuse (`UpstreamBroken`) the Transfer-Encoding field values of a response with a body
    unless they are one `chunked`, and any in HTTP/1.0 (RFC 9112 §6.1). Another coding (gzip,
    ...) would reach the client still applied but no longer declared (Transfer-Encoding is
    hop-by-hop, the relay frames the body anew): refused, not mangled."""
    # ASCII only: "chun\u212aed".lower() (a Kelvin sign) is "chunked" too.
    chunked = len(values) == 1 and values[0].isascii() and values[0].lower() == "chunked"
    if not chunked or version == "1.0":
        raise UpstreamBroken(f"unsupported transfer coding {values} (HTTP/{version})")


def content_length(value: str) -> int:
    """A Content-Length field's value: at most 18 digits and nothing else, else
    `UpstreamBroken`."""
    if _CONTENT_LENGTH.fullmatch(value) is None:
        raise UpstreamBroken("invalid Content-Length")
    return int(value)


class UpstreamResponse(Protocol):
    """Status and headers of a response; `body` when it was small enough to be read whole
    (and for no bodiless one), else `chunks()` yields it. `close()` gives the connection up
    (back to its pool if the body was read to its end, else closed). Its status line passed
    `check_status_line`, no field holds a control but HTAB, and its fields and reason are
    UTF-8 (`UNRELAYABLE_RESPONSE`), whichever transport read it: nothing the relay's writer
    would refuse or alter."""

    status: int
    reason: str
    headers: CIMultiDict[str]  # this response's own: the relay may change them in place
    body: bytes | None

    def chunks(self) -> AsyncGenerator[bytes, None]: ...

    def close(self) -> None: ...


class Transport(Protocol):
    """Sends one request and reads the response head (and a small body whole); `headers` are
    the transport's to change. Every failure is an `UpstreamError`, but a request whose
    header bytes cannot be sent as they are (`unsendable`: a `Refusal`); `target` is what the
    transport was built to understand (an origin-form path for one origin's pool, an absolute
    URL for a general client)."""

    async def request(
        self, method: str, target: str, headers: RequestFields, body: Body = None
    ) -> UpstreamResponse: ...


log = logging.getLogger("idlegate.upstream")
_FAILURE_LOG_EVERY = 10.0  # seconds between two lines for one route, upstream and reason
# Exceptions whose text names the connection, never the request (aiohttp's ClientResponseError
# and InvalidURL carry the URL, whose query may hold an access_token): others go by class.
_TELLING = (UpstreamError, OSError, TimeoutError)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")
# A URL in an exception's text (a library naming the request it failed on): its path and query
# may hold secrets (reset codes, signed-URL signatures), so none is ever logged.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")


def describe_failure(exc: BaseException) -> str:
    """`Class: message` of an upstream error, safe to log: no request text, one short line."""
    name = type(exc).__name__
    text = str(exc) if isinstance(exc, _TELLING) else ""
    text = _URL.sub("<url>", _UNPRINTABLE.sub(" ", text)).strip()[:200]
    return f"{name}: {text}" if text else name


class UpstreamFailureLog:
    """One WARNING per route, upstream origin and reason per `every` seconds, with how many
    like it were suppressed since: a dead upstream under load must not flood the log, nor stay
    silent (502 and 504 are otherwise only counted)."""

    def __init__(
        self, every: float = _FAILURE_LOG_EVERY, now: Callable[[], float] = time.monotonic
    ) -> None:
        self._every = every
        self._now = now
        # (route, origin, reason) -> (when last logged, suppressed since). Bounded by the config:
        # routes times their upstreams times the two reasons.
        self._last: dict[tuple[str, str, str], tuple[float, int]] = {}

    def failed(self, route: str, origin: str, reason: Reason, error: str) -> None:
        key, now = (route, origin, reason.code), self._now()
        logged, suppressed = self._last.get(key, (-math.inf, 0))
        if now - logged < self._every:
            self._last[key] = (logged, suppressed + 1)
            return
        self._last[key] = (now, 0)
        more = f" (and {suppressed} more like it since the last line)" if suppressed else ""
        line = "upstream failed: route=%s upstream=%s reason=%s error=%s%s"
        log.warning(line, route, origin, reason.code, printable(error), more)

    def refusal(
        self, route: str, origin: str, exc: UpstreamError, context: str | None = None
    ) -> Refusal:
        """The refusal for an upstream error (its class decides the reason code), logged
        rate-limited with the route and the upstream's origin: never the request's path,
        query or headers. `context` says where it happened when the client cannot be told."""
        error, said = describe_failure(exc), context or exc.detail
        self.failed(route, origin, exc.reason, f"{said} ({error})" if said else error)
        return Refusal(exc.reason, exc.detail)
