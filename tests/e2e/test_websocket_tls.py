"""wss:// upstreams: a `websocket: true` route whose upstream is https:// relays frames over TLS,
and the upstream's certificate is verified (chain and host name), like an https:// route's.

The gateway runs as `idlegate serve` because the trust store is the process's: aiohttp builds
its verifying context when it is imported, from OpenSSL's default paths, which `SSL_CERT_FILE` /
`SSL_CERT_DIR` override (docs/websockets.md, "wss:// upstreams"). There is no per-route CA option.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import Upstream
from jwks_server import SigningKey
from tls import CertificateAuthority
from ws_upstream import WsUpstream

from .conftest import Spawn
from .processes import GatewayProcess, bearer, e2e_config, mint


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "pki")


async def tls_upstream(context: Any) -> WsUpstream:
    server = WsUpstream(ssl_context=context)
    await server.start()
    return server


@pytest.fixture
async def wss_upstream(ca: CertificateAuthority) -> AsyncIterator[WsUpstream]:
    server = await tls_upstream(ca.server_context("127.0.0.1"))
    yield server
    await server.stop()


async def wss_gateway(
    spawn: Spawn, upstream: Upstream, ws_upstream: WsUpstream, key_file: Path, env: dict[str, str]
) -> GatewayProcess:
    assert ws_upstream.url.startswith("https://")
    routes = [
        {"prefix": "/ws/", "upstream": ws_upstream.url, "websocket": True},
        {"prefix": "/api/", "upstream": ws_upstream.url},
    ]
    gw = spawn(e2e_config(upstream.url, key_file, routes=routes), env=env)
    await gw.wait_ready()
    return gw


async def refused_handshake(gw: GatewayProcess, token: str) -> tuple[int, dict[str, Any]]:
    """The gateway's answer to a WebSocket handshake it could not relay."""
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(gw.url + "/ws/chat", headers=bearer(token))
        async with http.get(
            gw.url + "/ws/chat",
            headers={
                **bearer(token),
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
            },
        ) as response:
            assert response.status == refused.value.status
            return response.status, json.loads(await response.text())


async def test_frames_are_relayed_over_wss_when_the_ca_is_trusted(
    spawn: Spawn, upstream: Upstream, wss_upstream: WsUpstream, key_file: Path,
    signing_key: SigningKey, ca: CertificateAuthority,
):  # fmt: skip
    gw = await wss_gateway(
        spawn, upstream, wss_upstream, key_file, env={"SSL_CERT_FILE": str(ca.ca_file)}
    )
    token = mint(signing_key, jti="wss-relay", sub="alice")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            gw.url + "/ws/chat?room=1", headers=bearer(token), protocols=("chat.v1",)
        )
        assert ws.protocol == "chat.v1"
        await ws.send_str("over tls")
        assert (await ws.receive()).data == "over tls"
        await ws.send_bytes(b"\x00\xffbinary")
        msg = await ws.receive()
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.BINARY, b"\x00\xffbinary")
        await ws.close(code=4001, message=b"done")

        # An https:// route without websocket trusts the same store.
        async with http.get(gw.url + "/api/plain", headers=bearer(token)) as response:
            assert response.status == 200
            assert await response.json() == {"path": "/api/plain", "tls": True}

    (handshake,) = wss_upstream.handshakes
    assert handshake["tls"] == "True"  # the upstream was reached over TLS, not ws://
    assert handshake["path"] == "/ws/chat?room=1"
    assert handshake["X-Auth-Subject"] == "alice"
    assert "Authorization" in handshake
    await wss_upstream.closed.wait()
    assert wss_upstream.closes == [(4001, "done")]


async def test_an_untrusted_upstream_certificate_is_refused_502(
    spawn: Spawn, upstream: Upstream, wss_upstream: WsUpstream, key_file: Path,
    signing_key: SigningKey, tmp_path: Path,
):  # fmt: skip
    """The system store (here: an empty one, so the machine's own CAs cannot matter) does not
    know the test CA: no frame and no token reach the upstream."""
    empty = tmp_path / "empty-store"
    empty.mkdir()
    env = {"SSL_CERT_FILE": str(empty / "none.pem"), "SSL_CERT_DIR": str(empty)}
    gw = await wss_gateway(spawn, upstream, wss_upstream, key_file, env=env)
    token = mint(signing_key, jti="wss-untrusted")

    status, body = await refused_handshake(gw, token)

    assert (status, body["reason"]) == (502, "upstream_unavailable")
    # The operator is told why, as for an https:// route (one line per route and reason).
    (line,) = [line for line in gw.stderr().splitlines() if "upstream failed: route=/ws/ " in line]
    assert f"upstream={wss_upstream.url} reason=upstream_unavailable" in line
    assert "CERTIFICATE_VERIFY_FAILED" in line
    assert token not in gw.stderr()
    async with (
        aiohttp.ClientSession() as http,
        http.get(gw.url + "/api/plain", headers=bearer(token)) as response,
    ):
        assert response.status == 502
        assert (await response.json())["reason"] == "upstream_unavailable"
    assert wss_upstream.handshakes == []


async def test_a_trusted_certificate_for_another_host_is_refused_502(
    spawn: Spawn, upstream: Upstream, key_file: Path, signing_key: SigningKey,
    ca: CertificateAuthority,
):  # fmt: skip
    """The chain is trusted but the certificate names another host: the name is checked too."""
    elsewhere = await tls_upstream(ca.server_context("orders.internal", "10.9.9.9"))
    try:
        gw = await wss_gateway(
            spawn, upstream, elsewhere, key_file, env={"SSL_CERT_FILE": str(ca.ca_file)}
        )
        status, body = await refused_handshake(gw, mint(signing_key, jti="wss-wrong-host"))
        assert (status, body["reason"]) == (502, "upstream_unavailable")
        assert "IP address mismatch" in gw.stderr()
        assert elsewhere.handshakes == []
    finally:
        await elsewhere.stop()
