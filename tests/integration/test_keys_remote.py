"""Remote key sets over real sockets: discovery, rotation, refresh timing, failures and backoff."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from jwks_server import JwksServer, SigningKey, claims, ec_key, rsa_key
from prometheus_client import REGISTRY

from gateway.clock import ManualClock
from gateway.config import Provider
from gateway.tokens.keys import KeyRing

MakeRing = Callable[..., KeyRing]


@pytest.fixture(scope="module")
def k1() -> SigningKey:
    return rsa_key("k1")


@pytest.fixture(scope="module")
def k2() -> SigningKey:
    return rsa_key("k2")


@pytest.fixture
async def idp(k1: SigningKey) -> AsyncIterator[JwksServer]:
    async with JwksServer([k1]) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def make_ring(http: aiohttp.ClientSession) -> AsyncIterator[MakeRing]:
    """KeyRing for a provider of the test's own (unique name, so metrics start at zero)."""
    rings: list[KeyRing] = []

    def make(server: JwksServer, *, ring: dict[str, Any] | None = None, **fields: Any) -> KeyRing:
        fields.setdefault("discovery", "jwks_uri" not in fields)
        fields.setdefault("algorithms", ["RS256", "ES256"])
        provider = Provider(
            name=f"idp-{uuid.uuid4().hex[:8]}",
            issuer=fields.pop("issuer", server.issuer),
            audiences=["api"],
            **fields,
        )
        options = {"backoff_base": 0.2, **(ring or {})}
        created = KeyRing(provider, http, **options)
        rings.append(created)
        return created

    yield make
    for created in rings:
        await created.close()


def refreshes(ring: KeyRing, result: str) -> float:
    labels = {"provider": ring.provider.name, "result": result}
    return REGISTRY.get_sample_value("idlegate_jwks_refresh_total", labels) or 0.0


def keys_gauge(ring: KeyRing) -> float | None:
    return REGISTRY.get_sample_value("idlegate_jwks_keys", {"provider": ring.provider.name})


