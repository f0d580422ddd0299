"""The floor of an aiohttp auth service: answers every request 200 with two fixed headers,
no token, no store. bench/forward_auth.py puts it behind nginx auth_request like idlegate, so
idlegate's forward-auth CPU per request reads as this floor plus its decision.

python bench/bare_auth.py --port 9191
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from aiohttp import web


async def handle(_request: web.BaseRequest) -> web.Response:
    return web.Response(headers={"X-Auth-Subject": "bench", "X-Request-ID": "bench"})


async def serve(port: int) -> None:
    # The low-level server with the settings gateway/serve.py gives the proxy port.
    runner = web.ServerRunner(web.Server(handle, access_log=None, max_field_size=32 * 1024))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
