"""Credentials in configured URLs (userinfo, `?api_key=`) are used, never shown: check-config,
check-config --connect, the key refresh log, /readyz and the upstream failure log show `***`,
while the key set fetch still sends them as Basic auth. Real sockets, a real gateway."""

from __future__ import annotations

import asyncio
import base64
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from conftest import GatewayFactory, free_port
from e2e.processes import run_cli
from harness import AUDIENCE, ISSUER
from jwks_server import JwksServer, rsa_key

from gateway.config import ConfigError, from_data, mask_url

PASSWORD = "S3cretPassw0rd"
API_KEY = "K3yInTheQuery"
BASIC = "Basic " + base64.b64encode(f"svc:{PASSWORD}".encode()).decode()
SECRETS = (PASSWORD, API_KEY)


@dataclass
class GuardedIdp(JwksServer):
    """A JwksServer that notes the Authorization header of every request it answers."""

    authorizations: list[str | None] = field(default_factory=list)

    async def _answer(
        self, request: web.Request, document: dict[str, Any], cache: bool
    ) -> web.Response:
        self.authorizations.append(request.headers.get("Authorization"))
        return await super()._answer(request, document, cache)


def credentialed(url: str) -> str:
    return url.replace("://", f"://svc:{PASSWORD}@")


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://svc:pw@idp:8080/jwks", "http://svc:***@idp:8080/jwks"),
        ("https://idp/jwks?api_key=k&v=2&access_token=t", "https://idp/jwks?api_key=***&v=2&access_token=***"),
        ("https://idp/jwks?X-Amz-Signature=s&sig=s", "https://idp/jwks?X-Amz-Signature=***&sig=***"),
        # An unencoded `@` stays in the password, as aiohttp reads it; an `@` in the path is no
        # userinfo.
        ("http://svc:p@ss@idp/jwks", "http://svc:***@idp/jwks"),
        ("http://idp:8080/users/@me", "http://idp:8080/users/@me"),
        # aiohttp cannot read it (the `/` ends its authority): masked up to the last `@`.
        ("http://svc:pa/ss@idp/jwks", "http://svc:***@idp/jwks"),
        ("redis://r:6379/0?ssl_keyfile=/k.pem&ssl_password=x", "redis://r:6379/0?ssl_keyfile=/k.pem&ssl_password=***"),
        ("http://svc@idp/jwks", "http://svc@idp/jwks"),  # a user alone is no password
    ],
)  # fmt: skip
def test_mask_url_hides_passwords_and_credential_options(url: str, shown: str):
    assert mask_url(url) == shown


@pytest.mark.parametrize("where", ["jwks_uri", "upstream"])
def test_a_url_aiohttp_cannot_read_is_refused_without_repeating_it(where: str):
    unreadable = "http://svc:pa/ss@idp.test:8080/x"
    provider = {"name": "p", "issuer": "https://p/", "audiences": ["a"]}
    provider |= {"jwks_uri": unreadable} if where == "jwks_uri" else {"discovery": True}
    upstream = unreadable if where == "upstream" else "http://127.0.0.1:9"
    with pytest.raises(ConfigError) as refused:
        from_data({"providers": [provider], "routes": [{"prefix": "/", "upstream": upstream}]})
    (line,) = refused.value.lines()
    assert "percent-encode" in line and "pa/ss" not in line, line


