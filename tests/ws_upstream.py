"""A real WebSocket upstream (aiohttp) that records what reached it, and an SSE endpoint.

Text messages are echoed, except commands: `close:CODE:REASON` (the upstream closes),
`ping-me` (it pings the client), `big:N` (it sends N bytes of text). Binary is echoed. Pings are
recorded and answered by hand (autoping off, so that the gateway's pass-through is visible).
`/refuse` answers 403 without upgrading. `/events?n=N&every=S` streams N server-sent events.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web


@dataclass
class WsUpstream:
    port: int = 0
    handshakes: list[dict[str, str]] = field(default_factory=list)
    closes: list[tuple[int | None, str]] = field(default_factory=list)
    pings: list[bytes] = field(default_factory=list)
    pongs: list[bytes] = field(default_factory=list)
    messages: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    # Set: the upstream serves https:// and wss:// with this server context.
    ssl_context: ssl.SSLContext | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/refuse"):
            return web.Response(status=403, text="not for you")
        if request.path.endswith("/events"):
            return await self._events(request)
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.json_response({"path": request.raw_path, "tls": request.secure})
        ws = web.WebSocketResponse(
            protocols=("chat.v2", "chat.v1"), autoping=False, max_msg_size=16 * 1024 * 1024
        )
        await ws.prepare(request)
        self.handshakes.append(
            {"path": request.raw_path, "tls": str(request.secure), **request.headers}
        )
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                self.messages += 1
                text = msg.data
                if text.startswith("close:"):
                    _, code, reason = text.split(":", 2)
                    await ws.close(code=int(code), message=reason.encode())
                    self.closes.append((int(code), "sent:" + reason))
                    break
                if text == "ping-me":
                    await ws.ping(b"from-upstream")
                elif text.startswith("big:"):
                    await ws.send_str("x" * int(text[4:]))
                else:
                    await ws.send_str(text)
            elif msg.type is WSMsgType.BINARY:
                self.messages += 1
                await ws.send_bytes(msg.data)
            elif msg.type is WSMsgType.PING:
                self.pings.append(msg.data)
                await ws.pong(msg.data)
            elif msg.type is WSMsgType.PONG:
                self.pongs.append(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                self.closes.append((msg.data, msg.extra or ""))
                await ws.close()
                break
            else:
                self.closes.append((ws.close_code, "dropped"))
                break
        self.closed.set()
        return ws

    async def _events(self, request: web.Request) -> web.StreamResponse:
        count = int(request.query.get("n", "100"))
        every = float(request.query.get("every", "0.05"))
        if "wait" in request.query:  # a long poll: nothing until then
            await asyncio.sleep(float(request.query["wait"]))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(count):
            await response.write(f"id: {i}\ndata: event {i}\n\n".encode())
            await asyncio.sleep(every)
        await response.write_eof()
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        await web.TCPSite(
            self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context
        ).start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
