"""Remote keys through the gateway: one tenant's outage costs the other tenants nothing, and a
junk kid holds back a newly published key for at most `jwks_miss_refetch`."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import GatewayFactory
from harness import GatewayUnderTest
from jwks_server import JwksServer, SigningKey, claims, rsa_key

from gateway.clock import ManualClock

AUDIENCE = "api://orders-api"


@pytest.fixture
async def tenants() -> AsyncIterator[tuple[JwksServer, JwksServer]]:
    """Two tenants of one IdP, as in the Entra multi-tenant recipe (issuer: [A, B])."""
    a = JwksServer([rsa_key("a1")], issuer_path="/tenant-a/v2.0")
    b = JwksServer([rsa_key("b1")], issuer_path="/tenant-b/v2.0")
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


def entra(*servers: JwksServer, **fields: Any) -> dict[str, Any]:
    return {
        "name": "entra",
        "issuer": [server.issuer for server in servers],
        "audiences": [AUDIENCE],
        "algorithms": ["RS256"],
        "discovery": True,
        **fields,
    }


def token(key: SigningKey, server: JwksServer, clock: ManualClock) -> str:
    return key.sign(claims(server.issuer, AUDIENCE, now=clock.now()))


async def outcome(gw: GatewayUnderTest, token: str) -> tuple[int, str | None]:
    response = await gw.get("/api/x", token)
    body = await response.json()
    return response.status, body.get("reason") if response.status != 200 else None


async def readyz(gw: GatewayUnderTest) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(gw.admin_url + "/readyz") as response,
    ):
        return response.status, await response.json()


async def test_a_tenant_answering_500_does_not_stop_another_tenants_rotation(
    gateways: GatewayFactory, tenants: tuple[JwksServer, JwksServer], clock: ManualClock
):
    a, b = tenants
    gw = await gateways(providers=[entra(a, b)])
    a1, b1 = a.keys[0], b.keys[0]
    assert await outcome(gw, token(b1, b, clock)) == (200, None)
    b.fail(500)
    a2 = rsa_key("a2")
    a.rotate(a1, a2)
    assert await outcome(gw, token(a2, a, clock)) == (200, None)  # on first use
    assert await outcome(gw, token(a1, a, clock)) == (200, None)
    assert await outcome(gw, token(b1, b, clock)) == (200, None)  # B's keys as last fetched
    status, body = await readyz(gw)  # the pod serves: taking it out would refuse A too
    assert status == 200 and body["status"] == "degraded" and b.issuer in body["reason"]
    ring = gw.gateway.rings["entra"]
    assert ring.last_error is not None and b.issuer in ring.last_error


async def test_a_tenants_key_signs_only_that_tenants_tokens(
    gateways: GatewayFactory, tenants: tuple[JwksServer, JwksServer], clock: ManualClock
):
    # Entra lets an app have a custom signing key, published in its tenant's key set: tenant
    # B's key must not make a token that claims tenant A's issuer.
    a, b = tenants
    gw = await gateways(providers=[entra(a, b)])
    a1, b1 = a.keys[0], b.keys[0]
    assert await outcome(gw, token(a1, a, clock)) == (200, None)
    assert await outcome(gw, token(b1, b, clock)) == (200, None)
    assert await outcome(gw, token(b1, a, clock)) == (401, "unknown_key")
    # A kid both publish names each tenant's own key for its own tokens.
    shared_a, shared_b = rsa_key("shared"), rsa_key("shared")
    a.rotate(a1, shared_a)
    b.rotate(b1, shared_b)
    clock.advance(10)  # past jwks_miss_refetch
    assert await outcome(gw, token(shared_a, a, clock)) == (200, None)
    assert await outcome(gw, token(shared_b, b, clock)) == (200, None)
    assert await outcome(gw, token(shared_b, a, clock)) == (401, "bad_signature")


async def test_a_gateway_started_while_a_tenant_is_down_serves_the_other_tenant(
    gateways: GatewayFactory, tenants: tuple[JwksServer, JwksServer], clock: ManualClock
):
    a, b = tenants
    await b.stop()
    gw = await gateways(providers=[entra(a, b)])
    assert (await readyz(gw))[0] == 200
    assert await outcome(gw, token(a.keys[0], a, clock)) == (200, None)
    assert await outcome(gw, token(b.keys[0], b, clock)) == (401, "unknown_key")
    ring = gw.gateway.rings["entra"]
    assert ring.last_error is not None
    assert f"issuer {b.issuer}" in ring.last_error and "none of its keys yet" in ring.last_error


async def test_a_gateway_with_no_tenant_answering_is_not_ready(
    gateways: GatewayFactory, tenants: tuple[JwksServer, JwksServer]
):
    a, b = tenants
    a.fail(503)
    await b.stop()
    gw = await gateways(providers=[entra(a, b)])
    status, body = await readyz(gw)
    assert status == 503
    assert body["reason"].startswith("no usable keys for provider(s): entra (")
    assert f"issuer {a.issuer}: " in body["reason"] and "HTTP 503" in body["reason"]
    assert f"issuer {b.issuer}: " in body["reason"]


async def test_a_junk_kid_refuses_a_new_key_only_until_jwks_miss_refetch(
    gateways: GatewayFactory, clock: ManualClock
):
    first = rsa_key("k1")
    async with JwksServer([first]) as idp:
        provider = {
            "name": "idp",
            "issuer": idp.issuer,
            "audiences": [AUDIENCE],
            "algorithms": ["RS256"],
            "discovery": True,
            "jwks_miss_refetch": "5s",
        }
        gw = await gateways(providers=[provider])
        assert await outcome(gw, token(first, idp, clock)) == (200, None)
        # Anyone can send this: a random kid, no valid signature needed.
        junk = rsa_key(uuid.uuid4().hex)
        assert await outcome(gw, token(junk, idp, clock)) == (401, "unknown_key")
        fetched = idp.jwks_requests
        second = rsa_key("k2")
        idp.rotate(first, second)
        legit = token(second, idp, clock)
        assert await outcome(gw, legit) == (401, "unknown_key")
        clock.advance(4.5)
        assert await outcome(gw, legit) == (401, "unknown_key")
        assert idp.jwks_requests == fetched
        clock.advance(0.6)  # past jwks_miss_refetch since the junk kid's refetch
        assert await outcome(gw, legit) == (200, None)
        assert idp.jwks_requests == fetched + 1


async def refetch(gw: GatewayUnderTest, server: JwksServer, clock: ManualClock) -> None:
    """Make the gateway refetch every key set now: a token with a kid nobody publishes."""
    clock.advance(10)  # past jwks_miss_refetch
    assert await outcome(gw, token(rsa_key(uuid.uuid4().hex), server, clock)) == (
        401,
        "unknown_key",
    )


async def test_a_tenant_withdrawing_a_key_another_publishes_refuses_its_tokens_already_seen(
    gateways: GatewayFactory, tenants: tuple[JwksServer, JwksServer], clock: ManualClock
):
    # Both tenants publish one key under one kid; B withdraws it. A B token accepted before
    # is refused like a new one: a decision kept is the one verification would make now.
    a, b = tenants
    shared = rsa_key("shared")
    a.rotate(a.keys[0], shared)
    b.rotate(b.keys[0], shared)
    gw = await gateways(providers=[entra(a, b)])
    seen_b, seen_a = token(shared, b, clock), token(shared, a, clock)
    for _ in range(2):  # verified, then decided from what was kept
        assert await outcome(gw, seen_b) == (200, None)
        assert await outcome(gw, seen_a) == (200, None)
    b.rotate(b.keys[0])
    await refetch(gw, b, clock)
    assert await outcome(gw, token(shared, b, clock)) == (401, "unknown_key")
    for _ in range(2):
        assert await outcome(gw, seen_b) == (401, "unknown_key")
        assert await outcome(gw, seen_a) == (200, None)  # A still publishes it
    # The other way round: A withdraws it while B publishes it again.
    b.rotate(b.keys[0], shared)
    await refetch(gw, b, clock)
    seen_b = token(shared, b, clock)
    assert await outcome(gw, seen_b) == (200, None)
    a.rotate(a.keys[0])
    await refetch(gw, a, clock)
    assert await outcome(gw, seen_a) == (401, "unknown_key")
    assert await outcome(gw, seen_b) == (200, None)


async def test_a_tenant_publishing_a_private_key_stops_it_verifying_for_every_tenant(
    gateways: GatewayFactory, tenants: tuple[JwksServer, JwksServer], clock: ManualClock
):
    a, b = tenants
    shared = rsa_key("shared")
    a.rotate(a.keys[0], shared)
    b.rotate(b.keys[0], shared)
    gw = await gateways(providers=[entra(a, b)])
    seen_a = token(shared, a, clock)
    assert await outcome(gw, seen_a) == (200, None)
    b.rotate(b.keys[0])
    b.extra_jwks = [shared.private_jwk()]  # anyone can sign with it now, as either tenant
    await refetch(gw, b, clock)
    assert await outcome(gw, seen_a) == (401, "unknown_key")
    assert await outcome(gw, token(shared, a, clock)) == (401, "unknown_key")
    assert await outcome(gw, token(a.keys[0], a, clock)) == (200, None)


async def test_a_key_set_answered_without_usable_keys_refuses_its_tokens_and_readyz(
    gateways: GatewayFactory, clock: ManualClock
):
    first = rsa_key("k1")
    async with JwksServer([first]) as idp:
        provider = {
            "name": "idp",
            "issuer": idp.issuer,
            "audiences": [AUDIENCE],
            "algorithms": ["RS256"],
            "jwks_uri": idp.jwks_uri,
        }
        gw = await gateways(providers=[provider])
        seen = token(first, idp, clock)
        assert await outcome(gw, seen) == (200, None)
        assert (await readyz(gw))[0] == 200
        idp.rotate()
        idp.extra_jwks = [first.public_jwk(use="enc")]  # withdrawn as a signing key
        await refetch(gw, idp, clock)
        assert await outcome(gw, seen) == (401, "unknown_key")
        assert await outcome(gw, token(first, idp, clock)) == (401, "unknown_key")
        status, body = await readyz(gw)
        assert status == 503
        assert body["reason"].startswith("no usable keys for provider(s): idp (JWKS at ")
        assert "publishes no usable key for algorithms ['RS256']" in body["reason"]
        # An outage after that keeps nothing alive: there is nothing left to keep.
        idp.fail(500)
        assert await outcome(gw, seen) == (401, "unknown_key")
