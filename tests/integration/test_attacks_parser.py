"""Requests the HTTP parser refuses (smuggling attempts, garbled or oversized heads), over raw
sockets: answered with the contract's JSON refusal (`malformed_http`), never with the
parser's complaint (which quotes the bytes it refused, a bearer token among them); counted;
logged as one line without the token; the connection closed; nothing upstream."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from attacks import exchange, parse, request, requests_counted
from conftest import GatewayFactory
from harness import GatewayUnderTest, Upstream


def port(gw: GatewayUnderTest) -> int:
    return int(gw.running.proxy.addresses[0][1])


async def until_closed(port: int, data: bytes) -> bytes:
    """What the gateway answers before it closes the connection (within 2 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(2.0):
            return await reader.read()  # to EOF
    finally:
        writer.close()


def malformed(token: str) -> dict[str, bytes]:
    bearer = f"Authorization: Bearer {token}"
    return {
        "control byte after the token": request("GET /api/x HTTP/1.1", f"{bearer}\x01"),
        "control byte in a query token": request(f"GET /api/x?access_token={token}\x01 HTTP/1.1"),
        "Authorization over the parser's limit": request(
            "GET /api/x HTTP/1.1", f"Authorization: Bearer {token}{'A' * 40_000}"
        ),
        "Content-Length with Transfer-Encoding": request(
            "POST /api/x HTTP/1.1",
            bearer,
            "Content-Length: 5",
            "Transfer-Encoding: chunked",
            body=b"0\r\n\r\n",
        ),
        "two Content-Lengths": request(
            "POST /api/x HTTP/1.1", bearer, "Content-Length: 1", "Content-Length: 2", body=b"ab"
        ),
        "a bare LF in the head": f"GET /api/x HTTP/1.1\r\nHost: g\n{bearer}\r\n\r\n".encode(),
    }


CASES = list(malformed("t"))


@pytest.mark.parametrize("case", CASES)
async def test_a_request_the_parser_refuses_gets_the_contracts_refusal_and_no_token_back(
    gateways: GatewayFactory, upstream: Upstream, caplog: pytest.LogCaptureFixture, case: str
):
    gw = await gateways()
    token = gw.token(jti="smuggler")
    before = requests_counted("none", "rejected", "malformed_http")
    caplog.set_level(logging.INFO)
    raw = await until_closed(port(gw), malformed(token)[case])  # and closed: TimeoutError else
    response = parse(raw)
    assert response.status == 400
    assert response.all("cache-control") == ["no-store"]
    assert len(response.all("x-request-id")[0]) == 25  # ours: the head was never read
    body = json.loads(response.body)
    assert (body["error"], body["reason"]) == ("malformed_http", "malformed_http")
    assert requests_counted("none", "rejected", "malformed_http") == before + 1
    assert upstream.received == []
    # Neither the token nor its JOSE header (the first bytes of any JWT) anywhere.
    jose_header = token.split(".")[0]
    assert jose_header.encode() not in raw
    assert not [r for r in caplog.records if jose_header in r.getMessage()]
    refused = [r for r in caplog.records if "malformed HTTP request" in r.getMessage()]
    assert refused and refused[0].levelno == logging.WARNING


async def test_forward_auth_counts_and_names_the_refusal_too(gateways: GatewayFactory):
    gw = await gateways(forward_auth={"enabled": True, "listen": {"port": 0}})
    assert gw.running.forward_auth is not None
    fa_port = int(gw.running.forward_auth.addresses[0][1])
    raw = await exchange(fa_port, malformed(gw.token())["two Content-Lengths"])
    response = parse(raw)
    assert response.status == 400
    assert response.all("x-idlegate-reason") == ["malformed_http"]
