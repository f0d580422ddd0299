"""Forward-auth through the gateway's own sockets: which request is decided (nginx, Traefik/Caddy
and Envoy styles), who may ask, the answers, and that the decisions are the proxy port's own
(idle, passive, scopes, revocation, store outage). The real edge proxies are in
test_forward_auth_edges.py."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import aiohttp
from conftest import GatewayFactory, RedisServer, free_port
from harness import ISSUER, GatewayUnderTest, Upstream, base_config
from jwks_server import SigningKey
from prometheus_client import REGISTRY

from gateway import config as config_module
from gateway.accesslog import AccessLog
from gateway.app import Gateway
from gateway.clock import ManualClock
from gateway.serve import start
from gateway.store.base import Revocation

ENABLED = {"enabled": True}
AUTH = "/.idlegate/auth"


def counted(metric: str, route: str, decision: str, reason: str) -> float:
    labels = {"route": route, "decision": decision, "reason": reason}
    return REGISTRY.get_sample_value(metric, labels) or 0.0


async def ask(
    gw: GatewayUnderTest,
    uri: str | None,
    token: str | None = None,
    *,
    method: str = "GET",
    path: str = AUTH,
    base: str | None = None,
    **headers: str,
) -> aiohttp.ClientResponse:
    """A forward-auth request as nginx sends it: X-Original-URI / -Method, client headers."""
    sent = {name.replace("_", "-"): value for name, value in headers.items()}
    if uri is not None:
        sent["X-Original-URI"] = uri
        sent.setdefault("X-Original-Method", method)
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    response = await gw.http.get((base or gw.url) + path, headers=sent)
    await response.read()
    return response


async def assert_refusal(response: aiohttp.ClientResponse, status: int, reason: str) -> None:
    body = json.loads(await response.read())
    assert response.status == status, body
    assert body["reason"] == reason
    assert response.headers["Cache-Control"] == "no-store"
    if status in (401, 403):
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="idlegate"')


async def test_allowed_answer_is_200_with_identity_headers_and_nothing_else(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways(forward_auth=ENABLED)
    before = counted("idlegate_forward_auth_requests_total", "/api/", "allowed", "ok")
    before_all = counted("idlegate_requests_total", "/api/", "allowed", "ok")
    response = await ask(gw, "/api/orders?x=1", gw.token(sub="alice", jti="j-1", scope="a b"))
    assert response.status == 200
    assert await response.read() == b""
    assert response.headers["X-Auth-Subject"] == "alice"
    assert response.headers["X-Auth-Token-Id"] == "j-1"
    assert response.headers["X-Auth-Scope"] == "a b"
    assert response.headers["X-Request-ID"]
    assert "Set-Cookie" not in response.headers
    assert upstream.received == [], "forward-auth never forwards"
    assert counted("idlegate_forward_auth_requests_total", "/api/", "allowed", "ok") == before + 1
    assert counted("idlegate_requests_total", "/api/", "allowed", "ok") == before_all + 1


async def test_refusal_is_the_proxy_ports_refusal(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways(forward_auth=ENABLED)
    before = counted("idlegate_forward_auth_requests_total", "/api/", "rejected", "missing_token")
    via_auth = await ask(gw, "/api/orders")
    via_proxy = await gw.get("/api/orders")
    await assert_refusal(via_auth, 401, "missing_token")
    assert via_auth.headers["WWW-Authenticate"] == via_proxy.headers["WWW-Authenticate"]
    auth_body, proxy_body = json.loads(await via_auth.read()), await via_proxy.json()
    del auth_body["request_id"], proxy_body["request_id"]
    assert auth_body == proxy_body
    after = counted("idlegate_forward_auth_requests_total", "/api/", "rejected", "missing_token")
    assert after == before + 1


async def test_public_route_is_allowed_without_identity(gateways: GatewayFactory):
    gw = await gateways(forward_auth=ENABLED)
    response = await ask(gw, "/public/logo.png")
    assert response.status == 200
    assert "X-Auth-Subject" not in response.headers


async def test_every_edge_proxys_way_of_naming_the_request(gateways: GatewayFactory):
    gw = await gateways(forward_auth={"enabled": True, "envoy_path_prefix": "/ext-authz"})
    token = gw.token()
    # ingress-nginx: X-Original-URL (and X-Original-URI, equal)
    response = await ask(
        gw, None, token, X_Original_URL="https://shop.example/api/x?y=1", X_Original_Method="GET"
    )
    assert response.status == 200
    # Traefik, Caddy: X-Forwarded-Method + X-Forwarded-Uri (+ Host, Proto)
    response = await ask(
        gw,
        None,
        token,
        X_Forwarded_Method="DELETE",
        X_Forwarded_Uri="/api/x",
        X_Forwarded_Host="shop.example",
        X_Forwarded_Proto="https",
    )
    assert response.status == 200
    # Envoy ext_authz (HTTP service): the original path after the prefix, the method as is
    response = await ask(gw, None, token, path="/ext-authz/api/x?y=1")
    assert response.status == 200
    await assert_refusal(await ask(gw, None, path="/ext-authz/api/x"), 401, "missing_token")
    response = await ask(gw, None, path="/ext-authz/public/x")
    assert response.status == 200


async def test_the_decision_is_on_the_original_uri_not_the_auth_requests(
    gateways: GatewayFactory,
):
    gw = await gateways(forward_auth=ENABLED)
    # The protected route is named by the header; the auth request's own path is ignored.
    await assert_refusal(await ask(gw, "/api/x"), 401, "missing_token")
    await assert_refusal(await ask(gw, "/nothing/here", gw.token()), 404, "no_route")
    # A token in the original URI's query is refused as on the proxy port.
    await assert_refusal(
        await ask(gw, "/api/x?access_token=abc", gw.token()), 400, "malformed_request"
    )


async def test_missing_or_contradicting_sources_are_refused(gateways: GatewayFactory):
    gw = await gateways(forward_auth=ENABLED)
    token = gw.token()
    await assert_refusal(await ask(gw, None, token), 400, "no_original_request")
    # A client behind nginx adds X-Forwarded-Uri naming a public path: never the one decided.
    await assert_refusal(
        await ask(gw, "/api/x", X_Forwarded_Uri="/public/x"), 400, "no_original_request"
    )
    await assert_refusal(
        await ask(gw, "/api/x", token, X_Forwarded_Method="POST", method="GET"),
        400,
        "no_original_request",
    )
    await assert_refusal(await ask(gw, "api/x", token), 400, "no_original_request")
    sent = aiohttp.ClientSession()
    try:
        async with sent.get(
            gw.url + AUTH,
            headers=[("X-Original-URI", "/api/x"), ("X-Original-URI", "/public/x")],
        ) as twice:
            await assert_refusal(twice, 400, "no_original_request")
    finally:
        await sent.close()


async def test_traversal_in_the_original_uri_is_refused(gateways: GatewayFactory):
    gw = await gateways(forward_auth=ENABLED)
    for uri in ("/public/../api/x", "/public/%2e%2e/api/x", "/public%2f..%2fapi/x"):
        await assert_refusal(await ask(gw, uri), 400, "bad_path")


async def test_untrusted_peer_is_refused_whatever_it_says(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways(forward_auth={"enabled": True, "trusted_proxies": ["10.0.0.0/8"]})
    before = counted("idlegate_forward_auth_requests_total", "none", "rejected", "untrusted_proxy")
    await assert_refusal(await ask(gw, "/public/x"), 403, "untrusted_proxy")
    await assert_refusal(await ask(gw, "/api/x", gw.token()), 403, "untrusted_proxy")
    after = counted("idlegate_forward_auth_requests_total", "none", "rejected", "untrusted_proxy")
    assert after == before + 2
    # The proxy port itself is unaffected.
    assert (await gw.get("/api/x", gw.token())).status == 200


async def test_disabled_forward_auth_has_no_endpoint(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways()
    response = await ask(gw, "/public/x")
    await assert_refusal(response, 404, "no_route")


async def test_dedicated_port_answers_forward_auth_on_any_path(
    gateways: GatewayFactory, upstream: Upstream
):
    port = free_port()
    gw = await gateways(
        forward_auth={"enabled": True, "listen": {"host": "127.0.0.1", "port": port}}
    )
    own = gw.running.forward_auth_address()
    assert own == f"http://127.0.0.1:{port}"
    token = gw.token(sub="bob")
    for path in (AUTH, "/", "/verify"):
        response = await ask(gw, "/api/x", token, path=path, base=own)
        assert response.status == 200, path
        assert response.headers["X-Auth-Subject"] == "bob"
    await assert_refusal(await ask(gw, "/api/x", path="/", base=own), 401, "missing_token")
    # Also on the proxy port.
    assert (await ask(gw, "/api/x", token)).status == 200
    assert upstream.received == []


async def test_activity_is_one_clock_for_both_front_doors(
    gateways: GatewayFactory, upstream: Upstream, redis_server: RedisServer, clock: ManualClock
):
    """A token kept alive through forward-auth at one instance is alive on the other's proxy
    port, passive routes do not extend, and idling out is terminal at both doors."""
    routes = [
        {"prefix": "/api/", "upstream": upstream.url},
        {"prefix": "/api/poll/", "upstream": upstream.url, "activity": "passive"},
        {"prefix": "/api/admin/", "upstream": upstream.url, "idle_timeout": "60s"},
    ]
    policy = {"max_token_lifetime": "1h"}
    one = await gateways(
        store_url=redis_server.url, forward_auth=ENABLED, routes=routes, policy=policy
    )
    two = await gateways(store_url=redis_server.url, routes=routes, policy=policy)
    token = one.token(ttl=3600)
    clock.advance(800)
    assert (await ask(one, "/api/x", token)).status == 200
    clock.advance(800)  # idle, had the forward-auth decision not counted as activity
    assert (await two.get("/api/x", token)).status == 200
    clock.advance(61)  # the route's own shorter idle timeout
    await assert_refusal(await ask(one, "/api/admin/x", token), 401, "idle_timeout")
    for _ in range(3):
        clock.advance(250)
        assert (await ask(one, "/api/poll/x", token)).status == 200  # checked, not extended
    clock.advance(90)  # 901 s since the last extending request
    await assert_refusal(await ask(one, "/api/poll/x", token), 401, "idle_timeout")
    await assert_refusal(await ask(one, "/api/x", token), 401, "idle_timeout")
    assert (await two.get("/api/x", token)).status == 401


async def test_scopes_revocation_and_store_outage_as_on_the_proxy_port(
    gateways: GatewayFactory, redis_server: RedisServer, upstream: Upstream
):
    routes = [
        {"prefix": "/api/", "upstream": upstream.url},
        {"prefix": "/api/write/", "upstream": upstream.url, "scopes": ["orders:write"]},
    ]
    gw = await gateways(store_url=redis_server.url, forward_auth=ENABLED, routes=routes)
    token = gw.token(jti="fa-revoked", scope="orders:read")
    response = await ask(gw, "/api/write/x", token)
    await assert_refusal(response, 403, "insufficient_scope")
    assert 'scope="orders:write"' in response.headers["WWW-Authenticate"]
    assert (await ask(gw, "/api/x", token)).status == 200
    await gw.gateway.revocations.revoke(
        Revocation(
            "jti",
            gw.gateway.hasher.of_token("jti", ISSUER, "fa-revoked"),
            None,
            gw.clock.now() + 1000,
        )
    )
    await assert_refusal(await ask(gw, "/api/x", token), 401, "revoked")
    other = gw.token()
    redis_server.stop()
    response = await ask(gw, "/api/x", other)
    await assert_refusal(response, 503, "store_unavailable")
    assert response.headers["Retry-After"] == "1"
    redis_server.start()
    assert (await ask(gw, "/api/x", other)).status == 200


async def test_access_log_says_which_front_door_decided(
    upstream: Upstream, key_file: Path, signing_key: SigningKey, clock: ManualClock
):
    data: dict[str, Any] = base_config(upstream.url, key_file, forward_auth=ENABLED)
    config = config_module.from_data(data, environ={})
    stream = io.StringIO()
    gateway = Gateway(config, clock=clock, environ={}, access_log=AccessLog(stream))
    running = await start(config, gateway=gateway)
    gw = GatewayUnderTest(running, signing_key, clock, aiohttp.ClientSession())
    try:
        token = gw.token(sub="carol", jti="log-1")
        assert (await ask(gw, "/api/x", token, method="PUT")).status == 200
        assert (await gw.get("/api/x", token)).status == 200
    finally:
        await gw.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["mode"], line["method"], line["route"]) for line in lines] == [
        ("forward_auth", "PUT", "/api/"),
        ("proxy", "GET", "/api/"),
    ]
    assert token not in stream.getvalue()
    assert lines[0]["jti"] == "log-1"


async def test_a_route_without_upstream_is_decided_but_never_forwarded(
    gateways: GatewayFactory, upstream: Upstream
):
    """Forward-auth-only deployments name no upstream; their proxy port refuses such a route
    before any token or store work (no activity)."""
    gw = await gateways(forward_auth=ENABLED, routes=[{"prefix": "/"}])
    token = gw.token(jti="no-upstream")
    await assert_refusal(await gw.get("/orders", token), 404, "no_route")
    key = gw.gateway.hasher.of_token("jti", ISSUER, "no-upstream")
    assert await gw.gateway.store.last_activity(key) is None
    response = await ask(gw, "/orders", token)
    assert response.status == 200
    assert await gw.gateway.store.last_activity(key) == gw.clock.now()
    assert upstream.received == []


async def test_sessions_session_age_and_on_error_allow_decide_as_on_the_proxy_port(
    gateways: GatewayFactory, redis_server: RedisServer, clock: ManualClock
):
    policy = {
        "track_by": "sid",
        "required_claims": ["exp", "iat", "sid"],
        "max_token_lifetime": "1h",
        "max_session_age": "8h",
    }
    gw = await gateways(
        store_url=redis_server.url,
        forward_auth=ENABLED,
        policy=policy,
        store={"on_error": "allow"},
    )
    first = gw.token(sid="fa-s", ttl=3600, auth_time=clock.now())
    clock.advance(800)
    second = gw.token(sid="fa-s", ttl=3600, auth_time=clock.now() - 800)
    assert (await ask(gw, "/api/x", second)).status == 200
    clock.advance(800)
    assert (await gw.get("/api/x", first)).status == 200  # the session was active 800 s ago
    clock.advance(901)
    await assert_refusal(await ask(gw, "/api/x", second), 401, "session_idle")
    later = gw.token(sid="fa-s", ttl=3600, auth_time=clock.now())
    await assert_refusal(await ask(gw, "/api/x", later), 401, "session_idle")
    old = gw.token(sid="fa-old", auth_time=clock.now() - 8 * 3600 - 31)
    await assert_refusal(await ask(gw, "/api/x", old), 401, "session_too_old")
    redis_server.stop()
    before = REGISTRY.get_sample_value("idlegate_store_fallbacks_total", {"mode": "allow"}) or 0
    fresh = gw.token(sid="fa-new", auth_time=clock.now())
    response = await ask(gw, "/api/x", fresh)
    assert response.status == 200
    after = REGISTRY.get_sample_value("idlegate_store_fallbacks_total", {"mode": "allow"})
    assert after == before + 1


async def test_a_visible_upgrade_needs_a_websocket_route_as_on_the_proxy_port(
    gateways: GatewayFactory, upstream: Upstream
):
    routes = [
        {"prefix": "/api/", "upstream": upstream.url},
        {"prefix": "/ws/", "upstream": upstream.url, "websocket": True},
    ]
    gw = await gateways(forward_auth=ENABLED, routes=routes)
    handshake = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    token = gw.token()
    await assert_refusal(await ask(gw, "/api/x", token, **handshake), 400, "websocket_not_enabled")
    assert (await ask(gw, "/ws/feed", token, **handshake)).status == 200


async def test_access_log_has_the_original_method_of_a_refusal_before_the_route(
    upstream: Upstream, key_file: Path, signing_key: SigningKey, clock: ManualClock
):
    """Refused while the original request is read (TRACE, TRACK, disagreeing sources): the log
    line says what the edge named, never the GET of its auth subrequest."""
    data: dict[str, Any] = base_config(upstream.url, key_file, forward_auth=ENABLED)
    config = config_module.from_data(data, environ={})
    stream = io.StringIO()
    gateway = Gateway(config, clock=clock, environ={}, access_log=AccessLog(stream))
    running = await start(config, gateway=gateway)
    gw = GatewayUnderTest(running, signing_key, clock, aiohttp.ClientSession())
    before = counted(
        "idlegate_forward_auth_requests_total", "none", "rejected", "method_not_allowed"
    )
    try:
        await assert_refusal(await ask(gw, "/public/x", method="TRACE"), 405, "method_not_allowed")
        await assert_refusal(await ask(gw, "/api/x", method="track"), 405, "method_not_allowed")
        caddy = {"X-Forwarded-Uri": "/api/x", "X-Forwarded-Method": "TRACE"}
        await assert_refusal(await ask(gw, None, **caddy), 405, "method_not_allowed")
        # Two sources disagree: neither is the original for sure, and the GET is not either.
        disagree = {"X-Forwarded-Method": "GET"}
        response = await ask(gw, "/api/x", method="DELETE", **disagree)
        await assert_refusal(response, 400, "no_original_request")
        await assert_refusal(await ask(gw, "/api/x", method="G(T"), 400, "no_original_request")
        # A sane method named, but no original URI.
        await assert_refusal(
            await ask(gw, None, X_Original_Method="PUT"), 400, "no_original_request"
        )
    finally:
        await gw.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["method"], line["status"], line["reason"]) for line in lines] == [
        ("TRACE", 405, "method_not_allowed"),
        ("TRACK", 405, "method_not_allowed"),
        ("TRACE", 405, "method_not_allowed"),
        ("-", 400, "no_original_request"),
        ("-", 400, "no_original_request"),
        ("PUT", 400, "no_original_request"),
    ]
    assert {line["mode"] for line in lines} == {"forward_auth"}
    after = counted(
        "idlegate_forward_auth_requests_total", "none", "rejected", "method_not_allowed"
    )
    assert after == before + 3
