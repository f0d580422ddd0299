"""The request's way through the gateway, each step written once.

route -> bearer token -> signature and claims -> revocation, session age -> scopes, roles ->
one store round trip (idle check and touch, or the `store.on_error` fallback) -> forward.

Two front doors run these steps. The proxy port (`Pipeline.handle`) forwards what they allow;
forward-auth (`Pipeline.handle_forward_auth`) answers an edge proxy what the proxy port would
decide, and forwards nothing. On the proxy port, a WebSocket handshake is a request whose
forwarding step is the relay, and `/.idlegate/session` is a built-in route (auth required,
activity passive, no idle override) whose forwarding step is a local responder. Every step
raises `Refusal`; the front door renders it once, counts it and logs it.

What the steps before the store decide depends on the Authorization value, the route, the
time and the key set only: it is kept per value and route (`_Admitted`), and a request that
repeats one re-checks time, key set and revocation, then goes to the store. Anything else
runs the steps in full.

Coroutine budget: every coroutine level is walked again each time the request is woken up (by
the store's reply, the upstream's head, its body; bench/RESULTS.md). So the steps are plain
functions and a front door awaits two things: `decide` (the only coroutine step: verification
on a cache miss, then the store round trip, which `store.coalesce` answers without a
coroutine inside a token's window) and the forwarding: `Forwarder.forward` itself for a plain
request, `_forwarding` for a WebSocket, a stream cut at deadlines or a timed one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Mapping
from typing import Any

from aiohttp import HttpVersion10, HttpVersion11, hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import metrics
from gateway.accesslog import AccessLog
from gateway.bounded import BoundedCache
from gateway.clock import Clock
from gateway.config import Config, Policy, Route
from gateway.forward.deadlines import LOG_FIELDS, Deadlines
from gateway.forward.headers import (
    METHOD_OVERRIDES,
    OVERRIDE_NAMES,
    X_REQUEST_ID,
    UpstreamHeaders,
)
from gateway.forward.proxy import Forwarder, is_form
from gateway.forward.websocket import (
    HANDSHAKE_SECONDS,
    WebSockets,
    check_handshake,
    wants_websocket,
)
from gateway.forward_auth import (
    AUTH_PATH,
    NOT_FORWARDED_METHODS,
    TrustedPeers,
    named_method,
    original_request,
)
from gateway.logs import RateLimitedLog, quoted
from gateway.reasons import Reason, Refusal, rfc6750_text
from gateway.revocation import RevocationList
from gateway.routing import Match, Router
from gateway.store.base import Store, StoreUnavailable, Touch
from gateway.store.coalesce import CoalescingStore
from gateway.tokens import policy
from gateway.tokens.claims import Identity, VerifiedToken
from gateway.tokens.extract import canonical, check_token68, credential, presented_token
from gateway.tokens.keys import KeyRing
from gateway.tokens.verify import CACHED_CHARS, Verifier

log = logging.getLogger("idlegate")

SESSION_PATH = "/.idlegate/session"
REASON_HEADER = "X-Idlegate-Reason"  # on forward-auth refusals
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_NO_ROUTE_LABEL = "none"
_FORM_UNSEEN = (
    "a form body cannot be checked through forward-auth, which never sees it: "
    "send form posts to the proxy port"
)
_FOREIGN_UPGRADE = (
    "forward-auth decides no Upgrade but a WebSocket handshake (with Connection: upgrade), "
    "since the edge would forward it as it is"
)
_LIST_UNREAD = "the revocation list has not been read from the store yet"
_NO_IDENTITY: Mapping[str, str] = Identity()  # public routes: nothing rendered, shared
# Authorization values (by route) whose decision before the store is kept; the oldest goes first.
ADMITTED = 20_000
# Admitted tokens are found by the tail of their Authorization value: a JWS ends in its
# signature, so 32 characters tell tokens apart, and hashing them (a new string per request)
# costs a tenth of hashing the whole value. The whole value is then compared (memcmp).
_TAIL = 32

# The session status endpoint, as a route: decided like any (no activity recorded), then
# answered by `_session_status` instead of an upstream. Its path is matched before the
# configured routes, so a catch-all route does not take it.
SESSION_ROUTE = Route(prefix=SESSION_PATH, activity="passive")


class _RequestRecord:
    """What one request ended as, for metrics and the access log. The defaults are class
    attributes, so making one runs no Python `__init__` (one per request)."""

    route: str = _NO_ROUTE_LABEL
    decision: str = "allowed"
    reason: str = "ok"
    token: VerifiedToken | None = None
    last_activity: float | None = None  # as the store (or its fallback) answered
    upstream_ms: float | None = None
    websocket: bool = False  # relayed: its duration is the handshake's (HANDSHAKE_SECONDS)
    # Forwarded by `_relay` (a WebSocket, or a stream_deadline route): its response may hold
    # more access log fields (LOG_FIELDS). Only then is it asked: a response's `get` of a key
    # it does not hold raises and catches a KeyError, ~0.5 µs.
    relayed: bool = False


class _Admitted:
    """A token the steps before the store accepted on one route (`Pipeline._admit`), and its
    Touch: while its key stands and `now` is inside its time claims (and `max_session_age`),
    the same Authorization value on that route is decided by revocation and the store alone.
    Outside that window the steps run again, and refuse with the precise reason."""

    __slots__ = (
        "_generation", "_ring", "_valid_from", "_valid_until", "presented", "token", "touch",
    )  # fmt: skip

    def __init__(
        self, presented: str, token: VerifiedToken, touch: Touch, ring: KeyRing, rules: Policy
    ) -> None:
        self.presented, self.token, self.touch = presented, token, touch
        # The key set it verified with: while that is in place, `ring.lookup` answers the same.
        self._ring, self._generation = ring, ring.generation
        if ring.lookup(token.kid) is not token.key:  # replaced meanwhile: never holds
            self._generation = -1
        leeway = rules.leeway
        # Verifier._check_time: refused from exp + leeway on, or before iat (and nbf) - leeway.
        self._valid_from = max(token.iat, token.nbf or -math.inf) - leeway
        until = token.exp + leeway
        if rules.max_session_age is not None and token.auth_time is not None:
            # policy.check_session_age refuses after this; at it, the steps decide.
            until = min(until, token.auth_time + rules.max_session_age + leeway)
        self._valid_until = until

    def holds(self, now: float) -> bool:
        return (
            self._valid_from <= now < self._valid_until
            and self._ring.generation == self._generation
        )


class Traffic:
    """Requests inside the pipeline now, and whether the process drains: the drain waits for
    `quiet`, set once draining with nothing in flight."""

    __slots__ = ("draining", "in_flight", "quiet")

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self.quiet = asyncio.Event()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.draining:
            self.leave_drained()

    def leave_drained(self) -> None:
        """After `in_flight` went down while draining (the proxy port inlines `leave`)."""
        if not self.in_flight:
            self.quiet.set()


def render_refusal(refusal: Refusal, request_id: str) -> web.Response:
    """The contract's refusal: JSON body, `Cache-Control: no-store`, and for 401/403 a
    `WWW-Authenticate` challenge (no `error` attribute when the token is simply missing)."""
    reason = refusal.reason
    description = rfc6750_text(refusal.detail)
    headers = {"Cache-Control": "no-store", "X-Request-ID": request_id}
    if reason.status in (401, 403):
        challenge = 'Bearer realm="idlegate"'
        if reason.oauth_error is not None:
            challenge += f', error="{reason.oauth_error}", error_description="{description}"'
        if refusal.scope is not None:
            challenge += f', scope="{rfc6750_text(refusal.scope)}"'
        headers["WWW-Authenticate"] = challenge
    if refusal.retry_after is not None:
        headers["Retry-After"] = str(refusal.retry_after)
    if refusal.allow is not None:
        headers["Allow"] = refusal.allow
    body = {
        "error": reason.oauth_error or reason.code,
        "reason": reason.code,
        "message": description,
        "request_id": request_id,
    }
    response = web.json_response(body, status=reason.status, headers=headers)
    if refusal.close_connection:
        response.force_close()
    return response


class Pipeline:
    """Runs requests through the steps; built by `app.Gateway` once its parts have started."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock,
        router: Router,
        verifier: Verifier,
        revocations: RevocationList,
        store: Store,
        forwarder: Forwarder,
        websockets: WebSockets,
        deadlines: Deadlines,
        traffic: Traffic,
        access_log: AccessLog,
    ) -> None:
        self.config = config
        self.clock = clock
        self.router = router
        self.verifier = verifier
        self.revocations = revocations
        self.store = store
        self.forwarder = forwarder
        self.websockets = websockets
        self.deadlines = deadlines
        self.traffic = traffic
        self.access_log = access_log
        self.recent = policy.RecentActivity()
        self._policy = config.policy
        self._on_error = config.store.on_error
        self._grace = self._on_error == "grace"  # remembers recent activity for outages
        # store.coalesce: a request inside its token's window is answered without a coroutine.
        self._decided_locally = (
            store.decided_locally if isinstance(store, CoalescingStore) else None
        )
        # (the Authorization value's last _TAIL characters, id of the route) -> what the steps
        # before the store decided for that value (`_Admitted.presented`, compared in full).
        self._admitted: BoundedCache[tuple[str, int], _Admitted] = BoundedCache(
            entries=ADMITTED, chars=CACHED_CHARS
        )
        self._idle_reason = policy.idle_reason(self._policy)
        # Through an outage every request falls back: one line per 10 s, not one per request
        # (each is counted in STORE_FALLBACKS and, with its jti, in the access log).
        self._fallback_log = RateLimitedLog(log, interval=10.0)
        # A bug a client can reach would otherwise be a traceback per request it sends.
        self._failure_log = RateLimitedLog(log, interval=1.0)
        self._strip_authorization = config.forward.strip_authorization
        self._timed_upstream = access_log.enabled  # upstream_ms: a field of the access log
        self._idle_gap = metrics.batched(metrics.TOKEN_IDLE_GAP)
        self._requests: dict[tuple[str, str, str], Any] = {}
        self._durations: dict[str, Any] = {}
        self._forward_auth_requests: dict[tuple[str, str, str], Any] = {}
        # Request ids: a random per-process prefix and a counter; unique without a syscall.
        self._id_prefix = uuid.uuid4().hex[:16]
        self._id_counter = itertools.count(1 << 32)
        forward_auth = config.forward_auth
        self._forward_auth_on_proxy_port = forward_auth.enabled
        self._envoy_path_prefix = forward_auth.envoy_path_prefix
        self._trusted_proxies = TrustedPeers(forward_auth)
        self._good_hosts: set[str] = set()  # Host values found well-formed (`_check_head`)

    # -- front doors -----------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The proxy port: decide, then forward (or relay the WebSocket, or answer locally)."""
        path, _, query = request.raw_path.partition("?")
        if self._forward_auth_on_proxy_port and self._is_forward_auth_path(path):
            return await self.handle_forward_auth(request)
        started = time.perf_counter()
        headers = request.headers
        request_id = self._request_id(headers)
        record = _RequestRecord()
        traffic = self.traffic
        traffic.in_flight += 1
        try:
            # From the head alone, before the token is even looked at: never activity.
            if request.method in NOT_FORWARDED_METHODS:
                raise Refusal(Reason.METHOD_NOT_ALLOWED)
            # The rest of what the head alone refuses (`_check_head`), its common case here:
            # HTTP/1.1 (aiohttp's C parser hands over HttpVersion11 itself), a Host seen
            # well-formed before, no method override.
            host, good_hosts = request.host, self._good_hosts
            if (
                request.version is not HttpVersion11
                or host not in good_hosts
                or not headers.keys().isdisjoint(METHOD_OVERRIDES)  # case-insensitively
            ):
                _check_head(request, headers, host)
                if len(good_hosts) >= _GOOD_HOSTS:
                    good_hosts.clear()
                good_hosts.add(host)
            if path == SESSION_PATH:  # the built-in route, answered here
                record.route = SESSION_PATH
                response: web.StreamResponse = await self._session_status(request, query, record)
            else:
                match = self.router.match(path)
                route = match.route
                record.route = match.label
                # Refusals the head alone decides come before the store touches activity.
                if route.upstream is None:
                    raise Refusal(Reason.NO_ROUTE, "this route is decided for forward-auth only")
                upgrade = hdrs.UPGRADE in headers and _upgrade(route, headers)
                if upgrade:
                    check_handshake(request)
                    record.websocket = True
                if hdrs.CONTENT_LENGTH in headers or hdrs.TRANSFER_ENCODING in headers:
                    self.forwarder.check_request(request)
                identity = await self.decide(route, query, headers, record)
                upstream_headers = self.forwarder.upstream_headers(
                    request,
                    request_id,
                    identity,
                    strip_authorization=self._strip_authorization and route.auth == "required",
                )
                if self._strip_authorization and route.auth != "required":
                    # A public route's upstream may take other credentials (Basic, for its
                    # own login); a bearer token, which SPAs attach everywhere, never.
                    _strip_bearer(upstream_headers.client)
                if upgrade or route.stream_deadline:
                    record.relayed = True
                    forwarding = self._relay(
                        request, match, query, upstream_headers, request_id, record
                    )
                else:
                    forwarding = self.forwarder.forward(
                        request, match, query, upstream_headers, request_id
                    )
                if self._timed_upstream:  # upstream_ms, for the access log
                    forwarded = time.perf_counter()
                    try:
                        response = await forwarding
                    finally:
                        record.upstream_ms = (time.perf_counter() - forwarded) * 1000
                else:  # awaited here: no coroutine level in between
                    response = await forwarding
        except Refusal as refusal:
            response = _refused(refusal, request_id, record)
            if hdrs.EXPECT in headers:
                # Refused before (or while) the client was asked for its body: what it sends
                # next may be that body or its next request, and nothing can tell which.
                response.force_close()
        except Exception:
            self._failure_log.exception("request %s failed", request_id)
            response = _refused(Refusal(Reason.INTERNAL_ERROR), request_id, record)
        except asyncio.CancelledError:
            # Cut off (shutdown_grace over, its handler cancelled): counted and logged still.
            self._finish(request.method, request_id, record, _cut_off(record), started, "proxy")
            raise
        finally:
            traffic.in_flight -= 1
            if traffic.draining:
                traffic.leave_drained()
        self._finish(request.method, request_id, record, response, started, "proxy")
        return response

    async def handle_forward_auth(self, request: web.BaseRequest) -> web.StreamResponse:
        """An edge proxy asks whether to forward a request: 200 with the identity headers (for
        it to copy upstream) if the proxy port would forward it, else the same refusal."""
        started = time.perf_counter()
        request_id = self._request_id(request.headers)
        record = _RequestRecord()
        method = request.method
        traffic = self.traffic
        traffic.in_flight += 1
        try:
            if request.remote not in self._trusted_proxies:
                raise Refusal(
                    Reason.UNTRUSTED_PROXY,
                    "this peer is not in forward_auth.trusted_proxies",
                )
            raw_path, _, query = request.raw_path.partition("?")
            try:
                original = original_request(
                    request.method, raw_path, query, request.headers, self._envoy_path_prefix
                )
            except Refusal:  # logged with the method the edge named, not its subrequest's
                method = named_method(request.headers, method)
                raise
            method = original.method
            _check_overrides(request.headers, twins=True)
            match = self.router.match(original.path)
            record.route = match.label
            if match.route.auth == "required" and is_form(request):
                # The edge never sends the body: a second token in it (RFC 6750 §2.2), which
                # the upstream might use instead of the one decided on, cannot be looked for.
                raise Refusal(Reason.MALFORMED_REQUEST, _FORM_UNSEEN)
            # Whatever Upgrade the edge shows us, it forwards as it is: only a WebSocket
            # handshake on a websocket route is decided (Traefik and ingress-nginx show none:
            # there the edge's config decides which requests may upgrade).
            if hdrs.UPGRADE in request.headers:
                _forward_auth_upgrade(match.route, method, request)
            identity = await self.decide(match.route, original.query, request.headers, record)
            # A cache between the edge and us must not keep a yes: the next request's is
            # decided again (idle timeout, revocation).
            response: web.StreamResponse = web.Response(
                headers={**identity, X_REQUEST_ID: request_id, hdrs.CACHE_CONTROL: "no-store"}
            )
        except Refusal as refusal:
            response = _refused(refusal, request_id, record)
            # nginx's auth_request drops the body: the reason code, for its error_page recipe.
            response.headers[REASON_HEADER] = refusal.reason.code
        except Exception:
            self._failure_log.exception("forward-auth request %s failed", request_id)
            response = _refused(Refusal(Reason.INTERNAL_ERROR), request_id, record)
            response.headers[REASON_HEADER] = Reason.INTERNAL_ERROR.code
        except asyncio.CancelledError:
            self._finish(method, request_id, record, _cut_off(record), started, "forward_auth")
            raise
        finally:
            traffic.leave()
        self._finish(method, request_id, record, response, started, "forward_auth")
        return response

    def refuse_unparsed(self, request: web.BaseRequest, *, mode: str) -> web.StreamResponse:
        """A request the HTTP parser refused (`connections.GuardedRequestHandler`): the
        contract's refusal, `malformed_http`, counted and logged like any other. Nothing of the
        parser's complaint goes into it: that quotes the bytes it refused, a token among them."""
        started = time.perf_counter()
        request_id = self._id_prefix + hex(next(self._id_counter))[2:]  # the head is unread
        record = _RequestRecord()
        response = _refused(Refusal(Reason.MALFORMED_HTTP), request_id, record)
        if mode == "forward_auth":
            response.headers[REASON_HEADER] = Reason.MALFORMED_HTTP.code
        self._finish("-", request_id, record, response, started, mode)
        return response

    # -- the steps -------------------------------------------------------------------------

    async def decide(
        self,
        route: Route,
        query_string: str,
        headers: CIMultiDictProxy[str],
        record: _RequestRecord,
    ) -> Mapping[str, str]:
        """The decision on a request already routed, the same for every front door: bearer
        token -> signature and claims -> revocation, session age -> scopes, roles -> one store
        round trip (idle check and touch, or the on_error fallback). Returns the identity
        headers to pass on; raises Refusal. The token, once verified, is in `record.token`
        (for the log) whatever is decided after."""
        if route.auth != "required":
            return _NO_IDENTITY
        if not self.revocations.loaded:
            # Started while the store was down: every token would pass the revocation check,
            # whatever store.on_error says (that is about the idle check). Refused until read.
            raise Refusal(Reason.STORE_UNAVAILABLE, _LIST_UNREAD, retry_after=1)
        now = self.clock.now()  # one reading for the whole decision
        # The Authorization value as sent is the key of what was decided before: a request
        # that repeats one parses nothing and re-checks only what time or revocation changes.
        presented = credential(headers, query_string)
        admitted = (
            None if presented is None else self._admitted.get((presented[-_TAIL:], id(route)))
        )
        if admitted is not None and admitted.presented == presented and admitted.holds(now):
            token = record.token = admitted.token
            if self.revocations.is_revoked(token):
                raise Refusal(Reason.REVOKED)
            touch = admitted.touch
            touch.now = now
            idle_timeout, extend = touch.idle_timeout, touch.extend
        else:
            token, touch = await self._admit(route, query_string, headers, presented, record)
            now, idle_timeout, extend = touch.now, touch.idle_timeout, touch.extend
        local = self._decided_locally
        last = None if local is None else local(touch)  # decided inside the window: not idle
        if last is None:
            try:
                result = await self.store.check_and_touch(touch)
            except StoreUnavailable:
                record.last_activity = self._store_fallback(token, idle_timeout, now, record)
                return token.identity
            # The store's answer: refuse an idle token, else count how close it came.
            if result.idle:
                raise Refusal(self._idle_reason)
            last = result.last_activity
        record.last_activity = last
        self._idle_gap.observe(now - last if now > last else 0.0)
        if extend and self._grace:
            self.recent.record(token.track_key, now)
        return token.identity

    async def _admit(
        self,
        route: Route,
        query_string: str,
        headers: CIMultiDictProxy[str],
        presented: str | None,
        record: _RequestRecord,
    ) -> tuple[VerifiedToken, Touch]:
        """The steps before the store, each in full: bearer token -> signature and claims ->
        revocation, session age -> scopes, roles. Their outcome is kept for `presented` (the
        Authorization value) on this route, for the requests that repeat it."""
        verifier = self.verifier
        now = self.clock.now()
        token = None if presented is None else verifier.cached(presented, now)
        if token is None:
            token = await verifier.verify(
                check_token68(presented_token(headers, query_string)), credential=presented
            )
            now = self.clock.now()  # after a key fetch, maybe
        record.token = token
        if self.revocations.is_revoked(token):
            raise Refusal(Reason.REVOKED)
        if self._policy.max_session_age is not None:
            policy.check_session_age(token, self._policy, now)
        if route.scopes:
            policy.check_scopes(route.scopes, token.scopes)
        if route.roles:
            policy.check_roles(route.roles, token.roles)
        idle_timeout = policy.idle_timeout_for(self._policy, route)
        touch = policy.touch_for(
            token, self._policy, idle_timeout, now, extend=route.activity == "extend"
        )
        if presented is not None and canonical(presented):
            self._admitted.put(
                (presented[-_TAIL:], id(route)),
                _Admitted(presented, token, touch, self.verifier.ring_of(token), self._policy),
                len(presented),
            )
        return token, touch

    def _store_fallback(
        self, token: VerifiedToken, idle_timeout: float, now: float, record: _RequestRecord
    ) -> float:
        """The store did not answer: `policy.on_store_failure` decides; logged and counted."""
        mode = self._on_error
        seen = self.recent.last(token.track_key) if mode == "grace" else None
        last_activity = policy.on_store_failure(mode, seen, now, idle_timeout)
        if mode == "allow":
            self._fallback_log.warning(
                "store unavailable: forwarding jti=%s without idle check", quoted(token.jti)
            )
        else:
            self._fallback_log.warning(
                "store unavailable: jti=%s allowed on local activity", quoted(token.jti)
            )
        metrics.STORE_FALLBACKS.labels(mode).inc()
        record.reason = Reason.STORE_UNAVAILABLE.code
        return last_activity

    def _relay(
        self,
        request: web.BaseRequest,
        match: Match,
        query: str,
        headers: UpstreamHeaders,
        request_id: str,
        record: _RequestRecord,
    ) -> Awaitable[web.StreamResponse]:
        """The forwarding step for what outlives a plain response (`handle` awaits it): the
        WebSocket relay (`record.websocket`), or a forward cut at the token's deadlines."""
        route = match.route
        token = record.token
        forwarding: Awaitable[web.StreamResponse]
        if record.websocket:
            assert route.upstream is not None, "handle refuses routes without an upstream"
            forwarding = self.websockets.relay(
                request,
                route.upstream + match.upstream_path + ("?" + query if query else ""),
                headers,
                match.label,
                token,
                policy.idle_timeout_for(self._policy, route),
                extend=route.activity == "extend",
            )
        else:
            forwarding = self.forwarder.forward(request, match, query, headers, request_id)
            if route.stream_deadline and token is not None:
                forwarding = self.deadlines.stream(request, token, match.label, forwarding)
        return forwarding

    async def _session_status(
        self, request: web.BaseRequest, query: str, record: _RequestRecord
    ) -> web.StreamResponse:
        """The built-in route's responder: remaining idle time etc. for the presented token,
        decided like any request on a passive route (so never counted as activity)."""
        if request.method not in ("GET", "HEAD"):
            raise Refusal(
                Reason.METHOD_NOT_ALLOWED,
                "the session endpoint answers GET and HEAD only",
                allow="GET, HEAD",
            )
        await self.decide(SESSION_ROUTE, query, request.headers, record)
        token, last_activity = record.token, record.last_activity
        assert token is not None and last_activity is not None, "decide sets both"
        now = self.clock.now()
        started_at = token.auth_time if token.auth_time is not None else token.iat
        idle_timeout = policy.idle_timeout_for(self._policy, SESSION_ROUTE)
        body = {
            "idle_remaining_seconds": round(
                policy.idle_remaining(last_activity, now, idle_timeout), 3
            ),
            "expires_in_seconds": round(token.exp - now, 3),
            "session_age_seconds": round(now - started_at, 3),
        }
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    # -- bookkeeping -----------------------------------------------------------------------

    def _is_forward_auth_path(self, raw_path: str) -> bool:
        prefix = self._envoy_path_prefix
        return raw_path == AUTH_PATH or (
            prefix is not None and (raw_path == prefix or raw_path.startswith(prefix + "/"))
        )

    def _request_id(self, headers: CIMultiDictProxy[str]) -> str:
        sent_id = headers.get(X_REQUEST_ID)
        if sent_id and _SANE_REQUEST_ID.fullmatch(sent_id):
            return sent_id
        # hex(): no format spec to interpret; the counter starts at 2**32, so ids are of one
        # length (25 characters) for the first four billion.
        return self._id_prefix + hex(next(self._id_counter))[2:]

    def _finish(
        self,
        method: str,
        request_id: str,
        record: _RequestRecord,
        response: web.StreamResponse,
        started: float,
        mode: str,
    ) -> None:
        """Count the request (and, for forward-auth, in its own counter) and log it."""
        elapsed = time.perf_counter() - started
        if record.websocket and response.status == 101:  # relayed, now closed: the handshake's
            elapsed = response.get(HANDSHAKE_SECONDS, elapsed)
        key = (record.route, record.decision, record.reason)
        found = self._requests.get(key)
        if found is None:
            found = self._requests[key] = self._request_metrics(key)
        count, histogram = found
        count()
        histogram.observe(elapsed)
        if mode == "forward_auth":
            counter = self._forward_auth_requests.get(key)
            if counter is None:
                counter = self._forward_auth_requests[key] = metrics.turn_counter(
                    metrics.FORWARD_AUTH_REQUESTS.labels(*key)
                )
            counter.inc()
        if self.access_log.enabled:
            logged = record.token
            self.access_log.write(  # by position: `write`'s order
                request_id,
                method,
                record.route,
                response.status,
                record.decision,
                record.reason,
                logged.jti if logged else None,
                logged.sub if logged else None,
                record.upstream_ms,
                elapsed * 1000,
                mode,
                response.get(LOG_FIELDS) if record.relayed else None,
            )

    def _request_metrics(self, key: tuple[str, str, str]) -> tuple[Any, Any]:
        """The requests counter's `inc` and the (batched) duration histogram for requests
        ending as `key` (route, decision, reason): one lookup per request for both. Not the
        histogram's `observe`: a flush rebinds it."""
        histogram = self._durations.get(key[0])
        if histogram is None:
            histogram = self._durations[key[0]] = metrics.batched(
                metrics.REQUEST_DURATION.labels(key[0])
            )
        return metrics.turn_counter(metrics.REQUESTS.labels(*key)).inc, histogram