async def eventually(condition: Callable[[], bool], within: float = 2.0) -> float:
    """Seconds until `condition()` held; fails after `within`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_discovery_leads_to_the_jwks_and_its_keys_verify_tokens(
    idp: JwksServer, make_ring: MakeRing, k1: SigningKey
) -> None:
    ring = make_ring(idp)
    await ring.start()
    assert ring.ready
    assert (idp.discovery_requests, idp.jwks_requests) == (1, 1)
    key = ring.lookup("k1")
    assert key is not None
    assert key.algorithms == {"RS256"}
    assert refreshes(ring, "ok") == 1
    assert keys_gauge(ring) == 1
    token = k1.sign(claims(idp.issuer, "api"))
    assert jwt.decode(token, key.key, algorithms=sorted(key.algorithms), audience="api")


async def test_issuer_with_path_and_trailing_slash_is_discovered(
    make_ring: MakeRing, k1: SigningKey
) -> None:
    async with JwksServer([k1], issuer_path="/realms/main") as idp:
        ring = make_ring(idp, issuer=idp.issuer + "/")
        idp.discovery_issuer = idp.issuer + "/"
        await ring.start()
        assert ring.ready
        assert idp.discovery_requests == 1


async def test_configured_jwks_uri_needs_no_discovery(idp: JwksServer, make_ring: MakeRing) -> None:
    ring = make_ring(idp, jwks_uri=idp.jwks_uri)
    await ring.start()
    assert ring.ready
    assert (idp.discovery_requests, idp.jwks_requests) == (0, 1)


async def test_many_concurrent_unknown_kids_share_one_refetch(
    idp: JwksServer, make_ring: MakeRing
) -> None:
    ring = make_ring(idp)
    await ring.start()
    before = idp.jwks_requests
    started = time.monotonic()
    found = await asyncio.gather(*(ring.lookup_or_refresh(uuid.uuid4().hex) for _ in range(500)))
    elapsed = time.monotonic() - started
    assert found == [None] * 500
    assert idp.jwks_requests - before == 1
    # Within the miss-refetch interval, later misses do not fetch at all.
    assert await ring.lookup_or_refresh("still-unknown") is None
    assert idp.jwks_requests - before == 1
    assert elapsed < 1.0


async def test_rotated_key_is_found_on_first_use(
    idp: JwksServer, make_ring: MakeRing, k1: SigningKey, k2: SigningKey
) -> None:
    ring = make_ring(idp)
    await ring.start()
    idp.rotate(k2)
    assert ring.lookup("k2") is None
    key = await ring.lookup_or_refresh("k2")
    assert key is not None
    token = k2.sign(claims(idp.issuer, "api"))
    assert jwt.decode(token, key.key, algorithms=sorted(key.algorithms), audience="api")
    assert ring.lookup("k1") is None  # retired by the provider, so no longer trusted
    assert ring.key_count == 1


async def test_miss_refetch_happens_at_most_once_per_interval(
    idp: JwksServer, make_ring: MakeRing, k1: SigningKey, k2: SigningKey
) -> None:
    clock = ManualClock()
    ring = make_ring(idp, ring={"clock": clock, "miss_refetch_interval": 30.0})
    await ring.start()
    idp.rotate(k1, k2)
    assert await ring.lookup_or_refresh("k2") is not None
    k3 = ec_key("k3")
    idp.rotate(k1, k2, k3)
    clock.advance(29)
    assert await ring.lookup_or_refresh("k3") is None
    assert idp.jwks_requests == 2
    clock.advance(2)
    assert await ring.lookup_or_refresh("k3") is not None
    assert idp.jwks_requests == 3


async def test_background_refresh_honours_max_age(
    idp: JwksServer, make_ring: MakeRing, k2: SigningKey
) -> None:
    idp.cache_control = "public, max-age=1"
    ring = make_ring(idp, jwks_min_refresh=0.5, jwks_max_refresh=10)
    await ring.start()
    idp.rotate(k2)
    waited = await eventually(lambda: idp.jwks_requests == 2, within=1.5)
    assert 0.7 < waited < 1.3  # 80-90 % of max-age
    await eventually(lambda: ring.lookup("k2") is not None, within=0.2)
    assert refreshes(ring, "ok") == 2


async def test_refresh_interval_is_clamped_to_the_provider_bounds(
    idp: JwksServer, make_ring: MakeRing
) -> None:
    idp.cache_control = "no-store"
    often = make_ring(idp, jwks_uri=idp.jwks_uri, jwks_min_refresh=1.0, jwks_max_refresh=10)
    await often.start()
    await asyncio.sleep(0.8)
    assert refreshes(often, "ok") == 1  # no-store still waits jwks_min_refresh
    idp.cache_control = "max-age=86400"
    rarely = make_ring(idp, jwks_uri=idp.jwks_uri, jwks_min_refresh=0.1, jwks_max_refresh=0.5)
    await rarely.start()
    # max-age=86400 alone would mean no refetch for a day: any refetch within seconds shows
    # the clamp (the windows leave room for a loaded machine).
    await eventually(lambda: refreshes(rarely, "ok") == 2, within=2.0)
    await eventually(lambda: refreshes(often, "ok") == 2, within=2.0)


async def test_failed_refresh_keeps_the_keys_and_retries_sooner(
    idp: JwksServer, make_ring: MakeRing, k2: SigningKey
) -> None:
    idp.cache_control = "max-age=1"
    ring = make_ring(idp, jwks_min_refresh=0.5)
    await ring.start()
    idp.fail(500)
    await eventually(lambda: refreshes(ring, "error") >= 2, within=1.6)  # 0.8-0.9 s, then +0.2 s
    assert ring.ready
    assert ring.lookup("k1") is not None
    assert keys_gauge(ring) == 1
    assert ring.last_error is not None
    assert "HTTP 500" in ring.last_error
    idp.recover()
    idp.rotate(k2)
    await eventually(lambda: ring.lookup("k2") is not None, within=1.0)
    assert ring.last_error is None


# What a JWK Set answered 200 may hold instead of the key k1 it held: none of it verifies.
WITHDRAWN: dict[str, Callable[[SigningKey], list[dict[str, Any]]]] = {
    "published with its private half": lambda k1: [k1.private_jwk()],
    "republished for encryption": lambda k1: [k1.public_jwk(use="enc")],
    "an empty set": lambda k1: [],
    "only a key type the provider does not allow": lambda k1: [ec_key("e").public_jwk()],
    "only an RSA key too short": lambda k1: [rsa_key("short", bits=1024).public_jwk()],
}


@pytest.mark.parametrize("change", WITHDRAWN, ids=list(WITHDRAWN))
async def test_a_key_set_without_usable_keys_withdraws_the_keys_held(
    idp: JwksServer, make_ring: MakeRing, k1: SigningKey, change: str
) -> None:
    # A JWK Set answered is authoritative: "no usable key" is no outage to ride out.
    ring = make_ring(idp, jwks_uri=idp.jwks_uri, algorithms=["RS256"])
    await ring.start()
    assert ring.lookup("k1") is not None
    idp.rotate()
    idp.extra_jwks = WITHDRAWN[change](k1)
    assert await ring.lookup_or_refresh("unknown") is None
    assert ring.lookup("k1") is None
    assert not ring.ready
    assert keys_gauge(ring) == 0
    assert refreshes(ring, "error") == 1
    assert ring.last_error is not None
    assert "publishes no usable key for algorithms ['RS256']" in ring.last_error
    # Published again (a botched rotation fixed; a leaked key replaced by a new one): taken
    # at the next retry, within seconds.
    back = rsa_key("k3") if "private" in change else k1
    idp.extra_jwks = []
    idp.rotate(back)
    await eventually(lambda: ring.lookup(back.kid) is not None, within=2.0)
    assert ring.ready and ring.last_error is None


async def test_a_key_published_with_its_private_half_is_never_trusted_again(
    idp: JwksServer, make_ring: MakeRing, k1: SigningKey, k2: SigningKey, caplog: Any
) -> None:
    ring = make_ring(idp, jwks_uri=idp.jwks_uri, algorithms=["RS256"])
    await ring.start()
    idp.rotate(k2)
    idp.extra_jwks = [k1.private_jwk()]
    caplog.set_level(logging.ERROR, "idlegate.keys")
    assert await ring.lookup_or_refresh("unknown") is None
    assert ring.lookup("k1") is None and ring.lookup("k2") is not None
    leak = [r for r in caplog.records if "WITH its private key material" in r.getMessage()]
    assert len(leak) == 1 and leak[0].levelno == logging.ERROR
    message = leak[0].getMessage()
    assert ring.provider.name in message and "kid='k1'" in message
    assert str(k1.private_jwk()["d"]) not in caplog.text  # never key material
    # The IdP takes the private half off again: the key stays distrusted (the leak stands),
    # under its kid or any other.
    idp.extra_jwks = [k1.public_jwk(), k1.public_jwk(kid="k1-again")]
    await ring.lookup_or_refresh("k1-again")
    assert ring.lookup("k1") is None and ring.lookup("k1-again") is None
    assert ring.lookup("k2") is not None


async def test_a_document_that_is_no_key_set_keeps_the_keys_held(
    idp: JwksServer, make_ring: MakeRing, k1: SigningKey
) -> None:
    # Unlike a key set without usable keys, a document that is not a JWK Set says nothing.
    ring = make_ring(idp, jwks_uri=idp.jwks_uri)
    await ring.start()
    idp.jwks = lambda: {"keys": "k1"}  # type: ignore[method-assign]
    assert await ring.lookup_or_refresh("unknown") is None
    assert refreshes(ring, "error") == 1
    assert ring.ready and ring.lookup("k1") is not None
    assert ring.last_error is not None and "not a JWK Set" in ring.last_error
    assert "(holding 1 keys, last fetched " in ring.last_error


async def test_provider_down_at_start_becomes_ready_when_it_comes_up(
    idp: JwksServer, make_ring: MakeRing
) -> None:
    await idp.stop()
    ring = make_ring(idp)
    await ring.start()  # does not raise
    assert not ring.ready
    assert refreshes(ring, "error") == 1
    assert await ring.lookup_or_refresh("k1") is None
    await idp.start()  # same port
    waited = await eventually(lambda: ring.ready, within=2.0)
    assert waited < 1.0  # first retries after 0.2 s, 0.4 s
    assert ring.lookup("k1") is not None


async def test_retries_back_off_exponentially(idp: JwksServer, make_ring: MakeRing) -> None:
    idp.fail(503)
    ring = make_ring(idp, ring={"backoff_base": 0.1, "backoff_cap": 0.4})
    await ring.start()
    await eventually(lambda: len(idp.requests) == 6, within=2.5)
    times = [at for at, _ in idp.requests]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    for gap, expected in zip(gaps, [0.1, 0.2, 0.4, 0.4, 0.4], strict=True):
        assert expected - 0.01 < gap < expected + 0.1
    assert refreshes(ring, "error") == 6
    assert not ring.ready


async def test_hanging_provider_is_given_up_on_after_the_fetch_timeout(
    idp: JwksServer, make_ring: MakeRing
) -> None:
    idp.hang()
    ring = make_ring(idp, ring={"fetch_timeout": 0.3, "backoff_base": 5.0})
    started = time.monotonic()
    await ring.start()
    assert 0.25 < time.monotonic() - started < 1.0
    assert not ring.ready
    assert ring.last_error is not None
    assert "no complete answer within 0.3s" in ring.last_error
    assert refreshes(ring, "error") == 1


async def test_discovery_issuer_mismatch_is_refused(idp: JwksServer, make_ring: MakeRing) -> None:
    idp.discovery_issuer = "https://evil.example/"
    ring = make_ring(idp, ring={"backoff_base": 5.0})
    await ring.start()
    assert not ring.ready
    assert refreshes(ring, "error") == 1
    assert refreshes(ring, "ok") == 0
    assert idp.jwks_requests == 0  # never fetched keys named by a foreign document
    assert ring.last_error is not None
    assert "evil.example" in ring.last_error


@pytest.mark.parametrize(
    ("setup", "problem"),
    [
        (lambda idp: setattr(idp, "extra_jwks", [{"pad": "x" * 4096}]), "larger than 2048 bytes"),
        (lambda idp: idp.fail(404), "HTTP 404"),
    ],
)
async def test_bad_jwks_answers_are_errors(
    idp: JwksServer, make_ring: MakeRing, setup: Callable[[JwksServer], None], problem: str
) -> None:
    setup(idp)
    ring = make_ring(idp, jwks_uri=idp.jwks_uri, ring={"max_document_bytes": 2048})
    await ring.start()
    assert not ring.ready
    assert ring.last_error is not None
    assert problem in ring.last_error


async def test_close_stops_background_refresh(idp: JwksServer, make_ring: MakeRing) -> None:
    idp.cache_control = "max-age=0"
    ring = make_ring(idp, jwks_min_refresh=0.2)
    await ring.start()
    await ring.close()
    await asyncio.sleep(0.4)
    assert idp.jwks_requests == 1
    assert ring.lookup("k1") is not None  # keys stay usable after close


async def test_ring_without_a_session_brings_its_own(idp: JwksServer, k1: SigningKey) -> None:
    provider = Provider(name="own-session", issuer=idp.issuer, audiences=["a"], discovery=True)
    ring = KeyRing(provider, None)
    await ring.start()
    assert ring.ready
    await ring.close()


async def test_logs_name_the_provider_but_hold_no_key_material(
    idp: JwksServer, make_ring: MakeRing, k1: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="idlegate.keys")
    idp.extra_jwks = [ec_key("leaked").private_jwk(), rsa_key("enc").public_jwk(use="enc")]
    ring = make_ring(idp)
    await ring.start()
    text = caplog.text
    assert ring.provider.name in text
    assert "private key material" in text
    modulus = k1.public_jwk()["n"]
    assert modulus[:16] not in text
    assert idp.extra_jwks[0]["d"][:16] not in text


# -- several issuers (one discovery each): each tenant's keys on their own -----------------------


@dataclass
class TenantServer(JwksServer):
    """A JwksServer whose discovery document may name another server's JWKS."""

    named_jwks_uri: str | None = None

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_requests += 1
        document = {"issuer": self.issuer, "jwks_uri": self.named_jwks_uri or self.jwks_uri}
        return await self._answer(request, document, cache=False)


