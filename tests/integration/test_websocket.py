"""WebSockets through a real gateway (in process, on real sockets) to a real aiohttp WebSocket
upstream, with a real aiohttp client: the relay itself, and each deadline that closes it.

Time: the gateways run on the injected ManualClock, so a deadline is reached by advancing it;
the deadline ticker (0.25 s of real time) then closes the socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import GatewayFactory, RedisServer
from harness import GatewayUnderTest
from prometheus_client import REGISTRY
from ws_upstream import WsUpstream

from gateway.clock import ManualClock

ADMIN_TOKEN = "ws-admin-token"
# The ticker checks every 0.25 s; a close is expected within this much real time.
CLOSE_WITHIN = 1.5


def ws_routes(url: str, **ws_route: Any) -> list[dict[str, Any]]:
    return [
        {"prefix": "/ws/", "upstream": url, "websocket": True, **ws_route},
        {"prefix": "/api/", "upstream": url},
        {"prefix": "/open/", "upstream": url, "auth": "none", "websocket": True},
    ]


async def ws_gateway(
    gateways: GatewayFactory, ws_upstream: WsUpstream, **overrides: Any
) -> GatewayUnderTest:
    route = overrides.pop("ws_route", {})
    overrides.setdefault("forward", {})
    overrides["forward"] = {
        "websocket_activity_interval": "500ms",
        "websocket_max_message": "64KiB",
        **overrides["forward"],
    }
    return await gateways(routes=ws_routes(ws_upstream.url, **route), **overrides)


def closes(route: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "idlegate_websocket_closes_total", {"route": route, "reason": reason}
    )
    return value or 0.0


async def eventually(check: Any, timeout: float = 2.0) -> None:
    """Poll `check()` until true: the gateway counts a close once both sides are closed."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


def open_sockets() -> float:
    return REGISTRY.get_sample_value("idlegate_websockets_open") or 0.0


async def connect(
    gw: GatewayUnderTest, path: str, token: str | None, **kwargs: Any
) -> aiohttp.ClientWebSocketResponse:
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return await gw.http.ws_connect(gw.url + path, headers=headers, autoping=False, **kwargs)


