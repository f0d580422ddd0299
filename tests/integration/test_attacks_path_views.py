"""Paths in disguise through a real gateway: an overlong or otherwise non-UTF-8 escape, a
trailing dot or space (Windows), a `.suffix` (Spring's suffix pattern match) that would put the
request on a more protected route upstream are refused `400 bad_path` before the token is
looked at, counted like any bad path, and nothing reaches the upstream."""

from __future__ import annotations

import json

import pytest
from attacks import exchange, parse, request, requests_counted
from conftest import GatewayFactory
from harness import GatewayUnderTest, Upstream


def routes(upstream: Upstream) -> list[dict[str, object]]:
    return [
        {"prefix": "/api/admin/", "upstream": upstream.url, "scopes": ["admin"]},
        {"prefix": "/api/", "upstream": upstream.url},
        {"prefix": "/", "upstream": upstream.url, "auth": "none"},
    ]


async def get(gw: GatewayUnderTest, path: str, *lines: str) -> tuple[int, str]:
    """(status, reason or "") of `GET path` written on the socket as is."""
    port = int(gw.running.proxy.addresses[0][1])
    response = parse(await exchange(port, request(f"GET {path} HTTP/1.1", *lines)))
    body = json.loads(response.body) if response.status >= 400 else {}
    return response.status, body.get("reason", "")


@pytest.mark.parametrize(
    "path",
    [
        "/pub/%C0%AE%C0%AE/api/x",  # `/pub/../api/x` to a lenient UTF-8 decoder
        "/pub%C0%AF..%C0%AFapi/x",
        "/pub/%E0%80%AE%E0%80%AE/api/x",
        "/caf%E9",  # Latin-1: not UTF-8 either
        "/api./x",  # `/api/x` to Windows: the catch-all would have decided it
        "/api%20/x",
        "/api%2e/x",
        "/api.json",  # `/api` to Spring's suffix pattern match
    ],
)
async def test_a_disguised_path_is_refused_before_the_catch_all_forwards_it(
    gateways: GatewayFactory, upstream: Upstream, path: str
):
    gw = await gateways(routes=routes(upstream))
    before = requests_counted("none", "rejected", "bad_path")
    assert await get(gw, path) == (400, "bad_path")
    assert requests_counted("none", "rejected", "bad_path") == before + 1
    assert upstream.received == []


@pytest.mark.parametrize("path", ["/api/admin.json", "/api/admin./users", "/api/admin%20/users",
                                  "/api/admin%C0%AF/users", "/api/ADMIN.json"])  # fmt: skip
async def test_a_token_without_the_sub_routes_scope_cannot_reach_it_in_disguise(
    gateways: GatewayFactory, upstream: Upstream, path: str
):
    gw = await gateways(routes=routes(upstream))
    token = gw.token(scope="read")
    assert await get(gw, "/api/admin/users", f"Authorization: Bearer {token}") == (
        403,
        "insufficient_scope",
    )
    before = requests_counted("none", "rejected", "bad_path")
    assert await get(gw, path, f"Authorization: Bearer {token}") == (400, "bad_path")
    assert requests_counted("none", "rejected", "bad_path") == before + 1
    assert upstream.received == []


async def test_dotted_and_utf8_paths_that_keep_their_route_are_forwarded_as_sent(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways(routes=routes(upstream))
    token = gw.token()
    paths = ["/api/v1.2/items", "/api/orders.json", "/static/app.js", "/caf%C3%A9/menu"]
    for path in paths:
        assert await get(gw, path, f"Authorization: Bearer {token}") == (200, "")
    assert [received.path_qs for received in upstream.received] == paths


async def test_forward_auth_refuses_raw_bytes_that_are_not_utf8(
    gateways: GatewayFactory, upstream: Upstream
):
    """nginx passes the client's raw bytes on in `X-Original-URI`; `\\xc0\\xae` is `.` to a
    lenient decoder behind it, so `/public/../api/x`: refused like the escaped form."""
    gw = await gateways(routes=routes(upstream), forward_auth={"enabled": True})
    port = int(gw.running.proxy.addresses[0][1])
    head = request("GET /.idlegate/auth HTTP/1.1", "Connection: close", "X-Original-URI: /pub/")
    head = head.replace(b"/pub/", b"/pub/\xc0\xae\xc0\xae/api/x")
    response = parse(await exchange(port, head))
    assert (response.status, response.all("x-idlegate-reason")) == (400, ["bad_path"])
    assert upstream.received == []