_HTTP_1 = frozenset({HttpVersion10, HttpVersion11})
# RFC 9110 §7.2: uri-host [ ":" port ]; a reg-name (letters, digits, `-`, `.`, `_`, `~`), an
# IPv4 address or an IPv6 one in brackets. No userinfo, no spaces, no path.
_HOST = re.compile(
    r"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9._~-]+)?\])(?::[0-9]{1,5})?"
)  # (an IPv6 address may carry its zone: aiohttp's own for an HTTP/1.0 request without Host)
_GOOD_HOSTS = 1024  # Host values remembered as checked; the set is emptied when full
# RFC 1035's 253 characters of a name, and a port: a longer Host names no host, and the
# values a client chooses are kept (here, and in the forwarded fields rendered by Host).
_MAX_HOST = 253 + len(":65535")


def _check_head(request: web.BaseRequest, headers: CIMultiDictProxy[str], host: str) -> None:
    """`Pipeline.handle`'s head checks past its common case (written out there): an HTTP
    version other than 1.0 and 1.1 (aiohttp's parser passes `HTTP/2.0` and HTTP/0.9), a Host
    that is no host (the upstream builds URLs from X-Forwarded-Host), a method override to a
    method never forwarded."""
    if request.version not in _HTTP_1:
        raise Refusal(Reason.MALFORMED_HTTP, "only HTTP/1.0 and HTTP/1.1 are served")
    if host and (len(host) > _MAX_HOST or not _HOST.fullmatch(host)):  # none: HTTP/1.0
        raise Refusal(Reason.MALFORMED_HTTP, "the Host header is not a host")
    _check_overrides(headers)


