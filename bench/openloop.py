"""Open-loop, constant-rate HTTP/1.1 load (what wrk2 does; wrk2 is not packaged by Debian).

Request n is due at t0 + n / rate whatever happened to earlier ones. A due request goes out at
once on an idle keep-alive connection; when all connections are busy it waits in a queue and
its latency counts from the moment it was due to go out (no coordinated omission). The client
is a minimal asyncio protocol on uvloop (not aiohttp's client), so a generator pinned to one
core keeps up with a few thousand requests/s with little jitter of its own.

    python bench/openloop.py --port 8080 --path /api/orders --tokens tokens.txt \
        --rate 2500 --duration 10 --connections 50

Prints one line `BENCH_JSON {...}`: latencies in µs, achieved rate, status counts, how late the
generator itself dispatched (its own lag, reported so it can be ruled out).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import uvloop


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    record: bool = False
    errors: int = 0


class Conn(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.started = 0.0
        self.recorded = False
        self.busy = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not a subclass of asyncio.Transport, only shaped like one.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, data: bytes, started: float, recorded: bool) -> None:
        assert self.transport is not None
        self.busy = True
        self.started = started
        self.recorded = recorded
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            del self.buffer[:total]
            status = int(head[9:12])
            self.client.completed(self, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.busy:
            self.client.stats.errors += 1


class Client:
    def __init__(self, requests: list[bytes], stats: Stats) -> None:
        self.requests = requests
        self.stats = stats
        self.index = 0
        self.idle: list[Conn] = []
        self.queue: collections.deque[tuple[float, bool]] = collections.deque()
        self.in_flight = 0

    def next_request(self) -> bytes:
        self.index += 1
        return self.requests[self.index % len(self.requests)]

    def dispatch(self, now: float, recorded: bool) -> None:
        self.in_flight += 1
        while self.idle:
            conn = self.idle.pop()
            if not conn.lost:
                conn.send(self.next_request(), now, recorded)
                return
        self.queue.append((now, recorded))

    def completed(self, conn: Conn, status: int) -> None:
        now = time.perf_counter()
        self.in_flight -= 1
        if conn.recorded:
            self.stats.latencies.append(now - conn.started)
            self.stats.statuses[status] += 1
        conn.busy = False
        if self.queue:
            due, recorded = self.queue.popleft()
            conn.send(self.next_request(), due, recorded)
        else:
            self.idle.append(conn)


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


async def run(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    tokens = [t for t in Path(args.tokens).read_text().split("\n") if t]
    host = f"127.0.0.1:{args.port}"
    requests = [
        (
            f"GET {args.path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
        for token in tokens
    ]
    stats = Stats()
    client = Client(requests, stats)
    for _ in range(args.connections):
        _, conn = await loop.create_connection(lambda: Conn(client), "127.0.0.1", args.port)
        client.idle.append(conn)

    interval = 1.0 / args.rate
    t0 = time.perf_counter()
    warm_end = t0 + args.warmup
    end = warm_end + args.duration
    n = 0
    lag_max = 0.0
    lag_sum = 0.0
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        due = t0 + n * interval
        while due <= now:
            recorded = due >= warm_end
            lag = now - due
            if recorded:
                lag_max = max(lag_max, lag)
                lag_sum += lag
            # Latency counts from now (the send): a due request is never held back by the
            # system under test, only by this loop's timer (lag, reported separately).
            client.dispatch(now, recorded)
            n += 1
            due = t0 + n * interval
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
    sent_recorded = n - int(args.warmup * args.rate)
    drain_deadline = time.perf_counter() + 5
    while client.in_flight and time.perf_counter() < drain_deadline:
        await asyncio.sleep(0.01)
    latencies = sorted(stats.latencies)
    us = 1e6
    return {
        "rate_target": args.rate,
        "requests": len(latencies),
        "sent": sent_recorded,
        "sent_total": n,
        "achieved_rate": len(latencies) / args.duration,
        "unfinished": client.in_flight,
        "errors": stats.errors,
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "latency_us": {
            "mean": sum(latencies) / max(1, len(latencies)) * us,
            "p50": percentile(latencies, 50) * us,
            "p90": percentile(latencies, 90) * us,
            "p99": percentile(latencies, 99) * us,
            "p999": percentile(latencies, 99.9) * us,
            "max": (latencies[-1] if latencies else float("nan")) * us,
        },
        "generator_lag_us": {
            "mean": lag_sum / max(1, sent_recorded) * us,
            "max": lag_max * us,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/api/orders")
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    result = uvloop.run(run(args))
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
