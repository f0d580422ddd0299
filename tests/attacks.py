"""Tools for the attack tests (tests/integration/test_attacks_*.py): a raw client that sends
exact bytes, a raw upstream that records exact bytes and answers with scripted ones, and the
metric the refusal must have moved."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from prometheus_client import REGISTRY
from raw_server import RawServer


def requests_counted(route: str, decision: str, reason: str) -> float:
    labels = {"route": route, "decision": decision, "reason": reason}
    return REGISTRY.get_sample_value("idlegate_requests_total", labels) or 0.0


def _complete(data: bytes) -> bool:
    """Whether `data` holds a whole response with a Content-Length."""
    head, found, body = data.partition(b"\r\n\r\n")
    for line in head.lower().split(b"\r\n"):
        if found and line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


async def exchange(port: int, data: bytes, timeout: float = 2.0) -> bytes:
    """Send `data` on a fresh connection and read until the peer closes it, a response with a
    Content-Length is complete (a refusal on a kept-alive connection), or `timeout`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        writer.write(data)
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                received += chunk
                if _complete(received):
                    break
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        writer.close()
    return received


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes  # everything after the head, framing included

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name.lower()]


def parse(data: bytes) -> Response:
    """The first response in `data`."""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.append((name.decode().lower(), value.strip().decode("utf-8", "replace")))
    return Response(int(status_line.split(b" ")[1]), headers, body)


def request(first_line: str, *header_lines: str, body: bytes = b"") -> bytes:
    lines = [first_line, "Host: gateway.test", *header_lines]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class ScriptedUpstream(RawServer):
    """A TCP server that reads one request per connection (its head, then a Content-Length or
    chunked body), records the raw bytes, and answers with `reply`; the connection stays open
    for `linger` seconds after (an upstream that means to keep talking)."""

    reply: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    linger: float = 0.0
    received: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lower = head.lower()
            body = b""
            if b"transfer-encoding: chunked" in lower:
                body = await reader.readuntil(b"0\r\n\r\n")
            elif b"content-length:" in lower:
                length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
            self.received.append(head + body)
            writer.write(self.reply)
            await writer.drain()
            await asyncio.sleep(self.linger)
            # Anything that arrived after the request is recorded too (a smuggled request).
            extra = await asyncio.wait_for(reader.read(65536), 0.05)
            if extra:
                self.received.append(extra)
        except (asyncio.IncompleteReadError, OSError, TimeoutError, ValueError):
            pass
