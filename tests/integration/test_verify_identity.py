"""What the upstream is told about a token is what the gateway tracks, logs and revokes it by:
an empty `jti` (which `policy.token_id` skips) forwards the `digest:…` id, an empty `sub` none."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from conftest import GatewayFactory
from harness import GatewayUnderTest, Upstream


def forwarded(upstream: Upstream, name: str) -> list[str]:
    return [v for k, v in upstream.received[-1].header_list if k.lower() == name.lower()]


async def admin(gw: GatewayUnderTest, method: str, path: str, **kwargs: object) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, gw.admin_url + path, headers={"Authorization": "Bearer t0ken"}, **kwargs
        ) as response,
    ):
        await response.read()
        return response.status


@pytest.mark.parametrize("jti", ["", None])
async def test_a_token_without_a_usable_jti_forwards_the_id_it_is_revoked_by(
    gateways: GatewayFactory, upstream: Upstream, tmp_path: Path, jti: str | None
):
    token_file = tmp_path / "admin.token"
    token_file.write_text("t0ken")
    gw = await gateways(admin={"token_file": str(token_file)})
    token = gw.token(jti=jti)  # None: no jti claim at all
    assert (await gw.get("/api/x", token)).status == 200
    [token_id] = forwarded(upstream, "X-Auth-Token-Id")
    assert token_id.startswith("digest:")
    assert await admin(gw, "GET", f"/admin/tokens/{token_id}") == 200
    assert await admin(gw, "POST", "/admin/revoke", json={"jti": token_id}) == 204
    refused = await gw.get("/api/x", token)
    assert (refused.status, (await refused.json())["reason"]) == (401, "revoked")


async def test_an_empty_sub_or_uti_is_no_identity_upstream(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways(
        policy={"token_id": ["jti", "uti", "digest"]},
        forward={
            "identity_headers": {
                "X-Auth-Subject": "sub",
                "X-Auth-Token-Id": "jti",
                "X-Auth-Email": "email",
            }
        },
    )
    token = gw.token(sub="", jti="", uti="", email="")
    assert (await gw.get("/api/x", token)).status == 200
    assert forwarded(upstream, "X-Auth-Subject") == []
    assert forwarded(upstream, "X-Auth-Email") == []
    [token_id] = forwarded(upstream, "X-Auth-Token-Id")
    assert token_id.startswith("digest:")


async def test_the_token_id_header_is_the_id_policy_token_id_picked(
    gateways: GatewayFactory, upstream: Upstream
):
    # token_id [uti, jti]: a token with both is tracked (logged, revoked) by its uti.
    gw = await gateways(policy={"token_id": ["uti", "jti", "digest"]})
    assert (await gw.get("/api/x", gw.token(uti="u-1", jti="j-1"))).status == 200
    assert forwarded(upstream, "X-Auth-Token-Id") == ["u-1"]
