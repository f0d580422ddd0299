"""The core promise through a real gateway: verified tokens, the lifetime cap, idle timeout,
sessions, scopes, store failure and identity headers. Each refusal is checked as a user sees it:
status, reason code, WWW-Authenticate, the metric that moved, and nothing reaching upstream."""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import GatewayFactory, RedisServer
from harness import AUDIENCE, ISSUER, GatewayUnderTest, Upstream
from jwks_server import JwksServer, SigningKey, claims, ec_key, rsa_key
from jwt.algorithms import get_default_algorithms
from prometheus_client import REGISTRY

from gateway.clock import ManualClock
from gateway.store.base import Revocation

IDLE = 900
_ALGORITHMS = get_default_algorithms()


def refused_count(reason: str, route: str = "/api/") -> float:
    value = REGISTRY.get_sample_value(
        "idlegate_requests_total",
        {"route": route, "decision": "rejected", "reason": reason},
    )
    return value or 0.0


async def assert_refused(
    gw: GatewayUnderTest,
    upstream: Upstream,
    token: str | None,
    reason: str,
    status: int = 401,
    path: str = "/api/orders",
    route: str = "/api/",
    **kwargs: Any,
) -> dict[str, Any]:
    before_metric = refused_count(reason, route)
    before_upstream = len(upstream.received)
    response = await gw.get(path, token, **kwargs)
    body = await response.json()
    assert response.status == status, body
    assert body["reason"] == reason
    assert response.headers["Cache-Control"] == "no-store"
    if status in (401, 403):
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="idlegate"')
        if reason != "missing_token":
            assert f'error="{body["error"]}"' in challenge
        else:
            assert "error=" not in challenge
    assert len(upstream.received) == before_upstream, "a refused request reached the upstream"
    assert refused_count(reason, route) == before_metric + 1
    if token:
        assert token not in json.dumps(body)
    return body


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: str = "") -> str:
    return f"{b64(json.dumps(header))}.{b64(json.dumps(payload))}.{signature}"


@pytest.fixture(params=["memory", "redis"])
async def store_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "memory":
        yield "memory://"
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        yield server.url


# -- the happy path ----------------------------------------------------------------------------


async def test_valid_token_is_forwarded_with_identity_headers(
    gateways: GatewayFactory, upstream: Upstream, store_url: str
):
    gw = await gateways(store_url=store_url)
    token = gw.token(sub="alice", scope="orders:read orders:write", jti="j-1")
    response = await gw.get(
        "/api/orders",
        token,
        headers={
            "X-Auth-Subject": "mallory",
            "x-auth-scope": "admin",
            "Connection": "X-Auth-Token-Id",
        },
    )
    assert response.status == 200
    seen = upstream.received[-1].header_list
    subjects = [v for k, v in seen if k.lower() == "x-auth-subject"]
    assert subjects == ["alice"]
    assert [v for k, v in seen if k.lower() == "x-auth-scope"] == ["orders:read orders:write"]
    assert [v for k, v in seen if k.lower() == "x-auth-token-id"] == ["j-1"]
    assert upstream.received[-1].headers["Authorization"] == f"Bearer {token}"


