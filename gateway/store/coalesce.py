"""`store.coalesce`: fewer store round trips for very high request rates, at a bounded cost.

A token this instance accepted through the store (`check_and_touch`, with `extend`) less than D
ago (`store.coalesce`, on this process's monotonic clock) is accepted locally, without a store
call; its activity is written in batches (`record_activity`) every D/2 and at shutdown. After D
the next request goes to the store again, which also picks up other instances' activity.

Why that never accepts a token late: the store recorded an activity of the token at the opening
decision, less than D ago, and D is shorter than every idle timeout (the config checks it), so
the token's true last activity is within its idle timeout. Why it refuses at most D early:
every local acceptance lies within D of an activity the store already holds, so what other
instances see lags the truth by less than D. Idling out stays terminal: a local decision needs
a window opened by the store less than D < idle timeout ago (so the store cannot consider the
token idle yet), and a flush never writes a record the store already considers idle.
Revocations, exp, nbf and session age are checked per request before the store, as always.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.clock import Clock, SystemClock
from gateway.config import Store as StoreConfig
from gateway.metrics import (
    STORE_COALESCED,
    STORE_FLUSH_DROPPED,
    STORE_FLUSH_KEYS,
    batched_counter,
)
from gateway.store.base import (
    Activity,
    BatchingStore,
    Revocation,
    Store,
    Touch,
    TouchResult,
)

log = logging.getLogger("idlegate.store")

# Keys held at most (open windows, and pending writes, each): beyond it new tokens are decided
# by the store as with coalesce 0, and a pending write that does not fit is dropped (counted;
# the token then looks idle earlier elsewhere, never later).
CAPACITY = 200_000


@dataclass(slots=True)
class _Window:
    """A token accepted through the store: decided locally until `opened` + D."""

    opened: float  # monotonic time the opening store call was sent (the store's now is later)
    last: float  # the latest activity known here, on the caller's clock (for TouchResult)


@dataclass(slots=True)
class _Pending:
    """A key's activity decided locally since the last flush, merged: the latest wins."""

    at: float
    seen: float  # monotonic
    initial: float
    idle_timeout: float
    expires_at: float
    linger: float
    # The last Touch merged in: its fields but `now` never change (the gateway keeps one per
    # token and route), so merging it again is only `now` and `seen`.
    merged: Touch | None = field(default=None, compare=False, repr=False)

    def merge(self, other: _Pending) -> None:
        self.at = max(self.at, other.at)
        self.seen = max(self.seen, other.seen)
        self.initial = max(self.initial, other.initial)
        self.idle_timeout = max(self.idle_timeout, other.idle_timeout)
        self.expires_at = max(self.expires_at, other.expires_at)
        self.linger = max(self.linger, other.linger)


