"""ServerClock: where a Redis server's clock stands against ours, from replies that carry its
TIME. Each sample is a lower bound of the offset; the estimate is the largest recent one, so a
moment sent on the server's clock is never later than ours (the deadline a late call honours)."""

from __future__ import annotations

import pytest

from gateway.store import pipeline
from gateway.store.pipeline import ServerClock


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def local(monkeypatch: pytest.MonkeyPatch) -> FakeMonotonic:
    fake = FakeMonotonic()
    monkeypatch.setattr(pipeline, "monotonic", fake)
    return fake


def test_unknown_until_a_reply_tells_it(local: FakeMonotonic) -> None:
    clock = ServerClock()
    assert clock.offset is None
    assert clock.literal(1000.0) == b""
    clock.sample(5000.25)
    assert clock.offset == 4000.25
    assert clock.literal(1001.0) == b"5001.250000"


def test_the_largest_recent_sample_wins(local: FakeMonotonic) -> None:
    """A reply that came in late (its TIME older than our reading) gives a smaller offset: the
    best recent sample is kept."""
    clock = ServerClock()
    clock.sample(5000.0)  # offset 4000
    local.now += 1
    clock.sample(5000.5)  # came in 0.5 s late: 3999.5
    assert clock.offset == 4000.0
    local.now += 1
    clock.sample(5002.01)  # 4000.01: a better bound
    assert clock.offset == pytest.approx(4000.01)


def test_a_server_clock_step_is_followed(local: FakeMonotonic) -> None:
    clock = ServerClock()
    clock.sample(5000.0)
    local.now += 1
    clock.sample(5001.0 + 30)  # stepped forward 30 s: at once
    assert clock.offset == pytest.approx(4030.0)
    # Stepped back 60 s: the forward samples age out within two windows.
    for _ in range(int(2 * ServerClock.WINDOW) + 2):
        local.now += 1
        clock.sample(local.now + 4000 - 30)
    assert clock.offset == pytest.approx(3970.0)


def test_a_long_silence_forgets_the_old_samples(local: FakeMonotonic) -> None:
    clock = ServerClock()
    clock.sample(5000.0)
    local.now += 5 * ServerClock.WINDOW
    clock.sample(local.now + 3990)
    assert clock.offset == pytest.approx(3990.0)
