"""`idlegate demo`: gateway + echo upstream + dev key in one process, no external service."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway import config as config_module
from gateway.devtoken import generate_rsa, mint, private_pem, public_pem
from gateway.serve import configure_logging, install_uvloop, start

ISSUER = "https://demo.idlegate.local/"
AUDIENCE = "demo-api"


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


async def _walkthrough(base: str, fresh: str, long_lived: str, idle_timeout: float) -> None:
    async with aiohttp.ClientSession() as http:

        async def call(token: str, label: str) -> None:
            async with http.get(
                f"{base}/api/hello", headers={"Authorization": f"Bearer {token}"}
            ) as r:
                body = await r.json()
                what = body.get("reason") or "forwarded to the upstream"
                _say(f"  {label:<34} -> {r.status} {what}")

        _say("Walkthrough (the gateway checks these requests live):")
        await call(fresh, "fresh token")
        await call(long_lived, "token issued for 1h (cap 15m)")
        _say(f"  ... leaving the fresh token alone for {idle_timeout + 1:.0f}s ...")
        await asyncio.sleep(idle_timeout + 1)
        await call(fresh, "same token after idling")
        _say("")


async def _main(
    port: int, admin_port: int, upstream_port: int, idle_timeout: float, walkthrough: bool
) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="idlegate-demo-"))
    key = generate_rsa()
    (workdir / "dev-private.pem").write_bytes(private_pem(key))
    (workdir / "dev-public.pem").write_bytes(public_pem(key))

    config = config_module.from_data(  # ConfigError: reported by run_demo
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
                    "public_key_file": str(workdir / "dev-public.pem"),
                }
            ],
            "routes": [{"prefix": "/", "upstream": f"http://127.0.0.1:{upstream_port}"}],
        },
        environ={},
    )
    upstream = web.AppRunner(web.Application())
    upstream.app.router.add_route("*", "/{tail:.*}", _echo)
    await upstream.setup()
    await web.TCPSite(upstream, "127.0.0.1", upstream_port).start()

    try:
        running = await start(config)
    except BaseException:
        await upstream.cleanup()
        raise
    # Before the first line is printed: whoever reads it may press Ctrl-C at once.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    base = f"http://127.0.0.1:{port}"
    fresh = mint(key, issuer=ISSUER, audience=AUDIENCE, subject="alice", ttl=600)
    long_lived = mint(key, issuer=ISSUER, audience=AUDIENCE, subject="alice", ttl=3600)
    yours = mint(key, issuer=ISSUER, audience=AUDIENCE, subject="you", ttl=600)
    _say(f"idlegate demo: gateway on {base}, echo upstream behind it, memory store,")
    _say(f"idle timeout {idle_timeout:.0f}s, lifetime cap 15m.")
    _say(f"Metrics: http://127.0.0.1:{admin_port}/metrics")
    _say("")
    if walkthrough:
        walk = asyncio.ensure_future(_walkthrough(base, fresh, long_lived, idle_timeout))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({walk, stopped}, return_when=asyncio.FIRST_COMPLETED)
        walk.cancel()  # Ctrl-C during the walkthrough ends the demo there
        stopped.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await walk  # its errors, if any, surface here
    auth = shlex.quote(f"Authorization: Bearer {yours}")
    long_auth = shlex.quote(f"Authorization: Bearer {long_lived}")
    key_path = workdir / "dev-private.pem"
    mint_cmd = f"idlegate token --key {key_path} --iss {ISSUER} --aud {AUDIENCE} --ttl 10m"
    _say(
        "Try it yourself. A token for you (valid 10 min, dies after "
        f"{idle_timeout:.0f}s without use):"
    )
    _say(yours)
    _say("")
    _say("  # accepted: the upstream echoes what it received")
    _say(f"  curl -s -H {auth} {base}/api/hello")
    _say("  # refused: issued for longer than the cap -> lifetime_too_long")
    _say(f"  curl -s -H {long_auth} {base}/api/hello")
    _say(f"  # leave it alone for {idle_timeout:.0f}s, run the first line again -> idle_timeout")
    _say("  # session status (does not count as activity)")
    _say(f"  curl -s -H {auth} {base}/.idlegate/session")
    _say(f"  # mint more tokens: {mint_cmd}")
    _say("")
    _say("Ctrl-C stops the demo.")
    await stop.wait()
    await running.drain()
    await upstream.cleanup()
    shutil.rmtree(workdir, ignore_errors=True)  # the dev private key goes with it
    return 0


def run_demo(
    *, port: int, admin_port: int, upstream_port: int, idle_timeout: float, walkthrough: bool
) -> int:
    configure_logging("warning")
    install_uvloop()
    try:
        return asyncio.run(_main(port, admin_port, upstream_port, idle_timeout, walkthrough))
    except config_module.ConfigError as exc:
        for problem in exc.problems:
            print(f"idlegate: {problem}", file=sys.stderr)
        return 2
