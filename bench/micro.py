"""CPU microbenchmarks of the gateway's per-request pieces, in one process, in CPU time.

Peak throughput on a shared 2-core machine moves by ±20 % from run to run; CPU time spent in
one code path over many iterations moves by a few %. So this is how candidate changes are
compared: run it from a directory holding a `gateway/` package (a copy with the change) and
from this checkout, and compare the medians.

    python bench/micro.py --redis-port 6380 --tokens tokens.txt --public-key pub.pem [--json]

Each case: warm-up, then `--repeat` timed batches; reported: median CPU µs per operation.
- store_touch: RedisStore.check_and_touch against a real redis-server, 50 concurrent callers
  (as with 50 client connections), so the pipelined connection batches as it does in service.
  With `--coalesce 5s`, through store.coalesce: the tokens' first touch of each window goes to
  Redis, the others are decided locally.
- verify_hit: Verifier.verify of a cached token (1000 distinct tokens cycled).
- verify_miss: tokens cycled over more distinct tokens than the cache holds (every call misses:
  RS256 verification, claims, and the cache's eviction).
- upstream_headers: Forwarder.upstream_headers for a mocked request with typical headers.
- route: Router.match of /api/orders (a path seen before: the router's cache).
- route_uncached: the same on a router with its cache emptied every call (a path first seen).
- bearer_token / presented_token: the Authorization header parsed with / without the token68
  check (the pipeline skips it on a token-cache hit).
- metrics: what the request path records per request (requests counter, four batched
  histograms, the in-flight count); metrics_unbatched: the same made straight on Prometheus.
- dispatch_app / dispatch_direct: aiohttp Application._handle (UrlDispatcher, match info) with a
  trivial handler, against calling the handler directly (what a low-level web.Server does).
- request_id: the request id the gateway generates when the client sent none.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

sys.path.insert(0, str(Path.cwd()))  # the gateway package of the directory we run from

from gateway import config as config_module
from gateway import metrics
from gateway.app import Gateway
from gateway.store.base import Touch

ISSUER = "https://issuer.bench/"


def cpu_us_per_op(run: Callable[[int], None], n: int, repeat: int) -> float:
    run(max(1, n // 10))
    samples = []
    for _ in range(repeat):
        started = time.process_time()
        run(n)
        samples.append((time.process_time() - started) / n * 1e6)
    return statistics.median(samples)


async def acpu_us_per_op(run: Callable[[int], Awaitable[None]], n: int, repeat: int) -> float:
    await run(max(1, n // 10))
    samples = []
    for _ in range(repeat):
        started = time.process_time()
        await run(n)
        samples.append((time.process_time() - started) / n * 1e6)
    return statistics.median(samples)


def build_config(
    redis_port: int, public_key: Path, coalesce: str | None = None
) -> config_module.Config:
    store: dict[str, str] = {"url": f"redis://127.0.0.1:{redis_port}/0"}
    if coalesce is not None:
        store["coalesce"] = coalesce
    return config_module.from_data(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "server": {"access_log": False},
            "store": store,
            "providers": [
                {
                    "name": "bench",
                    "issuer": ISSUER,
                    "audiences": ["orders-api"],
                    "algorithms": ["RS256"],
                    "public_key_file": str(public_key),
                }
            ],
            "routes": [{"prefix": "/api/", "upstream": "http://127.0.0.1:9"}],
        },
        environ={},
    )


async def main_async(args: argparse.Namespace) -> dict[str, float]:
    tokens = [t for t in Path(args.tokens).read_text().split("\n") if t]
    config = build_config(args.redis_port, Path(args.public_key), args.coalesce)
    gateway = Gateway(config, environ={})
    await gateway.start()
    results: dict[str, float] = {}
    repeat = args.repeat
    try:
        verifier = gateway.pipeline.verifier
        hot = tokens[:1000]
        verified = [await verifier.verify(t) for t in hot]

        # -- store_touch -----------------------------------------------------------------
        store = gateway.store
        now = time.time()

        async def touches(n: int) -> None:
            per_caller = max(1, n // 50)

            async def caller(offset: int) -> None:
                for i in range(per_caller):
                    token = verified[(offset + i) % len(verified)]
                    await store.check_and_touch(
                        Touch(
                            key=token.track_key,
                            initial=token.iat,
                            now=now,
                            idle_timeout=900.0,
                            extend=True,
                            expires_at=token.exp,
                            linger=30.0,
                            remember_idle=False,
                        )
                    )

            await asyncio.gather(*(caller(c * 20) for c in range(50)))

        async def null_calls(n: int) -> None:
            per_caller = max(1, n // 50)

            async def caller() -> None:
                for _ in range(per_caller):
                    await asyncio.sleep(0)

            await asyncio.gather(*(caller() for _ in range(50)))

        results["store_touch"] = await acpu_us_per_op(touches, 20_000, repeat)
        results["store_null_task_switch"] = await acpu_us_per_op(null_calls, 20_000, repeat)

        # -- verify --------------------------------------------------------------------------
        async def hits(n: int) -> None:
            for i in range(n):
                await verifier.verify(hot[i % len(hot)])

        results["verify_hit"] = await acpu_us_per_op(hits, 50_000, repeat)
        if len(tokens) > 20_000:
            cursor = [0]

            async def misses(n: int) -> None:
                for _ in range(n):
                    await verifier.verify(tokens[cursor[0] % len(tokens)])
                    cursor[0] += 1

            for token in tokens:  # fill the cache up to its bound first
                await verifier.verify(token)
            results["verify_miss"] = await acpu_us_per_op(misses, 2_000, repeat)

        # -- headers, route, metrics, request id -----------------------------------------
        request = make_mocked_request(
            "GET",
            "/api/orders?page=2",
            headers={
                "Host": "api.example",
                "User-Agent": "curl/8.5.0",
                "Accept": "application/json",
                "Accept-Encoding": "gzip, br",
                "Authorization": "Bearer " + hot[0],
                "X-Request-ID": "abc-123",
                "Connection": "keep-alive",
            },
        )
        token = verified[0]
        identity = getattr(token, "identity", None) or {"X-Auth-Subject": "user-0"}
        forwarder = gateway.forwarder

        def headers_case(n: int) -> None:
            for _ in range(n):
                forwarder.upstream_headers(request, "abc-123", identity, strip_authorization=False)

        results["upstream_headers"] = cpu_us_per_op(headers_case, 50_000, repeat)

        router = gateway.router

        def route_case(n: int) -> None:
            for _ in range(n):
                router.match("/api/orders")

        results["route"] = cpu_us_per_op(route_case, 100_000, repeat)

        matches = getattr(router, "_matches", {})

        def route_uncached_case(n: int) -> None:
            for _ in range(n):
                matches.clear()
                router.match("/api/orders")

        results["route_uncached"] = cpu_us_per_op(route_uncached_case, 100_000, repeat)

        from gateway.tokens import extract

        presented = getattr(extract, "presented_token", None)
        auth_headers, query = request.headers, request.query_string

        def bearer_case(n: int) -> None:
            for _ in range(n):
                extract.bearer_token(auth_headers, query)

        results["bearer_token"] = cpu_us_per_op(bearer_case, 100_000, repeat)
        if presented is not None:

            def presented_case(n: int) -> None:
                for _ in range(n):
                    presented(auth_headers, query)

            results["presented_token"] = cpu_us_per_op(presented_case, 100_000, repeat)

        def metrics_case(n: int) -> None:
            # What the request path records now: the requests counter and the duration
            # histogram (Pipeline._count), the idle gap, the upstream's and the store call's
            # durations, the last three through the batched fronts; in-flight is a plain int.
            pipeline = gateway.pipeline
            count, idle_gap = pipeline._count, pipeline._idle_gap
            observe_upstream = gateway.forwarder._observe_upstream
            store_duration = metrics.batched(metrics.STORE_DURATION.labels(op="check_and_touch"))
            traffic = pipeline.traffic
            outcome_type = type(_record())
            started = time.perf_counter()
            for _ in range(n):
                traffic.in_flight += 1
                store_duration.observe(0.0002)
                idle_gap.observe(3.0)
                observe_upstream("/api/", started)
                traffic.leave()
                count(outcome_type(route="/api/"), 0.001)

        def metrics_unbatched_case(n: int) -> None:
            # The same observations made straight on Prometheus (as before the batching).
            requests = metrics.REQUESTS.labels("/api/", "allowed", "ok")
            duration = metrics.REQUEST_DURATION.labels("/api/")
            upstream = metrics.UPSTREAM_DURATION.labels("/api/")
            store_duration = metrics.STORE_DURATION.labels(op="check_and_touch")
            for _ in range(n):
                metrics.IN_FLIGHT.inc()
                store_duration.observe(0.0002)
                metrics.TOKEN_IDLE_GAP.observe(3.0)
                upstream.observe(0.001)
                metrics.IN_FLIGHT.dec()
                requests.inc()
                duration.observe(0.001)

        results["metrics"] = cpu_us_per_op(metrics_case, 50_000, repeat)
        results["metrics_unbatched"] = cpu_us_per_op(metrics_unbatched_case, 50_000, repeat)

        import uuid

        def uuid_case(n: int) -> None:
            for _ in range(n):
                _ = uuid.uuid4().hex

        results["request_id_uuid4"] = cpu_us_per_op(uuid_case, 100_000, repeat)

        # -- aiohttp dispatch ----------------------------------------------------------------
        prepared = web.Response(body=b"ok")

        async def trivial(_request: web.BaseRequest) -> web.StreamResponse:
            return prepared

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", trivial)
        app.freeze()
        app_request = make_mocked_request("GET", "/api/orders", app=app)

        async def via_app(n: int) -> None:
            handle = app._handle
            for _ in range(n):
                await handle(app_request)

        async def direct(n: int) -> None:
            for _ in range(n):
                await trivial(app_request)

        results["dispatch_app"] = await acpu_us_per_op(via_app, 50_000, repeat)
        results["dispatch_direct"] = await acpu_us_per_op(direct, 50_000, repeat)
    finally:
        await gateway.close()
    return results


def _record() -> Any:
    from gateway import pipeline

    return pipeline._RequestRecord()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--public-key", required=True)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--coalesce", metavar="DURATION", help="store.coalesce for the gateway (store_touch)"
    )
    parser.add_argument("--json", action="store_true", help="one BENCH_JSON line")
    args = parser.parse_args()
    results = uvloop.run(main_async(args))
    if args.json:
        print("BENCH_JSON " + json.dumps(results), flush=True)
    else:
        for name, value in results.items():
            print(f"{name:24s} {value:9.2f} µs")


if __name__ == "__main__":
    main()