@pytest.fixture(scope="module")
def a1() -> SigningKey:
    return rsa_key("a1")


@pytest.fixture(scope="module")
def b1() -> SigningKey:
    return rsa_key("b1")


@pytest.fixture
async def tenants(a1: SigningKey, b1: SigningKey) -> AsyncIterator[tuple[TenantServer, ...]]:
    """Two tenants of one IdP (Entra-like paths), each with its discovery document and JWKS."""
    servers = (
        TenantServer([a1], issuer_path="/tenant-a/v2.0"),
        TenantServer([b1], issuer_path="/tenant-b/v2.0"),
    )
    for server in servers:
        await server.start()
    yield servers
    for server in servers:
        await server.stop()


def verifies(key: Any, signer: SigningKey, issuer: str) -> bool:
    token = signer.sign(claims(issuer, "api"))
    return bool(jwt.decode(token, key.key, algorithms=sorted(key.algorithms), audience="api"))


async def test_one_tenant_down_does_not_hold_back_another_tenants_rotation(
    tenants: tuple[TenantServer, ...], make_ring: MakeRing, a1: SigningKey, b1: SigningKey
) -> None:
    a, b = tenants
    clock = ManualClock()
    ring = make_ring(a, issuer=[a.issuer, b.issuer], ring={"clock": clock})
    await ring.start()
    assert ring.lookup("a1") is not None and ring.lookup("b1") is not None
    generation = ring.generation
    b.fail(500)
    a2 = rsa_key("a2")
    a.rotate(a1, a2)
    key = await ring.lookup_or_refresh("a2")
    assert key is not None and verifies(key, a2, a.issuer)
    assert ring.generation == generation + 1
    b_key = ring.lookup("b1")  # B's last good keys stay usable
    assert b_key is not None and verifies(b_key, b1, b.issuer)
    assert ring.key_count == 3
    assert keys_gauge(ring) == 3
    assert refreshes(ring, "error") == 1
    assert ring.last_error is not None
    assert f"issuer {b.issuer}: " in ring.last_error
    assert "HTTP 500" in ring.last_error and "1 of its keys kept" in ring.last_error
    assert a.issuer not in ring.last_error
    # Down altogether (connection refused), and A rotates again: still picked up.
    await b.stop()
    a3 = ec_key("a3")
    a.rotate(a2, a3)
    clock.advance(ring.miss_refetch_interval)
    key = await ring.lookup_or_refresh("a3")
    assert key is not None and verifies(key, a3, a.issuer)
    assert ring.lookup("a1") is None  # A retired it; A's answer is what counts for A's keys
    assert ring.lookup("b1") is not None
    await b.start()  # same port: B's source recovers on its own backoff
    b.recover()
    await eventually(lambda: ring.last_error is None, within=2.0)
    assert ring.lookup("b1") is not None


