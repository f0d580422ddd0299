"""The access log as an operator reads it: one JSON line per request on stdout, with the jti and
sub of a verified token, and never a token (nor its signature) anywhere in the output."""

from __future__ import annotations

import base64
import json
import signal
import time
from pathlib import Path

import aiohttp
from harness import Upstream
from jwks_server import SigningKey

from .conftest import Spawn
from .processes import bearer, e2e_config, mint

KEYS = {
    "time",
    "request_id",
    "method",
    "route",
    "status",
    "decision",
    "reason",
    "jti",
    "sub",
    "upstream_ms",
    "total_ms",
    "mode",  # the front door: proxy | forward_auth
}


def tampered(token: str) -> str:
    """The same header and signature over a payload whose `sub` was changed to admin."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


async def test_one_json_line_per_request_and_no_token_in_any_output(
    spawn: Spawn, upstream: Upstream, key_file: Path, signing_key: SigningKey
):
    gw = spawn(e2e_config(upstream.url, key_file, server={"access_log": True}))
    await gw.wait_ready()
    valid = mint(signing_key, sub="alice", jti="jti-valid")
    tokens = {
        "valid": valid,
        "expired": mint(signing_key, now=time.time() - 3600, ttl=600),
        "forged": tampered(mint(signing_key, sub="mallory")),
        "over-long": mint(signing_key, ttl=7200),
        "malformed": "not-a-jwt-4f1d2a9c8e7b",
    }
    expected = {
        "valid": (200, "allowed", "ok"),
        "expired": (401, "rejected", "expired"),
        "forged": (401, "rejected", "bad_signature"),
        "over-long": (401, "rejected", "lifetime_too_long"),
        "malformed": (401, "rejected", "malformed_token"),
    }
    async with aiohttp.ClientSession() as http:
        for name, token in tokens.items():
            async with http.get(
                gw.url + "/api/orders",
                headers={**bearer(token), "X-Request-ID": f"req-{name}"},
            ) as response:
                assert response.status == expected[name][0], await response.text()
    assert await gw.stop(signal.SIGTERM) == 0, gw.describe()

    stdout, stderr = gw.stdout(), gw.stderr()
    output = stdout + stderr
    for name, token in tokens.items():
        assert token not in output, f"the {name} token was logged"
        parts = token.split(".")
        if len(parts) == 3:
            assert parts[2] not in output, f"the {name} token's signature was logged"

    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    by_id = {line["request_id"]: line for line in lines}
    assert len(lines) == len(tokens) == len(by_id), stdout
    for name, (status, decision, reason) in expected.items():
        line = by_id[f"req-{name}"]
        assert set(line) == KEYS, line
        assert (line["status"], line["decision"], line["reason"]) == (status, decision, reason)
        assert line["method"] == "GET" and line["route"] == "/api/"
        assert isinstance(line["total_ms"], int | float)
    allowed = by_id["req-valid"]
    assert (allowed["jti"], allowed["sub"]) == ("jti-valid", "alice")
    assert isinstance(allowed["upstream_ms"], int | float)
    assert by_id["req-malformed"]["jti"] is None
