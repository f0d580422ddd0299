"""Shutdown never waits without limit: a close step that hangs is abandoned after a bound, and
the log says which task was stuck where."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from gateway import serve


async def _stuck_for_ever() -> None:
    await asyncio.Event().wait()


async def test_a_hanging_close_step_is_abandoned_and_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(serve, "_CLOSE_TIMEOUT", 0.1)
    caplog.set_level(logging.ERROR, logger="idlegate")
    helper = asyncio.create_task(_stuck_for_ever(), name="stuck-helper")
    started = time.monotonic()
    await serve._bounded("closing the test's store", _stuck_for_ever())
    assert time.monotonic() - started < 1.0
    messages = [record.getMessage() for record in caplog.records]
    assert any("closing the test's store did not finish" in m for m in messages), messages
    # The stuck task is named with the line it waits on.
    assert any("stuck-helper" in m and "_stuck_for_ever" in m for m in messages), messages
    helper.cancel()


async def test_a_failing_close_step_is_logged_and_shutdown_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken() -> None:
        raise OSError("socket already gone")

    caplog.set_level(logging.ERROR, logger="idlegate")
    await serve._bounded("closing the admin listener", broken())
    assert "closing the admin listener failed" in caplog.text
    assert "socket already gone" in caplog.text


async def test_leftover_tasks_are_cancelled_before_exit() -> None:
    leftover = asyncio.create_task(_stuck_for_ever())
    await serve._cancel_leftovers()
    assert leftover.cancelled()
