"""idlegate benchmark: the gateway against a bare aiohttp pass-through, interleaved round by round.

    .venv/bin/python bench/run.py --rounds 3 --duration 10            # everything but memory
    .venv/bin/python bench/run.py --phases memory --memory-seconds 300 # the long memory run

Starts on 127.0.0.1 only: a redis-server of its own (free port, no persistence), the upstream
(bench/upstream.py), the bare proxy (bench/bare_proxy.py) and the gateway
(`python -m gateway serve -c <generated config>`, RS256 public key file, Redis store, access log
off, idle timeout 15m). Load comes from wrk (closed loop, 50 keep-alive connections, a pool of
distinct tokens cycled per request) and from bench/openloop.py (open loop at a fixed rate).

Pinning (2 cores): the system under test (gateway or bare proxy, one process) on core 0; wrk,
the open-loop generator, py-spy, redis-server and the upstream on core 1. Core 0 then carries
only the code being compared, and every run records the CPU each process used so it can be
checked that core 0 was the bottleneck and core 1 was not. `--workers 2` cannot be pinned that
way (it needs both cores): that phase runs everything unpinned, see RESULTS.md.

Phases: throughput, latency, workers, profile (default), memory (opt-in, long).
Raw outputs: bench/out/<timestamp>/ (logs, wrk/openloop JSON, profiles, results.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BENCH,
    OUT,
    PYTHON,
    ROOT,
    Proc,
    Procs,
    command_calls,
    cpu_model,
    cpu_seconds,
    cpu_split,
    descendants,
    free_port,
    have_taskset,
    http_get,
    pinned,
    redis_info,
    resp_command,
    rss_kib,
    start_redis,
    syscalls,
    system_busy_seconds,
    wait_port,
)
from profile_summary import load as load_profile
from profile_summary import report as profile_report
from tokens import provider, write_key, write_tokens

PATH = "/api/orders"
SUT_CPU = "0"
LOAD_CPU = "1"
ALL_CPUS = None
PACKAGES_REPORTED = (
    "aiohttp", "redis", "hiredis", "uvloop", "PyJWT", "cryptography",
    "prometheus_client", "multidict", "yarl", "py-spy",
)  # fmt: skip
PHASES = ("throughput", "cpucost", "latency", "workers", "profile", "memory")


@dataclass
class Target:
    """Something wrk can be pointed at: its URL and the processes whose CPU counts as its own."""

    name: str
    proc: Proc
    url: str
    admin: str | None = None

    def pids(self) -> list[int]:
        return descendants(self.proc.pid)


@dataclass
class Bench:
    args: argparse.Namespace
    out: Path
    procs: Procs = field(default_factory=Procs)
    redis: Proc | None = None
    redis_port: int = 0
    upstream: Proc | None = None
    upstream_url: str = ""
    results: dict[str, Any] = field(default_factory=dict)

    # -- processes ---------------------------------------------------------------------------

    def aux_pids(self) -> list[int]:
        pids = []
        for proc in (self.redis, self.upstream):
            if proc is not None:
                pids += descendants(proc.pid)
        return pids

    def start_aux(self) -> None:
        self.redis, self.redis_port = start_redis(self.procs, self.out / "redis", LOAD_CPU)
        port = free_port()
        cmd = [PYTHON, str(BENCH / "upstream.py"), "--port", str(port)]
        self.upstream = self.procs.start(
            Proc("upstream", pinned(cmd, LOAD_CPU), self.out / "logs" / "upstream.log")
        )
        wait_port(port)
        self.upstream_url = f"http://127.0.0.1:{port}"

    def start_bare(self, cpus: str | None, name: str = "bare", client: str = "aiohttp") -> Target:
        port = free_port()
        cmd = [PYTHON, str(BENCH / "bare_proxy.py"), "--port", str(port)]
        cmd += ["--upstream", self.upstream_url, "--client", client]
        proc = self.procs.start(Proc(name, pinned(cmd, cpus), self.out / "logs" / f"{name}.log"))
        wait_port(port)
        return Target(name, proc, f"http://127.0.0.1:{port}{PATH}")

    def gateway_config(
        self, name: str, public_key: Path, coalesce: str | None = None
    ) -> tuple[Path, int, int]:
        port, admin_port = free_port(), free_port()
        config: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": port},
            "admin": {"host": "127.0.0.1", "port": admin_port},
            "server": {"access_log": False, "log_level": "warning", "shutdown_grace": "2s"},
            "store": {"url": f"redis://127.0.0.1:{self.redis_port}/0", "timeout": "250ms"},
            "policy": {"idle_timeout": "15m", "max_token_lifetime": "15m"},
            "providers": [provider(public_key)],
            "routes": [{"prefix": "/api/", "upstream": self.upstream_url}],
        }
        if coalesce is not None:
            config["store"]["coalesce"] = coalesce
        path = self.out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path, port, admin_port

    def start_gateway(
        self,
        name: str,
        cpus: str | None,
        workers: int = 1,
        cwd: Path | None = None,
        coalesce: str | None = None,
    ) -> Target:
        """`python -m gateway serve` run from `cwd` (default: this checkout), so a copy of the
        gateway with a candidate change can be measured side by side (`--variant`); with
        `coalesce`, configured with that `store.coalesce` (`--coalesce`)."""
        _, public_key = write_key(OUT)
        config, port, admin_port = self.gateway_config(name, public_key, coalesce)
        cmd = [PYTHON, "-m", "gateway", "serve", "-c", str(config)]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        log = self.out / "logs" / f"{name}.log"
        proc = self.procs.start(Proc(name, pinned(cmd, cpus), log, env=env, cwd=cwd or ROOT))
        self.results.setdefault("gateway_code", {})[name] = (
            gateway_code() if cwd is None else {"directory": str(cwd)}
        )
        admin = f"http://127.0.0.1:{admin_port}"
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                if http_get(admin + "/readyz")[0] == 200:
                    break
            if not proc.alive() or time.monotonic() > deadline:
                log = proc.log.read_text()[-2000:]
                raise SystemExit(f"gateway {name} did not become ready:\n{log}")
            time.sleep(0.1)
        return Target(name, proc, f"http://127.0.0.1:{port}{PATH}", admin)

    def tokens(self, count: int) -> Path:
        """Freshly minted (iat = now) so that the tokens stay valid for the whole phase."""
        started = time.perf_counter()
        path = write_tokens(count, self.out / f"tokens-{count}.txt", OUT)
        print(f"  minted {count} tokens in {time.perf_counter() - started:.1f}s", flush=True)
        return path

    # -- measurements --------------------------------------------------------------------------

    def wait_quiet(self) -> dict[str, float]:
        """Before a measured run: wait (up to --quiet-wait s) until the machine is quiet, i.e.
        less than --quiet-threshold cores busy over one second while our own processes idle.
        Other users of a shared machine (test suites) otherwise land on the measured core."""
        waited_from = time.monotonic()
        busy = 0.0
        while True:
            before = system_busy_seconds()
            time.sleep(1.0)
            busy = system_busy_seconds() - before
            if busy < self.args.quiet_threshold:
                break
            if time.monotonic() - waited_from > self.args.quiet_wait:
                print(f"    (machine still busy: {busy:.2f} cores; measuring anyway)")
                break
        return {"waited_s": time.monotonic() - waited_from - 1.0, "idle_busy_cores": busy}

    def snapshot(self, target: Target) -> dict[str, Any]:
        sut_user, sut_system = cpu_split(target.pids())
        snap: dict[str, Any] = {
            "t": time.monotonic(),
            "sut_cpu": sut_user + sut_system,
            "sut_user": sut_user,
            "sut_system": sut_system,
            "sut_syscalls": syscalls(target.pids()),
            "aux_cpu": cpu_seconds(self.aux_pids()),
            "system_busy": system_busy_seconds(),
        }
        if target.admin is not None:
            snap["redis"] = command_calls(self.redis_port)
            snap["requests"] = gateway_requests(target.admin)
        return snap

    def wrk(
        self,
        target: Target,
        tokens: Path,
        duration: float,
        label: str,
        cpus: str | None,
        start: int = 0,
        retry: bool = True,
    ) -> dict[str, Any]:
        """One wrk run; repeated (up to --retries times) while other users of the machine took
        more than --max-foreign of a core during it. Every attempt is kept in the raw output."""
        attempt = 0
        while True:
            result = self._wrk_once(target, tokens, duration, f"{label}-a{attempt}", cpus, start)
            result["attempt"] = attempt
            if duration < 5 or result["foreign_cpu_util"] <= self.args.max_foreign:
                return result
            if attempt >= self.args.retries or not retry:
                result["noisy"] = True
                return result
            print(f"    {label}: other load {result['foreign_cpu_util']:.0%}, again", flush=True)
            attempt += 1

    def _wrk_once(
        self,
        target: Target,
        tokens: Path,
        duration: float,
        label: str,
        cpus: str | None,
        start: int = 0,
    ) -> dict[str, Any]:
        quiet = self.wait_quiet() if duration >= 5 else {}
        before = self.snapshot(target)
        cmd = [
            "wrk", "-t1", f"-c{self.args.connections}", f"-d{max(1, round(duration))}s",
            "--timeout", "5s",
            "-s", str(BENCH / "auth.lua"), target.url, "--", str(tokens), str(start),
        ]  # fmt: skip
        wrk_started = time.monotonic()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(
            pinned(cmd, cpus), capture_output=True, text=True, timeout=duration + 60, check=False
        )
        wall = time.monotonic() - wrk_started
        wrk_cpu = child_cpu_since(children) / wall
        (self.out / "raw" / f"{label}.wrk.txt").write_text(done.stdout + done.stderr)
        time.sleep(0.3)  # requests still in flight when wrk stopped reach Redis and the metrics
        after = self.snapshot(target)
        report = parse_bench_json(done.stdout, label)
        seconds = report["duration_us"] / 1e6
        result: dict[str, Any] = {
            "label": label,
            "target": target.name,
            "requests": report["requests"],
            "rps": report["requests"] / seconds,
            "p50_ms": report["latency_us"]["p50"] / 1000,
            "p99_ms": report["latency_us"]["p99"] / 1000,
            "p999_ms": report["latency_us"]["p999"] / 1000,
            "errors": report["errors"],
            "sut_cpu_util": (after["sut_cpu"] - before["sut_cpu"]) / wall,
            **per_request_costs(before, after, report["requests"]),
            "aux_cpu_util": (after["aux_cpu"] - before["aux_cpu"]) / wall,
            "wrk_cpu_util": wrk_cpu,
            # Busy CPU on the machine not used by the SUT, redis, the upstream or wrk (other
            # users of a shared machine, py-spy): a round with a lot of it is suspect.
            "foreign_cpu_util": foreign_cpu(before, after, wall, wrk_cpu),
            "quiet": quiet,
        }
        if target.admin is not None:
            result["redis"] = redis_accounting(before, after, report["requests"])
        return result

    def openloop(
        self, target: Target, tokens: Path, rate: float, duration: float, label: str
    ) -> dict[str, Any]:
        """One open-loop run, repeated like `wrk` while the machine was not quiet."""
        attempt = 0
        while True:
            result = self._openloop_once(target, tokens, rate, duration, f"{label}-a{attempt}")
            result["attempt"] = attempt
            if duration < 5 or result["foreign_cpu_util"] <= self.args.max_foreign:
                return result
            if attempt >= self.args.retries:
                result["noisy"] = True
                return result
            print(f"    {label}: other load {result['foreign_cpu_util']:.0%}, again", flush=True)
            attempt += 1

    def _openloop_once(
        self, target: Target, tokens: Path, rate: float, duration: float, label: str
    ) -> dict[str, Any]:
        port = target.url.split(":")[2].split("/")[0]
        cmd = [
            PYTHON, str(BENCH / "openloop.py"), "--port", port, "--path", PATH,
            "--tokens", str(tokens), "--rate", f"{rate:.0f}", "--duration", f"{duration:g}",
            "--connections", str(self.args.connections),
        ]  # fmt: skip
        quiet = self.wait_quiet() if duration >= 5 else {}
        before = self.snapshot(target)
        started = time.monotonic()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(
            pinned(cmd, LOAD_CPU),
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=False,
        )
        wall = time.monotonic() - started
        after = self.snapshot(target)
        (self.out / "raw" / f"{label}.openloop.txt").write_text(done.stdout + done.stderr)
        report = parse_bench_json(done.stdout, label)
        return {
            "label": label,
            "target": target.name,
            "rate_target": rate,
            "achieved_rate": report["achieved_rate"],
            "requests": report["requests"],
            "statuses": report["statuses"],
            "errors": report["errors"],
            "p50_ms": report["latency_us"]["p50"] / 1000,
            "p99_ms": report["latency_us"]["p99"] / 1000,
            "p999_ms": report["latency_us"]["p999"] / 1000,
            "max_ms": report["latency_us"]["max"] / 1000,
            "generator_lag_max_ms": report["generator_lag_us"]["max"] / 1000,
            "sut_cpu_util": (after["sut_cpu"] - before["sut_cpu"]) / wall,
            # CPU the system under test spent per request (warm-up requests included).
            "cpu_us_per_request": (after["sut_cpu"] - before["sut_cpu"])
            / max(1, report["sent_total"])
            * 1e6,
            "foreign_cpu_util": foreign_cpu(before, after, wall, child_cpu_since(children) / wall),
            "quiet": quiet,
        }

    # -- phases ----------------------------------------------------------------------------------

    def phase_throughput(self, bare: Target, gateway: Target, variants: list[Target]) -> None:
        """Closed loop (wrk), every target once per round, the order rotating between rounds."""
        args = self.args
        targets = [bare, gateway, *variants]
        tokens = self.tokens(args.tokens)
        print("throughput: warm-up (fills the verified-token cache, keep-alive pools)", flush=True)
        for target in targets:
            self.wrk(target, tokens, 3, f"warmup-{target.name}", LOAD_CPU)
        rounds = []
        for index in range(args.rounds):
            shift = index % len(targets)
            order = targets[shift:] + targets[:shift]
            row: dict[str, Any] = {}
            for target in order:
                result = self.wrk(
                    target, tokens, args.duration, f"tp-r{index + 1}-{target.name}", LOAD_CPU
                )
                result["rps_per_cpu"] = result["rps"] / max(0.01, result["sut_cpu_util"])
                row[target.name] = result
                print(f"  round {index + 1} {describe(result)}", flush=True)
            for target in targets[1:]:
                row[f"ratio_{target.name}"] = row[target.name]["rps"] / row["bare"]["rps"]
                row[f"cpu_ratio_{target.name}"] = (
                    row[target.name]["rps_per_cpu"] / row["bare"]["rps_per_cpu"]
                )
                print(
                    f"  round {index + 1} {target.name}/bare = "
                    f"{row[f'ratio_{target.name}']:.3f} (per CPU-second "
                    f"{row[f'cpu_ratio_{target.name}']:.3f})",
                    flush=True,
                )
            row["ratio_rps"] = row["ratio_gateway"]
            if "bare-lean" in row:
                for target in targets:
                    if target.admin is None:
                        continue  # the references themselves
                    ratio = row[target.name]["rps"] / row["bare-lean"]["rps"]
                    row[f"{target.name}_over_bare_lean"] = ratio
                    print(f"  round {index + 1} {target.name}/bare-lean = {ratio:.3f}", flush=True)
            rounds.append(row)
        self.results["throughput"] = {
            "rounds": rounds,
            "median": medians(rounds, [t.name for t in targets]),
        }

    def phase_latency(self, bare: Target, gateway: Target, variants: list[Target]) -> None:
        args = self.args
        peak = self.results.get("throughput", {}).get("median", {}).get("bare_rps")
        if peak is None:
            tokens = self.tokens(args.tokens)
            peaks = [
                self.wrk(bare, tokens, args.duration, f"lat-peak-{i}", LOAD_CPU)["rps"]
                for i in range(args.rounds)
            ]
            peak = statistics.median(peaks)
        levels = []
        for load in args.latency_loads:
            levels.append(self.latency_level(bare, gateway, variants, peak, load))
        self.results["latency"] = {"bare_peak_rps": peak, "levels": levels}

    def latency_level(
        self, bare: Target, gateway: Target, variants: list[Target], peak: float, load: float
    ) -> dict[str, Any]:
        args = self.args
        rate = peak * load
        tokens = self.tokens(args.tokens)
        print(f"latency: open loop at {rate:.0f} req/s ({load:.0%} of bare peak {peak:.0f})")
        targets = [bare, gateway, *variants]
        for target in targets:  # warm-up at the same rate
            self.openloop(target, tokens, rate, 2, f"lat{load:g}-warmup-{target.name}")
        rounds = []
        for index in range(args.rounds):
            shift = index % len(targets)
            order = targets[shift:] + targets[:shift]
            row: dict[str, Any] = {}
            for target in order:
                label = f"lat{load:g}-r{index + 1}-{target.name}"
                result = self.openloop(target, tokens, rate, args.duration, label)
                row[target.name] = result
                print(
                    f"  round {index + 1} {target.name:8s} {result['achieved_rate']:8.0f} req/s"
                    f"  p50 {result['p50_ms']:.3f} ms  p99 {result['p99_ms']:.3f} ms"
                    f"  p99.9 {result['p999_ms']:.3f} ms  cpu {result['sut_cpu_util']:.0%}"
                    f"  other {result['foreign_cpu_util']:.0%}",
                    flush=True,
                )
            row["added_p50_ms"] = row["gateway"]["p50_ms"] - row["bare"]["p50_ms"]
            row["added_p99_ms"] = row["gateway"]["p99_ms"] - row["bare"]["p99_ms"]
            for variant in variants:
                row[f"added_p99_ms_{variant.name}"] = (
                    row[variant.name]["p99_ms"] - row["bare"]["p99_ms"]
                )
            print(f"  round {index + 1} added p99 = {row['added_p99_ms']:.3f} ms", flush=True)
            rounds.append(row)

        def median_of(pick: Any) -> float:
            return statistics.median(pick(r) for r in rounds)

        return {
            "load": load,
            "rate": rate,
            "rounds": rounds,
            "median": {
                "added_p50_ms": median_of(lambda r: r["added_p50_ms"]),
                "added_p99_ms": median_of(lambda r: r["added_p99_ms"]),
                "bare_p50_ms": median_of(lambda r: r["bare"]["p50_ms"]),
                "gateway_p50_ms": median_of(lambda r: r["gateway"]["p50_ms"]),
                "bare_p99_ms": median_of(lambda r: r["bare"]["p99_ms"]),
                "gateway_p99_ms": median_of(lambda r: r["gateway"]["p99_ms"]),
                "bare_cpu": median_of(lambda r: r["bare"]["sut_cpu_util"]),
                "gateway_cpu": median_of(lambda r: r["gateway"]["sut_cpu_util"]),
                **{
                    f"{v.name}_p99_ms": statistics.median(r[v.name]["p99_ms"] for r in rounds)
                    for v in variants
                },
                **{
                    f"added_p99_ms_{v.name}": statistics.median(
                        r[f"added_p99_ms_{v.name}"] for r in rounds
                    )
                    for v in variants
                },
            },
        }

    def phase_cpucost(self, targets: list[Target]) -> None:
        """CPU per request of each target at one fixed open-loop rate below every target's
        saturation: less sensitive to other load on the machine than peak throughput, so it is
        the measure for comparing `--variant`s. Short runs, many interleaved rounds."""
        args = self.args
        tokens = self.tokens(args.tokens)
        rate = args.cpucost_rate
        print(f"cpu cost: open loop at {rate:.0f} req/s, CPU µs per request", flush=True)
        for target in targets:
            self.openloop(target, tokens, rate, 2, f"cpu-warmup-{target.name}")
        rounds = []
        for index in range(args.cpucost_rounds):
            shift = index % len(targets)
            row = {}
            for target in targets[shift:] + targets[:shift]:
                label = f"cpu-r{index + 1}-{target.name}"
                result = self.openloop(target, tokens, rate, args.cpucost_seconds, label)
                row[target.name] = result
            print(
                f"  round {index + 1} "
                + "  ".join(
                    f"{name} {r['cpu_us_per_request']:.0f}" + (f"/{r['p99_ms']:.1f}ms" if r else "")
                    for name, r in row.items()
                ),
                flush=True,
            )
            rounds.append(row)
        median = {
            t.name: statistics.median(r[t.name]["cpu_us_per_request"] for r in rounds)
            for t in targets
        }
        self.results["cpucost"] = {"rate": rate, "rounds": rounds, "median_us": median}

    def phase_workers(self) -> None:
        """1 worker vs `--workers 2`, everything unpinned (2 workers need both cores)."""
        args = self.args
        self.set_aux_affinity(None)
        one = self.start_gateway("gateway-1w", ALL_CPUS)
        two = self.start_gateway("gateway-2w", ALL_CPUS, workers=2)
        tokens = self.tokens(args.tokens)
        try:
            print("workers: 1 vs 2 gateway processes, nothing pinned")
            for target in (one, two):
                self.wrk(target, tokens, 3, f"warmup-{target.name}", ALL_CPUS)
            rounds = []
            for index in range(args.rounds):
                order = (one, two) if index % 2 == 0 else (two, one)
                row = {}
                for target in order:
                    result = self.wrk(
                        target, tokens, args.duration, f"wk-r{index + 1}-{target.name}", ALL_CPUS
                    )
                    row[target.name] = result
                    print(f"  round {index + 1} {describe(result)}", flush=True)
                row["ratio_rps"] = row["gateway-2w"]["rps"] / row["gateway-1w"]["rps"]
                # Requests per core of gateway CPU, 2 workers over 1: near 1.0 means the
                # workers do not slow each other down, and the ratio above is bounded by the
                # cores left free (an inference for machines with more cores, not a measurement).
                row["per_core_ratio"] = (
                    row["gateway-2w"]["rps"] / max(0.01, row["gateway-2w"]["sut_cpu_util"])
                ) / (row["gateway-1w"]["rps"] / max(0.01, row["gateway-1w"]["sut_cpu_util"]))
                print(
                    f"  round {index + 1} 2w/1w = {row['ratio_rps']:.3f}"
                    f" (per core of gateway CPU {row['per_core_ratio']:.3f})",
                    flush=True,
                )
                rounds.append(row)
            self.results["workers"] = {
                "rounds": rounds,
                "median": {
                    "1w_rps": statistics.median(r["gateway-1w"]["rps"] for r in rounds),
                    "2w_rps": statistics.median(r["gateway-2w"]["rps"] for r in rounds),
                    "ratio_rps": statistics.median(r["ratio_rps"] for r in rounds),
                    "1w_cpu": statistics.median(r["gateway-1w"]["sut_cpu_util"] for r in rounds),
                    "2w_cpu": statistics.median(r["gateway-2w"]["sut_cpu_util"] for r in rounds),
                    "per_core_ratio": statistics.median(r["per_core_ratio"] for r in rounds),
                },
            }
        finally:
            self.procs.stop(one.proc)
            self.procs.stop(two.proc)
            self.set_aux_affinity(LOAD_CPU)

    def set_aux_affinity(self, cpus: str | None) -> None:
        if not have_taskset():
            return
        wanted = set(range(os.cpu_count() or 1)) if cpus is None else {int(cpus)}
        for pid in self.aux_pids():
            with contextlib.suppress(OSError):
                for task in Path(f"/proc/{pid}/task").iterdir():
                    os.sched_setaffinity(int(task.name), wanted)

    def phase_profile(self, bare: Target, gateway: Target) -> None:
        args = self.args
        py_spy = Path(PYTHON).parent / "py-spy"
        if not py_spy.exists():
            print("profile: py-spy not found in the venv, skipped (pip install py-spy)")
            return
        tokens = self.tokens(args.tokens)
        summaries = {}
        for target in (bare, gateway):
            self.wrk(target, tokens, 2, f"prof-warmup-{target.name}", LOAD_CPU)
            raw = self.out / f"profile-{target.name}.txt"
            cmd = [
                str(py_spy), "record", "--nonblocking", "--rate", "200", "--format", "raw",
                "-o", str(raw), "-p", str(target.proc.pid), "-d", str(int(args.profile_seconds)),
            ]  # fmt: skip
            spy = subprocess.Popen(
                pinned(cmd, LOAD_CPU), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
            )
            try:
                time.sleep(0.5)
                # py-spy itself shows as "other" load here: no repeats.
                result = self.wrk(
                    target,
                    tokens,
                    args.profile_seconds,
                    f"prof-{target.name}",
                    LOAD_CPU,
                    retry=False,
                )
                spy.wait(timeout=args.profile_seconds + 30)
            finally:
                if spy.poll() is None:
                    spy.kill()
                    spy.wait()
            if raw.exists():
                text = profile_report(load_profile(raw), args.profile_top)
                (self.out / f"profile-{target.name}.summary.txt").write_text(text)
                summaries[target.name] = {"raw": str(raw), "under_profiler": result}
                print(f"profile {target.name}: {raw} ({describe(result)})")
                print("\n".join("    " + line for line in text.splitlines()[:20]))
        self.results["profile"] = summaries

    def start_py_spy(
        self, target: Target, name: str, seconds: int
    ) -> subprocess.Popen[bytes] | None:
        py_spy = Path(PYTHON).parent / "py-spy"
        if not py_spy.exists():
            return None
        raw = self.out / f"profile-{name}.txt"
        cmd = [
            str(py_spy), "record", "--nonblocking", "--rate", "200", "--format", "raw",
            "-o", str(raw), "-p", str(target.proc.pid), "-d", str(seconds),
        ]  # fmt: skip
        return subprocess.Popen(
            pinned(cmd, LOAD_CPU), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )

    def phase_memory(self) -> None:
        """RSS after `memory_requests` requests over `memory_tokens` distinct tokens, and the
        Redis bytes per tracked token. Bounded by `--memory-seconds`."""
        args = self.args
        tokens = self.tokens(args.memory_tokens)
        resp_command(self.redis_port, "FLUSHALL")
        time.sleep(0.5)
        base_memory = int(redis_info(self.redis_port, "memory")["used_memory"])
        memory_dir = Path(args.memory_dir) if args.memory_dir else None
        gateway = self.start_gateway("gateway-mem", SUT_CPU, cwd=memory_dir)
        rss_start = rss_kib(gateway.proc.pid)
        print(f"memory: {args.memory_tokens} tokens, up to {args.memory_requests} requests")
        total = 0
        series: list[dict[str, Any]] = []
        # Kept as it grows, so a run cut short still leaves its series in results.json.
        self.results["memory_series"] = series
        started = time.monotonic()
        chunk = 0
        try:
            while total < args.memory_requests:
                left = args.memory_seconds - (time.monotonic() - started)
                if left < 5:
                    break
                chunk += 1
                rate = total / max(1e-9, time.monotonic() - started) if total else 0
                need = (args.memory_requests - total) / rate if rate else 10
                duration = int(max(5, min(30, left, math.ceil(need))))
                spy = self.start_py_spy(gateway, f"mem-{chunk}", 20) if chunk == 3 else None
                result = self.wrk(
                    gateway, tokens, duration, f"mem-{chunk}", LOAD_CPU, total, retry=False
                )
                if spy is not None:
                    spy.wait(timeout=60)
                total += result["requests"]
                rss = rss_kib(gateway.proc.pid)
                keys = resp_command(self.redis_port, "DBSIZE")
                series.append(
                    {"requests": total, "rps": result["rps"], "rss_kib": rss, "keys": keys}
                )
                print(
                    f"  {total:9d} requests  {result['rps']:7.0f} req/s  RSS "
                    f"{rss['VmRSS'] / 1024:6.1f} MiB  redis keys {keys}",
                    flush=True,
                )
            info = redis_info(self.redis_port, "memory")
            keys = resp_command(self.redis_port, "DBSIZE")
            assert isinstance(keys, int)
            usage = sample_memory_usage(self.redis_port, 500)
            used = int(info["used_memory"])
            self.results["memory"] = {
                "tokens": args.memory_tokens,
                "requests": total,
                "seconds": time.monotonic() - started,
                "rss_start_kib": rss_start,
                "rss_end_kib": rss_kib(gateway.proc.pid),
                "series": series,
                "redis_keys": keys,
                "gateway_requests": gateway_requests(gateway.admin or ""),
                "redis_used_memory_delta": used - base_memory,
                "redis_bytes_per_key_delta": (used - base_memory) / max(1, keys),
                "redis_memory_usage_sample": usage,
                "redis_info_memory": {
                    k: info[k]
                    for k in ("used_memory", "used_memory_dataset", "mem_allocator")
                    if k in info
                },
            }
        finally:
            self.procs.stop(gateway.proc)


# -- helpers ----------------------------------------------------------------------------------


def foreign_cpu(
    before: dict[str, Any], after: dict[str, Any], wall: float, load_util: float
) -> float:
    busy = (after["system_busy"] - before["system_busy"]) / wall
    ours = (after["sut_cpu"] - before["sut_cpu"] + after["aux_cpu"] - before["aux_cpu"]) / wall
    return max(0.0, busy - ours - load_util)


def child_cpu_since(before: resource.struct_rusage) -> float:
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def parse_bench_json(stdout: str, label: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            data: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            return data
    raise SystemExit(f"{label}: the load generator printed no result:\n{stdout[-2000:]}")


def gateway_requests(admin: str) -> dict[str, float]:
    """idlegate_requests_total by decision/reason, from the admin port's /metrics."""
    status, text = http_get(admin + "/metrics")
    counts: dict[str, float] = {}
    if status != 200:
        return counts
    for line in text.splitlines():
        if line.startswith("idlegate_requests_total{"):
            labels, _, value = line.rpartition(" ")
            decision = labels.split('decision="')[1].split('"')[0]
            reason = labels.split('reason="')[1].split('"')[0]
            key = f"{decision}/{reason}"
            counts[key] = counts.get(key, 0.0) + float(value)
    return counts


