"""Process plumbing for the benchmark: free ports, pinned subprocesses, a private redis-server,
raw RESP commands, /proc readings. Everything binds to 127.0.0.1 and is killed on exit."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def have_taskset() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pinned(cmd: list[str], cpus: str | None) -> list[str]:
    """`cmd` under `taskset -c cpus` (all cpus when None, or when taskset is unusable)."""
    if cpus is None or not have_taskset():
        return cmd
    return ["taskset", "-c", cpus, *cmd]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


@dataclass
class Proc:
    """A subprocess of ours, in its own process group so its children die with it."""

    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str] | None = None
    cwd: Path = ROOT
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=timeout)
        self.popen = None


@dataclass
class Procs:
    """Every process the run started; `stop_all()` ends them (also on errors and Ctrl-C)."""

    items: list[Proc] = field(default_factory=list)

    def start(self, proc: Proc) -> Proc:
        self.items.append(proc.start())
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.items:
            self.items.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.items):
            proc.stop()
        self.items.clear()


def descendants(pid: int) -> list[int]:
    """pid and every process below it (workers of `--workers N`, taskset's exec is in place)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (not of their reaped children)."""
    return sum(cpu_split(pids))


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(utime, stime) of these processes in seconds: user space and the kernel apart."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def syscalls(pids: list[int]) -> tuple[int, int, int, int]:
    """(read-type syscalls, write-type syscalls, voluntary context switches, minor page faults)
    of these processes: /proc/<pid>/io's syscr and syscw (recv, read, send, write...), the
    times they slept, and the pages the kernel had to map in for them (memory given back and
    taken again: kernel time that no syscall count shows)."""
    reads = writes = sleeps = faults = 0
    for pid in pids:
        try:
            io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
            status = Path(f"/proc/{pid}/status").read_text()
            stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        reads += int(io["syscr"])
        writes += int(io["syscw"])
        faults += int(stat[7])
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                sleeps += int(line.split()[1])
    return reads, writes, sleeps, faults


def system_busy_seconds() -> float:
    """CPU time all cores spent busy since boot (/proc/stat: everything but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLK_TCK


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of one process, in KiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown"


# -- redis ---------------------------------------------------------------------------------


def resp_command(port: int, *args: str) -> object:
    """One RESP command over a fresh socket; returns the parsed reply (bulk strings as str)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"".join(parts))
        reader = sock.makefile("rb")
        return _read_reply(reader)


def _read_reply(reader: object) -> object:
    line: bytes = reader.readline()  # type: ignore[attr-defined]
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data: bytes = reader.read(size + 2)  # type: ignore[attr-defined]
        return data[:-2].decode()
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise RuntimeError(f"unexpected RESP reply {line!r}")


def redis_info(port: int, section: str) -> dict[str, str]:
    text = resp_command(port, "INFO", section)
    assert isinstance(text, str)
    info: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            name, _, value = line.partition(":")
            info[name] = value
    return info


def command_calls(port: int) -> dict[str, int]:
    """INFO commandstats as {command: calls} (commands run inside Lua scripts count too)."""
    calls: dict[str, int] = {}
    for name, value in redis_info(port, "commandstats").items():
        fields = dict(item.split("=") for item in value.split(","))
        calls[name.removeprefix("cmdstat_")] = int(fields["calls"])
    return calls


def start_redis(procs: Procs, workdir: Path, cpus: str | None) -> tuple[Proc, int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is missing: apt-get install -y redis-server")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--loglevel", "warning",
    ]  # fmt: skip
    proc = procs.start(Proc("redis", pinned(cmd, cpus), OUT / "logs" / "redis.log"))
    deadline = time.monotonic() + 10
    while True:
        try:
            if resp_command(port, "PING") == "PONG":
                return proc, port
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
