"""Throughput on Redis Sentinel and Redis Cluster ÷ plain Redis, in the same run (issue 13).

A benchmark, not a test. Starts on 127.0.0.1 only: a plain redis-server, a Sentinel set (a
master, a replica, three sentinels) and a Cluster (three masters, three replicas), the same
topologies the test suite starts (tests/redis_topologies.py), the bench upstream, and one
`idlegate serve` per topology (`redis://`, `redis+sentinel://`, `redis+cluster://`). Every
gateway is pinned to core 0, everything else (Redis, sentinels, upstream, wrk) to core 1, as
in bench/run.py. wrk cycles `--tokens` distinct tokens; the rounds are interleaved (plain,
sentinel, cluster, then the other way round, ...).

For each run it reads `INFO commandstats` on every node of the topology before and after:
check_and_touch.lua runs one GET, revocations.lua (the poll) one HGET, so
(EVALSHA - HGET) ÷ requests handled = store round trips per request.

    .venv/bin/python bench/topologies.py --rounds 3 --duration 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

from common import OUT, command_calls  # noqa: E402
from run import LOAD_CPU, SUT_CPU, Bench, Target, describe, machine  # noqa: E402


class TopologyBench(Bench):
    """bench/run.py's Bench, with the store URL and the Redis nodes counted per gateway."""

    store_url: str = ""
    nodes: dict[str, list[int]]
    topology_pids: list[int]

    def gateway_config(
        self, name: str, public_key: Path, coalesce: str | None = None
    ) -> tuple[Path, int, int]:
        path, port, admin_port = super().gateway_config(name, public_key, coalesce)
        config = yaml.safe_load(path.read_text())
        config["store"]["url"] = self.store_url
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path, port, admin_port

    def aux_pids(self) -> list[int]:
        """Every Redis process of every topology counts as aux (core 1), not as another
        user's load: otherwise each Sentinel/Cluster run looked noisy and was repeated."""
        return super().aux_pids() + self.topology_pids

    def snapshot(self, target: Target) -> dict[str, Any]:
        snap = super().snapshot(target)
        if target.admin is not None:
            total: Counter[str] = Counter()
            for port in self.nodes[target.name]:
                total.update(command_calls(port))
            snap["redis"] = dict(total)
        return snap


def pin(pids: list[int], cpus: str) -> None:
    """Like bench/run.py's taskset: the topologies' servers share core 1 with plain Redis."""
    with contextlib.suppress(AttributeError, OSError):
        for pid in pids:
            os.sched_setaffinity(pid, {int(c) for c in cpus.split(",")})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=1000, help="distinct tokens cycled")
    parser.add_argument("--topologies", default="sentinel,cluster")
    parser.add_argument("--quiet-threshold", type=float, default=0.25)
    parser.add_argument("--quiet-wait", type=float, default=20.0)
    parser.add_argument("--max-foreign", type=float, default=0.10)
    parser.add_argument("--retries", type=int, default=1)
    return parser.parse_args()


def main() -> int:
    import conftest  # noqa: F401  (first: redis_topologies and conftest import each other)
    from redis_topologies import _start_cluster, _start_sentinel_set

    args = parse_args()
    out = OUT / ("topologies-" + time.strftime("%Y%m%d-%H%M%S"))
    (out / "raw").mkdir(parents=True, exist_ok=True)
    bench = TopologyBench(args, out)
    bench.nodes = {}
    bench.topology_pids = []
    bench.results["machine"] = machine()
    bench.results["args"] = vars(args)
    wanted = [t for t in args.topologies.split(",") if t]
    started: list[Any] = []
    print(f"output: {out}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="idlegate-topologies-"))
    try:
        bench.start_aux()
        targets: list[Target] = []
        bench.store_url = f"redis://127.0.0.1:{bench.redis_port}/0"
        bench.nodes["plain"] = [bench.redis_port]
        targets.append(bench.start_gateway("plain", SUT_CPU))
        for name in wanted:
            topology = (_start_sentinel_set if name == "sentinel" else _start_cluster)(
                workdir / name
            )
            started.append(topology)
            servers = (
                [topology.master, topology.replica, *topology.sentinels]
                if name == "sentinel"
                else topology.nodes
            )
            pids = [s.process.pid for s in servers if s.process is not None]
            pin(pids, LOAD_CPU)
            bench.topology_pids += pids
            bench.store_url = topology.url
            # Data nodes only (sentinels run no EVALSHA).
            bench.nodes[name] = [s.port for s in servers if not hasattr(s, "master_port")]
            targets.append(bench.start_gateway(name, SUT_CPU))
        tokens = bench.tokens(args.tokens)
        for target in targets:  # connections opened, scripts loaded on every node
            bench.wrk(target, tokens, 2, f"warmup-{target.name}", LOAD_CPU, retry=False)
        rounds: list[dict[str, Any]] = []
        for number in range(args.rounds):
            order = targets if number % 2 == 0 else targets[::-1]
            results = {}
            for target in order:
                result = bench.wrk(
                    target, tokens, args.duration, f"r{number}-{target.name}", LOAD_CPU
                )
                results[target.name] = result
                print(f"  round {number} {describe(result)}", flush=True)
            rounds.append(results)
        bench.results["rounds"] = rounds
        summary: dict[str, Any] = {}
        for target in targets:
            runs = [r[target.name] for r in rounds]
            summary[target.name] = {
                "rps_median": statistics.median(r["rps"] for r in runs),
                "p99_ms_median": statistics.median(r["p99_ms"] for r in runs),
                "round_trips_per_request": [
                    round(r["redis"]["round_trips_per_handled_request"], 4) for r in runs
                ],
                "errors": [r["errors"] for r in runs],
            }

        def per_cpu(result: dict[str, Any]) -> float:
            return float(result["rps"]) / max(0.01, float(result["sut_cpu_util"]))

        for target in targets[1:]:
            ratios = [r[target.name]["rps"] / r["plain"]["rps"] for r in rounds]
            summary[target.name]["ratio_to_plain_by_round"] = [round(x, 3) for x in ratios]
            summary[target.name]["ratio_to_plain_median"] = round(statistics.median(ratios), 3)
            # Requests per CPU-second of the gateway: what the topology costs the gateway
            # itself, robust to other users of a shared machine taking core 0 in turns.
            cpu = [per_cpu(r[target.name]) / per_cpu(r["plain"]) for r in rounds]
            summary[target.name]["per_cpu_ratio_by_round"] = [round(x, 3) for x in cpu]
            summary[target.name]["per_cpu_ratio_median"] = round(statistics.median(cpu), 3)
        bench.results["summary"] = summary
        print(json.dumps(summary, indent=2), flush=True)
    finally:
        bench.procs.stop_all()
        for topology in started:
            topology.stop()
        (out / "results.json").write_text(json.dumps(bench.results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