def redis_accounting(before: dict[str, Any], after: dict[str, Any], wrk_requests: int) -> dict:
    """Redis commands during one run, split by where they come from.

    check_and_touch.lua runs exactly one GET; revocations.lua (the 250 ms poll) exactly one
    HGET; so evalsha = check_and_touch + polls, and GET / HGET count each script separately.
    """
    calls = {
        name: after["redis"].get(name, 0) - before["redis"].get(name, 0)
        for name in set(after["redis"]) | set(before["redis"])
    }
    calls = {name: n for name, n in calls.items() if n}
    calls.pop("info", None)  # our own snapshot
    handled = sum(after["requests"].values()) - sum(before["requests"].values())
    allowed = after["requests"].get("allowed/ok", 0.0) - before["requests"].get("allowed/ok", 0.0)
    evalsha = calls.get("evalsha", 0)
    polls = calls.get("hget", 0)
    checks = calls.get("get", 0)
    client_commands = {
        name: n
        for name, n in calls.items()
        if name in ("evalsha", "eval", "ping", "script|load", "script", "hello", "client|setinfo")
    }
    return {
        "commands": calls,
        "client_commands": client_commands,
        "evalsha": evalsha,
        "revocation_polls": polls,
        "check_and_touch": checks,
        "evalsha_minus_polls": evalsha - polls,
        "gateway_handled": handled,
        "gateway_allowed": allowed,
        "wrk_requests": wrk_requests,
        "round_trips_per_handled_request": (evalsha - polls) / max(1.0, handled),
        "round_trips_per_wrk_request": (evalsha - polls) / max(1, wrk_requests),
        # Store commands the gateway sent (check_and_touch and, with store.coalesce, the
        # batched flushes: one script call per 256 keys) per accepted request, polls aside.
        "store_commands_per_allowed": (evalsha + calls.get("eval", 0) - polls) / max(1.0, allowed),
        # Every command Redis ran, those inside the scripts included, polls aside (each poll
        # is one EVALSHA running one HGET), per accepted request.
        "redis_commands_per_allowed": (sum(calls.values()) - 2 * polls) / max(1.0, allowed),
    }