async def test_a_ring_started_while_one_tenant_is_down_is_ready_for_the_others(
    tenants: tuple[TenantServer, ...], make_ring: MakeRing, a1: SigningKey, b1: SigningKey
) -> None:
    a, b = tenants
    await b.stop()
    ring = make_ring(a, issuer=[a.issuer, b.issuer])
    await ring.start()
    assert ring.ready
    key = ring.lookup("a1")
    assert key is not None and verifies(key, a1, a.issuer)
    assert ring.lookup("b1") is None
    assert refreshes(ring, "ok") == 1 and refreshes(ring, "error") == 1
    assert ring.last_error is not None
    assert f"issuer {b.issuer}: ClientConnectorError" in ring.last_error
    assert "none of its keys yet" in ring.last_error
    await b.start()
    waited = await eventually(lambda: ring.lookup("b1") is not None, within=2.0)
    assert waited < 1.0  # B retries after 0.2 s, 0.4 s: it does not wait for A's max-age
    assert ring.last_error is None
    assert a.discovery_requests == 1  # A's source was not refetched meanwhile


async def test_a_hanging_tenant_does_not_delay_another_tenants_new_key(
    tenants: tuple[TenantServer, ...], make_ring: MakeRing, a1: SigningKey
) -> None:
    a, b = tenants
    ring = make_ring(a, issuer=[a.issuer, b.issuer], ring={"fetch_timeout": 2.0})
    await ring.start()
    b.hang()
    a2 = rsa_key("a2")
    a.rotate(a1, a2)
    started = time.monotonic()
    key = await ring.lookup_or_refresh("a2")
    assert time.monotonic() - started < 1.0  # installed as A answered, B still pending
    assert key is not None and verifies(key, a2, a.issuer)
    assert ring.lookup("b1") is not None


