"""Running the gateway: one process or N workers on one port, and a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import ipaddress
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway import __version__
from gateway.admin import load_admin_token
from gateway.app import Gateway, build_admin_app, build_forward_auth_server, build_proxy_server
from gateway.config import Config, mask_url
from gateway.connections import CappedSite, ConnectionLimit, GuardedAppRunner, parser_complaint
from gateway.errors import StartupError

log = logging.getLogger("idlegate")
_CLEANUP_TIMEOUT = 0.1
# Closing upstream/store connections and the admin listener: each normally takes
# milliseconds; a step that hangs is logged with what it was waiting for and abandoned, so
# SIGTERM always ends the process.
_CLOSE_TIMEOUT = 3.0
# `--workers`: how long past shutdown_grace the parent waits before it kills a worker.
_WORKER_EXIT_MARGIN = 10.0
# A worker's exit codes for "could not start": its config, keys or store (as single-process
# serve's 2), or a listener it could not open (single-process serve's 1).
_REFUSED = 2
_CANNOT_LISTEN = 3
# How often a worker checks that the parent that started it is still there (where the kernel
# has no parent-death signal, or the parent died before the worker asked for one).
_PARENT_CHECK_INTERVAL = 1.0


class _BadRequestLine(logging.Filter):
    """aiohttp logs every malformed request (scanners, smuggling attempts) at ERROR with a
    traceback; for an operator it is one line: who sent what the parser refused."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "refused a malformed HTTP request (400): %s"
            record.args = (parser_complaint(exc),)  # never the bytes it quotes
            record.exc_info = None
            record.exc_text = None
        return True


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Audit lines (revocations, unauthorized admin calls) are kept whatever the level: a child
    # logger's own level decides, the root handler has none.
    logging.getLogger("idlegate.audit").setLevel(logging.INFO)
    logging.getLogger("aiohttp.server").addFilter(_BadRequestLine())


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return  # optional: the standard event loop works, only slower
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _url(runner: web.BaseRunner) -> str:
    """The runner's first address as a URL one can paste (an IPv6 host in brackets)."""
    host, port = runner.addresses[0][:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


@dataclass
class Running:
    """A started gateway with both listeners; `drain()` is the SIGTERM path."""

    gateway: Gateway
    proxy: web.BaseRunner
    admin: web.AppRunner
    # forward_auth.listen's own port, when configured: drained with the proxy port.
    forward_auth: web.BaseRunner | None = None

    def addresses(self) -> tuple[str, str]:
        return _url(self.proxy), _url(self.admin)

    def forward_auth_address(self) -> str | None:
        """http://host:port of forward_auth.listen, when configured."""
        if self.forward_auth is None:
            return None
        return _url(self.forward_auth)

    async def drain(self) -> None:
        """Readiness off at once, stop accepting, let in-flight requests finish (up to
        `shutdown_grace`, in total), then close upstream and store connections."""
        self.gateway.start_drain()
        request_runners = [self.proxy] + ([self.forward_auth] if self.forward_auth else [])
        for runner in request_runners:
            for site in list(runner.sites):
                await site.stop()  # no new connections
            if runner.server is not None:
                # Idle keep-alives close; busy ones after their reply; WebSockets at their 1001.
                self.gateway.websockets.pre_shutdown(runner.server)
        left = await self.gateway.wait_quiet()
        if left:
            log.warning("shutdown_grace over: %d request(s) cut off", left)
        for runner in request_runners:
            await runner.cleanup()  # what is left gets _CLEANUP_TIMEOUT, then is cancelled
        await _bounded("closing upstream, key and store connections", self.gateway.close())
        await _bounded("closing the admin listener", self.admin.cleanup())


async def _bounded(step: str, awaitable: Awaitable[None]) -> None:
    """Run one shutdown step for at most _CLOSE_TIMEOUT; if it hangs, log every task still
    pending (with where it waits) and go on."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=_CLOSE_TIMEOUT)
    if done:
        if not task.cancelled() and task.exception() is not None:
            log.error("shutdown: %s failed", step, exc_info=task.exception())
        return
    log.error("shutdown: %s did not finish within %.0fs; abandoned", step, _CLOSE_TIMEOUT)
    log_pending_tasks()
    task.cancel()


def log_pending_tasks() -> None:
    for pending in asyncio.all_tasks():
        if pending is not asyncio.current_task():
            log.error("shutdown: pending task %s at %s", pending.get_name(), _awaiting(pending))


def _awaiting(task: asyncio.Task[Any]) -> str:
    """The chain of coroutines the task waits in, outermost first (get_stack() gives one)."""
    where: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None and len(where) < 20:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            where.append(type(awaited).__name__)
            break
        where.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return " > ".join(where) or "?"


async def start(
    config: Config, *, reuse_port: bool = False, gateway: Gateway | None = None
) -> Running:
    gateway = gateway or Gateway(config)
    try:
        await gateway.start()
    except BaseException:
        await gateway.close()
        raise
    proxy = web.ServerRunner(
        build_proxy_server(
            gateway,
            access_log=None,
            auto_decompress=False,  # bodies pass through as sent
            # Room for a token just over 16 KiB, which the gateway refuses itself
            # (malformed_token); larger header fields get aiohttp's 400.
            max_field_size=32 * 1024,
        ),
        shutdown_timeout=_CLEANUP_TIMEOUT,  # the drain itself waits up to shutdown_grace
    )
    admin = GuardedAppRunner(
        build_admin_app(gateway),
        header_timeout=config.server.header_timeout,
        access_log=None,
        shutdown_timeout=2,
        keepalive_timeout=config.server.keepalive_timeout,
    )
    # One cap for the process's client connections, over the proxy and forward-auth ports.
    limit = ConnectionLimit(config.server.max_connections)
    own_port = config.forward_auth.listen if config.forward_auth.enabled else None
    forward_auth = None
    if own_port is not None:
        forward_auth = web.ServerRunner(
            build_forward_auth_server(gateway, access_log=None, max_field_size=32 * 1024),
            shutdown_timeout=_CLEANUP_TIMEOUT,
        )
    running = Running(gateway, proxy, admin, forward_auth)
    try:
        await proxy.setup()
        await admin.setup()
        if forward_auth is not None and own_port is not None:
            await forward_auth.setup()
            await CappedSite(
                forward_auth, own_port.host, own_port.port, limit=limit, reuse_port=reuse_port
            ).start()
        await CappedSite(
            proxy, config.listen.host, config.listen.port, limit=limit, reuse_port=reuse_port
        ).start()
        await web.TCPSite(
            admin, config.admin.host, config.admin.port, reuse_port=reuse_port
        ).start()
    except BaseException:
        await running.drain()  # e.g. a port in use: close what was opened, then report
        raise
    return running


_BIND_FAILED = re.compile(
    r"error while attempting to bind on address \('([^']*)', (\d+)[^)]*\): (.*)"
)


def _listeners(config: Config) -> list[tuple[str, str, int]]:
    """Every address serve listens on, with its config key."""
    named = [
        ("listen", config.listen.host, config.listen.port),
        ("admin", config.admin.host, config.admin.port),
    ]
    if config.forward_auth.enabled and (own := config.forward_auth.listen) is not None:
        named.append(("forward_auth.listen", own.host, own.port))
    return named


def cannot_listen(config: Config, exc: OSError) -> str:
    """Why serve could not listen, naming the config key of the listener concerned: the one
    whose address asyncio names, or (a host name that does not resolve) the one with a name
    for a host; else every listener, so that the operator still sees which keys to check."""
    if isinstance(exc, _ProbeRefused):
        key, host, port = exc.listener
        return f"cannot listen ({key} {host or '*'}:{port}): {exc.strerror}"
    reason = str(exc.strerror or exc)
    named = _listeners(config)
    bind = _BIND_FAILED.fullmatch(reason)
    if bind:
        host, port, reason = bind.group(1), int(bind.group(2)), bind.group(3)
        named = [n for n in named if n[2] == port] or named
        if len(named) > 1:
            named = [n for n in named if n[1] == host] or named
    elif isinstance(exc, socket.gaierror):
        named = [n for n in named if not _is_address(n[1])] or named
    where = ", ".join(f"{key} {host or '*'}:{port}" for key, host, port in named)
    return f"cannot listen ({where}): {reason}"


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host == ""
    return True


class _ProbeRefused(OSError):
    """`probe_listeners` could not bind `listener` (its key, host and port)."""

    def __init__(self, errno: int, reason: str, listener: tuple[str, str, int]) -> None:
        super().__init__(errno, reason)
        self.listener = listener


def probe_listeners(config: Config) -> None:
    """With --workers each worker binds with SO_REUSEPORT, which would silently share the port
    with any process of the same user that does so too (another instance; the orphaned
    workers of a killed one). Bound here once without it, each address is refused while
    anything listens on it, in either mode with the same line (uvloop's own bind error names
    no address); closed again before any worker binds. (Something that starts listening in
    between is still refused to the workers, one line, by the same message.)"""
    probes: list[socket.socket] = []
    try:
        for listener in _listeners(config):
            _key, host, port = listener
            if port == 0:
                continue  # any free port: nothing to clash with
            for family, kind, proto, _, address in socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            ):
                probe = socket.socket(family, kind, proto)
                probes.append(probe)
                # As asyncio binds: SO_REUSEADDR (a TIME_WAIT left by a restart is no clash),
                # IPv6 sockets v6-only.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    probe.bind(address)
                except OSError as exc:  # as asyncio words it: in lower case
                    reason = (exc.strerror or str(exc)).lower()
                    raise _ProbeRefused(exc.errno or 0, reason, listener) from None
    finally:
        for probe in probes:
            probe.close()


def tune_gc() -> None:
    """Long-lived start-up objects leave the collector's view, and young collections run less
    often: under load, requests' objects otherwise got promoted and full collections hit p99
    every few seconds (bench/RESULTS.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


async def serve(
    config: Config,
    *,
    reuse_port: bool = False,
    worker: int | None = None,
    parent: int | None = None,
) -> None:
    """`parent`: a worker's supervisor's pid; the worker drains and stops if it goes."""
    running = await start(config, reuse_port=reuse_port)
    tune_gc()
    # Before the startup line: a supervisor that waits for it may signal at once.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _sighup_ignored)
    watch = None
    if parent is not None:
        watch = asyncio.create_task(_watch_parent(parent, stop), name="idlegate-parent-watch")
    proxy_url, admin_url = running.addresses()
    if (forward_auth_url := running.forward_auth_address()) is not None:
        log.info("forward-auth decisions on %s", forward_auth_url)
    who = f" worker {worker}" if worker is not None else ""
    log.info(
        "idlegate %s%s listening on %s (proxy) and %s (admin: metrics, health); store %s",
        __version__,
        who,
        proxy_url,
        admin_url,
        mask_url(config.store.url),
    )
    await stop.wait()
    if watch is not None:
        watch.cancel()
    log.info("draining: readiness off, listener closed, waiting for in-flight requests")
    await running.drain()
    await _cancel_leftovers()
    log.info("stopped")


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """Where PR_SET_PDEATHSIG is not there (or came too late): a worker whose supervisor died
    (re-parented) drains and stops, as on SIGTERM."""
    while True:
        await asyncio.sleep(_PARENT_CHECK_INTERVAL)
        if os.getppid() != parent:
            break
    log.error("the supervisor (pid %d) is gone; this worker stops", parent)
    stop.set()


async def _cancel_leftovers() -> None:
    """asyncio.run would wait, without limit, for tasks still running after the drain; one
    that ignored its cancellation would keep the process alive. Give them _CLOSE_TIMEOUT."""
    leftovers = asyncio.all_tasks() - {asyncio.current_task()}
    for task in leftovers:
        task.cancel()
    if leftovers:
        _, pending = await asyncio.wait(leftovers, timeout=_CLOSE_TIMEOUT)
        if pending:
            log.error("shutdown: %d task(s) ignored cancellation", len(pending))
            log_pending_tasks()


def _sighup_ignored(*_: object) -> None:
    """SIGHUP never kills the gateway (its default action would: exit 129, no drain). Nothing
    is reloaded from the config file; admin.token_file is re-read whenever it changes."""
    log.warning(
        "SIGHUP ignored: configuration reload is not supported, the running configuration "
        "stays; restart to apply changes (a rolling restart in Kubernetes)"
    )


def _die_with_parent(parent: int) -> None:
    """SIGTERM (a drain) when the supervisor dies, even by SIGKILL: workers that outlived it
    would serve on, unseen, a config nobody runs any more (Linux; elsewhere _watch_parent)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the signal was asked for
        os._exit(0)


def _worker(config: Config, index: int, parent: int, report: Any) -> None:
    """One worker; a start-up refusal goes to the supervisor as its lines (`report`, a pipe's
    end), which prints each once, however many workers ran into it."""
    _die_with_parent(parent)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serve() installs the logging handler
    configure_logging(config.server.log_level)
    install_uvloop()
    try:
        asyncio.run(serve(config, reuse_port=True, worker=index, parent=parent))
    except StartupError as exc:  # as in the CLI: one line a problem, no traceback
        _refuse(report, exc.lines(), _REFUSED)
    except OSError as exc:  # as single-process serve: the listener concerned, one line
        _refuse(report, [cannot_listen(config, exc)], _CANNOT_LISTEN)
    report.close()


def _refuse(report: Any, lines: list[str], code: int) -> None:
    with contextlib.suppress(OSError):
        report.send(lines)
    report.close()
    sys.exit(code)


def run(config: Config, workers: int = 1) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code. SIGHUP is logged and ignored."""
    # Ignored from the first moment (start-up may take seconds: keys, store); spawned workers
    # inherit the disposition through exec, so no window kills them either.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    configure_logging(config.server.log_level)
    if config.admin.token_file is not None:
        load_admin_token(config.admin.token_file)  # once here, not once per worker
    # Before anything starts (keys, store): each listen address checked once, precisely named.
    probe_listeners(config)  # OSError: cli's cannot_listen line, exit 1
    if workers <= 1:
        install_uvloop()
        asyncio.run(serve(config))
        return 0
    if not hasattr(socket, "SO_REUSEPORT"):
        log.error("--workers needs SO_REUSEPORT, which this platform lacks")
        return 2
    return _supervise(config, workers)


def _supervise(config: Config, workers: int) -> int:
    """N workers on one port, each kept running: one that dies unasked (the OOM killer's
    SIGKILL, a crash) is logged and replaced, so the pod does not serve on in part, silently.
    One that cannot start (its config, keys or store: exit code 2; a port it cannot listen on:
    1, as single-process serve), or dies again and again right after starting, stops them all:
    the exit code then says so, for the orchestrator. A refusal is printed once, however many
    workers ran into it."""
    context = multiprocessing.get_context("spawn")
    parent = os.getpid()
    reports: dict[int, Any] = {}  # worker index -> the pipe end its refusal comes through

    def spawn(index: int) -> Any:
        reader, writer = context.Pipe(duplex=False)
        process = context.Process(
            target=_worker, args=(config, index, parent, writer), name=f"idlegate-worker-{index}"
        )
        process.start()
        writer.close()
        reports[index] = reader
        return process

    refusals: list[str] = []

    def collect(index: int) -> None:
        """A dead worker's refusal lines, if it sent any; its pipe closed."""
        reader = reports.pop(index, None)
        if reader is None:
            return
        with contextlib.suppress(OSError, EOFError):
            if reader.poll():
                refusals.extend(line for line in reader.recv() if line not in refusals)
        reader.close()

    processes = [spawn(i) for i in range(workers)]
    started = [time.monotonic()] * workers
    quick_deaths = [0] * workers
    forwarded: set[int] = set()
    deadline: list[float] = []  # set by the first signal: when stragglers get killed
    failed: list[str] = []
    exit_code = [1]  # for a failure: 2 for a refused start, as single-process serve

    def forward(signum: int, _frame: object) -> None:
        forwarded.add(signum)
        if not deadline:
            deadline.append(time.monotonic() + config.server.shutdown_grace + _WORKER_EXIT_MARGIN)
        for process in processes:
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, _sighup_ignored)  # not forwarded: workers keep serving
    while any(process.exitcode is None for process in processes):
        running = [process.sentinel for process in processes if process.exitcode is None]
        multiprocessing.connection.wait(running, timeout=0.5)
        for index, process in enumerate(processes):
            if process.exitcode is None:
                if deadline and time.monotonic() > deadline[0]:
                    log.error("worker %s did not stop in time; killing it", process.name)
                    process.kill()
                    process.join()
                continue
            collect(index)
            if process.exitcode in (_REFUSED, _CANNOT_LISTEN) and not failed:
                failed.append(f"worker {process.name} could not start")
                exit_code[0] = 2 if process.exitcode == _REFUSED else 1
                forward(signal.SIGTERM, None)  # its lines say why: printed once, below
                continue
            if forwarded or failed:
                continue  # stopping: its exit code is collected below
            _forget(process)
            how = _exit_description(process.exitcode)
            if time.monotonic() - started[index] < _QUICK_DEATH:
                quick_deaths[index] += 1
                if quick_deaths[index] >= _QUICK_DEATHS:
                    failed.append(f"worker {process.name} died {_QUICK_DEATHS} times on start")
            else:
                quick_deaths[index] = 0
            if failed:
                log.error("%s (%s); stopping every worker", failed[0], how)
                forward(signal.SIGTERM, None)
                continue
            log.error("worker %s %s unasked; starting another in its place", process.name, how)
            processes[index], started[index] = spawn(index), time.monotonic()
    codes = []
    for index, process in enumerate(processes):
        collect(index)
        _forget(process)
        code = process.exitcode or 0
        # A worker stopped by the signal we forwarded before it could install its own handler
        # (still starting) stopped as asked.
        codes.append(0 if -code in forwarded else code)
    for line in refusals:
        print(f"idlegate: {line}", file=sys.stderr)
    if failed:
        return exit_code[0]
    return 0 if all(code == 0 for code in codes) else 1


# A worker that dies this soon after it started, this many times in a row, is not replaced
# again: whatever kills it will kill the next one too.
_QUICK_DEATH = 10.0
_QUICK_DEATHS = 3


def _exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _forget(process: Any) -> None:
    """A dead worker's metric samples stop counting as a live process's (multiprocess mode)."""
    if process.pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
