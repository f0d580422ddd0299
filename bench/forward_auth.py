"""Forward-auth vs proxy mode behind nginx, same interleaved rounds (a benchmark, not a test).

    .venv/bin/python bench/forward_auth.py --rounds 3 --duration 8

Three front doors of ONE nginx (worker_processes 1) in front of one upstream, with one idlegate
process (forward_auth enabled, Redis store) as the system under test:

- nginx-alone:  nginx -> upstream, no authentication (the floor)
- nginx-proxy:  nginx -> idlegate proxy port -> upstream (proxy mode)
- nginx-fauth:  nginx auth_request -> idlegate /.idlegate/auth; nginx -> upstream (forward-auth)
- nginx-bare-auth (CPU-per-request phase only): the same with bench/bare_auth.py, an aiohttp
  server answering 200 to everything, as the auth service: the floor under idlegate's decision

wrk cycles `--tokens` distinct tokens (bench/auth.lua). Reported per target: req/s, p50/p99
(wrk's, closed loop), idlegate CPU use and requests per idlegate CPU-second (for nginx-alone:
per nginx CPU-second), and the Redis round trips per decision (`evalsha - polls` over handled
requests: check_and_touch.lua is one EVALSHA). Pinning: idlegate alone on core 0; nginx,
wrk, redis-server and the upstream share core 1. Loopback only; every process it starts is
stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH, OUT, PYTHON, Proc, descendants, free_port, have_taskset, pinned, wait_port
from run import LOAD_CPU, PATH, SUT_CPU, Bench, Target, describe, machine

NGINX = """
worker_processes 1;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    error_log {dir}/error.log warn;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream app {{ server 127.0.0.1:{upstream}; keepalive 128; }}
    upstream idlegate {{ server 127.0.0.1:{idlegate}; keepalive 128; }}
    upstream bare_auth {{ server 127.0.0.1:{bare_auth}; keepalive 128; }}
    proxy_http_version 1.1;
    proxy_set_header Connection "";

    server {{  # nginx-alone
        listen 127.0.0.1:{alone};
        location / {{ proxy_pass http://app; }}
    }}
    server {{  # nginx-proxy
        listen 127.0.0.1:{proxy};
        location / {{ proxy_pass http://idlegate; }}
    }}
    server {{  # nginx-fauth (docs/forward-auth.md's recipe, identity headers copied)
        listen 127.0.0.1:{fauth};
        location = /_idlegate_auth {{
            internal;
            proxy_pass http://idlegate/.idlegate/auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header Connection "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
        }}
        location / {{
            auth_request /_idlegate_auth;
            auth_request_set $auth_subject $upstream_http_x_auth_subject;
            auth_request_set $auth_scope $upstream_http_x_auth_scope;
            auth_request_set $auth_token_id $upstream_http_x_auth_token_id;
            proxy_set_header X-Auth-Subject $auth_subject;
            proxy_set_header X-Auth-Scope $auth_scope;
            proxy_set_header X-Auth-Token-Id $auth_token_id;
            proxy_pass http://app;
        }}
    }}
    server {{  # nginx-bare-auth: the same, asking bench/bare_auth.py (the aiohttp floor)
        listen 127.0.0.1:{bare};
        location = /_auth {{
            internal;
            proxy_pass http://bare_auth/.idlegate/auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header Connection "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
        }}
        location / {{
            auth_request /_auth;
            auth_request_set $auth_subject $upstream_http_x_auth_subject;
            proxy_set_header X-Auth-Subject $auth_subject;
            proxy_pass http://app;
        }}
    }}
}}
"""


class ForwardAuthBench(Bench):
    """bench/run.py's harness (wrk runs, CPU and Redis accounting), nginx added to the aux."""

    nginx: Proc | None = None

    def gateway_config(
        self, name: str, public_key: Path, coalesce: str | None = None
    ) -> tuple[Path, int, int]:
        path, port, admin_port = super().gateway_config(name, public_key, coalesce)
        config = yaml.safe_load(path.read_text())
        config["forward_auth"] = {"enabled": True}
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path, port, admin_port

    def aux_pids(self) -> list[int]:
        pids = super().aux_pids()
        if self.nginx is not None:
            pids += descendants(self.nginx.pid)
        return pids

    def start_bare_auth(self) -> tuple[Proc, int]:
        port = free_port()
        cmd = [PYTHON, str(BENCH / "bare_auth.py"), "--port", str(port)]
        proc = self.procs.start(
            Proc("bare-auth", pinned(cmd, SUT_CPU), self.out / "logs" / "bare-auth.log")
        )
        wait_port(port)
        return proc, port

    def start_nginx(self, idlegate_url: str, bare_auth_port: int) -> dict[str, str]:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise SystemExit("nginx is missing: apt-get install -y nginx-light")
        workdir = self.out / "nginx"
        workdir.mkdir(parents=True, exist_ok=True)
        ports = {
            "alone": free_port(),
            "proxy": free_port(),
            "fauth": free_port(),
            "bare": free_port(),
        }
        conf = workdir / "nginx.conf"
        conf.write_text(
            NGINX.format(
                dir=workdir,
                upstream=self.upstream_url.rsplit(":", 1)[1],
                idlegate=idlegate_url.split(":")[2].split("/")[0],
                bare_auth=bare_auth_port,
                **ports,
            )
        )
        cmd = [binary, "-p", str(workdir), "-c", str(conf), "-g", f"daemon off; pid {workdir}/pid;"]
        self.nginx = self.procs.start(
            Proc("nginx", pinned(cmd, LOAD_CPU), self.out / "logs" / "nginx.log")
        )
        for port in ports.values():
            wait_port(port)
        return {name: f"http://127.0.0.1:{port}{PATH}" for name, port in ports.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = OUT / ("fauth-" + time.strftime("%Y%m%d-%H%M%S"))
    (out / "raw").mkdir(parents=True, exist_ok=True)
    bench = ForwardAuthBench(args, out)
    bench.results["machine"] = machine()
    bench.results["pinning"] = {"taskset": have_taskset(), "sut": SUT_CPU, "rest": LOAD_CPU}
    print(f"output: {out}", flush=True)
    try:
        bench.start_aux()
        gateway = bench.start_gateway("idlegate", SUT_CPU)
        bare_auth, bare_auth_port = bench.start_bare_auth()
        urls = bench.start_nginx(gateway.url, bare_auth_port)
        assert bench.nginx is not None
        targets = [
            Target("nginx-alone", bench.nginx, urls["alone"]),
            Target("nginx-proxy", gateway.proc, urls["proxy"], gateway.admin),
            Target("nginx-fauth", gateway.proc, urls["fauth"], gateway.admin),
        ]
        tokens = bench.tokens(args.tokens)
        for target in targets:
            bench.wrk(target, tokens, 2, f"warmup-{target.name}", LOAD_CPU)
        rounds = []
        for index in range(args.rounds):
            shift = index % len(targets)
            row: dict[str, Any] = {}
            for target in targets[shift:] + targets[:shift]:
                result = bench.wrk(
                    target, tokens, args.duration, f"r{index + 1}-{target.name}", LOAD_CPU
                )
                result["rps_per_cpu"] = result["rps"] / max(0.01, result["sut_cpu_util"])
                row[target.name] = result
                print(f"  round {index + 1} {describe(result)}", flush=True)
            row["fauth_over_proxy_per_cpu"] = (
                row["nginx-fauth"]["rps_per_cpu"] / row["nginx-proxy"]["rps_per_cpu"]
            )
            print(
                f"  round {index + 1} forward-auth / proxy per idlegate CPU-second = "
                f"{row['fauth_over_proxy_per_cpu']:.2f}",
                flush=True,
            )
            rounds.append(row)
        bench.results["rounds"] = rounds
        bench.results["median"] = summary(rounds, [t.name for t in targets])
        if args.rate > 0:
            floor = Target("nginx-bare-auth", bare_auth, urls["bare"])
            bench.results["cpucost"] = cpucost(bench, [*targets[1:], floor], tokens, args)
    finally:
        bench.procs.stop_all()
        (out / "results.json").write_text(json.dumps(bench.results, indent=2, default=str))
    return bench.results


def cpucost(
    bench: ForwardAuthBench, targets: list[Target], tokens: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Auth-service CPU µs per request at one fixed open-loop rate, the same for every door: under
    wrk's closed loop each mode runs at its own rate, and a busier event loop batches more
    work per wake-up, which flatters the faster mode per CPU-second."""
    rows = []
    for index in range(args.rounds):
        shift = index % len(targets)
        row = {}
        for target in targets[shift:] + targets[:shift]:
            result = bench.openloop(
                target, tokens, args.rate, args.duration, f"cpu-r{index + 1}-{target.name}"
            )
            row[target.name] = result
            print(
                f"  cpucost round {index + 1} {target.name:12s} "
                f"{result['achieved_rate']:.0f} req/s  {result['cpu_us_per_request']:.0f} µs/req"
                f"  p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms"
                f"  other {result['foreign_cpu_util']:.0%}",
                flush=True,
            )
        row["proxy_over_fauth_cpu_us"] = (
            row["nginx-proxy"]["cpu_us_per_request"] / row["nginx-fauth"]["cpu_us_per_request"]
        )
        rows.append(row)
    median = {
        name: {
            key: statistics.median(row[name][key] for row in rows)
            for key in ("cpu_us_per_request", "achieved_rate", "p50_ms", "p99_ms")
        }
        for name in ("nginx-proxy", "nginx-fauth", "nginx-bare-auth")
    }
    median["proxy_over_fauth_cpu_us"] = statistics.median(
        row["proxy_over_fauth_cpu_us"] for row in rows
    )
    median["fauth_minus_floor_us"] = (
        median["nginx-fauth"]["cpu_us_per_request"]
        - median["nginx-bare-auth"]["cpu_us_per_request"]
    )
    print(
        f"  cpucost: proxy / forward-auth idlegate CPU per request = "
        f"{median['proxy_over_fauth_cpu_us']:.2f}",
        flush=True,
    )
    return {"rate": args.rate, "rounds": rows, "median": median}


def summary(rounds: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    medians: dict[str, Any] = {}
    for name in names:
        runs = [row[name] for row in rounds]
        medians[name] = {
            key: statistics.median(run[key] for run in runs)
            for key in ("rps", "p50_ms", "p99_ms", "sut_cpu_util", "rps_per_cpu")
        }
        trips = [run["redis"]["round_trips_per_handled_request"] for run in runs if "redis" in run]
        if trips:
            medians[name]["store_round_trips_per_decision"] = statistics.median(trips)
    medians["fauth_over_proxy_per_cpu"] = statistics.median(
        row["fauth_over_proxy_per_cpu"] for row in rounds
    )
    return medians


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=1000, help="distinct tokens cycled")
    parser.add_argument("--quiet-threshold", type=float, default=0.25)
    parser.add_argument("--quiet-wait", type=float, default=20.0)
    parser.add_argument("--max-foreign", type=float, default=0.10)
    parser.add_argument("--retries", type=int, default=1)
    parser.add_argument(
        "--rate",
        type=float,
        default=1500.0,
        help="open-loop req/s of the CPU-per-request phase, both modes (0: skip it)",
    )
    args = parser.parse_args()
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed: apt-get install -y {tool}", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = run(args)
    print(json.dumps({k: results.get(k) for k in ("median", "cpucost")}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
