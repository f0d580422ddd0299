"""The benchmark's upstream: answers every request with a small fixed JSON body, fast.

python bench/upstream.py --port 8000
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from aiohttp import web

BODY = b'{"ok":true,"service":"orders"}'


async def handle(_request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
