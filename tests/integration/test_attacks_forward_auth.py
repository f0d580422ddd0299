"""Attacks on forward-auth (/.idlegate/auth) over raw sockets: ambiguous or crafted original
URIs and methods, a client spoofing its way into trusted_proxies, identity headers the client
sends, and refusals that could echo token text. Regression guards: every one of these was
already decided safely when this file was written (see the report of that round)."""

from __future__ import annotations

import pytest
from attacks import exchange, parse, request
from conftest import GatewayFactory
from harness import GatewayUnderTest, Upstream
from prometheus_client import REGISTRY

from gateway.config import ForwardAuth
from gateway.forward_auth import TrustedPeers

ENABLED = {"enabled": True}


def fa_counted(route: str, decision: str, reason: str) -> float:
    labels = {"route": route, "decision": decision, "reason": reason}
    return REGISTRY.get_sample_value("idlegate_forward_auth_requests_total", labels) or 0.0


async def ask(gw: GatewayUnderTest, *lines: str, token: str | None = None) -> tuple[int, str]:
    """(status, X-Idlegate-Reason or "") of a raw forward-auth request."""
    if token is not None:
        lines = (*lines, f"Authorization: Bearer {token}")
    port = int(gw.running.proxy.addresses[0][1])
    raw = await exchange(port, request("GET /.idlegate/auth HTTP/1.1", "Connection: close", *lines))
    response = parse(raw)
    reason = response.all("x-idlegate-reason")
    return response.status, reason[0] if reason else ""


# (headers, whether a token is sent, expected status, expected reason)
CASES = {
    "duplicate-uri": (
        ("X-Original-URI: /api/x", "X-Original-URI: /public/x"),
        True,
        400,
        "no_original_request",
    ),
    "nginx-vs-traefik": (
        ("X-Original-URI: /public/x", "X-Forwarded-Uri: /api/x"),
        False,
        400,
        "no_original_request",
    ),
    "uri-vs-url": (
        ("X-Original-URI: /public/x", "X-Original-URL: https://h/api/x"),
        False,
        400,
        "no_original_request",
    ),
    "double-slash-host": (("X-Original-URI: //evil.example/api/x",), True, 404, "no_route"),
    "double-slash-changes-route": (("X-Original-URI: //public/x",), False, 400, "bad_path"),
    "backslash": (("X-Original-URI: /public\\..\\api/x",), False, 400, "bad_path"),
    "encoded-dots": (("X-Original-URI: /public/%2e%2e/api/x",), False, 400, "bad_path"),
    "dot-dot-semicolon": (("X-Original-URI: /public/..;/api/x",), False, 400, "bad_path"),
    "fragment-dots": (("X-Original-URI: /public/x#/../../api/y",), False, 400, "bad_path"),
    "space": (("X-Original-URI: /public/x /api/y",), False, 400, "bad_path"),
    "absolute-url-dots": (("X-Original-URL: https://h/public/../api/x",), False, 400, "bad_path"),
    "scheme-relative-url": (("X-Original-URL: //h/public/x",), False, 404, "no_route"),
    # urlsplit raises on these: a 500 with a traceback before.
    "unbalanced-ipv6-bracket": (
        ("X-Original-URL: http://[/api/x",),
        True,
        400,
        "no_original_request",
    ),
    "unclosed-ipv6-host": (
        ("X-Original-URL: http://[::1/api/x",),
        True,
        400,
        "no_original_request",
    ),
    "stray-bracket": (("X-Original-URL: https://h]/api/x",), True, 400, "no_original_request"),
    # ingress-nginx's X-Original-URL is `$scheme://$http_host$request_uri`: the client's Host
    # must not turn the request-target into a fragment or a query (decided `/`, forwarded
    # /api/x), nor be missing its path.
    "host-ending-in-hash": (
        ("X-Original-URL: http://shop.example:#/api/x",),
        False,
        400,
        "no_original_request",
    ),
    "host-with-query": (("X-Original-URL: http://h?/api/x",), False, 400, "no_original_request"),
    "host-with-userinfo": (
        ("X-Original-URL: http://u@h/api/x",),
        False,
        400,
        "no_original_request",
    ),
    "url-without-path": (("X-Original-URL: http://h",), True, 400, "no_original_request"),
    "url-with-port": (("X-Original-URL: https://h:8443/api/x?a=1",), True, 200, ""),
    "fragment-in-path": (
        ("X-Forwarded-Uri: /api#x", "X-Forwarded-Method: GET"),
        False,
        400,
        "bad_path",
    ),
    "not-a-uri": (("X-Original-URI: api/x",), False, 400, "no_original_request"),
    "empty-uri": (("X-Original-URI: ",), False, 400, "no_original_request"),
    "method-with-spaces": (
        ("X-Original-URI: /api/x", "X-Original-Method: GET /public/ HTTP/1.1"),
        True,
        400,
        "no_original_request",
    ),
    "methods-disagree": (
        ("X-Original-URI: /api/x", "X-Original-Method: GET", "X-Forwarded-Method: DELETE"),
        True,
        400,
        "no_original_request",
    ),
    "method-empty": (
        ("X-Original-URI: /api/x", "X-Original-Method: "),
        True,
        400,
        "no_original_request",
    ),
    "method-too-long": (
        ("X-Original-URI: /api/x", "X-Original-Method: " + "A" * 40),
        True,
        400,
        "no_original_request",
    ),
    "method-lower-case": (("X-Original-URI: /api/x", "X-Original-Method: delete"), True, 200, ""),
    # Documents: decided as the literal segment `%2e%2e` (one decoding, as every route match);
    # an upstream that decodes twice is outside what a gateway can agree with.
    "double-encoded-dots": (("X-Original-URI: /public/%252e%252e/api/x",), False, 200, ""),
}


