"""Which keys a provider trusts, and for which algorithms: the defence against key confusion."""

from __future__ import annotations

import datetime
import json
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwks_server import SigningKey, claims, ec_key, ed25519_key, rsa_key
from prometheus_client import REGISTRY

from gateway.config import ConfigError, Provider, from_data
from gateway.tokens.keys import (
    KeyRing,
    KeySourceError,
    PrivateKeyMaterialError,
    UnusableKeyError,
    VerificationKey,
    algorithms_for,
    freshness,
    key_from_jwk,
    key_from_pem,
    key_from_secret,
    keys_from_jwks,
    refresh_delay,
)

RSA_ALL = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}


@pytest.fixture(scope="module")
def rsa_signing() -> SigningKey:
    return rsa_key("rsa-1")


def provider(**source: Any) -> Provider:
    source.setdefault("algorithms", ["RS256", "ES256"])
    return Provider(
        name=f"p-{uuid.uuid4().hex[:8]}",
        issuer="https://issuer.example/",
        audiences=["api"],
        **source,
    )


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- algorithms by key type ---------------------------------------------------------------------


def test_rsa_key_verifies_only_rsa_algorithms(rsa_signing: SigningKey) -> None:
    assert algorithms_for(rsa_signing.public_key) == RSA_ALL


@pytest.mark.parametrize(
    ("curve", "alg"),
    [(ec.SECP256R1(), "ES256"), (ec.SECP384R1(), "ES384"), (ec.SECP521R1(), "ES512")],
)
def test_ec_key_verifies_the_algorithm_of_its_curve(curve: ec.EllipticCurve, alg: str) -> None:
    assert algorithms_for(ec.generate_private_key(curve).public_key()) == {alg}


def test_ec_key_on_other_curves_verifies_nothing() -> None:
    assert algorithms_for(ec.generate_private_key(ec.SECP256K1()).public_key()) == set()


def test_edwards_keys_verify_eddsa() -> None:
    assert algorithms_for(ed25519.Ed25519PrivateKey.generate().public_key()) == {"EdDSA"}
    assert algorithms_for(ed448.Ed448PrivateKey.generate().public_key()) == {"EdDSA"}


def test_hmac_secret_verifies_the_hs_algorithms_it_is_long_enough_for() -> None:
    assert algorithms_for(b"x" * 31) == set()
    assert algorithms_for(b"x" * 32) == {"HS256"}
    assert algorithms_for(b"x" * 48) == {"HS256", "HS384"}
    assert algorithms_for(b"x" * 64) == {"HS256", "HS384", "HS512"}


def test_private_keys_and_strings_verify_nothing(rsa_signing: SigningKey) -> None:
    assert algorithms_for(rsa_signing.private_key) == set()
    assert algorithms_for(rsa_signing.public_pem().decode()) == set()


# -- JWKs ---------------------------------------------------------------------------------------


def test_rsa_jwk_never_becomes_an_hmac_key(rsa_signing: SigningKey) -> None:
    jwk = rsa_signing.public_jwk(alg=None)
    key = key_from_jwk(jwk, ["RS256", "HS256", "ES256"])
    assert key.kid == "rsa-1"
    assert key.algorithms == {"RS256"}
    assert isinstance(key.key, rsa.RSAPublicKey)


def test_rsa_jwk_claiming_hs256_is_refused(rsa_signing: SigningKey) -> None:
    with pytest.raises(UnusableKeyError, match="alg HS256"):
        key_from_jwk(rsa_signing.public_jwk(alg="HS256"), ["RS256", "HS256"])


def test_jwk_alg_narrows_the_allowed_algorithms(rsa_signing: SigningKey) -> None:
    key = key_from_jwk(rsa_signing.public_jwk(alg="PS384"), ["RS256", "PS256", "PS384"])
    assert key.algorithms == {"PS384"}


def test_jwk_alg_outside_the_allow_list_drops_the_key(rsa_signing: SigningKey) -> None:
    with pytest.raises(UnusableKeyError, match="allows none"):
        key_from_jwk(rsa_signing.public_jwk(alg="RS512"), ["RS256"])


def test_without_alg_every_allowed_algorithm_of_the_type_is_kept(rsa_signing: SigningKey) -> None:
    key = key_from_jwk(rsa_signing.public_jwk(alg=None), ["RS256", "PS256", "ES256"])
    assert key.algorithms == {"RS256", "PS256"}


