"""Python opcodes and calls per request, by function, through the whole stack in one process:
the real aiohttp server (`idlegate serve`'s, or bench/bare_proxy.py's lean pass-through), a
real redis-server, a raw keep-alive upstream and raw keep-alive clients, all on 127.0.0.1.

Opcode counts do not move with the machine's load, so two checkouts compare exactly (what a
change added or removed per request), where req/s on a shared 2-core VM swing by more than
the change. C work (multidict, llhttp, hiredis, the kernel) is not in them.

    python bench/request_ops.py gateway|coalesce|noauth|lean|access-log [--requests 3000] [--top 40]

(`coalesce` runs with `store.coalesce: 10m`, so that no flush falls into the traced burst: under
the tracer a flush overruns the store timeout. At full speed a flush costs ~0.02 store writes
per request with 1000 tokens and 5 s, bench/run.py's figure.)

Run it from the checkout whose gateway/ to count (as bench/micro.py).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import uvloop

sys.path.insert(0, str(Path.cwd()))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from instructions import dump_total
from tokens import provider, write_key, write_tokens

RESPONSE = (
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{"orders":[]}'
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Upstream(asyncio.Protocol):
    """Answers every request head with the same small JSON response."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            self.buffer = self.buffer.partition(b"\r\n\r\n")[2]
            self.transport.write(RESPONSE)


class Client(asyncio.Protocol):
    """One keep-alive connection with one request in flight, cycling through `requests`."""

    def __init__(self, run: Run, offset: int) -> None:
        self.run, self.index, self.buffer = run, offset, b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def send(self) -> None:
        self.index = (self.index + 1) % len(self.run.requests)
        self.transport.write(self.run.requests[self.index])

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(rest) < length:
                return
            if not head.startswith(b"HTTP/1.1 200"):
                self.run.refused += 1  # counted and reported: a hang would hide it
            self.buffer = rest[length:]
            self.run.answered()
            if self.run.done + self.run.connections <= self.run.target:
                self.send()  # the next one, while the burst needs it


class Run:
    def __init__(self, requests: list[bytes], connections: int) -> None:
        self.requests, self.connections = requests, connections
        self.clients: list[Client] = []
        self.done = self.target = self.refused = 0
        self.finished = asyncio.Event()

    def answered(self) -> None:
        self.done += 1
        if self.done >= self.target:
            self.finished.set()

    async def burst(self, count: int) -> None:
        self.done, self.target = 0, count
        self.finished.clear()
        for client in self.clients:  # each sends its next request when answered, while needed
            client.send()
        await self.finished.wait()


async def start_proxy(kind: str, upstream: str, redis_port: int, key_dir: Path) -> int:
    port = free_port()
    if kind == "lean":
        from aiohttp import web
        from bare_proxy import LeanBareProxy

        proxy = LeanBareProxy(upstream)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", proxy.handle)
        runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        return port
    from gateway import config as config_module
    from gateway import serve

    _, public_key = write_key(key_dir)
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": 0},
        "server": {"access_log": False, "log_level": "warning"},
        # No revocation poll in the burst: it is no request's work, and how many fall into a
        # burst depends on how long it lasts (`--instructions`: ~5 k a request).
        "store": {
            "url": f"redis://127.0.0.1:{redis_port}/0",
            "timeout": "1s",
            "revocation_poll": "1h",
        },
        "policy": {"idle_timeout": "15m", "max_token_lifetime": "15m"},
        "providers": [provider(public_key)],
        "routes": [{"prefix": "/api/", "upstream": upstream}],
    }
    if kind == "noauth":
        data["routes"][0]["auth"] = "none"
    if kind == "coalesce":
        data["store"]["coalesce"] = "10m"
    quiet = contextlib.nullcontext()
    if kind == "access-log":  # exact, with the access log on (the default config's), to nowhere
        data["server"]["access_log"] = True
        # The log takes sys.stdout as it starts, and keeps it.
        quiet = contextlib.redirect_stdout(open(os.devnull, "w"))  # noqa: SIM115 (kept open)
    with quiet:
        await serve.start(config_module.from_data(data))
    return port


