"""Forward-auth and the Upgrade header, on the gateway's own sockets. The edge forwards a
request with its Upgrade as it is (the proxy port would drop one it does not relay): an
upstream that switches to h2c, or to anything, then gives the client a tunnel to any of its
paths with no decision. So forward-auth decides only a valid WebSocket handshake on a
`websocket: true` route and refuses every other Upgrade, before any token or store work.
The same through the real nginx, Caddy and Traefik: test_forward_auth_edges.py."""

from __future__ import annotations

import pytest
from conftest import GatewayFactory
from harness import ISSUER, GatewayUnderTest, Upstream
from test_attacks_forward_auth import ENABLED, ask, fa_counted

KEY = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
SHORT_KEY = "Sec-WebSocket-Key: dGhlIHNhbXBsZQ=="
HANDSHAKE = ("Connection: Upgrade", "Sec-WebSocket-Version: 13", KEY)


@pytest.fixture
async def gw(gateways: GatewayFactory, upstream: Upstream) -> GatewayUnderTest:
    routes = [
        {"prefix": "/", "upstream": upstream.url, "auth": "none"},
        {"prefix": "/api/", "upstream": upstream.url},
        {"prefix": "/ws/", "upstream": upstream.url, "websocket": True},
    ]
    return await gateways(forward_auth=ENABLED, routes=routes)


FOREIGN = [
    (
        "Upgrade: h2c",
        "Connection: Upgrade, HTTP2-Settings",
        "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
    ),
    ("Upgrade: H2C", "Connection: upgrade"),
    ("Upgrade: foo", "Connection: upgrade"),
    ("Upgrade: h2c",),  # no Connection: the edge may add its own (the nginx recipe does)
    ("Upgrade: TLS/1.0, HTTP/1.1", "Connection: Upgrade"),
]


@pytest.mark.parametrize("upgrade", FOREIGN, ids=lambda lines: lines[0])
@pytest.mark.parametrize("uri", ["/public/x", "/api/x", "/ws/feed"])
async def test_an_upgrade_other_than_websocket_is_refused_on_every_route(
    gw: GatewayUnderTest, uri: str, upgrade: tuple[str, ...]
):
    token = gw.token(jti="h2c-tunnel")
    label = "/" if uri.startswith("/public/") else uri[: uri.index("/", 1) + 1]
    before = fa_counted(label, "rejected", "malformed_request")
    status, reason = await ask(gw, f"X-Original-URI: {uri}", *upgrade, token=token)
    assert (status, reason) == (400, "malformed_request")
    assert fa_counted(label, "rejected", "malformed_request") == before + 1
    # Decided on the head alone: the refused request is no activity.
    key = gw.gateway.hasher.of_token("jti", ISSUER, "h2c-tunnel")
    assert await gw.gateway.store.last_activity(key) is None


@pytest.mark.parametrize("value", ["websocket, h2c", "h2c, websocket", "WebSocket, foo"])
async def test_websocket_with_another_protocol_is_refused_on_a_websocket_route(
    gw: GatewayUnderTest, value: str
):
    lines = ("X-Original-URI: /ws/feed", f"Upgrade: {value}", *HANDSHAKE)
    assert await ask(gw, *lines, token=gw.token()) == (400, "malformed_request")


@pytest.mark.parametrize("value", ["websocket", "websocket, h2c", "h2c, websocket", "WEBSOCKET"])
async def test_a_websocket_upgrade_on_a_route_without_websocket_is_websocket_not_enabled(
    gw: GatewayUnderTest, value: str
):
    before = fa_counted("/api/", "rejected", "websocket_not_enabled")
    lines = ("X-Original-URI: /api/x", f"Upgrade: {value}", *HANDSHAKE)
    assert await ask(gw, *lines, token=gw.token()) == (400, "websocket_not_enabled")
    assert fa_counted("/api/", "rejected", "websocket_not_enabled") == before + 1


@pytest.mark.parametrize(
    "lines",
    [
        ("Upgrade: websocket", "Sec-WebSocket-Version: 13", KEY),  # no Connection: upgrade
        ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 8", KEY),
        ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13"),
        ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13", SHORT_KEY),
        ("Upgrade: websocket", "Upgrade: h2c", *HANDSHAKE),
        ("X-Original-Method: POST", "Upgrade: websocket", *HANDSHAKE),
    ],
    ids=["no-connection", "version-8", "no-key", "short-key", "two-upgrades", "post"],
)
async def test_an_invalid_handshake_on_a_websocket_route_is_refused(
    gw: GatewayUnderTest, lines: tuple[str, ...]
):
    assert await ask(gw, "X-Original-URI: /ws/feed", *lines, token=gw.token()) == (
        400,
        "malformed_request",
    )


async def test_a_valid_handshake_on_a_websocket_route_is_decided(gw: GatewayUnderTest):
    lines = ("X-Original-URI: /ws/feed", "X-Original-Method: GET", "Upgrade: websocket", *HANDSHAKE)
    assert await ask(gw, *lines, token=gw.token()) == (200, "")
    assert await ask(gw, *lines) == (401, "missing_token")
    # Traefik and Caddy's spelling of the original request.
    lines = (
        "X-Forwarded-Uri: /ws/feed",
        "X-Forwarded-Method: GET",
        "Upgrade: WebSocket",
        *HANDSHAKE,
    )
    assert await ask(gw, *lines, token=gw.token()) == (200, "")


async def test_the_proxy_port_still_drops_an_h2c_upgrade_and_forwards_the_request(
    gw: GatewayUnderTest, upstream: Upstream
):
    headers = {"Upgrade": "h2c", "Connection": "Upgrade, HTTP2-Settings"}
    response = await gw.get("/api/x", gw.token(), headers=headers)
    assert response.status == 200
    assert "upgrade" not in {name.lower() for name, _ in upstream.received[-1].header_list}


async def test_a_token_offered_as_a_subprotocol_is_refused(gw: GatewayUnderTest):
    """The edge passes Sec-WebSocket-Protocol upstream as offered: a second token there is
    refused as on the proxy port (test_attacks_websocket.py)."""
    lines = ("X-Original-URI: /ws/feed", "X-Original-Method: GET", "Upgrade: websocket")
    protocol = f"Sec-WebSocket-Protocol: access_token, {gw.token(sub='mallory')}"
    assert await ask(gw, *lines, *HANDSHAKE, protocol, token=gw.token()) == (
        400,
        "malformed_request",
    )
    assert await ask(gw, *lines, *HANDSHAKE, "Sec-WebSocket-Protocol: chat", token=gw.token()) == (
        200,
        "",
    )
