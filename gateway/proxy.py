"""Forwarding: header hygiene, streaming both ways, upstream errors.

Bodyless requests to http:// upstreams (the common case) go through the lean client in
`gateway/upstream.py`, one keep-alive pool per upstream origin; requests with a body and https
upstreams through one aiohttp `ClientSession`. Bodies are streamed chunk by chunk (never read
whole); a request body is cut off at `max_body`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from gateway import metrics
from gateway.config import Forward
from gateway.reasons import Reason, Refusal
from gateway.routing import Match
from gateway.upstream import (
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
)

# RFC 9110 §7.6.1 plus the legacy ones proxies still meet.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Set by the gateway itself, never taken from the client.
_REQUEST_OWN = frozenset({"host", "x-request-id", "expect"})
# What a proxy in front says about the client and its request: taken from `trusted_proxies`
# only, and from anyone else dropped (the first five are then set by us). Frameworks act on
# them: Spring and Werkzeug rebuild URLs from X-Forwarded-Prefix/-Port, Symfony and IIS route
# on X-Original-URL / X-Rewrite-URL, apps log and rate-limit on the client-IP ones.
_CLIENT_CLAIMS = frozenset(
    {
        "x-forwarded-for",
        "x-real-ip",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-ssl",
        "x-forwarded-scheme",
        "x-forwarded-server",
        "x-original-forwarded-for",
        "x-client-ip",
        "true-client-ip",
        "x-cluster-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-original-url",
        "x-original-uri",
        "x-rewrite-url",
    }
)
_TRUST_CACHE = 4096  # distinct peer addresses remembered (a gateway meets few proxies)
_CHUNK = 64 * 1024
_SMALL_RESPONSE = 64 * 1024

log = logging.getLogger("idlegate.upstream")
_FAILURE_LOG_EVERY = 10.0  # seconds between two lines for one route, upstream and reason
# Exceptions whose text names the connection, never the request (aiohttp's ClientResponseError
# and InvalidURL carry the URL, whose query may hold an access_token): others go by class.
_TELLING = (UpstreamError, OSError, TimeoutError, aiohttp.ClientConnectionError)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


def describe_failure(exc: BaseException) -> str:
    """`Class: message` of an upstream error, safe to log: no request text, one short line."""
    name = type(exc).__name__
    text = str(exc) if isinstance(exc, _TELLING) else ""
    text = _UNPRINTABLE.sub(" ", text).strip()[:200]
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
        key = (route, origin, reason.code)
        now = self._now()
        entry = self._last.get(key)
        if entry is not None and now - entry[0] < self._every:
            self._last[key] = (entry[0], entry[1] + 1)
            return
        suppressed = entry[1] if entry is not None else 0
        self._last[key] = (now, 0)
        log.warning(
            "upstream failed: route=%s upstream=%s reason=%s error=%s%s",
            route,
            origin,
            reason.code,
            error,
            f" (and {suppressed} more like it since the last line)" if suppressed else "",
        )


def _connection_named(headers: MultiMapping[str]) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("Connection", ()):
        named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


def _filtered(headers: MultiMapping[str], remove: frozenset[str]) -> CIMultiDict[str]:
    """A copy without the (lower-case) names in `remove` (hop-by-hop included) and those
    named in Connection."""
    if "Connection" in headers:
        remove = remove | _connection_named(headers)
    out = CIMultiDict(headers)  # one copy in C, then only the names present are removed
    for name in remove:
        if name in out:
            del out[name]
    return out


def _request_filtered(
    headers: MultiMapping[str], remove: frozenset[str], twins: frozenset[str]
) -> CIMultiDict[str]:
    """`_filtered` for request headers, in one pass: also without the names that are in
    `twins` once `_` is read as `-` (what nginx, WSGI and CGI upstreams do)."""
    if "Connection" in headers:
        remove = remove | _connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in remove or ("_" in lower and lower.replace("_", "-") in twins):
            continue
        out.add(name, value)
    return out


class BodyLimit:
    """Streams a request body and stops it once it grows past `max_body`."""

    def __init__(self, request: web.BaseRequest, max_body: int) -> None:
        self._content = request.content
        self._max_body = max_body
        self.exceeded = False

    async def chunks(self) -> AsyncIterator[bytes]:
        total = 0
        async for chunk in self._content.iter_chunked(_CHUNK):
            total += len(chunk)
            if total > self._max_body:
                self.exceeded = True
                raise Refusal(Reason.PAYLOAD_TOO_LARGE)
            yield chunk


class Forwarder:
    def __init__(self, config: Forward) -> None:
        self._config = config
        # Identity header names are dropped from every incoming request (client-sent copies).
        self._drop = HOP_BY_HOP | _REQUEST_OWN | {n.lower() for n in config.identity_headers}
        self._drop_with_auth = self._drop | {"authorization"}
        # From a peer not in trusted_proxies, by `strip_authorization`.
        self._drop_untrusted = {
            False: self._drop | _CLIENT_CLAIMS,
            True: self._drop_with_auth | _CLIENT_CLAIMS,
        }
        # nginx, WSGI and CGI upstreams read `X_Auth_Subject` as `X-Auth-Subject`: an incoming
        # name that is one of ours once `_` is `-` is dropped like the name itself.
        self._underscore_twins = self._drop_with_auth | _CLIENT_CLAIMS
        self._trusted = tuple(config.trusted_proxies)
        self._trusted_peers: dict[str, bool] = {}
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout, sock_read=config.read_timeout
        )
        self._session: aiohttp.ClientSession | None = None
        self._upstream_durations: dict[str, Any] = {}
        # Route upstream URL -> (its origin's lean pool, base path); None for https.
        self._lean: dict[str, tuple[UpstreamPool, str] | None] = {}
        self._pools: dict[tuple[str, int], UpstreamPool] = {}
        self.failures = UpstreamFailureLog()
        self._origins: dict[str, str] = {}  # route upstream URL -> its origin, for the log

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._config.pool_size, keepalive_timeout=30, ttl_dns_cache=10
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,  # pass bodies through exactly as the upstream sent them
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        if self._session is not None:
            await self._session.close()

    def _lean_target(self, upstream: str) -> tuple[UpstreamPool, str] | None:
        """The lean pool for a route's upstream URL and the URL's base path, once per URL."""
        try:
            return self._lean[upstream]
        except KeyError:
            pass
        url = URL(upstream)
        found: tuple[UpstreamPool, str] | None = None
        # https, and credentials in the URL (aiohttp sends them as Basic auth), stay on aiohttp.
        if url.scheme == "http" and url.raw_host and url.port is not None and url.user is None:
            origin = (url.raw_host, url.port)
            pool = self._pools.get(origin)
            if pool is None:
                pool = self._pools[origin] = UpstreamPool.for_url(
                    url,
                    limit=self._config.pool_size,
                    connect_timeout=self._config.connect_timeout,
                    read_timeout=self._config.read_timeout,
                )
            found = (pool, "" if url.raw_path == "/" else url.raw_path)
        self._lean[upstream] = found
        return found

    def upstream_headers(
        self,
        request: web.BaseRequest,
        request_id: str,
        identity: Mapping[str, str],
        *,
        strip_authorization: bool,
    ) -> CIMultiDict[str]:
        """What goes upstream: the client's headers without hop-by-hop ones, identity copies
        (and their `_` twins), or, unless the peer is a trusted proxy, its claims about the
        client; then the identity headers and X-Forwarded-*, X-Real-IP, X-Request-ID."""
        peer = request.remote or ""
        trusted = bool(self._trusted) and self._is_trusted(peer)
        if trusted:
            drop = self._drop_with_auth if strip_authorization else self._drop
        else:
            drop = self._drop_untrusted[strip_authorization]
        headers = _request_filtered(request.headers, drop, self._underscore_twins)
        # Added after hop-by-hop removal, so `Connection: X-Auth-Subject` cannot strip them.
        headers.update(identity)
        if trusted:
            # Its view of the client passes; we add its hop to the chain.
            chain = ", ".join(request.headers.getall("X-Forwarded-For", ()))
            headers["X-Forwarded-For"] = f"{chain}, {peer}" if chain else peer
        else:
            headers["X-Forwarded-For"] = peer
        if peer and "X-Real-IP" not in headers:
            headers["X-Real-IP"] = peer
        if "X-Forwarded-Proto" not in headers:
            headers["X-Forwarded-Proto"] = request.scheme
        if request.host and "X-Forwarded-Host" not in headers:
            headers["X-Forwarded-Host"] = request.host
        headers["X-Request-ID"] = request_id
        return headers

    def _is_trusted(self, peer: str) -> bool:
        """Whether the peer address is in `trusted_proxies` (IPv4-mapped IPv6 as IPv4)."""
        known = self._trusted_peers.get(peer)
        if known is not None:
            return known
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            trusted = False  # no address (a Unix socket) is no proxy we trust
        else:
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            trusted = any(address in network for network in self._trusted)
        if len(self._trusted_peers) >= _TRUST_CACHE:
            self._trusted_peers.clear()
        self._trusted_peers[peer] = trusted
        return trusted

    def check_request(self, request: web.BaseRequest) -> None:
        """Refuse what the request head alone decides (a body declared over `max_body`).
        Called before any token or store work, so such a refused request is no activity."""
        declared = request.content_length
        if declared is not None and declared > self._config.max_body:
            raise Refusal(Reason.PAYLOAD_TOO_LARGE)

    async def forward(
        self,
        request: web.BaseRequest,
        match: Match,
        headers: CIMultiDict[str],
        request_id: str,
    ) -> web.StreamResponse:
        assert self._session is not None, "Forwarder.start() was not awaited"
        self.check_request(request)  # the caller has already; kept for any other caller
        query = request.raw_path.partition("?")[2]
        base_url = match.route.upstream
        assert base_url is not None, "Gateway.handle refuses routes without an upstream"
        if not request.body_exists:
            lean = self._lean_target(base_url)
            if lean is not None:
                pool, base = lean
                target = base + match.upstream_path + ("?" + query if query else "")
                return await self._forward_lean(request, pool, target, headers, request_id, match)
        target = base_url + match.upstream_path + ("?" + query if query else "")
        limit: BodyLimit | None = None
        data: AsyncIterator[bytes] | None = None
        if request.body_exists:
            limit = BodyLimit(request, self._config.max_body)
            data = limit.chunks()
            if request.headers.get("Expect", "").lower() == "100-continue":
                # Only now, with the request routed, authorised and within max_body, does the
                # client get to send its body (RFC 9110 §10.1.1).
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        started = time.perf_counter()
        try:
            upstream = await self._session.request(
                request.method,
                URL(target, encoded=True),
                headers=headers,
                data=data,
                allow_redirects=False,
                compress=None,
            )
        except aiohttp.ServerTimeoutError as exc:
            if isinstance(exc, aiohttp.ConnectionTimeoutError):
                raise self._failed(
                    match, Reason.UPSTREAM_UNAVAILABLE, exc, "connecting timed out"
                ) from None
            raise self._failed(match, Reason.UPSTREAM_TIMEOUT, exc) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if limit is not None and limit.exceeded:
                raise Refusal(Reason.PAYLOAD_TOO_LARGE) from None
            if isinstance(exc, asyncio.TimeoutError):
                raise self._failed(match, Reason.UPSTREAM_TIMEOUT, exc) from None
            raise self._failed(match, Reason.UPSTREAM_UNAVAILABLE, exc) from None
        self._observe_upstream(match.label, started)
        try:
            if limit is not None and limit.exceeded:
                raise Refusal(Reason.PAYLOAD_TOO_LARGE)
            headers = _filtered(upstream.headers, HOP_BY_HOP)
            headers["X-Request-ID"] = request_id
            length = upstream.content_length
            bodiless = request.method == "HEAD" or upstream.status in (204, 304)
            if length is None or length > _SMALL_RESPONSE or bodiless:
                return await self._stream(
                    request,
                    web.StreamResponse(
                        status=upstream.status, reason=upstream.reason, headers=headers
                    ),
                    upstream.content.iter_chunked(_CHUNK),
                    (TimeoutError, aiohttp.ClientError),
                )
            # Small bodies (the common case) are read here, without another coroutine level.
            try:
                body = await upstream.read()
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise self._failed(
                    match, Reason.UPSTREAM_UNAVAILABLE, exc, "the upstream response broke off"
                ) from None
            headers.popall("Content-Length", None)
            return web.Response(
                status=upstream.status, reason=upstream.reason, headers=headers, body=body
            )
        finally:
            upstream.release()

    async def _forward_lean(
        self,
        request: web.BaseRequest,
        pool: UpstreamPool,
        target: str,
        headers: CIMultiDict[str],
        request_id: str,
        match: Match,
    ) -> web.StreamResponse:
        """`forward` for a bodyless request to an http:// upstream, over the lean client."""
        started = time.perf_counter()
        try:
            upstream = await pool.request(request.method, target, headers)
        except UpstreamTimeout as exc:
            raise self._failed(match, Reason.UPSTREAM_TIMEOUT, exc) from None
        except UpstreamConnectTimeout as exc:
            raise self._failed(
                match, Reason.UPSTREAM_UNAVAILABLE, exc, "connecting timed out"
            ) from None
        except UpstreamError as exc:
            raise self._failed(match, Reason.UPSTREAM_UNAVAILABLE, exc) from None
        self._observe_upstream(match.label, started)
        headers = _filtered(upstream.headers, HOP_BY_HOP)
        headers["X-Request-ID"] = request_id
        reason = upstream.reason or None  # none sent: aiohttp writes the standard phrase
        if upstream.body is not None:
            headers.popall("Content-Length", None)
            return web.Response(
                status=upstream.status, reason=reason, headers=headers, body=upstream.body
            )
        chunks = upstream.chunks()
        try:
            return await self._stream(
                request,
                web.StreamResponse(status=upstream.status, reason=reason, headers=headers),
                chunks,
                (UpstreamError,),
            )
        finally:
            await chunks.aclose()
            upstream.close()

    def _failed(
        self, match: Match, reason: Reason, exc: BaseException, detail: str | None = None
    ) -> Refusal:
        """The refusal for an upstream error, logged (rate-limited) with its route and the
        upstream's origin: never the request's path, query or headers."""
        upstream = match.route.upstream or ""
        origin = self._origins.get(upstream)
        if origin is None:
            # No credentials or path of the configured URL in the log.
            origin = self._origins[upstream] = str(URL(upstream).origin())
        error = describe_failure(exc)
        if reason is Reason.UPSTREAM_TIMEOUT:
            error += f", read_timeout {self._config.read_timeout:g}s"
        elif detail == "connecting timed out":
            error += f", connect_timeout {self._config.connect_timeout:g}s"
        self.failures.failed(
            match.label, origin, reason, f"{detail} ({error})" if detail else error
        )
        return Refusal(reason, detail)

    def _observe_upstream(self, label: str, started: float) -> None:
        histogram = self._upstream_durations.get(label)
        if histogram is None:
            histogram = self._upstream_durations[label] = metrics.batched(
                metrics.UPSTREAM_DURATION.labels(label)
            )
        histogram.observe(time.perf_counter() - started)

    async def _stream(
        self,
        request: web.BaseRequest,
        response: web.StreamResponse,
        chunks: AsyncIterator[bytes],
        broken: tuple[type[Exception], ...],
    ) -> web.StreamResponse:
        """Large, unsized or bodiless responses: relayed chunk by chunk, never held whole."""
        await response.prepare(request)
        try:
            async for chunk in chunks:
                await response.write(chunk)
        except broken:
            # Headers are gone already: the only honest signal left is to cut the connection.
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response
