"""The `idlegate` command line as users meet it: check-config, token, bad flags and bad configs
(one clear line per problem, a non-zero exit, never a traceback), and the newcomer's demo."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml
from conftest import RedisServer, free_port
from harness import merge
from jwks_server import JwksServer, rsa_key

from .processes import bearer, clean_environ, e2e_config, run_cli

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "config"
DEV_PUBLIC = CONFIG_DIR / "dev-public.pem"
JWT_LINE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
INFO_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO ")
PROBLEM_LINE = re.compile(r"^idlegate: [A-Za-z0-9_.]+: \S.*$")


def assert_clean_failure(
    result: subprocess.CompletedProcess[str], code: int | None = 2
) -> list[str]:
    """Non-zero (or exactly `code`) exit, no traceback; the `idlegate: ...` lines on stderr.

    Besides those, stderr may hold only INFO log lines (a failing `serve` logs what it loaded).
    """
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    if code is None:
        assert result.returncode != 0
    else:
        assert result.returncode == code, output
    lines = result.stderr.strip().splitlines()
    messages = [line for line in lines if line.startswith("idlegate: ")]
    assert messages, f"no message on stderr: {lines}"
    others = [line for line in lines if line not in messages and not INFO_LOG.match(line)]
    assert others == [], f"stderr holds more than the problem: {lines}"
    return messages


# -- check-config ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gateway.yaml", "redis.yaml"])
def test_check_config_accepts_the_shipped_configs(name: str):
    result = run_cli("check-config", "-c", str(CONFIG_DIR / name))
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["routes"][0]["prefix"] == "/api/"
    assert effective["policy"]["idle_timeout"] == 900


def test_check_config_masks_the_redis_password_from_the_environment():
    result = run_cli(
        "check-config",
        "-c",
        str(CONFIG_DIR / "redis.yaml"),
        IDLEGATE_STORE__URL="redis://:s3cret@h:6379/0",
    )
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout + result.stderr
    assert yaml.safe_load(result.stdout)["store"]["url"] == "redis://:***@h:6379/0"


def test_check_config_lists_every_problem_with_its_path(tmp_path: Path):
    config = tmp_path / "broken.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"port": 70000},
                "policy": {"idle_timeout": "soon"},
                "store": {"url": "memcached://x", "colour": "blue"},
                "providers": [{"name": "p", "issuer": "i", "audiences": []}],
                "routes": [{"prefix": "api", "upstream": "ftp://x"}],
            }
        )
    )
    lines = assert_clean_failure(run_cli("check-config", "-c", str(config)))
    for line in lines:
        assert PROBLEM_LINE.match(line), line
    paths = {line.removeprefix("idlegate: ").split(":")[0] for line in lines}
    assert {
        "listen.port",
        "policy.idle_timeout",
        "store.url",
        "store.colour",
        "providers.0.audiences",
        "routes.0.prefix",
        "routes.0.upstream",
    } <= paths


def test_check_config_on_a_missing_file_is_one_line(tmp_path: Path):
    lines = assert_clean_failure(run_cli("check-config", "-c", str(tmp_path / "nope.yaml")))
    assert len(lines) == 1
    assert "nope.yaml" in lines[0]


def test_check_config_on_invalid_yaml_is_one_line(tmp_path: Path):
    config = tmp_path / "bad.yaml"
    config.write_text("listen: {port: [\n")
    lines = assert_clean_failure(run_cli("check-config", "-c", str(config)))
    assert len(lines) == 1 and "bad.yaml" in lines[0]


# -- check-config refuses what serve refuses, with the same lines -----------------------------


def providers_of(*sources: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"name": f"p{i}", "issuer": f"https://p{i}/", "audiences": ["a"], **source}
        for i, source in enumerate(sources)
    ]


def refused(tmp_path: Path, case: str) -> tuple[dict[str, Any], dict[str, str], set[str]]:
    """(config data, environment, the field paths both commands must name) for each case."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    empty = tmp_path / "empty.token"
    empty.write_text("")
    base = e2e_config("http://127.0.0.1:9", CONFIG_DIR / "dev-public.pem")
    if case == "admin port is the port of a wildcard listen":
        data = merge(base, {"listen": {"host": "0.0.0.0"}})
        data["admin"]["port"] = data["listen"]["port"]
        return data, {}, {"admin.port"}
    if case == "keys, redis url, missing token file":
        data = merge(
            base,
            {
                "admin": {"token_file": str(tmp_path / "missing.token")},
                "store": {"url": "redis://:hunter2@redis:port/0"},
            },
        )
        data["providers"] = providers_of(
            {"public_key_file": str(tmp_path / "missing.pem")},
            {"public_key_file": str(garbage)},
            {"public_key_file": str(CONFIG_DIR / "dev-private.pem")},
            {"hmac_secret_env": "UNSET_SECRET", "algorithms": ["HS256"]},
            {"jwks_file": str(tmp_path / "missing.json")},
        )
        expected = {
            "admin.token_file", "store.url",
            *(f"providers.{i}.{field}" for i, field in enumerate(
                ["public_key_file"] * 3 + ["hmac_secret_env", "jwks_file"]
            )),
        }  # fmt: skip
        return data, {}, expected
    if case == "sentinel url, empty token file, hash key, short secret":
        data = merge(
            base,
            {
                "admin": {"token_file": str(empty)},
                "store": {"url": "redis+sentinel://s1:26379", "hash_key_env": "UNSET_HASH"},
            },
        )
        data["providers"] = providers_of({"hmac_secret_env": "SHORT", "algorithms": ["HS256"]})
        expected = {
            "admin.token_file", "store.url", "store.hash_key_env", "providers.0.hmac_secret_env"
        }  # fmt: skip
        return data, {"SHORT": "too-short"}, expected
    assert case == "cluster url, token file that is a directory"
    data = merge(
        base,
        {"admin": {"token_file": str(tmp_path)}, "store": {"url": "redis+cluster://n1:7000/2"}},
    )
    return data, {}, {"admin.token_file", "store.url"}


