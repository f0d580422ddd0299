"""The slow-client limits in `idlegate serve` itself (uvloop, the production event loop)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from harness import Upstream

from .conftest import Spawn
from .processes import e2e_config

HEAD = b"GET /public/x HTTP/1.1\r\nHost: gateway\r\n\r\n"


async def test_serve_cuts_a_slowloris_and_holds_connections_over_the_cap(
    spawn: Spawn, upstream: Upstream, key_file: Path
):
    gw = spawn(
        e2e_config(
            upstream.url,
            key_file,
            server={"header_timeout": "1s", "keepalive_timeout": "60s", "max_connections": 2},
        )
    )
    await gw.wait_ready()

    # Two connections fill the cap: one served and kept alive, one dripping a head.
    served_reader, served = await asyncio.open_connection("127.0.0.1", gw.port)
    served.write(HEAD)
    assert (await served_reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    slow_reader, slow = await asyncio.open_connection("127.0.0.1", gw.port)
    started = time.monotonic()
    slow.write(HEAD[:5])
    # The third waits in the backlog ...
    third_reader, third = await asyncio.open_connection("127.0.0.1", gw.port)
    third.write(HEAD)
    answer = asyncio.create_task(third_reader.readuntil(b"\r\n\r\n"))
    for byte in HEAD[5:11]:  # 0.6 s, within header_timeout
        slow.write(bytes([byte]))
        await asyncio.sleep(0.1)
    assert not answer.done(), "served over max_connections"
    # ... until the slowloris is cut at header_timeout, which frees its place.
    async with asyncio.timeout(2):
        assert (await slow_reader.read()).startswith(b"HTTP/1.1 408 ")
    assert 0.9 <= time.monotonic() - started <= 2.0
    async with asyncio.timeout(1):
        assert (await answer).startswith(b"HTTP/1.1 200 ")
    for writer in (served, slow, third):
        writer.close()
    assert await gw.stop(signal.SIGTERM) == 0, gw.describe()
    assert "Traceback" not in gw.stderr()
    assert "server.max_connections (2) reached" in gw.stderr()
