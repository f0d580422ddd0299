"""Wires config, keys, store, policy and forwarding into the proxy app and the admin app.

The request's way through `Gateway.handle`: route -> bearer token -> signature and claims ->
scopes -> revocation -> session age -> one store round trip (idle check + touch) -> upstream.
Every step raises `Refusal`; `handle` renders it once and counts it. `Gateway.decide` is the
part between the route and the upstream; forward-auth (`handle_forward_auth`) runs the same
route matching and `decide` on the request an edge proxy asks about, and answers instead of
forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import admin, metrics
from gateway.accesslog import AccessLog
from gateway.clock import Clock, SystemClock
from gateway.config import Config, Route
from gateway.connections import GuardedServer
from gateway.forward.deadlines import LOG_FIELDS, Deadlines
from gateway.forward.proxy import Forwarder
from gateway.forward.websocket import HANDSHAKE_SECONDS, WebSockets, wants_websocket
from gateway.forward_auth import AUTH_PATH, TrustedPeers, original_request
from gateway.pipeline import render_refusal
from gateway.reasons import Reason, Refusal
from gateway.revocation import RevocationList
from gateway.routing import Match, Router
from gateway.store.base import Store, StoreUnavailable, TouchResult
from gateway.store.factory import StoreConfigError, hasher_from_config, open_store
from gateway.tokens import policy
from gateway.tokens.claims import VerifiedToken
from gateway.tokens.extract import bearer_token
from gateway.tokens.keys import KeyRing
from gateway.tokens.verify import Verifier

log = logging.getLogger("idlegate")

SESSION_PATH = "/.idlegate/session"
REASON_HEADER = "X-Idlegate-Reason"  # on forward-auth refusals
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_NO_ROUTE_LABEL = "none"
_NO_IDENTITY: Mapping[str, str] = MappingProxyType({})


@dataclass(slots=True)
class _Outcome:
    """What one request ended as, for metrics and the access log."""

    route: str = _NO_ROUTE_LABEL
    decision: str = "allowed"
    reason: str = "ok"
    status: int = 0
    token: VerifiedToken | None = None
    upstream_ms: float | None = None


class RecentActivity:
    """This instance's own memory of accepted requests, for `on_error: grace` (bounded LRU)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._capacity = capacity

    def record(self, key: str, now: float) -> None:
        self._seen[key] = now
        self._seen.move_to_end(key)
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)

    def last(self, key: str) -> float | None:
        return self._seen.get(key)


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


