"""CPU instructions per request of the proxy process, counted by valgrind (callgrind), for the
gateway (exact and `store.coalesce`) and the bare proxy on the same lean transport.

Instruction counts do not move with the machine's load (wall-clock req/s on a shared 2-core VM
swing by ±20 % between rounds), so two checkouts, or two targets, compare exactly; C work
(multidict, llhttp, hiredis, uvloop) is in them, the kernel's is not. The serving process runs
under `valgrind --tool=callgrind --instr-atstart=no`; wrk warms it up, then instrumentation is
switched on for one wrk run of `--duration` seconds and the instructions, less those of as long
a time with no requests (`--idle`: timers), divided by the requests wrk completed. Same
upstream, Redis and token pool as bench/run.py.

    python bench/instructions.py [--targets bare-lean,gateway,coalesce,access-log] [--duration 15]

The ratio printed (bare-lean ÷ target, in instructions) is what issue 12 and 13's req/s
ratios would be if every instruction cost the same. They do not: on a quiet machine the
wall-clock ratios came out ~0.14 below it (0.72 / 0.77 against 0.864 / 0.916, 1000 tokens),
because the gateway's own instructions miss the caches on per-token state (RESULTS.md,
seventh session). Use it for before/after on code that touches the same objects.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import BENCH, OUT, PYTHON, ROOT, Proc, Procs, free_port, pinned, start_redis, wait_port
from tokens import provider, write_key, write_tokens

SUT_CPU, LOAD_CPU = "0", "1"
PATH = "/api/orders"


def gateway_config(
    out: Path, name: str, redis_port: int, upstream: str, coalesce: str, access_log: bool = False
) -> Path:
    _, public_key = write_key(OUT)
    # Revocation polls are no request's work, and under valgrind (~150 requests a second) one
    # falls on so few requests that whether the idle window caught one or not moved the result
    # by ~3 k a request: none in the measured windows.
    store: dict[str, object] = {
        "url": f"redis://127.0.0.1:{redis_port}/0", "timeout": "2s", "revocation_poll": "1h",
    }  # fmt: skip
    if coalesce:
        store["coalesce"] = coalesce
    server = {"access_log": access_log, "log_level": "warning", "shutdown_grace": "1s"}
    config = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "server": server,
        "store": store,
        "policy": {"idle_timeout": "15m", "max_token_lifetime": "15m"},
        "providers": [provider(public_key)],
        "routes": [{"prefix": "/api/", "upstream": upstream}],
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def wrk(port: int, tokens: Path, seconds: int, connections: int) -> int:
    done = subprocess.run(
        pinned(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
             "-s", str(BENCH / "auth.lua"), f"http://127.0.0.1:{port}{PATH}", "--", str(tokens)],
            LOAD_CPU,
        ),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON "))
    result = json.loads(line.removeprefix("BENCH_JSON "))
    if any(result["errors"].values()):
        raise SystemExit(f"refused or failed requests: {line}")
    return int(result["requests"])


def measure(name: str, cmd: list[str], port: int, args: argparse.Namespace, tokens: Path) -> float:
    out = args.out
    prefix = out / f"callgrind.{name}"
    valgrind = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={prefix}.%p",
    ]  # fmt: skip
    if args.cache_sim:  # simulated cache misses and branch mispredictions too (slower)
        valgrind += ["--cache-sim=yes", "--branch-sim=yes"]
    procs = Procs()
    proc = procs.start(Proc(name, pinned(valgrind + cmd, SUT_CPU), out / f"{name}.log"))
    try:
        wait_port(port, timeout=180)
        wrk(port, tokens, args.warmup, args.connections)
        pid = proc.pid  # taskset execs valgrind, which stays the process started

        def control(*options: str) -> None:
            command = ["callgrind_control", *options, str(pid)]
            subprocess.run(command, check=True, capture_output=True)

        def counted(seconds: int, load: bool) -> tuple[int, int]:
            """Instructions of `seconds` with instrumentation on, and the requests served."""
            before = set(out.glob(f"callgrind.{name}.{pid}.*"))
            control("-z")  # zero the counters, then count
            control("-i", "on")
            if load:
                requests = wrk(port, tokens, seconds, args.connections)
            else:
                time.sleep(seconds)
                requests = 0
            control("-d")
            control("-i", "off")
            time.sleep(0.5)
            dumps = set(out.glob(f"callgrind.{name}.{pid}.*")) - before
            return sum(dump_total(dump) for dump in dumps), requests

        # What the process does with no requests (timers: revocation poll, metrics flush,
        # watchdogs), per second: taken off, as under valgrind it would fall on ~60x fewer
        # requests than at full speed.
        idle, _ = counted(args.idle, load=False)
        total, requests = counted(args.duration, load=True)
        per_request = (total - idle / args.idle * args.duration) / requests
        print(f"  {name:10} {per_request / 1000:8.1f} k instructions/request"
              f"  ({requests} requests; idle {idle / args.idle / 1000:.0f} k/s taken off)",
              flush=True)  # fmt: skip
        return per_request
    finally:
        procs.stop_all()


def dump_total(dump: Path) -> int:
    """The instructions a callgrind dump counted (its summary line)."""
    text = dump.read_text(errors="replace")
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    return int(found.group(1)) if found else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--targets", default="bare-lean,gateway,coalesce")
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--idle", type=int, default=5, help="seconds of the idle measurement")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument(
        "--cache-sim", action="store_true",
        help="also simulate caches and branch prediction: misses per request in the dumps",
    )  # fmt: skip
    # Long: under valgrind a 5 s window's flush would fall on ~60x fewer requests than at full
    # speed, and count as the request path's cost.
    parser.add_argument("--coalesce", default="10m")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install -y valgrind wrk")
    args.out = OUT / time.strftime("instructions-%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True)
    procs = Procs()
    try:
        _, redis_port = start_redis(procs, args.out / "redis", LOAD_CPU)
        upstream_port = free_port()
        procs.start(Proc("upstream", pinned([PYTHON, str(BENCH / "upstream.py"), "--port",
                    str(upstream_port)], LOAD_CPU), args.out / "upstream.log"))  # fmt: skip
        wait_port(upstream_port)
        upstream = f"http://127.0.0.1:{upstream_port}"
        tokens = write_tokens(args.tokens, args.out / "tokens.txt", OUT)
        results: dict[str, float] = {}
        for name in args.targets.split(","):
            if name == "bare-lean":
                port = free_port()
                cmd = [PYTHON, str(BENCH / "bare_proxy.py"), "--port", str(port),
                       "--upstream", upstream, "--client", "lean"]  # fmt: skip
            else:
                coalesce = args.coalesce if name == "coalesce" else ""
                # `access-log`: exact mode with the access log on (the default config's), its
                # lines going to the process's log file.
                config = gateway_config(
                    args.out, name, redis_port, upstream, coalesce, name == "access-log"
                )
                port = yaml.safe_load(config.read_text())["listen"]["port"]
                cmd = [PYTHON, "-m", "gateway", "serve", "-c", str(config)]
            results[name] = measure(name, cmd, port, args, tokens)
        base = results.get("bare-lean")
        if base:
            for name, value in results.items():
                if name != "bare-lean":
                    print(f"  bare-lean ÷ {name}: {base / value:.3f}"
                          f"  (gateway-only {(value - base) / 1000:.1f} k)")  # fmt: skip
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
