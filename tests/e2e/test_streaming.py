"""Bodies stream through the gateway process: 50 MiB up and 50 MiB down arrive intact while the
gateway's resident memory grows by far less than the bodies."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from harness import Upstream
from jwks_server import SigningKey

from .conftest import Spawn
from .processes import bearer, e2e_config, mint

SIZE = 50 * 1024 * 1024
CHUNK = 256 * 1024
MAX_GROWTH = 30 * 1024 * 1024

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


def upstream_block_stream_sha256(size: int) -> str:
    """What the harness upstream's /download sends: bytes 0..255 repeated."""
    block = bytes(range(256)) * 1024
    digest = hashlib.sha256()
    sent = 0
    while sent < size:
        piece = block[: min(len(block), size - sent)]
        digest.update(piece)
        sent += len(piece)
    return digest.hexdigest()


async def test_50_mib_stream_both_ways_without_buffering(
    spawn: Spawn, upstream: Upstream, key_file: Path, signing_key: SigningKey
):
    gw = spawn(e2e_config(upstream.url, key_file, forward={"max_body": "100MiB"}))
    await gw.wait_ready()
    token = mint(signing_key)
    async with aiohttp.ClientSession() as http:
        # Warm up (imports, pools, first-request allocations) before the baseline.
        async with http.post(gw.url + "/api/upload", headers=bearer(token), data=b"x" * CHUNK):
            pass
        async with http.get(gw.url + f"/api/download?n={CHUNK}", headers=bearer(token)) as r:
            await r.read()
        before = memory_kib(gw.pid)

        block = bytes(range(256)) * (CHUNK // 256)
        sent = hashlib.sha256()

        async def upload() -> AsyncIterator[bytes]:
            for i in range(SIZE // CHUNK):
                piece = block[i % 256 :] + block[: i % 256]  # not one repeated buffer
                sent.update(piece)
                yield piece

        async with http.post(
            gw.url + "/api/upload", headers=bearer(token), data=upload()
        ) as response:
            assert response.status == 200
            echoed = await response.json()
        assert echoed["length"] == SIZE
        assert echoed["sha256"] == sent.hexdigest()
        after_upload = memory_kib(gw.pid)

        received = hashlib.sha256()
        length = 0
        async with http.get(gw.url + f"/api/download?n={SIZE}", headers=bearer(token)) as response:
            assert response.status == 200
            async for chunk in response.content.iter_chunked(CHUNK):
                received.update(chunk)
                length += len(chunk)
        assert length == SIZE
        assert received.hexdigest() == upstream_block_stream_sha256(SIZE)
        after = memory_kib(gw.pid)

    growth = (after["VmHWM"] - before["VmHWM"]) * 1024
    print(
        f"gateway RSS: before {before['VmRSS'] / 1024:.1f} MiB (peak {before['VmHWM'] / 1024:.1f}),"
        f" after 50 MiB up {after_upload['VmRSS'] / 1024:.1f} MiB"
        f" (peak {after_upload['VmHWM'] / 1024:.1f}),"
        f" after 50 MiB down {after['VmRSS'] / 1024:.1f} MiB (peak {after['VmHWM'] / 1024:.1f});"
        f" peak growth {growth / 1024**2:.1f} MiB"
    )
    assert growth < MAX_GROWTH