async def closed_with(
    ws: aiohttp.ClientWebSocketResponse, timeout: float = CLOSE_WITHIN
) -> tuple[int | None, str]:
    """Read until the gateway's close frame; (code, reason)."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.CLOSE:
                return msg.data, msg.extra or ""
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return ws.close_code, "(no close frame)"


async def still_open(ws: aiohttp.ClientWebSocketResponse, seconds: float = 0.6) -> None:
    """Over `seconds` of real time (more than two ticks) nothing closed the socket, and it still
    relays a message both ways."""
    await asyncio.sleep(seconds)
    assert not ws.closed
    await ws.send_str("still there?")
    msg = await asyncio.wait_for(ws.receive(), 2)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, "still there?")


# -- the relay -------------------------------------------------------------------------------


async def test_messages_subprotocol_and_handshake_headers_are_relayed(
    gateways: GatewayFactory, ws_upstream: WsUpstream
):
    gw = await ws_gateway(gateways, ws_upstream)
    token = gw.token(sub="alice", jti="ws-relay-1")
    ws = await connect(
        gw,
        "/ws/chat?room=7",
        token,
        protocols=("nope", "chat.v1"),
        headers={"X-Auth-Subject": "mallory", "X-Request-ID": "req-ws-1"},
    )
    assert ws.protocol == "chat.v1"  # offered to the upstream, its choice passed back
    await ws.send_str("hello")
    assert (await ws.receive()).data == "hello"
    await ws.send_bytes(b"\x00\x01binary")
    msg = await ws.receive()
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.BINARY, b"\x00\x01binary")
    await ws.close()

    (handshake,) = ws_upstream.handshakes
    assert handshake["path"] == "/ws/chat?room=7"
    assert handshake["X-Auth-Subject"] == "alice"  # the client's copy was stripped
    assert handshake["X-Auth-Token-Id"] == "ws-relay-1"
    assert handshake["X-Request-ID"] == "req-ws-1"
    assert handshake["X-Forwarded-For"] == "127.0.0.1"
    assert handshake["Sec-WebSocket-Protocol"] == "nope,chat.v1"


async def test_close_codes_and_reasons_pass_through_both_ways(
    gateways: GatewayFactory, ws_upstream: WsUpstream
):
    gw = await ws_gateway(gateways, ws_upstream)
    before = closes("/ws/", "client_closed")
    ws = await connect(gw, "/ws/a", gw.token())
    await ws.close(code=4000, message=b"client says bye")
    await asyncio.wait_for(ws_upstream.closed.wait(), 2)
    assert ws_upstream.closes == [(4000, "client says bye")]
    assert closes("/ws/", "client_closed") == before + 1

    ws_upstream.closed.clear()
    before = closes("/ws/", "upstream_closed")
    ws = await connect(gw, "/ws/b", gw.token())
    await ws.send_str("close:4001:upstream is done")
    assert await closed_with(ws) == (4001, "upstream is done")
    await ws.close()
    await eventually(lambda: closes("/ws/", "upstream_closed") == before + 1)


async def test_pings_and_pongs_pass_through(gateways: GatewayFactory, ws_upstream: WsUpstream):
    gw = await ws_gateway(gateways, ws_upstream)
    ws = await connect(gw, "/ws/p", gw.token())
    await ws.ping(b"from-client")
    msg = await asyncio.wait_for(ws.receive(), 2)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.PONG, b"from-client")  # the upstream's
    assert ws_upstream.pings == [b"from-client"]
    await ws.send_str("ping-me")
    msg = await asyncio.wait_for(ws.receive(), 2)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.PING, b"from-upstream")
    await ws.pong(b"from-upstream")
    await ws.send_str("sync")
    assert (await ws.receive()).data == "sync"
    assert ws_upstream.pongs == [b"from-upstream"]
    await ws.close()


async def test_messages_over_the_limit_close_with_1009(
    gateways: GatewayFactory, ws_upstream: WsUpstream
):
    gw = await ws_gateway(gateways, ws_upstream, forward={"websocket_max_message": "1KiB"})
    ws = await connect(gw, "/ws/big", gw.token())
    await ws.send_str("x" * 1000)
    assert len((await ws.receive()).data) == 1000
    await ws.send_str("x" * 2000)  # from the client: over 1 KiB
    assert (await closed_with(ws))[0] == 1009
    await asyncio.wait_for(ws_upstream.closed.wait(), 2)
    assert ws_upstream.closes == [(1001, "message_too_big")]

    ws = await connect(gw, "/ws/big", gw.token())
    await ws.send_str("big:5000")  # from the upstream: over 1 KiB
    assert await closed_with(ws) == (1009, "message_too_big")


async def test_upgrade_on_a_route_without_websocket_is_refused(
    gateways: GatewayFactory, ws_upstream: WsUpstream
):
    gw = await ws_gateway(gateways, ws_upstream)
    before = REGISTRY.get_sample_value(
        "idlegate_requests_total",
        {"route": "/api/", "decision": "rejected", "reason": "websocket_not_enabled"},
    )
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await connect(gw, "/api/chat", gw.token())
    assert refused.value.status == 400
    response = await gw.get(
        "/api/chat",
        gw.token(),
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        },
    )
    assert response.status == 400
    assert (await response.json())["reason"] == "websocket_not_enabled"
    assert ws_upstream.handshakes == []
    after = REGISTRY.get_sample_value(
        "idlegate_requests_total",
        {"route": "/api/", "decision": "rejected", "reason": "websocket_not_enabled"},
    )
    assert after == (before or 0) + 2


async def test_handshake_is_authorised_like_any_request(
    gateways: GatewayFactory, ws_upstream: WsUpstream
):
    gw = await ws_gateway(gateways, ws_upstream, ws_route={"scopes": ["chat"]})
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await connect(gw, "/ws/x", None)
    assert refused.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await connect(gw, "/ws/x", gw.token(scope="read"))
    assert refused.value.status == 403
    assert ws_upstream.handshakes == []
    ws = await connect(gw, "/ws/x", gw.token(scope="chat"))
    await ws.close()
    # A public websocket route needs no token (and has no token deadlines).
    ws = await connect(gw, "/open/x", None)
    await ws.send_str("hi")
    assert (await ws.receive()).data == "hi"
    await ws.close()


async def test_upstream_refusing_the_handshake_is_502(
    gateways: GatewayFactory, ws_upstream: WsUpstream
):
    gw = await ws_gateway(gateways, ws_upstream)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await connect(gw, "/ws/refuse", gw.token())
    assert refused.value.status == 502
    response = await gw.get(
        "/ws/refuse",
        gw.token(),
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        },
    )
    body = await response.json()
    assert body["reason"] == "upstream_unavailable"
    assert "403" in body["message"]


# -- deadlines -------------------------------------------------------------------------------


async def test_closed_1008_expired_at_exp_plus_leeway(
    gateways: GatewayFactory, ws_upstream: WsUpstream, clock: ManualClock
):
    gw = await ws_gateway(gateways, ws_upstream, policy={"leeway": "5s"})
    before = closes("/ws/", "expired")
    ws = await connect(gw, "/ws/exp", gw.token(ttl=60))
    assert open_sockets() == 1
    clock.advance(64)  # exp + 4 s: within the leeway, as for requests
    await still_open(ws)
    clock.advance(1)  # exp + leeway: a request would now be refused `expired`
    assert await closed_with(ws) == (1008, "expired")
    await asyncio.wait_for(ws_upstream.closed.wait(), 2)
    assert ws_upstream.closes == [(1001, "expired")]
    await eventually(lambda: closes("/ws/", "expired") == before + 1 and open_sockets() == 0)


async def test_closed_1008_session_too_old_at_max_session_age(
    gateways: GatewayFactory, ws_upstream: WsUpstream, clock: ManualClock
):
    gw = await ws_gateway(gateways, ws_upstream, policy={"leeway": "0s", "max_session_age": "1h"})
    token = gw.token(ttl=600, auth_time=int(clock.now()) - 3600 + 120)
    ws = await connect(gw, "/ws/age", token)
    clock.advance(110)
    await still_open(ws)
    clock.advance(11)
    assert await closed_with(ws) == (1008, "session_too_old")


async def test_closed_1008_idle_timeout_without_client_messages(
    gateways: GatewayFactory, ws_upstream: WsUpstream, clock: ManualClock
):
    gw = await ws_gateway(gateways, ws_upstream, policy={"idle_timeout": "2s"})
    token = gw.token()
    ws = await connect(gw, "/ws/idle", token)
    # Client messages are activity: 1.5 s apart, 4 times, well past one idle timeout in all.
    for _ in range(4):
        clock.advance(1.5)
        await still_open(ws, 0.3)
    # Upstream messages and the client's control frames are not activity.
    await ws.send_str("ping-me")  # a client message (activity), then the upstream pings
    assert (await ws.receive()).type is aiohttp.WSMsgType.PING
    clock.advance(1.5)
    await ws.pong(b"from-upstream")
    clock.advance(0.5)  # 2.0 s since the last client message: not yet idle (strictly more)
    await asyncio.sleep(0.6)
    assert not ws.closed
    clock.advance(0.1)
    assert await closed_with(ws) == (1008, "idle_timeout")
    # ... and the token is idle for requests too: the store says so.
    response = await gw.get("/api/x", token)
    assert (response.status, (await response.json())["reason"]) == (401, "idle_timeout")


async def test_activity_writes_are_coalesced_per_interval(
    gateways: GatewayFactory, ws_upstream: WsUpstream, clock: ManualClock
):
    gw = await ws_gateway(gateways, ws_upstream, forward={"websocket_activity_interval": "10s"})
    store = gw.gateway.store
    writes: list[float] = []
    original = store.check_and_touch

    async def counting(touch: Any) -> Any:
        if touch.extend:
            writes.append(touch.now)
        return await original(touch)

    store.check_and_touch = counting  # type: ignore[method-assign]
    ws = await connect(gw, "/ws/c", gw.token())  # the handshake: one write
    for _ in range(20):  # 20 messages over 4 s of clock time: inside one interval
        clock.advance(0.2)
        await ws.send_str("m")
        await ws.receive()
    await asyncio.sleep(0.5)
    assert len(writes) == 2  # the handshake, then the first message (the interval's lead)
    clock.advance(6.5)  # the interval since that write is over: the latest message is written
    await asyncio.sleep(0.5)
    assert len(writes) == 3
    assert writes[2] == pytest.approx(writes[1] + 3.8)  # the time of the last message
    await ws.close()


async def test_activity_at_another_replica_keeps_it_open_and_revocation_reaches_it(
    gateways: GatewayFactory, ws_upstream: WsUpstream, redis_server: RedisServer,
    clock: ManualClock, tmp_path: Path,
):  # fmt: skip
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN)
    shared = {"store_url": redis_server.url, "policy": {"idle_timeout": "2s"}}
    one = await ws_gateway(gateways, ws_upstream, **shared)
    two = await ws_gateway(gateways, ws_upstream, admin={"token_file": str(token_file)}, **shared)
    token = one.token(jti="ws-two-replicas")
    ws = await connect(one, "/ws/r", token)
    # No client message on the socket; requests at the other replica keep the token active.
    for _ in range(4):
        clock.advance(1.5)
        assert (await two.get("/api/keepalive", token)).status == 200
        await asyncio.sleep(0.3)
        assert not ws.closed
    await still_open(ws, 0.3)
    # Revoked at replica two: replica one closes the socket within 1 s.
    async with two.http.post(
        two.admin_url + "/admin/revoke",
        json={"jti": "ws-two-replicas"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as response:
        assert response.status == 204
    assert await closed_with(ws, timeout=1.0) == (1008, "revoked")


async def test_idle_at_every_replica_closes_it(
    gateways: GatewayFactory, ws_upstream: WsUpstream, redis_server: RedisServer,
    clock: ManualClock,
):  # fmt: skip
    shared = {"store_url": redis_server.url, "policy": {"idle_timeout": "2s"}}
    one = await ws_gateway(gateways, ws_upstream, **shared)
    two = await ws_gateway(gateways, ws_upstream, **shared)
    token = one.token()
    ws = await connect(one, "/ws/i", token)
    clock.advance(1.5)
    assert (await two.get("/api/keepalive", token)).status == 200
    clock.advance(1.5)  # 3 s after the handshake, 1.5 s after the request at two
    await asyncio.sleep(0.6)
    assert not ws.closed
    clock.advance(0.6)  # 2.1 s after the last activity anywhere
    assert await closed_with(ws) == (1008, "idle_timeout")


async def test_store_unavailable_closes_1011_with_on_error_deny(
    gateways: GatewayFactory, ws_upstream: WsUpstream, redis_server: RedisServer,
    clock: ManualClock,
):  # fmt: skip
    gw = await ws_gateway(
        gateways, ws_upstream, store_url=redis_server.url, policy={"idle_timeout": "2s"}
    )
    ws = await connect(gw, "/ws/s", gw.token())
    redis_server.stop()
    clock.advance(2.5)  # the idle check is due; the store does not answer
    assert await closed_with(ws, timeout=2.5) == (1011, "store_unavailable")


@pytest.mark.parametrize("on_error", ["allow", "grace"])
async def test_store_unavailable_with_on_error_allow_or_grace(
    gateways: GatewayFactory, ws_upstream: WsUpstream, redis_server: RedisServer,
    clock: ManualClock, on_error: str,
):  # fmt: skip
    gw = await ws_gateway(
        gateways, ws_upstream, store_url=redis_server.url,
        store={"on_error": on_error}, policy={"idle_timeout": "2s"},
    )  # fmt: skip
    ws = await connect(gw, "/ws/s", gw.token())
    redis_server.stop()
    clock.advance(0.5)
    await still_open(ws)  # a client message the store cannot record
    clock.advance(1.7)  # the idle check is due; the store does not answer
    await asyncio.sleep(1.0)
    assert not ws.closed  # allow: unchecked; grace: this socket saw activity 1.7 s ago
    clock.advance(0.8)  # 2.5 s since the socket's last client message
    if on_error == "allow":
        await asyncio.sleep(1.0)
        assert not ws.closed
        await ws.close()
    else:
        assert await closed_with(ws, timeout=2.5) == (1011, "store_unavailable")


async def test_a_passive_route_checks_idleness_but_counts_no_activity(
    gateways: GatewayFactory, ws_upstream: WsUpstream, clock: ManualClock
):
    gw = await ws_gateway(
        gateways, ws_upstream, policy={"idle_timeout": "2s"}, ws_route={"activity": "passive"}
    )
    token = gw.token()  # issued now: idle 2 s after iat unless used
    clock.advance(1.5)
    ws = await connect(gw, "/ws/feed", token)  # checked, not counted as activity
    await still_open(ws)  # neither is a client message on a passive route
    clock.advance(0.6)  # 2.1 s after iat, the only activity
    assert await closed_with(ws) == (1008, "idle_timeout")


async def test_the_handshake_counts_as_activity(
    gateways: GatewayFactory, ws_upstream: WsUpstream, clock: ManualClock
):
    gw = await ws_gateway(gateways, ws_upstream, policy={"idle_timeout": "2s"})
    token = gw.token()
    clock.advance(1.5)
    ws = await connect(gw, "/ws/h", token)
    await ws.close()
    clock.advance(1.5)  # 3 s after iat, 1.5 s after the handshake
    assert (await gw.get("/api/x", token)).status == 200


async def test_a_handshake_connect_timeout_logs_no_request_url(
    gateways: GatewayFactory, caplog: pytest.LogCaptureFixture
):
    # aiohttp's ConnectionTimeoutError names the URL, query included: the log must not.
    # An upstream that never accepts, its accept queue full: a new SYN goes unanswered.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
    caplog.set_level(logging.WARNING, logger="idlegate.upstream")
    try:
        gw = await gateways(
            routes=ws_routes(f"http://127.0.0.1:{address[1]}"), forward={"connect_timeout": "200ms"}
        )
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await connect(gw, "/ws/hidden?q=query-secret", gw.token())
    finally:
        for sock in (*fillers, listener):
            sock.close()
    assert refused.value.status == 502
    (line,) = [r.getMessage() for r in caplog.records if r.name == "idlegate.upstream"]
    assert "route=/ws/" in line and "connect_timeout 0.2s" in line
    assert "query-secret" not in caplog.text and "/hidden" not in caplog.text