def sample_memory_usage(port: int, count: int) -> dict[str, float]:
    sizes: list[int] = []
    cursor = "0"
    while len(sizes) < count:
        reply = resp_command(port, "SCAN", cursor, "MATCH", "idlegate:a:*", "COUNT", "200")
        assert isinstance(reply, list)
        cursor, keys = reply[0], reply[1]
        for key in keys:
            size = resp_command(port, "MEMORY", "USAGE", key, "SAMPLES", "0")
            if isinstance(size, int):
                sizes.append(size)
        if cursor == "0":
            break
    if not sizes:
        return {}
    return {
        "keys_sampled": len(sizes),
        "mean": statistics.mean(sizes),
        "min": min(sizes),
        "max": max(sizes),
    }


def per_request_costs(before: dict[str, Any], after: dict[str, Any], requests: int) -> dict:
    """CPU µs per request of the system under test, user space and kernel apart (the kernel's
    share, socket syscalls and wake-ups, is what an instruction count misses); its read- and
    write-type syscalls, its sleeps in epoll (fewer when the event loop finds more to do per
    turn) and its minor page faults per request."""
    requests = max(1, requests)
    return {
        "sut_user_us": (after["sut_user"] - before["sut_user"]) * 1e6 / requests,
        "sut_system_us": (after["sut_system"] - before["sut_system"]) * 1e6 / requests,
        "sut_syscalls_per_request": [
            (a - b) / requests
            for a, b in zip(after["sut_syscalls"], before["sut_syscalls"], strict=True)
        ],
    }


