"""The revocation list every instance holds in memory, kept in step with the shared store.

Revocations are few and checked on every request, so each instance keeps them all and polls
the store's version (one tiny round trip per `store.revocation_poll`, off the request path);
a revocation therefore takes effect everywhere within that interval.

The list only widens: what the store lists is merged into what this instance holds, never put
in its place, and an entry ends only by its own `until`. A store that lost entries (a Redis
restart without persistence, a failover to a replica that missed the write, a restored backup)
gets them written back by every instance that still holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway import metrics
from gateway.clock import Clock
from gateway.store.base import Revocation, RevocationKind, Store, StoreUnavailable
from gateway.tokens.claims import VerifiedToken

log = logging.getLogger("idlegate.revocation")

# Entries ending within this many seconds are kept but never written back (see refresh).
_WRITE_BACK_MARGIN = 30.0


class RevocationList:
    def __init__(self, store: Store, clock: Clock, poll_interval: float) -> None:
        self._store = store
        self._clock = clock
        self._poll_interval = poll_interval
        self._entries: dict[tuple[RevocationKind, str], Revocation] = {}
        self._version = -1
        self._task: asyncio.Task[None] | None = None
        self._store_lost = False  # logged once per incident
        # Readiness: whether the list was ever read from the store (without it, revoked tokens
        # would pass), and since when (clock.now()) reading it fails: meanwhile the list last
        # read is served, and complete, since a revocation the store refuses is refused (503).
        self.loaded = False
        self.failing_since: float | None = None

    def _live(self, kind: RevocationKind, key: str | None) -> Revocation | None:
        entry = self._entries.get((kind, key)) if key is not None else None
        return entry if entry is not None and entry.until >= self._clock.now() else None

    def is_revoked(self, token: VerifiedToken) -> bool:
        entries = self._entries
        # Asked on every request: with revocations held, a token none of them names (nearly
        # every one) is told apart by one C call.
        if not entries or entries.keys().isdisjoint(token.revocation_index):
            return False
        for kind, key in token.revocation_index:
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
        """Write to the store (StoreUnavailable if that fails), then hold it here at once."""
        acknowledged = await self._store.revoke(revocation, self._clock.now())
        self._hold(revocation)
        if acknowledged == 0:
            metrics.REVOCATIONS_UNREPLICATED.inc()
            log.warning(
                "revoked %s, but no replica acknowledged it in time: a failover now could lose "
                "it from Redis (the instances holding it would write it back)",
                revocation.kind,
            )
        # The write succeeded: a failed read of the list now is no failure of the revocation.
        with contextlib.suppress(StoreUnavailable):
            await self.refresh()

    def _hold(self, revocation: Revocation) -> None:
        index = (revocation.kind, revocation.key)
        held = self._entries.get(index)
        self._entries[index] = revocation if held is None else held.widened(revocation)
        metrics.REVOCATIONS.set(len(self._entries))

    async def refresh(self) -> None:
        try:
            version, entries = await self._store.revocations(self._version)
        except StoreUnavailable:
            if self.failing_since is None:
                self.failing_since = self._clock.now()
            raise
        self.loaded, self.failing_since = True, None
        if entries is not None:
            now = self._clock.now()
            listed = {(e.kind, e.key): e for e in entries if e.until >= now}
            held = {index: e for index, e in self._entries.items() if e.until >= now}
            # What we hold that the store lacks, or lists narrower. Entries about to end are not
            # counted: a peer whose clock runs ahead may have pruned them rightly.
            missing = [
                entry
                for index, entry in held.items()
                if entry.until > now + _WRITE_BACK_MARGIN
                and (index not in listed or listed[index].widened(entry) != listed[index])
            ]
            for index, entry in listed.items():
                held[index] = entry if index not in held else held[index].widened(entry)
            self._entries = held
            metrics.REVOCATIONS.set(len(held))
            if missing:
                await self._write_back(missing, now)
                return  # our writes changed the version: the next poll reads the list again
            self._store_lost = False
        self._version = version

    async def _write_back(self, missing: list[Revocation], now: float) -> None:
        if not self._store_lost:
            self._store_lost = True  # once per incident, until the store lists them all again
            log.error(
                "the store lost %d revocation(s) this instance holds (a Redis restart without "
                "persistence, a failover to a replica that missed them, or a restored backup); "
                "writing them back",
                len(missing),
            )
        for entry in missing:
            await self._store.revoke(entry, now)
            metrics.REVOCATIONS_RESTORED.inc()

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
