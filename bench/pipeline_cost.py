"""What the gateway's own request handling costs, in one process: the proxy port's handler with
the store call and the forward replaced by stubs that each suspend once (as a store reply and an
upstream head do), a cached RS256 token, the memory store, 50 concurrent callers.

Run it from a directory holding a `gateway/` package (a copy with a change, or this checkout),
as bench/micro.py; tokens and key from bench/tokens.py (fresh: they live 15 minutes).

    python bench/pipeline_cost.py --tokens tokens.txt --public-key pub.pem            # CPU µs
    python bench/pipeline_cost.py --tokens tokens.txt --public-key pub.pem --counts   # levels,
        # calls and opcodes per request: exact, whatever the machine's load
    valgrind --tool=callgrind python bench/pipeline_cost.py ... --requests 20000      # one run;
        # minus a --requests 0 run, divided by 20000: instructions per request
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import uvloop
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

sys.path.insert(0, str(Path.cwd()))  # the gateway package of the directory we run from

from gateway import config as config_module
from gateway.app import Gateway
from gateway.store.base import Touch, TouchResult

ISSUER = "https://issuer.bench/"
CALLERS = 50


async def main_async(args: argparse.Namespace) -> None:
    tokens = [t for t in Path(args.tokens).read_text().split("\n") if t][:1000]
    config = config_module.from_data(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "server": {"access_log": False},
            "store": {"url": "memory://"},
            "providers": [
                {
                    "name": "bench",
                    "issuer": ISSUER,
                    "audiences": ["orders-api"],
                    "algorithms": ["RS256"],
                    "public_key_file": args.public_key,
                }
            ],
            "routes": [{"prefix": "/api/", "upstream": "http://127.0.0.1:9"}],
        },
        environ={},
    )
    gateway = Gateway(config, environ={})
    await gateway.start()
    try:
        # The handler the proxy port calls: Pipeline.handle, or Gateway.handle before the split.
        pipeline = getattr(type(gateway), "pipeline", None)
        handle = gateway.pipeline.handle if pipeline is not None else gateway.handle  # type: ignore[attr-defined]
        await measure(gateway, handle, tokens, args)
    finally:
        await gateway.close()


async def measure(
    gateway: Gateway, handle: Any, tokens: list[str], args: argparse.Namespace
) -> None:
    prepared = web.Response(body=b"ok")
    levels: list[tuple[str, int]] = []

    def count_levels_at_wakeup(what: str) -> None:
        """Once suspended: how many coroutines the wakeup walks through (outermost first)."""
        if not args.counts:
            return
        task = asyncio.current_task()
        assert task is not None

        def walk() -> None:
            depth, awaited = 0, task.get_coro()
            while awaited is not None and hasattr(awaited, "cr_await"):
                depth, awaited = depth + 1, awaited.cr_await
            levels.append((what, depth))

        asyncio.get_running_loop().call_soon(walk)

    async def forward(*_args: Any) -> web.StreamResponse:
        count_levels_at_wakeup("upstream head")
        await asyncio.sleep(0)
        return prepared

    async def check_and_touch(touch: Touch) -> TouchResult:
        count_levels_at_wakeup("store reply")
        await asyncio.sleep(0)
        return TouchResult(last_activity=touch.now, idle=False)

    gateway.forwarder.forward = forward  # type: ignore[method-assign]
    gateway.store.check_and_touch = check_and_touch  # type: ignore[method-assign]
    headers = {"Host": "api.example", "User-Agent": "curl/8.5.0", "Accept": "application/json"}
    requests = [
        make_mocked_request(
            "GET", "/api/orders?page=2", headers={**headers, "Authorization": "Bearer " + t}
        )
        for t in tokens
    ]
    for request in requests:  # every token verified once: the cache holds them all
        assert (await handle(request)).status == 200

    async def run(n: int) -> None:
        async def caller(offset: int) -> None:
            for i in range(n // CALLERS):
                await handle(requests[(offset + i) % len(requests)])

        await asyncio.gather(*(caller(c * 20) for c in range(CALLERS)))

    if args.requests is not None:
        await run(args.requests)
    elif args.counts:
        levels.clear()  # the warm-up's, counted from inside this coroutine's own task
        await asyncio.create_task(handle(requests[0]))
        await asyncio.sleep(0)
        print("coroutine levels at each wakeup:", levels)
        profile = cProfile.Profile()
        profile.enable()
        for request in requests:
            await handle(request)
        profile.disable()
        print("Python calls per request:", pstats.Stats(profile).total_calls / len(requests))  # type: ignore[attr-defined]
        opcodes = [0]

        def tracer(frame: FrameType, event: str, _arg: Any) -> Any:
            frame.f_trace_opcodes = True
            if event == "opcode":
                opcodes[0] += 1
            return tracer

        sys.settrace(tracer)
        for request in requests:
            await handle(request)
        sys.settrace(None)
        print("opcodes per request (the request's own frames):", opcodes[0] / len(requests))
    else:
        samples = []
        for _ in range(args.repeat):
            started = time.process_time()
            await run(50_000)
            samples.append((time.process_time() - started) / 50_000 * 1e6)
        print(
            f"CPU µs per request: median {statistics.median(samples):.2f}, min {min(samples):.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--public-key", required=True)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--counts", action="store_true", help="levels, calls, opcodes per request")
    parser.add_argument("--requests", type=int, help="run this many requests once (for callgrind)")
    uvloop.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
