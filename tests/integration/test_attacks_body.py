"""A second token in a form-encoded body (RFC 6750 §2.2), next to the verified one in the header:
refused like one in the query, since the upstream might use it instead (found by the third
probe: `access_token=<revoked>&amount=100` was forwarded)."""

from __future__ import annotations

import gzip
import hashlib
import logging
import zlib
from collections.abc import AsyncIterator

import pytest
from attacks import requests_counted
from conftest import GatewayFactory
from harness import Upstream

FORM = "application/x-www-form-urlencoded"
FILLER = b"note=" + b"x" * 200_000  # past the 64 KiB read whole: the body streams


@pytest.mark.parametrize(
    "body",
    [
        pytest.param("access_token={t}&amount=100", id="plain"),
        pytest.param("amount=100&access_token={t}", id="last"),
        pytest.param("amount=100;access_token={t}", id="semicolon-separated"),
        pytest.param("ACCESS_TOKEN={t}&amount=100", id="upper-case"),
        pytest.param("access%5Ftoken={t}&amount=100", id="percent-encoded"),
        pytest.param("access.token={t}", id="php-dot"),
        pytest.param("access_token[]={t}", id="php-array"),
        # PHP reads an unclosed `[` as `_` and ends a name at a NUL (fourth probe).
        pytest.param("access[token={t}", id="php-unclosed-bracket"),
        pytest.param("access%5Btoken={t}", id="php-unclosed-bracket-encoded"),
        pytest.param("access_token%00x={t}", id="php-nul"),
        pytest.param("amount=100&access_token+%00={t}", id="php-nul-after-a-space"),
    ],
)
@pytest.mark.parametrize("content_type", [FORM, "Application/X-WWW-Form-URLEncoded; charset=UTF-8"])
async def test_a_token_in_a_form_body_is_refused_however_it_is_spelled(
    gateways: GatewayFactory, upstream: Upstream, body: str, content_type: str
):
    gw = await gateways()
    refused = requests_counted("/api/", "rejected", "malformed_request")
    revoked_elsewhere = gw.token(sub="bob")
    response = await gw.get(
        "/api/transfer",
        gw.token(sub="alice"),
        method="POST",
        data=body.format(t=revoked_elsewhere).encode(),
        headers={"Content-Type": content_type},
    )
    assert response.status == 400
    answer = await response.json()
    assert (answer["reason"], answer["error"]) == ("malformed_request", "invalid_request")
    assert "body" in answer["message"]
    assert upstream.received == []
    assert requests_counted("/api/", "rejected", "malformed_request") == refused + 1


async def _streamed(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_token_deep_in_a_streamed_form_body_is_refused_before_the_body_ends(
    gateways: GatewayFactory, upstream: Upstream, caplog: pytest.LogCaptureFixture, framing: str
):
    """Past the part read whole, the body is judged as it streams: the upstream connection
    is aborted at the piece holding the parameter, so no complete request reaches it."""
    gw = await gateways()
    body = FILLER + b"&access_token=" + gw.token(sub="bob").encode() + b"&amount=100"
    data = body if framing == "content-length" else _streamed(body[:70_000], body[70_000:])
    response = await gw.get(
        "/api/transfer", gw.token(), method="POST", data=data, headers={"Content-Type": FORM}
    )
    assert response.status == 400
    assert (await response.json())["reason"] == "malformed_request"
    assert [r for r in upstream.received if r.body_length == len(body)] == []
    # The gateway's own log (the test upstream's server logs the body it lost, as it should).
    assert [
        r for r in caplog.records if r.name.startswith("idlegate") and r.levelno >= logging.ERROR
    ] == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"amount=100&next_token=abc&token_type=bearer", id="token-like-names"),
        pytest.param(b"comment=access_token%3Dabc&x=access_token", id="in-values"),
        pytest.param(b"", id="empty"),
        pytest.param(FILLER + b"&amount=100", id="streamed"),
    ],
)
async def test_a_form_body_without_a_token_parameter_is_forwarded_whole(
    gateways: GatewayFactory, upstream: Upstream, body: bytes
):
    gw = await gateways()
    response = await gw.get(
        "/api/transfer", gw.token(), method="POST", data=body, headers={"Content-Type": FORM}
    )
    assert response.status == 200
    (received,) = upstream.received
    assert received.body_sha256 == hashlib.sha256(body).hexdigest()


