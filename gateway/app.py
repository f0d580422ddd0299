"""Wires config, keys, store, policy and forwarding into the proxy app and the admin app.

The request's way itself is `gateway/pipeline.py`; this module builds its parts, starts and
closes them (one `AsyncExitStack`: what started is closed, in reverse order, whatever failed),
answers readiness, and hands the pipeline's front doors to the listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web

from gateway import admin, metrics
from gateway.accesslog import AccessLog
from gateway.clock import Clock, SystemClock
from gateway.config import Config
from gateway.connections import GuardedServer
from gateway.forward.deadlines import Deadlines
from gateway.forward.proxy import Forwarder
from gateway.forward.websocket import WebSockets
from gateway.pipeline import Pipeline, Traffic
from gateway.revocation import RevocationList
from gateway.routing import Router
from gateway.store.base import Store, StoreUnavailable
from gateway.store.coalesce import coalescing
from gateway.store.factory import StoreConfigError, hasher_from_config, open_store
from gateway.tokens.keys import KeyRing
from gateway.tokens.verify import Verifier


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
        self.forwarder = Forwarder(config.forward, body_timeout=config.server.body_timeout)
        self.hasher = hasher_from_config(config.store, environ)
        # store.coalesce > 0: wrapped to decide recently accepted tokens locally.
        # Readiness asks the store itself (which of a Cluster's shards answer), not the wrapper.
        self._backend: Store = open_store(config.store)
        self.store: Store = coalescing(self._backend, config.store, self.clock)
        self.revocations = RevocationList(self.store, self.clock, config.store.revocation_poll)
        self.deadlines = Deadlines(self.clock, self.revocations, config.policy)
        self.websockets = WebSockets(config, self.store, self.clock, self.deadlines)
        self.rings: dict[str, KeyRing] = {}
        self.access_log = access_log or AccessLog(enabled=config.server.access_log)
        self.traffic = Traffic()
        self._pipeline: Pipeline | None = None
        # Closed in reverse order by `close`; the store and forwarder exist from here on.
        self._closing = contextlib.AsyncExitStack()
        self._closing.callback(self.access_log.flush)  # the last lines, after everything else
        self._closing.push_async_callback(self.store.close)
        self._closing.push_async_callback(self.forwarder.close)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        closing = self._closing
        key_http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10), raise_for_status=False
        )
        closing.push_async_callback(key_http.close)
        for provider in self.config.providers:
            ring = KeyRing(provider, key_http, self._environ, clock=self.clock)
            self.rings[provider.name] = ring
            closing.push_async_callback(ring.close)
            await ring.start()
        verifier = Verifier(self.config, self.rings, self.hasher, self.clock)
        await self.forwarder.start()
        await self._refuse_an_evicting_store()
        closing.push_async_callback(self.revocations.close)
        await self.revocations.start()
        closing.push_async_callback(self.deadlines.close)
        self.deadlines.start()
        closing.push_async_callback(self.websockets.close)
        await self.websockets.start()
        self._pipeline = Pipeline(
            self.config,
            clock=self.clock,
            router=self.router,
            verifier=verifier,
            revocations=self.revocations,
            store=self.store,
            forwarder=self.forwarder,
            websockets=self.websockets,
            deadlines=self.deadlines,
            traffic=self.traffic,
            access_log=self.access_log,
        )
        publisher = asyncio.create_task(
            self._publish_metrics_every_second(), name="metrics-publisher"
        )
        closing.push_async_callback(self._stop_publishing, publisher)

    @property
    def pipeline(self) -> Pipeline:
        """The request pipeline; it exists once `start` has built the verifier."""
        if self._pipeline is None:
            raise RuntimeError("Gateway.start() was not awaited")
        return self._pipeline

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
        with contextlib.suppress(StoreUnavailable):
            await self._backend.ping()  # opens the request path's connection before requests

    def publish_metrics(self) -> None:
        """What the request path keeps outside Prometheus (its locked updates are dearer than
        a plain counter; bench/RESULTS.md): the in-flight gauge, from the plain counter, and
        the batched histograms. On each scrape this process serves, every second for the
        other workers' scrapes with --workers, and at shutdown."""
        metrics.IN_FLIGHT.set(self.traffic.in_flight)
        metrics.flush()

    async def _publish_metrics_every_second(self) -> None:
        while True:
            self.publish_metrics()
            await asyncio.sleep(1.0)

    async def _stop_publishing(self, publisher: asyncio.Task[None]) -> None:
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher
        self.publish_metrics()  # the last batch, before the process goes

    async def close(self) -> None:
        """Close what `__init__` and `start` opened, the last first (also after a failed start)."""
        await self._closing.aclose()

    # -- drain -----------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.traffic.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.traffic.draining = value

    @property
    def in_flight(self) -> int:
        """Requests inside the pipeline now (a relayed WebSocket counts until it closes)."""
        return self.traffic.in_flight

    def start_drain(self) -> None:
        """Readiness off; WebSockets are told to close within `shutdown_grace`."""
        self.traffic.draining = True
        self.websockets.start_drain(self.config.server.shutdown_grace)

    async def wait_quiet(self) -> int:
        """Wait up to `shutdown_grace` for the requests in flight; returns how many are left."""
        if self.traffic.in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.server.shutdown_grace):
                    await self.traffic.quiet.wait()
        return self.traffic.in_flight

    async def readiness(self) -> tuple[str, str]:
        """(status, why). "ready": not draining, every provider has keys, the store answers
        (a write to it succeeds) and the revocation list is read. "degraded" (still 200:
        taking every pod out of the Service would refuse every token, not only some): a Redis
        Cluster shard is lost (its tokens get store.on_error), the revocation list's shard
        does not answer (the list last read is served), or no sentinel answers (the master
        last verified is served; a failover would not be followed). "not_ready" otherwise."""
        if self.traffic.draining:
            return "not_ready", "draining"
        missing = [
            f"{name} ({ring.last_error or 'not loaded yet'})"
            for name, ring in self.rings.items()
            if not ring.ready
        ]
        if missing or not self.rings:
            return "not_ready", "no usable keys for provider(s): " + "; ".join(missing)
        try:
            degraded = await self._backend.ping()
            # The policy may have been changed since start (CONFIG SET, a failover).
            eviction = await self.store.eviction_problem()
        except StoreUnavailable as exc:
            # Why, in the store's words (a Redis that answers but refuses writes, no master
            # the sentinels know, no slot served): the operator's first question.
            return "not_ready", f"the store does not answer or refuses writes: {exc}"
        if eviction is not None:
            return "not_ready", eviction
        revocations = self.revocations
        if not revocations.loaded:
            return "not_ready", "the revocation list was never read from the store"
        problems = [degraded] if degraded else []
        # Keys held, but a source fails (one tenant of several, or a refresh): served, said.
        problems += [
            f"provider {name}: {ring.last_error}"
            for name, ring in self.rings.items()
            if ring.last_error is not None
        ]
        if revocations.failing_since is not None:
            problems.append(
                "the revocation list does not answer: serving the list read "
                f"{self.clock.now() - revocations.failing_since:.0f} s ago "
                "(new revocations are refused with 503 until it answers)"
            )
        if problems:
            return "degraded", "; ".join(problems)
        return "ready", "ready"


