"""Long responses (server-sent events, long polls) on `stream_deadline: true` routes, through a
real gateway to a real upstream: cut at the token's exp and at its revocation, after the last
complete chunk, so that the client sees an incomplete response and never a complete-looking one.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import GatewayFactory
from harness import GatewayUnderTest
from prometheus_client import REGISTRY
from ws_upstream import WsUpstream

from gateway.clock import ManualClock

ADMIN_TOKEN = "stream-admin-token"


@pytest.fixture
async def events_upstream() -> AsyncIterator[WsUpstream]:
    server = WsUpstream()
    await server.start()
    yield server
    await server.stop()


async def stream_gateway(
    gateways: GatewayFactory, upstream: WsUpstream, **overrides: Any
) -> GatewayUnderTest:
    routes = [
        {"prefix": "/live/", "upstream": upstream.url, "stream_deadline": True},
        {"prefix": "/plain/", "upstream": upstream.url},
    ]
    return await gateways(routes=routes, policy={"leeway": "0s"}, **overrides)


def cuts(route: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "idlegate_stream_cuts_total", {"route": route, "reason": reason}
    )
    return value or 0.0


async def read_events(
    response: aiohttp.ClientResponse, until: asyncio.Event | None = None, after: int = 3
) -> tuple[bytes, bool]:
    """Read the body; (what arrived, whether it ended complete). Sets `until` once `after`
    events have arrived."""
    data = b""
    try:
        async with asyncio.timeout(3):
            while chunk := await response.content.readany():
                data += chunk
                if until is not None and data.count(b"\n\n") >= after:
                    until.set()
    except aiohttp.ClientPayloadError:
        return data, False
    return data, True


async def stream_past(
    gw: GatewayUnderTest, clock: ManualClock, path: str, token: str, seconds: float
) -> tuple[bytes, bool]:
    """GET `path` (200), and once events flow, move the clock `seconds` on; then read it out:
    (what arrived, whether it ended complete)."""
    async with gw.http.get(gw.url + path, headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 200
        flowing = asyncio.Event()
        reading = asyncio.create_task(read_events(response, flowing))
        await asyncio.wait_for(flowing.wait(), 2)
        clock.advance(seconds)
        return await reading


async def test_sse_is_cut_at_exp_after_the_last_complete_event(
    gateways: GatewayFactory, events_upstream: WsUpstream, clock: ManualClock
):
    gw = await stream_gateway(gateways, events_upstream)
    before = cuts("/live/", "expired")
    token = gw.token(ttl=60)
    # Past exp (leeway 0): a request would now be refused.
    data, complete = await stream_past(gw, clock, "/live/events?n=1000&every=0.05", token, 60)
    assert not complete  # no terminating chunk: the client knows the stream was cut
    assert data.endswith(b"\n\n")  # ... after the last complete event
    events = data.count(b"\n\n")
    assert 3 <= events < 100
    assert cuts("/live/", "expired") == before + 1


async def test_the_access_log_line_of_a_cut_stream_says_why_and_a_plain_one_is_plain(
    gateways: GatewayFactory, events_upstream: WsUpstream, clock: ManualClock
):
    gw = await stream_gateway(gateways, events_upstream)
    stream = io.StringIO()
    log = gw.gateway.access_log
    log._stream, log.enabled = stream, True
    token = gw.token(ttl=60, jti="cut-1")
    assert (await gw.get("/live/events?n=2", token)).status == 200  # ends by itself
    _, complete = await stream_past(gw, clock, "/live/events?n=1000&every=0.05", token, 60)
    assert not complete
    log.flush()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["route"], line["jti"], line.get("cut")) for line in lines] == [
        ("/live/", "cut-1", None),
        ("/live/", "cut-1", "expired"),
    ]
    assert token not in stream.getvalue()


async def test_a_pending_long_poll_is_refused_at_exp(
    gateways: GatewayFactory, events_upstream: WsUpstream, clock: ManualClock
):
    gw = await stream_gateway(gateways, events_upstream)
    token = gw.token(ttl=60)
    polling = asyncio.create_task(gw.get("/live/events?wait=5&n=1", token))
    await asyncio.sleep(0.3)
    assert not polling.done()
    clock.advance(61)
    response = await asyncio.wait_for(polling, 1.5)
    assert response.status == 401
    assert (await response.json())["reason"] == "expired"


async def test_a_stream_is_cut_at_revocation(
    gateways: GatewayFactory, events_upstream: WsUpstream, tmp_path: Path
):
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    gw = await stream_gateway(gateways, events_upstream, admin={"token_file": str(token_file)})
    token = gw.token(jti="stream-revoked")
    async with gw.http.get(
        gw.url + "/live/events?n=1000&every=0.05", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        flowing = asyncio.Event()
        reading = asyncio.create_task(read_events(response, flowing))
        await asyncio.wait_for(flowing.wait(), 2)
        async with gw.http.post(
            gw.admin_url + "/admin/revoke",
            json={"jti": "stream-revoked"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as revoked:
            assert revoked.status == 204
        revoked_at = asyncio.get_running_loop().time()
        data, complete = await reading
    assert not complete and data.endswith(b"\n\n")
    assert asyncio.get_running_loop().time() - revoked_at < 1.0


async def test_without_stream_deadline_a_stream_outlives_exp(
    gateways: GatewayFactory, events_upstream: WsUpstream, clock: ManualClock
):
    gw = await stream_gateway(gateways, events_upstream)
    token = gw.token(ttl=60)
    data, complete = await stream_past(gw, clock, "/plain/events?n=20&every=0.05", token, 61)
    assert complete and data.count(b"\n\n") == 20
