"""What only the memory store has (bounded memory by its own sweeping), and the factory:
which store and client each URL builds, and the keyed hasher. No sockets here.

The idle semantics shared with Redis are tested against both stores in
tests/integration/test_store_redis.py."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import SentinelConnectionPool
from tls import CertificateAuthority

from gateway.clock import ManualClock
from gateway.config import Store as StoreConfig
from gateway.store import KeyHasher, Revocation, Touch, TouchResult
from gateway.store.factory import StoreConfigError, hasher_from_config, open_store
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore, cluster_for, pipelined_for

IDLE = 900.0
LINGER = 30.0


def make_touch(key: str, now: float, initial: float, *, extend: bool = True) -> Touch:
    return Touch(
        key=key,
        initial=initial,
        now=now,
        idle_timeout=IDLE,
        extend=extend,
        expires_at=initial + IDLE,
        linger=LINGER,
        remember_idle=False,
    )


# --- memory store: bounded by time ---------------------------------------------------------


async def test_record_is_gone_once_its_lifetime_passed(clock: ManualClock) -> None:
    store = MemoryStore()
    iat = clock.now()
    await store.check_and_touch(make_touch("a", iat + 10, iat))
    keep_until = iat + 10 + IDLE + LINGER
    assert store.expires_at("a") == keep_until

    await store.check_and_touch(make_touch("other", keep_until - 1, keep_until - 1))
    assert await store.last_activity("a") == iat + 10
    await store.check_and_touch(make_touch("other", keep_until, keep_until - 1))
    assert await store.last_activity("a") is None
    assert len(store) == 1


async def test_expired_record_counts_as_never_seen(clock: ManualClock) -> None:
    store = MemoryStore()
    iat = clock.now()
    await store.check_and_touch(make_touch("a", iat + 10, iat))
    later = iat + 10 + IDLE + LINGER
    # Same id, long after: nothing is remembered, so its (new) initial decides.
    result = await store.check_and_touch(make_touch("a", later, later - 5))
    assert result == TouchResult(last_activity=later - 5, idle=False)


async def test_memory_holds_only_live_records(clock: ManualClock) -> None:
    store = MemoryStore()
    start = clock.now()
    for i in range(5000):
        now = start + i  # one new token a second, each used once
        await store.check_and_touch(make_touch(f"t{i}", now, now))
    # Records live IDLE + LINGER seconds after their only use.
    assert len(store) == IDLE + LINGER
    assert len(store._expiries) <= 3 * len(store) + 1024


async def test_busy_token_does_not_grow_the_expiry_heap(clock: ManualClock) -> None:
    store = MemoryStore()
    iat = clock.now()
    for i in range(20_000):
        await store.check_and_touch(make_touch("busy", iat + i * 0.01, iat))
    assert len(store) == 1
    assert len(store._expiries) <= 1024 + 2


async def test_passive_touches_write_nothing(clock: ManualClock) -> None:
    store = MemoryStore()
    iat = clock.now()
    for i in range(10):
        await store.check_and_touch(make_touch(f"p{i}", iat + 1, iat, extend=False))
    assert len(store) == 0


async def test_memory_revocations_bump_version_and_prune(clock: ManualClock) -> None:
    store = MemoryStore()
    now = clock.now()
    version, entries = await store.revocations(-1)
    assert entries == []
    await store.revoke(Revocation(kind="jti", key="j", issued_before=None, until=now + 5), now)
    await store.revoke(Revocation(kind="sub", key="s", issued_before=now, until=now + 99), now + 6)
    newer, entries = await store.revocations(version)
    assert newer == version + 2
    assert entries == [Revocation(kind="sub", key="s", issued_before=now, until=now + 99)]


# --- factory: which store and client each URL builds (construction only) ---------------------


async def test_memory_url_builds_a_memory_store() -> None:
    assert isinstance(open_store(StoreConfig(url="memory://")), MemoryStore)


@pytest.mark.parametrize(
    ("url", "client_class", "connection_class"),
    [
        ("redis://redis:6379/0", Redis, None),
        ("redis://:secret@redis/2", Redis, None),
        ("rediss://user:secret@redis.example:6380/0", Redis, SSLConnection),
        ("redis+sentinel://:secret@s1:26379,s2:26379/mymaster", Redis, None),
        ("redis+sentinel://s1,s2:26380/mymaster/3?sentinel_password=x", Redis, None),
        ("redis+cluster://:secret@n1:7000,n2:7001", RedisCluster, None),
        ("redis+cluster://n1", RedisCluster, None),
    ],
)
async def test_redis_urls_build_the_matching_client(
    url: str, client_class: type, connection_class: type | None
) -> None:
    store = open_store(StoreConfig(url=url, key_prefix="p", timeout=0.25))
    assert isinstance(store, RedisStore)
    client = store.client
    assert type(client) is client_class
    if isinstance(client, Redis):
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["socket_connect_timeout"] == 0.25
        if connection_class is not None:
            assert client.connection_pool.connection_class is connection_class
    await store.close()


async def test_sentinel_url_names_the_sentinels_service_and_db() -> None:
    url = "redis+sentinel://:pw@s1:26379,s2/mymaster/3?sentinel_password=spw"
    store = open_store(StoreConfig(url=url))
    assert isinstance(store, RedisStore)
    assert isinstance(store.client, Redis)
    pool = store.client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 3
    assert pool.connection_kwargs["password"] == "pw"
    sentinels = pool.sentinel_manager.sentinels
    addresses = [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in sentinels
    ]
    assert addresses == [("s1", 26379), ("s2", 26379)]
    assert sentinels[0].connection_pool.connection_kwargs["password"] == "spw"
    await store.close()


@pytest.mark.parametrize(
    ("query", "verify_mode", "check_hostname"),
    [
        ("", ssl.CERT_REQUIRED, True),
        ("?ssl_ca_certs=CA", ssl.CERT_REQUIRED, True),
        ("?ssl_cert_reqs=none", ssl.CERT_NONE, False),
        ("?ssl_check_hostname=false&ssl_ca_certs=CA", ssl.CERT_REQUIRED, False),
    ],
)
async def test_tls_sentinel_and_cluster_urls_speak_tls_to_every_node(
    tmp_path: Path, query: str, verify_mode: ssl.VerifyMode, check_hostname: bool
) -> None:
    """rediss+sentinel:// and rediss+cluster://: redis-py's connections (sentinels, master,
    nodes) and the request path's pipelined ones, with the URL's verification settings."""
    ca = CertificateAuthority(tmp_path / "ca")
    query = query.replace("CA", str(ca.ca_file))
    sentinel = open_store(StoreConfig(url=f"rediss+sentinel://:pw@s1,s2/mymaster/2{query}"))
    cluster = open_store(StoreConfig(url=f"rediss+cluster://:pw@n1:7000,n2:7001{query}"))
    assert isinstance(sentinel, RedisStore) and isinstance(cluster, RedisStore)
    assert isinstance(sentinel.client, Redis) and isinstance(cluster.client, RedisCluster)
    pool = sentinel.client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert issubclass(pool.connection_class, SSLConnection)
    for each in pool.sentinel_manager.sentinels:
        assert each.connection_pool.connection_class is SSLConnection
    assert cluster.client.get_connection_kwargs()["connection_class"] is SSLConnection
    pipelined = pipelined_for(sentinel.client, timeout=1)
    connections = cluster_for(cluster.client, timeout=1)
    assert pipelined is not None and connections is not None
    for connection in (pipelined, connections._connect("n1", 7000)):
        assert connection._tls is not None
        assert connection._tls.verify_mode == verify_mode
        assert connection._tls.check_hostname is check_hostname
    if "ssl_ca_certs" in query:  # the CA given is the one trusted
        subjects = [cert["subject"] for cert in pipelined._tls.get_ca_certs()]  # type: ignore[union-attr]
        assert ((("commonName", "idlegate test CA"),),) in subjects
    await sentinel.close()
    await cluster.close()


@pytest.mark.parametrize(
    "url",
    [
        "rediss://redis:6380/0?ssl_ca_certs={path}",
        "rediss+sentinel://s1/mymaster?ssl_ca_certs={path}",
        "rediss+cluster://:s3cret@n1:7000?ssl_ca_certs={path}",
    ],
)
@pytest.mark.parametrize("problem", ["missing", "not a certificate"])
def test_a_ca_file_that_cannot_be_loaded_is_a_config_error_naming_it(
    tmp_path: Path, url: str, problem: str
) -> None:
    path = tmp_path / "ca.pem"
    if problem == "not a certificate":
        path.write_text("not a certificate\n")
    with pytest.raises(StoreConfigError) as refused:
        open_store(StoreConfig(url=url.format(path=path)))
    message = str(refused.value)
    assert message.startswith("store.url: the TLS settings cannot be used (ssl_ca_certs ")
    assert str(path) in message and "s3cret" not in message


async def test_cluster_url_lists_every_startup_node() -> None:
    store = open_store(StoreConfig(url="redis+cluster://:pw@n1:7000,n2:7001,[::1]:7002"))
    assert isinstance(store, RedisStore)
    assert isinstance(store.client, RedisCluster)
    nodes = {(node.host, node.port) for node in store.client.startup_nodes}
    assert nodes == {("n1", 7000), ("n2", 7001), ("::1", 7002)}
    await store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory://somewhere", "memory:// takes no host"),
        ("redis://:6379/0", "host is missing"),
        ("redis://redis:notaport/0", "invalid port"),
        ("redis://redis:6379/cache", "database number"),
        ("redis+sentinel://:s3cret@s1:26379", "service name is missing"),
        ("redis+sentinel://s1:26379/mymaster/x", "database must be a number"),
        ("redis+sentinel://s1:26379/mymaster?colour=blue", "unknown option"),
        ("redis+sentinel:///mymaster", "no host given"),
        ("redis+cluster://n1:7000/2", "only database 0"),
        ("redis+cluster://n1:99999", "invalid port"),
        ("redis+cluster://n1:7000,", "host is missing"),
        ("redis+cluster://n1:7000?ssl_cert_reqs=none", "need TLS: rediss\\+cluster://"),
        ("redis+sentinel://s1/mymaster?ssl_ca_certs=/ca.pem", "need TLS: rediss\\+sentinel://"),
        ("rediss+cluster://n1:7000?ssl_cert_reqs=maybe", "none, optional or required"),
        ("rediss+cluster://n1:7000?ssl_ca_certs=", "path of a PEM file"),
        ("rediss+sentinel://s1/mymaster?ssl_check_hostname=yes", "true or false"),
        ("rediss+cluster://n1?ssl_cert_reqs=none&ssl_check_hostname=true", "needs the cert"),
        ("rediss+cluster://:s3cret@n1:7000?colour=blue", "unknown option"),
    ],
)
def test_bad_urls_are_refused_with_a_clear_message(url: str, message: str) -> None:
    with pytest.raises(StoreConfigError, match=message) as refused:
        open_store(StoreConfig(url=url))
    assert str(refused.value).startswith("store.url: ")
    assert "s3cret" not in str(refused.value)


# --- keyed hashing of ids -------------------------------------------------------------------


def test_hasher_reads_its_secret_from_the_named_environment_variable() -> None:
    config = StoreConfig(hash_key_env="IDLEGATE_TEST_HASH_KEY")
    one = hasher_from_config(config, {"IDLEGATE_TEST_HASH_KEY": "one"})
    two = hasher_from_config(config, {"IDLEGATE_TEST_HASH_KEY": "two"})
    assert one("jti", "abc") == KeyHasher(b"one")("jti", "abc")
    assert one("jti", "abc") != two("jti", "abc")
    assert "abc" not in one("jti", "abc")


@pytest.mark.parametrize("environ", [{}, {"IDLEGATE_TEST_HASH_KEY": ""}])
def test_hasher_env_configured_but_missing_is_a_clear_error(environ: dict[str, str]) -> None:
    config = StoreConfig(hash_key_env="IDLEGATE_TEST_HASH_KEY")
    with pytest.raises(StoreConfigError, match=r"store\.hash_key_env: .*IDLEGATE_TEST_HASH_KEY"):
        hasher_from_config(config, environ)


def test_default_hasher_is_stable_per_key_prefix() -> None:
    default = hasher_from_config(StoreConfig(), {})
    again = hasher_from_config(StoreConfig(), {"UNRELATED": "x"})
    other_prefix = hasher_from_config(StoreConfig(key_prefix="staging"), {})
    assert default("jti", "abc") == again("jti", "abc")
    assert default("jti", "abc") != other_prefix("jti", "abc")
    assert default("jti", "abc") != default("sid", "abc")