def describe(result: dict[str, Any]) -> str:
    errors = {k: v for k, v in result["errors"].items() if v}
    extra = f"  errors {errors}" if errors else ""
    if result.get("noisy"):
        extra += "  NOISY"
    redis = result.get("redis")
    if redis:
        extra += (
            f"  redis: {redis['evalsha_minus_polls']} checks / {redis['gateway_handled']:.0f}"
            f" handled (+{redis['revocation_polls']} polls)"
        )
    return (
        f"{result['target']:10s} {result['rps']:8.0f} req/s  p50 {result['p50_ms']:.2f} ms"
        f"  p99 {result['p99_ms']:.2f} ms  cpu sut {result['sut_cpu_util']:.0%}"
        f" aux {result['aux_cpu_util']:.0%} wrk {result['wrk_cpu_util']:.0%}"
        f" other {result['foreign_cpu_util']:.0%}"
        f"  sut µs/req user {result['sut_user_us']:.1f} sys {result['sut_system_us']:.1f}"
        + " syscalls/req r {:.2f} w {:.2f} sleeps {:.2f} faults {:.2f}".format(
            *result["sut_syscalls_per_request"]
        )
        + extra
    )


def medians(rounds: list[dict[str, Any]], names: list[str]) -> dict[str, float]:
    """Per target: rps, p50/p99, CPU use, rps per CPU-second; ratios to bare (rps and per CPU)."""
    out: dict[str, float] = {}
    for name in names:
        for field_name, key in (
            ("rps", "rps"),
            ("p50_ms", "p50_ms"),
            ("p99_ms", "p99_ms"),
            ("cpu", "sut_cpu_util"),
            ("rps_per_cpu", "rps_per_cpu"),
        ):
            out[f"{name}_{field_name}"] = statistics.median(r[name][key] for r in rounds)
        if name != "bare":
            out[f"ratio_{name}"] = statistics.median(r[f"ratio_{name}"] for r in rounds)
            out[f"cpu_ratio_{name}"] = statistics.median(r[f"cpu_ratio_{name}"] for r in rounds)
    out["ratio_rps"] = out["ratio_gateway"]
    for name in names:
        key = f"{name}_over_bare_lean"
        if all(key in r for r in rounds):
            out[key] = statistics.median(r[key] for r in rounds)
    return out


