"""Routing and forwarding through a real gateway to a real upstream, over real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket

import pytest
from attacks import requests_counted
from conftest import GatewayFactory, free_port
from harness import Upstream
from multidict import CIMultiDict


def _error_body_ok(body: dict[str, object], reason: str) -> None:
    assert body["reason"] == reason
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["request_id"], str) and body["request_id"]
    assert "error" in body


async def test_no_route_is_404_with_contract_body(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways()
    response = await gw.get("/nowhere")
    assert response.status == 404
    assert response.headers["Cache-Control"] == "no-store"
    _error_body_ok(await response.json(), "no_route")
    assert upstream.received == []


async def test_public_route_forwards_without_token(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways()
    response = await gw.get("/public/info?x=1&y=%20z")
    assert response.status == 200
    assert upstream.received[-1].path_qs == "/public/info?x=1&y=%20z"


async def test_longest_prefix_wins_and_strip_prefix(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways(
        routes=[
            {"prefix": "/api/", "upstream": upstream.url, "auth": "none"},
            {
                "prefix": "/api/v2/",
                "upstream": upstream.url + "/base",
                "auth": "none",
                "strip_prefix": True,
            },
        ]
    )
    assert (await gw.get("/api/v2/orders?id=7")).status == 200
    assert upstream.received[-1].path_qs == "/base/orders?id=7"
    assert (await gw.get("/api/v1/orders")).status == 200
    assert upstream.received[-1].path_qs == "/api/v1/orders"


@pytest.mark.parametrize(
    "path",
    [
        "/public/../api/x",
        "/public/%2e%2e/api/x",
        "/public/%2E%2E/api/x",
        "/public%2f..%2fapi/x",
        "//api/x",
        "/public/..%5capi/x",
        "/public/./../api/x",
        # `;parameters` are cut off by Tomcat/Jetty/Spring before dot-segments are resolved.
        "/public/..;/api/x",
        "/public/..;jsessionid=x/api/x",
        "/public/%2e%2e;/api/x",
        "/public/%2E.;/api/x",
        "/public/.;x/../api/x",
        "/public/..%3b/api/x",
        "/public/..%3Bx=1/api/x",
        "/api;x/orders",  # `/api/orders` to a servlet upstream
        "/public/%u002e%u002e/api/x",  # not an escape: IIS decodes it, others pass it through
    ],
)
async def test_paths_that_change_the_route_are_refused(
    gateways: GatewayFactory, upstream: Upstream, path: str
):
    gw = await gateways()
    raw = await _raw_get(gw.running.proxy.addresses[0][1], path)
    assert raw.startswith(b"HTTP/1.1 400"), raw[:100]
    assert b'"reason": "bad_path"' in raw or b'"reason":"bad_path"' in raw
    assert upstream.received == []


async def _raw_get(port: int, path: str) -> bytes:
    """GET `path` written on the socket as is: aiohttp's client would normalise it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    return raw


@pytest.mark.parametrize("path", ["/api;x/orders", "/api%3bx/orders", "/;x/api/orders"])
async def test_parameters_cannot_move_a_protected_path_onto_a_public_catch_all(
    gateways: GatewayFactory, upstream: Upstream, path: str
):
    gw = await gateways(
        routes=[
            {"prefix": "/api/", "upstream": upstream.url},
            {"prefix": "/", "upstream": upstream.url, "auth": "none"},
        ]
    )
    raw = await _raw_get(gw.running.proxy.addresses[0][1], path)
    assert raw.startswith(b"HTTP/1.1 400"), raw[:100]
    assert upstream.received == []


