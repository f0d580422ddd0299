"""A second token in the query, spelled so that the gateway and an upstream disagree on whether
it is there: the gateway verifies the header's token, the upstream would use the query's."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from conftest import GatewayFactory
from harness import Upstream

from gateway.clock import ManualClock


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("access_token={t}", id="plain"),
        pytest.param("a=1;access_token={t}", id="semicolon-separated"),
        pytest.param("ACCESS_TOKEN={t}", id="upper-case"),
        pytest.param("access.token={t}", id="php-dot"),
        pytest.param("access+token={t}", id="php-space"),
        pytest.param("access_token[]={t}", id="php-array"),
        pytest.param("access[token={t}", id="php-unclosed-bracket"),
        pytest.param("access%5Btoken={t}", id="php-unclosed-bracket-encoded"),
        pytest.param("access_token%00x={t}", id="php-nul"),
        pytest.param("access_token%00={t}", id="php-nul-at-the-end"),
        pytest.param("access%5Ftoken={t}", id="percent-encoded"),
    ],
)
async def test_a_token_in_the_query_is_refused_however_it_is_spelled(
    gateways: GatewayFactory, upstream: Upstream, clock: ManualClock, query: str
):
    # Findings but for `plain` (and `percent-encoded` on the proxy port, whose query aiohttp
    # decodes; forward-auth's X-Original-URI is raw): ASP.NET reads the query case-blind, PHP
    # reads `.`, space and an unclosed `[` as `_`, `[]` as an array and a NUL as the end of the
    # name, older parsers split on `;`.
    gw = await gateways(forward_auth={"enabled": True})
    revoked_elsewhere = gw.token(sub="bob")
    target = "/api/x?" + query.format(t=revoked_elsewhere)
    response = await gw.get(target, gw.token(sub="alice"))
    assert response.status == 400
    assert (await response.json())["reason"] == "malformed_request"
    assert upstream.received == []
    # The edge proxy's raw X-Original-URI is judged the same way.
    response = await gw.get(
        "/.idlegate/auth",
        gw.token(sub="alice"),
        headers={"X-Original-URI": "/api/x?" + quote(query.format(t="x"), safe="=&;[]+%")},
    )
    assert response.status == 400, response.headers


async def test_other_parameters_that_contain_token_pass(
    gateways: GatewayFactory, upstream: Upstream
):
    gw = await gateways()
    response = await gw.get("/api/x?next_token=abc&token_type=x", gw.token())
    assert response.status == 200
    (received,) = upstream.received
    assert received.path_qs == "/api/x?next_token=abc&token_type=x"