def gateway_code() -> dict[str, str]:
    """The commit the gateway ran from, and whether gateway/ had uncommitted changes."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=BENCH.parent)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": git("status", "-s", "gateway")}


def machine() -> dict[str, Any]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "missing"

    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {name: version(name) for name in PACKAGES_REPORTED},
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr) else "",
        "redis_server": redis.stdout.strip(),
        "taskset": have_taskset(),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=1000, help="distinct tokens cycled")
    parser.add_argument(
        "--phases",
        default="throughput,latency,workers,profile",
        help=f"comma-separated, of {', '.join(PHASES)}",
    )
    parser.add_argument(
        "--latency-loads",
        default="0.5,0.25",
        help="open-loop rates as fractions of the bare proxy's peak, comma-separated",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also measure (throughput phase) the gateway package found in DIR/gateway",
    )
    parser.add_argument(
        "--coalesce",
        metavar="DURATION",
        help="also measure (throughput phase) this checkout's gateway with store.coalesce set "
        "to DURATION (e.g. 5s), as target 'coalesce'",
    )
    parser.add_argument(
        "--lean-reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure bare-lean: the bare proxy over the gateway's own lean client",
    )
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.25,
        help="cores busy (ours idle) under which the machine counts as quiet",
    )
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.10,
        help="a run during which other processes used more than this many cores is repeated",
    )
    parser.add_argument("--retries", type=int, default=2, help="repeats of a noisy run")
    parser.add_argument(
        "--quiet-wait", type=float, default=60.0, help="longest wait for a quiet machine, s"
    )
    parser.add_argument("--cpucost-rate", type=float, default=2000.0)
    parser.add_argument("--cpucost-rounds", type=int, default=5)
    parser.add_argument("--cpucost-seconds", type=float, default=5.0)
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument("--profile-top", type=int, default=30)
    parser.add_argument("--memory-tokens", type=int, default=100_000)
    parser.add_argument("--memory-requests", type=int, default=1_000_000)
    parser.add_argument(
        "--memory-dir", help="run the memory phase's gateway from DIR/gateway (a candidate copy)"
    )
    parser.add_argument("--memory-seconds", type=float, default=290.0, help="upper bound")
    args = parser.parse_args()
    args.variants = []
    for item in args.variant:
        name, sep, directory = item.partition("=")
        if not sep or not (Path(directory) / "gateway" / "__init__.py").exists():
            parser.error(f"--variant {item}: expected NAME=DIR with DIR/gateway/ in it")
        args.variants.append((name, directory))
    args.latency_loads = [float(x) for x in args.latency_loads.split(",") if x.strip()]
    args.phase_list = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(args.phase_list) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    return args


def main() -> int:
    args = parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk  (Debian/Ubuntu)", file=sys.stderr)
        return 2
    if shutil.which("redis-server") is None:
        print("redis-server is not installed: apt-get install -y redis-server", file=sys.stderr)
        return 2
    out = OUT / time.strftime("%Y%m%d-%H%M%S")
    (out / "raw").mkdir(parents=True, exist_ok=True)
    bench = Bench(args, out)
    bench.results["machine"] = machine()
    bench.results["args"] = {k: v for k, v in vars(args).items() if k != "phase_list"}
    bench.results["pinning"] = {
        "taskset": have_taskset(),
        "sut": SUT_CPU,
        "load_and_aux": LOAD_CPU,
    }
    print(f"output: {out}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        bench.start_aux()
        phases = args.phase_list
        if {"throughput", "cpucost", "latency", "profile"} & set(phases):
            bare = bench.start_bare(SUT_CPU)
            gateway = bench.start_gateway("gateway", SUT_CPU)
            variants = [
                bench.start_gateway(name, SUT_CPU, cwd=Path(directory))
                for name, directory in args.variants
            ]
            if args.coalesce is not None:
                variants.insert(0, bench.start_gateway("coalesce", SUT_CPU, coalesce=args.coalesce))
            if args.lean_reference:
                variants.insert(0, bench.start_bare(SUT_CPU, "bare-lean", client="lean"))
            if "throughput" in phases:
                bench.phase_throughput(bare, gateway, variants)
            if "cpucost" in phases:
                bench.phase_cpucost([bare, gateway, *variants])
            if "latency" in phases:
                bench.phase_latency(bare, gateway, variants)
            if "profile" in phases:
                bench.phase_profile(bare, gateway)
            for target in (bare, gateway, *variants):
                bench.procs.stop(target.proc)
        if "workers" in phases:
            bench.phase_workers()
        if "memory" in phases:
            bench.phase_memory()
    finally:
        bench.procs.stop_all()
        (out / "results.json").write_text(json.dumps(bench.results, indent=2, default=str))
        latest = OUT / "latest"
        with contextlib.suppress(OSError):
            if latest.is_symlink() or latest.exists():
                latest.unlink()
            latest.symlink_to(out.name)
    print(summary(bench.results))
    return 0


def summary(results: dict[str, Any]) -> str:
    lines = ["", "== summary (medians) =="]
    tp = results.get("throughput", {}).get("median")
    if tp:
        lines.append(
            f"throughput: bare {tp['bare_rps']:.0f} req/s, gateway {tp['gateway_rps']:.0f} req/s,"
            f" ratio {tp['ratio_rps']:.3f} (target >= 0.80); per CPU-second of core 0: bare"
            f" {tp['bare_rps_per_cpu']:.0f}, gateway {tp['gateway_rps_per_cpu']:.0f},"
            f" ratio {tp['cpu_ratio_gateway']:.3f}"
        )
        for name in [k.removeprefix("ratio_") for k in tp if k.startswith("ratio_")]:
            if name not in ("gateway", "rps"):
                rps, ratio = tp[f"{name}_rps"], tp[f"ratio_{name}"]
                lines.append(
                    f"  variant {name}: {rps:.0f} req/s, ratio {ratio:.3f}"
                    f" (per CPU-second {tp[f'cpu_ratio_{name}']:.3f})"
                )
        if "gateway_over_bare_lean" in tp:
            lines.append(
                f"  gateway/bare-lean {tp['gateway_over_bare_lean']:.3f}: what auth, the idle"
                " check and metrics cost over the same forwarding client"
            )
        lines.append(
            f"  wrk latency p50 bare {tp['bare_p50_ms']:.2f} / gateway {tp['gateway_p50_ms']:.2f}"
            f" ms, p99 bare {tp['bare_p99_ms']:.2f} / gateway {tp['gateway_p99_ms']:.2f} ms"
        )
        for name, over_lean in tp.items():
            if name.endswith("_over_bare_lean") and name != "gateway_over_bare_lean":
                lines.append(f"  {name.removesuffix('_over_bare_lean')}/bare-lean {over_lean:.3f}")
        for round_ in results["throughput"]["rounds"]:
            for name, result in round_.items():
                if not isinstance(result, dict) or "redis" not in result:
                    continue
                item = result["redis"]
                lines.append(
                    f"  redis ({name}): evalsha {item['evalsha']} - polls"
                    f" {item['revocation_polls']} = {item['evalsha_minus_polls']} for"
                    f" {item['gateway_handled']:.0f} handled ({item['wrk_requests']} completed"
                    f" in wrk); {item['round_trips_per_handled_request']:.4f} per request; store"
                    f" commands per accepted request {item['store_commands_per_allowed']:.4f}"
                    f" (all Redis commands {item['redis_commands_per_allowed']:.4f});"
                    f" commands {item['commands']}"
                )
    for level in results.get("latency", {}).get("levels", []):
        lat = level["median"]
        lines.append(
            f"latency at {level['rate']:.0f} req/s ({level['load']:.0%} of bare peak): p50 bare"
            f" {lat['bare_p50_ms']:.3f} / gateway {lat['gateway_p50_ms']:.3f} ms; p99 bare"
            f" {lat['bare_p99_ms']:.3f} / gateway {lat['gateway_p99_ms']:.3f} ms; added p99"
            f" {lat['added_p99_ms']:.3f} ms (target <= 1 ms); cpu bare {lat['bare_cpu']:.0%}"
            f" gateway {lat['gateway_cpu']:.0%}"
        )
        for name in [k.removesuffix("_p99_ms") for k in lat if k.endswith("_p99_ms")]:
            if name not in ("bare", "gateway", "added"):
                lines.append(f"  {name}: p99 {lat[f'{name}_p99_ms']:.3f} ms")
    cost = results.get("cpucost")
    if cost:
        bare_us = cost["median_us"]["bare"]
        lines.append(
            f"cpu per request at {cost['rate']:.0f} req/s (median µs): "
            + ", ".join(
                f"{name} {us:.0f}" + ("" if name == "bare" else f" ({bare_us / us:.3f} of bare)")
                for name, us in cost["median_us"].items()
            )
        )
    wk = results.get("workers", {}).get("median")
    if wk:
        lines.append(
            f"workers: 1w {wk['1w_rps']:.0f} req/s, 2w {wk['2w_rps']:.0f} req/s,"
            f" ratio {wk['ratio_rps']:.3f} (target >= 1.7); gateway cpu 1w {wk['1w_cpu']:.0%}"
            f" 2w {wk['2w_cpu']:.0%}; per core of gateway CPU 2w/1w {wk['per_core_ratio']:.3f}"
        )
    mem = results.get("memory")
    if mem:
        lines.append(
            f"memory: {mem['requests']} requests over {mem['tokens']} tokens in"
            f" {mem['seconds']:.0f}s; RSS {mem['rss_start_kib']['VmRSS'] / 1024:.1f} ->"
            f" {mem['rss_end_kib']['VmRSS'] / 1024:.1f} MiB (peak"
            f" {mem['rss_end_kib']['VmHWM'] / 1024:.1f}); redis {mem['redis_keys']} keys,"
            f" {mem['redis_bytes_per_key_delta']:.0f} B/key (used_memory delta),"
            f" MEMORY USAGE mean {mem['redis_memory_usage_sample'].get('mean', 0):.0f} B"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
