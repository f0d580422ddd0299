"""store.coalesce: local decisions within a token's window and batched activity writes.

Replicas are CoalescingStores over one shared MemoryStore, on one ManualClock (which is also
their monotonic clock). The property tests replay seeded random request schedules at two
replicas and check every decision against the contract's definition of idleness over the true
last activity (every request accepted at any replica): never accepted late, refused at most D
early, idle is terminal. hypothesis is not installed, so the schedules are seeded `random`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from prometheus_client import REGISTRY

from gateway import metrics
from gateway.clock import ManualClock, SystemClock
from gateway.config import ConfigError, from_data
from gateway.config import Store as StoreConfig
from gateway.store.base import Activity, Touch, TouchResult
from gateway.store.coalesce import CoalescingStore, coalescing
from gateway.store.memory import MemoryStore

IDLE = 60.0
SHORT_IDLE = 25.0  # a route's shorter idle_timeout
WINDOW = 10.0  # store.coalesce
LINGER = 30.0


class CountingStore(MemoryStore):
    """The memory store, counting the calls that would be round trips, and able to fail its
    flushes (a store outage as record_activity reports it: the writes come back unwritten)."""

    def __init__(self) -> None:
        super().__init__()
        self.touches = 0
        self.flushed_keys = 0
        self.failing = False

    async def check_and_touch(self, touch: Touch) -> TouchResult:
        self.touches += 1
        return await super().check_and_touch(touch)

    async def record_activity(self, batch: Sequence[Activity], now: float) -> list[Activity]:
        if self.failing:
            return list(batch)
        self.flushed_keys += len(batch)
        return await super().record_activity(batch, now)


def touch(
    key: str,
    now: float,
    iat: float,
    *,
    extend: bool = True,
    idle_timeout: float = IDLE,
) -> Touch:
    return Touch(
        key=key,
        initial=iat,
        now=now,
        idle_timeout=idle_timeout,
        extend=extend,
        expires_at=iat + 900,
        linger=LINGER,
        remember_idle=False,
    )


def replica(
    store: MemoryStore, clock: ManualClock, window: float = WINDOW, **options: float
) -> CoalescingStore:
    # flush_interval 0: no background task; the tests flush when the schedule says so.
    return CoalescingStore(store, window, clock, flush_interval=0, **options)  # type: ignore[arg-type]


def metric(name: str) -> float:
    metrics.flush()
    return REGISTRY.get_sample_value(name) or 0.0


# --- decisions within and after the window --------------------------------------------------


async def test_a_token_accepted_through_the_store_is_decided_locally_within_the_window(
    clock: ManualClock,
) -> None:
    shared = CountingStore()
    store = replica(shared, clock)
    iat = clock.now()
    before = metric("idlegate_store_coalesced_total")
    assert not (await store.check_and_touch(touch("t", iat, iat))).idle
    for _ in range(9):
        clock.advance(1.0)
        assert not (await store.check_and_touch(touch("t", clock.now(), iat))).idle
    assert shared.touches == 1
    assert metric("idlegate_store_coalesced_total") - before == 9
    assert store.pending == 1


async def test_the_first_request_after_the_window_goes_to_the_store_again(
    clock: ManualClock,
) -> None:
    shared = CountingStore()
    store = replica(shared, clock)
    iat = clock.now()
    await store.check_and_touch(touch("t", iat, iat))
    clock.advance(WINDOW - 0.001)
    await store.check_and_touch(touch("t", clock.now(), iat))
    assert shared.touches == 1
    clock.advance(0.001)
    await store.check_and_touch(touch("t", clock.now(), iat))
    assert shared.touches == 2
    # The store wrote this later activity itself: nothing is left to flush.
    assert store.pending == 0
    assert await shared.last_activity("t") == clock.now()


async def test_another_replica_sees_the_local_activity_after_a_flush(clock: ManualClock) -> None:
    shared = CountingStore()
    a, b = replica(shared, clock), replica(shared, clock)
    iat = clock.now()
    await a.check_and_touch(touch("t", iat, iat))
    clock.advance(7.0)
    await a.check_and_touch(touch("t", clock.now(), iat))
    before = metric("idlegate_store_flush_keys_total")
    await a.flush()
    assert metric("idlegate_store_flush_keys_total") - before == 1
    assert await shared.last_activity("t") == iat + 7.0
    # B decides with A's activity: idle only IDLE after it, not after A's store decision.
    clock.set(iat + 7.0 + IDLE)
    assert not (await b.check_and_touch(touch("t", clock.now(), iat))).idle


async def test_passive_requests_never_count_as_activity(clock: ManualClock) -> None:
    shared = CountingStore()
    store = replica(shared, clock)
    iat = clock.now()
    # A passive request through the store opens no window...
    await store.check_and_touch(touch("t", iat + 1, iat, extend=False))
    await store.check_and_touch(touch("t", iat + 2, iat, extend=False))
    assert shared.touches == 2
    # ...and one decided locally inside a window writes nothing.
    await store.check_and_touch(touch("t", iat + 3, iat))
    await store.check_and_touch(touch("t", iat + 4, iat, extend=False))
    assert shared.touches == 3
    assert store.pending == 0
    await store.flush()
    assert shared.flushed_keys == 0
    assert await shared.last_activity("t") == iat + 3


async def test_an_idle_refusal_ends_the_window_and_drops_pending_writes(
    clock: ManualClock,
) -> None:
    shared = CountingStore()
    a, b = replica(shared, clock), replica(shared, clock)
    iat = clock.now()
    await b.check_and_touch(touch("t", iat, iat, idle_timeout=SHORT_IDLE))
    clock.advance(SHORT_IDLE + 1)
    # B's window is long over: B asks the store, which refuses (short route).
    assert (await b.check_and_touch(touch("t", clock.now(), iat, idle_timeout=SHORT_IDLE))).idle
    assert len(b) == 0
    # A, on the long route: accepted through the store; idle never concerned this route.
    assert not (await a.check_and_touch(touch("t", clock.now(), iat))).idle


async def test_a_flush_never_revives_a_record_the_store_considers_idle(
    clock: ManualClock,
) -> None:
    shared = CountingStore()
    a, b = replica(shared, clock), replica(shared, clock)
    iat = clock.now()
    await a.check_and_touch(touch("t", iat, iat, idle_timeout=SHORT_IDLE))
    clock.advance(WINDOW - 1)
    await a.check_and_touch(touch("t", clock.now(), iat, idle_timeout=SHORT_IDLE))
    shared.failing = True  # the flush fails until after the token idled out in the store
    await a.flush()
    clock.set(iat + SHORT_IDLE + 0.5)
    shared.failing = False
    # The store holds iat as last activity: idle. A's late write must not revive it, though
    # the local activity (iat + 9) was within the idle timeout of now.
    refused = await b.check_and_touch(touch("t", clock.now(), iat, idle_timeout=SHORT_IDLE))
    assert refused.idle
    await a.flush()
    assert await shared.last_activity("t") == iat
    assert (await b.check_and_touch(touch("t", clock.now(), iat, idle_timeout=SHORT_IDLE))).idle


async def test_a_failed_flush_keeps_its_writes_for_the_next_one(clock: ManualClock) -> None:
    shared = CountingStore()
    store = replica(shared, clock)
    iat = clock.now()
    for key in ("t1", "t2"):
        await store.check_and_touch(touch(key, iat, iat))
    clock.advance(3.0)
    for key in ("t1", "t2"):
        await store.check_and_touch(touch(key, clock.now(), iat))
    shared.failing = True
    await store.flush()
    assert store.pending == 2
    clock.advance(2.0)
    await store.check_and_touch(touch("t1", clock.now(), iat))  # newer, merged with the kept
    shared.failing = False
    await store.flush()
    assert store.pending == 0
    assert await shared.last_activity("t1") == iat + 5.0
    assert await shared.last_activity("t2") == iat + 3.0


async def test_pending_writes_and_windows_are_bounded(clock: ManualClock) -> None:
    shared = CountingStore()
    store = replica(shared, clock, capacity=3)
    iat = clock.now()
    dropped = metric("idlegate_store_flush_dropped_total")
    for i in range(5):
        await store.check_and_touch(touch(f"t{i}", iat, iat))
    assert len(store) == 3  # beyond capacity, tokens are decided by the store (exact)
    clock.advance(1.0)
    for i in range(5):
        await store.check_and_touch(touch(f"t{i}", clock.now(), iat))
    assert shared.touches == 5 + 2
    assert store.pending == 3
    # While the store fails, kept writes and new ones share the bound; the excess is counted.
    shared.failing = True
    await store.flush()
    assert store.pending == 3
    assert metric("idlegate_store_flush_dropped_total") == dropped
    # Windows that ended are forgotten at the next flush.
    clock.advance(WINDOW)
    await store.flush()
    assert len(store) == 0


async def test_close_writes_what_is_pending(clock: ManualClock) -> None:
    shared = CountingStore()
    store = replica(shared, clock)
    iat = clock.now()
    await store.check_and_touch(touch("t", iat, iat))
    clock.advance(4.0)
    await store.check_and_touch(touch("t", clock.now(), iat))
    await store.close()
    assert await shared.last_activity("t") == iat + 4.0


async def test_the_background_flush_runs_every_half_window() -> None:
    shared = CountingStore()
    clock = SystemClock()
    store = CoalescingStore(shared, 0.2, clock)
    now = clock.now()
    await store.check_and_touch(touch("t", now, now))
    await store.check_and_touch(touch("t", clock.now(), now))
    assert store.pending == 1
    await asyncio.sleep(0.15)
    assert store.pending == 0
    assert shared.flushed_keys == 1
    await store.close()


def test_coalesce_zero_leaves_the_store_as_it_is(clock: ManualClock) -> None:
    store = MemoryStore()
    assert coalescing(store, StoreConfig(coalesce=0), clock) is store
    wrapped = coalescing(store, StoreConfig(coalesce="5s"), clock)
    assert isinstance(wrapped, CoalescingStore)
    assert wrapped.window == 5.0


# --- config -----------------------------------------------------------------------------------


def config_problems(store: dict[str, object], routes: list[dict[str, object]]) -> list[str]:
    data = {
        "store": store,
        "policy": {"idle_timeout": "15m"},
        "providers": [
            {
                "name": "main",
                "issuer": "https://issuer.test/",
                "audiences": ["orders-api"],
                "public_key_file": "/keys/public.pem",
            }
        ],
        "routes": routes,
    }
    try:
        from_data(data, environ={})
    except ConfigError as exc:
        return exc.problems
    return []


def test_coalesce_must_be_shorter_than_every_idle_timeout() -> None:
    routes: list[dict[str, object]] = [
        {"prefix": "/api/", "upstream": "http://x"},
        {"prefix": "/poll/", "upstream": "http://x", "idle_timeout": "30s"},
    ]
    assert config_problems({"coalesce": "29s"}, routes) == []
    assert config_problems({"coalesce": "30s"}, routes) == [
        "store.coalesce: 30s must be shorter than routes.1.idle_timeout (30s, route /poll/): "
        "a token may be refused up to store.coalesce early"
    ]
    found = config_problems({"coalesce": "15m"}, routes)
    assert [problem.split(" (")[0] for problem in found] == [
        "store.coalesce: 900s must be shorter than policy.idle_timeout",
        "store.coalesce: 900s must be shorter than routes.1.idle_timeout",
    ]
    assert config_problems({"coalesce": -1}, routes) == [
        "store.coalesce: a duration cannot be negative"
    ]
    assert config_problems({}, routes) == []  # default 0: exact


# --- properties over random schedules -------------------------------------------------------


@dataclass
class Outcome:
    late: list[str]
    too_early: list[str]
    revived: list[str]
    early: int  # refused though exact semantics would accept (within the bound)
    refused: int
    local: int
    requests: int


async def run_schedule(seed: int, *, window: float, flush_failures: bool) -> Outcome:
    """Two replicas, three live tokens at a time (one idled out on the longest timeout is
    replaced by a new one, and still asked about now and then), requests mostly in bursts with
    some gaps near the idle timeouts, on two routes (IDLE and SHORT_IDLE) and passive ones.
    Each replica flushes every window / 2 at its own phase; some flushes fail. Every decision
    is checked against the truth."""
    rng = random.Random(seed)
    clock = ManualClock(start=1_800_000_000.0)
    shared = CountingStore()
    replicas = [replica(shared, clock, window), replica(shared, clock, window)]
    start = clock.now()
    iats = {f"t{i}": start - rng.uniform(0, 20) for i in range(3)}
    live = sorted(iats)
    true_last = dict(iats)  # the contract's last_activity: every accepted extend, anywhere
    refused_long: dict[str, float] = {}  # first refusal on the longest timeout, by token
    next_flush = [start + rng.uniform(0, window / 2) for _ in replicas]
    late, too_early, revived = [], [], []
    requests = early = refused = 0
    for _ in range(400):
        pick = rng.random()
        if pick < 0.75:
            gap = rng.uniform(0, 1.5)
        elif pick < 0.93:
            gap = rng.uniform(0, window)
        else:
            gap = rng.uniform(SHORT_IDLE - 12, IDLE + 5)
        now = clock.now() + gap
        for i, store in enumerate(replicas):
            while next_flush[i] <= now:
                clock.set(next_flush[i])
                shared.failing = flush_failures and rng.random() < 0.3
                await store.flush()
                shared.failing = False
                next_flush[i] += window / 2
        clock.set(now)
        dead = sorted(refused_long)
        key = rng.choice(dead) if dead and rng.random() < 0.1 else rng.choice(live)
        store = rng.choice(replicas)
        idle_timeout = rng.choice([IDLE, IDLE, SHORT_IDLE])
        extend = rng.random() < 0.85
        result = await store.check_and_touch(
            touch(key, now, iats[key], extend=extend, idle_timeout=idle_timeout)
        )
        requests += 1
        gap_to_truth = now - true_last[key]
        where = f"seed {seed}, {key} at +{now - start:.3f}s, timeout {idle_timeout:g}"
        if not result.idle:
            # (1) never accepted late.
            if gap_to_truth > idle_timeout:
                late.append(f"{where}: accepted {gap_to_truth:.3f}s after its last activity")
            # (3) idle is terminal: nothing is accepted after a refusal on the longest timeout.
            if key in refused_long:
                revived.append(f"{where}: accepted after its refusal at {refused_long[key]:.3f}")
            if extend:
                true_last[key] = max(true_last[key], now)
        else:
            refused += 1
            early += gap_to_truth <= idle_timeout
            # (2) refused at most the window early.
            if gap_to_truth <= idle_timeout - window:
                too_early.append(f"{where}: refused {gap_to_truth:.3f}s after its last activity")
            if idle_timeout == IDLE and key not in refused_long:
                refused_long[key] = now - start
                live.remove(key)
                fresh = f"t{len(iats)}"
                iats[fresh] = true_last[fresh] = now - rng.uniform(0, 5)
                live.append(fresh)
    local = requests - shared.touches
    return Outcome(late, too_early, revived, early, refused, local, requests)


@pytest.mark.parametrize(
    ("window", "flush_failures"),
    [(WINDOW, False), (WINDOW, True), (SHORT_IDLE - 1, False), (SHORT_IDLE - 1, True)],
)
async def test_random_schedules_are_never_accepted_late_and_at_most_the_window_early(
    window: float, flush_failures: bool
) -> None:
    local = requests = early = refused = 0
    for seed in range(60):
        outcome = await run_schedule(seed, window=window, flush_failures=flush_failures)
        assert outcome.late == []
        assert outcome.too_early == []
        assert outcome.revived == []
        local += outcome.local
        requests += outcome.requests
        early += outcome.early
        refused += outcome.refused
    # The schedules exercise what the bounds are about: local decisions, refusals, and
    # refusals that exact semantics would not have made (each within the bound). With flushes
    # every window / 2 and a window well below the timeouts there are (almost) none of those.
    print(f"{requests} requests: {local} local, {refused} refused, {early} early")
    assert local > requests // 4
    assert refused > requests // 20
    if window > SHORT_IDLE / 2:
        assert early > 0
