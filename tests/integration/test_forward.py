"""The forwarding path through a real gateway, over both transports: upstream URLs with
credentials, and failures after the response head was relayed."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from conftest import GatewayFactory
from harness import Upstream


@pytest.mark.parametrize("body", [None, b"x" * 10], ids=["bodyless", "with-body"])
@pytest.mark.parametrize("auth", ["required", "none"])
async def test_upstream_url_credentials_win_over_the_clients_authorization(
    gateways: GatewayFactory, upstream: Upstream, body: bytes | None, auth: str
):
    credentialed = upstream.url.replace("://", "://svc:pw-secret@")
    gw = await gateways(routes=[{"prefix": "/api/", "upstream": credentialed, "auth": auth}])
    token = gw.token(sub="alice")
    headers = {} if auth == "required" else {"Authorization": "Basic Y2xpZW50OnNlY3JldA=="}
    response = await gw.get(
        "/api/x",
        token if auth == "required" else None,
        method="POST" if body else "GET",
        data=body,
        headers=headers,
    )
    assert response.status == 200, await response.text()
    received = upstream.received[-1].header_list
    expected = "Basic " + base64.b64encode(b"svc:pw-secret").decode()
    assert [v for k, v in received if k.lower() == "authorization"] == [expected]
    if auth == "required":
        assert received and dict(received)["X-Auth-Subject"] == "alice"


async def _serve_once(
    head: bytes, then: bytes, *, stall: float
) -> tuple[asyncio.Server, set[asyncio.Task[None]]]:
    """An upstream that reads a request, sends `head` + `then`, waits `stall` s and closes."""
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            for line in request.lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    await reader.readexactly(int(line.partition(b":")[2]))
            writer.write(head + then)
            await writer.drain()
            await asyncio.sleep(stall)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, handlers


@pytest.fixture
async def breaking() -> AsyncIterator[dict[str, object]]:
    state: dict[str, object] = {}
    yield state
    server = state.get("server")
    if isinstance(server, asyncio.Server):
        server.close()
    handlers = state.get("handlers")
    if isinstance(handlers, set):
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


@pytest.mark.parametrize("body", [None, b"x" * 10], ids=["lean", "aiohttp"])
@pytest.mark.parametrize(
    ("stall", "reason"),
    [(0.0, "upstream_unavailable"), (2.0, "upstream_timeout")],
    ids=["closed", "stalled"],
)
async def test_a_response_breaking_off_after_its_head_went_out_is_logged(
    gateways: GatewayFactory,
    caplog: pytest.LogCaptureFixture,
    breaking: dict[str, object],
    body: bytes | None,
    stall: float,
    reason: str,
):
    caplog.set_level(logging.WARNING, logger="idlegate.upstream")
    # Over 64 KiB, so streamed: the head is relayed before the body is complete.
    server, handlers = await _serve_once(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"y" * 10, stall=stall
    )
    breaking.update(server=server, handlers=handlers)
    origin = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    gw = await gateways(
        routes=[{"prefix": "/raw/", "upstream": origin, "auth": "none"}],
        forward={"read_timeout": "300ms"},
    )
    async with gw.http.request(
        "POST" if body else "GET", gw.url + "/raw/cut?q=query-secret", data=body
    ) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    for _ in range(50):  # the gateway logs as it cuts the client connection
        lines = [r.getMessage() for r in caplog.records if r.name == "idlegate.upstream"]
        if lines:
            break
        await asyncio.sleep(0.02)
    (line,) = lines
    assert f"route=/raw/ upstream={origin} reason={reason} " in line
    assert "the response broke off after its head" in line
    assert "query-secret" not in caplog.text and "/raw/cut" not in caplog.text


async def test_no_free_upstream_connection_within_connect_timeout_is_502_and_logged(
    gateways: GatewayFactory, upstream: Upstream, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="idlegate.upstream")
    gw = await gateways(forward={"pool_size": 1, "connect_timeout": "200ms"})
    holding = asyncio.ensure_future(gw.get("/public/slow?s=1"))
    await asyncio.sleep(0.1)
    started = asyncio.get_running_loop().time()
    response = await gw.get("/public/queued")
    assert response.status == 502
    body = await response.json()
    assert body["reason"] == "upstream_unavailable"
    assert body["message"] == "no upstream connection came free in time"
    assert asyncio.get_running_loop().time() - started < 0.8
    assert (await holding).status == 200
    (line,) = [r.getMessage() for r in caplog.records if r.name == "idlegate.upstream"]
    assert "route=/public/" in line and "UpstreamPoolTimeout" in line
    assert "connect_timeout 0.2s" in line


async def test_a_connect_timeout_on_the_aiohttp_transport_logs_no_request_url(
    gateways: GatewayFactory, upstream: Upstream, caplog: pytest.LogCaptureFixture
):
    # aiohttp's ConnectionTimeoutError names the request's URL, query included.
    caplog.set_level(logging.WARNING, logger="idlegate.upstream")
    gw = await gateways(forward={"pool_size": 1, "connect_timeout": "200ms"})
    holding = asyncio.ensure_future(gw.get("/public/slow?s=1", method="POST", data=b"x"))
    await asyncio.sleep(0.1)
    response = await gw.get("/public/queued?q=query-secret", method="POST", data=b"x")
    assert response.status == 502
    assert (await holding).status == 200
    (line,) = [r.getMessage() for r in caplog.records if r.name == "idlegate.upstream"]
    assert "route=/public/" in line and "connect_timeout 0.2s" in line
    assert "query-secret" not in caplog.text and "/queued" not in caplog.text