def test_ec_and_okp_jwks() -> None:
    assert key_from_jwk(ec_key("e", "ES384").public_jwk(), ["ES384"]).algorithms == {"ES384"}
    assert key_from_jwk(ed25519_key("o").public_jwk(), ["EdDSA"]).algorithms == {"EdDSA"}
    with pytest.raises(UnusableKeyError):
        key_from_jwk(ec_key("e", "ES256").public_jwk(alg=None), ["RS256"])


@pytest.mark.parametrize(
    "change",
    [{"use": "enc"}, {"key_ops": ["encrypt"]}, {"key_ops": "verify"}, {"kid": 7}, {"alg": 1}],
)
def test_jwk_not_meant_for_signatures_is_refused(
    rsa_signing: SigningKey, change: dict[str, Any]
) -> None:
    with pytest.raises(UnusableKeyError):
        key_from_jwk(rsa_signing.public_jwk(**change), ["RS256"])


def test_jwk_with_use_sig_and_verify_op_is_accepted(rsa_signing: SigningKey) -> None:
    key = key_from_jwk(rsa_signing.public_jwk(key_ops=["verify"]), ["RS256"])
    assert key.algorithms == {"RS256"}


@pytest.mark.parametrize("make", [lambda: rsa_key("r"), lambda: ec_key("e"), ed25519_key])
def test_jwk_with_private_material_is_refused(make: Any) -> None:
    jwk = make().private_jwk()
    with pytest.raises(PrivateKeyMaterialError, match="private key material"):
        key_from_jwk(jwk, ["RS256", "ES256", "EdDSA"])


def test_symmetric_jwk_is_refused() -> None:
    with pytest.raises(UnusableKeyError, match="oct"):
        key_from_jwk({"kty": "oct", "kid": "s"}, ["HS256", "RS256"])
    # With its `k` it is a published secret: a leak, reported as one.
    jwk = {"kty": "oct", "kid": "s", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}
    with pytest.raises(PrivateKeyMaterialError, match="private key material"):
        key_from_jwk(jwk, ["HS256", "RS256"])