REFUSED_CASES = [
    "admin port is the port of a wildcard listen",
    "keys, redis url, missing token file",
    "sentinel url, empty token file, hash key, short secret",
    "cluster url, token file that is a directory",
]


@pytest.mark.parametrize("case", REFUSED_CASES)
async def test_check_config_and_serve_refuse_the_same_configs_with_the_same_lines(
    tmp_path: Path, case: str
):
    data, env, expected = refused(tmp_path, case)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(data))
    check, serve = await asyncio.gather(
        asyncio.to_thread(run_cli, "check-config", "-c", str(config), **env),
        asyncio.to_thread(run_cli, "serve", "-c", str(config), **env),
    )
    check_lines = assert_clean_failure(check)
    assert check_lines == assert_clean_failure(serve)
    assert {line.removeprefix("idlegate: ").split(":")[0] for line in check_lines} == expected
    for line in check_lines:
        assert PROBLEM_LINE.match(line), line
    assert "hunter2" not in check.stderr + serve.stderr
    assert "too-short" not in check.stderr + serve.stderr


def test_check_config_warns_about_a_misspelled_env_section_and_goes_on():
    result = run_cli(
        "check-config",
        "-c",
        str(CONFIG_DIR / "gateway.yaml"),
        IDLEGATE_POLICI__IDLE_TIMEOUT="5m",
        IDLEGATE_SERVICE_HOST="10.0.0.1",  # Kubernetes service links stay silent
        IDLEGATE_PORT_8080_TCP="tcp://10.0.0.1:8080",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "idlegate: warning: IDLEGATE_POLICI__IDLE_TIMEOUT: ignored, 'polici' is not a config "
        "section; did you mean IDLEGATE_POLICY__IDLE_TIMEOUT?"
    ]


# -- check-config --connect --------------------------------------------------------------------


