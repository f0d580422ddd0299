"""The admin port: metrics, health, readiness and the revocation API. Never on the proxy port."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway import metrics
from gateway.clock import Clock
from gateway.config import Config
from gateway.errors import StartupError
from gateway.logs import printable, quoted
from gateway.reasons import Refusal
from gateway.revocation import RevocationList
from gateway.store.base import KeyHasher, Revocation, RevocationKind, Store, StoreUnavailable
from gateway.tokens.extract import MAX_TOKEN_BYTES
from gateway.tokens.policy import idle_remaining, revocation_horizon
from gateway.tokens.verify import no_constant, no_duplicate_members, unverified_id

log = logging.getLogger("idlegate.admin")
# Who revoked what, from where, and who tried without the admin token. Kept at INFO whatever
# server.log_level says (serve.configure_logging).
audit = logging.getLogger("idlegate.audit")
_UNAUTHORIZED_LOG_INTERVAL = 10.0

# (status, why): "ready" and "degraded" answer 200 (the pod serves: a degraded one refuses
# only the tokens of a lost store shard), "not_ready" 503.
Readiness = Callable[[], Awaitable[tuple[str, str]]]
# Optional members of a revocation naming whose id it is (a token is its issuer and its id).
_SCOPING = ("issuer", "provider")
# The largest revocation body: {"token": ...} with a token of MAX_TOKEN_BYTES, and room to spare.
MAX_BODY = 4 * MAX_TOKEN_BYTES


def _api_method(path: str) -> str | None:
    """The one method of the admin API path `path`, if it is one (else None)."""
    if path == "/admin/revoke":
        return "POST"
    before, _, jti = path.partition("/admin/tokens/")
    return "GET" if not before and jti and "/" not in jti else None


def strict_json(data: bytes) -> object:
    """RFC 8259 JSON only (no NaN/Infinity, no duplicate member); ValueError otherwise, also
    for nesting too deep for the parser (a JSON bomb is a bad request, not a 500)."""
    try:
        return json.loads(data, object_pairs_hook=no_duplicate_members, parse_constant=no_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ValueError("not JSON") from None


def _registry() -> CollectorRegistry:
    """With several workers, aggregate every worker's samples (prometheus multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


class AdminTokenError(StartupError):
    """`admin.token_file` is set but yields no usable token. A start-up error: serving on would
    refuse every admin call, i.e. silently disable revocation. The message starts with the
    field path (`admin.token_file: ...`), as the CLI prints it."""


