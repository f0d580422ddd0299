"""Every Prometheus metric, defined once.

With `--workers N` the CLI sets `PROMETHEUS_MULTIPROC_DIR` before this module is imported, so
each worker writes its samples to shared files and a scrape of any worker shows the sum.
Every gauge is a "live" one: the supervisor's mark_process_dead removes a dead worker's file,
so its last values stop counting (a plain "max" would report them forever). A dead worker's
counters and histograms stay, so that sums never go backwards.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from gateway import __version__

# Sub-millisecond gateway overhead up to slow upstreams.
LATENCY_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
IDLE_GAP_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600)

REQUESTS = Counter(
    "idlegate_requests_total",
    "Requests by route prefix, decision (allowed|rejected|error) and reason code.",
    ["route", "decision", "reason"],
)
FORWARD_AUTH_REQUESTS = Counter(
    "idlegate_forward_auth_requests_total",
    "Forward-auth decisions (also counted in idlegate_requests_total), by route prefix, "
    "decision and reason code: the front door that decided.",
    ["route", "decision", "reason"],
)
REQUEST_DURATION = Histogram(
    "idlegate_request_duration_seconds",
    "Whole request time at the gateway, by route prefix.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    "idlegate_upstream_duration_seconds",
    "Time until the upstream's response headers, by route prefix.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
STORE_DURATION = Histogram(
    "idlegate_store_duration_seconds",
    "Store round trips by operation.",
    ["op"],
    buckets=STORE_BUCKETS,
)
STORE_ERRORS = Counter(
    "idlegate_store_errors_total",
    "Store operations that failed or timed out, by operation.",
    ["op"],
)
JWKS_REFRESH = Counter(
    "idlegate_jwks_refresh_total",
    "Key set fetches by provider and result (ok|error).",
    ["provider", "result"],
)
JWKS_KEYS = Gauge(
    "idlegate_jwks_keys",
    "Usable keys held per provider.",
    ["provider"],
    multiprocess_mode="livemax",
)
IN_FLIGHT = Gauge(
    "idlegate_in_flight_requests",
    "Requests being handled right now.",
    multiprocess_mode="livesum",
)
BUILD_INFO = Gauge(
    "idlegate_build_info",
    "Always 1; the version label says what runs.",
    ["version"],
    multiprocess_mode="livemax",
)
BUILD_INFO.labels(version=__version__).set(1)
TOKEN_IDLE_GAP = Histogram(
    "idlegate_token_idle_gap_seconds",
    "On accepted requests: seconds since the token's (or session's) last activity.",
    buckets=IDLE_GAP_BUCKETS,
)
STORE_COALESCED = Counter(
    "idlegate_store_coalesced_total",
    "Activity checks decided locally with store.coalesce (no store call: the token was "
    "accepted through the store less than store.coalesce ago).",
)
STORE_FLUSH_KEYS = Counter(
    "idlegate_store_flush_keys_total",
    "Activity records written by store.coalesce's batched flushes (op flush of "
    "idlegate_store_duration_seconds / idlegate_store_errors_total).",
)
STORE_FLUSH_DROPPED = Counter(
    "idlegate_store_flush_dropped_total",
    "Locally decided activity writes dropped unwritten (the pending limit reached while the "
    "store failed, or the last flush at shutdown timed out): those tokens may idle out early.",
)
STORE_FALLBACKS = Counter(
    "idlegate_store_fallbacks_total",
    "Requests decided without the store because it failed (on_error allow|grace), by mode.",
    ["mode"],
)
ADMIN_REQUESTS = Counter(
    "idlegate_admin_requests_total",
    "Admin API requests by outcome (ok|unauthorized|disabled|bad_request).",
    ["outcome"],
)
REVOCATIONS = Gauge(
    "idlegate_revocations",
    "Revocation entries currently in force at this instance.",
    multiprocess_mode="livemax",
)
REVOCATIONS_RESTORED = Counter(
    "idlegate_revocations_restored_total",
    "Revocations this instance wrote back to a store that had lost them (alert on any).",
)
REVOCATIONS_UNREPLICATED = Counter(
    "idlegate_revocations_unreplicated_total",
    "Revocations answered 204 though no Redis replica acknowledged them within store.timeout.",
)
CLIENT_CONNECTIONS = Gauge(
    "idlegate_client_connections",
    "Client connections open on the proxy (and forward-auth) listeners; at most "
    "server.max_connections per process.",
    multiprocess_mode="livesum",
)
CONNECTION_LIMIT_REACHED = Counter(
    "idlegate_connection_limit_reached_total",
    "Times server.max_connections was reached: accepting paused, new clients waited in the "
    "listen backlog.",
)
CLIENT_TIMEOUTS = Counter(
    "idlegate_client_timeouts_total",
    "Client connections the gateway closed for slowness: header_timeout (request head not "
    "complete in time), body_timeout (no byte of a request body for that long).",
    ["timeout"],
)
WEBSOCKETS_OPEN = Gauge(
    "idlegate_websockets_open",
    "WebSockets relayed right now (also counted in idlegate_in_flight_requests).",
    multiprocess_mode="livesum",
)
WEBSOCKET_CLOSES = Counter(
    "idlegate_websocket_closes_total",
    "Relayed WebSockets closed, by route prefix and reason (a reason code such as expired, "
    "idle_timeout, revoked, session_too_old, store_unavailable; or client_closed, "
    "upstream_closed, message_too_big, drain).",
    ["route", "reason"],
)
STREAM_CUTS = Counter(
    "idlegate_stream_cuts_total",
    "Responses on stream_deadline routes cut at a token deadline, by route prefix and reason.",
    ["route", "reason"],
)


class BatchedHistogram:
    """One labelled histogram observed on the request path: `observe` is the bound `append` of
    a plain list (one C call, no lock, no bucket search), and `flush()` sorts the values into
    the Prometheus histogram's buckets. The gateway flushes before every scrape it serves,
    every second (the other workers' scrapes with --workers) and at shutdown, so the list holds
    at most a second of observations. A locked Prometheus observe() costs several times as
    much, and the request path makes four (figures: bench/RESULTS.md)."""

    __slots__ = ("_bounds", "_child", "_pending", "observe")

    def __init__(self, child: Any) -> None:
        self._child = child
        # The same buckets Histogram.observe picks: the first upper bound >= the value.
        self._bounds: tuple[float, ...] = tuple(child._upper_bounds)
        self._pending: list[float] = []
        self.observe: Callable[[float], None] = self._pending.append

    def flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self.observe = self._pending.append
        # Summed in the order observed, as Histogram.observe adds each value (math.fsum's
        # exact sum costs ~8x as much, for digits no dashboard shows).
        total = sum(pending)
        # Sorted once (in C), each bucket is a difference of two bisections: no Python step per
        # observation. Prometheus's buckets hold each value in the first bound >= it.
        pending.sort()
        buckets = self._child._buckets
        below = 0
        for index, bound in enumerate(self._bounds):
            upto = bisect_right(pending, bound)
            if upto > below:
                buckets[index].inc(upto - below)
                below = upto
        self._child._sum.inc(total)


# By the id of the Prometheus child (children live as long as their metric: the process).
_batched: dict[int, BatchedHistogram] = {}


def batched(child: Any) -> BatchedHistogram:
    """The one batching front of a labelled histogram (e.g. `STORE_DURATION.labels(op=...)`)
    or of an unlabelled one."""
    front = _batched.get(id(child))
    if front is None:
        front = _batched[id(child)] = BatchedHistogram(child)
    return front


class BatchedCounter:
    """A counter counted in a plain int on the request path and added to Prometheus by
    `flush()` (before scrapes, every second, at shutdown), as BatchedHistogram does."""

    __slots__ = ("_child", "count")

    def __init__(self, child: Any) -> None:
        self._child = child
        # Not yet added to Prometheus. A hot path may add to it in place (`counter.count += 1`,
        # no call); `inc` is that as a method. (Not so a TurnCounter's: its `inc` schedules
        # the flush.)
        self.count = 0

    def inc(self) -> None:
        self.count += 1

    def flush(self) -> None:
        if self.count:
            count, self.count = self.count, 0
            self._child.inc(count)


class TurnCounter(BatchedCounter):
    """A BatchedCounter that also adds itself to Prometheus at the end of the event-loop turn
    it was counted in: as prompt as a direct inc() for any scrape (every worker's, with
    --workers), but one locked inc() per turn instead of one per request under load."""

    __slots__ = ()

    def inc(self) -> None:
        if self.count:
            self.count += 1
            return
        self.count = 1
        _turn_dirty.append(self)
        global _turn_loop
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a script, a test): at once
            _flush_turn()
            return
        if _turn_loop is not loop:  # one flush per turn, on whichever loop counts now
            _turn_loop = loop
            loop.call_soon(_flush_turn)


_turn_dirty: list[TurnCounter] = []
_turn_loop: asyncio.AbstractEventLoop | None = None  # the loop a flush is scheduled on


def _flush_turn() -> None:
    global _turn_loop
    _turn_loop = None
    dirty = _turn_dirty[:]
    _turn_dirty.clear()
    for counter in dirty:
        counter.flush()


_batched_counters: dict[int, BatchedCounter] = {}
_turn_counters: dict[int, TurnCounter] = {}


def turn_counter(child: Any) -> TurnCounter:
    """The one TurnCounter of a counter child (the request path's requests counters)."""
    front = _turn_counters.get(id(child))
    if front is None:
        front = _turn_counters[id(child)] = TurnCounter(child)
    return front


def batched_counter(child: Any) -> BatchedCounter:
    """The one batching front of a counter (or of one labelled child of it)."""
    front = _batched_counters.get(id(child))
    if front is None:
        front = _batched_counters[id(child)] = BatchedCounter(child)
    return front


def flush() -> None:
    """Every batched observation into the Prometheus histograms and counters."""
    for front in _batched.values():
        front.flush()
    for counter in _batched_counters.values():
        counter.flush()
    _flush_turn()
