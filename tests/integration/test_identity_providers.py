"""Tokens as real identity providers mint them, each served from a JWKS behind that IdP's
discovery shape: accepted, idle across two gateways sharing one real redis, scopes and roles
deciding 200 vs 403, revocation by sub, identity headers from nested claims.

The claim and header shapes follow each IdP's documentation (cited per fixture); values are
made up. docs/identity-providers.md holds the matching provider configs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import GatewayFactory, RedisServer
from harness import GatewayUnderTest, Upstream
from jwks_server import JwksServer, SigningKey, rsa_key

from gateway.clock import ManualClock

Claims = Callable[[str, float, str], dict[str, Any]]
ADMIN_TOKEN = "idp-admin-token"


@dataclass
class Idp:
    """One IdP's token shape and the provider config that accepts it."""

    name: str
    issuer_path: str
    audience: str
    claims: Claims  # (issuer, now, sub) -> payload
    scope: str  # a scope its token grants, in that IdP's claim shape
    role: str  # a role/group its token carries at `provider["roles_claim"]`
    provider: dict[str, Any]
    header: dict[str, Any] = field(default_factory=dict)
    # The discovery document names this issuer instead (Entra's {tenantid} template).
    discovery_issuer: Callable[[str], str] | None = None


TENANT = "9188040d-6c67-4c5b-b112-36a304b66dad"


def entra_v2(issuer: str, now: float, sub: str) -> dict[str, Any]:
    # https://learn.microsoft.com/en-us/entra/identity-platform/access-token-claims-reference
    # v2.0 access token: no jti but uti ("token identifier ... equivalent to jti"), delegated
    # scopes in scp as a space-separated string, app roles in roles (array), tid and oid.
    return {
        "aud": "api://orders-api",
        "iss": issuer,
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now) + 900,
        "aio": "AXQAi/8TAAAA",
        "azp": "6e74172b-be56-4843-9ff4-e66a39bb12e3",
        "azpacr": "0",
        "name": "Abe Lincoln",
        "oid": "690222be-ff1a-4d56-abd1-7e4f7d38e474",
        "preferred_username": "abeli@microsoft.com",
        "rh": "I",
        "roles": ["Orders.Admin"],
        "scp": "Orders.Read Orders.Write",
        "sub": sub,
        "tid": TENANT,
        "uti": uuid.uuid4().hex[:22],
        "ver": "2.0",
    }


def auth0(issuer: str, now: float, sub: str) -> dict[str, Any]:
    # https://auth0.com/docs/secure/tokens/access-tokens/access-token-profiles (auth0 profile:
    # no jti; scope string; aud an array with /userinfo) and
    # https://auth0.com/docs/manage-users/access-control/enable-role-based-access-control-for-apis
    # (permissions array); roles through a namespaced custom claim:
    # https://auth0.com/docs/secure/tokens/json-web-tokens/create-custom-claims
    return {
        "iss": issuer,
        "sub": sub,
        "aud": ["https://orders.example.com/api", issuer + "userinfo"],
        "azp": "my_client_id",
        "exp": int(now) + 900,
        "iat": int(now),
        "scope": "openid profile read:orders",
        "permissions": ["read:orders", "write:orders"],
        "https://orders.example.com/roles": ["order-admin"],
    }


def okta(issuer: str, now: float, sub: str) -> dict[str, Any]:
    # https://developer.okta.com/docs/api/openapi/okta-oauth/guides/overview/ (access token:
    # ver, jti "AT....", cid, uid, scp as an array) with a custom groups claim:
    # https://developer.okta.com/docs/guides/customize-tokens-groups-claim/main/
    return {
        "ver": 1,
        "jti": "AT." + uuid.uuid4().hex,
        "iss": issuer,
        "aud": "api://default",
        "iat": int(now),
        "exp": int(now) + 900,
        "cid": "0oa1b2c3d4",
        "uid": "00u1a2b3c4",
        "scp": ["openid", "orders.read"],
        "auth_time": int(now) - 60,
        "sub": sub,
        "groups": ["Everyone", "OrderAdmins"],
    }


