"""The `idlegate` command: serve, check-config, token, demo, echo. No logic of its own.

Every user error ends as one `idlegate: ...` line per problem on stderr and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import yaml

from gateway import __version__
from gateway.config import Config, env_warnings, load, parse_duration
from gateway.errors import StartupError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"idlegate: {message} (see 'idlegate {self._sub_name()}--help')\n")

    def _sub_name(self) -> str:
        parts = self.prog.split()[1:]
        return " ".join(parts) + " " if parts else ""


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="idlegate",
        description="A gateway that refuses bearer tokens left idle for longer than a timeout.",
    )
    parser.add_argument("--version", action="version", version=f"idlegate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument(
        "-c", "--config", help="config file (default $IDLEGATE_CONFIG, then config/gateway.yaml)"
    )
    serve.add_argument(
        "--workers", type=_positive_int, default=1, help="processes sharing the port"
    )

    check = commands.add_parser(
        "check-config", help="validate a config and print it, secrets masked"
    )
    check.add_argument(
        "-c", "--config", help="config file (default $IDLEGATE_CONFIG, then config/gateway.yaml)"
    )
    check.add_argument(
        "--connect",
        action="store_true",
        help="also fetch every provider's remote keys and ping the store",
    )

    token = commands.add_parser("token", help="mint a signed token for development")
    token.add_argument(
        "--key", required=True, type=Path, help="PEM private key (RSA, EC or Ed25519)"
    )
    token.add_argument("--kid", help="key id header")
    token.add_argument("--sub", default="dev-user", help="subject (default dev-user)")
    token.add_argument("--ttl", type=_duration, default=600.0, help="lifetime, e.g. 10m (default)")
    token.add_argument("--aud", default="orders-api", help="audience (default orders-api)")
    token.add_argument("--iss", default="https://issuer.example/", help="issuer")
    token.add_argument("--sid", help="session id claim")
    token.add_argument("--scope", help='space-separated scopes, e.g. "orders:read orders:write"')

    demo = commands.add_parser(
        "demo", help="a self-contained demo: gateway, echo upstream, dev key"
    )
    demo.add_argument("--port", type=_port, default=8080, help="proxy port (default 8080)")
    demo.add_argument("--admin-port", type=_port, default=9090, help="admin port (default 9090)")
    demo.add_argument("--upstream-port", type=_port, default=8081, help="echo upstream port")
    demo.add_argument("--idle-timeout", type=_duration, default=20.0, help="default 20s")
    demo.add_argument("--no-walkthrough", action="store_true", help="skip the self-run scenario")

    echo = commands.add_parser(
        "echo", help="an upstream that answers with what it received, to try a config"
    )
    echo.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    echo.add_argument("--port", type=_port, default=8000, help="default 8000")
    return parser


def _config_or_exit(path: str | None) -> Config:
    for warning in env_warnings():
        print(f"idlegate: warning: {warning}", file=sys.stderr)
    try:
        return load(path)
    except StartupError as exc:
        _exit_with(exc.lines())


def _exit_with(problems: list[str]) -> NoReturn:
    for problem in problems:
        print(f"idlegate: {problem}", file=sys.stderr)
    raise SystemExit(2) from None


def _preflight_or_exit(config: Config, *, connect: bool = False) -> None:
    """What serve would refuse at start (key files, secrets, store URL, ports, admin token),
    and with `connect` what the network says; every problem, then exit 2."""
    # Imports prometheus_client: after PROMETHEUS_MULTIPROC_DIR is chosen (see _serve).
    from gateway.preflight import problems

    found = asyncio.run(problems(config, connect=connect))
    if found:
        _exit_with(found)


def _check_config(args: argparse.Namespace) -> int:
    config = _config_or_exit(args.config)
    _preflight_or_exit(config, connect=args.connect)
    print(yaml.safe_dump(config.masked(), sort_keys=False), end="")
    return 0


_METRICS_DIR_PREFIX = "idlegate-metrics-"


def _remove_stale_metrics_dirs() -> None:
    """The metrics directories (named after their serve's pid) of a serve that was killed
    before it could remove its own: this user's, whose pid is gone or is this process (a
    restarted container's, also pid 1). One of an unrelated process that got the pid is left."""
    scratch = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in scratch.glob(f"{_METRICS_DIR_PREFIX}*-*"):
            owner = entry.name[len(_METRICS_DIR_PREFIX) :].split("-", 1)[0]
            if not owner.isdigit() or not entry.is_dir() or entry.is_symlink():
                continue
            if entry.lstat().st_uid != os.getuid() or _alive(int(owner)):
                continue
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True


def _serve(args: argparse.Namespace) -> int:
    config = _config_or_exit(args.config)
    metrics_dir: str | None = None
    if args.workers > 1:
        if config.store.is_memory:
            print(
                "idlegate: --workers > 1 needs a shared store: the memory store would give each "
                "worker its own idea of last activity; set store.url to redis://...",
                file=sys.stderr,
            )
            return 2
        # Must be set before prometheus_client is imported (by gateway.serve), in every worker.
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            _remove_stale_metrics_dirs()
            metrics_dir = tempfile.mkdtemp(prefix=f"{_METRICS_DIR_PREFIX}{os.getpid()}-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        _preflight_or_exit(config)  # the same checks and lines as check-config
        from gateway.serve import cannot_listen, run  # after the metrics mode is chosen

        try:
            return run(config, args.workers)
        except StartupError as exc:
            for line in exc.lines():
                print(f"idlegate: {line}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"idlegate: {cannot_listen(config, exc)}", file=sys.stderr)
            return 1
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _token(args: argparse.Namespace) -> int:
    from gateway.devtoken import KeyFileError, load_private_key, mint

    try:
        key = load_private_key(args.key)
        token = mint(
            key,
            issuer=args.iss,
            audience=args.aud,
            subject=args.sub,
            ttl=args.ttl,
            kid=args.kid,
            sid=args.sid,
            scope=args.scope,
        )
    except KeyFileError as exc:
        print(f"idlegate: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    try:
        return run_demo(
            port=args.port,
            admin_port=args.admin_port,
            upstream_port=args.upstream_port,
            idle_timeout=args.idle_timeout,
            walkthrough=not args.no_walkthrough,
        )
    except OSError as exc:
        print(f"idlegate: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _echo(args: argparse.Namespace) -> int:
    from gateway.demo import run_echo

    try:
        return run_echo(host=args.host, port=args.port)
    except OSError as exc:
        print(f"idlegate: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    # Until serve configures logging, the gateway's own log records (a key or store warning
    # while checking) would reach stderr bare through logging's last resort: every problem
    # is reported as an `idlegate: ...` line instead.
    ours = logging.getLogger("idlegate")
    if not any(isinstance(handler, logging.NullHandler) for handler in ours.handlers):
        ours.addHandler(logging.NullHandler())
    args = build_parser().parse_args(argv)
    handlers = {
        "serve": _serve,
        "check-config": _check_config,
        "token": _token,
        "demo": _demo,
        "echo": _echo,
    }
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return 130


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
