"""Attacks on the proxy port's framing and hop-by-hop handling, with raw sockets both sides: h2c
upgrades, an upstream switching protocols unasked, `Connection` naming the gateway's own
headers, and request-body framing that a lenient hop could read two ways."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from attacks import ScriptedUpstream, exchange, parse, request, requests_counted
from conftest import GatewayFactory
from harness import GatewayUnderTest, Upstream

SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    b"\x00\x00\x00\x04\x00\x00\x00\x00\x00TUNNELLED"
)


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedUpstream]:
    server = ScriptedUpstream()
    await server.start()
    yield server
    await server.stop()


def port(gw: GatewayUnderTest) -> int:
    return int(gw.running.proxy.addresses[0][1])


async def test_h2c_upgrade_headers_never_reach_the_upstream(
    gateways: GatewayFactory, upstream: Upstream
):
    # Regression guard: Upgrade and Connection are hop-by-hop; HTTP2-Settings is
    # connection-specific (RFC 9113 §3.2.1) even when Connection does not name it.
    gw = await gateways()
    for connection in ("Connection: Upgrade, HTTP2-Settings, close", "Connection: close"):
        raw = await exchange(
            port(gw),
            request(
                "GET /api/x HTTP/1.1",
                f"Authorization: Bearer {gw.token()}",
                connection,
                "Upgrade: h2c",
                "HTTP2-Settings: AAMAAABkAAQAAP__",
            ),
        )
        assert parse(raw).status == 200
    assert len(upstream.received) == 2
    for received in upstream.received:
        names = {name.lower() for name in received.headers}
        assert not names & {"upgrade", "http2-settings", "connection"}, received.headers


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(("GET /raw/x HTTP/1.1", "Connection: close"), id="bodyless-lean-pool"),
        pytest.param(
            ("POST /raw/x HTTP/1.1", "Connection: close", "Content-Length: 5"), id="body-aiohttp"
        ),
        pytest.param(
            (
                "POST /raw/x HTTP/1.1",
                "Connection: Upgrade, HTTP2-Settings, close",
                "Upgrade: h2c",
                "HTTP2-Settings: AAMAAABkAAQAAP__",
                "Content-Length: 5",
            ),
            id="h2c-with-body",
        ),
    ],
)
async def test_upstream_switching_protocols_unasked_is_502_and_nothing_is_relayed(
    gateways: GatewayFactory, scripted: ScriptedUpstream, sent: tuple[str, ...]
):
    # Finding (requests with a body): aiohttp's client hands a 101 over as a response, and the
    # relay passed it on: the client's connection became a tunnel to the upstream.
    scripted.reply, scripted.linger = SWITCH, 0.3
    gw = await gateways(routes=[{"prefix": "/raw/", "upstream": scripted.url, "auth": "none"}])
    before = requests_counted("/raw/", "error", "upstream_unavailable")
    body = b"hello" if "Content-Length: 5" in sent else b""
    raw = await exchange(port(gw), request(*sent, body=body))
    response = parse(raw)
    assert response.status == 502, raw[:300]
    assert b"TUNNELLED" not in raw and b"101" not in raw.split(b"\r\n", 1)[0]
    assert not response.all("upgrade")
    assert requests_counted("/raw/", "error", "upstream_unavailable") == before + 1


async def test_connection_cannot_strip_or_keep_the_gateways_own_headers(
    gateways: GatewayFactory, upstream: Upstream
):
    # Regression guard: what Connection names is dropped from the client's headers only; the
    # identity, X-Request-ID and X-Forwarded-For are the gateway's, added after.
    gw = await gateways()
    raw = await exchange(
        port(gw),
        request(
            "GET /api/x HTTP/1.1",
            f"Authorization: Bearer {gw.token(sub='alice', jti='conn-1')}",
            "Connection: close, X-Auth-Subject, X-Auth-Token-Id, X-Request-ID, X-Forwarded-For, "
            "Host",
            "X-Auth-Subject: mallory",
            "X-Forwarded-For: 10.6.6.6",
        ),
    )
    assert parse(raw).status == 200
    (received,) = upstream.received
    assert [v for k, v in received.header_list if k == "X-Auth-Subject"] == ["alice"]
    assert received.headers["X-Auth-Token-Id"] == "conn-1"
    assert received.headers["X-Forwarded-For"] == "127.0.0.1"
    assert received.headers["X-Request-ID"]
    assert received.headers["Host"] == f"127.0.0.1:{upstream.port}"


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param(("Connection: close, Content-Length", "Content-Length: 5"), id="cl-named"),
        pytest.param(
            ("Connection: close, Transfer-Encoding", "Transfer-Encoding: chunked"), id="te-named"
        ),
    ],
)
async def test_connection_naming_the_framing_headers_keeps_the_body_whole(
    gateways: GatewayFactory, scripted: ScriptedUpstream, framing: tuple[str, ...]
):
    # Regression guard: the gateway frames the body it forwards itself; naming the client's
    # framing header in Connection changes nothing upstream.
    gw = await gateways(routes=[{"prefix": "/raw/", "upstream": scripted.url, "auth": "none"}])
    body = b"5\r\nhello\r\n0\r\n\r\n" if "chunked" in framing[1] else b"hello"
    raw = await exchange(port(gw), request("POST /raw/x HTTP/1.1", *framing, body=body))
    assert parse(raw).status == 200
    (received,) = scripted.received
    head, _, sent_body = received.partition(b"\r\n\r\n")
    assert sent_body in (b"hello", b"5\r\nhello\r\n0\r\n\r\n")
    assert head.lower().count(b"content-length") + head.lower().count(b"transfer-encoding") == 1


_SMUGGLED = b"GET /raw/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param(("Content-Length: 4", "Transfer-Encoding: chunked"), id="cl-and-te"),
        pytest.param(("Transfer-Encoding: chunked", "Transfer-Encoding: identity"), id="te-te"),
        pytest.param(("Transfer-Encoding: xchunked",), id="te-unknown"),
        pytest.param(("Transfer-Encoding: gzip, chunked",), id="te-gzip-chunked"),
        pytest.param(("Content-Length: 5", "Content-Length: 6"), id="cl-cl"),
        pytest.param(("Content-Length: 5, 5",), id="cl-list"),
        pytest.param(("Content-Length: +5",), id="cl-plus"),
    ],
)
async def test_ambiguous_request_framing_is_refused_and_nothing_reaches_the_upstream(
    gateways: GatewayFactory, scripted: ScriptedUpstream, framing: tuple[str, ...]
):
    # Guards, except te-gzip-chunked (a finding): aiohttp's parser accepted `gzip, chunked`,
    # and the body went upstream still gzip-coded but declared as nothing (the coding is
    # hop-by-hop): refused now, as `unsupported_transfer_coding`.
    gw = await gateways(routes=[{"prefix": "/raw/", "upstream": scripted.url, "auth": "none"}])
    body = b"5\r\nhello\r\n0\r\n\r\n" + _SMUGGLED
    raw = await exchange(port(gw), request("POST /raw/x HTTP/1.1", *framing, body=body))
    assert parse(raw).status == 400, raw[:300]
    assert scripted.received == []


async def test_chunked_body_in_http_1_0_is_refused(
    gateways: GatewayFactory, scripted: ScriptedUpstream
):
    # Finding: RFC 9112 §6.1, Transfer-Encoding in HTTP/1.0 is faulty framing; aiohttp
    # de-chunked it and the request was forwarded.
    gw = await gateways(routes=[{"prefix": "/raw/", "upstream": scripted.url, "auth": "none"}])
    before = requests_counted("/raw/", "rejected", "unsupported_transfer_coding")
    raw = await exchange(
        port(gw),
        request(
            "POST /raw/x HTTP/1.0", "Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n"
        ),
    )
    assert parse(raw).status == 400
    assert scripted.received == []
    assert requests_counted("/raw/", "rejected", "unsupported_transfer_coding") == before + 1


async def test_every_connection_header_counts_whatever_was_seen_before(
    gateways: GatewayFactory, upstream: Upstream
):
    """What a request loses is planned once per set of header names (forward/headers.py);
    a request with the same names must still lose what its own Connection headers name,
    the second of two included."""
    gw = await gateways()
    token = gw.token()
    for second in ("keep-alive", "X-Private-Hop"):
        raw = await exchange(
            port(gw),
            request(
                "GET /api/x HTTP/1.1",
                f"Authorization: Bearer {token}",
                "Connection: keep-alive",
                f"Connection: {second}",
                "X-Private-Hop: for the next hop only",
                "Connection: close",
            ),
        )
        assert parse(raw).status == 200
    first, then = upstream.received
    assert first.headers["X-Private-Hop"] == "for the next hop only"
    assert "X-Private-Hop" not in then.headers