async def test_strip_authorization_removes_the_token_upstream(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways(forward={"strip_authorization": True})
    assert (await gw.get("/api/x", gw.token())).status == 200
    assert "Authorization" not in upstream.received[-1].headers
    # Nor to a public route's upstream (where SPAs send it too); other credentials pass there.
    assert (await gw.get("/public/x", gw.token())).status == 200
    assert "Authorization" not in upstream.received[-1].headers
    basic = {"Authorization": "Basic dXNlcjpwYXNz"}
    assert (await gw.get("/public/x", headers=basic)).status == 200
    assert upstream.received[-1].headers["Authorization"] == "Basic dXNlcjpwYXNz"


async def test_identity_headers_are_stripped_on_public_routes_too(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways()
    await gw.get("/public/x", headers={"X-Auth-Subject": "root"})
    assert "X-Auth-Subject" not in upstream.received[-1].headers


# -- every refusal reason ------------------------------------------------------------------------


async def test_missing_token(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways()
    await assert_refused(gw, upstream, None, "missing_token")
    await assert_refused(gw, upstream, None, "missing_token", headers={"Authorization": "Basic x"})


async def test_malformed_requests(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways()
    token = gw.token()
    await assert_refused(
        gw, upstream, token, "malformed_request", 400, path=f"/api/x?access_token={token}"
    )
    await assert_refused(
        gw, upstream, None, "malformed_request", 400, headers={"Authorization": "Bearer a b"}
    )
    two = [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]
    before = len(upstream.received)
    response = await gw.http.get(gw.url + "/api/x", headers=two)
    assert response.status == 400
    assert (await response.json())["reason"] == "malformed_request"
    assert len(upstream.received) == before


async def test_a_token_accepted_before_is_refused_in_a_malformed_request(
    gateways: GatewayFactory, upstream: Upstream
):
    """What the verification cache answers (keyed by the Authorization value) never skips the
    request's own checks: a second header, a token in the query, a spelling that is no bearer
    credential. A spelling accepted once is accepted again."""
    gw = await gateways()
    token = gw.token()
    assert (await gw.get("/api/x", token)).status == 200  # now cached
    await assert_refused(
        gw, upstream, token, "malformed_request", 400, path="/api/x?access_token=1"
    )
    await assert_refused(
        gw, upstream, token, "malformed_request", 400, path="/api/x?a=1;Access%5FToken=1"
    )
    two = [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]
    response = await gw.http.get(gw.url + "/api/x", headers=two)
    assert response.status == 400
    assert (await response.json())["reason"] == "malformed_request"
    await assert_refused(
        gw, upstream, None, "missing_token", headers={"Authorization": f"Basic {token}"}
    )
    await assert_refused(
        gw, upstream, None, "malformed_request", 400, headers={"Authorization": f"Bearer {token} x"}
    )
    before = len(upstream.received)
    for value in (f"bearer {token}", f"Bearer {token}", f"BEARER  {token}"):
        assert (
            await gw.http.get(gw.url + "/api/x", headers={"Authorization": value})
        ).status == 200
        assert (
            await gw.http.get(gw.url + "/api/x?q=1", headers={"Authorization": value})
        ).status == 200
    assert len(upstream.received) == before + 6


@pytest.mark.parametrize(
    "token",
    [
        "abc",
        "a.b",
        "a.b.c.d.e",
        f"{b64('not json')}.{b64('{}')}.c2ln",
        f"{b64('[1,2]')}.{b64('{}')}.c2ln",
        f"{b64(json.dumps({'alg': 'RS256'}))}.{b64('{bad')}.c2ln",
        b64(json.dumps({"alg": "RS256"})) + "." + b64('{"iss":"a","iss":"b"}') + ".c2ln",
    ],
)
async def test_malformed_tokens(gateways: GatewayFactory, upstream: Upstream, token: str):
    gw = await gateways()
    await assert_refused(gw, upstream, token, "malformed_token")


async def test_token_over_16_kib_is_refused_unparsed(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways()
    huge = gw.token(padding="p" * 17_000)
    await assert_refused(gw, upstream, huge, "malformed_token")


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_in_any_casing_is_refused(
    gateways: GatewayFactory, upstream: Upstream, alg: str, clock: ManualClock
):
    gw = await gateways()
    payload = claims(ISSUER, AUDIENCE, now=clock.now())
    await assert_refused(
        gw, upstream, unsigned({"alg": alg, "typ": "JWT"}, payload), "disallowed_alg"
    )
    await assert_refused(gw, upstream, unsigned({"alg": alg}, payload, "c2ln"), "disallowed_alg")


async def test_algorithm_outside_allow_list_is_refused(
    gateways: GatewayFactory, upstream: Upstream, signing_key: SigningKey, clock: ManualClock
):
    gw = await gateways()
    token = signing_key.sign(claims(ISSUER, AUDIENCE, now=clock.now()), alg="RS512")
    await assert_refused(gw, upstream, token, "disallowed_alg")


def signed_raw(key: SigningKey, header: bytes, payload: bytes) -> str:
    """A JWS over exactly these header and payload bytes (for JSON no encoder would write)."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    signature = _ALGORITHMS[key.alg].sign(signing_input.encode(), key.private_key)
    return f"{signing_input}.{b64(signature)}"


@pytest.mark.parametrize(
    "alg",
    [
        "RS256\r\nX-Injected: 1",
        "RS256\nX-Injected: 1",
        'RS256", error="none',
        "RS\\256\\",
        "RS256\u00e9\u202e\u2028",
        "\x00RS256",
    ],
)
async def test_token_text_never_reaches_the_challenge_or_the_message(
    gateways: GatewayFactory,
    upstream: Upstream,
    signing_key: SigningKey,
    clock: ManualClock,
    alg: str,
):
    """The token's own alg is attacker text: the refusal names the problem, not those bytes, and
    a CR/LF in it gives a clean 401 rather than a dropped connection."""
    gw = await gateways()
    header = json.dumps({"alg": alg, "kid": "main-1", "typ": "JWT"}).encode()
    payload = json.dumps(claims(ISSUER, AUDIENCE, now=clock.now())).encode()
    token = signed_raw(signing_key, header, payload)
    body = await assert_refused(gw, upstream, token, "disallowed_alg")
    response = await gw.get("/api/x", token)
    challenge = response.headers["WWW-Authenticate"]
    assert "X-Injected" not in challenge and "X-Injected" not in body["message"]
    assert "RS\\256" not in challenge and "256\\" not in body["message"]
    assert "X-Injected" not in response.headers
    description = re.search(r'error_description="([^"]*)"', challenge)
    assert description is not None
    assert re.fullmatch(r"[\x20\x21\x23-\x5b\x5d-\x7e]*", description.group(1))
    assert challenge.count("error=") == 1  # no second, injected attribute in any quoting


async def test_hs256_signed_with_the_rsa_public_key_is_refused(
    gateways: GatewayFactory,
    upstream: Upstream,
    signing_key: SigningKey,
    clock: ManualClock,
    key_file: Path,
):
    gw = await gateways(
        providers=[
            {
                "name": "main",
                "issuer": ISSUER,
                "audiences": [AUDIENCE],
                "algorithms": ["RS256"],
                "public_key_file": str(key_file),
            }
        ]
    )
    payload = claims(ISSUER, AUDIENCE, now=clock.now())
    # PyJWT refuses to sign HMAC with a PEM; forge the token by hand, as an attacker would.
    import hashlib
    import hmac

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}))
    body = b64(json.dumps(payload))
    mac = hmac.new(signing_key.public_pem(), f"{header}.{body}".encode(), hashlib.sha256)
    forged = f"{header}.{body}.{b64(mac.digest())}"
    await assert_refused(gw, upstream, forged, "disallowed_alg")


async def test_tampered_payload_is_bad_signature(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways()
    header, _, signature = gw.token(sub="alice").split(".")
    forged_claims = claims(ISSUER, AUDIENCE, now=gw.clock.now(), sub="admin")
    forged = f"{header}.{b64(json.dumps(forged_claims))}.{signature}"
    await assert_refused(gw, upstream, forged, "bad_signature")


async def test_a_forgery_ending_like_an_accepted_token_is_verified_afresh(
    gateways: GatewayFactory, upstream: Upstream
):
    """What was decided for an accepted token is found again by the tail of its Authorization
    value (its signature): a value that ends the same but differs anywhere before it (claims
    swapped under the genuine signature, another header) is never taken for it."""
    gw = await gateways()
    genuine = gw.token(sub="alice")
    assert (await gw.get("/api/orders", genuine)).status == 200  # admitted, kept
    header, payload, signature = genuine.split(".")
    forged_claims = claims(ISSUER, AUDIENCE, now=gw.clock.now(), sub="admin")
    forged = f"{header}.{b64(json.dumps(forged_claims))}.{signature}"
    await assert_refused(gw, upstream, forged, "bad_signature")
    fields = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    other = f"{b64(json.dumps({**fields, 'cty': 'other'}))}.{payload}.{signature}"
    await assert_refused(gw, upstream, other, "bad_signature")
    assert (await gw.get("/api/orders", genuine)).status == 200  # still itself
    assert [r.headers.get("X-Auth-Subject") for r in upstream.received] == ["alice", "alice"]


async def test_token_from_another_key_is_bad_signature(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways()
    await assert_refused(gw, upstream, gw.token(key=rsa_key(kid="main-1")), "bad_signature")


@pytest.fixture
async def idp(signing_key: SigningKey) -> AsyncIterator[JwksServer]:
    async with JwksServer([signing_key]) as server:
        yield server


async def test_what_is_kept_of_an_accepted_token_ends_with_its_time_claims_and_session(
    gateways: GatewayFactory, upstream: Upstream, clock: ManualClock
):
    """The gateway keeps what the steps before the store decided for a token on a route, for
    the requests that repeat it: time moving past exp (+ leeway) or max_session_age still
    refuses it, with the precise reason."""
    gw = await gateways(policy={"max_session_age": "8h", "leeway": "30s"})
    now = clock.now()
    short = gw.token(iat=now, exp=now + 100, auth_time=now)
    ageing = gw.token(auth_time=now - 8 * 3600 + 60)
    for _ in range(2):
        assert (await gw.get("/api/x", short)).status == 200
        assert (await gw.get("/api/x", ageing)).status == 200
    clock.advance(89)  # 29 s before the session is 8 h + leeway old
    assert (await gw.get("/api/x", ageing)).status == 200
    clock.advance(2)
    await assert_refused(gw, upstream, ageing, "session_too_old")
    assert (await gw.get("/api/x", short)).status == 200  # exp + leeway is 39 s away
    clock.advance(39)
    await assert_refused(gw, upstream, short, "expired")
    await assert_refused(gw, upstream, short, "expired")


async def test_a_token_accepted_on_one_route_is_decided_again_on_another(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways(
        routes=[
            {"prefix": "/open/", "upstream": upstream.url},
            {"prefix": "/orders/", "upstream": upstream.url, "scopes": ["orders:write"]},
        ]
    )
    token = gw.token(scope="orders:read")
    for _ in range(2):
        assert (await gw.get("/open/x", token)).status == 200
    for _ in range(2):
        await assert_refused(
            gw, upstream, token, "insufficient_scope", 403, path="/orders/x", route="/orders/"
        )


def idp_provider(idp: JwksServer) -> dict[str, Any]:
    """The test issuer's providers entry, its keys fetched from `idp`'s JWKS."""
    return {
        "name": "idp",
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "algorithms": ["RS256"],
        "jwks_uri": idp.jwks_uri,
    }


async def test_a_token_accepted_before_is_refused_once_its_key_is_retired(
    gateways: GatewayFactory, upstream: Upstream, idp: JwksServer, clock: ManualClock
):
    gw = await gateways(providers=[idp_provider(idp)])
    old = gw.token()
    for _ in range(2):
        assert (await gw.get("/api/x", old)).status == 200
    new_key = rsa_key(kid="main-2")
    idp.rotate(new_key)
    # A token of the new key makes the gateway fetch the set again: main-1 is gone from it.
    assert (
        await gw.get("/api/x", new_key.sign(claims(ISSUER, AUDIENCE, now=clock.now())))
    ).status == 200
    await assert_refused(gw, upstream, old, "unknown_key")


async def test_unknown_kid_and_key_urls_in_the_token_are_never_fetched(
    gateways: GatewayFactory, upstream: Upstream, idp: JwksServer, clock: ManualClock
):
    gw = await gateways(providers=[idp_provider(idp)])
    attacker = rsa_key(kid="attacker")
    async with JwksServer([attacker]) as evil:
        token = attacker.sign(
            claims(ISSUER, AUDIENCE, now=clock.now()),
            headers={
                "jku": evil.jwks_uri,
                "x5u": evil.url + "/cert",
                "jwk": attacker.public_jwk(),
            },
        )
        await assert_refused(gw, upstream, token, "unknown_key")
        assert evil.jwks_requests == 0
        # Same kid as the real key, attacker's signature: still refused.
        token = attacker.sign(
            claims(ISSUER, AUDIENCE, now=clock.now()),
            kid="main-1",
            headers={"jwk": attacker.public_jwk()},
        )
        await assert_refused(gw, upstream, token, "bad_signature")
        assert evil.jwks_requests == 0
    assert (await gw.get("/api/x", gw.token())).status == 200


@pytest.mark.parametrize(
    "iss", [ISSUER + "evil", ISSUER[:-1], "https://evil.test/?" + ISSUER, ISSUER.upper()]
)
async def test_issuer_must_match_exactly(gateways: GatewayFactory, upstream: Upstream, iss: Any):
    gw = await gateways()
    await assert_refused(gw, upstream, gw.token(iss=iss), "wrong_issuer")


async def test_missing_issuer_is_missing_claim(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways()
    await assert_refused(gw, upstream, gw.token(iss=None), "missing_claim")


async def test_audience_any_of(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways()
    assert (await gw.get("/api/x", gw.token(aud=["other", AUDIENCE]))).status == 200
    await assert_refused(gw, upstream, gw.token(aud="other-api"), "wrong_audience")
    await assert_refused(gw, upstream, gw.token(aud=["a", "b"]), "wrong_audience")


async def test_required_typ(
    gateways: GatewayFactory, upstream: Upstream, signing_key: SigningKey, key_file: Path
):
    gw = await gateways(
        providers=[
            {
                "name": "main",
                "issuer": ISSUER,
                "audiences": [AUDIENCE],
                "algorithms": ["RS256"],
                "public_key_file": str(key_file),
                "require_typ": "at+jwt",
            }
        ]
    )
    payload = claims(ISSUER, AUDIENCE, now=gw.clock.now())
    await assert_refused(
        gw, upstream, signing_key.sign(payload, headers={"typ": "JWT"}), "wrong_type"
    )
    accepted = signing_key.sign(
        claims(ISSUER, AUDIENCE, now=gw.clock.now()), headers={"typ": "application/at+jwt"}
    )
    assert (await gw.get("/api/x", accepted)).status == 200


@pytest.mark.parametrize("claim", ["exp", "iat"])
async def test_required_claims(gateways: GatewayFactory, upstream: Upstream, claim: str):
    gw = await gateways()
    await assert_refused(gw, upstream, gw.token(**{claim: None}), "missing_claim")


async def test_jti_is_required_only_when_configured(gateways: GatewayFactory, upstream: Upstream):
    default = await gateways()
    assert (await default.get("/api/x", default.token(jti=None))).status == 200
    strict = await gateways(policy={"required_claims": ["exp", "iat", "jti"]})
    await assert_refused(strict, upstream, strict.token(jti=None), "missing_claim")
    no_digest = await gateways(policy={"token_id": ["jti", "uti"]})
    await assert_refused(no_digest, upstream, no_digest.token(jti=None), "missing_claim")
    assert (await no_digest.get("/api/x", no_digest.token(jti=None, uti="u-1"))).status == 200


async def test_token_ids_are_tried_in_order_and_digest_tells_tokens_apart(
    gateways: GatewayFactory, upstream: Upstream, clock: ManualClock, store_url: str
):
    """uti (Entra) stands in for jti; with neither, each token's own signature digest is its
    id: two such tokens of one subject keep separate idle clocks."""
    gw = await gateways(store_url=store_url, policy={"idle_timeout": "5m"})
    by_uti = gw.token(jti=None, uti="entra-uti-1")
    first, second = gw.token(jti=None, sid=None), gw.token(jti=None, sid=None, nonce="2")
    for token in (by_uti, first, second):
        assert (await gw.get("/api/x", token)).status == 200
    clock.advance(200)
    assert (await gw.get("/api/x", first)).status == 200
    clock.advance(200)  # second unused for 400 s, first for 200 s
    assert (await gw.get("/api/x", first)).status == 200
    await assert_refused(gw, upstream, second, "idle_timeout")
    await assert_refused(gw, upstream, by_uti, "idle_timeout")
    key = gw.gateway.hasher.of_token("jti", ISSUER, "entra-uti-1")
    assert await gw.gateway.store.last_activity(key) == clock.now() - 400


async def test_time_claims(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways()
    now = gw.clock.now()
    await assert_refused(gw, upstream, gw.token(iat=now - 700, exp=now - 31), "expired")
    # Within leeway (30 s) still fine.
    assert (await gw.get("/api/x", gw.token(iat=now - 600, exp=now - 29))).status == 200
    await assert_refused(gw, upstream, gw.token(nbf=now + 31), "not_yet_valid")
    await assert_refused(gw, upstream, gw.token(iat=now + 60, exp=now + 600), "issued_in_future")
    assert (await gw.get("/api/x", gw.token(iat=now + 20, exp=now + 600))).status == 200


def with_raw_claim(payload: dict[str, Any], name: str, raw: str) -> bytes:
    """The payload's JSON with `name` set to `raw` as written (e.g. NaN, which no encoder of
    ours emits, but Python's json would read)."""
    rest = {k: v for k, v in payload.items() if k != name}
    return json.dumps(rest)[:-1].encode() + f', "{name}": {raw}}}'.encode()


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("iat", "NaN"),
        ("exp", "NaN"),
        ("exp", "Infinity"),
        ("iat", "-Infinity"),
        ("exp", "1e400"),  # inf once parsed as a float
        ("iat", "1" + "0" * 400),  # an int no float holds
        ("nbf", "NaN"),
        ("auth_time", "NaN"),
        ("exp", "253402300800"),  # year 10000
        ("iat", "-1"),
    ],
)
async def test_non_finite_or_absurd_dates_are_malformed(
    gateways: GatewayFactory,
    upstream: Upstream,
    signing_key: SigningKey,
    clock: ManualClock,
    store_url: str,
    name: str,
    raw: str,
):
    """Every comparison with NaN is false: such a token would pass the lifetime cap, never
    idle out and escape a revocation by sub. Refused before any of those is asked."""
    gw = await gateways(store_url=store_url)
    payload = claims(ISSUER, AUDIENCE, now=clock.now(), sub="nan-user")
    header = json.dumps({"alg": "RS256", "kid": signing_key.kid, "typ": "JWT"}).encode()
    token = signed_raw(signing_key, header, with_raw_claim(payload, name, raw))
    await assert_refused(gw, upstream, token, "malformed_token")
    clock.advance(IDLE + 1)  # idle for any real date: still malformed, never accepted
    await assert_refused(gw, upstream, token, "malformed_token")


async def test_lifetime_over_the_cap_is_refused(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways()
    assert (await gw.get("/api/x", gw.token(ttl=900))).status == 200
    body = await assert_refused(gw, upstream, gw.token(ttl=901), "lifetime_too_long")
    assert "900" in body["message"]


async def test_scopes_all_required(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways(
        routes=[
            {"prefix": "/api/", "upstream": upstream.url, "scopes": ["orders:read", "orders:write"]}
        ]
    )
    body = await assert_refused(
        gw, upstream, gw.token(scope="orders:read"), "insufficient_scope", 403
    )
    assert body["error"] == "insufficient_scope"
    response = await gw.get("/api/x", gw.token(scope="orders:read"))
    assert 'scope="orders:read orders:write"' in response.headers["WWW-Authenticate"]
    assert (await gw.get("/api/x", gw.token(scope="orders:write orders:read x"))).status == 200
    assert (await gw.get("/api/x", gw.token(scp=["orders:write", "orders:read"]))).status == 200


async def test_revoked_token_is_refused(
    gateways: GatewayFactory, upstream: Upstream, store_url: str
):
    gw = await gateways(store_url=store_url)
    token = gw.token(jti="to-revoke")
    assert (await gw.get("/api/x", token)).status == 200
    now = gw.clock.now()
    await gw.gateway.revocations.revoke(
        Revocation("jti", gw.gateway.hasher.of_token("jti", ISSUER, "to-revoke"), None, now + 1000)
    )
    await assert_refused(gw, upstream, token, "revoked")
    assert (await gw.get("/api/x", gw.token())).status == 200


# -- idle semantics, exactly ---------------------------------------------------------------------


async def test_idle_boundary_is_exact_to_the_second(
    gateways: GatewayFactory, upstream: Upstream, store_url: str, clock: ManualClock
):
    gw = await gateways(store_url=store_url, policy={"max_token_lifetime": "1h"})
    first = gw.token(ttl=3600)
    second = gw.token(ttl=3600)
    clock.advance(IDLE)  # exactly idle_timeout after iat: still accepted
    assert (await gw.get("/api/x", first)).status == 200
    clock.advance(IDLE)  # exactly idle_timeout after that last activity
    assert (await gw.get("/api/x", first)).status == 200
    clock.advance(IDLE + 1)  # one second more than the timeout
    await assert_refused(gw, upstream, first, "idle_timeout")
    # A token never used for longer than the timeout after iat is refused on first use.
    await assert_refused(gw, upstream, second, "idle_timeout")


async def test_activity_extends_and_refusal_is_terminal(
    gateways: GatewayFactory, upstream: Upstream, store_url: str, clock: ManualClock
):
    gw = await gateways(store_url=store_url, policy={"max_token_lifetime": "1h"})
    token = gw.token(ttl=3600, jti="busy")
    for _ in range(3):
        clock.advance(600)
        assert (await gw.get("/api/x", token)).status == 200
    key = gw.gateway.hasher.of_token("jti", ISSUER, "busy")
    last = await gw.gateway.store.last_activity(key)
    assert last == clock.now()
    clock.advance(IDLE + 1)
    await assert_refused(gw, upstream, token, "idle_timeout")
    assert await gw.gateway.store.last_activity(key) == last  # refusal changed nothing
    clock.advance(1)
    await assert_refused(gw, upstream, token, "idle_timeout")


async def test_a_request_refused_413_is_no_activity(
    gateways: GatewayFactory, upstream: Upstream, store_url: str, clock: ManualClock
):
    """The declared length is refused before the store call, so the token idles out on the
    schedule of its last accepted request."""
    gw = await gateways(
        store_url=store_url, policy={"max_token_lifetime": "1h"}, forward={"max_body": "1KiB"}
    )
    token = gw.token(ttl=3600)
    assert (await gw.get("/api/x", token)).status == 200
    clock.advance(600)
    await assert_refused(
        gw, upstream, token, "payload_too_large", 413, method="POST", data=b"y" * 2048
    )
    clock.advance(IDLE - 600 + 1)  # idle_timeout + 1 s after the accepted request
    await assert_refused(gw, upstream, token, "idle_timeout")


async def test_route_idle_override_is_honoured(
    gateways: GatewayFactory, upstream: Upstream, clock: ManualClock
):
    gw = await gateways(
        routes=[
            {"prefix": "/api/", "upstream": upstream.url},
            {"prefix": "/api/admin/", "upstream": upstream.url, "idle_timeout": "60s"},
        ]
    )
    token = gw.token()
    clock.advance(61)
    await assert_refused(
        gw, upstream, token, "idle_timeout", path="/api/admin/x", route="/api/admin/"
    )
    assert (await gw.get("/api/x", token)).status == 200


async def test_passive_route_checks_but_does_not_extend(
    gateways: GatewayFactory, upstream: Upstream, store_url: str, clock: ManualClock
):
    gw = await gateways(
        store_url=store_url,
        policy={"max_token_lifetime": "1h"},
        routes=[
            {"prefix": "/api/", "upstream": upstream.url},
            {"prefix": "/api/poll/", "upstream": upstream.url, "activity": "passive"},
        ],
    )
    token = gw.token(ttl=3600)
    for _ in range(3):
        clock.advance(300)
        assert (await gw.get("/api/poll/x", token)).status == 200
    clock.advance(1)
    await assert_refused(
        gw, upstream, token, "idle_timeout", path="/api/poll/x", route="/api/poll/"
    )


async def test_session_status_does_not_count_as_activity(
    gateways: GatewayFactory, upstream: Upstream, store_url: str, clock: ManualClock
):
    gw = await gateways(store_url=store_url, policy={"max_token_lifetime": "1h"})
    token = gw.token(ttl=3600)
    clock.advance(100)
    assert (await gw.get("/api/x", token)).status == 200
    for _ in range(3):
        clock.advance(300)
        response = await gw.get("/.idlegate/session", token)
        assert response.status == 200
        body = await response.json()
    assert body["idle_remaining_seconds"] == 0
    clock.advance(1)
    response = await gw.get("/.idlegate/session", token)
    assert response.status == 401
    assert (await response.json())["reason"] == "idle_timeout"
    await assert_refused(gw, upstream, token, "idle_timeout")


async def test_session_status_reports_remaining_time(gateways: GatewayFactory, clock: ManualClock):
    gw = await gateways()
    token = gw.token(ttl=800, auth_time=clock.now() - 50)
    clock.advance(200)
    body = await (await gw.get("/.idlegate/session", token)).json()
    assert body == {
        "idle_remaining_seconds": 700,
        "expires_in_seconds": 600,
        "session_age_seconds": 250,
    }


def session_count(decision: str, reason: str) -> float:
    labels = {"route": "/.idlegate/session", "decision": decision, "reason": reason}
    return REGISTRY.get_sample_value("idlegate_requests_total", labels) or 0.0


async def test_session_status_answers_get_and_head_only(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways()
    token = gw.token()
    before = session_count("allowed", "ok")
    refused_before = session_count("rejected", "method_not_allowed")
    response = await gw.get("/.idlegate/session", token, method="POST")
    assert response.status == 405
    assert response.headers["Allow"] == "GET, HEAD"  # RFC 9110 §15.5.6
    body = await response.json()
    assert (body["error"], body["reason"]) == ("method_not_allowed", "method_not_allowed")
    assert body["request_id"] == response.headers["X-Request-ID"]
    deleted = await gw.get("/.idlegate/session", method="DELETE")  # before auth
    assert (deleted.status, deleted.headers["Allow"]) == (405, "GET, HEAD")
    head = await gw.get("/.idlegate/session", token, method="HEAD")
    assert head.status == 200
    assert head.headers["Cache-Control"] == "no-store"
    # Counted as what they are: two refusals, one answer.
    assert session_count("rejected", "method_not_allowed") == refused_before + 2
    assert session_count("allowed", "ok") == before + 1
    assert upstream.received == []


async def test_session_status_is_a_built_in_route_refused_like_any(
    gateways: GatewayFactory, upstream: Upstream, clock: ManualClock
):
    """A catch-all route does not take the session path: it is answered by the gateway, counted
    under its own route label, and decided by the same steps as a forwarded request."""
    gw = await gateways(routes=[{"prefix": "/", "upstream": upstream.url}])
    token = gw.token(jti="session-revoked")
    assert (await gw.get("/.idlegate/session", token)).status == 200
    missing = await gw.get("/.idlegate/session")
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="idlegate"'
    before = session_count("rejected", "revoked")
    key = gw.gateway.hasher.of_token("jti", ISSUER, "session-revoked")
    await gw.gateway.revocations.revoke(Revocation("jti", key, None, clock.now() + 1000))
    revoked = await gw.get("/.idlegate/session", token)
    assert revoked.status == 401
    assert (await revoked.json())["reason"] == "revoked"
    assert session_count("rejected", "revoked") == before + 1
    assert upstream.received == []


async def test_session_status_with_the_store_down_follows_on_error(
    gateways: GatewayFactory, upstream: Upstream, redis_server: RedisServer
):
    """The session route takes the store step's fallback too: with on_error allow it answers
    (a full idle window ahead, as the request would be forwarded); with deny it is 503."""
    allow = await gateways(store_url=redis_server.url, store={"on_error": "allow"})
    deny = await gateways(store_url=redis_server.url)
    token = allow.token()
    before = session_count("allowed", "store_unavailable")
    redis_server.stop()
    body = await (await allow.get("/.idlegate/session", token)).json()
    assert body["idle_remaining_seconds"] == IDLE
    refused = await deny.get("/.idlegate/session", token)
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "1"
    assert session_count("allowed", "store_unavailable") == before + 1


# -- sessions -------------------------------------------------------------------------------------


async def test_session_activity_is_shared_and_idle_sessions_stay_dead(
    gateways: GatewayFactory, upstream: Upstream, store_url: str, clock: ManualClock
):
    gw = await gateways(
        store_url=store_url,
        policy={
            "track_by": "sid",
            "required_claims": ["exp", "iat", "sid"],
            "max_token_lifetime": "1h",
        },
    )
    first = gw.token(sid="s-1", ttl=3600)
    clock.advance(800)
    second = gw.token(sid="s-1", ttl=3600)  # a refreshed token of the same session
    assert (await gw.get("/api/x", second)).status == 200
    clock.advance(800)
    # `first` itself was never used, but its session was active 800 s ago.
    assert (await gw.get("/api/x", first)).status == 200
    clock.advance(IDLE + 1)
    await assert_refused(gw, upstream, second, "session_idle")
    later = gw.token(sid="s-1", ttl=3600)  # issued after the session idled out
    await assert_refused(gw, upstream, later, "session_idle")
    assert (await gw.get("/api/x", gw.token(sid="s-2"))).status == 200


async def test_session_too_old(gateways: GatewayFactory, upstream: Upstream, clock: ManualClock):
    gw = await gateways(policy={"max_session_age": "8h"})
    old = gw.token(auth_time=clock.now() - 8 * 3600 - 31)
    await assert_refused(gw, upstream, old, "session_too_old")
    fresh = gw.token(auth_time=clock.now() - 3600)
    assert (await gw.get("/api/x", fresh)).status == 200


# -- Redis shared between instances, failures ------------------------------------------------


async def test_two_instances_see_each_others_activity(
    gateways: GatewayFactory, upstream: Upstream, redis_server: RedisServer, clock: ManualClock
):
    one = await gateways(store_url=redis_server.url, policy={"max_token_lifetime": "1h"})
    two = await gateways(store_url=redis_server.url, policy={"max_token_lifetime": "1h"})
    token = one.token(ttl=3600)
    clock.advance(800)
    assert (await one.get("/api/x", token)).status == 200
    clock.advance(800)  # idle at `two` if it had not seen `one`'s activity
    assert (await two.get("/api/x", token)).status == 200
    clock.advance(IDLE + 1)
    await assert_refused(one, upstream, token, "idle_timeout")


async def test_clock_skew_cannot_move_last_activity_back(
    gateways: GatewayFactory, upstream: Upstream, redis_server: RedisServer, clock: ManualClock
):
    ahead = ManualClock(clock.now() + 120)
    fast = await gateways(store_url=redis_server.url, gateway_clock=ahead)
    slow = await gateways(store_url=redis_server.url)
    token = slow.token(jti="skewed")
    assert (await fast.get("/api/x", token)).status == 200
    assert (await slow.get("/api/x", token)).status == 200
    key = slow.gateway.hasher.of_token("jti", ISSUER, "skewed")
    assert await slow.gateway.store.last_activity(key) == ahead.now()


async def test_redis_down_is_503_and_recovers_without_restart(
    gateways: GatewayFactory, upstream: Upstream, redis_server: RedisServer
):
    gw = await gateways(store_url=redis_server.url)
    token = gw.token()
    assert (await gw.get("/api/x", token)).status == 200
    redis_server.stop()
    before = len(upstream.received)
    response = await gw.get("/api/x", token)
    assert response.status == 503
    assert response.headers["Retry-After"]
    assert (await response.json())["reason"] == "store_unavailable"
    assert len(upstream.received) == before
    redis_server.start()
    assert (await gw.get("/api/x", token)).status == 200


async def test_on_error_allow_forwards_and_counts(
    gateways: GatewayFactory, upstream: Upstream, redis_server: RedisServer
):
    gw = await gateways(store_url=redis_server.url, store={"on_error": "allow"})
    redis_server.stop()
    before = REGISTRY.get_sample_value("idlegate_store_fallbacks_total", {"mode": "allow"}) or 0
    assert (await gw.get("/api/x", gw.token())).status == 200
    after = REGISTRY.get_sample_value("idlegate_store_fallbacks_total", {"mode": "allow"})
    assert after == before + 1


async def test_an_instance_that_never_read_the_revocation_list_forwards_nothing_on_allow(
    gateways: GatewayFactory, upstream: Upstream, redis_server: RedisServer, clock: ManualClock
):
    """on_error allow skips the idle check, never the revocation check: an instance started
    while the store was down has no list to check against, so it refuses (503) until it read
    one, and then a token revoked meanwhile is refused as revoked."""
    first = await gateways(store_url=redis_server.url, store={"on_error": "allow"})
    token = first.token(jti="revoked-before")
    key = first.gateway.hasher.of_token("jti", ISSUER, "revoked-before")
    await first.gateway.revocations.revoke(Revocation("jti", key, None, clock.now() + 1000))
    redis_server.stop()
    late = await gateways(store_url=redis_server.url, store={"on_error": "allow"})
    assert not late.gateway.revocations.loaded
    refused = await late.get("/api/x", token)
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "1"
    assert (await refused.json())["reason"] == "store_unavailable"
    assert (await late.get("/api/x", late.token())).status == 503  # any token: no list read
    assert upstream.received == []
    redis_server.start()  # empty (no persistence): the first instance writes its list back
    await first.gateway.revocations.refresh()
    await late.gateway.revocations.refresh()
    await assert_refused(late, upstream, token, "revoked")
    assert (await late.get("/api/x", late.token())).status == 200


async def test_on_error_grace_allows_only_tokens_seen_here(
    gateways: GatewayFactory, upstream: Upstream, redis_server: RedisServer
):
    gw = await gateways(store_url=redis_server.url, store={"on_error": "grace"})
    seen = gw.token()
    unseen = gw.token()
    assert (await gw.get("/api/x", seen)).status == 200
    redis_server.stop()
    assert (await gw.get("/api/x", seen)).status == 200
    assert (await gw.get("/api/x", unseen)).status == 503


# -- keys from a JWKS, through the gateway -------------------------------------------------------


async def test_random_kids_share_one_jwks_refetch_and_rotation_works_on_first_use(
    gateways: GatewayFactory, upstream: Upstream, clock: ManualClock
):
    import asyncio
    import uuid

    first = rsa_key(kid="k1")
    async with JwksServer([first]) as idp:
        provider = {
            "name": "idp",
            "issuer": ISSUER,
            "audiences": [AUDIENCE],
            "algorithms": ["RS256", "ES256"],
            "jwks_uri": idp.jwks_uri,
        }
        gw = await gateways(providers=[provider])
        assert (await gw.get("/api/x", gw.token(key=first))).status == 200
        fetched = idp.jwks_requests
        strangers = [
            rsa_key(kid=uuid.uuid4().hex).sign(claims(ISSUER, AUDIENCE, now=clock.now()))
            for _ in range(5)
        ]
        responses = await asyncio.gather(*(gw.get("/api/x", strangers[i % 5]) for i in range(500)))
        assert {r.status for r in responses} == {401}
        assert idp.jwks_requests <= fetched + 1

        clock.advance(31)  # past the unknown-kid refetch interval
        second = ec_key(kid="k2")
        idp.rotate(first, second)
        response = await gw.get("/api/x", gw.token(key=second))
        assert response.status == 200


def token_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "idlegate.tokens"]


async def test_a_wrong_issuer_is_logged_once_per_interval_with_the_issuer_it_nearly_is(
    gateways: GatewayFactory, upstream: Upstream, caplog: pytest.LogCaptureFixture
):
    """The operator's side of `wrong_issuer` (the client is told nothing of the token): the
    iss seen, and the configured issuer it misses by a trailing slash; at most one line per
    interval, however many such tokens arrive. Never the token, nor any other claim."""
    caplog.set_level(logging.WARNING, "idlegate.tokens")
    gw = await gateways()
    token = gw.token(iss=ISSUER.rstrip("/"), sub="alice-sub", jti="jti-secretive")
    await assert_refused(gw, upstream, token, "wrong_issuer")
    (line,) = token_lines(caplog)
    assert '"https://issuer.test"' in line, line
    assert 'differs only by a trailing slash from the configured "https://issuer.test/"' in line
    for other in ("HTTPS://ISSUER.TEST/", "https://elsewhere.test/"):
        await assert_refused(gw, upstream, gw.token(iss=other), "wrong_issuer")
    assert token_lines(caplog) == [line], "rate-limited: one line per interval"
    for secret in (token, token.split(".")[1], "alice-sub", "jti-secretive"):
        assert secret not in caplog.text


@pytest.mark.parametrize(
    ("iss", "shown"),
    [
        ("HTTPS://Issuer.Test/", 'differs only in case from the configured "https://issuer.test/"'),
        ("https://evil.test/\n2026 INFO forged" + "x" * 500, '"https://evil.test/\\n2026 INFO'),
        (12345, "iss is not a string"),
    ],
)
async def test_a_wrong_issuer_line_is_one_printable_capped_line(
    gateways: GatewayFactory,
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
    iss: Any,
    shown: str,
):
    caplog.set_level(logging.WARNING, "idlegate.tokens")
    gw = await gateways()
    payload = claims(ISSUER, AUDIENCE, now=gw.clock.now()) | {"iss": iss}
    header = {"alg": "RS256", "typ": "JWT", "kid": gw.key.kid}
    token = signed_raw(gw.key, json.dumps(header).encode(), json.dumps(payload).encode())
    await assert_refused(gw, upstream, token, "wrong_issuer")
    (line,) = token_lines(caplog)
    assert shown in line, line
    assert "\n" not in line and len(line) < 300, line


async def test_a_wrong_audience_is_logged_with_the_audiences_seen(
    gateways: GatewayFactory, upstream: Upstream, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, "idlegate.tokens")
    gw = await gateways()
    token = gw.token(aud=["account", "Orders-API", 7], sub="alice-sub")
    await assert_refused(gw, upstream, token, "wrong_audience")
    (line,) = token_lines(caplog)
    assert 'provider main: refused a token whose aud ("account", "Orders-API")' in line, line
    assert 'audiences ["orders-api"]' in line, line
    assert 'differs only in case from the configured "orders-api"' in line, line
    await assert_refused(gw, upstream, gw.token(aud="x"), "wrong_audience")
    assert token_lines(caplog) == [line], "rate-limited: one line per interval"
    assert "alice-sub" not in caplog.text and token not in caplog.text