@pytest.mark.parametrize(
    "path", ["/API/orders", "/Api/orders", "/%41PI/orders", "/aPi;x/orders", "/API"]
)
async def test_letter_case_cannot_move_a_protected_path_onto_a_public_catch_all(
    gateways: GatewayFactory, upstream: Upstream, path: str
):
    """`/API/orders` is `/api/orders` to an upstream that matches paths case-insensitively
    (IIS, ASP.NET): matched as the public catch-all, it would reach /api/ without a token."""
    gw = await gateways(
        routes=[
            {"prefix": "/api/", "upstream": upstream.url, "scopes": ["orders"]},
            {"prefix": "/", "upstream": upstream.url, "auth": "none"},
        ]
    )
    before = requests_counted("none", "rejected", "bad_path")
    raw = await _raw_get(gw.running.proxy.addresses[0][1], path)
    assert raw.startswith(b"HTTP/1.1 400"), raw[:100]
    assert b'"reason": "bad_path"' in raw or b'"reason":"bad_path"' in raw
    assert requests_counted("none", "rejected", "bad_path") == before + 1
    assert upstream.received == []
    # Letter case within one route is the upstream's business: forwarded as sent.
    raw = await _raw_get(gw.running.proxy.addresses[0][1], "/Docs/Index.HTML")
    assert raw.startswith(b"HTTP/1.1 200"), raw[:100]
    assert upstream.received[-1].path_qs == "/Docs/Index.HTML"


@pytest.mark.parametrize(
    ("path", "forwarded"),
    [
        ("/public/a/..;x/b", "/public/b"),
        ("/public/a/%2e%2e;/b?q=1", "/public/b?q=1"),
        ("/public/a;jsessionid=1/b", "/public/a;jsessionid=1/b"),
    ],
)
async def test_parameters_within_one_route_reach_the_upstream_on_the_normalised_path(
    gateways: GatewayFactory, upstream: Upstream, path: str, forwarded: str
):
    gw = await gateways()
    raw = await _raw_get(gw.running.proxy.addresses[0][1], path)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:100]
    assert upstream.received[-1].path_qs == forwarded


