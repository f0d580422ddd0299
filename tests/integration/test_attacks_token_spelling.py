"""One token, one identity: what a client can re-spell of a token it holds (its signature's
base64url text, an ECDSA signature's twin, the Authorization header around it) neither
escapes a revocation nor grows the gateway's caches; and what an IdP's claims can hold that
no header can carry (a lone surrogate, a control character, a list item with a space) never
reaches the upstream as something else."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from attacks import requests_counted
from conftest import GatewayFactory
from harness import AUDIENCE, ISSUER, GatewayUnderTest, Upstream
from jwks_server import SigningKey, claims, ec_key

from gateway.tokens.verify import _P256


def respelled(token: str) -> str:
    """The token with its signature's last character's spare bits set: the same bytes."""
    head, payload, signature = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    spare = {2: 0b1111, 3: 0b11}[len(signature) % 4]
    index = alphabet.index(signature[-1])
    assert index & spare == 0  # the issuer's spelling is the canonical one
    return f"{head}.{payload}.{signature[:-1]}{alphabet[index | 1]}"


def twin(token: str) -> str:
    """An ES256 token's signature (r, s) as (r, n - s): as valid, another text."""
    head, payload, signature = token.split(".")
    raw = base64.urlsafe_b64decode(signature + "==")
    r, s = raw[:32], int.from_bytes(raw[32:], "big")
    flipped = base64.urlsafe_b64encode(r + (_P256 - s).to_bytes(32, "big")).rstrip(b"=")
    return f"{head}.{payload}.{flipped.decode()}"


async def revoke(gw: GatewayUnderTest, token_file: str, body: dict[str, Any]) -> None:
    headers = {"Authorization": "Bearer t0ken"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(gw.admin_url + "/admin/revoke", json=body, headers=headers) as r,
    ):
        assert r.status == 204, await r.text()
    await asyncio.sleep(0.3)  # the revocation poll (100 ms)


@pytest.fixture
def ec_signer(tmp_path: Path) -> tuple[SigningKey, Path]:
    key = ec_key(kid="ec-1")
    path = tmp_path / "ec.pem"
    path.write_bytes(key.public_pem())
    return key, path


def jti_less(gw: GatewayUnderTest) -> dict[str, Any]:
    payload = claims(ISSUER, AUDIENCE, now=gw.clock.now())
    del payload["jti"]  # tracked, and revoked, by its `digest` id
    return payload


def ec_provider(path: Path) -> dict[str, Any]:
    return {
        "name": "ec",
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "algorithms": ["ES256"],
        "public_key_file": str(path),
    }


