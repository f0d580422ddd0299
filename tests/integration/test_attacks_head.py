"""What the request head alone refuses, before the token is looked at (so never activity):
HTTP versions other than 1.0 and 1.1, a Host that is no host, a method override to a method
never forwarded. And the client's claims an upstream acts on never pass from a peer that is
not a trusted proxy."""

from __future__ import annotations

import json

import pytest
from attacks import exchange, parse, request, requests_counted
from conftest import GatewayFactory
from harness import ISSUER, GatewayUnderTest, Upstream


def port(gw: GatewayUnderTest) -> int:
    return int(gw.running.proxy.addresses[0][1])


def with_host(host: str, *lines: str) -> bytes:
    return request("GET /api/x HTTP/1.1", *lines).replace(b"gateway.test", host.encode())


async def never_activity(gw: GatewayUnderTest, jti: str) -> None:
    key = gw.gateway.hasher.of_token("jti", ISSUER, jti)
    assert await gw.gateway.store.last_activity(key) is None


@pytest.mark.parametrize(
    ("head", "reason", "status"),
    [
        (request("GET /api/x HTTP/2.0"), "malformed_http", 400),
        (b"GET /api/x\r\n\r\n", "malformed_http", 400),  # HTTP/0.9: no version, no headers
        (with_host("a b"), "malformed_http", 400),
        (with_host("evil@gw"), "malformed_http", 400),
        (with_host("gw/x"), "malformed_http", 400),
        (with_host("gw", "X-HTTP-Method-Override: TRACE"), "method_not_allowed", 405),
        (with_host("gw", "x-method-override:  connect "), "method_not_allowed", 405),
        (with_host("gw", "X-HTTP-Method: track"), "method_not_allowed", 405),
    ],
)  # fmt: skip
async def test_the_head_alone_refuses_before_the_token_counts(
    gateways: GatewayFactory, upstream: Upstream, head: bytes, reason: str, status: int
):
    gw = await gateways()
    token = gw.token(jti="head-case")
    before = requests_counted("none", "rejected", reason)
    authorised = head.replace(b"\r\n", f"\r\nAuthorization: Bearer {token}\r\n".encode(), 1)
    if not head.startswith(b"GET /api/x\r\n"):
        head = authorised
    response = parse(await exchange(port(gw), head))
    assert response.status == status
    assert json.loads(response.body)["reason"] == reason
    assert requests_counted("none", "rejected", reason) == before + 1
    assert upstream.received == []
    await never_activity(gw, "head-case")


@pytest.mark.parametrize("host", ["api.example.com", "api.example.com:8443", "10.0.0.1:80",
                                  "[::1]:8080", "localhost"])  # fmt: skip
async def test_hosts_and_harmless_method_overrides_pass(
    gateways: GatewayFactory, upstream: Upstream, host: str
):
    gw = await gateways()
    lines = [f"Authorization: Bearer {gw.token()}", "X-HTTP-Method-Override: DELETE"]
    raw = await exchange(port(gw), with_host(host, *lines))
    assert parse(raw).status == 200
    (received,) = upstream.received
    assert received.headers["X-Forwarded-Host"] == host
    assert received.headers["X-HTTP-Method-Override"] == "DELETE"


async def test_forward_auth_refuses_a_method_override_never_forwarded(gateways: GatewayFactory):
    gw = await gateways(forward_auth={"enabled": True})
    raw = await exchange(
        port(gw),
        request(
            "GET /.idlegate/auth HTTP/1.1", "X-Original-URI: /api/x",
            f"Authorization: Bearer {gw.token()}", "X-HTTP-Method-Override: TRACE",
        ),
    )  # fmt: skip
    response = parse(raw)
    assert (response.status, response.all("x-idlegate-reason")) == (405, ["method_not_allowed"])


CLAIMS = [
    "X-Forwarded-Uri", "X-Forwarded-Method", "X-Original-Method", "X-Forwarded", "X-Host",
    "X-Originating-IP", "X-Remote-IP", "X-Remote-Addr", "X-ProxyUser-Ip",
]  # fmt: skip


async def test_what_an_untrusted_client_claims_about_its_request_never_passes(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways()
    lines = [f"Authorization: Bearer {gw.token()}", *(f"{name}: forged" for name in CLAIMS)]
    lines += [f"{name.replace('-', '_')}: forged" for name in CLAIMS]  # and their `_` twins
    assert parse(await exchange(port(gw), request("GET /api/x HTTP/1.1", *lines))).status == 200
    (received,) = upstream.received
    assert "forged" not in json.dumps(received.header_list)


async def test_a_trusted_proxy_passes_them(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways(forward={"trusted_proxies": ["127.0.0.1"]})
    lines = [f"Authorization: Bearer {gw.token()}", *(f"{name}: theirs" for name in CLAIMS)]
    assert parse(await exchange(port(gw), request("GET /api/x HTTP/1.1", *lines))).status == 200
    (received,) = upstream.received
    assert [received.headers.get(name) for name in CLAIMS] == ["theirs"] * len(CLAIMS)


async def test_http_1_0_without_a_host_is_served(gateways: GatewayFactory, upstream: Upstream):
    """aiohttp names the local address instead; no Host is no malformed one."""
    gw = await gateways()
    head = f"GET /api/x HTTP/1.0\r\nAuthorization: Bearer {gw.token()}\r\n\r\n".encode()
    assert parse(await exchange(port(gw), head)).status == 200
    assert len(upstream.received) == 1
