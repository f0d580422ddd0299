"""Summarise py-spy's raw (collapsed-stack) output: top self time, top inclusive time, and the
share of each package, so a gateway profile and a bare-proxy profile can be compared.

    python bench/profile_summary.py bench/out/profile-gateway.txt [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import re
from dataclasses import dataclass
from pathlib import Path

# "function (path/to/file.py:123)" -> ("function", "path/to/file.py")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")

PACKAGES = (
    ("gateway/", "gateway"),
    ("bench/", "bench"),
    ("aiohttp/", "aiohttp"),
    ("redis/", "redis-py"),
    ("prometheus_client/", "prometheus_client"),
    ("jwt/", "PyJWT"),
    ("cryptography/", "cryptography"),
    ("multidict/", "multidict"),
    ("yarl/", "yarl"),
    ("asyncio/", "asyncio (stdlib)"),
    ("uvloop/", "uvloop"),
)


@dataclass
class Profile:
    total: int
    self_time: collections.Counter[str]
    inclusive: collections.Counter[str]
    by_package: collections.Counter[str]


def _name(frame: str) -> str:
    """A frame without its line number, with the path shortened to its package part."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/", "/tmp/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


def _package(name: str) -> str:
    for marker, label in PACKAGES:
        if f"({marker}" in name or f" {marker}" in name:
            return label
    if name.endswith(".py)"):
        return "other Python (stdlib etc.)"
    return "native / idle"


def load(path: Path) -> Profile:
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    by_package: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        self_time[leaf] += count
        by_package[_package(leaf)] += count
        for frame in set(frames):
            inclusive[frame] += count
    return Profile(total, self_time, inclusive, by_package)


def report(profile: Profile, top: int) -> str:
    def pct(n: int) -> str:
        return f"{100 * n / max(1, profile.total):5.1f}%"

    lines = [f"samples: {profile.total}", "", "self time by package (leaf frame):"]
    lines += [f"  {pct(n)}  {name}" for name, n in profile.by_package.most_common()]
    lines += ["", f"top {top} self time:"]
    lines += [f"  {pct(n)}  {name}" for name, n in profile.self_time.most_common(top)]
    lines += ["", f"top {top} inclusive time:"]
    lines += [f"  {pct(n)}  {name}" for name, n in profile.inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("raw", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(report(load(args.raw), args.top))


if __name__ == "__main__":
    main()