def keycloak(issuer: str, now: float, sub: str) -> dict[str, Any]:
    # https://www.keycloak.org/docs/latest/server_admin/#_audience (aud "account" without an
    # audience mapper, the client in azp), realm roles in realm_access.roles, client roles in
    # resource_access.<client>.roles, a typ *claim* "Bearer", the session in sid.
    return {
        "exp": int(now) + 300,
        "iat": int(now),
        "auth_time": int(now) - 30,
        "jti": str(uuid.uuid4()),
        "iss": issuer,
        "aud": "account",
        "sub": sub,
        "typ": "Bearer",
        "azp": "orders-api",
        "sid": str(uuid.uuid4()),
        "acr": "1",
        "realm_access": {"roles": ["offline_access", "order-admin"]},
        "resource_access": {"account": {"roles": ["manage-account", "view-profile"]}},
        "scope": "openid profile email orders:read",
        "email_verified": True,
        "preferred_username": "alice",
    }


def authentik(issuer: str, now: float, sub: str) -> dict[str, Any]:
    # https://docs.goauthentik.io/docs/add-secure-apps/providers/oauth2/ (issuer
    # /application/o/<slug>/, groups from the profile scope mapping); no jti in the releases
    # that issue 14 reports, so the token's digest identifies it.
    return {
        "iss": issuer,
        "sub": sub,
        "aud": "orders-client-id",
        "exp": int(now) + 600,
        "iat": int(now),
        "auth_time": int(now) - 10,
        "acr": "goauthentik.io/providers/oauth2/default",
        "email": "alice@example.com",
        "email_verified": True,
        "name": "Alice",
        "preferred_username": "alice",
        "nickname": "alice",
        "groups": ["authentik Admins", "orders"],
        "azp": "orders-client-id",
        "uid": "b2f5c6",
        "scope": "openid email profile",
    }


def oidc_provider(issuer: str, now: float, sub: str) -> dict[str, Any]:
    # panva/oidc-provider (OpenID Certified) with resourceIndicators: a JWT access token (RFC
    # 9068: header typ at+jwt) for the resource requested, jti of 43 characters, client_id,
    # scope a string, no sid or auth_time; roles only through extraTokenClaims.
    # https://github.com/panva/node-oidc-provider/blob/main/docs/README.md#featuresresourceindicators
    return {
        "roles": ["reader", "ops"],
        "jti": uuid.uuid4().hex + "0123456789a",
        "sub": sub,
        "iat": int(now),
        "exp": int(now) + 600,  # ttl.ClientCredentials' default; ttl.AccessToken's is 3600
        "scope": "read",
        "client_id": "web-client",
        "iss": issuer,
        "aud": "https://api.example/",
    }


IDPS = [
    Idp(
        "entra",
        f"/{TENANT}/v2.0",
        "api://orders-api",
        entra_v2,
        scope="Orders.Read",
        role="Orders.Admin",
        provider={"roles_claim": "roles"},
        header={"typ": "JWT"},
        # Entra's multi-tenant documents name https://login.microsoftonline.com/{tenantid}/v2.0
        discovery_issuer=lambda url: url + "/{tenantid}/v2.0",
    ),
    Idp(
        "auth0",
        "/",
        "https://orders.example.com/api",
        auth0,
        scope="write:orders",  # in permissions only
        role="order-admin",
        provider={"roles_claim": "https://orders.example.com/roles"},
        header={"typ": "JWT"},
    ),
    Idp(
        "okta",
        "/oauth2/default",
        "api://default",
        okta,
        scope="orders.read",
        role="OrderAdmins",
        provider={"roles_claim": "groups"},
    ),
    Idp(
        "keycloak",
        "/realms/shop",
        "orders-api",
        keycloak,
        scope="orders:read",
        role="order-admin",
        provider={"roles_claim": "realm_access.roles", "audience_claims": ["aud", "azp"]},
        header={"typ": "JWT"},
    ),
    Idp(
        "authentik",
        "/application/o/orders/",
        "orders-client-id",
        authentik,
        scope="email",
        role="orders",
        provider={"roles_claim": "groups"},
    ),
    Idp(
        "oidc-provider",
        "",  # its issuer has no trailing slash unless configured with one
        "https://api.example/",
        oidc_provider,
        scope="read",
        role="ops",
        provider={"roles_claim": "roles", "require_typ": "at+jwt"},
        header={"typ": "at+jwt"},
    ),
]


