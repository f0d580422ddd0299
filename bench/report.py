"""Render a run's results.json as the Markdown tables used in RESULTS.md.

python bench/report.py bench/out/latest/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _flag(result: dict[str, Any]) -> str:
    other = result.get("foreign_cpu_util", 0.0)
    mark = " ⚠" if result.get("noisy") else ""
    return f"{other:.0%}{mark}"


def throughput(data: dict[str, Any]) -> list[str]:
    rounds = data["rounds"]
    names = [k for k in rounds[0] if isinstance(rounds[0][k], dict)]
    lines = [
        "| round | target | req/s | p50 ms | p99 ms | core-0 CPU | req per CPU-s | other load |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for index, row in enumerate(rounds, 1):
        for name in names:
            r = row[name]
            lines.append(
                f"| {index} | {name} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f}"
                f" | {r['sut_cpu_util']:.0%} | {r['rps_per_cpu']:.0f} | {_flag(r)} |"
            )
        ratios = ", ".join(
            f"{name}/bare {row[f'ratio_{name}']:.3f} (per CPU-s {row[f'cpu_ratio_{name}']:.3f})"
            for name in names
            if name != "bare"
        )
        lines.append(f"| {index} | **ratios** | {ratios} | | | | | |")
    m = data["median"]
    lines += ["", "Medians:", ""]
    for name in names:
        lines.append(
            f"- {name}: {m[f'{name}_rps']:.0f} req/s, p50 {m[f'{name}_p50_ms']:.2f} ms,"
            f" p99 {m[f'{name}_p99_ms']:.2f} ms, {m[f'{name}_rps_per_cpu']:.0f} req per"
            f" CPU-second"
            + (
                ""
                if name == "bare"
                else f"; ratio to bare {m[f'ratio_{name}']:.3f} (per CPU-second"
                f" {m[f'cpu_ratio_{name}']:.3f})"
            )
        )
    return lines


def redis(data: dict[str, Any]) -> list[str]:
    lines = [
        "| round | evalsha | hget (polls) | evalsha - polls | get (inside check_and_touch)"
        " | requests the gateway handled | completed in wrk | round trips per request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for index, row in enumerate(data["rounds"], 1):
        r = row["gateway"]["redis"]
        lines.append(
            f"| {index} | {r['evalsha']} | {r['revocation_polls']} | {r['evalsha_minus_polls']}"
            f" | {r['check_and_touch']} | {r['gateway_handled']:.0f} | {r['wrk_requests']}"
            f" | {r['round_trips_per_handled_request']:.4f} |"
        )
    return lines


def latency(data: dict[str, Any]) -> list[str]:
    lines = []
    for level in data["levels"]:
        lines += [
            f"Open loop at {level['rate']:.0f} req/s ({level['load']:.0%} of the bare proxy's"
            f" peak {data['bare_peak_rps']:.0f}):",
            "",
            "| round | target | achieved req/s | p50 ms | p99 ms | p99.9 ms | core-0 CPU"
            " | other load |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for index, row in enumerate(level["rounds"], 1):
            for name in [k for k in row if isinstance(row[k], dict)]:
                r = row[name]
                lines.append(
                    f"| {index} | {name} | {r['achieved_rate']:.0f} | {r['p50_ms']:.3f}"
                    f" | {r['p99_ms']:.3f} | {r['p999_ms']:.3f} | {r['sut_cpu_util']:.0%}"
                    f" | {_flag(r)} |"
                )
            lines.append(
                f"| {index} | **added** | | {row['added_p50_ms']:.3f} | {row['added_p99_ms']:.3f}"
                " | | | |"
            )
        m = level["median"]
        lines += [
            "",
            f"Medians: p50 bare {m['bare_p50_ms']:.3f} / gateway {m['gateway_p50_ms']:.3f} ms;"
            f" p99 bare {m['bare_p99_ms']:.3f} / gateway {m['gateway_p99_ms']:.3f} ms;"
            f" **added p99 {m['added_p99_ms']:.3f} ms**, added p50 {m['added_p50_ms']:.3f} ms.",
            *[
                f"Variant {k.removeprefix('added_p99_ms_')}: added p99 {v:.3f} ms."
                for k, v in m.items()
                if k.startswith("added_p99_ms_")
            ],
            "",
        ]
    return lines


def workers(data: dict[str, Any]) -> list[str]:
    lines = [
        "| round | target | req/s | p50 ms | p99 ms | gateway CPU (cores) | other load |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for index, row in enumerate(data["rounds"], 1):
        for name in ("gateway-1w", "gateway-2w"):
            r = row[name]
            lines.append(
                f"| {index} | {name} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f}"
                f" | {r['sut_cpu_util']:.2f} | {_flag(r)} |"
            )
        lines.append(f"| {index} | **2w/1w** | {row['ratio_rps']:.3f} | | | | |")
    m = data["median"]
    lines += [
        "",
        f"Medians: 1 worker {m['1w_rps']:.0f} req/s ({m['1w_cpu']:.2f} cores), 2 workers"
        f" {m['2w_rps']:.0f} req/s ({m['2w_cpu']:.2f} cores), ratio {m['ratio_rps']:.3f}.",
    ]
    return lines


def memory(data: dict[str, Any]) -> list[str]:
    lines = [
        "| requests so far | req/s in chunk | VmRSS MiB | Redis keys |",
        "|---:|---:|---:|---:|",
    ]
    for item in data["series"]:
        lines.append(
            f"| {item['requests']} | {item['rps']:.0f} | {item['rss_kib']['VmRSS'] / 1024:.1f}"
            f" | {item['keys']} |"
        )
    usage = data.get("redis_memory_usage_sample", {})
    lines += [
        "",
        f"{data['requests']} requests over {data['tokens']} tokens in {data['seconds']:.0f} s."
        f" RSS {data['rss_start_kib']['VmRSS'] / 1024:.1f} MiB after start,"
        f" {data['rss_end_kib']['VmRSS'] / 1024:.1f} MiB at the end (peak"
        f" {data['rss_end_kib']['VmHWM'] / 1024:.1f} MiB).",
        f"Redis: {data['redis_keys']} keys, used_memory delta {data['redis_used_memory_delta']}"
        f" B = {data['redis_bytes_per_key_delta']:.0f} B per key; MEMORY USAGE over"
        f" {usage.get('keys_sampled', 0)} keys: mean {usage.get('mean', 0):.0f} B"
        f" (min {usage.get('min', 0)}, max {usage.get('max', 0)}).",
        f"Gateway decisions: {data.get('gateway_requests', {})}",
    ]
    return lines


def render(results: dict[str, Any]) -> str:
    out: list[str] = []
    sections = (
        ("throughput", "Throughput (wrk, closed loop)", throughput),
        ("throughput", "Redis round trips per request", redis),
        ("latency", "Latency (open loop)", latency),
        ("workers", "--workers 2 vs 1 (nothing pinned)", workers),
        ("memory", "Memory", memory),
    )
    for key, title, render_section in sections:
        if key in results:
            out += [f"### {title}", "", *render_section(results[key]), ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    print(render(json.loads(args.results.read_text())))


if __name__ == "__main__":
    main()
