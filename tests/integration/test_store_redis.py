"""The store contract, run against both stores (memory and a real redis-server of the tests' own),
then what only Redis has: TTLs, one round trip, reconnects, timeouts, shared revocations."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
from prometheus_client import REGISTRY

from gateway import metrics
from gateway.clock import ManualClock, SystemClock
from gateway.config import Store as StoreConfig
from gateway.revocation import RevocationList
from gateway.store import Revocation, Store, StoreUnavailable, Touch, TouchResult
from gateway.store.factory import hasher_from_config, open_store
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore

if TYPE_CHECKING:
    from tests.conftest import GatewayFactory, RedisServer

IDLE = 900.0
LINGER = 30.0
PREFIX = "itest"


def make_touch(
    now: float,
    *,
    key: str = "k1",
    initial: float,
    extend: bool = True,
    expires_at: float | None = None,
    linger: float = LINGER,
    remember_idle: bool = False,
) -> Touch:
    return Touch(
        key=key,
        initial=initial,
        now=now,
        idle_timeout=IDLE,
        extend=extend,
        expires_at=initial + IDLE if expires_at is None else expires_at,
        linger=linger,
        remember_idle=remember_idle,
    )


def redis_store(
    server: RedisServer, timeout: float = 1.0, *, caller_time: bool = True
) -> RedisStore:
    """The store contract is pinned with exact, simulated times (the ManualClock's): Redis
    decides with the Touch's now here. Its own clock (production) is tested in
    test_store_clock.py."""
    store = open_store(StoreConfig(url=server.url, key_prefix=PREFIX, timeout=timeout))
    assert isinstance(store, RedisStore)
    store.caller_time = caller_time
    return store


def pttl(server: RedisServer, key: str) -> int:
    return int(server.command("PTTL", key).strip().lstrip(b":"))


def lifetime(store: Store, server: RedisServer | None, key: str, now: float) -> float | None:
    """Seconds the record of `key` still lives, as the store holds it (None: no record)."""
    if isinstance(store, MemoryStore):
        expires_at = store.expires_at(key)
        return None if expires_at is None else expires_at - now
    assert isinstance(store, RedisStore)
    assert server is not None
    ms = pttl(server, store.activity_key(key))
    return None if ms == -2 else ms / 1000


def command_calls(server: RedisServer) -> dict[str, int]:
    info = server.command("INFO", "commandstats").decode()
    return {
        name: int(calls)
        for name, calls in re.findall(r"cmdstat_([a-z|_-]+):calls=(\d+)", info)
        if name not in ("info", "config|resetstat")
    }


def metric(name: str, op: str) -> float:
    return REGISTRY.get_sample_value(name, {"op": op}) or 0.0


# The store contract on every topology: one redis-server, Sentinel (a master, a replica, three
# sentinels) and Cluster (three masters, three replicas). `server` answers raw commands (PTTL)
# where the key lives.
TOPOLOGIES = {"redis": "redis_server", "sentinel": "stable_sentinel", "cluster": "redis_cluster"}


@pytest.fixture(params=["memory", *TOPOLOGIES])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    topology = request.getfixturevalue(TOPOLOGIES[request.param])
    opened = open_store(StoreConfig(url=topology.url, key_prefix=PREFIX, timeout=1.0))
    assert isinstance(opened, RedisStore)
    opened.caller_time = True  # see redis_store
    yield opened
    await opened.close()


@pytest.fixture
def server(store: Store, request: pytest.FixtureRequest) -> RedisServer | None:
    """What answers raw commands for the keys of `store`, if it is Redis."""
    if not isinstance(store, RedisStore):
        return None
    topology = request.getfixturevalue(TOPOLOGIES[request.node.callspec.params["store"]])
    return getattr(topology, "master", topology)  # type: ignore[no-any-return]


# --- idle semantics, both stores -------------------------------------------------------------


async def test_unseen_token_counts_from_initial(store: Store, clock: ManualClock) -> None:
    iat = clock.now()
    result = await store.check_and_touch(make_touch(iat + 60, initial=iat))
    assert result == TouchResult(last_activity=iat, idle=False)


async def test_exactly_idle_timeout_is_accepted_one_second_more_is_refused(
    store: Store, clock: ManualClock
) -> None:
    iat = clock.now()
    at_limit = await store.check_and_touch(make_touch(iat + IDLE, key="a", initial=iat))
    past_limit = await store.check_and_touch(make_touch(iat + IDLE + 1, key="b", initial=iat))
    assert at_limit.idle is False
    assert past_limit.idle is True

    await store.check_and_touch(make_touch(iat + 100, key="c", initial=iat))
    assert (
        await store.check_and_touch(make_touch(iat + 100 + IDLE, key="c", initial=iat))
    ).idle is False
    assert (
        await store.check_and_touch(make_touch(iat + 100 + 2 * IDLE + 1, key="c", initial=iat))
    ).idle is True


async def test_accepted_request_moves_last_activity(store: Store, clock: ManualClock) -> None:
    iat = clock.now()
    await store.check_and_touch(make_touch(iat + 10, initial=iat))
    assert await store.last_activity("k1") == iat + 10
    result = await store.check_and_touch(make_touch(iat + 500, initial=iat))
    assert result == TouchResult(last_activity=iat + 10, idle=False)
    assert await store.last_activity("k1") == iat + 500
    # 500 + 900 is past the token's own idle window from iat, yet within reach of its last use.
    assert (await store.check_and_touch(make_touch(iat + 1400, initial=iat))).idle is False


async def test_passive_request_does_not_count_as_activity(store: Store, clock: ManualClock) -> None:
    iat = clock.now()
    result = await store.check_and_touch(make_touch(iat + 10, initial=iat, extend=False))
    assert result == TouchResult(last_activity=iat, idle=False)
    assert await store.last_activity("k1") is None

    await store.check_and_touch(make_touch(iat + 20, initial=iat))
    await store.check_and_touch(make_touch(iat + 30, initial=iat, extend=False))
    assert await store.last_activity("k1") == iat + 20
    passive_late = make_touch(iat + 20 + IDLE + 1, initial=iat, extend=False)
    assert (await store.check_and_touch(passive_late)).idle is True


async def test_refused_request_updates_nothing_idling_out_is_terminal(
    store: Store, clock: ManualClock
) -> None:
    iat = clock.now()
    first = await store.check_and_touch(make_touch(iat + IDLE + 5, initial=iat))
    assert first == TouchResult(last_activity=iat, idle=True)
    assert await store.last_activity("k1") is None
    again = await store.check_and_touch(make_touch(iat + IDLE + 6, initial=iat))
    assert again == TouchResult(last_activity=iat, idle=True)

    await store.check_and_touch(make_touch(iat + 100, key="used", initial=iat))
    late = await store.check_and_touch(make_touch(iat + 100 + IDLE + 1, key="used", initial=iat))
    assert late == TouchResult(last_activity=iat + 100, idle=True)
    assert await store.last_activity("used") == iat + 100


async def test_last_activity_never_moves_backwards(store: Store, clock: ManualClock) -> None:
    iat = clock.now()
    await store.check_and_touch(make_touch(iat + 500, initial=iat))
    # A replica whose clock lags 200 s reports its (earlier) now.
    skewed = await store.check_and_touch(make_touch(iat + 300, initial=iat))
    assert skewed == TouchResult(last_activity=iat + 500, idle=False)
    assert await store.last_activity("k1") == iat + 500


async def test_fractional_times_are_kept_exactly(store: Store, clock: ManualClock) -> None:
    iat = clock.now() + 0.123456789
    now = iat + 12.000000123
    await store.check_and_touch(make_touch(now, initial=iat))
    assert await store.last_activity("k1") == now
    result = await store.check_and_touch(make_touch(now + IDLE, initial=iat))
    assert result == TouchResult(last_activity=now, idle=False)


async def test_remember_idle_refuses_later_tokens_of_the_session(
    store: Store, clock: ManualClock
) -> None:
    started = clock.now()
    now = started + IDLE + 60
    idle = make_touch(now, key="sid", initial=started, remember_idle=True, linger=86400)
    assert (await store.check_and_touch(idle)).idle is True
    assert await store.last_activity("sid") == started

    # A token issued a second ago, carrying the same session, is refused too.
    fresh = make_touch(now + 1, key="sid", initial=now, remember_idle=True, linger=86400)
    assert await store.check_and_touch(fresh) == TouchResult(last_activity=started, idle=True)


async def test_without_remember_idle_an_idle_refusal_leaves_no_record(
    store: Store, clock: ManualClock
) -> None:
    started = clock.now()
    now = started + IDLE + 60
    assert (await store.check_and_touch(make_touch(now, key="x", initial=started))).idle is True
    fresh = make_touch(now + 1, key="x", initial=now)
    assert await store.check_and_touch(fresh) == TouchResult(last_activity=now, idle=False)


async def test_remember_idle_keeps_no_record_once_the_linger_passed(
    store: Store, clock: ManualClock
) -> None:
    started = clock.now()
    now = started + IDLE + LINGER + 1
    assert (
        await store.check_and_touch(make_touch(now, initial=started, remember_idle=True))
    ).idle is True
    assert await store.last_activity("k1") is None


# --- record lifetimes, both stores (Redis: PTTL, no waiting) ---------------------------------


async def test_record_lives_until_expiry_or_idle_window_plus_linger(
    store: Store, server: RedisServer | None, clock: ManualClock
) -> None:
    iat = clock.now()
    # Idle window ends later than exp: kept until now + idle + linger.
    await store.check_and_touch(make_touch(iat + 10, key="short", initial=iat, expires_at=iat + 60))
    assert lifetime(store, server, "short", iat + 10) == pytest.approx(IDLE + LINGER, abs=0.5)
    # exp ends later than the idle window: kept until exp + linger.
    exp = iat + 5000
    await store.check_and_touch(make_touch(iat + 10, key="long", initial=iat, expires_at=exp))
    assert lifetime(store, server, "long", iat + 10) == pytest.approx(
        exp + LINGER - (iat + 10), abs=0.5
    )


async def test_record_lifetime_is_never_shortened(
    store: Store, server: RedisServer | None, clock: ManualClock
) -> None:
    iat = clock.now()
    exp = iat + 5000
    await store.check_and_touch(make_touch(iat + 10, initial=iat, expires_at=exp))
    # Another token of the same session, with an early exp, touches later: on its own it would
    # be kept IDLE + LINGER, but the longer lifetime stands. (Redis counts TTLs in real time,
    # which the manual clock does not move: the bound is loose by those 10 s.)
    await store.check_and_touch(make_touch(iat + 20, initial=iat, expires_at=iat + 30))
    remaining = lifetime(store, server, "k1", iat + 20)
    assert remaining is not None
    assert exp + LINGER - (iat + 20) - 0.5 <= remaining <= exp + LINGER - (iat + 10)
    assert await store.last_activity("k1") == iat + 20


async def test_remembered_idle_record_lives_for_the_linger(
    store: Store, server: RedisServer | None, clock: ManualClock
) -> None:
    started = clock.now()
    now = started + IDLE + 100
    await store.check_and_touch(
        make_touch(now, key="sid", initial=started, remember_idle=True, linger=3600)
    )
    assert lifetime(store, server, "sid", now) == pytest.approx(
        started + IDLE + 3600 - now, abs=0.5
    )


# --- revocations, both stores ----------------------------------------------------------------


def revocation(key: str, until: float, issued_before: float | None = None) -> Revocation:
    kind = "sub" if issued_before is not None else "jti"
    return Revocation(kind=kind, key=key, issued_before=issued_before, until=until)


async def test_revocations_are_read_only_when_their_version_changed(
    store: Store, clock: ManualClock
) -> None:
    now = clock.now()
    start, entries = await store.revocations(-1)
    assert entries == []
    assert await store.revocations(start) == (start, None)

    jti = revocation("j1", until=now + 900)
    await store.revoke(jti, now)
    version, entries = await store.revocations(start)
    assert version != start
    assert entries == [jti]
    assert await store.revocations(version) == (version, None)

    sub = revocation("s1", until=now + 900, issued_before=now)
    await store.revoke(sub, now)
    newer, entries = await store.revocations(version)
    assert newer != version
    assert entries is not None
    assert sorted(entries, key=lambda e: e.kind) == [jti, sub]


async def test_revoking_again_only_widens(store: Store, clock: ManualClock) -> None:
    now = clock.now()
    await store.revoke(revocation("s1", until=now + 900, issued_before=now), now)
    # An older cut-off and an earlier until cannot narrow the entry.
    await store.revoke(revocation("s1", until=now + 100, issued_before=now - 500), now)
    _, entries = await store.revocations(-1)
    assert entries == [revocation("s1", until=now + 900, issued_before=now)]
    await store.revoke(revocation("s1", until=now + 1800, issued_before=now + 60), now + 60)
    _, entries = await store.revocations(-1)
    assert entries == [revocation("s1", until=now + 1800, issued_before=now + 60)]

    # For jti/sid, "every token" (no cut-off) wins over a cut-off.
    await store.revoke(Revocation(kind="sid", key="x", issued_before=None, until=now + 900), now)
    await store.revoke(Revocation(kind="sid", key="x", issued_before=now, until=now + 900), now)
    _, entries = await store.revocations(-1)
    assert entries is not None
    assert Revocation(kind="sid", key="x", issued_before=None, until=now + 900) in entries


async def test_revocations_past_their_until_are_dropped(store: Store, clock: ManualClock) -> None:
    now = clock.now()
    await store.revoke(revocation("old", until=now + 10), now)
    await store.revoke(revocation("new", until=now + 900), now + 11)
    _, entries = await store.revocations(-1)
    assert entries == [revocation("new", until=now + 900)]


# --- Redis only ------------------------------------------------------------------------------


async def test_redis_revocations_survive_a_new_store_object(
    redis_server: RedisServer, clock: ManualClock
) -> None:
    now = clock.now()
    first = redis_store(redis_server)
    await first.revoke(revocation("j1", until=now + 900), now)
    version, _ = await first.revocations(-1)
    await first.close()

    second = redis_store(redis_server)
    try:
        assert await second.revocations(-1) == (version, [revocation("j1", until=now + 900)])
        assert await second.revocations(version) == (version, None)
    finally:
        await second.close()


async def test_redis_revocation_list_expires_with_its_last_entry(
    redis_server: RedisServer, clock: ManualClock
) -> None:
    store = redis_store(redis_server)
    now = clock.now()
    try:
        await store.revoke(revocation("a", until=now + 300), now)
        await store.revoke(revocation("b", until=now + 900), now)
        assert pttl(redis_server, f"{PREFIX}:{{rev}}") == pytest.approx(900_000, abs=500)
        # Everything in force has passed: the hash goes, and a reader sees an empty list.
        await store.revoke(revocation("c", until=now + 1000), now + 2000)
        assert pttl(redis_server, f"{PREFIX}:{{rev}}") == -2
        assert await store.revocations(-1) == (0, [])
    finally:
        await store.close()


async def test_redis_check_and_touch_is_one_evalsha_round_trip(
    redis_server: RedisServer, clock: ManualClock
) -> None:
    store = redis_store(redis_server)
    iat = clock.now()
    try:
        await store.check_and_touch(make_touch(iat, initial=iat))  # loads the script once
        redis_server.command("CONFIG", "RESETSTAT")
        for i in range(50):
            touch = make_touch(iat + i, key=f"k{i % 7}", initial=iat, extend=i % 3 != 0)
            await store.check_and_touch(touch)
        calls = command_calls(redis_server)
        # commandstats also counts what the script runs inside: one GET each, then writes.
        assert calls.pop("evalsha") == 50
        assert calls.pop("get") == 50
        assert set(calls) <= {"set", "pttl", "pexpire"}
    finally:
        await store.close()


async def test_redis_keys_hold_no_raw_ids(redis_server: RedisServer, clock: ManualClock) -> None:
    config = StoreConfig(url=redis_server.url, key_prefix=PREFIX)
    hasher = hasher_from_config(config, environ={})
    store = redis_store(redis_server)
    raw_jti, raw_sub = "jti-0b7d3c9e-raw", "alice@example.com"
    now = clock.now()
    try:
        await store.check_and_touch(make_touch(now, key=hasher("jti", raw_jti), initial=now))
        sub = Revocation(kind="sub", key=hasher("sub", raw_sub), issued_before=now, until=now + 60)
        await store.revoke(sub, now)
        dump = redis_server.command("KEYS", "*") + redis_server.command(
            "HGETALL", f"{PREFIX}:{{rev}}"
        )
        assert b"a:" + hasher("jti", raw_jti).encode() in dump
        assert raw_jti.encode() not in dump
        assert raw_sub.encode() not in dump
    finally:
        await store.close()


async def test_redis_stop_gives_store_unavailable_and_restart_recovers(
    redis_server: RedisServer, clock: ManualClock
) -> None:
    store = redis_store(redis_server, timeout=0.5)
    iat = clock.now()
    errors_before = metric("idlegate_store_errors_total", "check_and_touch")
    try:
        await store.check_and_touch(make_touch(iat, initial=iat))
        redis_server.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.check_and_touch(make_touch(iat + 1, initial=iat))
        with pytest.raises(StoreUnavailable):
            await store.ping()
        assert time.monotonic() - started < 1.5
        assert metric("idlegate_store_errors_total", "check_and_touch") == errors_before + 1

        redis_server.start()  # same port, empty (and without the script: NOSCRIPT -> reload)
        await store.ping()
        result = await store.check_and_touch(make_touch(iat + 2, initial=iat))
        assert result == TouchResult(last_activity=iat, idle=False)
        assert await store.last_activity("k1") == iat + 2
    finally:
        await store.close()


async def test_redis_call_past_timeout_fails_and_leaves_no_stale_reply(
    redis_server: RedisServer, clock: ManualClock
) -> None:
    store = redis_store(redis_server, timeout=0.1)
    iat = clock.now()
    try:
        await store.check_and_touch(make_touch(iat + 5, key="a", initial=iat))
        await store.check_and_touch(make_touch(iat + 7, key="b", initial=iat))
        redis_server.command("CLIENT", "PAUSE", "300", "ALL")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="timed out"):
            await store.last_activity("a")
        assert time.monotonic() - started < 0.25
        await asyncio.sleep(0.35 - (time.monotonic() - started))  # until the pause is over
        # Had the late reply to "a" stayed on a pooled connection, this would read iat + 5.
        assert await store.last_activity("b") == iat + 7
        result = await store.check_and_touch(make_touch(iat + 9, key="b", initial=iat))
        assert result == TouchResult(last_activity=iat + 7, idle=False)
    finally:
        await store.close()


async def test_redis_calls_honour_cancellation_at_any_moment(redis_server: RedisServer) -> None:
    """A cancelled call ends: the revocation poll is cancelled at shutdown, and a call that
    swallowed it (Python 3.11's asyncio.wait_for, used by redis-py with socket_timeout) kept
    the worker alive for ever. Cancel at random points of many calls; each must end."""
    store = redis_store(redis_server)
    rng = random.Random(7)

    async def poll() -> None:
        while True:
            await store.revocations(0)
            await store.ping()

    try:
        for _ in range(300):
            task = asyncio.create_task(poll())
            await asyncio.sleep(rng.random() * 0.002)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=1.0)
            assert done, "a cancelled store call kept running"
            assert task.cancelled()
        await store.ping()  # and the store is still usable
    finally:
        await store.close()


async def test_redis_store_metrics_count_calls(
    redis_server: RedisServer, clock: ManualClock
) -> None:
    store = redis_store(redis_server)
    iat = clock.now()
    metrics.flush()
    before = metric("idlegate_store_duration_seconds_count", "check_and_touch")
    try:
        await store.check_and_touch(make_touch(iat, initial=iat))
        await store.ping()
    finally:
        await store.close()
    metrics.flush()  # the request path's histograms are batched until a scrape
    after = metric("idlegate_store_duration_seconds_count", "check_and_touch")
    assert after == before + 1


async def test_a_redis_outage_is_one_line_when_it_starts_and_one_when_it_ends(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The revocation poll (every 50 ms here) and requests keep failing while Redis is down:
    the log gets one line when the outage starts and one when it ends, with its duration and
    how many calls failed, not a warning per failed call."""
    store = redis_store(redis_server, timeout=0.2)
    revocations = RevocationList(store, SystemClock(), poll_interval=0.05)
    caplog.set_level(logging.INFO)
    try:
        await revocations.start()
        redis_server.stop()
        for _ in range(5):
            with pytest.raises(StoreUnavailable):
                await store.ping()
        await asyncio.sleep(0.6)
        redis_server.start()
        await asyncio.sleep(0.3)  # the poll succeeds again
        await store.ping()
    finally:
        await revocations.close()
        await store.close()
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelname for r in lines] == ["ERROR", "WARNING"], [r.getMessage() for r in lines]
    started, ended = (r.getMessage() for r in lines)
    assert "unavailable" in started
    match = re.search(r"available again after ([\d.]+) s; (\d+) calls failed", ended)
    assert match is not None, ended
    assert 0.6 <= float(match.group(1)) < 2.0
    assert int(match.group(2)) >= 5 + 5  # the pings, and the poll's ~10 attempts


async def test_requests_forwarded_through_an_outage_are_not_a_warning_each(
    gateways: GatewayFactory, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """on_error allow through a Redis outage: every request is counted (metric, access log),
    the log gets the outage's start line and one fallback line, not one per request."""
    gw = await gateways(store_url=redis_server.url, store={"on_error": "allow"})
    token = gw.token()
    redis_server.stop()
    caplog.set_level(logging.WARNING)
    for _ in range(30):
        assert (await gw.get("/api/x", token)).status == 200
    fallback = [r for r in caplog.records if "without idle check" in r.getMessage()]
    assert len(fallback) == 1, [r.getMessage() for r in caplog.records]


async def test_a_kept_touch_command_decides_like_a_fresh_one(redis_server: RedisServer):
    """On Redis's own clock the request path reuses each (token, route) touch command packed
    (RedisStore._packed_touch). A passive and an extending route of one token, and a route
    with another idle timeout, must each keep their own command, every time they repeat."""
    store = redis_store(redis_server, caller_time=False)
    try:
        start = time.time()

        def touch(*, extend: bool, idle: float = 1.0) -> Touch:
            return Touch(
                key="kept", initial=start, now=0.0, idle_timeout=idle, extend=extend,
                expires_at=start + 60, linger=5.0, remember_idle=False,
            )  # fmt: skip

        assert not (await store.check_and_touch(touch(extend=True))).idle
        for _ in range(2):  # the passive command, kept after its first use, extends nothing
            await asyncio.sleep(0.6)
            passive = await store.check_and_touch(touch(extend=False))
        assert passive.idle  # 1.2 s after the only extending touch, with a 1 s timeout
        # The same token on a route with a longer timeout: its own command, not the kept one.
        assert not (await store.check_and_touch(touch(extend=False, idle=30.0))).idle
        assert (await store.check_and_touch(touch(extend=True))).idle  # and never revived
    finally:
        await store.close()
