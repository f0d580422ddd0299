"""Forward-auth behind the real edge proxies users run: nginx `auth_request`, Caddy
`forward_auth` and Traefik's `ForwardAuth` middleware, each a subprocess in front of a real
upstream, with in-process idlegate instances (sharing the test's ManualClock, and one
redis-server) as the auth service, all on free ports. What a client of the edge proxy sees, and
what reaches the upstream."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from conftest import GatewayFactory, RedisServer, free_port
from edges import Caddy, Door, Nginx, Traefik, TunnelUpstream, WebSocketUpstream
from harness import GatewayUnderTest, Upstream

from gateway.clock import ManualClock

ADMIN_TOKEN = "edge-admin-token"
EdgeFactory = Callable[..., Awaitable[list[str]]]


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WebSocketUpstream]:
    server = WebSocketUpstream()
    await server.start()
    yield server
    await server.stop()


EDGES: dict[str, type[Nginx | Caddy | Traefik]] = {
    "nginx": Nginx,
    "caddy": Caddy,
    "traefik": Traefik,
}


@pytest.fixture(params=list(EDGES))
async def edge(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    upstream: Upstream,
    ws_upstream: WebSocketUpstream,
) -> AsyncIterator[EdgeFactory]:
    """`await edge(gw, ...)`: the edge proxy, one front door per gateway; returns their URLs."""
    started: list[Nginx | Caddy | Traefik] = []

    async def make(
        *gateways: GatewayUnderTest, upstream_port: int | None = None, ws_port: int | None = None
    ) -> list[str]:
        doors = [Door(free_port(), int(gw.url.rsplit(":", 1)[1])) for gw in gateways]
        proxy = EDGES[request.param](
            tmp_path / request.param,
            upstream_port or upstream.port,
            ws_port or ws_upstream.port,
            doors,
        )
        await asyncio.to_thread(proxy.start)
        started.append(proxy)
        return [door.url for door in doors]

    yield make
    for proxy in started:
        await asyncio.to_thread(proxy.stop)


@pytest.fixture
async def tunnel_upstream() -> AsyncIterator[TunnelUpstream]:
    server = TunnelUpstream()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession, url: str, token: str | None = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    sent = {name.replace("_", "-"): value for name, value in headers.items()}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with http.get(url, headers=sent) as response:
        return response.status, dict(response.headers), await response.read()


def forward_auth(**more: object) -> dict[str, object]:
    return {"forward_auth": {"enabled": True}, **more}


async def test_accepted_request_reaches_upstream_with_idlegates_identity_only(
    gateways: GatewayFactory, edge: EdgeFactory, upstream: Upstream, http: aiohttp.ClientSession
):
    gw = await gateways(**forward_auth())
    (door,) = await edge(gw)
    spoofed = {"X_Auth_Subject": "admin", "X_Auth_Token_Id": "forged", "X_Auth_Scope": "root"}
    token = gw.token(sub="alice", jti="edge-1", scope="orders:read")
    status, _, body = await call(http, door + "/api/orders?page=2", token, **spoofed)
    assert status == 200, body
    seen = upstream.received[-1]
    assert seen.path_qs == "/api/orders?page=2"
    assert seen.headers["X-Auth-Subject"] == "alice"
    assert seen.headers["X-Auth-Token-Id"] == "edge-1"
    assert seen.headers["X-Auth-Scope"] == "orders:read"
    assert [v for k, v in seen.header_list if k.lower() == "x-auth-subject"] == ["alice"]
    # A public route: idlegate answers 200 without identity, and the client's copies are gone.
    status, _, _ = await call(http, door + "/public/logo.png", **spoofed)
    assert status == 200
    public = upstream.received[-1]
    assert public.path_qs == "/public/logo.png"
    assert not {"x-auth-subject", "x-auth-token-id", "x-auth-scope"} & {
        k.lower() for k, _ in public.header_list
    }


async def test_underscore_spellings_of_identity_headers_never_reach_the_upstream(
    gateways: GatewayFactory, edge: EdgeFactory, upstream: Upstream, http: aiohttp.ClientSession
):
    # nginx drops them itself (underscores_in_headers off); the Caddy and Traefik recipes
    # strip them (docs/forward-auth.md).
    gw = await gateways(**forward_auth())
    (door,) = await edge(gw)
    spoofed = {"X_Auth_Subject": "admin", "X_Auth_Token_Id": "forged", "X_Auth_Scope": "root"}
    for path, token in (("/api/orders", gw.token(sub="alice")), ("/public/logo.png", None)):
        headers = dict(spoofed)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with http.get(door + path, headers=headers) as response:
            assert response.status == 200
        names = [k.lower() for k, _ in upstream.received[-1].header_list]
        assert not {"x_auth_subject", "x_auth_token_id", "x_auth_scope"} & set(names), names


async def test_refusals_reach_the_client_and_nothing_reaches_upstream(
    gateways: GatewayFactory, edge: EdgeFactory, upstream: Upstream, http: aiohttp.ClientSession
):
    routes = [
        {"prefix": "/api/", "upstream": upstream.url},
        {"prefix": "/api/write/", "upstream": upstream.url, "scopes": ["orders:write"]},
        {"prefix": "/public/", "upstream": upstream.url, "auth": "none"},
    ]
    gw = await gateways(**forward_auth(routes=routes))
    (door,) = await edge(gw)

    async def refused(path: str, token: str | None, status: int, reason: str) -> dict[str, str]:
        got, headers, body = await call(http, door + path, token)
        assert (got, json.loads(body)["reason"]) == (status, reason), body
        assert headers["Cache-Control"] == "no-store"
        assert headers["X-Request-ID"]
        return headers

    headers = await refused("/api/x", None, 401, "missing_token")
    assert headers["WWW-Authenticate"] == 'Bearer realm="idlegate"'
    headers = await refused("/api/x", "not.a.jwt", 401, "malformed_token")
    assert headers["WWW-Authenticate"].startswith('Bearer realm="idlegate", error="invalid_token"')
    headers = await refused("/api/write/x", gw.token(scope="a"), 403, "insufficient_scope")
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    # Not 2xx/401/403: nginx's auth_request would say 500; the recipe keeps the real status.
    await refused("/nowhere", gw.token(), 404, "no_route")
    await refused("/api/x?access_token=abc", gw.token(), 400, "malformed_request")
    got, _, body = await call(http, door + "/api/x", gw.token(), X_HTTP_Method_Override="TRACE")
    assert (got, json.loads(body)["reason"]) == (405, "method_not_allowed"), body
    assert upstream.received == []


async def test_idle_timeout_is_shared_by_two_instances_behind_the_edge(
    gateways: GatewayFactory,
    edge: EdgeFactory,
    upstream: Upstream,
    redis_server: RedisServer,
    clock: ManualClock,
    http: aiohttp.ClientSession,
):
    routes = [
        {"prefix": "/api/", "upstream": upstream.url},
        {"prefix": "/api/poll/", "upstream": upstream.url, "activity": "passive"},
    ]
    settings = forward_auth(routes=routes, policy={"max_token_lifetime": "1h"})
    one = await gateways(store_url=redis_server.url, **settings)
    two = await gateways(store_url=redis_server.url, **settings)
    door_one, door_two = await edge(one, two)
    token = one.token(ttl=3600)
    clock.advance(800)
    assert (await call(http, door_one + "/api/x", token))[0] == 200
    clock.advance(800)  # idle at `two` unless it saw `one`'s activity in the store
    assert (await call(http, door_two + "/api/x", token))[0] == 200
    # Passive polling is checked at both, and keeps nothing alive.
    for door in (door_one, door_two, door_one):
        clock.advance(250)
        assert (await call(http, door + "/api/poll/x", token))[0] == 200
    clock.advance(151)  # 901 s since the last extending request
    before = len(upstream.received)
    status, headers, _ = await call(http, door_two + "/api/x", token)
    assert status == 401
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert (await call(http, door_one + "/api/x", token))[0] == 401  # terminal, everywhere
    assert len(upstream.received) == before


async def test_revocation_at_either_admin_api_takes_effect_at_the_edge_within_a_second(
    gateways: GatewayFactory,
    edge: EdgeFactory,
    redis_server: RedisServer,
    tmp_path: Path,
    http: aiohttp.ClientSession,
):
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    settings = forward_auth(admin={"token_file": str(token_file)})
    one = await gateways(store_url=redis_server.url, **settings)
    two = await gateways(store_url=redis_server.url, **settings)
    door_one, door_two = await edge(one, two)
    token = one.token(jti="edge-revoked")
    assert (await call(http, door_one + "/api/x", token))[0] == 200
    assert (await call(http, door_two + "/api/x", token))[0] == 200
    revoked_at = time.monotonic()
    async with http.post(
        two.admin_url + "/admin/revoke",
        json={"jti": "edge-revoked"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as response:
        assert response.status == 204
    statuses = {}
    while time.monotonic() - revoked_at < 1.0 and set(statuses.values()) != {401}:
        for door in (door_one, door_two):
            statuses[door] = (await call(http, door + "/api/x", token))[0]
        await asyncio.sleep(0.05)
    assert statuses == {door_one: 401, door_two: 401}, "not revoked at both within 1 s"


async def test_store_outage_is_503_with_retry_after_at_the_edge(
    gateways: GatewayFactory,
    edge: EdgeFactory,
    upstream: Upstream,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
):
    gw = await gateways(store_url=redis_server.url, **forward_auth())
    (door,) = await edge(gw)
    token = gw.token()
    assert (await call(http, door + "/api/x", token))[0] == 200
    redis_server.stop()
    before = len(upstream.received)
    status, headers, body = await call(http, door + "/api/x", token)
    assert status == 503, body
    assert headers["Retry-After"] == "1"
    assert headers["Cache-Control"] == "no-store"
    assert json.loads(body)["reason"] == "store_unavailable"
    assert len(upstream.received) == before
    redis_server.start()
    assert (await call(http, door + "/api/x", token))[0] == 200


def raw_get(url: str, target: str) -> int:
    """The status of `GET target` sent byte for byte (no client library normalises it)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