def load_admin_token(path: Path) -> bytes:
    """The admin bearer token in `path` (surrounding whitespace removed), or AdminTokenError.
    Offline and side-effect free: `check-config` and `serve` both call it."""
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise AdminTokenError(
            f"admin.token_file: cannot read {path}: {exc.strerror or exc}"
        ) from None
    if not token:
        raise AdminTokenError(f"admin.token_file: {path} is empty")
    if any(byte < 0x21 or byte == 0x7F for byte in token):
        # A bearer credential is one header token (RFC 6750 b64token): no client could send it.
        raise AdminTokenError(f"admin.token_file: {path} holds spaces or control characters")
    return token


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class AdminToken:
    """The token in `admin.token_file`: read at start (unusable -> AdminTokenError), then again
    whenever the file changes (inode, size or mtime: a rotated Kubernetes Secret swaps a
    symlink), so rotation needs no restart. A rotation to an unusable file keeps the last good
    token and logs why, once per change."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp = self._stat()
        self._digest = _digest(load_admin_token(path))

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def matches(self, presented: bytes) -> bool:
        """Constant time in the presented bytes (both sides hashed: no length leaks either)."""
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._digest = _digest(load_admin_token(self._path))
            except AdminTokenError as exc:
                log.error("%s; the previous admin token stays in use", exc)
            else:
                log.info("admin.token_file %s changed: the new admin token is in use", self._path)
        return hmac.compare_digest(_digest(presented), self._digest)


class _Throttled:
    """At most one log line per `interval` (by the injected clock); the next line says how
    many were left out. Unauthorized admin calls are logged, but a scanner cannot flood the log."""

    def __init__(self, logger: logging.Logger, clock: Clock, interval: float) -> None:
        self._log = logger
        self._clock = clock
        self._interval = interval
        self._next = float("-inf")
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = self._clock.now()
        if now < self._next:
            self._suppressed += 1
            return
        self._next = now + self._interval
        if self._suppressed:
            message += " (%d more since the last such line)"
            args = (*args, self._suppressed)
            self._suppressed = 0
        self._log.warning(message, *args)


def _iso(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AdminAPI:
    def __init__(
        self,
        *,
        readiness: Readiness,
        revocations: RevocationList,
        store: Store,
        hasher: KeyHasher,
        clock: Clock,
        config: Config,
        token: AdminToken | None = None,
        before_scrape: Callable[[], None] | None = None,
    ) -> None:
        self._token = token  # None: no admin.token_file, the admin API does not exist (404)
        self._unauthorized = _Throttled(audit, clock, _UNAUTHORIZED_LOG_INTERVAL)
        self._before_scrape = before_scrape  # gauges the request path does not keep up to date
        self._readiness = readiness
        self._revocations = revocations
        self._store = store
        self._hasher = hasher
        self._clock = clock
        self._config = config

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_post("/admin/revoke", self.revoke)
        app.router.add_get("/admin/tokens/{jti}", self.token)
        # Last, so it only gets what the two above do not: other methods, other paths.
        app.router.add_route("*", "/admin/{tail:.*}", self.unknown)
        return app

    async def unknown(self, request: web.Request) -> web.Response:
        """Anything else under /admin/: 404 without a token file and 401 without the admin
        token (as for the API's own paths: nothing tells a scanner which paths exist), then
        405 for another method on an API path, else 404."""
        self._authorize(request)
        metrics.ADMIN_REQUESTS.labels("bad_request").inc()
        method = _api_method(request.path)
        if method is not None:
            return web.json_response(
                {"error": "method_not_allowed"}, status=405, headers={"Allow": method}
            )
        return web.json_response({"error": "not_found"}, status=404)

    async def metrics(self, request: web.Request) -> web.Response:
        if self._before_scrape is not None:
            self._before_scrape()
        body = generate_latest(_registry())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        status, why = await self._readiness()
        return web.json_response(
            {"status": status, "reason": why}, status=503 if status == "not_ready" else 200
        )

    def _authorize(self, request: web.Request) -> None:
        """404 when no token file is configured; 401 unless exactly one `Authorization: Bearer`
        header carries the admin token (compared as the bytes sent, in constant time)."""
        if self._token is None:
            metrics.ADMIN_REQUESTS.labels("disabled").inc()
            raise web.HTTPNotFound(
                text=json.dumps({"error": "not_found"}), content_type="application/json"
            )
        fields = request.headers.getall("Authorization", [])
        scheme, _, presented = fields[0].partition(" ") if len(fields) == 1 else ("", "", "")
        # aiohttp decodes header bytes as UTF-8 with surrogateescape: this gives back exactly
        # the bytes on the wire, whatever they are (0xff included), never an encoding error.
        sent = presented.strip(" \t").encode("utf-8", "surrogateescape")
        if scheme.lower() == "bearer" and sent and self._token.matches(sent):
            return
        metrics.ADMIN_REQUESTS.labels("unauthorized").inc()
        why = (
            "no Authorization header"
            if not fields
            else "several Authorization headers"
            if len(fields) > 1
            else "not a bearer token"
            if scheme.lower() != "bearer"
            else "wrong admin token"
        )
        self._unauthorized.warning(
            "admin: unauthorized %s %s from %s: %s",
            printable(request.method),
            quoted(request.path),
            request.remote,
            why,
        )
        raise web.HTTPUnauthorized(
            text=json.dumps({"error": "unauthorized"}),
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="idlegate-admin"'},
        )

    async def _body(self, request: web.Request) -> bytes:
        """The request body, read only after authorization and only up to MAX_BODY."""
        declared = request.content_length
        body = bytearray()
        if declared is None or declared <= MAX_BODY:
            async for chunk in request.content.iter_chunked(MAX_BODY + 1):
                body += chunk
                if len(body) > MAX_BODY:
                    break
            else:
                return bytes(body)
        metrics.ADMIN_REQUESTS.labels("bad_request").inc()
        raise web.HTTPRequestEntityTooLarge(
            max_size=MAX_BODY,
            actual_size=declared or len(body),
            text=json.dumps({"error": "payload_too_large", "max_bytes": MAX_BODY}),
            content_type="application/json",
        )

    def _bad_request(self, message: str) -> web.HTTPBadRequest:
        metrics.ADMIN_REQUESTS.labels("bad_request").inc()
        return web.HTTPBadRequest(
            text=json.dumps({"error": "bad_request", "message": message}),
            content_type="application/json",
        )

    def _issuers(self, issuer: object, provider: object, *, ambiguous_ok: bool) -> list[str]:
        """The issuers an admin request is about: the one named, the named provider's, or
        (neither given) every provider's, which only `ambiguous_ok` callers accept when
        several are configured: a token view must name one token."""
        providers = self._config.providers
        if issuer is not None and provider is not None:
            raise self._bad_request('give "issuer" or "provider", not both')
        if issuer is not None:
            if not any(issuer in p.issuers for p in providers):
                raise self._bad_request("issuer is not the issuer of a configured provider")
            return [str(issuer)]
        if provider is not None:
            named = [i for p in providers if p.name == provider for i in p.issuers]
            if not named:
                raise self._bad_request("provider is not the name of a configured provider")
        else:
            named = [i for p in providers for i in p.issuers]
        if len(named) > 1 and not ambiguous_ok:
            raise self._bad_request(
                "several issuers are configured and a jti is only unique per issuer: "
                "add ?issuer=<iss>" + ("" if provider is not None else " or ?provider=<name>")
            )
        return named

    def _named_id(self, body: object) -> tuple[RevocationKind, str, list[str]]:
        """{"jti"|"sid"|"sub": id} with an optional "issuer" or "provider"."""
        kinds: tuple[RevocationKind, ...] = ("jti", "sid", "sub")
        if not isinstance(body, dict):
            raise self._bad_request("the body must be a JSON object")
        given = [k for k in kinds if k in body]
        scoping = [k for k in _SCOPING if k in body]
        if len(given) != 1 or len(body) != 1 + len(scoping):
            raise self._bad_request(
                'send exactly one of {"jti"}, {"sid"}, {"sub"} (optionally with "issuer" or '
                '"provider") or {"token"}'
            )
        kind = given[0]
        value = body[kind]
        if not isinstance(value, str) or not value or len(value) > 1024:
            raise self._bad_request(f"{kind} must be a non-empty string")
        # Neither issuer nor provider named: the id is revoked at every trusted issuer (the
        # safe reading of an ambiguous revocation).
        issuers = self._issuers(body.get("issuer"), body.get("provider"), ambiguous_ok=True)
        return kind, value, issuers

    def _token_itself(self, token: object) -> tuple[RevocationKind, str, list[str]]:
        """{"token": "<the JWT>"}: its issuer and id as the verifier finds them (policy.token_id,
        so also a token with no jti, by its digest). The token is never logged or echoed."""
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_BYTES:
            raise self._bad_request("token must be a JWT of at most 16 KiB")
        try:
            issuer, token_id = unverified_id(token, self._config.policy.token_id, self._hasher)
        except Refusal:
            raise self._bad_request("token is not a JWT with iss and an id claim") from None
        if not any(issuer in p.issuers for p in self._config.providers):
            raise self._bad_request("token's issuer is not the issuer of a configured provider")
        return "jti", token_id, [issuer]

    async def revoke(self, request: web.Request) -> web.Response:
        self._authorize(request)
        try:
            body = strict_json(await self._body(request))
        except ValueError:
            raise self._bad_request("the body must be JSON") from None
        if isinstance(body, dict) and set(body) == {"token"}:
            kind, value, issuers = self._token_itself(body["token"])
        else:
            kind, value, issuers = self._named_id(body)
        now = self._clock.now()
        policy = self._config.policy
        horizon = revocation_horizon(kind, now, policy)
        revocations = [
            Revocation(
                kind=kind,
                key=self._hasher.of_token(kind, issuer, value),
                # A token issued up to `leeway` in the future is accepted (issuer clock ahead
                # of ours): "every token issued up to now" must cover those too, or they escape.
                issued_before=now + policy.leeway if kind == "sub" else None,
                until=horizon,
            )
            for issuer in issuers
        ]
        try:
            for revocation in revocations:
                await self._revocations.revoke(revocation)
        except StoreUnavailable:
            raise web.HTTPServiceUnavailable(
                text=json.dumps({"error": "store_unavailable"}), content_type="application/json"
            ) from None
        metrics.ADMIN_REQUESTS.labels("ok").inc()
        # The value of a jti/sid/sub is no credential (quoted: no line breaks or other control
        # characters of the caller's reach the log); never the admin token.
        audit.info(
            "admin: revoked %s=%s of issuer(s) %s from %s at %s (refused until %s)",
            kind,
            quoted(value),
            json.dumps(issuers),
            request.remote,
            _iso(now),
            _iso(horizon),
        )
        return web.Response(status=204)

    async def token(self, request: web.Request) -> web.Response:
        self._authorize(request)
        jti = request.match_info["jti"]
        query = request.query
        (issuer,) = self._issuers(query.get("issuer"), query.get("provider"), ambiguous_ok=False)
        key = self._hasher.of_token("jti", issuer, jti)
        policy = self._config.policy
        # The store's list, not only the one this process last polled: with --workers the
        # revoke may have been answered by another worker a moment ago (read-your-write). The
        # store down: the list held answers, as it does for requests.
        with contextlib.suppress(StoreUnavailable):
            await self._revocations.refresh()
        try:
            last = await self._store.last_activity(key) if policy.track_by == "jti" else None
        except StoreUnavailable:
            raise web.HTTPServiceUnavailable(
                text=json.dumps({"error": "store_unavailable"}), content_type="application/json"
            ) from None
        now = self._clock.now()
        metrics.ADMIN_REQUESTS.labels("ok").inc()
        return web.json_response(
            {
                "jti": jti,
                "issuer": issuer,
                "tracked_by": policy.track_by,
                "last_activity": last,
                "idle_remaining_seconds": (
                    None
                    if last is None
                    else max(0.0, idle_remaining(last, now, policy.idle_timeout))
                ),
                "revoked": self._revocations.is_key_revoked("jti", key),
            }
        )