async def run_cli_async(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """run_cli without blocking the loop (a JWKS server of the test may live in it)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_environ(**env),
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())


def remote_config(tmp_path: Path, store_url: str, *sources: dict[str, Any]) -> Path:
    data = e2e_config("http://127.0.0.1:9", CONFIG_DIR / "dev-public.pem")
    data["store"]["url"] = store_url
    data["providers"] = [
        {"name": f"idp{i}", "audiences": ["a"], "algorithms": ["RS256"], **source}
        for i, source in enumerate(sources)
    ]
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def test_check_config_connect_fetches_the_keys_and_pings_the_store(
    tmp_path: Path, redis_server: RedisServer
):
    async with JwksServer([rsa_key("k1")]) as idp:
        config = remote_config(
            tmp_path,
            redis_server.url,
            {"issuer": idp.issuer, "discovery": True},
            {"issuer": idp.issuer + "/other", "jwks_uri": idp.jwks_uri},
        )
        result = await run_cli_async("check-config", "--connect", "-c", str(config))
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert idp.jwks_requests == 2  # both providers' keys really were fetched
    assert yaml.safe_load(result.stdout)["store"]["url"] == redis_server.url


async def test_check_config_connect_refuses_an_evicting_redis(
    tmp_path: Path, redis_server: RedisServer
):
    redis_server.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
    config = remote_config(
        tmp_path, redis_server.url, {"issuer": "https://x/", "public_key_file": str(DEV_PUBLIC)}
    )
    (line,) = assert_clean_failure(
        await run_cli_async("check-config", "--connect", "-c", str(config))
    )
    assert line.startswith("idlegate: store.url: the Redis maxmemory-policy is allkeys-lru")


async def test_check_config_connect_reports_what_does_not_answer(tmp_path: Path):
    dead_store, dead_idp = free_port(), free_port()
    async with JwksServer([rsa_key("k1")]) as failing:
        failing.fail(500)
        config = remote_config(
            tmp_path,
            f"redis://127.0.0.1:{dead_store}/0",
            {"issuer": "https://dead.test/", "jwks_uri": f"http://127.0.0.1:{dead_idp}/jwks"},
            {"issuer": failing.issuer, "discovery": True},
        )
        offline = await run_cli_async("check-config", "-c", str(config))
        assert offline.returncode == 0, offline.stderr  # nothing wrong that can be seen offline
        lines = assert_clean_failure(
            await run_cli_async("check-config", "--connect", "-c", str(config))
        )
    problems = {line.removeprefix("idlegate: ").split(": ")[0]: line for line in lines}
    assert set(problems) == {"store.url", "providers.0.jwks_uri", "providers.1.discovery"}
    assert f"127.0.0.1:{dead_store}" in problems["store.url"]
    assert f"127.0.0.1:{dead_idp}" in problems["providers.0.jwks_uri"]
    assert "HTTP 500" in problems["providers.1.discovery"]


# -- bad flags and failing starts --------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--workers", "0"],
        ["serve", "--workers", "two"],
        ["token"],
        ["token", "--key", "k.pem", "--ttl", "forever"],
        ["frobnicate"],
        [],
        ["serve", "--no-such-flag"],
    ],
    ids=lambda args: " ".join(args) or "(no command)",
)
def test_bad_flags_fail_in_one_line_without_traceback(args: list[str]):
    lines = assert_clean_failure(run_cli(*args))
    assert len(lines) == 1, lines


def test_token_with_an_unreadable_key_is_one_line(tmp_path: Path):
    (tmp_path / "garbage.pem").write_text("not a key")
    for key in ("missing.pem", "garbage.pem"):
        lines = assert_clean_failure(run_cli("token", "--key", str(tmp_path / key)))
        assert len(lines) == 1 and key in lines[0]


def test_serve_with_an_unusable_key_file_is_one_line(tmp_path: Path):
    bad_key = tmp_path / "public.pem"
    bad_key.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(e2e_config("http://127.0.0.1:9", bad_key)))
    lines = assert_clean_failure(run_cli("serve", "-c", str(config)), code=None)
    assert len(lines) == 1, lines


def test_serve_on_a_busy_port_is_one_line(tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        data = e2e_config("http://127.0.0.1:9", CONFIG_DIR / "dev-public.pem")
        data["listen"]["port"] = busy.getsockname()[1]
        config = tmp_path / "gateway.yaml"
        config.write_text(yaml.safe_dump(data))
        lines = assert_clean_failure(run_cli("serve", "-c", str(config)), code=None)
    assert len(lines) == 1 and "listen" in lines[0], lines


@pytest.mark.parametrize(
    "args",
    [["--idle-timeout", "0"], ["--idle-timeout", "1s"], ["--port", "70000"]],
    ids=["idle-timeout 0", "idle-timeout 1s", "port 70000"],
)
def test_demo_with_unusable_values_fails_without_traceback(args: list[str]):
    ports = ["--port", str(free_port()), "--admin-port", str(free_port())]
    ports += ["--upstream-port", str(free_port())]
    result = run_cli("demo", "--no-walkthrough", *ports, *args)
    lines = assert_clean_failure(result, code=None)
    assert len(lines) == 1, lines


def test_help_works():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("serve", "check-config", "token", "demo"):
        assert command in result.stdout


# -- token -------------------------------------------------------------------------------------


def test_token_prints_a_jwt_with_the_requested_claims():
    result = run_cli(
        "token",
        "--key", str(CONFIG_DIR / "dev-private.pem"),
        "--sub", "alice",
        "--ttl", "5m",
        "--aud", "A",
        "--iss", "I",
        "--sid", "S",
        "--scope", "a b",
        "--kid", "k1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert JWT_LINE.match(token)
    header = jwt.get_unverified_header(token)
    assert (header["kid"], header["alg"]) == ("k1", "RS256")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "alice"
    assert claims["aud"] == "A"
    assert claims["iss"] == "I"
    assert claims["sid"] == "S"
    assert claims["scope"] == "a b"
    assert claims["exp"] - claims["iat"] == 300
    assert abs(claims["iat"] - time.time()) < 60
    assert claims["jti"]
    # ... and it is really signed by the key's public half.
    public = (CONFIG_DIR / "dev-public.pem").read_bytes()
    jwt.decode(token, public, algorithms=["RS256"], audience="A", issuer="I")


# -- demo --------------------------------------------------------------------------------------


WALKTHROUGH_LINE = re.compile(r"^(?P<label>\S.*?)\s+-> (?P<status>\d{3}) (?P<what>.+)$")
DEMO_LAST_LINE = "Ctrl-C stops the demo."


@dataclass
class Demo:
    process: asyncio.subprocess.Process
    port: int
    token: str
    printed: list[str]

    def walkthrough(self) -> dict[str, tuple[int, str]]:
        """label -> (status, reason or 'forwarded ...'), as the walkthrough printed them."""
        found = {}
        for line in self.printed:
            if match := WALKTHROUGH_LINE.match(line.strip()):
                found[match["label"]] = (int(match["status"]), match["what"])
        return found

    def commands(self) -> dict[str, str]:
        """Each printed shell line under the comment that says what it shows."""
        found: dict[str, str] = {}
        comment = ""
        for line in (line.strip() for line in self.printed):
            if line.startswith("# "):
                comment = line[2:]
            elif line.startswith(("curl ", "TOKEN=")):
                found.setdefault(comment, "")
                found[comment] += line + "\n"
        return found


@contextlib.asynccontextmanager
async def demo_running(*, walkthrough: bool = False, **env: str) -> AsyncIterator[Demo]:
    """`idlegate demo --idle-timeout 2s` on free ports, once it printed everything up to its
    last line; killed on exit unless the test stopped it."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "demo", *([] if walkthrough else ["--no-walkthrough"]),
        "--port", str(port),
        "--admin-port", str(free_port()),
        "--upstream-port", str(free_port()),
        "--idle-timeout", "2s",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_environ(**env),
    )  # fmt: skip
    try:
        assert process.stdout is not None
        printed: list[str] = []
        deadline = time.monotonic() + 10
        while not printed or printed[-1] != DEMO_LAST_LINE:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"not all printed within 10 s: {printed}"
            raw = await asyncio.wait_for(process.stdout.readline(), remaining)
            assert raw, f"the demo exited: {printed}"
            printed.append(raw.decode().strip())
        (token,) = [line for line in printed if JWT_LINE.match(line)]
        yield Demo(process=process, port=port, token=token, printed=printed)
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def interrupt(demo: Demo, signum: int = signal.SIGINT) -> str:
    """SIGINT, as Ctrl-C would (or `signum`); all the demo printed once it exited 0."""
    demo.process.send_signal(signum)
    stdout, stderr = await asyncio.wait_for(demo.process.communicate(), 10)
    assert demo.process.returncode == 0, stderr
    assert b"Traceback" not in stderr
    return "\n".join(demo.printed) + "\n" + stdout.decode()


