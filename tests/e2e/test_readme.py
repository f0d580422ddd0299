"""The README as a newcomer follows it: the "Running it" commands, run line by line after the
quickstart, do what their comments say. Only the ports differ (free ones instead of 8000/8080/
9090, which another process of this machine may hold); paths and flags are the README's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
from conftest import free_port

from .processes import clean_environ

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
ABSOLUTE_MACHINE_PATH = re.compile(r"(?<![\w.~$-])/(?:work|home|root|Users|opt|srv)/[\w./-]+")


def sh_blocks(section: str) -> list[list[str]]:
    """The ```sh blocks of one README section, as command lines without their comments."""
    text = README.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else None]
    blocks = re.findall(r"```sh\n(.*?)```", body, flags=re.S)
    return [
        [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
        for block in blocks
    ]


def test_the_running_it_commands_name_files_that_exist():
    lines = [line for block in sh_blocks("Running it") for line in block]
    named = {word for line in lines for word in shlex.split(line) if word.startswith("config/")}
    assert named >= {"config/gateway.yaml", "config/redis.yaml", "config/dev-private.pem"}
    for path in named:
        assert (REPO / path).is_file(), path
    # `. .venv/bin/activate` is the quickstart's own venv.
    assert lines[0].startswith(". .venv/bin/activate")
    assert "python3 -m venv .venv" in " ".join(sh_blocks("Quickstart")[0])


def test_readmes_hard_code_no_machine_paths():
    for readme in (README, REPO / "bench" / "README.md"):
        found = ABSOLUTE_MACHINE_PATH.findall(readme.read_text())
        assert found == [], f"{readme.relative_to(REPO)}: {found}"


def wait_listening(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{what} exited: {process.returncode}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not listen on {port} within 10 s")


@contextlib.contextmanager
def background() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


async def test_the_running_it_section_works_as_written():
    upstream_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "idlegate").is_file(), "the console script is where the README says"
    env = clean_environ(
        # What `. .venv/bin/activate` does that matters here.
        PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        VIRTUAL_ENV=str(venv_bin.parent),
        IDLEGATE_LISTEN__PORT=str(proxy_port),
        IDLEGATE_ADMIN__PORT=str(admin_port),
        IDLEGATE_ROUTES__0__UPSTREAM=f"http://127.0.0.1:{upstream_port}",
        IDLEGATE_ROUTES__1__UPSTREAM=f"http://127.0.0.1:{upstream_port}",
    )
    token = ""
    answers = []
    with background() as started:
        for line in sh_blocks("Running it")[0]:
            command = line.replace("8000", str(upstream_port)).replace("8080", str(proxy_port))
            if command.startswith(". .venv/bin/activate"):
                continue  # its effect is in env
            if command.endswith("&"):
                process = subprocess.Popen(
                    ["bash", "-c", "exec " + command.removesuffix("&")],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stdin=subprocess.DEVNULL,
                )
                started.append(process)
                wait_listening(upstream_port if " echo " in command else proxy_port, process, line)
            elif command.startswith("TOKEN=$("):
                inner = command.removeprefix("TOKEN=$(").removesuffix(")")
                token = subprocess.run(
                    ["bash", "-c", inner], cwd=REPO, env=env, capture_output=True, text=True,
                    check=True, timeout=30,
                ).stdout.strip()  # fmt: skip
            elif command.startswith("curl "):
                argv = shlex.split(command.replace("$TOKEN", token))
                headers = {}
                if "-H" in argv:
                    name, _, value = argv[argv.index("-H") + 1].partition(": ")
                    headers[name] = value
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(argv[-1], headers=headers) as r,
                ):
                    answers.append((r.status, await r.json()))
            else:
                result = await asyncio.to_thread(
                    subprocess.run, ["bash", "-c", command], cwd=REPO, env=env,
                    capture_output=True, text=True, timeout=30, check=False,
                )  # fmt: skip
                assert result.returncode == 0, f"{line}: {result.stderr}"
    assert token
    (ok, body), (refused, refusal) = answers
    assert ok == 200 and body["upstream"] == "echo", body
    assert body["received"]["X-Auth-Subject"] == "alice"
    assert (refused, refusal["reason"]) == (401, "missing_token")


def test_echo_on_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "echo", "--port", str(taken.getsockname()[1])],
            capture_output=True, text=True, timeout=30, env=clean_environ(), check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("idlegate: cannot listen") and "Traceback" not in result.stderr