def _check_overrides(headers: CIMultiDictProxy[str], *, twins: bool = False) -> None:
    """A method override naming TRACE, TRACK or CONNECT is refused like that method: an
    upstream that honours it would echo Authorization and the identity headers back. In any
    item of a list value (Express's method-override takes the first, others the last). With
    `twins`, also under the `_` spellings an upstream reads as the names (WSGI, CGI, nginx with
    `underscores_in_headers`): forward-auth's, whose request goes on as the edge has it. The
    proxy port drops those instead (`headers.RequestHeaders`), whatever they name."""
    for name, value in headers.items():
        spelled = name.lower()
        if twins:
            spelled = spelled.replace("_", "-")
        if spelled in OVERRIDE_NAMES and any(
            item.strip(" \t").upper() in NOT_FORWARDED_METHODS for item in value.split(",")
        ):
            raise Refusal(Reason.METHOD_NOT_ALLOWED, f"{name} names a method never forwarded")


def _strip_bearer(headers: CIMultiDict[str]) -> None:
    values = headers.getall(hdrs.AUTHORIZATION, ())
    if any(value.lstrip(" ").lower().startswith("bearer") for value in values):
        headers.popall(hdrs.AUTHORIZATION)


def _upgrade(route: Route, headers: CIMultiDictProxy[str]) -> bool:
    """Whether a request that has an Upgrade header (the callers check that much, the common
    case being none) is a WebSocket handshake; refused on a route without websocket."""
    upgrade = wants_websocket(headers)
    if upgrade and not route.websocket:
        raise Refusal(Reason.WEBSOCKET_NOT_ENABLED)
    return upgrade