@pytest.mark.parametrize(
    "jwk",
    [
        "not an object",
        {"kid": "x"},
        {"kty": "XYZ"},
        {"kty": "RSA", "n": "!!!", "e": "AQAB"},
        {"kty": "RSA", "e": "AQAB"},
        {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"},
        {"kty": "OKP", "crv": "X25519", "x": "AAAA"},
    ],
)
def test_malformed_jwk_is_refused_not_crashed(jwk: Any) -> None:
    with pytest.raises(UnusableKeyError):
        key_from_jwk(jwk, ["RS256", "ES256", "EdDSA"])


def test_short_rsa_key_is_refused() -> None:
    with pytest.raises(UnusableKeyError, match="1024 bits"):
        key_from_jwk(rsa_key("short", bits=1024).public_jwk(), ["RS256"])


def test_jwks_keeps_only_usable_signature_keys(rsa_signing: SigningKey) -> None:
    good_ec = ec_key("ec-1")
    document = {
        "keys": [
            rsa_signing.public_jwk(),
            rsa_key("enc-1").public_jwk(use="enc", alg="RSA-OAEP"),
            ec_key("private-1").private_jwk(),
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            good_ec.public_jwk(),
            ed25519_key("not-allowed").public_jwk(),
            "junk",
        ]
    }
    keys = keys_from_jwks(document, ["RS256", "ES256"])
    assert [key.kid for key in keys] == ["rsa-1", "ec-1"]


def test_jwks_duplicate_kid_keeps_the_first(rsa_signing: SigningKey) -> None:
    other = rsa_key("rsa-1")
    keys = keys_from_jwks({"keys": [rsa_signing.public_jwk(), other.public_jwk()]}, ["RS256"])
    assert len(keys) == 1
    assert keys[0].key.public_numbers() == rsa_signing.public_key.public_numbers()


@pytest.mark.parametrize("document", [[], {"keys": {}}, {"no": "keys"}, None])
def test_document_without_keys_list_is_not_a_jwks(document: Any) -> None:
    with pytest.raises(UnusableKeyError, match="'keys' list"):
        keys_from_jwks(document, ["RS256"])


# -- PEM and secrets ----------------------------------------------------------------------------


def self_signed_certificate(signing: SigningKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer.example")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signing.public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(signing.private_key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def test_pem_public_key_and_certificate(rsa_signing: SigningKey) -> None:
    from_key = key_from_pem(rsa_signing.public_pem(), ["RS256", "ES256"])
    from_cert = key_from_pem(self_signed_certificate(rsa_signing), ["RS256", "ES256"])
    assert from_key.kid is None
    assert from_key.algorithms == from_cert.algorithms == {"RS256"}
    assert from_cert.key.public_numbers() == rsa_signing.public_key.public_numbers()


def test_pem_private_key_is_refused_with_the_fix(rsa_signing: SigningKey) -> None:
    with pytest.raises(UnusableKeyError, match=r"private key.*-pubout"):
        key_from_pem(rsa_signing.private_pem(), ["RS256"])


def test_pem_garbage_is_refused() -> None:
    with pytest.raises(UnusableKeyError, match="not a PEM public key"):
        key_from_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", ["RS256"])


def test_hmac_secret_shorter_than_32_bytes_is_refused() -> None:
    with pytest.raises(UnusableKeyError, match=r"31 bytes.*at least 32 bytes.*RFC 7518"):
        key_from_secret(b"s" * 31, ["HS256"])


def test_hmac_secret_keeps_only_algorithms_it_is_long_enough_for() -> None:
    assert key_from_secret(b"s" * 40, ["HS256", "HS512"]).algorithms == {"HS256"}
    assert key_from_secret(b"s" * 64, ["HS256", "HS512"]).algorithms == {"HS256", "HS512"}
    with pytest.raises(UnusableKeyError, match="at least 64"):
        key_from_secret(b"s" * 40, ["HS512"])


def test_verification_key_repr_shows_no_key_material() -> None:
    key = key_from_secret(b"top-secret-value-top-secret-value", ["HS256"])
    assert "top-secret" not in repr(key)
    assert "HS256" in repr(key)


# -- refresh timing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cache_control", "age", "expected"),
    [
        ("public, max-age=600, must-revalidate", None, 600.0),
        ("max-age=600", "100", 500.0),
        ("max-age=60", "100", 0.0),
        ('max-age="30"', None, 30.0),
        ("no-store", None, 0.0),
        ("max-age=abc", None, None),
        ("private", None, None),
        (None, None, None),
    ],
)
def test_freshness_from_cache_control(
    cache_control: str | None, age: str | None, expected: float | None
) -> None:
    assert freshness(cache_control, age) == expected


def test_refresh_delay_is_a_little_before_stale_within_bounds() -> None:
    assert 240 <= refresh_delay(None, 60, 3600) <= 270  # the 300 s default
    assert refresh_delay(10, 60, 3600) == 60  # never more often than the minimum
    assert 2880 <= refresh_delay(86400, 60, 3600) <= 3240  # never later than the maximum
    assert 0.8 <= refresh_delay(1, 0.5, 10) <= 0.9


# -- file and environment sources ---------------------------------------------------------------


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


async def test_jwks_file_ring_looks_up_by_kid(tmp_path: Path, rsa_signing: SigningKey) -> None:
    other = ec_key("ec-1")
    jwks = write_json(
        tmp_path / "jwks.json", {"keys": [rsa_signing.public_jwk(), other.public_jwk()]}
    )
    config = provider(jwks_file=jwks)
    ring = KeyRing(config, None)
    assert not ring.ready
    await ring.start()
    assert ring.ready
    assert ring.key_count == 2
    rsa_found = ring.lookup("rsa-1")
    assert rsa_found is not None
    assert rsa_found.algorithms == {"RS256"}
    assert ring.lookup("ec-1") is not None
    assert ring.lookup("nope") is None
    assert ring.lookup(None) is None  # two keys: a token without kid matches none
    assert await ring.lookup_or_refresh("nope") is None
    assert metric("idlegate_jwks_keys", provider=config.name) == 2
    assert metric("idlegate_jwks_refresh_total", provider=config.name, result="ok") == 1
    token = rsa_signing.sign(claims("https://issuer.example/", "api"))
    decoded = jwt.decode(
        token, rsa_found.key, algorithms=sorted(rsa_found.algorithms), audience="api"
    )
    assert decoded["iss"] == "https://issuer.example/"
    await ring.close()


async def test_single_key_jwks_file_answers_a_token_without_kid(
    tmp_path: Path, rsa_signing: SigningKey
) -> None:
    ring = KeyRing(
        provider(jwks_file=write_json(tmp_path / "j.json", {"keys": [rsa_signing.public_jwk()]})),
        None,
    )
    await ring.start()
    assert ring.lookup(None) is ring.lookup("rsa-1") is not None
    assert ring.lookup("other") is None  # the key has a kid, so a different kid is a miss


async def test_missing_jwks_file_is_a_clear_startup_error(tmp_path: Path) -> None:
    config = provider(jwks_file=tmp_path / "absent.json")
    with pytest.raises(KeySourceError) as caught:
        await KeyRing(config, None).start()
    message = str(caught.value)
    assert config.name in message
    assert "absent.json" in message
    assert "cannot read (No such file or directory)" in message
    assert metric("idlegate_jwks_refresh_total", provider=config.name, result="error") == 1


async def test_jwks_file_that_is_not_json_is_a_startup_error(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text("{not json")
    with pytest.raises(KeySourceError, match="not valid JSON"):
        await KeyRing(provider(jwks_file=path), None).start()


async def test_jwks_file_without_usable_keys_is_a_startup_error(tmp_path: Path) -> None:
    path = write_json(tmp_path / "jwks.json", {"keys": [ec_key("e").public_jwk()]})
    with pytest.raises(KeySourceError, match=r"no usable key for algorithms \['RS256'\]"):
        await KeyRing(provider(jwks_file=path, algorithms=["RS256"]), None).start()


async def test_public_key_file_answers_any_kid(tmp_path: Path, rsa_signing: SigningKey) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(rsa_signing.public_pem())
    ring = KeyRing(provider(public_key_file=path, algorithms=["RS256", "PS256"]), None)
    await ring.start()
    key = ring.lookup(None)
    assert key is not None
    assert key.algorithms == {"RS256", "PS256"}
    assert ring.lookup("whatever-kid") is key
    assert await ring.lookup_or_refresh("another") is key


async def test_public_key_file_holding_a_private_key_is_refused(
    tmp_path: Path, rsa_signing: SigningKey
) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(rsa_signing.private_pem())
    with pytest.raises(KeySourceError, match="holds a private key"):
        await KeyRing(provider(public_key_file=path), None).start()


async def test_public_key_file_of_a_type_not_allowed_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(ec_key("e").public_pem())
    with pytest.raises(KeySourceError, match=r"allows none of the configured algorithms"):
        await KeyRing(provider(public_key_file=path, algorithms=["RS256"]), None).start()


async def test_hmac_secret_from_environment() -> None:
    secret = "k" * 32
    config = provider(hmac_secret_env="IDP_SECRET", algorithms=["HS256"])
    ring = KeyRing(config, None, {"IDP_SECRET": secret})
    await ring.start()
    key = ring.lookup("any")
    assert key is not None
    assert key.key == secret.encode()
    assert key.algorithms == {"HS256"}
    token = jwt.encode({"sub": "u"}, secret, algorithm="HS256")
    assert jwt.decode(token, key.key, algorithms=sorted(key.algorithms))["sub"] == "u"


async def test_hmac_secret_missing_from_environment_is_refused() -> None:
    config = provider(hmac_secret_env="IDP_SECRET", algorithms=["HS256"])
    with pytest.raises(KeySourceError, match="environment variable IDP_SECRET is not set"):
        await KeyRing(config, None, {}).start()


async def test_short_hmac_secret_is_refused_without_showing_it() -> None:
    config = provider(hmac_secret_env="IDP_SECRET", algorithms=["HS256"])
    with pytest.raises(KeySourceError, match="at least 32 bytes") as caught:
        await KeyRing(config, None, {"IDP_SECRET": "short-secret"}).start()
    assert "short-secret" not in str(caught.value)


def test_verification_key_is_immutable() -> None:
    key = VerificationKey(kid="a", key=b"x" * 32, algorithms=frozenset({"HS256"}))
    with pytest.raises(AttributeError):
        key.kid = "b"  # type: ignore[misc]


# -- jwks_miss_refetch: how often an unknown kid may refetch ------------------------------------


def test_jwks_miss_refetch_defaults_to_5s_and_takes_a_duration() -> None:
    assert provider(discovery=True).jwks_miss_refetch == 5.0
    assert provider(discovery=True, jwks_miss_refetch="1m30s").jwks_miss_refetch == 90.0
    ring = KeyRing(provider(discovery=True, jwks_miss_refetch="2s"), None)
    assert ring.miss_refetch_interval == 2.0
    tuned = KeyRing(provider(discovery=True), None, miss_refetch_interval=0.5)
    assert tuned.miss_refetch_interval == 0.5


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (0, "must be more than 0"),
        ("0s", "must be more than 0"),
        (-1, "cannot be negative"),
        ("soon", "invalid duration"),
    ],
)
def test_jwks_miss_refetch_must_be_a_positive_duration(value: Any, problem: str) -> None:
    data = {
        "providers": [
            provider(discovery=True).model_dump(mode="json") | {"jwks_miss_refetch": value}
        ],
        "routes": [{"prefix": "/api/", "upstream": "http://orders:8000"}],
    }
    with pytest.raises(ConfigError) as caught:
        from_data(data, environ={})
    [found] = caught.value.problems
    assert found.startswith("providers.0.jwks_miss_refetch: ")
    assert problem in found