class Gateway:
    """One process's gateway: owns the store, key rings, revocation list and upstream pool."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        environ: Mapping[str, str] | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        # First, before any connection: an unusable admin.token_file is a start-up error.
        token_file = config.admin.token_file
        self.admin_token = admin.AdminToken(token_file) if token_file is not None else None
        self._environ = environ
        self.router = Router(config.routes)
        self.forwarder = Forwarder(config.forward)
        self.hasher = hasher_from_config(config.store, environ)
        self.store: Store = open_store(config.store)
        self.revocations = RevocationList(self.store, self.clock, config.store.revocation_poll)
        self.deadlines = Deadlines(self.clock, self.revocations, config.policy)
        self.websockets = WebSockets(config, self.store, self.clock, self.deadlines)
        self._key_http: aiohttp.ClientSession | None = None
        self.rings: dict[str, KeyRing] = {}
        self.verifier: Verifier | None = None
        self.recent = RecentActivity()
        self.access_log = access_log or AccessLog(enabled=config.server.access_log)
        self.draining = False
        self._grace_mode = config.store.on_error == "grace"
        # Through an outage every request falls back: one line per 10 s, not one per request
        # (each is counted in STORE_FALLBACKS and, with its jti, in the access log).
        self._fallback_log = RateLimitedLog(log, interval=10.0)
        self._idle_gap = metrics.batched(metrics.TOKEN_IDLE_GAP)
        self.in_flight = 0  # requests inside `handle` now; the drain waits for it to reach 0
        self._publisher: asyncio.Task[None] | None = None
        self.quiet = asyncio.Event()  # set once draining with nothing in flight
        self._policy = config.policy
        self._requests: dict[tuple[str, str, str], Any] = {}
        # Request ids: a random per-process prefix and a counter; unique without a syscall.
        self._id_prefix = uuid.uuid4().hex[:16]
        self._id_counter = itertools.count()
        self._durations: dict[str, Any] = {}
        self._forward_auth_requests: dict[tuple[str, str, str], Any] = {}
        forward_auth = config.forward_auth
        self._forward_auth_on_proxy_port = forward_auth.enabled
        self._envoy_path_prefix = forward_auth.envoy_path_prefix
        self._trusted_proxies = TrustedPeers(forward_auth)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._key_http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10), raise_for_status=False
        )
        self.rings = {
            p.name: KeyRing(p, self._key_http, self._environ, clock=self.clock)
            for p in self.config.providers
        }
        for ring in self.rings.values():
            await ring.start()
        self.verifier = Verifier(self.config, self.rings, self.hasher, self.clock)
        await self.forwarder.start()
        await self._refuse_an_evicting_store()
        await self.revocations.start()
        self.deadlines.start()
        await self.websockets.start()
        self._publisher = asyncio.create_task(
            self._publish_metrics_every_second(), name="metrics-publisher"
        )

    async def _refuse_an_evicting_store(self) -> None:
        """An evicting Redis silently drops revocations and activity records: refused at
        start. A store that does not answer yet is no reason not to start (readiness says
        so, and the check runs again on every probe and reconnect)."""
        try:
            problem = await self.store.eviction_problem()
        except StoreUnavailable:
            return
        if problem is not None:
            raise StoreConfigError(f"store.url: {problem}")

    def publish_metrics(self) -> None:
        """What the request path keeps outside Prometheus (its locked updates cost ~0.75 µs
        each): the in-flight gauge, from the plain counter, and the batched histograms. On
        each scrape this process serves, every second for the other workers' scrapes with
        --workers, and at shutdown."""
        metrics.IN_FLIGHT.set(self.in_flight)
        metrics.flush()

    async def _publish_metrics_every_second(self) -> None:
        while True:
            self.publish_metrics()
            await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
            self.publish_metrics()  # the last batch, before the process goes
        await self.websockets.close()
        await self.deadlines.close()
        await self.revocations.close()
        for ring in self.rings.values():
            await ring.close()
        if self._key_http is not None:
            await self._key_http.close()
        await self.forwarder.close()
        await self.store.close()

    async def readiness(self) -> tuple[bool, str]:
        """(ready, why not). Ready: not draining, every provider has keys, the store answers."""
        if self.draining:
            return False, "draining"
        missing = [name for name, ring in self.rings.items() if not ring.ready]
        if missing or not self.rings:
            return False, "no usable keys for provider(s): " + ", ".join(missing)
        try:
            await self.store.ping()
            # The policy may have been changed since start (CONFIG SET, a failover).
            eviction = await self.store.eviction_problem()
        except StoreUnavailable:
            return False, "the store does not answer"
        if eviction is not None:
            return False, eviction
        return True, "ready"

    # -- the request path ------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw_path = request.raw_path.partition("?")[0]
        if self._forward_auth_on_proxy_port and self._is_forward_auth_path(raw_path):
            return await self.handle_forward_auth(request)
        started = time.perf_counter()
        request_id = self._request_id(request)
        outcome = _Outcome()
        self.in_flight += 1
        try:
            # Routing, the decision and forwarding are written out here rather than in helper
            # coroutines: every coroutine level is walked again each time the request is woken
            # up (by the store's reply, the upstream's headers, its body; bench/RESULTS.md).
            # The decision is the one exception: `decide` is shared with forward-auth.
            if raw_path == SESSION_PATH:
                outcome.route = SESSION_PATH
                response: web.StreamResponse = await self._session_status(request, outcome)
            else:
                match = self.router.match(raw_path)
                route = match.route
                outcome.route = match.label
                # Refusals the head alone decides come before the store touches activity.
                if route.upstream is None:
                    raise Refusal(Reason.NO_ROUTE, "this route is decided for forward-auth only")
                upgrade = "Upgrade" in request.headers and wants_websocket(request.headers)
                if upgrade and not route.websocket:
                    raise Refusal(Reason.WEBSOCKET_NOT_ENABLED)
                self.forwarder.check_request(request)
                identity = await self.decide(route, request.query_string, request.headers, outcome)
                headers = self.forwarder.upstream_headers(
                    request,
                    request_id,
                    identity,
                    strip_authorization=route.auth == "required"
                    and self.config.forward.strip_authorization,
                )
                upstream_started = time.perf_counter()
                try:
                    if upgrade:
                        response = await self._websocket(request, match, headers, outcome.token)
                    elif route.stream_deadline and outcome.token is not None:
                        response = await self.deadlines.stream(
                            request,
                            outcome.token,
                            match.label,
                            self.forwarder.forward(request, match, headers, request_id),
                        )
                    else:
                        response = await self.forwarder.forward(request, match, headers, request_id)
                finally:
                    outcome.upstream_ms = (time.perf_counter() - upstream_started) * 1000
        except Refusal as refusal:
            outcome.decision, outcome.reason = refusal.reason.decision, refusal.reason.code
            response = render_refusal(refusal, request_id)
        except Exception:
            log.exception("request %s failed", request_id)
            outcome.decision, outcome.reason = "error", Reason.INTERNAL_ERROR.code
            response = render_refusal(Refusal(Reason.INTERNAL_ERROR), request_id)
        finally:
            self.in_flight -= 1
            if not self.in_flight and self.draining:
                self.quiet.set()
        self._finish(request.method, request_id, outcome, response, started, "proxy")
        return response

    async def decide(
        self,
        route: Route,
        query_string: str,
        headers: CIMultiDictProxy[str],
        outcome: _Outcome,
    ) -> Mapping[str, str]:
        """The decision on a request already routed, the same for both front doors (proxy
        port and forward-auth): bearer token -> signature and claims -> revocation, session
        age -> scopes -> one store round trip (idle check and touch, or the on_error
        fallback). Returns the identity headers to pass on; raises Refusal. The token, once
        verified, is in `outcome.token` (for the log) whatever is decided after."""
        if route.auth != "required":
            return _NO_IDENTITY
        assert self.verifier is not None, "Gateway.start() was not awaited"
        presented = bearer_token(headers, query_string)
        token = self.verifier.cached(presented) or await self.verifier.verify(presented)
        outcome.token = token
        self._admit(token)
        policy.check_scopes(route.scopes, token.scopes)
        policy.check_roles(route.roles, token.roles)
        idle_timeout = policy.idle_timeout_for(self._policy, route)
        extend = route.activity == "extend"
        now = self.clock.now()
        touch = policy.touch_for(token, self._policy, idle_timeout, now, extend=extend)
        try:
            result = await self.store.check_and_touch(touch)
        except StoreUnavailable:
            self._store_fallback(token, idle_timeout, now, outcome)
        else:
            self._record_activity(token, result, now, extend=extend)
        return token.identity

    async def handle_forward_auth(self, request: web.BaseRequest) -> web.StreamResponse:
        """An edge proxy asks whether to forward a request: 200 with the identity headers (for
        it to copy upstream) if the proxy port would forward it, else the same refusal."""
        started = time.perf_counter()
        request_id = self._request_id(request)
        outcome = _Outcome()
        method = request.method
        self.in_flight += 1
        try:
            if request.remote not in self._trusted_proxies:
                raise Refusal(
                    Reason.UNTRUSTED_PROXY,
                    "this peer is not in forward_auth.trusted_proxies",
                )
            raw_path, _, query = request.raw_path.partition("?")
            original = original_request(
                request.method, raw_path, query, request.headers, self._envoy_path_prefix
            )
            method = original.method
            match = self.router.match(original.path)
            outcome.route = match.label
            # As on the proxy port, when the edge passes the handshake's Upgrade/Connection on
            # (nginx does not: there its locations decide which requests may upgrade).
            if (
                not match.route.websocket
                and "Upgrade" in request.headers
                and wants_websocket(request.headers)
            ):
                raise Refusal(Reason.WEBSOCKET_NOT_ENABLED)
            identity = await self.decide(match.route, original.query, request.headers, outcome)
            response: web.StreamResponse = web.Response(
                headers={**identity, "X-Request-ID": request_id}
            )
        except Refusal as refusal:
            outcome.decision, outcome.reason = refusal.reason.decision, refusal.reason.code
            response = render_refusal(refusal, request_id)
            # nginx's auth_request drops the body: the reason code, for its error_page recipe.
            response.headers[REASON_HEADER] = refusal.reason.code
        except Exception:
            log.exception("forward-auth request %s failed", request_id)
            outcome.decision, outcome.reason = "error", Reason.INTERNAL_ERROR.code
            response = render_refusal(Refusal(Reason.INTERNAL_ERROR), request_id)
            response.headers[REASON_HEADER] = Reason.INTERNAL_ERROR.code
        finally:
            self.in_flight -= 1
            if not self.in_flight and self.draining:
                self.quiet.set()
        self._finish(method, request_id, outcome, response, started, "forward_auth")
        return response

    def _is_forward_auth_path(self, raw_path: str) -> bool:
        prefix = self._envoy_path_prefix
        return raw_path == AUTH_PATH or (
            prefix is not None and (raw_path == prefix or raw_path.startswith(prefix + "/"))
        )

    def _request_id(self, request: web.BaseRequest) -> str:
        sent_id = request.headers.get("X-Request-ID")
        if sent_id and _SANE_REQUEST_ID.fullmatch(sent_id):
            return sent_id
        return f"{self._id_prefix}{next(self._id_counter):08x}"

    def _finish(
        self,
        method: str,
        request_id: str,
        outcome: _Outcome,
        response: web.StreamResponse,
        started: float,
        mode: str,
    ) -> None:
        """Count the request (and, for forward-auth, in its own counter) and log it."""
        elapsed = time.perf_counter() - started
        if response.status == 101:  # a relayed WebSocket, now closed: its handshake's time
            elapsed = response.get(HANDSHAKE_SECONDS, elapsed)
        self._count(outcome, elapsed)
        if mode == "forward_auth":
            key = (outcome.route, outcome.decision, outcome.reason)
            counter = self._forward_auth_requests.get(key)
            if counter is None:
                counter = self._forward_auth_requests[key] = metrics.FORWARD_AUTH_REQUESTS.labels(
                    *key
                )
            counter.inc()
        if self.access_log.enabled:
            logged = outcome.token
            self.access_log.write(
                request_id=request_id,
                method=method,
                route=outcome.route,
                status=response.status,
                decision=outcome.decision,
                reason=outcome.reason,
                jti=logged.jti if logged else None,
                sub=logged.sub if logged else None,
                upstream_ms=outcome.upstream_ms,
                total_ms=elapsed * 1000,
                mode=mode,
                extra=response.get(LOG_FIELDS),
            )

    async def _websocket(
        self,
        request: web.BaseRequest,
        match: Match,
        headers: CIMultiDict[str],
        token: VerifiedToken | None,
    ) -> web.StreamResponse:
        """An authorised handshake on a `websocket: true` route: relayed until it closes."""
        route = match.route
        assert route.upstream is not None, "handle refuses routes without an upstream"
        query = request.raw_path.partition("?")[2]
        return await self.websockets.relay(
            request,
            route.upstream + match.upstream_path + ("?" + query if query else ""),
            headers,
            match.label,
            token,
            policy.idle_timeout_for(self._policy, route),
            extend=route.activity == "extend",
        )

    def _count(self, outcome: _Outcome, elapsed: float) -> None:
        key = (outcome.route, outcome.decision, outcome.reason)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = metrics.REQUESTS.labels(*key)
        counter.inc()
        histogram = self._durations.get(outcome.route)
        if histogram is None:
            histogram = self._durations[outcome.route] = metrics.batched(
                metrics.REQUEST_DURATION.labels(outcome.route)
            )
        histogram.observe(elapsed)

    async def _authenticate(self, request: web.BaseRequest) -> VerifiedToken:
        """The request's bearer token, verified (not yet admitted: see `_admit`)."""
        assert self.verifier is not None, "Gateway.start() was not awaited"
        presented = bearer_token(request.headers, request.query_string)
        return self.verifier.cached(presented) or await self.verifier.verify(presented)

    def _admit(self, token: VerifiedToken) -> None:
        """Refuse a revoked token, or one of a session older than max_session_age."""
        if self.revocations.is_revoked(token):
            raise Refusal(Reason.REVOKED)
        policy.check_session_age(token, self._policy, self.clock.now())

    async def _check_activity(
        self, token: VerifiedToken, idle_timeout: float, *, extend: bool, outcome: _Outcome
    ) -> TouchResult:
        """The one store round trip: refuse if idle, else (when `extend`) record activity."""
        now = self.clock.now()
        touch = policy.touch_for(token, self._policy, idle_timeout, now, extend=extend)
        try:
            result = await self.store.check_and_touch(touch)
        except StoreUnavailable:
            return self._store_fallback(token, idle_timeout, now, outcome)
        self._record_activity(token, result, now, extend=extend)
        return result

    def _record_activity(
        self, token: VerifiedToken, result: TouchResult, now: float, *, extend: bool
    ) -> None:
        """After the store's answer: refuse an idle token, else count how close it came."""
        if result.idle:
            raise Refusal(policy.idle_reason(self._policy))
        self._idle_gap.observe(max(0.0, now - result.last_activity))
        if extend and self._grace_mode:
            self.recent.record(token.track_key, now)

    def _store_fallback(
        self, token: VerifiedToken, idle_timeout: float, now: float, outcome: _Outcome
    ) -> TouchResult:
        mode = self.config.store.on_error
        if mode == "allow":
            self._fallback_log.warning(
                "store unavailable: forwarding jti=%s without idle check", token.jti
            )
            metrics.STORE_FALLBACKS.labels("allow").inc()
            outcome.reason = Reason.STORE_UNAVAILABLE.code
            return TouchResult(last_activity=now, idle=False)
        if mode == "grace":
            seen = self.recent.last(token.track_key)
            if seen is not None and not policy.is_idle(seen, now, idle_timeout):
                self._fallback_log.warning(
                    "store unavailable: jti=%s allowed on local activity", token.jti
                )
                metrics.STORE_FALLBACKS.labels("grace").inc()
                outcome.reason = Reason.STORE_UNAVAILABLE.code
                return TouchResult(last_activity=seen, idle=False)
        raise Refusal(Reason.STORE_UNAVAILABLE, retry_after=1)

    async def _session_status(self, request: web.BaseRequest, outcome: _Outcome) -> web.Response:
        """Remaining idle time etc. for the presented token; never counts as activity."""
        if request.method not in ("GET", "HEAD"):
            return web.json_response({"error": "method_not_allowed"}, status=405)
        token = await self._authenticate(request)
        outcome.token = token
        self._admit(token)
        idle_timeout = self._policy.idle_timeout
        result = await self._check_activity(token, idle_timeout, extend=False, outcome=outcome)
        now = self.clock.now()
        started_at = token.auth_time if token.auth_time is not None else token.iat
        body = {
            "idle_remaining_seconds": round(idle_timeout - (now - result.last_activity), 3),
            "expires_in_seconds": round(token.exp - now, 3),
            "session_age_seconds": round(now - started_at, 3),
        }
        return web.json_response(body, headers={"Cache-Control": "no-store"})