async def test_demo_token_is_accepted_then_refused_after_idling():
    async with demo_running() as demo:
        url = f"http://127.0.0.1:{demo.port}/api/hello"
        async with aiohttp.ClientSession() as http:
            async with http.get(url, headers=bearer(demo.token)) as response:
                assert response.status == 200
                assert (await response.json())["upstream"] == "echo"
            await asyncio.sleep(2.5)
            async with http.get(url, headers=bearer(demo.token)) as response:
                assert response.status == 401
                assert (await response.json())["reason"] == "idle_timeout"
        await interrupt(demo)


async def curl(http: aiohttp.ClientSession, line: str) -> tuple[int, dict[str, object]]:
    """What the printed `curl -s -H HEADER URL` line gets (the same request, through aiohttp)."""
    argv = shlex.split(line)
    assert argv[:3] == ["curl", "-s", "-H"] and len(argv) == 5, argv
    name, _, value = argv[3].partition(": ")
    async with http.get(argv[4], headers={name: value}) as response:
        return response.status, await response.json()


async def test_demo_walkthrough_prints_what_the_gateway_answers_and_its_token_works():
    """The walkthrough as a newcomer runs it: each labelled outcome is true, and the token and
    curl lines printed after its idle pause really do what their comments say."""
    async with demo_running(walkthrough=True) as demo:
        assert demo.walkthrough() == {
            "fresh token": (200, "forwarded to the upstream"),
            "token issued for 1h (cap 15m)": (401, "lifetime_too_long"),
            "same token after idling": (401, "idle_timeout"),
        }
        lines = demo.commands()
        accepted = lines["accepted: the upstream echoes what it received"]
        assert demo.token in accepted  # the token printed alone is the one of the curl line
        async with aiohttp.ClientSession() as http:
            status, body = await curl(http, accepted)
            assert status == 200, body
            assert body["upstream"] == "echo"
            assert body["received"]["X-Auth-Subject"] == "you"  # type: ignore[index]
            status, body = await curl(
                http, lines["refused: issued for longer than the cap -> lifetime_too_long"]
            )
            assert (status, body["reason"]) == (401, "lifetime_too_long")
            status, body = await curl(http, lines["session status (does not count as activity)"])
            assert status == 200 and 0 < body["idle_remaining_seconds"] <= 2  # type: ignore[operator]

            # The fresh-token recipe: its mint command runs as printed (idlegate need not be
            # on PATH), and the token it prints is accepted.
            (fresh,) = [text for comment, text in lines.items() if "fresh token" in comment]
            assignment, use = fresh.splitlines()
            command = re.fullmatch(r"TOKEN=\$\((.+)\)", assignment)
            assert command is not None, assignment
            minting = await asyncio.create_subprocess_exec(
                *shlex.split(command[1]), stdout=asyncio.subprocess.PIPE, env=clean_environ()
            )
            minted, _ = await asyncio.wait_for(minting.communicate(), 10)
            assert minting.returncode == 0
            status, body = await curl(http, use.replace("$TOKEN", minted.decode().strip()))
            assert status == 200, body
        await interrupt(demo, signal.SIGTERM)


@pytest.mark.parametrize("busy", ["--port", "--admin-port", "--upstream-port"])
def test_demo_that_cannot_listen_fails_in_one_line_and_leaves_no_key(tmp_path: Path, busy: str):
    """A port in use ends the demo with one line; the dev private key it had written goes."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    ports = {flag: str(free_port()) for flag in ("--port", "--admin-port", "--upstream-port")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports[busy] = str(taken.getsockname()[1])
        args = [item for pair in ports.items() for item in pair]
        result = run_cli("demo", "--no-walkthrough", *args, TMPDIR=str(scratch))
    lines = assert_clean_failure(result, code=1)
    assert len(lines) == 1 and "listen" in lines[0], lines
    assert list(scratch.iterdir()) == []


async def test_demo_leaves_no_key_behind(tmp_path: Path):
    """The demo writes a dev private key to a temporary directory; it goes when the demo ends."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    async with demo_running(TMPDIR=str(scratch)) as demo:
        printed = await interrupt(demo)
    assert str(scratch) in printed  # the key is where the mint line says
    assert list(scratch.iterdir()) == []