async def test_a_respelled_signature_is_malformed_not_another_token(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways()
    token = gw.token(jti=None)
    assert (await gw.get("/api/x", token)).status == 200
    before = requests_counted("/api/", "rejected", "malformed_token")
    response = await gw.get("/api/x", respelled(token))
    assert response.status == 401
    assert (await response.json())["reason"] == "malformed_token"
    assert requests_counted("/api/", "rejected", "malformed_token") == before + 1
    assert len(upstream.received) == 1


async def test_a_revoked_token_without_jti_stays_revoked_under_any_spelling(
    gateways: GatewayFactory, upstream: Upstream, tmp_path: Path, ec_signer: Any
):
    key, path = ec_signer
    token_file = tmp_path / "admin-token"
    token_file.write_text("t0ken")
    gw = await gateways(admin={"token_file": str(token_file)}, providers=[ec_provider(path)])
    # Half of all ECDSA signatures have a high s: the IdP's token may be either twin.
    token = key.sign(jti_less(gw))
    other = twin(token)
    for spelling in (token, other):
        assert (await gw.get("/api/x", spelling)).status == 200
    await revoke(gw, str(token_file), {"token": token})
    for spelling in (token, other):
        response = await gw.get("/api/x", spelling)
        assert response.status == 401
        assert (await response.json())["reason"] == "revoked"
    # Revoked by its twin, it is the same: one token, one id.
    fresh = key.sign({**jti_less(gw), "nonce": "2"})
    await revoke(gw, str(token_file), {"token": twin(fresh)})
    assert (await gw.get("/api/x", fresh)).status == 401
    assert len(upstream.received) == 2


async def test_respelled_authorization_values_share_one_cache_entry(gateways: GatewayFactory):
    gw = await gateways()
    token = gw.token()
    verifier, admitted = gw.gateway.pipeline.verifier, gw.gateway.pipeline._admitted
    assert (await gw.get("/api/x", token)).status == 200
    kept = len(verifier._cache), len(admitted), verifier._cache.chars
    for n in range(2, 60):
        for scheme in ("Bearer", "BEARER", "bEaReR"):
            headers = {"Authorization": f"{scheme}{' ' * n}{token}"}
            response = await gw.http.get(gw.url + "/api/x", headers=headers)
            assert response.status == 200
    # Each spelling is the one token: found under it, none kept under its header value.
    assert (len(verifier._cache), len(admitted)) <= (kept[0] + 1, kept[1])
    assert verifier._cache.chars <= kept[2] + len(token)


@pytest.mark.parametrize(
    "sub",
    [chr(0xD800) + "admin", "admin" + chr(0xDFFF), chr(0xDC80) + "admin"],
    ids=["high", "low", "surrogateescape"],
)
async def test_a_claim_no_utf_8_can_carry_refuses_the_token(
    gateways: GatewayFactory, upstream: Upstream, sub: str
):
    gw = await gateways(forward_auth={"enabled": True})
    token = gw.token(sub=sub)  # json.dumps writes the lone surrogate as its \u escape
    assert "\\u" in base64.urlsafe_b64decode(token.split(".")[1] + "==").decode()
    for method, body in (("GET", None), ("POST", b"x" * 10)):
        response = await gw.get("/api/x", token, method=method, data=body)
        assert response.status == 401
        assert (await response.json())["reason"] == "malformed_token"
    response = await gw.get(
        "/.idlegate/auth", token, headers={"X-Original-URI": "/api/x", "X-Forwarded-Method": "GET"}
    )
    assert response.status == 401
    assert upstream.received == []


async def test_a_surrogate_pair_is_one_character_and_passes(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways()
    assert (await gw.get("/api/x", gw.token(sub="\U0001f600-user"))).status == 200
    assert upstream.received[0].headers["X-Auth-Subject"].endswith("-user")


@pytest.mark.parametrize("claim", ["sub", "jti", "sid"])
async def test_an_id_claim_with_a_line_break_refuses_the_token(
    gateways: GatewayFactory, upstream: Upstream, claim: str
):
    gw = await gateways()
    forged = "bob\n2026-12-03 13:00:00,000 INFO idlegate.audit admin: revoked"
    response = await gw.get("/api/x", gw.token(**{claim: forged}))
    assert response.status == 401
    assert (await response.json())["reason"] == "malformed_token"
    assert upstream.received == []


async def test_list_claim_items_are_never_read_as_other_items(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways(
        forward={"identity_headers": {"X-Auth-Subject": "sub", "X-Auth-Groups": "groups"}}
    )
    groups = ["viewer", "team admin", "a,admin", "50%", "nb\u00a0sp"]
    assert (await gw.get("/api/x", gw.token(groups=groups))).status == 200
    sent = upstream.received[0].headers["X-Auth-Groups"]
    assert sent.split() == ["viewer", "team%20admin", "a%2Cadmin", "50%25", "nb%C2%A0sp"]
    assert "admin" not in sent.split() and "admin" not in sent.replace(" ", ",").split(",")


def test_the_curve_orders_are_the_curves():
    # (r, n - s) verifies exactly when n is the group order: checked with cryptography itself.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import (
        decode_dss_signature,
        encode_dss_signature,
    )

    from gateway.tokens.verify import _EC_ORDERS

    curves = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1(),
              "ES256K": ec.SECP256K1()}  # fmt: skip
    for alg, curve in curves.items():
        key = ec.generate_private_key(curve)
        r, s = decode_dss_signature(key.sign(b"m", ec.ECDSA(hashes.SHA256())))
        twin_signature = encode_dss_signature(r, _EC_ORDERS[alg] - s)
        key.public_key().verify(twin_signature, b"m", ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("space", ["\u3000", "\u00a0", "\u2003", "\t", "\x1c"])
async def test_scopes_and_roles_are_separated_by_the_space_only(
    gateways: GatewayFactory, upstream: Upstream, space: str
):
    # RFC 6749 §3.3: scope tokens are separated by SP. Split at any whitespace, one scope an
    # IdP let a client choose ("group:x<U+3000>admin") granted `admin`.
    routes = [
        {"prefix": "/api/admin/", "upstream": upstream.url, "scopes": ["admin"]},
        {"prefix": "/api/", "upstream": upstream.url},
    ]
    gw = await gateways(routes=routes)
    response = await gw.get("/api/admin/x", gw.token(scope=f"read group:x{space}admin"))
    assert response.status == 403
    assert (await response.json())["reason"] == "insufficient_scope"
    assert (await gw.get("/api/admin/x", gw.token(scope="read admin"))).status == 200
    # The upstream reads the words the gateway decided on, whatever it splits at.
    assert (await gw.get("/api/x", gw.token(scope=f"read group:x{space}admin"))).status == 200
    sent = upstream.received[-1].headers["X-Auth-Scope"]
    assert sent.split() == ["read", "group:x" + quote(space, safe="") + "admin"]
