"""What the request head alone refuses, before the token is looked at (so never activity):
HTTP versions other than 1.0 and 1.1, a Host that is no host, a method override to a method
never forwarded. And the client's claims an upstream acts on never pass from a peer that is
not a trusted proxy."""

from __future__ import annotations

import asyncio
import contextlib
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
        # Express's method-override takes a list's first item, others its last.
        (with_host("gw", "X-HTTP-Method-Override: TRACE, GET"), "method_not_allowed", 405),
        (with_host("gw", "X-Method-Override: GET,connect"), "method_not_allowed", 405),
        # Kept (a client's), a Host this long would hold memory only a count bounds.
        (with_host("h" + "a" * 300), "malformed_http", 400),
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


async def test_underscore_spellings_of_a_method_override_never_reach_the_upstream(
    gateways: GatewayFactory, upstream: Upstream
):
    # WSGI, CGI and nginx with underscores_in_headers read X_HTTP_Method_Override as the
    # override: dropped like the identity headers' `_` twins, whatever they name.
    gw = await gateways()
    lines = [f"Authorization: Bearer {gw.token()}", "X_HTTP_Method_Override: TRACE",
             "X-HTTP_Method: TRACE", "x_method_override: PUT"]  # fmt: skip
    assert parse(await exchange(port(gw), with_host("gw", *lines))).status == 200
    (received,) = upstream.received
    names = {name.lower().replace("_", "-") for name, _ in received.header_list}
    assert names.isdisjoint({"x-http-method-override", "x-http-method", "x-method-override"})


async def test_a_refused_request_that_awaits_100_continue_closes_its_connection(
    gateways: GatewayFactory, upstream: Upstream
):
    # Refused without `100 Continue`, its body is unsent: whatever the client sends next
    # could be that body or its next request. Kept open, the next request was read as the
    # body and the rest as a malformed request.
    gw = await gateways()
    reader, writer = await asyncio.open_connection("127.0.0.1", port(gw))
    try:
        writer.write(request("POST /api/x HTTP/1.1", "Expect: 100-continue", "Content-Length: 40"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        response = parse(head)
        assert response.status == 401
        assert [v.lower() for v in response.all("connection")] == ["close"]
        # A client that sends its next request anyway gets no answer read from it as the body
        # (the gateway reads the body it announced, if it comes, and closes).
        writer.write(request("GET /public/next HTTP/1.1"))
        rest = b""
        with contextlib.suppress(TimeoutError):
            rest = await asyncio.wait_for(reader.read(65536), 1)
        assert b"HTTP/1." not in rest
    finally:
        writer.close()
    assert upstream.received == []


async def test_forward_auth_refuses_an_underscore_method_override(gateways: GatewayFactory):
    gw = await gateways(forward_auth={"enabled": True})
    raw = await exchange(
        port(gw),
        request(
            "GET /.idlegate/auth HTTP/1.1", "X-Original-URI: /api/x",
            f"Authorization: Bearer {gw.token()}", "X_HTTP_Method_Override: GET, TRACE",
        ),
    )  # fmt: skip
    assert parse(raw).status == 405