@pytest.mark.parametrize(("lines", "token", "status", "reason"), CASES.values(), ids=CASES.keys())
async def test_crafted_original_requests_are_decided_safely(
    gateways: GatewayFactory,
    upstream: Upstream,
    lines: tuple[str, ...],
    token: bool,
    status: int,
    reason: str,
):
    gw = await gateways(forward_auth=ENABLED)
    assert await ask(gw, *lines, token=gw.token() if token else None) == (status, reason)
    assert upstream.received == []


async def test_a_host_that_hides_the_target_cannot_reach_a_public_catch_all(
    gateways: GatewayFactory, upstream: Upstream
):
    """With a public `/` route, a Host ending in `#` made the path of X-Original-URL empty:
    decided `/` (200, public) while nginx forwards the request-target, /api/x, unchecked."""
    routes = [{"prefix": "/", "auth": "none"}, {"prefix": "/api/"}]
    gw = await gateways(forward_auth=ENABLED, routes=routes)
    for url in ("http://shop.example:#/api/x", "http://shop.example?/api/x"):
        assert await ask(gw, f"X-Original-URL: {url}") == (400, "no_original_request")
    assert await ask(gw, "X-Original-URL: http://shop.example/api/x") == (401, "missing_token")
    assert await ask(gw, "X-Original-URL: http://shop.example/") == (200, "")


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "Application/X-WWW-Form-Urlencoded; charset=UTF-8"],
)
async def test_a_form_post_is_refused_where_its_body_cannot_be_seen(
    gateways: GatewayFactory, upstream: Upstream, content_type: str
):
    """The proxy port refuses a form body carrying a second token; the edge never passes the
    body to forward-auth, so a form on a token route is refused there (counted), a public
    route's is not, and the yes that does go out is never cached."""
    gw = await gateways(forward_auth=ENABLED)
    token = gw.token()
    before = fa_counted("/api/", "rejected", "malformed_request")
    form = ("X-Original-URI: /api/x", "X-Original-Method: POST", f"Content-Type: {content_type}")
    assert await ask(gw, *form, token=token) == (400, "malformed_request")
    assert fa_counted("/api/", "rejected", "malformed_request") == before + 1
    public = (
        "X-Original-URI: /public/x",
        "X-Original-Method: POST",
        f"Content-Type: {content_type}",
    )
    assert await ask(gw, *public) == (200, "")
    json_post = (
        "X-Original-URI: /api/x",
        "X-Original-Method: POST",
        "Content-Type: application/json",
    )
    port = int(gw.running.proxy.addresses[0][1])
    raw = await exchange(port, request("GET /.idlegate/auth HTTP/1.1", "Connection: close",
                                       *json_post, f"Authorization: Bearer {token}"))  # fmt: skip
    allowed = parse(raw)
    assert allowed.status == 200
    assert allowed.all("cache-control") == ["no-store"]
    assert upstream.received == []


