"""Running the gateway: one process or N workers on one port, and a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway import __version__
from gateway.app import Gateway, build_admin_app, build_proxy_server
from gateway.config import Config, mask_url

log = logging.getLogger("idlegate")
_CLEANUP_TIMEOUT = 0.1


class _BadRequestLine(logging.Filter):
    """aiohttp logs every malformed request (scanners, smuggling attempts) at ERROR with a
    traceback; for an operator it is one line: who sent what the parser refused."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "refused a malformed HTTP request (400): %s"
            record.args = (str(exc.message).splitlines()[0] if exc.message else exc.code,)
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
    logging.getLogger("aiohttp.server").addFilter(_BadRequestLine())


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return  # optional: the standard event loop works, only slower
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@dataclass
class Running:
    """A started gateway with both listeners; `drain()` is the SIGTERM path."""

    gateway: Gateway
    proxy: web.BaseRunner
    admin: web.AppRunner

    def addresses(self) -> tuple[str, str]:
        def first(runner: web.BaseRunner) -> str:
            host, port = runner.addresses[0][:2]
            return f"http://{host}:{port}"

        return first(self.proxy), first(self.admin)

    async def drain(self) -> None:
        """Readiness off at once, stop accepting, let in-flight requests finish (up to
        `shutdown_grace`, in total), then close upstream and store connections."""
        self.gateway.draining = True
        for site in list(self.proxy.sites):
            await site.stop()  # no new connections
        if self.proxy.server is not None:
            self.proxy.server.pre_shutdown()  # idle keep-alives close; busy ones after their reply
        if self.gateway.in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.gateway.config.server.shutdown_grace):
                    await self.gateway.quiet.wait()
        if self.gateway.in_flight:
            log.warning("shutdown_grace over: %d request(s) cut off", self.gateway.in_flight)
        await self.proxy.cleanup()  # what is left gets _CLEANUP_TIMEOUT, then is cancelled
        await self.gateway.close()
        await self.admin.cleanup()


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
    admin = web.AppRunner(build_admin_app(gateway), access_log=None, shutdown_timeout=2)
    running = Running(gateway, proxy, admin)
    try:
        await proxy.setup()
        await admin.setup()
        await web.TCPSite(
            proxy, config.listen.host, config.listen.port, reuse_port=reuse_port, backlog=1024
        ).start()
        await web.TCPSite(
            admin, config.admin.host, config.admin.port, reuse_port=reuse_port
        ).start()
    except BaseException:
        await running.drain()  # e.g. a port in use: close what was opened, then report
        raise
    return running


def tune_gc() -> None:
    """Long-lived start-up objects leave the collector's view, and young collections run less
    often: under load, requests' objects otherwise got promoted and full collections of
    40-50 ms hit p99 every few seconds (bench/RESULTS.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


async def serve(config: Config, *, reuse_port: bool = False, worker: int | None = None) -> None:
    running = await start(config, reuse_port=reuse_port)
    tune_gc()
    proxy_url, admin_url = running.addresses()
    who = f" worker {worker}" if worker is not None else ""
    log.info(
        "idlegate %s%s listening on %s (proxy) and %s (admin: metrics, health); store %s",
        __version__,
        who,
        proxy_url,
        admin_url,
        mask_url(config.store.url),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("draining: readiness off, listener closed, waiting for in-flight requests")
    await running.drain()
    log.info("stopped")


def _worker(config: Config, index: int) -> None:
    configure_logging(config.server.log_level)
    install_uvloop()
    asyncio.run(serve(config, reuse_port=True, worker=index))


def run(config: Config, workers: int = 1) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    configure_logging(config.server.log_level)
    if workers <= 1:
        install_uvloop()
        asyncio.run(serve(config))
        return 0
    if not hasattr(socket, "SO_REUSEPORT"):
        log.error("--workers needs SO_REUSEPORT, which this platform lacks")
        return 2
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_worker, args=(config, i), name=f"idlegate-worker-{i}")
        for i in range(workers)
    ]
    for process in processes:
        process.start()

    forwarded: set[int] = set()

    def forward(signum: int, _frame: object) -> None:
        forwarded.add(signum)
        for process in processes:
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = []
    for process in processes:
        process.join()
        code = process.exitcode or 0
        # A worker stopped by the signal we forwarded before it could install its own handler
        # (still starting) stopped as asked.
        codes.append(0 if -code in forwarded else code)
        if process.pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
    return 0 if all(code == 0 for code in codes) else 1
