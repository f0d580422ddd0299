"""A configured admin.token_file that gives no token is a start-up error, not a gateway whose
admin API (revocation) silently refuses every call."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import RedisServer
from harness import Upstream

from .conftest import Spawn
from .processes import e2e_config, run_cli


def _token_file(tmp_path: Path, problem: str) -> Path:
    path = tmp_path / "admin.token"
    if problem == "empty":
        path.write_text("\n")
    elif problem == "a directory":
        path.mkdir()
    return path  # "missing": never created


@pytest.mark.parametrize("problem", ["missing", "empty", "a directory"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_with_an_unusable_admin_token_file_exits_with_one_line(
    tmp_path: Path, key_file: Path, redis_server: RedisServer, problem: str, workers: str
):
    token_file = _token_file(tmp_path, problem)
    data = e2e_config(
        "http://127.0.0.1:9",
        key_file,
        admin={"token_file": str(token_file)},
        store={"url": redis_server.url},
    )
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(data))
    result = run_cli("serve", "-c", str(config), "--workers", workers)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    problems = [line for line in result.stderr.splitlines() if line.startswith("idlegate: ")]
    assert len(problems) == 1, result.stderr
    assert problems[0].startswith(
        f"idlegate: admin.token_file: {'cannot read' if problem != 'empty' else token_file}"
    )
    assert "listening on" not in result.stderr


async def test_serve_with_a_good_admin_token_file_serves_the_admin_api(
    spawn: Spawn, upstream: Upstream, key_file: Path, tmp_path: Path
):
    token_file = tmp_path / "admin.token"
    token_file.write_text("good-token\n")
    gw = spawn(e2e_config(upstream.url, key_file, admin={"token_file": str(token_file)}))
    await gw.wait_ready()
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            gw.admin_url + "/admin/tokens/x", headers={"Authorization": "Bearer good-token"}
        ) as response,
    ):
        assert response.status == 200
    assert await gw.stop(signal.SIGTERM) == 0, gw.describe()