def routes(upstream: str, idp: Idp) -> list[dict[str, Any]]:
    return [
        {"prefix": "/api/", "upstream": upstream},
        {"prefix": "/scoped/", "upstream": upstream, "scopes": [idp.scope]},
        {"prefix": "/scoped-missing/", "upstream": upstream, "scopes": [idp.scope, "delete"]},
        {"prefix": "/roles/", "upstream": upstream, "roles": [idp.role]},
        {"prefix": "/roles-missing/", "upstream": upstream, "roles": ["superuser"]},
    ]


def issuer_of(server: JwksServer) -> str:
    return server.url + server.issuer_path


async def reason(gw: GatewayUnderTest, path: str, token: str) -> tuple[int, str | None]:
    response = await gw.get(path, token)
    body = await response.json()
    return response.status, body.get("reason") if response.status != 200 else None


@pytest.mark.parametrize("idp", IDPS, ids=[idp.name for idp in IDPS])
async def test_idp_token_end_to_end(
    gateways: GatewayFactory,
    upstream: Upstream,
    redis_server: RedisServer,
    clock: ManualClock,
    tmp_path: Path,
    idp: Idp,
):
    key = rsa_key(kid=f"{idp.name}-key-1")
    async with JwksServer([key], issuer_path=idp.issuer_path.rstrip("/")) as server:
        issuer = server.url + idp.issuer_path
        server.issuer_override = issuer
        if idp.discovery_issuer is not None:
            server.discovery_issuer = idp.discovery_issuer(server.url)
        token_file = tmp_path / "admin.token"
        token_file.write_text(ADMIN_TOKEN)
        provider = {
            "name": idp.name,
            "issuer": issuer,
            "audiences": [idp.audience],
            "algorithms": ["RS256"],
            "discovery": True,
            **idp.provider,
        }
        roles_claim = idp.provider["roles_claim"]
        overrides: dict[str, Any] = {
            "store_url": redis_server.url,
            "providers": [provider],
            "routes": routes(upstream.url, idp),
            "policy": {"idle_timeout": "2m"},  # Keycloak's access tokens live 5 min
            "admin": {"token_file": str(token_file)},
            "forward": {
                "identity_headers": {
                    "X-Auth-Subject": "sub",
                    "X-Auth-Roles": roles_claim,
                    "X-Auth-Token-Id": "jti",
                }
            },
        }
        a, b = await gateways(**overrides), await gateways(**overrides)

        def mint(sub: str = "user-1") -> str:
            return key.sign(idp.claims(issuer, clock.now(), sub), headers=idp.header)

        token = mint()
        spoofed = {"Authorization": f"Bearer {token}", "X-Auth-Roles": "superuser"}
        response = await a.http.get(a.url + "/api/x", headers=spoofed)
        assert response.status == 200, await response.text()
        seen = upstream.received[-1].header_list
        assert [v for k, v in seen if k.lower() == "x-auth-subject"] == ["user-1"]
        roles_seen = [v for k, v in seen if k.lower() == "x-auth-roles"]
        assert len(roles_seen) == 1 and idp.role in roles_seen[0].split(" ")
        assert "superuser" not in roles_seen[0]
        # Every IdP's token reaches the upstream with one token id (jti, uti or digest:...).
        token_ids = [v for k, v in seen if k.lower() == "x-auth-token-id"]
        assert len(token_ids) == 1 and token_ids[0], seen

        # One idle clock for both instances: used at A, then B 100 s later, then A again
        # 200 s after issue (alive only because B's use counted), then idle at both.
        clock.advance(100)
        assert await reason(b, "/api/x", token) == (200, None)
        clock.advance(100)
        assert await reason(a, "/api/x", token) == (200, None)
        clock.advance(121)
        assert await reason(a, "/api/x", token) == (401, "idle_timeout")
        assert await reason(b, "/api/x", token) == (401, "idle_timeout")

        fresh = mint()
        assert await reason(a, "/scoped/x", fresh) == (200, None)
        assert await reason(b, "/scoped-missing/x", fresh) == (403, "insufficient_scope")
        assert await reason(a, "/roles/x", fresh) == (200, None)
        refused = await b.get("/roles-missing/x", fresh)
        assert refused.status == 403
        assert (await refused.json())["reason"] == "insufficient_role"
        assert 'error="insufficient_scope"' in refused.headers["WWW-Authenticate"]

        other = mint(sub="user-2")
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                a.admin_url + "/admin/revoke",
                json={"sub": "user-1"},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ) as answer,
        ):
            assert answer.status == 204
        deadline = time.monotonic() + 1.0
        while (status := await reason(b, "/api/x", fresh)) != (401, "revoked"):
            assert status == (200, None) and time.monotonic() < deadline, status
            await asyncio.sleep(0.05)
        assert await reason(a, "/api/x", fresh) == (401, "revoked")
        assert await reason(b, "/api/x", other) == (200, None)