async def main_async(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    upstream_port = free_port()
    await loop.create_server(Upstream, "127.0.0.1", upstream_port)
    redis_port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        key_dir = Path(tempfile.mkdtemp())
        port = await start_proxy(
            args.kind, f"http://127.0.0.1:{upstream_port}", redis_port, key_dir
        )
        tokens = write_tokens(1000, key_dir / "tokens.txt", key_dir).read_text().split()
        requests = [
            f"GET /api/orders HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            "Accept: application/json\r\nUser-Agent: bench\r\n\r\n".encode()
            for token in tokens
        ]
        run = Run(requests, args.connections)
        for offset in range(args.connections):
            _, client = await loop.create_connection(
                lambda offset=offset: Client(run, offset * 50), "127.0.0.1", port
            )
            run.clients.append(client)
        await run.burst(2000)  # warm: verified-token cache, keep-alive pools, packed commands
        await asyncio.sleep(0.1)
        opcodes: collections.Counter[tuple[str, str]] = collections.Counter()
        calls: collections.Counter[tuple[str, str]] = collections.Counter()
        here = __file__

        def tracer(frame: FrameType, event: str, _arg: Any) -> Any:
            code = frame.f_code
            if code.co_filename == here:
                return None
            where = (code.co_filename, code.co_qualname)
            if event == "call":
                calls[where] += 1
                frame.f_trace_opcodes = True
            elif event == "opcode":
                opcodes[where] += 1
            return tracer

        n = args.requests
        if args.instructions:
            await counted_burst(run, n, args.kind)
            return
        sys.settrace(tracer)
        try:
            await run.burst(args.requests)
        finally:
            sys.settrace(None)
        print(
            f"{args.kind}: {sum(opcodes.values()) / n:.0f} opcodes and "
            f"{sum(calls.values()) / n:.1f} calls per request ({n} requests, "
            f"{args.connections} connections, {run.refused} refused)"
        )
        for (path, name), count in opcodes.most_common(args.top):
            short = path.split("site-packages/")[-1].replace(os.getcwd() + "/", "")
            print(f"{count / n:8.1f} ops {calls[path, name] / n:5.2f} calls  {name}  ({short})")
    finally:
        redis.kill()


async def counted_burst(run: Run, n: int, kind: str) -> None:
    """The burst's CPU instructions (this process runs under callgrind, instrumentation off
    until here): clients, upstream and proxy are all this process, and it is one event loop,
    so a run repeats itself turn for turn and two checkouts' counts differ by exactly what
    their code does differently (with `coalesce` and `noauth` no Redis reply is in the
    burst; `gateway`'s replies come from the redis-server process, as they are ready)."""
    pid = str(os.getpid())

    def control(*options: str) -> None:
        subprocess.run(["callgrind_control", *options, pid], check=True, capture_output=True)

    out = Path(os.environ["REQUEST_OPS_DUMPS"])
    before = set(out.glob("callgrind.*"))
    control("-z")
    control("-i", "on")
    await run.burst(n)
    control("-d")
    control("-i", "off")
    total = sum(dump_total(dump) for dump in set(out.glob("callgrind.*")) - before)
    print(f"{kind}: {total / n / 1000:.1f} k instructions per request, the whole process "
          f"({n} requests, {run.refused} refused; dumps in {out})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=("gateway", "coalesce", "noauth", "lean", "access-log"))
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument(
        "--instructions", action="store_true",
        help="count CPU instructions (valgrind) instead of opcodes: runs itself under callgrind",
    )  # fmt: skip
    args = parser.parse_args()
    if args.instructions and "REQUEST_OPS_DUMPS" not in os.environ:
        out = Path(tempfile.mkdtemp(prefix="request-ops-"))
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}/callgrind.%p", sys.executable, *sys.argv,
        ]  # fmt: skip
        env = {**os.environ, "REQUEST_OPS_DUMPS": str(out)}
        sys.exit(subprocess.run(command, env=env, stderr=subprocess.DEVNULL).returncode)
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
