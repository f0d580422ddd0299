"""The request path's histograms are batched; once flushed they must read exactly as if every
value had been observed by prometheus_client itself (same buckets, boundaries included)."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway import metrics

BUCKETS = (0.001, 0.01, 0.1, 1.0)


def test_flushed_batches_equal_direct_observations() -> None:
    registry = CollectorRegistry()
    direct = Histogram("direct_seconds", "d", ["route"], buckets=BUCKETS, registry=registry)
    via = Histogram("batched_seconds", "b", ["route"], buckets=BUCKETS, registry=registry)
    front = metrics.batched(via.labels("/api/"))
    assert metrics.batched(via.labels("/api/")) is front  # one front per child
    rng = random.Random(3)
    # Exactly on the bounds, between them, above the last one, and zero.
    values = [*BUCKETS, 0.0, 5.0] + [rng.uniform(0, 2) for _ in range(500)]
    for value in values:
        direct.labels("/api/").observe(value)
        front.observe(value)
    before = generate_latest(registry).decode()
    assert 'batched_seconds_count{route="/api/"} 0.0' in before  # nothing until flushed
    metrics.flush()
    lines = generate_latest(registry).decode().splitlines()
    samples = sorted(
        line.replace("batched_", "X_") for line in lines if line.startswith("batched_seconds_")
    )
    expected = sorted(
        line.replace("direct_", "X_") for line in lines if line.startswith("direct_seconds_")
    )
    created = [line for line in expected if "_created" in line]
    assert [s for s in samples if "_created" not in s] == [e for e in expected if e not in created]
    metrics.flush()  # a second flush adds nothing
    assert generate_latest(registry).decode().splitlines() == lines


async def test_turn_counters_reach_prometheus_by_the_end_of_the_loop_turn() -> None:
    """The requests counters: counted in an int, added to Prometheus once per event-loop turn
    (so any scrape, every worker's included, sees every finished request)."""
    import asyncio

    from prometheus_client import Counter

    registry = CollectorRegistry()
    counter = Counter("turned", "t", ["route"], registry=registry)
    front = metrics.turn_counter(counter.labels("/api/"))
    assert metrics.turn_counter(counter.labels("/api/")) is front

    def value() -> float | None:
        return registry.get_sample_value("turned_total", {"route": "/api/"})

    for _ in range(5):
        front.inc()
    assert value() == 0.0  # not yet: the turn is not over
    await asyncio.sleep(0)
    assert value() == 5.0
    front.inc()
    metrics.flush()  # a scrape in the same turn flushes it too
    assert value() == 6.0
    await asyncio.sleep(0)
    assert value() == 6.0  # and the end of the turn adds nothing twice
    front.inc()
    await asyncio.sleep(0)
    assert value() == 7.0


def test_a_turn_counter_without_a_running_loop_counts_at_once() -> None:
    from prometheus_client import Counter

    registry = CollectorRegistry()
    front = metrics.turn_counter(Counter("noloop", "n", registry=registry))
    front.inc()
    front.inc()
    assert registry.get_sample_value("noloop_total") == 2.0
