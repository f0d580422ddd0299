"""The revocation list every instance holds in memory, kept in step with the shared store.

Revocations are few and checked on every request, so each instance keeps them all and polls
the store's version (one tiny round trip per `store.revocation_poll`, off the request path);
a revocation therefore takes effect everywhere within that interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway import metrics
from gateway.clock import Clock
from gateway.store.base import Revocation, RevocationKind, Store, StoreUnavailable
from gateway.tokens.verify import VerifiedToken

log = logging.getLogger("idlegate.revocation")


class RevocationList:
    def __init__(self, store: Store, clock: Clock, poll_interval: float) -> None:
        self._store = store
        self._clock = clock
        self._poll_interval = poll_interval
        self._entries: dict[tuple[RevocationKind, str], Revocation] = {}
        self._version = -1
        self._task: asyncio.Task[None] | None = None

    def _live(self, kind: RevocationKind, key: str | None) -> Revocation | None:
        entry = self._entries.get((kind, key)) if key is not None else None
        return entry if entry is not None and entry.until >= self._clock.now() else None

    def is_revoked(self, token: VerifiedToken) -> bool:
        if not self._entries:
            return False
        ids: tuple[tuple[RevocationKind, str | None], ...] = (
            ("jti", token.jti_key),
            ("sid", token.sid_key),
            ("sub", token.sub_key),
        )
        for kind, key in ids:
            entry = self._live(kind, key)
            if entry is None:
                continue
            # `issued_before` (revocation by sub): only tokens issued up to that moment.
            if entry.issued_before is None or token.iat <= entry.issued_before:
                return True
        return False

    def is_key_revoked(self, kind: RevocationKind, key: str) -> bool:
        return self._live(kind, key) is not None

    async def revoke(self, revocation: Revocation) -> None:
        await self._store.revoke(revocation, self._clock.now())
        await self.refresh()

    async def refresh(self) -> None:
        version, entries = await self._store.revocations(self._version)
        if entries is not None:
            now = self._clock.now()
            self._entries = {(e.kind, e.key): e for e in entries if e.until >= now}
            metrics.REVOCATIONS.set(len(self._entries))
        self._version = version

    async def start(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.refresh()
        self._task = asyncio.create_task(self._poll(), name="revocation-poll")

    async def _poll(self) -> None:
        failing = False  # an unexpected error is logged once, not every poll_interval
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                await self.refresh()
            except StoreUnavailable:
                pass  # the store logs its outage (one line as it starts, one as it ends)
            except Exception:
                if not failing:
                    log.exception("revocation list refresh failed; keeping the entries held")
                failing = True
            else:
                failing = False

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
