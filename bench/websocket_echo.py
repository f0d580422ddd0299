"""WebSocket echo through the gateway vs through a bare aiohttp WebSocket relay (issue 12).

Three processes on 127.0.0.1, each on uvloop: an aiohttp echo upstream, a bare relay (the
reference: WebSocketResponse to the client, ClientSession.ws_connect upstream, two pumps, the
same autoping/compress settings as gateway/forward/websocket.py, no auth, no deadlines, no
metrics), and `idlegate serve` with one `websocket: true` route (memory store; activity is
written at most once per token per 10 s, so the store is not what is measured). The load is
generated here: `--sockets` concurrent sockets, each with one message in flight (closed loop),
`--size`-byte text messages, for `--seconds` per round; rounds alternate bare / gateway so that
both see the same machine. The headline: gateway messages/s / bare messages/s (target >= 0.8).

    python bench/websocket_echo.py [--sockets 50] [--seconds 5] [--rounds 2] [--size 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import aiohttp
import uvloop
import yaml
from aiohttp import WSMsgType, web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, PYTHON, ROOT, Proc, Procs, cpu_seconds, free_port, wait_port
from tokens import mint, provider, write_key

# -- the two servers (run as subprocesses of this script) ----------------------------------


async def serve_echo(port: int) -> None:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()


async def serve_bare(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())

    async def pump(
        source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    ) -> None:
        while True:
            msg = await source.receive()
            if msg.type is WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            elif msg.type is WSMsgType.PING:
                await sink.ping(msg.data)
            elif msg.type is WSMsgType.PONG:
                await sink.pong(msg.data)
            else:
                return

    async def relay(request: web.Request) -> web.WebSocketResponse:
        up = await session.ws_connect(
            upstream + request.raw_path, autoping=False, autoclose=False, compress=0
        )
        ws = web.WebSocketResponse(autoping=False, autoclose=False, compress=False)
        await ws.prepare(request)
        tasks = [asyncio.create_task(pump(ws, up)), asyncio.create_task(pump(up, ws))]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await up.close()
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", relay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()


# -- the load --------------------------------------------------------------------------------


async def load(
    url: str, tokens: list[str], seconds: float, size: int, pid: int
) -> tuple[float, float]:
    """(messages per second, messages per CPU-second of the relay process `pid`) echoed over
    len(tokens) sockets, one message in flight on each."""
    payload = "x" * size
    stop = asyncio.Event()
    counts = [0] * len(tokens)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True)
    ) as http:
        sockets = [
            await http.ws_connect(url, headers={"Authorization": f"Bearer {t}"}, compress=0)
            for t in tokens
        ]

        async def run(i: int, ws: aiohttp.ClientWebSocketResponse) -> None:
            while not stop.is_set():
                await ws.send_str(payload)
                msg = await ws.receive()
                assert msg.type is WSMsgType.TEXT, msg
                counts[i] += 1

        for ws in sockets:  # warm up
            await ws.send_str(payload)
            await ws.receive()
        tasks = [asyncio.create_task(run(i, ws)) for i, ws in enumerate(sockets)]
        started, cpu = time.perf_counter(), cpu_seconds([pid])
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)
        elapsed, cpu = time.perf_counter() - started, cpu_seconds([pid]) - cpu
        for ws in sockets:
            await ws.close()
    return sum(counts) / elapsed, sum(counts) / max(cpu, 1e-9)


def gateway_config(
    port: int, admin_port: int, upstream: str, public_key: Path
) -> dict[str, object]:
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "server": {"access_log": False, "log_level": "warning", "shutdown_grace": "2s"},
        "store": {"url": "memory://"},
        "providers": [provider(public_key)],
        "routes": [{"prefix": "/", "upstream": upstream, "websocket": True}],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--serve-echo", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-bare", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    uvloop.install()
    if args.serve_echo:
        asyncio.run(serve_echo(args.serve_echo))
        return 0
    if args.serve_bare:
        asyncio.run(serve_bare(int(args.serve_bare[0]), args.serve_bare[1]))
        return 0

    out = OUT / f"ws-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    private, public = write_key(OUT)
    tokens = mint(args.sockets, private)
    echo_port, bare_port, gw_port, admin_port = (free_port() for _ in range(4))
    upstream = f"http://127.0.0.1:{echo_port}"
    config = out / "gateway.yaml"
    config.write_text(yaml.safe_dump(gateway_config(gw_port, admin_port, upstream, public)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = str(Path(__file__).resolve())
    procs = Procs()
    try:
        procs.start(
            Proc("echo", [PYTHON, script, "--serve-echo", str(echo_port)], out / "echo.log", env)
        )
        relays = {
            "bare": procs.start(
                Proc(
                    "bare",
                    [PYTHON, script, "--serve-bare", str(bare_port), upstream],
                    out / "bare.log",
                    env,
                )
            ),
            "gateway": procs.start(
                Proc(
                    "gateway",
                    [PYTHON, "-m", "gateway", "serve", "-c", str(config)],
                    out / "gw.log",
                    env,
                )
            ),
        }
        ports = {"bare": bare_port, "gateway": gw_port}
        for port in (echo_port, bare_port, gw_port):
            wait_port(port)
        rates: dict[str, list[float]] = {"bare": [], "gateway": []}
        per_cpu: dict[str, list[float]] = {"bare": [], "gateway": []}
        for round_ in range(args.rounds):
            for name in ("bare", "gateway"):
                url = f"http://127.0.0.1:{ports[name]}/echo"
                rate, efficiency = asyncio.run(
                    load(url, tokens, args.seconds, args.size, relays[name].pid)
                )
                rates[name].append(rate)
                per_cpu[name].append(efficiency)
                print(
                    f"round {round_ + 1} {name:8s} {rate:8.0f} messages/s "
                    f"{efficiency:8.0f} messages per CPU-second of the relay",
                    flush=True,
                )

        def mean(values: list[float]) -> float:
            return sum(values) / len(values)

        ratio = [g / b for g, b in zip(rates["gateway"], rates["bare"], strict=True)]
        cpu_ratio = [g / b for g, b in zip(per_cpu["gateway"], per_cpu["bare"], strict=True)]
        print(
            f"messages/s: bare {mean(rates['bare']):.0f}, gateway {mean(rates['gateway']):.0f}, "
            f"gateway/bare {mean(rates['gateway']) / mean(rates['bare']):.2f} "
            f"(rounds {', '.join(f'{r:.2f}' for r in ratio)})\n"
            f"per relay CPU-second: bare {mean(per_cpu['bare']):.0f}, "
            f"gateway {mean(per_cpu['gateway']):.0f}, gateway/bare "
            f"{mean(per_cpu['gateway']) / mean(per_cpu['bare']):.2f} "
            f"(rounds {', '.join(f'{r:.2f}' for r in cpu_ratio)})\n"
            f"{args.sockets} sockets, {args.size}-byte messages, {args.seconds:.0f} s per round; "
            f"logs in {out}"
        )
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
