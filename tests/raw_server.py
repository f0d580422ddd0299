"""A bare TCP server on 127.0.0.1 for upstreams that must answer byte by byte (malformed
responses, smuggling probes, hand-made WebSocket handshakes): a subclass writes `handle`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class RawServer:
    """Serves each connection with `handle`; `stop` closes the listener and cancels the
    connections still being served. The connection is closed when `handle` returns."""

    port: int = field(default=0, init=False)
    _server: asyncio.Server | None = field(default=None, init=False, repr=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handle(reader, writer)
        finally:
            writer.close()
            self._tasks.discard(task)
