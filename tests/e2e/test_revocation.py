"""Revocation across two `serve` processes sharing one Redis: revoked at A by jti, sub or sid,
refused at B within 1 s, still refused after B restarts; the admin API's token view and its
authorization, as an operator meets them."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
from conftest import RedisServer
from harness import Upstream
from jwks_server import SigningKey

from .conftest import Spawn
from .processes import GatewayProcess, bearer, e2e_config, mint

ADMIN_TOKEN = "e2e-admin-token-0123456789"
PROPAGATION = 1.0
UNAUTHORIZED = re.compile(
    r'^idlegate_admin_requests_total\{outcome="unauthorized"\} ([0-9.e+]+)$', re.MULTILINE
)


async def status_of(
    http: aiohttp.ClientSession, gw: GatewayProcess, token: str
) -> tuple[int, str | None]:
    async with http.get(gw.url + "/api/orders", headers=bearer(token)) as response:
        body = await response.json()
        return response.status, body.get("reason")


async def revoke(http: aiohttp.ClientSession, gw: GatewayProcess, body: dict[str, str]) -> None:
    async with http.post(
        gw.admin_url + "/admin/revoke", json=body, headers=bearer(ADMIN_TOKEN)
    ) as response:
        assert response.status == 204, await response.text()


async def refused_as_revoked_within(
    http: aiohttp.ClientSession, gw: GatewayProcess, token: str, since: float
) -> float:
    """Poll every 50 ms until `token` is refused `revoked`; seconds since `since`."""
    while True:
        status, reason = await status_of(http, gw, token)
        elapsed = time.monotonic() - since
        if (status, reason) == (401, "revoked"):
            return elapsed
        assert status == 200, (status, reason)
        assert elapsed < PROPAGATION, f"still accepted {elapsed:.2f}s after the revocation"
        await asyncio.sleep(0.05)


async def unauthorized_count(http: aiohttp.ClientSession, gw: GatewayProcess) -> float:
    async with http.get(gw.admin_url + "/metrics") as response:
        found = UNAUTHORIZED.search(await response.text())
    return float(found.group(1)) if found else 0.0


async def test_revocation_reaches_every_instance_and_survives_restarts(
    spawn: Spawn,
    upstream: Upstream,
    key_file: Path,
    signing_key: SigningKey,
    redis_server: RedisServer,
    tmp_path: Path,
):
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN + "\n")

    def config() -> dict[str, Any]:
        # The product's default poll interval (250 ms), not the integration tests' faster one.
        return e2e_config(
            upstream.url,
            key_file,
            admin={"token_file": str(token_file)},
            store={"url": redis_server.url, "revocation_poll": "250ms"},
        )

    a = spawn(config(), name="a")
    b = spawn(config(), name="b")
    await asyncio.gather(a.wait_ready(), b.wait_ready())

    by_jti = mint(signing_key, jti="jti-revoked", sub="carol")
    old_of_sub = mint(signing_key, sub="bob")
    by_sid = mint(signing_key, sub="dave", sid="session-9")
    async with aiohttp.ClientSession() as http:
        for token in (by_jti, old_of_sub, by_sid):
            assert await status_of(http, a, token) == (200, None)
            assert await status_of(http, b, token) == (200, None)

        # By jti: revoked at A, refused at B within a second.
        revoked_at = time.monotonic()
        await revoke(http, a, {"jti": "jti-revoked"})
        elapsed = await refused_as_revoked_within(http, b, by_jti, revoked_at)
        print(f"jti revocation reached the other instance after {elapsed * 1000:.0f} ms")
        assert await status_of(http, a, by_jti) == (401, "revoked")

        # By sub: tokens issued up to now + leeway are refused; one issued later is accepted.
        revoked_at = time.monotonic()
        await revoke(http, a, {"sub": "bob"})
        answered = time.time()
        await refused_as_revoked_within(http, b, old_of_sub, revoked_at)
        # iat just past answered + leeway (30 s), and no longer in the future beyond leeway.
        later = int(answered) + 1
        await asyncio.sleep(max(0.0, later - time.time()))
        newer = mint(signing_key, sub="bob", now=later + 30)
        assert await status_of(http, b, newer) == (200, None)
        assert await status_of(http, a, newer) == (200, None)

        # By sid: every token of the session.
        revoked_at = time.monotonic()
        await revoke(http, a, {"sid": "session-9"})
        await refused_as_revoked_within(http, b, by_sid, revoked_at)
        assert await status_of(http, b, mint(signing_key, sid="session-9")) == (401, "revoked")

        # The token view: activity it had before the revocation, and that it is revoked.
        async with http.get(
            a.admin_url + "/admin/tokens/jti-revoked", headers=bearer(ADMIN_TOKEN)
        ) as response:
            assert response.status == 200
            view = await response.json()
        assert view["revoked"] is True
        assert abs(view["last_activity"] - time.time()) < 30
        assert 0 < view["idle_remaining_seconds"] <= 900

        # Admin authorization: missing and wrong tokens are 401 and counted.
        before = await unauthorized_count(http, a)
        async with http.post(a.admin_url + "/admin/revoke", json={"jti": "x"}) as response:
            assert response.status == 401
        async with http.get(
            a.admin_url + "/admin/tokens/jti-revoked", headers=bearer("wrong-token")
        ) as response:
            assert response.status == 401
            assert "revoked" not in await response.text()
        assert await unauthorized_count(http, a) == before + 2

    # Restart B: the revocations live in Redis, not in B's memory.
    assert await b.stop() == 0, b.describe()
    b.start()
    await b.wait_ready()
    async with aiohttp.ClientSession() as http:
        assert await status_of(http, b, by_jti) == (401, "revoked")
        assert await status_of(http, b, old_of_sub) == (401, "revoked")
        assert await status_of(http, b, by_sid) == (401, "revoked")
        assert await status_of(http, b, newer) == (200, None)