@pytest.mark.parametrize(
    "target",
    [
        "/public/../api/x",
        "/public/%2e%2e/api/x",
        "/public/..;/api/x",
        "/public/%2e%2e;/api/x",
        "/public%2f..%2fapi/x",
        "/public/..%2fapi/x",
        "/public/%2E%2E/api/x",
        "/public/.%2e/api/x",
    ],
)
async def test_traversal_tricks_are_refused_at_the_edge(
    gateways: GatewayFactory, edge: EdgeFactory, upstream: Upstream, target: str
):
    gw = await gateways(**forward_auth())
    (door,) = await edge(gw)
    status = await asyncio.to_thread(raw_get, door, target)
    # nginx or Caddy may refuse some themselves (400); none may reach the upstream.
    assert status in (400, 401), status
    assert upstream.received == [], upstream.received[0].path_qs


async def test_websocket_upgrade_is_authorised_at_the_edge(
    gateways: GatewayFactory,
    edge: EdgeFactory,
    ws_upstream: WebSocketUpstream,
    upstream: Upstream,
    http: aiohttp.ClientSession,
):
    routes = [
        {"prefix": "/ws/", "upstream": upstream.url, "websocket": True},
        {"prefix": "/api/", "upstream": upstream.url},
    ]
    gw = await gateways(**forward_auth(routes=routes))
    (door,) = await edge(gw)
    headers = {"Authorization": f"Bearer {gw.token(sub='ws-user')}"}
    async with http.ws_connect(door + "/ws/feed", headers=headers) as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "echo:hello"
    assert ws_upstream.handshakes[-1]["X-Auth-Subject"] == "ws-user"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(door + "/ws/feed", headers={"Authorization": "Bearer bad.to.ken"})
    assert refused.value.status == 401
    assert len(ws_upstream.handshakes) == 1, "a refused handshake reached the upstream"


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return data


