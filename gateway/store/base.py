"""What the gateway needs from a store of last activity and revocations.

Two implementations: `memory.MemoryStore` (one process) and `redis.RedisStore` (shared by every
replica). Ids are hashed with a keyed hash before they reach a store: no raw claim is ever stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from gateway.logs import printable

RevocationKind = Literal["jti", "sid", "sub"]


class StoreUnavailable(Exception):
    """The store failed or did not answer within `store.timeout`."""


class OutageLog:
    """An outage of the store is one log line when it starts and one when it ends (how long it
    lasted, how many calls failed), however many calls fail in between: the revocation poll
    alone fails four times a second, every request once."""

    def __init__(self, logger: logging.Logger, name: str) -> None:
        self._log = logger
        self._name = name
        self.since: float | None = None  # monotonic time of the first failure; None: healthy
        self.failed_calls = 0
        self._writes_failed = False  # in this outage: then only a write's success ends it

    def failure(self, reason: str, *, write: bool = True) -> None:
        """`write`: the failed call writes (a store that answers reads and refuses writes,
        e.g. a full Redis, is still down for the gateway's requests)."""
        if self.since is None:
            self.since = time.monotonic()
            self.failed_calls = 0
            self._writes_failed = False
            self._log.error(
                "%s unavailable: %s (further failures are counted, not logged, until it answers)",
                printable(self._name),
                printable(reason),  # the store's own error text, or its client library's
            )
        self._writes_failed |= write
        self.failed_calls += 1

    def success(self, *, write: bool = True) -> None:
        """Call after a successful call when `since` is set (an attribute test on the hot path).
        A read's success does not end an outage in which writes failed."""
        if self.since is None or (self._writes_failed and not write):
            return
        self._log.warning(
            "%s available again after %.1f s; %d calls failed",
            printable(self._name),
            time.monotonic() - self.since,
            self.failed_calls,
        )
        self.since = None


# Not frozen: a frozen dataclass's __init__ costs more, and the gateway sets `now` of the one
# Touch it keeps per token and route on each request (bench/RESULTS.md).
@dataclass(slots=True)
class Touch:
    """One request's activity check, decided and recorded atomically by the store.

    `key` is the hashed tracking id (jti, or sid with `track_by: sid`). `initial` is the last
    activity when the store holds none (the token's `iat`). The request is idle iff
    `now - last_activity > idle_timeout` (see `tokens.policy.is_idle`), where `now` is the
    store's clock: Redis decides with its own TIME (one clock for every replica) and ignores
    `now` here; the memory store, one process's, uses it (the gateway's injected clock).

    The gateway keeps one Touch per token and route and sets `now` before each call, so a
    store reads what it needs of a Touch before its first `await`, never after.
    """

    key: str
    initial: float
    now: float
    idle_timeout: float
    # False for `activity: passive` routes and the session-status endpoint: check only.
    extend: bool
    # The token's `exp`; the record is kept until max(exp, last_activity + idle_timeout) + linger.
    expires_at: float
    # `leeway` (+ `session_retention` with track_by sid, so that an idled-out session stays
    # refused for that long, even for tokens issued later).
    linger: float
    # With track_by sid, an idle refusal with no record writes one (last_activity = initial), so
    # that later tokens of the session are refused too. Never moves last_activity.
    remember_idle: bool
    # A store's encoding of the fields above but `now` (which store, what), for the next call
    # with this Touch: the store's own business, no part of the check.
    encoded: tuple[object, Any] | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class TouchResult:
    last_activity: float  # as it was before this request (== initial when never seen)
    idle: bool  # refused: nothing was updated


@dataclass(slots=True)
class Activity:
    """A key's latest activity decided locally (`store.coalesce`), written by the next flush
    as `check_and_touch` with `extend` would have written it, at the time it happened."""

    key: str
    at: float  # the caller's clock at the latest local acceptance (the memory store's time)
    # Seconds from then until this flush, on the caller's monotonic clock: Redis writes the
    # activity as TIME - age, on its own clock, so no replica's wall clock moves last_activity.
    age: float
    initial: float  # as Touch.initial: the last activity when the store holds none
    idle_timeout: float  # the longest of the routes that saw it (each refused nothing)
    expires_at: float
    linger: float


@dataclass(frozen=True, slots=True)
class Revocation:
    kind: RevocationKind
    key: str  # hashed id (jti, sid or sub)
    # For `sub`: tokens with iat <= issued_before are revoked. None: every token matching the id.
    issued_before: float | None
    until: float  # wall-clock time after which no token it covers can still be valid

    def widened(self, other: Revocation) -> Revocation:
        """Both entries of one id as one: revocations only widen. "Every token" (None) wins
        over a cut-off, else the later cut-off; the later `until`."""
        if self.issued_before is None or other.issued_before is None:
            issued_before = None
        else:
            issued_before = max(self.issued_before, other.issued_before)
        return Revocation(
            kind=self.kind,
            key=self.key,
            issued_before=issued_before,
            until=max(self.until, other.until),
        )


class Store(Protocol):
    async def check_and_touch(self, touch: Touch) -> TouchResult:
        """One round trip: decide idleness and, when not idle and `extend`, set
        last_activity = max(last_activity, now) and extend the record's lifetime (never shorten)."""
        ...

    async def last_activity(self, key: str) -> float | None:
        """The recorded last activity, or None when the store holds none."""
        ...

    async def revoke(self, revocation: Revocation, now: float) -> int | None:
        """Add (or widen) a revocation; entries whose `until` passed are dropped. Where the
        store has replicas, waits (bounded by `store.timeout`) for one to acknowledge and
        returns how many did; None where there is nothing to wait for."""
        ...

    async def revocations(self, since: int) -> tuple[int, list[Revocation] | None]:
        """(version, entries); entries is None when the version still equals `since`."""
        ...

    async def ping(self) -> str | None:
        """Raise StoreUnavailable unless the store answers. A store that answers only in part
        (a Redis Cluster with a shard lost: its keys' calls fail, the others' succeed) says
        so in one line; None when all of it answers."""
        ...

    async def eviction_problem(self) -> str | None:
        """Why the store may drop what it holds before its time (Redis: a maxmemory-policy
        other than noeviction), as one line; None when it keeps everything. Raises
        StoreUnavailable when the store does not answer."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class BatchingStore(Store, Protocol):
    """A store that can also write many keys' activity at once (for `coalesce.CoalescingStore`)."""

    async def record_activity(self, batch: Sequence[Activity], now: float) -> list[Activity]:
        """For each key: unless the store already considers it idle (idling out is terminal:
        nothing revives it), last_activity = max(stored, the activity's time, never beyond the
        store's now) and the record's lifetime extended as `check_and_touch` would. `now` is
        the caller's clock (used where the store has none of its own). Returns the activities
        not written because the store failed (the caller keeps them for the next flush); a
        failure is counted and logged by the store as op `flush`."""
        ...


class KeyHasher:
    """Keyed hash of ids (HMAC-SHA256, truncated): store keys never hold raw jti/sid/sub."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def __call__(self, kind: str, value: str) -> str:
        digest = hmac.new(self._secret, f"{kind}\0{value}".encode(), hashlib.sha256)
        return digest.hexdigest()[:32]

    def of_token(self, kind: str, issuer: str, value: str) -> str:
        """The key of a token's id: a token is its issuer and its id together, so two issuers'
        equal jti (sid, sub) are two keys. JSON-encoded: no issuer/value split is ambiguous."""
        return self(kind, json.dumps([issuer, value]))