def _forward_auth_upgrade(route: Route, method: str, request: web.BaseRequest) -> None:
    """Forward-auth's check of a request with an Upgrade header. The proxy port drops an
    Upgrade it does not relay (h2c, anything but WebSocket); an edge forwards it as it is, and
    an upstream that switches protocols gives the client a tunnel to any of its paths, past
    every later decision. So only a WebSocket handshake on a websocket route, and a valid one
    (`check_handshake`, on the original method), is decided; any other Upgrade is refused."""
    if not _upgrade(route, request.headers):
        raise Refusal(Reason.MALFORMED_REQUEST, _FOREIGN_UPGRADE)
    check_handshake(request, method)


def _cut_off(record: _RequestRecord) -> web.StreamResponse:
    """What the count and the access log take for a request whose handler was cancelled: the
    `shutdown` refusal (never sent: the connection is cut). What a relayed WebSocket or stream
    had logged so far is not known here."""
    record.decision, record.reason, record.relayed = "error", Reason.SHUTDOWN.code, False
    return web.Response(status=Reason.SHUTDOWN.status)


def _refused(refusal: Refusal, request_id: str, record: _RequestRecord) -> web.Response:
    """The refusal recorded (decision and reason, for metrics and the log) and rendered."""
    record.decision, record.reason = refusal.reason.decision, refusal.reason.code
    return render_refusal(refusal, request_id)