class CoalescingStore:
    """The configured store, with local decisions inside each token's window (see the module)."""

    def __init__(
        self,
        store: BatchingStore,
        window: float,
        clock: Clock,
        *,
        monotonic: Callable[[], float] | None = None,
        flush_interval: float | None = None,
        flush_timeout: float = 1.0,
        capacity: int = CAPACITY,
    ) -> None:
        if window <= 0:
            raise ValueError("a coalescing window must be positive")
        self.store = store
        self.window = window
        self._clock = clock
        # Windows are measured on a clock that never jumps; an injected clock (tests,
        # simulations) is that clock too, so simulated minutes pass in no time.
        if monotonic is None:
            monotonic = time.monotonic if isinstance(clock, SystemClock) else clock.now
        self._monotonic = monotonic
        # None: no background flusher (tests call flush() when they want one).
        self._flush_interval = window / 2 if flush_interval is None else flush_interval
        self._flush_timeout = flush_timeout
        self._capacity = capacity
        self._windows: dict[str, _Window] = {}
        self._pending: dict[str, _Pending] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()
        self._closed = False
        self._dropped_logged = -math.inf
        self._coalesced = batched_counter(STORE_COALESCED)

    def __len__(self) -> int:
        """Open windows (including ones that ended since the last flush pruned them)."""
        return len(self._windows)

    @property
    def pending(self) -> int:
        """Keys whose locally decided activity is not yet written."""
        return len(self._pending)

    def decided_locally(self, touch: Touch) -> float | None:
        """Inside the token's window, the answer without a store call (and without a coroutine:
        the gateway asks this first): not idle, and this last activity (a TouchResult's, made
        by `check_and_touch` only: one object less per request). None: ask the store."""
        window = self._windows.get(touch.key)
        if window is None or touch.idle_timeout <= self.window:
            return None
        seen = self._monotonic()
        if seen - window.opened >= self.window:
            return None
        self._coalesced.count += 1  # BatchedCounter.inc, without the call
        last = window.last
        if touch.extend:
            now = touch.now
            if now > last:
                window.last = now
            self._note(touch, seen)
        return last

    async def check_and_touch(self, touch: Touch) -> TouchResult:
        local = self.decided_locally(touch)
        if local is not None:
            return TouchResult(local, False)
        key = touch.key
        sent = self._monotonic()
        now = touch.now  # read before the await (Touch: the gateway sets it per request)
        result = await self.store.check_and_touch(touch)
        if result.idle:
            # Terminal: nothing of this key is decided locally or written any more.
            self._windows.pop(key, None)
            self._pending.pop(key, None)
        elif touch.extend:
            pending = self._pending.get(key)
            if pending is not None and pending.seen <= sent:
                del self._pending[key]  # the store has just written a later activity
            window = self._windows.get(key)
            if window is None:
                if len(self._windows) < self._capacity:
                    self._windows[key] = _Window(sent, max(result.last_activity, now))
            elif window.opened < sent:
                window.opened = sent
                window.last = max(window.last, result.last_activity, now)
        return result

    def _note(self, touch: Touch, seen: float) -> None:
        pending = self._pending.get(touch.key)
        if pending is not None:
            # The common case (a busy token), written out: no object per request.
            if touch.now > pending.at:
                pending.at = touch.now
            if seen > pending.seen:
                pending.seen = seen
            if pending.merged is touch:  # the gateway's Touch for this token and route again:
                return  # only `now` of it changes
            pending.merged = touch
            if touch.idle_timeout > pending.idle_timeout:
                pending.idle_timeout = touch.idle_timeout
            if touch.expires_at > pending.expires_at:
                pending.expires_at = touch.expires_at
            if touch.initial > pending.initial:
                pending.initial = touch.initial
            if touch.linger > pending.linger:
                pending.linger = touch.linger
            return
        entry = _Pending(
            touch.now, seen, touch.initial, touch.idle_timeout, touch.expires_at, touch.linger
        )
        entry.merged = touch
        if len(self._pending) >= self._capacity:
            self._drop(1)
            return
        self._pending[touch.key] = entry
        if self._flusher is None and not self._closed and self._flush_interval:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_every_interval(), name="store-coalesce-flush"
            )

    def _drop(self, count: int) -> None:
        """Counted always; logged at most once a minute (it can happen on every request)."""
        STORE_FLUSH_DROPPED.inc(count)
        now = time.monotonic()
        if now - self._dropped_logged < 60.0:
            return
        self._dropped_logged = now
        log.warning(
            "store.coalesce: pending activity write(s) dropped (%d now; %d keys pending at "
            "most, or the last flush timed out): those tokens may idle out early elsewhere",
            count,
            self._capacity,
        )

    async def flush(self) -> None:
        """Write every pending activity now, in one batch (the store splits it by chunk and, on
        Redis Cluster, by hash slot). Writes the store fails on are kept for the next flush.
        Also forgets the windows that ended."""
        async with self._flushing:
            self._coalesced.flush()
            seen = self._monotonic()
            ended = [k for k, w in self._windows.items() if seen - w.opened >= self.window]
            for key in ended:
                del self._windows[key]
            if not self._pending:
                return
            pending, self._pending = self._pending, {}
            batch = [
                Activity(
                    key=key,
                    at=entry.at,
                    age=max(0.0, seen - entry.seen),
                    initial=entry.initial,
                    idle_timeout=entry.idle_timeout,
                    expires_at=entry.expires_at,
                    linger=entry.linger,
                )
                for key, entry in pending.items()
            ]
            try:
                failed = await self.store.record_activity(batch, self._clock.now())
            except BaseException:
                self._keep(pending, [activity.key for activity in batch])
                raise
            STORE_FLUSH_KEYS.inc(len(batch) - len(failed))
            if failed:
                self._keep(pending, [activity.key for activity in failed])

    def _keep(self, pending: dict[str, _Pending], keys: list[str]) -> None:
        """Put back what a flush did not write, merged with what came in meanwhile."""
        dropped = 0
        for key in keys:
            entry = pending[key]
            newer = self._pending.get(key)
            if newer is not None:
                newer.merge(entry)
            elif len(self._pending) < self._capacity:
                self._pending[key] = entry
            else:
                dropped += 1
        if dropped:
            self._drop(dropped)

    async def _flush_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                await self.flush()
            except Exception:  # a bug, not a store failure (those are returned): keep flushing
                log.exception("store.coalesce: flush failed")

    # -- the rest of the Store protocol: the store's own --------------------------------------

    async def last_activity(self, key: str) -> float | None:
        return await self.store.last_activity(key)

    async def revoke(self, revocation: Revocation, now: float) -> int | None:
        return await self.store.revoke(revocation, now)

    async def revocations(self, since: int) -> tuple[int, list[Revocation] | None]:
        return await self.store.revocations(since)

    async def ping(self) -> None:
        await self.store.ping()

    async def eviction_problem(self) -> str | None:
        return await self.store.eviction_problem()

    async def close(self) -> None:
        """The last flush (bounded by `flush_timeout`), then the store's close."""
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        try:
            async with asyncio.timeout(self._flush_timeout):
                await self.flush()
        except TimeoutError:
            pass
        if self._pending:
            self._drop(len(self._pending))
            self._pending = {}
        self._coalesced.flush()
        await self.store.close()


def coalescing(store: Store, config: StoreConfig, clock: Clock) -> Store:
    """`store` itself with `coalesce: 0` (exact: one round trip per request), else wrapped."""
    if config.coalesce <= 0:
        return store
    if not isinstance(store, BatchingStore):
        raise TypeError(f"{type(store).__name__} cannot write batched activity")
    # The last flush at shutdown may take a few store calls' time, not the whole drain.
    return CoalescingStore(store, config.coalesce, clock, flush_timeout=4 * config.timeout)
