"""Only bearer access tokens pass: a token bound to a key or certificate (`cnf`: DPoP,
mTLS), whose proof of possession idlegate does not check, and an OIDC ID token (or a Keycloak
refresh or logout token) presented as an access token are refused `wrong_type`, on the proxy
port and at forward-auth alike, with nothing forwarded. Signed by a key served over real HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import GatewayFactory
from harness import AUDIENCE, ISSUER, GatewayUnderTest, Upstream
from jwks_server import JwksServer, SigningKey, rsa_key
from prometheus_client import REGISTRY
from test_auth import assert_refused

# RFC 9449 §6.1 (DPoP's JWK thumbprint), RFC 8705 §3.1 (the client certificate's), RFC 7800
# §3.4 (a key named by kid) and §3.2 (the key itself): every confirmation method is one
# idlegate cannot check.
BINDINGS = {
    "dpop_jkt": {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiGQA4I"},
    "mtls_x5t": {"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"},
    "kid": {"kid": "dfd1aa97-6d8d-4575-a0fe-34b96de2bfad"},
    "jwk": {"jwk": {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"}},
    "empty": {},
}
BOUND = "the token is bound to a key or certificate (cnf): not a bearer token"


@pytest.fixture(scope="module")
def idp_key() -> SigningKey:
    return rsa_key("op-1")


@pytest.fixture
async def idp(idp_key: SigningKey) -> AsyncIterator[JwksServer]:
    async with JwksServer([idp_key], issuer_override=ISSUER) as server:
        yield server


@pytest.fixture
async def gw(gateways: GatewayFactory, idp: JwksServer, idp_key: SigningKey) -> GatewayUnderTest:
    """A gateway with forward-auth whose provider's keys come from the JWKS server."""
    provider = {
        "name": "op",
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "algorithms": ["RS256"],
        "jwks_uri": idp.jwks_uri,
    }
    under_test = await gateways(providers=[provider], forward_auth={"enabled": True})
    under_test.key = idp_key
    return under_test


def forward_auth_count(reason: str) -> float:
    labels = {"route": "/api/", "decision": "rejected", "reason": reason}
    return REGISTRY.get_sample_value("idlegate_forward_auth_requests_total", labels) or 0.0


async def assert_refused_at_forward_auth(
    gw: GatewayUnderTest, upstream: Upstream, token: str, reason: str
) -> dict[str, Any]:
    before = forward_auth_count(reason)
    response = await gw.http.get(
        gw.url + "/.idlegate/auth",
        headers={
            "X-Original-URI": "/api/orders",
            "X-Original-Method": "GET",
            "Authorization": f"Bearer {token}",
        },
    )
    body = json.loads(await response.read())
    assert response.status == 401, body
    assert body["reason"] == reason
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="idlegate", error="invalid_token"'), challenge
    assert upstream.received == [], "forward-auth never forwards"
    assert forward_auth_count(reason) == before + 1
    return body


@pytest.mark.parametrize("binding", list(BINDINGS), ids=list(BINDINGS))
async def test_a_token_bound_to_a_key_or_certificate_is_refused_wrong_type(
    gw: GatewayUnderTest, upstream: Upstream, binding: str
):
    token = gw.token(cnf=BINDINGS[binding], sub="alice")
    body = await assert_refused(gw, upstream, token, "wrong_type")
    assert body["error"] == "invalid_token"
    assert body["message"] == BOUND
    response = await gw.get("/api/orders", token)
    assert f'error_description="{BOUND}"' in response.headers["WWW-Authenticate"]
    await assert_refused_at_forward_auth(gw, upstream, token, "wrong_type")
    # The same token without its binding is a bearer token, and passes.
    assert (await gw.get("/api/orders", gw.token(sub="alice"))).status == 200


async def test_a_dpop_bound_token_with_a_dpop_proof_header_is_still_refused(
    gw: GatewayUnderTest, upstream: Upstream
):
    """A proof alongside changes nothing: idlegate checks none, so it takes none as proof."""
    token = gw.token(cnf=BINDINGS["dpop_jkt"])
    proof = gw.key.sign({"htm": "GET", "htu": gw.url + "/api/orders"}, headers={"typ": "dpop+jwt"})
    await assert_refused(gw, upstream, token, "wrong_type", headers={"DPoP": proof})


async def test_the_dpop_scheme_is_refused_as_no_bearer_token(
    gw: GatewayUnderTest, upstream: Upstream
):
    """`Authorization: DPoP <token>`: a scheme idlegate does not support, so no bearer token
    (RFC 6750 §3.1: a challenge without an error), and a message that says why."""
    token = gw.token(cnf=BINDINGS["dpop_jkt"])
    body = await assert_refused(
        gw, upstream, None, "missing_token", headers={"Authorization": f"DPoP {token}"}
    )
    assert "DPoP is not supported" in body["message"]
    response = await gw.get("/api/orders", headers={"Authorization": f"DPoP {token}"})
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="idlegate"'


# Keycloak's payload typ for its ID, refresh, offline and logout tokens, in any case.
@pytest.mark.parametrize("typ", ["ID", "id", "Refresh", "REFRESH", "Offline", "Logout"])
async def test_a_typ_claim_naming_no_access_token_is_refused_wrong_type(
    gw: GatewayUnderTest, upstream: Upstream, typ: str
):
    token = gw.token(typ=typ, azp=AUDIENCE)
    body = await assert_refused(gw, upstream, token, "wrong_type")
    assert "not an access token" in body["message"]
    await assert_refused_at_forward_auth(gw, upstream, token, "wrong_type")


@pytest.mark.parametrize("claim", ["at_hash", "c_hash", "s_hash"])
async def test_an_id_token_recognised_by_its_hash_claims_is_refused_wrong_type(
    gw: GatewayUnderTest, upstream: Upstream, claim: str
):
    """An ID token as oidc-provider mints it for a client that is also the API's audience:
    no header typ, `aud` the client id, a `nonce`, and the hash of its access token or code."""
    token = gw.token(**{claim: "77QmUPtjPfzWtF2AnpK9RQ", "nonce": "n-0S6_WzA2Mj"}, jti=None)
    body = await assert_refused(gw, upstream, token, "wrong_type")
    assert body["message"] == f"the token carries {claim}: an ID token, not an access token"
    await assert_refused_at_forward_auth(gw, upstream, token, "wrong_type")


@pytest.mark.parametrize("extra", [{"typ": "Bearer"}, {"nonce": "n-0S6_WzA2Mj"}, {"typ": "at+jwt"}])
async def test_access_tokens_with_a_bearer_typ_claim_or_a_nonce_pass(
    gw: GatewayUnderTest, upstream: Upstream, extra: dict[str, Any]
):
    """Keycloak's access tokens say `typ: Bearer`; some IdPs copy the nonce into them."""
    response = await gw.get("/api/orders", gw.token(**extra))
    assert response.status == 200
    assert len(upstream.received) == 1