def _client_limits(config: Config) -> dict[str, float]:
    return {
        "header_timeout": config.server.header_timeout,
        "keepalive_timeout": config.server.keepalive_timeout,
    }


def build_proxy_server(gateway: Gateway, **handler_options: Any) -> web.Server:
    """The proxy port: aiohttp's low-level server calling `Pipeline.handle` directly (no router,
    middleware or signals on the request path: the pipeline routes itself), with the slow-client
    limits of `server.*`; a request its parser refuses is the pipeline's to answer too."""
    pipeline = gateway.pipeline
    return GuardedServer(
        pipeline.handle,
        on_unparsed=functools.partial(pipeline.refuse_unparsed, mode="proxy"),
        **_client_limits(gateway.config),
        **handler_options,
    )


def build_forward_auth_server(gateway: Gateway, **handler_options: Any) -> web.Server:
    """forward_auth.listen: every request on it is a forward-auth request, whatever its path
    (Traefik's `address`, Envoy's `path_prefix` and nginx's `auth_request` all pick their own)."""
    pipeline = gateway.pipeline
    return GuardedServer(
        pipeline.handle_forward_auth,
        on_unparsed=functools.partial(pipeline.refuse_unparsed, mode="forward_auth"),
        **_client_limits(gateway.config),
        **handler_options,
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
