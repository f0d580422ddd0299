"""`idlegate demo`: gateway + echo upstream + dev key in one process, no external service."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway import config as config_module
from gateway.devtoken import generate_rsa, mint, private_pem, public_pem
from gateway.serve import configure_logging, install_uvloop, start

ISSUER = "https://demo.idlegate.local/"
AUDIENCE = "demo-api"
# Below this, a token could idle out before its first request (its iat is whole seconds).
MIN_IDLE_TIMEOUT = 2.0


async def _echo(request: web.Request) -> web.Response:
    """The demo upstream: says what it received (identity headers included)."""
    received = {
        "method": request.method,
        "path": request.path_qs,
        "X-Auth-Subject": request.headers.get("X-Auth-Subject"),
        "X-Auth-Token-Id": request.headers.get("X-Auth-Token-Id"),
        "X-Request-ID": request.headers.get("X-Request-ID"),
    }
    return web.json_response({"upstream": "echo", "received": received})


def _say(text: str = "") -> None:
    print(text, flush=True)


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _self_command() -> list[str]:
    """How to run idlegate again the way this process was started: the console script's own
    path when it was run as one (a venv's bin/ need not be on PATH), else `python -m gateway`."""
    script = Path(sys.argv[0])
    if script.name == "idlegate":
        on_path = shutil.which("idlegate")
        if on_path is not None and Path(on_path).resolve() == script.resolve():
            return ["idlegate"]
        return [os.path.abspath(script)]
    return [sys.executable, "-m", "gateway"]


async def _walkthrough(base: str, key: Any, idle_timeout: float) -> None:
    """Three requests whose printed outcome is what the gateway really answered. Each token is
    minted just before its first use: a token's never-used idle time counts from its `iat`."""
    async with aiohttp.ClientSession() as http:

        async def call(token: str, label: str) -> None:
            async with http.get(
                f"{base}/api/hello", headers={"Authorization": f"Bearer {token}"}
            ) as r:
                body = await r.json()
                what = body.get("reason") or "forwarded to the upstream"
                _say(f"  {label:<34} -> {r.status} {what}")

        _say("Walkthrough (the gateway checks these requests live):")
        fresh = mint(key, issuer=ISSUER, audience=AUDIENCE, subject="alice", ttl=600)
        await call(fresh, "fresh token")
        long_lived = mint(key, issuer=ISSUER, audience=AUDIENCE, subject="alice", ttl=3600)
        await call(long_lived, "token issued for 1h (cap 15m)")
        # Measured from the fresh token's last accepted request, with a margin for the
        # request's own time: strictly more than idle_timeout has passed when it is sent again.
        pause = idle_timeout + 1
        _say(f"  ... leaving the fresh token alone for {_seconds(pause)} ...")
        await asyncio.sleep(pause)
        await call(fresh, "same token after idling")
        _say("")


def _demo_config(
    port: int, admin_port: int, upstream_port: int, idle_timeout: float, public_key: Path
) -> config_module.Config:
    return config_module.from_data(  # ConfigError: reported by run_demo
        {
            "listen": {"host": "127.0.0.1", "port": port},
            "admin": {"host": "127.0.0.1", "port": admin_port},
            "server": {"shutdown_grace": "2s", "access_log": False},
            "store": {"url": "memory://"},
            "policy": {"idle_timeout": idle_timeout, "max_token_lifetime": "15m"},
            "providers": [
                {
                    "name": "demo",
                    "issuer": ISSUER,
                    "audiences": [AUDIENCE],
                    "algorithms": ["RS256"],
                    "public_key_file": str(public_key),
                }
            ],
            "routes": [{"prefix": "/", "upstream": f"http://127.0.0.1:{upstream_port}"}],
        },
        environ={},
    )


def _try_it_yourself(base: str, key: Any, key_path: Path, idle_timeout: float) -> None:
    """The user's token is minted here, when it is printed: minted earlier, it would have
    spent the walkthrough's pause idling and be refused on arrival."""
    yours = mint(key, issuer=ISSUER, audience=AUDIENCE, subject="you", ttl=600)
    long_lived = mint(key, issuer=ISSUER, audience=AUDIENCE, subject="you", ttl=3600)
    auth = shlex.quote(f"Authorization: Bearer {yours}")
    long_auth = shlex.quote(f"Authorization: Bearer {long_lived}")
    mint_args = ["token", "--key", str(key_path), "--iss", ISSUER, "--aud", AUDIENCE]
    mint_cmd = shlex.join([*_self_command(), *mint_args, "--sub", "you", "--ttl", "10m"])
    idle = _seconds(idle_timeout)
    _say(f"Try it yourself. A token for you, minted now (valid 10 min, dies after {idle} unused):")
    _say(yours)
    _say("")
    _say("  # accepted: the upstream echoes what it received")
    _say(f"  curl -s -H {auth} {base}/api/hello")
    _say("  # refused: issued for longer than the cap -> lifetime_too_long")
    _say(f"  curl -s -H {long_auth} {base}/api/hello")
    _say(f"  # leave it alone for over {idle}, run the first line again -> idle_timeout")
    _say("  # session status (does not count as activity)")
    _say(f"  curl -s -H {auth} {base}/.idlegate/session")
    _say(f"  # more than {idle} went by before you got here? a fresh token, used the same way:")
    _say(f"  TOKEN=$({mint_cmd})")
    _say(f'  curl -s -H "Authorization: Bearer $TOKEN" {base}/api/hello')
    _say("")
    _say("Ctrl-C stops the demo.")


async def _main(
    port: int, admin_port: int, upstream_port: int, idle_timeout: float, walkthrough: bool
) -> int:
    # The dev private key lives here; whatever happens from now on (a port in use, a bad
    # value, Ctrl-C at any moment), it goes with the directory.
    workdir = Path(tempfile.mkdtemp(prefix="idlegate-demo-"))
    try:
        return await _run(workdir, port, admin_port, upstream_port, idle_timeout, walkthrough)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _run(
    workdir: Path,
    port: int,
    admin_port: int,
    upstream_port: int,
    idle_timeout: float,
    walkthrough: bool,
) -> int:
    key = generate_rsa()
    key_path = workdir / "dev-private.pem"
    key_path.write_bytes(private_pem(key))
    (workdir / "dev-public.pem").write_bytes(public_pem(key))
    config = _demo_config(port, admin_port, upstream_port, idle_timeout, workdir / "dev-public.pem")

    upstream = web.AppRunner(web.Application())
    upstream.app.router.add_route("*", "/{tail:.*}", _echo)
    await upstream.setup()
    try:
        await web.TCPSite(upstream, "127.0.0.1", upstream_port).start()
        running = await start(config)
        try:
            # Before the first line is printed: whoever reads it may press Ctrl-C at once.
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            base = f"http://127.0.0.1:{port}"
            _say(f"idlegate demo: gateway on {base}, echo upstream behind it, memory store,")
            _say(f"idle timeout {_seconds(idle_timeout)}, lifetime cap 15m.")
            _say(f"Metrics: http://127.0.0.1:{admin_port}/metrics")
            _say("")
            if walkthrough:
                walk = asyncio.ensure_future(_walkthrough(base, key, idle_timeout))
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait({walk, stopped}, return_when=asyncio.FIRST_COMPLETED)
                walk.cancel()  # Ctrl-C during the walkthrough ends the demo there
                stopped.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await walk  # its errors, if any, surface here
            if not stop.is_set():
                _try_it_yourself(base, key, key_path, idle_timeout)
                await stop.wait()
        finally:
            await running.drain()
    finally:
        await upstream.cleanup()
    return 0


async def _serve_echo(host: str, port: int) -> int:
    upstream = web.AppRunner(web.Application(), access_log=None)
    upstream.app.router.add_route("*", "/{tail:.*}", _echo)
    await upstream.setup()
    try:
        await web.TCPSite(upstream, host, port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        _say(f"idlegate echo: an upstream on http://{host}:{port} that answers what it received")
        await stop.wait()
    finally:
        await upstream.cleanup()
    return 0


def run_echo(*, host: str, port: int) -> int:
    """`idlegate echo`: the demo's upstream on its own, to try a config (README "Running it")."""
    return asyncio.run(_serve_echo(host, port))


def run_demo(
    *, port: int, admin_port: int, upstream_port: int, idle_timeout: float, walkthrough: bool
) -> int:
    if idle_timeout < MIN_IDLE_TIMEOUT:
        # A token's never-used idle time counts from its iat, in whole seconds: with less,
        # a token could be refused idle_timeout on its first request.
        print(
            f"idlegate: --idle-timeout: the demo needs at least {_seconds(MIN_IDLE_TIMEOUT)}"
            f" (got {_seconds(idle_timeout)}): token iat is in whole seconds",
            file=sys.stderr,
        )
        return 2
    configure_logging("warning")
    install_uvloop()
    try:
        return asyncio.run(_main(port, admin_port, upstream_port, idle_timeout, walkthrough))
    except config_module.ConfigError as exc:
        for problem in exc.problems:
            print(f"idlegate: {problem}", file=sys.stderr)
        return 2