async def test_a_tenants_hanging_background_refresh_does_not_delay_another_tenants_new_key(
    tenants: tuple[TenantServer, ...], make_ring: MakeRing, a1: SigningKey
) -> None:
    a, b = tenants
    b.cache_control = "max-age=1"  # B refreshes after 0.8-0.9 s; A (max-age=300) does not
    ring = make_ring(
        a, issuer=[a.issuer, b.issuer], jwks_min_refresh=0.5, ring={"fetch_timeout": 2.0}
    )
    await ring.start()
    b.hang()
    await eventually(lambda: b.jwks_requests == 2, within=1.5)  # B's refresh, now hanging
    a2 = rsa_key("a2")
    a.rotate(a1, a2)
    started = time.monotonic()
    key = await ring.lookup_or_refresh("a2")  # joins B's fetch, starts A's: A's answer counts
    assert time.monotonic() - started < 0.5
    assert key is not None and verifies(key, a2, a.issuer)
    assert a.jwks_requests == 2 and b.jwks_requests == 2


async def test_all_tenants_down_at_start_is_not_ready(
    tenants: tuple[TenantServer, ...], make_ring: MakeRing
) -> None:
    a, b = tenants
    a.fail(503)
    b.fail(500)
    ring = make_ring(a, issuer=[a.issuer, b.issuer], ring={"backoff_base": 5.0})
    await ring.start()
    assert not ring.ready
    assert refreshes(ring, "error") == 2
    assert ring.last_error is not None
    assert "HTTP 503" in ring.last_error and "HTTP 500" in ring.last_error


