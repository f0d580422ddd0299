"""Config that would load but never work: route prefixes no request can match (a query, a
fragment, dot-segments, doubled slashes, escapes the router refuses or resolves, raw non-ASCII)
and listen hosts that are no host. Each is one `field.path: reason` problem at load."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from gateway.config import ConfigError, from_data
from gateway.routing import Router

PROVIDERS: list[dict[str, Any]] = [
    {"name": "m", "issuer": "https://i.test/", "audiences": ["a"], "public_key_file": "/k.pem"}
]


def with_routes(*prefixes: str) -> dict[str, Any]:
    routes = [{"prefix": prefix, "upstream": "http://orders:8000"} for prefix in prefixes]
    return {"providers": copy.deepcopy(PROVIDERS), "routes": routes}


def refused(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        from_data(data, environ={})
    return caught.value.problems


@pytest.mark.parametrize(
    ("prefix", "problem"),
    [
        ("/q?x", "contains '?': a request path never does"),
        ("/a#b/", "can never match: the path contains encoded separators, a fragment"),
        ("/c%2fd/", "can never match: the path contains encoded separators"),
        ("/c%5Cd/", "can never match: the path contains encoded separators"),
        ("/c\\d/", "can never match: the path contains encoded separators"),
        ("/a%/", "can never match: the path contains encoded separators"),
        ("/a b/", "can never match: the path contains encoded separators"),
        ("/..;/x/", "can never match: the path climbs above the root"),
        ("/a/../b/", "is not in the normal form request paths are matched in"),
        ("/./", "is not in the normal form"),
        ("/a/./b/", "is not in the normal form"),
        ("/a//b/", "is not in the normal form"),
        ("/%61pi/", "is not in the normal form"),
        ("/caf%c3%a9/", "write '/caf%C3%A9/'"),
        ("/café/", "is not ASCII: request paths carry such characters percent-encoded"),
        ("/caf%C3%A9%C0%AE/", "can never match: the path's bytes or percent-escapes are not UTF-8"),
        ("/%EF%BC%8E%EF%BC%8E/", "can never match: the path holds characters that normalise"),
        ("/api;v1/", "can never match: the path's ;parameters change its route"),
        ("/admin./", "can never match: the path's trailing dots or spaces change its route"),
        ("/admin%20/", "can never match: the path's trailing dots or spaces change its route"),
    ],
)
def test_a_prefix_no_request_can_match_is_refused(prefix: str, problem: str):
    (found,) = refused(with_routes(prefix))
    assert found.startswith(f"routes.0.prefix: {prefix!r} ") and problem in found, found


@pytest.mark.parametrize(
    "prefixes",
    [
        ("/",),
        ("/api/", "/api/v1/"),
        ("/api",),
        ("/caf%C3%A9/",),
        ("/a%20b/",),
        ("/api.json/", "/api/"),  # /api.json/x routes; only /api.json itself is suffix-refused
        ("/", "/X/"),
        ("/v1.2/orders/",),
    ],
)
def test_prefixes_in_normal_form_are_accepted_and_route_requests_below_them(
    prefixes: tuple[str, ...],
):
    config = from_data(with_routes(*prefixes), environ={})
    router = Router(config.routes)
    for route in config.routes:
        assert router.match(route.prefix.rstrip("/") + "/below").route is route


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "::1", "fe80::1%eth0", "localhost", "gateway.internal.", "my_svc", ""]
)
@pytest.mark.parametrize("key", ["listen", "admin"])
def test_ip_addresses_and_host_names_are_accepted_as_listen_hosts(key: str, host: str):
    data = with_routes("/api/") | {key: {"host": host, "port": 0}}
    assert getattr(from_data(data, environ={}), key).host == host


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("not a host!", "'not a host!' is neither an IP address nor a host name"),
        ("[::]", "write an IPv6 address without brackets: '::'"),
        ("-a.example", "is neither an IP address nor a host name"),
        ("a..example", "is neither an IP address nor a host name"),
        ("10.0.0.300", "'10.0.0.300' is not a valid IP address"),
        ("x" * 64, "is neither an IP address nor a host name"),
        ("127.0.0.1:8080", "is neither an IP address nor a host name"),
        ("a,b", "is neither an IP address nor a host name"),
    ],
)
@pytest.mark.parametrize("key", ["listen", "admin", "forward_auth.listen"])
def test_a_listen_host_that_is_no_host_is_refused_naming_the_key(key: str, host: str, problem: str):
    data = with_routes("/api/")
    if key == "forward_auth.listen":
        data["forward_auth"] = {"enabled": True, "listen": {"host": host, "port": 0}}
    else:
        data[key] = {"host": host, "port": 0}
    found = refused(data)
    assert any(p.startswith(f"{key}.host: ") and problem in p for p in found), found
