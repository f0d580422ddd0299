"""Keys over plain http from a host that is not loopback are anyone's on the network path
(whoever swaps them forges any token): refused at load (check-config exits 2 naming the key)
and, for a jwks_uri found by discovery, at fetch time, unless the provider sets
`allow_insecure_http: true`. Loopback http (tests, the demo, a sidecar) keeps working."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from e2e.processes import run_cli
from jwks_server import JwksServer, SigningKey, rsa_key

from gateway.config import ConfigError, Provider, from_data
from gateway.tokens.keys import KeyRing

ROUTES = [{"prefix": "/", "upstream": "http://127.0.0.1:9"}]


def config(**provider: Any) -> dict[str, Any]:
    entry = {"name": "p", "issuer": "https://idp.test/", "audiences": ["api"]} | provider
    return {"providers": [entry], "routes": ROUTES}


def problems(**provider: Any) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        from_data(config(**provider), environ={})
    return refused.value.lines()


@pytest.mark.parametrize(
    "uri",
    [
        "http://idp.corp.example/jwks",
        "http://10.0.0.5:8080/realms/x/certs",
        "http://[fd00::5]/jwks",
        "http://0.0.0.0:8080/jwks",  # no loopback address, whatever Linux connects it to
        "http://localhost.evil.example/jwks",
    ],
)
def test_a_plain_http_jwks_uri_to_another_host_is_refused_at_load(uri: str):
    (line,) = problems(jwks_uri=uri)
    assert line.startswith("providers.0.jwks_uri: "), line
    assert "plain http" in line and "allow_insecure_http: true" in line, line


def test_a_discovery_issuer_over_plain_http_to_another_host_is_refused_at_load():
    issuers = ["https://idp.test/", "http://idp.corp.example/realms/a", "http://127.0.0.1:1/"]
    (line,) = problems(issuer=issuers, discovery=True)
    assert line.startswith("providers.0.issuer: http://idp.corp.example/realms/a "), line
    assert "allow_insecure_http: true" in line, line


def test_a_credential_in_a_refused_url_is_not_shown():
    (line,) = problems(jwks_uri="http://svc:S3cretPw@idp.corp.example/jwks?api_key=K3y")
    assert "S3cretPw" not in line and "K3y" not in line, line


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:8080/jwks",
        "http://127.8.9.10/jwks",
        "http://[::1]:8080/jwks",
        "http://localhost:8080/jwks",
        "http://LOCALHOST./jwks",
        "https://idp.corp.example/jwks",
    ],
)
def test_loopback_http_and_https_are_accepted(uri: str):
    assert from_data(config(jwks_uri=uri), environ={}).providers[0].jwks_uri == uri


def test_an_http_issuer_is_only_a_name_when_keys_come_from_elsewhere():
    """No discovery: the issuer is compared with iss, never fetched."""
    data = config(issuer="http://idp.corp.example/", jwks_uri="https://idp.corp.example/jwks")
    assert from_data(data, environ={}).providers[0].issuer == "http://idp.corp.example/"


def test_allow_insecure_http_opts_in():
    data = config(jwks_uri="http://idp.corp.example/jwks", allow_insecure_http=True)
    assert from_data(data, environ={}).providers[0].allow_insecure_http is True
    data = config(issuer="http://keycloak.idp.svc:8080/realms/x", discovery=True)
    data["providers"][0]["allow_insecure_http"] = True
    assert from_data(data, environ={}).providers[0].discovery


def test_check_config_exits_2_naming_the_key(tmp_path: Path):
    path = tmp_path / "gateway.yaml"
    path.write_text(
        yaml.safe_dump(config(issuer="http://idp.corp.example/realms/shop", discovery=True))
    )
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "providers.0.issuer: http://idp.corp.example/realms/shop " in result.stderr
    assert "allow_insecure_http" in result.stderr
    assert "Traceback" not in result.stderr


@dataclass
class RedirectingIdp(JwksServer):
    """A JwksServer whose discovery document names another host's plain-http jwks_uri."""

    discovered_jwks_uri: str = ""

    @property
    def jwks_uri(self) -> str:
        return self.discovered_jwks_uri or super().jwks_uri


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return rsa_key("k1")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@contextlib.asynccontextmanager
async def ring_for(
    idp: JwksServer, http: aiohttp.ClientSession, **fields: Any
) -> AsyncIterator[KeyRing]:
    provider = Provider(
        name=f"idp-{uuid.uuid4().hex[:8]}",
        issuer=idp.issuer,
        audiences=["api"],
        algorithms=["RS256"],
        discovery=True,
        **fields,
    )
    ring = KeyRing(provider, http, {}, fetch_timeout=2.0)
    await ring.start()
    try:
        yield ring
    finally:
        await ring.close()


async def test_a_discovered_plain_http_jwks_uri_to_another_host_is_not_fetched(
    key: SigningKey, http: aiohttp.ClientSession
):
    """A loopback issuer (accepted at load) whose discovery names keys on another host over
    plain http: no keys, the reason in /readyz's words, and the key set never asked for."""
    async with RedirectingIdp([key]) as idp:
        # 0.0.0.0 is no loopback address by the rule, and Linux connects it to this host: so
        # the opted-in ring below really fetches the key set from the same server.
        idp.discovered_jwks_uri = f"http://0.0.0.0:{idp.port}/jwks"
        async with ring_for(idp, http) as ring:
            assert not ring.ready
            assert ring.last_error is not None
            assert "plain http to a host that is not loopback" in ring.last_error
            assert "allow_insecure_http" in ring.last_error
            assert idp.jwks_requests == 0
        async with ring_for(idp, http, allow_insecure_http=True) as ring:
            assert ring.ready, ring.last_error
            assert ring.lookup("k1") is not None
            assert idp.jwks_requests == 1


async def test_a_discovered_loopback_http_jwks_uri_is_fetched(
    key: SigningKey, http: aiohttp.ClientSession
):
    async with JwksServer([key]) as idp, ring_for(idp, http) as ring:
        assert ring.ready, ring.last_error
        assert idp.jwks_requests == 1