async def test_a_kid_two_tenants_publish_is_the_first_tenants(
    tenants: tuple[TenantServer, ...], make_ring: MakeRing, a1: SigningKey, b1: SigningKey
) -> None:
    a, b = tenants
    b.rotate(b1, rsa_key("a1"))  # another key under A's kid
    ring = make_ring(a, issuer=[a.issuer, b.issuer])
    await ring.start()
    key = ring.lookup("a1")
    assert key is not None and verifies(key, a1, a.issuer)
    assert ring.key_count == 2


async def test_tenants_sharing_a_key_set_fetch_it_once_per_refresh(
    tenants: tuple[TenantServer, ...], make_ring: MakeRing, a1: SigningKey
) -> None:
    a, b = tenants
    b.named_jwks_uri = a.jwks_uri
    a.cache_control = "max-age=1"
    ring = make_ring(a, issuer=[a.issuer, b.issuer], jwks_min_refresh=0.5)
    await ring.start()
    assert (a.discovery_requests, b.discovery_requests) == (1, 1)
    assert (a.jwks_requests, b.jwks_requests) == (1, 0)
    assert ring.key_count == 1
    await eventually(lambda: refreshes(ring, "ok") == 4, within=2.0)  # one refresh, 2 sources
    assert (a.jwks_requests, b.jwks_requests) == (2, 0)
    # Its failure fails both; both discover again next time.
    a.fail(500)
    await eventually(lambda: refreshes(ring, "error") == 2, within=2.0)
    assert a.jwks_requests == 3
    a.recover()
    await eventually(lambda: ring.last_error is None, within=2.0)
    assert (a.discovery_requests, b.discovery_requests) == (2, 2)
    assert ring.lookup("a1") is not None