async def test_entra_multi_tenant_issuer_list_discovers_every_tenant(
    gateways: GatewayFactory, upstream: Upstream, clock: ManualClock
):
    """`issuer` as a list: each tenant's discovery document and keys; other tenants refused."""
    tenants = ["11111111-aaaa", "22222222-bbbb", "33333333-cccc"]
    keys = [rsa_key(kid=f"tenant-{i}") for i in range(3)]
    servers = [
        JwksServer([key], issuer_path=f"/{tid}/v2.0")
        for key, tid in zip(keys, tenants, strict=True)
    ]
    for server in servers:
        await server.start()
        server.discovery_issuer = server.url + "/{tenantid}/v2.0"
    try:
        trusted = [issuer_of(server) for server in servers[:2]]
        gw = await gateways(
            providers=[
                {
                    "name": "entra",
                    "issuer": trusted,
                    "audiences": ["api://orders-api"],
                    "algorithms": ["RS256"],
                    "discovery": True,
                }
            ]
        )
        assert [s.discovery_requests for s in servers] == [1, 1, 0]
        for key, server in zip(keys, servers, strict=True):
            token = key.sign(entra_v2(issuer_of(server), clock.now(), "user-1"))
            expected = (200, None) if issuer_of(server) in trusted else (401, "wrong_issuer")
            assert await reason(gw, "/api/x", token) == expected
        # A trusted tenant's issuer on a token signed by another tenant's key: unknown_key.
        forged = keys[2].sign(entra_v2(trusted[0], clock.now(), "user-1"))
        assert (await reason(gw, "/api/x", forged))[0] == 401
    finally:
        for server in servers:
            await server.stop()


async def test_keycloak_azp_and_typ_claim(
    gateways: GatewayFactory, clock: ManualClock, signing_key: SigningKey, key_file: Path
):
    """azp matches audiences only where the provider says so; `typ: Bearer` is a claim, never
    mistaken for the JOSE header's typ."""
    issuer = "https://keycloak.test/realms/shop"

    def provider(**extra: Any) -> dict[str, Any]:
        return {
            "name": "kc",
            "issuer": issuer,
            "audiences": ["orders-api"],
            "public_key_file": str(key_file),
            **extra,
        }

    token = signing_key.sign(keycloak(issuer, clock.now(), "alice"), headers={"typ": "JWT"})
    plain = await gateways(providers=[provider()])
    assert await reason(plain, "/api/x", token) == (401, "wrong_audience")
    azp = await gateways(providers=[provider(audience_claims=["aud", "azp"])])
    assert await reason(azp, "/api/x", token) == (200, None)
    header_jwt = await gateways(
        providers=[provider(audience_claims=["aud", "azp"], require_typ="JWT")]
    )
    assert await reason(header_jwt, "/api/x", token) == (200, None)
    wants_bearer = await gateways(
        providers=[provider(audience_claims=["aud", "azp"], require_typ="Bearer")]
    )
    assert await reason(wants_bearer, "/api/x", token) == (401, "wrong_type")


