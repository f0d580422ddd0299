"""SIGTERM while requests are in flight: readiness turns 503 at once, the listener closes, every
in-flight request still completes, and the process exits 0 within the grace period."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from harness import Upstream
from jwks_server import SigningKey

from .conftest import Spawn
from .processes import bearer, e2e_config, mint

IN_FLIGHT = 10
UPSTREAM_SECONDS = 1.5
GRACE = 5.0


def connection_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True


async def until(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> float:
    """Poll `condition()` until true; the seconds it took (fails after `timeout`)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"not within {timeout}s"
        await asyncio.sleep(interval)
    return time.monotonic() - started


async def test_sigterm_drains_in_flight_requests_and_exits_0(
    spawn: Spawn, upstream: Upstream, key_file: Path, signing_key: SigningKey
):
    gw = spawn(e2e_config(upstream.url, key_file, server={"shutdown_grace": f"{GRACE}s"}))
    await gw.wait_ready()
    token = mint(signing_key)
    # One connection per request, so that each one is a separate in-flight connection.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:

        async def slow_request() -> tuple[int, dict[str, object]]:
            async with http.get(
                f"{gw.url}/api/slow?s={UPSTREAM_SECONDS}", headers=bearer(token)
            ) as response:
                return response.status, await response.json()

        requests = [asyncio.create_task(slow_request()) for _ in range(IN_FLIGHT)]
        await until(lambda: len(upstream.received) == IN_FLIGHT, timeout=5)

        gw.send(signal.SIGTERM)
        signalled = time.monotonic()
        # Readiness must turn 503 (reason draining) while the requests are still running.
        ready_seen: list[tuple[int, dict[str, object]]] = []
        while True:
            async with http.get(gw.admin_url + "/readyz") as response:
                ready_seen.append((response.status, await response.json()))
            if response.status == 503:
                break
            assert time.monotonic() - signalled < 0.5, ready_seen
            await asyncio.sleep(0.01)
        assert ready_seen[-1][1]["reason"] == "draining"
        assert not any(task.done() for task in requests), "requests finished before readiness"

        # The proxy listener closes soon, still while the requests run.
        await until(lambda: connection_refused(gw.port), timeout=0.5)
        assert not any(task.done() for task in requests), "requests finished before close"

        results = await asyncio.gather(*requests, return_exceptions=True)

    failures = [r for r in results if isinstance(r, BaseException) or r[0] != 200]
    assert failures == [], failures
    code = await gw.wait_exit(timeout=GRACE)
    elapsed = time.monotonic() - signalled
    assert code == 0, gw.describe()
    assert elapsed < GRACE, f"took {elapsed:.2f}s to exit"
    assert "Traceback" not in gw.stderr()


async def test_requests_outliving_the_grace_period_do_not_hold_the_exit(
    spawn: Spawn, upstream: Upstream, key_file: Path, signing_key: SigningKey
):
    """The drain lasts at most shutdown_grace (the chart sizes the pod's termination grace
    period on it), even when an upstream answers later than that."""
    grace = 1.0
    gw = spawn(
        e2e_config(
            upstream.url, key_file, server={"shutdown_grace": f"{grace}s", "access_log": True}
        )
    )
    await gw.wait_ready()
    async with aiohttp.ClientSession() as http:

        async def stuck_request() -> int:
            async with http.get(
                f"{gw.url}/api/slow?s=3",
                headers={**bearer(mint(signing_key, jti="jti-cut")), "X-Request-ID": "req-cut"},
            ) as response:
                await response.read()
                return response.status

        stuck = asyncio.create_task(stuck_request())
        await until(lambda: len(upstream.received) == 1, timeout=5)
        signalled = time.monotonic()
        gw.send(signal.SIGTERM)
        code = await gw.wait_exit(timeout=5)
        elapsed = time.monotonic() - signalled
        outcome = (await asyncio.gather(stuck, return_exceptions=True))[0]
    print(f"exited {elapsed:.2f}s after SIGTERM with a {grace:.0f} s grace ({outcome!r})")
    assert code == 0, gw.describe()
    assert elapsed < grace + 0.8, f"took {elapsed:.2f}s with a {grace:.0f} s grace"
    assert isinstance(outcome, aiohttp.ClientError), outcome  # cut: no answer
    # Cut off, it is still in the access log (and was counted): status 503, reason shutdown.
    lines = [json.loads(line) for line in gw.stdout().splitlines() if line.startswith("{")]
    cut = [line for line in lines if line.get("request_id") == "req-cut"]
    assert len(cut) == 1, gw.describe()
    assert (cut[0]["status"], cut[0]["decision"], cut[0]["reason"]) == (503, "error", "shutdown")
    assert cut[0]["jti"] == "jti-cut"
