"""Forward-auth without sockets: its config block, which peers are trusted, and which original
request an auth request names (every source must agree)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import ConfigError, ForwardAuth, from_data
from gateway.forward_auth import OriginalRequest, TrustedPeers, original_request
from gateway.reasons import Reason, Refusal

MINIMAL: dict[str, Any] = {
    "providers": [
        {
            "name": "main",
            "issuer": "https://issuer.test/",
            "audiences": ["orders-api"],
            "public_key_file": "/keys/public.pem",
        }
    ],
    "routes": [{"prefix": "/api/", "upstream": "http://orders:8000"}],
}


def problems(**sections: Any) -> list[str]:
    data = copy.deepcopy(MINIMAL)
    data.update(sections)
    with pytest.raises(ConfigError) as caught:
        from_data(data, environ={})
    return caught.value.problems


def test_forward_auth_is_off_by_default_and_trusts_loopback_only():
    config = from_data(copy.deepcopy(MINIMAL), environ={})
    assert config.forward_auth == ForwardAuth(
        enabled=False, listen=None, trusted_proxies=["127.0.0.0/8", "::1/128"]
    )
    assert config.forward_auth.envoy_path_prefix is None


def test_environment_turns_forward_auth_on():
    data = copy.deepcopy(MINIMAL)
    environ = {
        "IDLEGATE_FORWARD_AUTH__ENABLED": "true",
        "IDLEGATE_FORWARD_AUTH__TRUSTED_PROXIES": "[10.0.0.0/8]",
        "IDLEGATE_FORWARD_AUTH__LISTEN__PORT": "9091",
    }
    config = from_data(data, environ=environ)
    assert config.forward_auth.enabled
    assert config.forward_auth.trusted_proxies == ["10.0.0.0/8"]
    assert config.forward_auth.listen is not None
    assert config.forward_auth.listen.port == 9091


def test_trusted_proxies_must_be_networks_each_bad_one_named():
    found = problems(forward_auth={"trusted_proxies": ["10.0.0.0/8", "ten", "10.0.0.0/33"]})
    assert found == [
        "forward_auth.trusted_proxies: 'ten' is not an IP network (CIDR)",
        "forward_auth.trusted_proxies: '10.0.0.0/33' is not an IP network (CIDR)",
    ]


@pytest.mark.parametrize(("section", "port"), [("listen", 8080), ("admin", 9090)])
def test_forward_auth_port_clashing_with_another_listener_is_refused(section: str, port: int):
    found = problems(forward_auth={"enabled": True, "listen": {"port": port}})
    assert found == [
        f"forward_auth.listen.port: {port} is also {section}.port; each listener needs its own port"
    ]


@pytest.mark.parametrize("prefix", ["ext-authz", "/ext-authz/", "/", "/a?b"])
def test_envoy_path_prefix_is_a_path_without_trailing_slash(prefix: str):
    (found,) = problems(forward_auth={"envoy_path_prefix": prefix})
    assert found.startswith("forward_auth.envoy_path_prefix:")


def test_trusted_peers_match_networks_and_mapped_addresses():
    peers = TrustedPeers(ForwardAuth(trusted_proxies=["127.0.0.0/8", "::1/128", "10.1.0.0/16"]))
    assert "127.0.0.1" in peers
    assert "::1" in peers
    assert "::ffff:127.0.0.1" in peers  # a dual-stack listener's view of an IPv4 peer
    assert "10.1.200.3" in peers
    assert "10.2.0.1" not in peers
    assert "192.168.1.1" not in peers
    assert "" not in peers
    assert None not in peers
    assert "not-an-address" not in peers


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_nginx_headers_name_the_request():
    found = original_request(
        "GET",
        "/.idlegate/auth",
        "",
        headers(("X-Original-URI", "/api/x/../y?a=1&b"), ("X-Original-Method", "post")),
        None,
    )
    assert found == OriginalRequest(method="POST", path="/api/x/../y", query="a=1&b")


def test_ingress_nginx_sends_uri_and_url_that_agree():
    found = original_request(
        "GET",
        "/.idlegate/auth",
        "",
        headers(
            ("X-Original-URL", "https://shop.example:8443/api/x?q=%2F"),
            ("X-Original-URI", "/api/x?q=%2F"),
        ),
        None,
    )
    assert found == OriginalRequest(method="GET", path="/api/x", query="q=%2F")


def test_a_double_slash_uri_is_a_path_not_a_host():
    found = original_request("GET", "/", "", headers(("X-Original-URI", "//evil/api")), None)
    assert found.path == "//evil/api"


def test_envoy_prefix_path_and_query():
    found = original_request("PATCH", "/ext-authz/api/x", "a=1", headers(), "/ext-authz")
    assert found == OriginalRequest(method="PATCH", path="/api/x", query="a=1")
    assert original_request("GET", "/ext-authz", "", headers(), "/ext-authz").path == "/"
    with pytest.raises(Refusal) as caught:
        original_request("GET", "/ext-authzz/api", "", headers(), "/ext-authz")
    assert caught.value.reason is Reason.NO_ORIGINAL_REQUEST


@pytest.mark.parametrize(
    "pairs",
    [
        (),
        (("X-Original-URI", "/api/x"), ("X-Forwarded-Uri", "/public/x")),
        (("X-Original-URI", "/api/x"), ("X-Original-URI", "/api/x")),
        (("X-Original-URL", "https://h/api/x"), ("X-Original-URI", "/public/")),
        (("X-Original-URI", "/api/x"), ("X-Original-Method", "GET"), ("X-Forwarded-Method", "PUT")),
        (("X-Original-URI", "/api/x"), ("X-Original-Method", "G E T")),
        (("X-Original-URI", "api/x"),),
        (("X-Original-URL", "ftp://h/api/x"),),
    ],
)
def test_absent_repeated_or_contradicting_sources_are_refused(pairs: tuple[tuple[str, str], ...]):
    with pytest.raises(Refusal) as caught:
        original_request("GET", "/.idlegate/auth", "", headers(*pairs), None)
    assert caught.value.reason is Reason.NO_ORIGINAL_REQUEST


def test_envoy_path_and_a_header_must_agree():
    with pytest.raises(Refusal):
        original_request(
            "GET", "/ext-authz/api/x", "", headers(("X-Forwarded-Uri", "/public/")), "/ext-authz"
        )


def test_a_route_without_upstream_needs_forward_auth():
    routes = [{"prefix": "/"}, {"prefix": "/api/", "upstream": "http://orders:8000"}]
    assert problems(routes=routes) == [
        "routes.0.upstream: required unless forward_auth.enabled (a route without an upstream "
        "is only decided for an edge proxy; route /)"
    ]
    data = {**copy.deepcopy(MINIMAL), "routes": routes, "forward_auth": {"enabled": True}}
    assert from_data(data, environ={}).routes[0].upstream is None