async def test_a_json_body_that_mentions_access_token_is_forwarded(
    gateways: GatewayFactory, upstream: Upstream
):
    """Only a form-encoded body carries RFC 6750 §2.2 tokens: other media types pass as sent."""
    gw = await gateways()
    body = b'{"access_token": "abc", "amount": 100}'
    for content_type in ("application/json", "text/plain", "multipart/form-data; boundary=x"):
        response = await gw.get(
            "/api/transfer",
            gw.token(),
            method="POST",
            data=body,
            headers={"Content-Type": content_type},
        )
        assert response.status == 200, content_type
    assert [r.body_sha256 for r in upstream.received] == [hashlib.sha256(body).hexdigest()] * 3


async def test_a_public_route_forwards_a_form_body_token_as_the_query_rule_does(
    gateways: GatewayFactory, upstream: Upstream
):
    """On a route without auth the gateway verifies no token, so none is second to it: the
    upstream's own authentication may read one from the body (or the query)."""
    gw = await gateways()
    body = b"access_token=abc&amount=100"
    response = await gw.get(
        "/public/login", method="POST", data=body, headers={"Content-Type": FORM}
    )
    assert response.status == 200
    assert upstream.received[0].body_sha256 == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"Content-Encoding": "gzip"}, gzip.compress(b"access_token=T&amount=1")),
        ({"Content-Encoding": "deflate"}, zlib.compress(b"access_token=T&amount=1")),
        ({"Content-Encoding": "identity, br"}, b"amount=1"),
        ({"Content-Type": FORM + "; charset=utf-16le"}, "access_token=T".encode("utf-16le")),
        ({"Content-Type": FORM + '; charset="UTF-7"'}, b"access+AF8-token=T"),
        ({"Content-Type": FORM + "; charset=no-such-charset"}, b"amount=1"),
        ({"Content-Type": FORM + "; charset=ISO-2022-JP"}, b"acc\x1b(Bess_token=T"),
        ({"Content-Type": FORM + "; charset=raw_unicode_escape"}, b"acc\\u0065ss_token=T"),
    ],
    ids=[
        *("gzip", "deflate", "br-listed", "utf-16le", "utf-7", "unknown-charset"),
        *("iso-2022-jp-escape", "raw-unicode-escape"),
    ],
)
async def test_a_form_body_the_scan_cannot_read_is_refused_from_its_head(
    gateways: GatewayFactory, upstream: Upstream, headers: dict[str, str], body: bytes
):
    # Fourth probe: Express inflates compressed forms, ASP.NET Core decodes the declared
    # charset; the scan reads raw bytes, so such a body carried a token past it.
    gw = await gateways()
    sent = {"Content-Type": FORM, **headers}
    response = await gw.get("/api/x", gw.token(), method="POST", data=body, headers=sent)
    assert response.status == 400
    assert (await response.json())["reason"] == "malformed_request"
    assert upstream.received == []


@pytest.mark.parametrize("charset", ["utf-8", "ISO-8859-1", "windows-1252", "shift_jis"])
async def test_form_bodies_in_ascii_transparent_charsets_pass(
    gateways: GatewayFactory, upstream: Upstream, charset: str
):
    gw = await gateways()
    sent = {"Content-Type": f"{FORM}; charset={charset}"}
    response = await gw.get("/api/x", gw.token(), method="POST", data=b"amount=1", headers=sent)
    assert response.status == 200
    assert upstream.received[-1].body_length == len(b"amount=1")


async def test_compressed_bodies_of_other_types_and_public_forms_pass(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways()
    packed = gzip.compress(b'{"access_token": "T"}')
    json_gzip = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    response = await gw.get("/api/x", gw.token(), method="POST", data=packed, headers=json_gzip)
    assert response.status == 200
    form_gzip = {"Content-Type": FORM, "Content-Encoding": "gzip"}
    response = await gw.get("/public/x", method="POST", data=packed, headers=form_gzip)
    assert response.status == 200
    assert len(upstream.received) == 2