@pytest.mark.parametrize(
    "claim",
    [
        "X-Forwarded-For: 10.0.0.1",
        "X-Real-IP: 10.0.0.1",
        "Forwarded: for=10.0.0.1",
        "X-Forwarded-For: 10.0.0.1, 127.0.0.1",
    ],
)
async def test_a_client_cannot_claim_to_be_a_trusted_proxy(gateways: GatewayFactory, claim: str):
    # Trust is the TCP peer's (127.0.0.1 here), never what a header says about it.
    gw = await gateways(forward_auth={"enabled": True, "trusted_proxies": ["10.0.0.0/8"]})
    before = fa_counted("none", "rejected", "untrusted_proxy")
    status = await ask(gw, "X-Original-URI: /public/x", claim)
    assert status == (403, "untrusted_proxy")
    assert fa_counted("none", "rejected", "untrusted_proxy") == before + 1


async def test_an_ipv6_peer_is_trusted_only_by_an_ipv6_network(gateways: GatewayFactory):
    gw = await gateways(
        listen={"host": "::1", "port": 0},
        forward_auth={"enabled": True, "trusted_proxies": ["127.0.0.0/8"]},
    )
    port = gw.running.proxy.addresses[0][1]
    response = await gw.http.get(
        f"http://[::1]:{port}/.idlegate/auth", headers={"X-Original-URI": "/public/x"}
    )
    assert (response.status, response.headers["X-Idlegate-Reason"]) == (403, "untrusted_proxy")


def test_ipv4_mapped_and_zoned_peers_are_judged_as_their_address():
    peers = TrustedPeers(ForwardAuth(trusted_proxies=["127.0.0.0/8", "fe80::/64"]))
    assert "::ffff:127.0.0.1" in peers  # a dual-stack listener's view of 127.0.0.1
    assert "::ffff:10.0.0.1" not in peers
    assert "fe80::1%eth0" in peers
    assert "127.0.0.1.evil" not in peers
    assert "" not in peers and None not in peers


async def test_identity_headers_the_client_sends_never_come_back(gateways: GatewayFactory):
    gw = await gateways(forward_auth=ENABLED)
    port = int(gw.running.proxy.addresses[0][1])
    for uri, token in (("/public/x", None), ("/api/x", gw.token(sub="alice", jti="fa-echo"))):
        lines = [f"X-Original-URI: {uri}", "X-Auth-Subject: mallory", "X-Auth-Token-Id: forged"]
        if token:
            lines.append(f"Authorization: Bearer {token}")
        response = parse(await exchange(port, request("GET /.idlegate/auth HTTP/1.1", *lines)))
        assert response.status == 200
        assert response.all("x-auth-subject") == (["alice"] if token else [])
        assert response.all("x-auth-token-id") == (["fa-echo"] if token else [])


async def test_a_refusal_echoes_nothing_of_the_token(gateways: GatewayFactory):
    gw = await gateways(forward_auth=ENABLED)
    port = int(gw.running.proxy.addresses[0][1])
    marker = "SECRETTOKENTEXT"
    for token in (
        f"eyJhbGciOiJub25lIn0.{marker}.x",
        f"{marker}",
        gw.token()[:-10] + marker[:10],
        f"eyJ<script>.{marker}.x",
    ):
        raw = await exchange(
            port,
            request(
                "GET /.idlegate/auth HTTP/1.1",
                "X-Original-URI: /api/x",
                f"Authorization: Bearer {token}",
                "Connection: close",
            ),
        )
        assert parse(raw).status in (400, 401)
        assert marker.encode() not in raw
