"""`--workers N`: the admin API answers the same whichever worker the kernel hands the
connection to."""

from __future__ import annotations

import aiohttp
from conftest import RedisServer
from harness import Upstream

from .conftest import Spawn
from .processes import e2e_config
from .test_workers import wait_for_workers

ADMIN = {"Authorization": "Bearer admin-secret"}


async def test_a_token_view_right_after_its_revocation_says_revoked_at_every_worker(
    spawn: Spawn, upstream: Upstream, key_file, redis_server: RedisServer, tmp_path
):
    """An operator's script revokes, then checks: it must not read "not revoked" from a worker
    whose own list has not been polled yet (a long revocation_poll makes that a certainty)."""
    token_file = tmp_path / "admin.token"
    token_file.write_text("admin-secret\n")
    data = e2e_config(
        upstream.url,
        key_file,
        store={"url": redis_server.url, "revocation_poll": "30s"},
        admin={"token_file": str(token_file)},
    )
    gw = spawn(data, "--workers", "3")
    await wait_for_workers(gw, 3)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for n in range(3):
            jti = f"jti-{n}"
            async with http.post(
                gw.admin_url + "/admin/revoke", json={"jti": jti}, headers=ADMIN
            ) as response:
                assert response.status == 204
            seen = []
            for _ in range(6):  # fresh connections: spread over the workers
                async with http.get(
                    gw.admin_url + f"/admin/tokens/{jti}", headers=ADMIN
                ) as response:
                    assert response.status == 200
                    seen.append((await response.json())["revoked"])
            assert seen == [True] * 6
    assert await gw.stop() == 0, gw.describe()
