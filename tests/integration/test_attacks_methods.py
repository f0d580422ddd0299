"""Methods a gateway does not forward, over raw sockets: TRACE and TRACK (an upstream that echoes
them would send the client's Authorization and the gateway's identity headers back) and CONNECT
(a tunnel, not a request). Refused from the head, JSON and counted, on both front doors."""

from __future__ import annotations

import json

import pytest
from attacks import exchange, parse, request, requests_counted
from conftest import GatewayFactory
from harness import ISSUER, GatewayUnderTest, Upstream
from test_attacks_forward_auth import ENABLED, ask, fa_counted


def port(gw: GatewayUnderTest) -> int:
    return int(gw.running.proxy.addresses[0][1])


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("TRACE", "/api/x"),
        ("TRACE", "/public/x"),
        ("TRACE", "/.idlegate/session"),
        ("CONNECT", "gateway.test:443"),
        ("CONNECT", "/api/x"),
    ],
)
async def test_methods_never_forwarded_are_refused_with_405(
    gateways: GatewayFactory, upstream: Upstream, method: str, target: str
):
    gw = await gateways()
    token = gw.token(jti="tracer")
    before = requests_counted("none", "rejected", "method_not_allowed")
    raw = await exchange(
        port(gw),
        request(
            f"{method} {target} HTTP/1.1", f"Authorization: Bearer {token}", "Connection: close"
        ),
    )
    response = parse(raw)
    assert response.status == 405
    assert response.all("cache-control") == ["no-store"]
    assert response.all("content-type")[0].startswith("application/json")
    body = json.loads(response.body)
    assert (body["error"], body["reason"]) == ("method_not_allowed", "method_not_allowed")
    assert requests_counted("none", "rejected", "method_not_allowed") == before + 1
    assert upstream.received == []
    assert token.encode() not in raw
    # Decided from the head: the token was never looked at, so it is not activity.
    key = gw.gateway.hasher.of_token("jti", ISSUER, "tracer")
    assert await gw.gateway.store.last_activity(key) is None


async def test_track_never_reaches_the_upstream(gateways: GatewayFactory, upstream: Upstream):
    # aiohttp's C parser (llhttp) knows no TRACK and answers 400 itself; the pure-Python parser
    # (AIOHTTP_NO_EXTENSIONS) passes it on, and the gateway refuses it as TRACE.
    gw = await gateways()
    raw = await exchange(port(gw), request("TRACK /api/x HTTP/1.1", "Connection: close"))
    assert parse(raw).status in (400, 405)
    assert upstream.received == []


@pytest.mark.parametrize("method", ["TRACE", "track", "CONNECT"])
async def test_forward_auth_refuses_an_original_method_never_forwarded(
    gateways: GatewayFactory, upstream: Upstream, method: str
):
    gw = await gateways(forward_auth=ENABLED)
    before = fa_counted("none", "rejected", "method_not_allowed")
    status = await ask(
        gw, "X-Original-URI: /api/x", f"X-Original-Method: {method}", token=gw.token()
    )
    assert status == (405, "method_not_allowed")
    assert fa_counted("none", "rejected", "method_not_allowed") == before + 1
    assert upstream.received == []


async def test_a_trace_auth_request_is_refused_like_its_original(gateways: GatewayFactory):
    # Without X-Original-Method the auth request's own method is the original's.
    gw = await gateways(forward_auth=ENABLED)
    raw = await exchange(
        port(gw),
        request("TRACE /.idlegate/auth HTTP/1.1", "X-Original-URI: /public/x", "Connection: close"),
    )
    response = parse(raw)
    assert (response.status, response.all("x-idlegate-reason")) == (405, ["method_not_allowed"])
