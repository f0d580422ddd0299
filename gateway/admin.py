"""The admin port: metrics, health, readiness and the revocation API. Never on the proxy port."""

from __future__ import annotations

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
from gateway.revocation import RevocationList
from gateway.store.base import KeyHasher, Revocation, RevocationKind, Store, StoreUnavailable

log = logging.getLogger("idlegate.admin")

Readiness = Callable[[], Awaitable[tuple[bool, str]]]
# Optional members of a revocation naming whose id it is (a token is its issuer and its id).
_SCOPING = ("issuer", "provider")


def _registry() -> CollectorRegistry:
    """With several workers, aggregate every worker's samples (prometheus multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


def _read_token(path: Path) -> bytes | None:
    try:
        token = path.read_bytes().strip()
    except OSError:
        log.error("admin.token_file %s cannot be read: admin API refuses every request", path)
        return None
    return token or None


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
        before_scrape: Callable[[], None] | None = None,
    ) -> None:
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
        return app

    async def metrics(self, request: web.Request) -> web.Response:
        if self._before_scrape is not None:
            self._before_scrape()
        body = generate_latest(_registry())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, why = await self._readiness()
        return web.json_response(
            {"status": "ready" if ready else "not_ready", "reason": why},
            status=200 if ready else 503,
        )

    def _authorize(self, request: web.Request) -> None:
        """404 when no token file is configured; 401 unless the bearer matches in constant time."""
        token_file = self._config.admin.token_file
        if token_file is None:
            metrics.ADMIN_REQUESTS.labels("disabled").inc()
            raise web.HTTPNotFound()
        expected = _read_token(token_file)
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if (
            expected is None
            or scheme.lower() != "bearer"
            or not hmac.compare_digest(presented.strip().encode(), expected)
        ):
            metrics.ADMIN_REQUESTS.labels("unauthorized").inc()
            raise web.HTTPUnauthorized(
                text=json.dumps({"error": "unauthorized"}),
                content_type="application/json",
                headers={"WWW-Authenticate": 'Bearer realm="idlegate-admin"'},
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
            if not any(issuer == p.issuer for p in providers):
                raise self._bad_request("issuer is not the issuer of a configured provider")
            return [str(issuer)]
        if provider is not None:
            named = [p.issuer for p in providers if p.name == provider]
            if not named:
                raise self._bad_request("provider is not the name of a configured provider")
            return named
        everyone = [p.issuer for p in providers]
        if len(everyone) > 1 and not ambiguous_ok:
            raise self._bad_request(
                "several providers are configured and a jti is only unique per issuer: "
                "add ?issuer=<iss> or ?provider=<name>"
            )
        return everyone

    async def revoke(self, request: web.Request) -> web.Response:
        self._authorize(request)
        try:
            body = await request.json()
        except ValueError:
            raise self._bad_request("the body must be JSON") from None
        kinds: tuple[RevocationKind, ...] = ("jti", "sid", "sub")
        given = [k for k in kinds if isinstance(body, dict) and k in body]
        scoping = [k for k in _SCOPING if isinstance(body, dict) and k in body]
        if len(given) != 1 or len(body) != 1 + len(scoping):
            raise self._bad_request(
                'send exactly one of {"jti"}, {"sid"} or {"sub"}, '
                'optionally with "issuer" or "provider"'
            )
        kind = given[0]
        value = body[kind]
        if not isinstance(value, str) or not value or len(value) > 1024:
            raise self._bad_request(f"{kind} must be a non-empty string")
        # Neither issuer nor provider named: the id is revoked at every trusted issuer (the
        # safe reading of an ambiguous revocation).
        issuers = self._issuers(body.get("issuer"), body.get("provider"), ambiguous_ok=True)
        now = self._clock.now()
        policy = self._config.policy
        # No token covered can outlive this: exp <= iat + max_token_lifetime, iat <= now + leeway,
        # and exp itself is honoured with leeway.
        horizon = now + policy.max_token_lifetime + 2 * policy.leeway
        if kind == "sid":
            horizon = max(horizon, now + policy.session_retention)
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
        log.warning("revoked %s at %d issuer(s) (until %.0f)", kind, len(issuers), horizon)
        return web.Response(status=204)

    async def token(self, request: web.Request) -> web.Response:
        self._authorize(request)
        jti = request.match_info["jti"]
        query = request.query
        (issuer,) = self._issuers(query.get("issuer"), query.get("provider"), ambiguous_ok=False)
        key = self._hasher.of_token("jti", issuer, jti)
        policy = self._config.policy
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
                    None if last is None else max(0.0, policy.idle_timeout - (now - last))
                ),
                "revoked": self._revocations.is_key_revoked("jti", key),
            }
        )
