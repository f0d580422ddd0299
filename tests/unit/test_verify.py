"""The verified-token cache: bounded, never trusted past exp, dropped when the key goes."""

from __future__ import annotations

from pathlib import Path

import pytest
from jwks_server import SigningKey, claims

from gateway import config as config_module
from gateway.clock import ManualClock
from gateway.reasons import Reason, Refusal
from gateway.store.base import KeyHasher
from gateway.tokens.keys import KeyRing
from gateway.tokens.verify import Verifier

ISSUER = "https://issuer.test/"


async def make_verifier(key_file: Path, clock: ManualClock, cache_size: int) -> Verifier:
    config = config_module.from_data(
        {
            "providers": [
                {
                    "name": "main",
                    "issuer": ISSUER,
                    "audiences": ["api"],
                    "algorithms": ["RS256"],
                    "public_key_file": str(key_file),
                }
            ],
            "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:1"}],
        },
        environ={},
    )
    ring = KeyRing(config.providers[0], None, {}, clock=clock)
    await ring.start()
    return Verifier(config, {"main": ring}, KeyHasher(b"k"), clock, cache_size=cache_size)


async def test_cache_never_holds_more_than_its_size(
    key_file: Path, signing_key: SigningKey, clock: ManualClock
):
    verifier = await make_verifier(key_file, clock, cache_size=3)
    tokens = [signing_key.sign(claims(ISSUER, "api", now=clock.now())) for _ in range(10)]
    for token in tokens:
        await verifier.verify(token)
    assert len(verifier._cache) == 3
    assert set(verifier._cache) == set(tokens[-3:])  # the oldest went first


async def test_a_cached_token_is_refused_and_forgotten_once_expired(
    key_file: Path, signing_key: SigningKey, clock: ManualClock
):
    verifier = await make_verifier(key_file, clock, cache_size=10)
    token = signing_key.sign(claims(ISSUER, "api", ttl=60, now=clock.now()))
    await verifier.verify(token)
    clock.advance(60 + 30)  # exp + leeway
    with pytest.raises(Refusal) as refused:
        await verifier.verify(token)
    assert refused.value.reason is Reason.EXPIRED
    assert token not in verifier._cache
