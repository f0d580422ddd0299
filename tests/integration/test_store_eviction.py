"""An evicting Redis silently drops revocations and activity records (revoked tokens come
back): refused at start, reported by /readyz when the policy changes later, re-checked on
every new connection; an OOM reply is a store fault like any other (on_error applies)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GatewayFactory, RedisServer, free_port
from harness import Upstream

from gateway.store.factory import StoreConfigError


@pytest.fixture
def renamed_config_redis(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A redis-server with CONFIG disabled (as managed services do), at the given policy."""
    server = RedisServer(
        port=free_port(),
        workdir=tmp_path,
        extra_args=("--rename-command", "CONFIG", "", "--maxmemory-policy", request.param),
    )
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru", "allkeys-random"])
async def test_an_evicting_redis_is_refused_at_start(
    gateways: GatewayFactory, redis_server: RedisServer, policy: str
) -> None:
    redis_server.command("CONFIG", "SET", "maxmemory-policy", policy)
    with pytest.raises(StoreConfigError, match=f"maxmemory-policy is {policy}.*noeviction"):
        await gateways(store_url=redis_server.url)


@pytest.mark.parametrize("renamed_config_redis", ["allkeys-lfu"], indirect=True)
async def test_with_config_disabled_the_policy_is_read_from_info(
    gateways: GatewayFactory, renamed_config_redis: RedisServer
) -> None:
    assert b"unknown command" in renamed_config_redis.command("CONFIG", "GET", "maxmemory-policy")
    with pytest.raises(StoreConfigError, match="maxmemory-policy is allkeys-lfu"):
        await gateways(store_url=renamed_config_redis.url)


@pytest.mark.parametrize("renamed_config_redis", ["noeviction"], indirect=True)
async def test_a_noeviction_redis_with_config_disabled_starts(
    gateways: GatewayFactory, renamed_config_redis: RedisServer
) -> None:
    gw = await gateways(store_url=renamed_config_redis.url)
    ready = await gw.http.get(gw.admin_url + "/readyz")
    assert ready.status == 200


async def test_a_policy_changed_after_start_turns_readiness_503(
    gateways: GatewayFactory, redis_server: RedisServer
) -> None:
    gw = await gateways(store_url=redis_server.url)
    assert (await gw.http.get(gw.admin_url + "/readyz")).status == 200
    redis_server.command("CONFIG", "SET", "maxmemory-policy", "volatile-ttl")
    response = await gw.http.get(gw.admin_url + "/readyz")
    assert response.status == 503
    body = await response.json()
    assert "maxmemory-policy is volatile-ttl" in body["reason"]
    redis_server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    assert (await gw.http.get(gw.admin_url + "/readyz")).status == 200


async def test_a_new_connection_checks_the_policy_again(
    gateways: GatewayFactory, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A reconnect (a restart, a failover) may reach a Redis configured otherwise: the request
    path's connection checks as it opens, before any readiness probe asks."""
    gw = await gateways(store_url=redis_server.url)
    token = gw.token()
    assert (await gw.get("/api/x", token)).status == 200
    redis_server.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    redis_server.command("CLIENT", "KILL", "TYPE", "normal")
    caplog.clear()
    await gw.get("/api/x", token)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("maxmemory-policy is allkeys-lru" in line for line in errors), errors


@pytest.mark.parametrize(("on_error", "status"), [("deny", 503), ("allow", 200)])
async def test_an_oom_reply_is_a_store_fault(
    gateways: GatewayFactory,
    upstream: Upstream,
    redis_server: RedisServer,
    on_error: str,
    status: int,
) -> None:
    """maxmemory reached under noeviction: writes get `-OOM`; the request is decided as for
    any store failure (503 store_unavailable, or forwarded with on_error allow)."""
    gw = await gateways(store_url=redis_server.url, store={"on_error": on_error})
    redis_server.command("CONFIG", "SET", "maxmemory", "1")
    response = await gw.get("/api/x", gw.token())
    assert response.status == status
    if status == 503:
        assert (await response.json())["reason"] == "store_unavailable"
        assert response.headers["Retry-After"] == "1"
    else:
        assert upstream.received[-1].path_qs == "/api/x"
