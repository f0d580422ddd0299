"""The store of one process: the same semantics as `redis.RedisStore`, kept in dicts.

Time is the caller's (`Touch.now`, the `now` of `revoke`), never the process clock, so a
record's lifetime follows the injected clock exactly as Redis TTLs follow the caller's.
Memory is bounded: every write first drops the records whose lifetime has passed (a heap of
expiry times makes that amortised O(log n)), so only live records are held.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence

from gateway.metrics import STORE_DURATION, batched
from gateway.store.base import Activity, Revocation, RevocationKind, Touch, TouchResult

# The expiry heap holds one entry per lifetime change; past this many stale entries per live
# record it is rebuilt, so it stays proportional to the live records.
_HEAP_SLACK = 2
_HEAP_MIN = 1024


class MemoryStore:
    """Not shared between processes: valid only for a single gateway process."""

    def __init__(self) -> None:
        # key -> (last_activity, expires_at); a record is gone from expires_at on.
        self._records: dict[str, tuple[float, float]] = {}
        self._expiries: list[tuple[float, str]] = []  # heap; may hold superseded entries
        # Latest time seen: `last_activity()` carries no time of its own.
        self._now = -math.inf
        self._revocations: dict[tuple[RevocationKind, str], Revocation] = {}
        self._version = 0
        self._touch_duration = batched(STORE_DURATION.labels(op="check_and_touch"))
        self._flush_duration = batched(STORE_DURATION.labels(op="flush"))

    def __len__(self) -> int:
        """Records held (live ones, plus any expired since the last write)."""
        return len(self._records)

    def _sweep(self, now: float) -> None:
        self._now = max(self._now, now)
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            _, key = heapq.heappop(expiries)
            record = self._records.get(key)
            if record is not None and record[1] <= now:
                del self._records[key]

    def _write(self, key: str, last_activity: float, expires_at: float) -> None:
        previous = self._records.get(key)
        self._records[key] = (last_activity, expires_at)
        if previous is None or previous[1] != expires_at:
            heapq.heappush(self._expiries, (expires_at, key))
            if len(self._expiries) > _HEAP_SLACK * len(self._records) + _HEAP_MIN:
                self._expiries = [(record[1], k) for k, record in self._records.items()]
                heapq.heapify(self._expiries)

    def _live(self, key: str, now: float) -> tuple[float, float] | None:
        record = self._records.get(key)
        return record if record is not None and record[1] > now else None

    async def check_and_touch(self, touch: Touch) -> TouchResult:
        started = time.perf_counter()
        now = touch.now
        self._sweep(now)
        record = self._live(touch.key, now)
        last = touch.initial if record is None else record[0]
        # tokens.policy.is_idle, as the Redis script decides it.
        if now - last > touch.idle_timeout:
            if record is None and touch.remember_idle:
                expires_at = last + touch.idle_timeout + touch.linger
                if expires_at > now:
                    self._write(touch.key, last, expires_at)
            result = TouchResult(last_activity=last, idle=True)
        else:
            if touch.extend:
                new_last = max(last, now)  # never backwards: skewed replicas race safely
                keep_until = max(touch.expires_at, new_last + touch.idle_timeout) + touch.linger
                expires_at = keep_until if record is None else max(record[1], keep_until)
                if record != (new_last, expires_at):
                    self._write(touch.key, new_last, expires_at)
            result = TouchResult(last_activity=last, idle=False)
        self._touch_duration.observe(time.perf_counter() - started)
        return result

    async def record_activity(self, batch: Sequence[Activity], now: float) -> list[Activity]:
        """Batched activity (store.coalesce), as record_activity.lua writes it in Redis."""
        started = time.perf_counter()
        self._sweep(now)
        for activity in batch:
            record = self._live(activity.key, now)
            last = activity.initial if record is None else record[0]
            if now - last > activity.idle_timeout:
                continue  # idle already: idling out is terminal, nothing revives the token
            new_last = max(last, min(activity.at, now))
            keep_until = max(activity.expires_at, new_last + activity.idle_timeout)
            keep_until += activity.linger
            expires_at = keep_until if record is None else max(record[1], keep_until)
            if record != (new_last, expires_at):
                self._write(activity.key, new_last, expires_at)
        self._flush_duration.observe(time.perf_counter() - started)
        return []

    def expires_at(self, key: str) -> float | None:
        """When the record of `key` disappears (None: there is none)."""
        record = self._live(key, self._now)
        return None if record is None else record[1]

    async def last_activity(self, key: str) -> float | None:
        with STORE_DURATION.labels(op="last_activity").time():
            record = self._live(key, self._now)
            return None if record is None else record[0]

    async def revoke(self, revocation: Revocation, now: float) -> int | None:
        with STORE_DURATION.labels(op="revoke").time():
            self._revoke(revocation, now)
        return None  # no replicas

    def _revoke(self, revocation: Revocation, now: float) -> None:
        self._now = max(self._now, now)
        index = (revocation.kind, revocation.key)
        old = self._revocations.get(index)
        if old is not None:
            revocation = old.widened(revocation)
        self._revocations[index] = revocation
        for stale in [i for i, entry in self._revocations.items() if entry.until < now]:
            del self._revocations[stale]
        self._version += 1

    async def revocations(self, since: int) -> tuple[int, list[Revocation] | None]:
        with STORE_DURATION.labels(op="revocations").time():
            if since == self._version:
                return self._version, None
            return self._version, list(self._revocations.values())

    async def ping(self) -> None:
        STORE_DURATION.labels(op="ping").observe(0.0)

    async def eviction_problem(self) -> str | None:
        return None  # bounded by lifetimes alone (see _sweep), never by memory pressure

    async def close(self) -> None:
        return None
