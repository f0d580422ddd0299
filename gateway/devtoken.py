"""Minting signed tokens for development and tests (`idlegate token`, `idlegate demo`)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

_CURVE_ALG = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class KeyFileError(Exception):
    pass


def load_private_key(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"--key {path}: cannot read ({exc.strerror})") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"--key {path}: not an unencrypted PEM private key") from None


def algorithm_for(key: Any) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _CURVE_ALG:
        return _CURVE_ALG[key.curve.name]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise KeyFileError("unsupported key type: use an RSA, EC (P-256/384/521) or Ed25519 key")


def mint(
    key: Any,
    *,
    issuer: str,
    audience: str,
    subject: str = "dev-user",
    ttl: float = 600,
    kid: str | None = None,
    sid: str | None = None,
    scope: str | None = None,
    issued_at: float | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    iat = int(time.time() if issued_at is None else issued_at)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": iat,
        "exp": iat + int(ttl),
        "jti": uuid.uuid4().hex,
    }
    if sid is not None:
        claims["sid"] = sid
        claims["auth_time"] = iat
    if scope:
        claims["scope"] = scope
    claims.update(extra or {})
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, key, algorithm=algorithm_for(key), headers=headers)


def generate_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def public_pem(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