# -- generation: moves with the key set, not with every refetch ----------------------------------


async def test_a_refetch_of_the_same_keys_keeps_the_generation_and_the_key_objects(
    idp: JwksServer, make_ring: MakeRing, k1: SigningKey, k2: SigningKey
) -> None:
    idp.cache_control = "max-age=0"
    ring = make_ring(idp, jwks_min_refresh=0.2)
    await ring.start()
    generation, key = ring.generation, ring.lookup("k1")
    await eventually(lambda: refreshes(ring, "ok") >= 2, within=1.0)
    # Decisions kept for k1 (pipeline, verifier cache) check these: they still hold.
    assert ring.generation == generation
    assert ring.lookup("k1") is key
    idp.rotate(k2)
    await eventually(lambda: ring.lookup("k1") is None, within=1.0)
    assert ring.generation == generation + 1  # k1 retired: what was decided with it is not
    assert ring.lookup("k2") is not None


# -- unknown kids: jwks_miss_refetch -------------------------------------------------------------


async def test_a_junk_kid_delays_a_new_key_only_until_jwks_miss_refetch(
    idp: JwksServer, make_ring: MakeRing, k1: SigningKey, k2: SigningKey
) -> None:
    clock = ManualClock()
    ring = make_ring(idp, ring={"clock": clock})
    assert ring.miss_refetch_interval == 5.0  # the provider's default
    await ring.start()
    assert await ring.lookup_or_refresh("junk-" + uuid.uuid4().hex) is None  # spends it
    idp.rotate(k1, k2)
    assert await ring.lookup_or_refresh("k2") is None
    clock.advance(4.9)
    assert await ring.lookup_or_refresh("k2") is None
    assert idp.jwks_requests == 2
    clock.advance(0.1)
    key = await ring.lookup_or_refresh("k2")
    assert key is not None and verifies(key, k2, idp.issuer)
    assert idp.jwks_requests == 3


async def test_jwks_miss_refetch_is_the_providers_interval(
    idp: JwksServer, make_ring: MakeRing, k1: SigningKey, k2: SigningKey
) -> None:
    clock = ManualClock()
    ring = make_ring(idp, jwks_miss_refetch="1s", ring={"clock": clock})
    assert ring.miss_refetch_interval == 1.0
    await ring.start()
    assert await ring.lookup_or_refresh("junk") is None
    idp.rotate(k1, k2)
    clock.advance(0.9)
    assert await ring.lookup_or_refresh("k2") is None
    clock.advance(0.1)
    assert await ring.lookup_or_refresh("k2") is not None