def keycloak_id_token(issuer: str, now: float, sub: str) -> dict[str, Any]:
    # Keycloak's ID token for the same client: typ claim "ID", aud and azp the client id, the
    # nonce and the at_hash of the access token it came with.
    return {
        "exp": int(now) + 300,
        "iat": int(now),
        "auth_time": int(now) - 30,
        "jti": str(uuid.uuid4()),
        "iss": issuer,
        "aud": "orders-api",
        "sub": sub,
        "typ": "ID",
        "azp": "orders-api",
        "nonce": "n-0S6_WzA2Mj",
        "sid": str(uuid.uuid4()),
        "at_hash": "77QmUPtjPfzWtF2AnpK9RQ",
        "acr": "1",
        "preferred_username": "alice",
    }


async def test_keycloak_id_and_logout_tokens_are_refused_where_its_access_token_passes(
    gateways: GatewayFactory, upstream: Upstream, clock: ManualClock
):
    """The Keycloak recipe (the client id as the audience, azp allowed): Keycloak's header typ
    is JWT for every token, so its typ claim and the ID token's hash claims tell them apart."""
    key = rsa_key(kid="kc-1")
    async with JwksServer([key], issuer_path="/realms/shop") as server:
        issuer = server.url + "/realms/shop"
        provider = {
            "name": "kc",
            "issuer": issuer,
            "audiences": ["orders-api"],
            "audience_claims": ["aud", "azp"],
            "algorithms": ["RS256"],
            "discovery": True,
        }
        gw = await gateways(providers=[provider])

        def sign(payload: dict[str, Any]) -> str:
            return key.sign(payload, headers={"typ": "JWT"})

        now = clock.now()
        assert await reason(gw, "/api/x", sign(keycloak(issuer, now, "alice"))) == (200, None)
        id_token = keycloak_id_token(issuer, now, "alice")
        assert await reason(gw, "/api/x", sign(id_token)) == (401, "wrong_type")
        del id_token["at_hash"]  # one issued without an access token: its typ claim says it
        assert await reason(gw, "/api/x", sign(id_token)) == (401, "wrong_type")
        logout = keycloak(issuer, now, "alice") | {"typ": "Logout"}
        assert await reason(gw, "/api/x", sign(logout)) == (401, "wrong_type")
        assert len(upstream.received) == 1


async def test_oidc_provider_id_token_is_refused_by_require_typ(
    gateways: GatewayFactory, upstream: Upstream, clock: ManualClock
):
    """oidc-provider's ID token carries none of the ID-token-only claims (`sub`, `nonce`, `aud`
    the client id): even with the client id listed as an audience, `require_typ: at+jwt`
    (which its access tokens meet) refuses it."""
    key = rsa_key(kid="op-1")
    async with JwksServer([key]) as server:
        provider = {
            "name": "op",
            "issuer": server.url,
            "audiences": ["https://api.example/", "web-client"],
            "algorithms": ["RS256"],
            "discovery": True,
            "require_typ": "at+jwt",
        }
        gw = await gateways(providers=[provider])
        now = clock.now()
        access = key.sign(oidc_provider(server.url, now, "alice"), headers={"typ": "at+jwt"})
        assert await reason(gw, "/api/x", access) == (200, None)
        id_token = {
            "sub": "alice",
            "nonce": "n1",
            "aud": "web-client",
            "exp": int(now) + 600,
            "iat": int(now),
            "iss": server.url,
        }
        assert await reason(gw, "/api/x", key.sign(id_token)) == (401, "wrong_type")
        assert len(upstream.received) == 1