async def test_dot_segments_within_one_route_are_resolved_and_forwarded_as_matched(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.running.proxy.addresses[0][1])
    writer.write(b"GET /public/a/../b//c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await reader.read()
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200")
    assert upstream.received[-1].path_qs == "/public/b/c"


async def test_method_query_and_body_pass_through(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways()
    body = b"x" * 100_000
    response = await gw.get("/public/items?a=1&b=2", method="PUT", data=body)
    assert response.status == 200
    seen = upstream.received[-1]
    assert (seen.method, seen.path_qs) == ("PUT", "/public/items?a=1&b=2")
    assert seen.body_sha256 == hashlib.sha256(body).hexdigest()


async def test_hop_by_hop_headers_are_removed_both_ways(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways()
    response = await gw.get(
        "/public/hop",
        headers={
            "Connection": "keep-alive, X-Client-Private",
            "X-Client-Private": "drop me",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic abc",
            "Upgrade": "websocket",
            "X-Visible": "kept",
        },
    )
    seen = {name.lower() for name in upstream.received[-1].headers}
    for header in ("x-client-private", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert header not in seen
    assert upstream.received[-1].headers["X-Visible"] == "kept"
    # And on the way back.
    assert response.headers["X-Kept"] == "yes"
    for header in ("X-Upstream-Private", "Keep-Alive", "Proxy-Authenticate"):
        assert header not in response.headers


async def test_forwarded_headers_and_request_id(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways()
    response = await gw.get(
        "/public/x",
        headers={
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Host": "evil.example",
            "X-Request-ID": "abc-123_.x",
        },
    )
    seen = upstream.received[-1].headers
    assert seen["X-Forwarded-For"] == "127.0.0.1"  # no trusted proxy: replaced, not extended
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] != "evil.example"
    assert seen["X-Request-ID"] == "abc-123_.x"
    assert response.headers["X-Request-ID"] == "abc-123_.x"


# What a client may claim about itself and its request; only a trusted proxy is believed.
_CLAIMS = [
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Forwarded-For", "198.51.100.4"),
    ("X-Real-IP", "203.0.113.9"),
    ("Forwarded", "for=203.0.113.9;proto=https"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "shop.example"),
    ("X-Forwarded-Port", "443"),
    ("X-Forwarded-Prefix", "/admin"),
    ("X-Original-URL", "/admin/users"),
    ("True-Client-IP", "203.0.113.9"),
]


@pytest.mark.parametrize("trusted", [[], ["10.0.0.0/8", "::1/128"]])
async def test_client_ip_headers_from_an_untrusted_peer_are_replaced(
    gateways: GatewayFactory, upstream: Upstream, trusted: list[str]
):
    gw = await gateways(forward={"trusted_proxies": trusted})
    # Not gw.get: its dict() would fold the two X-Forwarded-For into one.
    async with gw.http.get(gw.url + "/public/x", headers=CIMultiDict(_CLAIMS)) as response:
        assert response.status == 200
    seen = upstream.received[-1].header_list
    assert [v for k, v in seen if k.lower() == "x-forwarded-for"] == ["127.0.0.1"]
    assert [v for k, v in seen if k.lower() == "x-real-ip"] == ["127.0.0.1"]
    assert [v for k, v in seen if k.lower() == "x-forwarded-proto"] == ["http"]
    assert [v for k, v in seen if k.lower() == "x-forwarded-host"] == [gw.url.split("//")[1]]
    dropped = {"forwarded", "x-forwarded-port", "x-forwarded-prefix", "x-original-url"}
    assert not {k.lower() for k, _ in seen} & (dropped | {"true-client-ip"})


async def test_client_ip_headers_from_a_trusted_proxy_are_extended_and_pass(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways(forward={"trusted_proxies": ["127.0.0.0/8"]})
    # Not gw.get: its dict() would fold the two X-Forwarded-For into one.
    async with gw.http.get(gw.url + "/public/x", headers=CIMultiDict(_CLAIMS)) as response:
        assert response.status == 200
    seen = upstream.received[-1].header_list
    assert [v for k, v in seen if k.lower() == "x-forwarded-for"] == [
        "203.0.113.9, 198.51.100.4, 127.0.0.1"
    ]
    for name, value in _CLAIMS[2:]:
        assert [v for k, v in seen if k.lower() == name.lower()] == [value], name


async def test_a_trusted_proxy_that_sends_none_gets_ours(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways(forward={"trusted_proxies": ["127.0.0.1"]})
    assert (await gw.get("/public/x")).status == 200
    seen = upstream.received[-1].headers
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["X-Real-IP"] == "127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert "Forwarded" not in seen


@pytest.mark.parametrize(
    "name",
    [
        "X_Auth_Subject",
        "x_auth_subject",
        "X-Auth_Subject",
        "X_AUTH-SUBJECT",
        "X_Auth_Scope",
        "X_Auth_Token_Id",
        "X_Forwarded_For",
        "X_Real_IP",
        "X_Forwarded_Host",
        "X_Original_URL",
    ],
)
async def test_underscore_twins_of_our_headers_are_dropped(
    gateways: GatewayFactory, upstream: Upstream, name: str
):
    """nginx (underscores_in_headers on), WSGI and CGI upstreams read `X_Auth_Subject` as
    `X-Auth-Subject`: a client's copy would pose as the gateway's identity header."""
    gw = await gateways()
    token = gw.token(sub="alice", jti="j-1")
    headers = {name: "root", "X_Custom_Thing": "kept"}
    assert (await gw.get("/api/x", token, headers=headers)).status == 200
    seen = upstream.received[-1].header_list
    assert [k for k, _ in seen if k == name] == []
    assert "root" not in [v for _, v in seen]
    assert ("X_Custom_Thing", "kept") in seen  # not one of ours: passes
    assert [v for k, v in seen if k.lower() == "x-auth-subject"] == ["alice"]


@pytest.mark.parametrize("sent", ["bad id with spaces", "x" * 129, "a\tb", "ü"])
async def test_insane_request_id_is_replaced(
    gateways: GatewayFactory, upstream: Upstream, sent: str
):
    gw = await gateways()
    response = await gw.get("/public/x", headers={"X-Request-ID": sent})
    generated = response.headers["X-Request-ID"]
    assert generated != sent and 8 <= len(generated) <= 128
    assert upstream.received[-1].headers["X-Request-ID"] == generated


async def test_declared_body_over_max_is_413_and_not_forwarded(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways(forward={"max_body": "1KiB"})
    response = await gw.get("/public/upload", method="POST", data=b"y" * 2048)
    assert response.status == 413
    _error_body_ok(await response.json(), "payload_too_large")
    assert upstream.received == []


async def test_chunked_body_growing_past_max_is_413(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways(forward={"max_body": "64KiB"})

    async def chunks():
        for _ in range(10):
            yield b"z" * 16384

    response = await gw.get("/public/upload", method="POST", data=chunks())
    assert response.status == 413
    assert (await response.json())["reason"] == "payload_too_large"
    # The upstream never saw a complete request.
    assert all(r.body_length <= 64 * 1024 for r in upstream.received)


async def test_connect_failure_is_502(gateways: GatewayFactory, upstream: Upstream):
    closed = f"http://127.0.0.1:{free_port()}"
    gw = await gateways(routes=[{"prefix": "/", "upstream": closed, "auth": "none"}])
    response = await gw.get("/x")
    assert response.status == 502
    _error_body_ok(await response.json(), "upstream_unavailable")


async def test_slow_upstream_is_504(gateways: GatewayFactory, upstream: Upstream):
    gw = await gateways(forward={"read_timeout": "300ms"})
    response = await gw.get("/public/slow?s=1")
    assert response.status == 504
    _error_body_ok(await response.json(), "upstream_timeout")


def _upstream_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "idlegate.upstream"]


@pytest.mark.parametrize(
    ("body", "credentials"),
    [(None, ""), (b"x" * 10, ""), (None, "user:pw-secret@")],
    ids=["lean", "aiohttp", "aiohttp-credentials"],
)
async def test_a_refused_connection_is_logged_with_route_upstream_and_error(
    gateways: GatewayFactory,
    caplog: pytest.LogCaptureFixture,
    body: bytes | None,
    credentials: str,
):
    caplog.set_level(logging.WARNING, logger="idlegate.upstream")
    origin = f"http://127.0.0.1:{free_port()}"
    closed = origin.replace("://", "://" + credentials) + "/base"
    # aiohttp refuses a client Authorization next to URL credentials: that route is public.
    auth = "none" if credentials else "required"
    gw = await gateways(routes=[{"prefix": "/api/", "upstream": closed, "auth": auth}])
    token = gw.token(sub="alice")
    response = await gw.get(
        "/api/x?q=query-secret",
        None if credentials else token,
        method="POST" if body else "GET",
        data=body,
        headers={"X-Client-Note": "header-secret"},
    )
    assert response.status == 502
    (record,) = _upstream_lines(caplog)
    assert record.levelno == logging.WARNING
    text = record.getMessage()
    assert f"route=/api/ upstream={origin} reason=upstream_unavailable error=" in text
    assert "Connect call failed" in text.partition("error=")[2]  # the error's class and text
    for secret in (token, "query-secret", "header-secret", "pw-secret", "/api/x", "/base"):
        assert secret not in caplog.text


@pytest.mark.parametrize("body", [None, b"x" * 10], ids=["lean", "aiohttp"])
async def test_an_upstream_timeout_is_logged(
    gateways: GatewayFactory,
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
    body: bytes | None,
):
    caplog.set_level(logging.WARNING, logger="idlegate.upstream")
    gw = await gateways(forward={"read_timeout": "300ms"})
    response = await gw.get("/public/slow?s=1", method="POST" if body else "GET", data=body)
    assert response.status == 504
    (record,) = _upstream_lines(caplog)
    text = record.getMessage()
    assert f"route=/public/ upstream={upstream.url} reason=upstream_timeout" in text


async def test_100_upstream_failures_make_one_line(
    gateways: GatewayFactory, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="idlegate.upstream")
    closed = f"http://127.0.0.1:{free_port()}"
    gw = await gateways(routes=[{"prefix": "/", "upstream": closed, "auth": "none"}])
    statuses = [(await gw.get(f"/x/{i}")).status for i in range(100)]
    assert statuses == [502] * 100
    assert len(_upstream_lines(caplog)) == 1  # within one 10 s window


async def test_50_mib_upload_and_download_stream_intact(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways(forward={"max_body": "64MiB"})
    size = 50 * 1024 * 1024
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
    digest = hashlib.sha256()

    async def body():
        for _ in range(size // len(block)):
            digest.update(block)
            yield block

    response = await gw.http.post(gw.url + "/public/upload", data=body())
    echoed = await response.json()
    assert echoed["length"] == size and echoed["sha256"] == digest.hexdigest()

    response = await gw.http.get(gw.url + f"/public/download?n={size}")
    got = hashlib.sha256()
    received = 0
    async for chunk in response.content.iter_chunked(1 << 20):
        got.update(chunk)
        received += len(chunk)
    expected = hashlib.sha256()
    pattern = bytes(range(256)) * 1024
    for offset in range(0, size, len(pattern)):
        expected.update(pattern[: min(len(pattern), size - offset)])
    assert received == size and got.hexdigest() == expected.hexdigest()


def _raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"POST /public/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /public/smuggled HTTP/1.1\r\n\r\n",
            id="cl-and-te",
        ),
        pytest.param(
            b"POST /public/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Content-Length: 6\r\n\r\nhello!",
            id="two-content-lengths",
        ),
        pytest.param(
            b"GET /public/x HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n  b\r\n\r\n",
            id="obs-fold",
        ),
        pytest.param(
            b"GET /public/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
            id="oversized-header",
        ),
    ],
)
async def test_smuggling_shapes_are_400_and_nothing_reaches_upstream(
    gateways: GatewayFactory, upstream: Upstream, request_bytes: bytes
):
    gw = await gateways()
    port = gw.running.proxy.addresses[0][1]
    raw = await asyncio.to_thread(_raw_exchange, port, request_bytes)
    assert raw.split(b" ", 2)[1] == b"400", raw[:200]
    assert upstream.received == []


async def test_expect_100_continue_is_answered_only_for_accepted_requests(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways()
    port = gw.running.proxy.addresses[0][1]
    head = (
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        "Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.format(path="/public/upload").encode())
    assert (await reader.readline()).startswith(b"HTTP/1.1 100")
    await reader.readline()
    writer.write(b"hello")
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    writer.close()
    assert upstream.received[-1].body_length == 5

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.format(path="/api/upload").encode())  # no token
    assert (await reader.readline()).startswith(b"HTTP/1.1 401")
    writer.close()
    assert len(upstream.received) == 1


async def test_ipv6_listen_addresses_are_urls_that_work(
    gateways: GatewayFactory, upstream: Upstream
):
    # The addresses serve logs ("listening on ...") and the tests use: an IPv6 host bracketed.
    assert socket.has_ipv6
    gw = await gateways(
        listen={"host": "::1", "port": 0},
        admin={"host": "::1", "port": 0},
        forward_auth={"enabled": True, "listen": {"host": "::1", "port": 0}},
    )
    proxy, admin = gw.running.addresses()
    assert proxy.startswith("http://[::1]:") and admin.startswith("http://[::1]:")
    assert (await gw.get("/public/x")).status == 200
    async with gw.http.get(admin + "/healthz") as response:
        assert response.status == 200
    forward_auth = gw.running.forward_auth_address()
    assert forward_auth is not None and forward_auth.startswith("http://[::1]:")
    async with gw.http.get(forward_auth, headers={"X-Original-URI": "/public/x"}) as response:
        assert response.status == 200