def upgrade_then_smuggle(url: str, target: str, upgrade: str, token: str | None) -> int:
    """Ask for `target` with `Upgrade: upgrade`, then send a request for a protected path on
    the same connection, as a client would inside the tunnel an upstream's 101 opens. The
    status of the first answer."""
    host, port = url.removeprefix("http://").split(":")
    lines = [
        f"GET {target} HTTP/1.1",
        "Host: shop.example",
        f"Upgrade: {upgrade}",
        "Connection: Upgrade, HTTP2-Settings",
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = _read_head(sock)
        smuggled = (
            "GET /api/admin/secret HTTP/1.1\r\nHost: shop.example\r\nX-Auth-Subject: admin\r\n"
        )
        try:
            sock.sendall((smuggled + "Connection: close\r\n\r\n").encode())
            sock.settimeout(0.5)
            _read_head(sock)
        except OSError:
            pass  # the edge closed the connection after its refusal
    return int(head.split(b" ", 2)[1])


async def test_no_upgrade_but_websocket_reaches_an_upstream_through_the_edge(
    gateways: GatewayFactory, edge: EdgeFactory, tunnel_upstream: TunnelUpstream
):
    """An upstream that switches to h2c (or anything) for any Upgrade would give the client a
    tunnel to every path of it, with no decision: the recipes pass Upgrade only on the
    WebSocket paths and only for WebSocket, and idlegate refuses any other it is shown."""
    tunnel = tunnel_upstream
    routes = [
        {"prefix": "/", "upstream": tunnel.url, "auth": "none"},
        {"prefix": "/api/", "upstream": tunnel.url},
        {"prefix": "/api/admin/", "upstream": tunnel.url, "scopes": ["admin"]},
        {"prefix": "/ws/", "upstream": tunnel.url, "websocket": True},
    ]
    gw = await gateways(**forward_auth(routes=routes))
    (door,) = await edge(gw, upstream_port=tunnel.port, ws_port=tunnel.port)
    for target in ("/public/x", "/api/x", "/ws/feed"):
        for upgrade in ("h2c", "foo", "websocket, h2c", "h2c, websocket"):
            for token in (None, gw.token()):
                status = await asyncio.to_thread(upgrade_then_smuggle, door, target, upgrade, token)
                assert status != 101, (target, upgrade, token is not None)
    assert tunnel.upgrades() == [], tunnel.upgrades()
    assert bytes(tunnel.tunnelled) == b""
    assert not any("/api/admin/" in head[0] for head in tunnel.heads), tunnel.heads


SPOOFED_FORWARDING = {
    "X-Forwarded-For": "10.9.9.9",
    "X-Real-IP": "10.9.9.9",
    "Forwarded": "for=10.9.9.9;proto=https",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "admin.internal",
}


def assert_forwarding_set_by_the_edge(
    headers: dict[str, str], host: str, protos: tuple[str, ...] = ("http",)
) -> None:
    lower = {name.lower(): value for name, value in headers.items()}
    assert lower.get("x-forwarded-for") == "127.0.0.1", headers
    assert lower.get("x-real-ip") == "127.0.0.1", headers
    assert "forwarded" not in lower, headers
    assert lower.get("x-forwarded-proto") in protos, headers
    # nginx's $host is the name without the port; Caddy and Traefik keep the port.
    assert lower.get("x-forwarded-host") in (host, host.rsplit(":", 1)[0]), headers


async def test_forwarding_headers_the_client_sends_are_replaced_at_the_edge(
    gateways: GatewayFactory,
    edge: EdgeFactory,
    upstream: Upstream,
    ws_upstream: WebSocketUpstream,
    http: aiohttp.ClientSession,
):
    routes = [
        {"prefix": "/api/", "upstream": upstream.url},
        {"prefix": "/public/", "upstream": upstream.url, "auth": "none"},
        {"prefix": "/ws/", "upstream": upstream.url, "websocket": True},
    ]
    gw = await gateways(**forward_auth(routes=routes))
    (door,) = await edge(gw)
    host = door.removeprefix("http://")
    for path, token in (("/api/x", gw.token()), ("/public/x", None)):
        status, _, body = await call(http, door + path, token, **SPOOFED_FORWARDING)
        assert status == 200, body
        assert_forwarding_set_by_the_edge(upstream.received[-1].headers, host)
    headers = {**SPOOFED_FORWARDING, "Authorization": f"Bearer {gw.token()}"}
    async with http.ws_connect(door + "/ws/feed", headers=headers) as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "echo:hello"
    # Traefik says `ws` for a WebSocket handshake.
    assert_forwarding_set_by_the_edge(ws_upstream.handshakes[-1], host, ("http", "ws"))