def test_check_config_prints_no_password_of_any_configured_url(tmp_path: Path):
    data = {
        "store": {"url": "redis://:RedisPassw0rd@127.0.0.1:1/0"},
        "providers": [
            {
                "name": "direct",
                "issuer": "https://direct.test/",
                "audiences": ["a"],
                "jwks_uri": f"https://svc:{PASSWORD}@keys.test/jwks?api_key={API_KEY}",
            },
            {
                "name": "discovered",
                "issuer": [credentialed("https://tenant-a.test/"), "https://tenant-b.test/"],
                "audiences": ["a"],
                "discovery": True,
            },
        ],
        "routes": [{"prefix": "/", "upstream": credentialed("http://orders.test:8000")}],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert_no_secret(result.stdout + result.stderr)
    assert "RedisPassw0rd" not in result.stdout
    shown = yaml.safe_load(result.stdout)
    assert shown["store"]["url"] == "redis://:***@127.0.0.1:1/0"
    direct, discovered = shown["providers"]
    assert direct["jwks_uri"] == "https://svc:***@keys.test/jwks?api_key=***"
    assert discovered["issuer"] == ["https://svc:***@tenant-a.test/", "https://tenant-b.test/"]
    assert shown["routes"][0]["upstream"] == "http://svc:***@orders.test:8000"


async def test_check_config_connect_authenticates_and_reports_without_the_password(
    tmp_path: Path,
):
    async with GuardedIdp([rsa_key("k1")]) as idp:
        idp.fail(500)
        data = {
            "providers": [
                {
                    "name": "idp",
                    "issuer": "https://idp.test/",
                    "audiences": ["a"],
                    "algorithms": ["RS256"],
                    "jwks_uri": credentialed(idp.jwks_uri) + f"?api_key={API_KEY}",
                }
            ],
            "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:9"}],
        }
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(data))
        # In a thread: the IdP answers from this test's event loop.
        result = await asyncio.to_thread(run_cli, "check-config", "--connect", "-c", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert_no_secret(result.stdout + result.stderr)
    shown = credentialed(idp.jwks_uri).replace(PASSWORD, "***") + "?api_key=***"
    assert f"JWKS at {shown} answered HTTP 500" in result.stderr
    assert idp.authorizations == [BASIC]


def provider_behind(idp: JwksServer, source: str) -> dict[str, Any]:
    """The harness's provider, its keys from `idp` through credentials in `source`."""
    if source == "jwks_uri":
        keys = {"jwks_uri": credentialed(idp.jwks_uri) + f"?token={API_KEY}"}
        issuer = ISSUER
    else:  # the discovery document (below the credentialed issuer) names a plain jwks_uri
        issuer = idp.issuer_override = credentialed(idp.url)
        keys = {"discovery": True}
    return {
        "name": "idp",
        "issuer": issuer,
        "audiences": [AUDIENCE],
        "algorithms": ["RS256"],
        **keys,
    }


@pytest.mark.parametrize("source", ["jwks_uri", "discovery"])
async def test_a_failing_key_source_shows_no_password_in_the_log_or_readyz(
    gateways: GatewayFactory, caplog: pytest.LogCaptureFixture, source: str
):
    caplog.set_level(logging.DEBUG, logger="idlegate")
    async with GuardedIdp([rsa_key("k1")]) as idp:
        idp.fail(500)
        gw = await gateways(providers=[provider_behind(idp, source)])
        async with aiohttp.ClientSession() as http:
            async with http.get(gw.admin_url + "/readyz") as response:
                assert response.status == 503
                body = await response.text()
            assert_no_secret(body)
            assert "svc:***@127.0.0.1" in body and "HTTP 500" in body, body
            idp.recover()
            assert await gw.gateway.rings["idp"].lookup_or_refresh("k1") is not None
            async with http.get(gw.admin_url + "/readyz") as response:
                assert response.status == 200
    assert idp.authorizations[0] == BASIC  # the first fetch (discovery's, or the JWKS's)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert_no_secret(logged + caplog.text)
    assert "key refresh failed" in logged and "svc:***@127.0.0.1" in logged, logged
    assert "1 keys from http" in logged, logged


async def test_a_credentialed_upstream_that_fails_is_logged_without_its_password(
    gateways: GatewayFactory, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG, logger="idlegate")
    dead = credentialed(f"http://127.0.0.1:{free_port()}")
    gw = await gateways(routes=[{"prefix": "/api/", "upstream": dead}])
    response = await gw.get("/api/x", gw.token())
    assert response.status == 502
    assert_no_secret(await response.text() + caplog.text)
    assert "upstream failed: route=/api/ upstream=http://127.0.0.1:" in caplog.text