def _client_limits(config: Config) -> dict[str, float]:
    return {
        "header_timeout": config.server.header_timeout,
        "keepalive_timeout": config.server.keepalive_timeout,
    }


def build_proxy_server(gateway: Gateway, **handler_options: Any) -> web.Server:
    """The proxy port: aiohttp's low-level server calling `Gateway.handle` directly (no router,
    middleware or signals on the request path: the gateway routes itself), with the slow-client
    limits of `server.*`."""
    return GuardedServer(gateway.handle, **_client_limits(gateway.config), **handler_options)


def build_forward_auth_server(gateway: Gateway, **handler_options: Any) -> web.Server:
    """forward_auth.listen: every request on it is a forward-auth request, whatever its path
    (Traefik's `address`, Envoy's `path_prefix` and nginx's `auth_request` all pick their own)."""
    return GuardedServer(
        gateway.handle_forward_auth, **_client_limits(gateway.config), **handler_options
    )


def build_admin_app(gateway: Gateway) -> web.Application:
    return admin.AdminAPI(
        readiness=gateway.readiness,
        revocations=gateway.revocations,
        store=gateway.store,
        hasher=gateway.hasher,
        clock=gateway.clock,
        config=gateway.config,
        token=gateway.admin_token,
        before_scrape=gateway.publish_metrics,
    ).app()
