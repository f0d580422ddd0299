"""A test identity provider on a real socket: OIDC discovery, a JWKS, and keys that sign tokens.

    async with JwksServer([rsa_key("k1")], cache_control="max-age=1") as idp:
        provider = Provider(name="idp", issuer=idp.issuer, audiences=["api"], discovery=True)
        token = idp.keys[0].sign(claims(idp.issuer, "api"))
        idp.rotate(rsa_key("k2"))   # next JWKS response serves only k2
        idp.fail(500)               # every answer is a 500 ...
        idp.hang()                  # ... or never comes (until recover() or stop())
        idp.recover()
        idp.jwks_requests           # how many times the JWKS was fetched

`stop()` then `start()` again reuses the same port, to play a provider that is down.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

_CURVES: dict[str, ec.EllipticCurve] = {
    "ES256": ec.SECP256R1(),
    "ES384": ec.SECP384R1(),
    "ES512": ec.SECP521R1(),
}


@dataclass
class SigningKey:
    """A private key with its kid and default alg: signs tokens, publishes its public JWK/PEM."""

    kid: str | None
    alg: str
    private_key: PrivateKey

    @property
    def public_key(self) -> Any:
        return self.private_key.public_key()

    def public_jwk(self, **extra: Any) -> dict[str, Any]:
        """The public JWK with kid, alg and use=sig; `extra` adds or overrides members."""
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            jwk = RSAAlgorithm.to_jwk(self.public_key, as_dict=True)
        elif isinstance(self.private_key, ec.EllipticCurvePrivateKey):
            jwk = ECAlgorithm.to_jwk(self.public_key, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(self.public_key, as_dict=True)
        jwk.update({"alg": self.alg, "use": "sig"})
        if self.kid is not None:
            jwk["kid"] = self.kid
        jwk.update(extra)
        return {name: value for name, value in jwk.items() if value is not None}

    def private_jwk(self) -> dict[str, Any]:
        """The JWK with its private members (what a JWKS must never publish)."""
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            jwk = RSAAlgorithm.to_jwk(self.private_key, as_dict=True)
        elif isinstance(self.private_key, ec.EllipticCurvePrivateKey):
            jwk = ECAlgorithm.to_jwk(self.private_key, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(self.private_key, as_dict=True)
        if self.kid is not None:
            jwk["kid"] = self.kid
        return jwk

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(  # type: ignore[no-any-return]
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(
        self,
        payload: Mapping[str, Any],
        *,
        alg: str | None = None,
        headers: Mapping[str, Any] | None = None,
        kid: str | None = None,
    ) -> str:
        """A compact JWS; header kid is this key's unless `kid` or `headers` say otherwise."""
        header: dict[str, Any] = {}
        if (kid or self.kid) is not None:
            header["kid"] = kid or self.kid
        header.update(headers or {})
        return jwt.encode(
            dict(payload), self.private_key, algorithm=alg or self.alg, headers=header
        )


def rsa_key(kid: str | None = None, alg: str = "RS256", bits: int = 2048) -> SigningKey:
    """A fresh RSA key (kid defaults to a random one)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return SigningKey(kid=kid if kid is not None else _new_kid(), alg=alg, private_key=private)


def ec_key(kid: str | None = None, alg: str = "ES256") -> SigningKey:
    """A fresh EC key on the curve `alg` needs (ES256: P-256, ES384: P-384, ES512: P-521)."""
    private = ec.generate_private_key(_CURVES[alg])
    return SigningKey(kid=kid if kid is not None else _new_kid(), alg=alg, private_key=private)


def ed25519_key(kid: str | None = None) -> SigningKey:
    private = ed25519.Ed25519PrivateKey.generate()
    return SigningKey(kid=kid if kid is not None else _new_kid(), alg="EdDSA", private_key=private)


def _new_kid() -> str:
    return uuid.uuid4().hex[:12]


def claims(
    issuer: str,
    audience: str | list[str],
    *,
    ttl: float = 300,
    now: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Access-token claims: iss, aud, sub, iat, exp = iat + ttl, a fresh jti, plus `extra`."""
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": "user-1",
        "iat": issued,
        "exp": issued + int(ttl),
        "jti": uuid.uuid4().hex,
    }
    payload.update(extra)
    return payload


@dataclass
class JwksServer:
    """An OIDC discovery document and a JWKS served by aiohttp on 127.0.0.1.

    `issuer` is `url + issuer_path` unless overridden; `discovery_issuer` makes the discovery
    document claim another issuer. `extra_jwks` are raw JWK dicts appended to the served set.
    """

    keys: list[SigningKey] = field(default_factory=list)
    cache_control: str | None = "max-age=300"
    issuer_path: str = ""
    issuer_override: str | None = None
    discovery_issuer: str | None = None
    extra_jwks: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    status: int = 200
    jwks_requests: int = 0
    discovery_requests: int = 0
    requests: list[tuple[float, str]] = field(default_factory=list)  # (time.monotonic(), path)
    _runner: web.AppRunner | None = None
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._released.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return self.issuer_override or self.url + self.issuer_path

    @property
    def jwks_uri(self) -> str:
        return self.url + self.issuer_path + "/jwks"

    def jwks(self) -> dict[str, Any]:
        """The JWK Set as served right now."""
        return {"keys": [key.public_jwk() for key in self.keys] + list(self.extra_jwks)}

    def rotate(self, *keys: SigningKey) -> None:
        """Serve exactly these keys from the next request on."""
        self.keys = list(keys)

    def fail(self, status: int = 500) -> None:
        """Answer every request with this status (discovery and JWKS)."""
        self.status = status

    def hang(self) -> None:
        """Accept requests but never answer them, until `recover()` or `stop()`."""
        self._released.clear()

    def recover(self) -> None:
        self.status = 200
        self._released.set()

    async def start(self) -> None:
        app = web.Application()
        base = self.issuer_path
        app.router.add_get(base + "/.well-known/openid-configuration", self._discovery)
        app.router.add_get(base + "/jwks", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _answer(
        self, request: web.Request, document: dict[str, Any], cache: bool
    ) -> web.Response:
        self.requests.append((time.monotonic(), request.path))
        await self._released.wait()
        if self.status != 200:
            return web.json_response({"error": "unavailable"}, status=self.status)
        headers = {"Cache-Control": self.cache_control} if cache and self.cache_control else {}
        return web.json_response(document, headers=headers)

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_requests += 1
        document = {
            "issuer": self.discovery_issuer or self.issuer,
            "jwks_uri": self.jwks_uri,
            "id_token_signing_alg_values_supported": sorted({key.alg for key in self.keys}),
        }
        return await self._answer(request, document, cache=False)

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_requests += 1
        return await self._answer(request, self.jwks(), cache=True)
