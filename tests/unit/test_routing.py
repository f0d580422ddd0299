"""Path normalisation and route matching: the longest prefix on segment boundaries, one
normalised path for matching and forwarding, and every path trick that would make the gateway
and the upstream disagree about the route refused."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import Route
from gateway.reasons import Reason, Refusal
from gateway.routing import Match, Router, normalise, without_parameters


def route(prefix: str, **fields: Any) -> Route:
    return Route(prefix=prefix, upstream=fields.pop("upstream", "http://app:8000"), **fields)


def refused(router: Router, path: str) -> Reason:
    with pytest.raises(Refusal) as caught:
        router.match(path)
    return caught.value.reason


def normalise_refused(path: str) -> Reason:
    with pytest.raises(Refusal) as caught:
        normalise(path)
    return caught.value.reason


# -- normalise -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/api/orders", "/api/orders"),
        ("/api/orders/", "/api/orders/"),
        ("/", "/"),
        ("/api/./orders", "/api/orders"),
        ("/api/a/../orders", "/api/orders"),
        ("/api/a/b/../../orders", "/api/orders"),
        ("/api//orders", "/api/orders"),
        ("/api///orders//7", "/api/orders/7"),
        ("/api/%2e/orders", "/api/orders"),
        ("/api/a/%2E%2e/orders", "/api/orders"),
        ("/api/a/.%2e/orders", "/api/orders"),
        ("/api/.../orders", "/api/.../orders"),  # three dots are a name, not a dot-segment
        ("/api/..orders", "/api/..orders"),
        ("/api/orders.json", "/api/orders.json"),
        ("/api/%252e%252e/x", "/api/%252e%252e/x"),  # double-encoded: literal, never decoded
        ("/.", "/"),
        ("//", "/"),
    ],
)
def test_normalise_resolves_dot_segments_and_doubled_slashes(raw: str, normal: str):
    assert normalise(raw) == normal


@pytest.mark.parametrize(
    "raw",
    [
        "/api/a%2fb",
        "/api/a%2Fb",
        "/api/a%5cb",
        "/api/a%5Cb",
        "/api/a\\b",
        "/api/a%00b",
        "/api/a\x00b",
        "/api/ad%09min",  # WHATWG URL parsers strip tabs and newlines: `/admin`
        "/api/a%0D%0ASet-Cookie:x",
        "/api/a%0ab",
        "/api/a%1Fb",
        "/api/a%7fb",
        "/api/a b",
        "/api/a\tb",
        "/api/a\x7fb",
        "api/orders",
        "",
        "*",
    ],
)
def test_normalise_refuses_encoded_separators_and_control_bytes(raw: str):
    assert normalise_refused(raw) is Reason.BAD_PATH


@pytest.mark.parametrize(
    "raw", ["/..", "/../etc/passwd", "/api/../..", "/%2e%2e/x", "/a/./../../b"]
)
def test_climbing_above_the_root_is_refused(raw: str):
    assert normalise_refused(raw) is Reason.BAD_PATH


# -- Router.match ----------------------------------------------------------------------------


def test_the_longest_prefix_wins_whatever_the_configured_order():
    router = Router([route("/api/"), route("/api/v2/", upstream="http://v2:8000"), route("/")])
    assert router.match("/api/v2/orders").label == "/api/v2/"
    assert router.match("/api/v2/orders").route.upstream == "http://v2:8000"
    assert router.match("/api/v1/orders").label == "/api/"
    assert router.match("/other").label == "/"


@pytest.mark.parametrize("path", ["/apix", "/apix/orders", "/ap", "/api-v2/x", "/API/x"])
def test_prefixes_match_on_segment_boundaries_only(path: str):
    assert refused(Router([route("/api/")]), path) is Reason.NO_ROUTE


@pytest.mark.parametrize("prefix", ["/api/", "/api"])
def test_the_prefix_itself_matches_with_or_without_its_trailing_slash(prefix: str):
    router = Router([route(prefix)])
    assert router.match("/api").label == prefix
    assert router.match("/api/").label == prefix
    assert router.match("/api/orders").label == prefix
    assert refused(router, "/apix") is Reason.NO_ROUTE


def test_no_route_is_a_refusal_with_the_no_route_reason():
    router = Router([route("/api/"), route("/public/", auth="none")])
    assert refused(router, "/admin") is Reason.NO_ROUTE
    assert Reason.NO_ROUTE.status == 404


def test_a_root_route_matches_everything():
    router = Router([route("/")])
    for path in ("/", "/x", "/x/y/z"):
        assert router.match(path).label == "/"


def test_the_forwarded_path_is_the_normalised_one():
    match = Router([route("/api/")]).match("/api/a/./b//../orders")
    assert match == Match(route=route("/api/"), label="/api/", upstream_path="/api/a/orders")


@pytest.mark.parametrize(
    ("path", "upstream_path"),
    [
        ("/api/v2/orders", "/orders"),
        ("/api/v2/orders/7?", "/orders/7?"),  # the router sees no query; kept verbatim
        ("/api/v2/", "/"),
        ("/api/v2", "/"),
        ("/api/v2/a/../orders", "/orders"),
    ],
)
def test_strip_prefix_forwards_the_rest_of_the_path(path: str, upstream_path: str):
    router = Router([route("/api/v2/", strip_prefix=True)])
    assert router.match(path).upstream_path == upstream_path


def test_without_strip_prefix_the_whole_path_is_forwarded():
    assert Router([route("/api/")]).match("/api/orders").upstream_path == "/api/orders"


def test_a_strip_prefix_root_route_forwards_the_whole_path():
    assert Router([route("/", strip_prefix=True)]).match("/orders").upstream_path == "/orders"


@pytest.mark.parametrize("path", ["/api/a%2f..%2f..%2fpublic", "/public%2f..%2fapi/x", "/api%5c"])
def test_encoded_separators_are_refused_by_the_router(path: str):
    router = Router([route("/api/"), route("/public/", auth="none")])
    assert refused(router, path) is Reason.BAD_PATH


@pytest.mark.parametrize(
    ("path", "forwarded"),
    [
        ("/api/a/../b", "/api/b"),
        ("/api/./b", "/api/b"),
        ("/api//b", "/api/b"),
        ("/api/%2e%2e/api/b", "/api/b"),  # leaves the route and comes back: same route
        ("/public/x/../y", "/public/y"),
    ],
)
def test_dot_segments_within_one_route_are_resolved(path: str, forwarded: str):
    router = Router([route("/api/"), route("/public/", auth="none")])
    assert router.match(path).upstream_path == forwarded


@pytest.mark.parametrize(
    "path",
    [
        "/public/../api/orders",
        "/public/%2e%2e/api/orders",
        "/public/%2E%2E/api/orders",
        "/public/./../api/orders",
        "/api/../public/x",
        "//api/orders",  # a naive matcher sees no route, we would see /api/
        "/api/v2/../x",  # from the longer prefix to the shorter one
    ],
)
def test_dot_segments_or_slashes_that_change_the_route_are_refused(path: str):
    router = Router([route("/api/"), route("/api/v2/"), route("/public/", auth="none")])
    assert refused(router, path) is Reason.BAD_PATH


def test_climbing_above_the_root_is_refused_by_the_router():
    assert refused(Router([route("/")]), "/../x") is Reason.BAD_PATH


def route_or_refusal(router: Router, path: str) -> str:
    """The matched prefix, or the refusal's reason code."""
    try:
        return router.match(path).label
    except Refusal as refusal:
        return refusal.reason.code


@pytest.mark.parametrize("path", ["/%61pi/orders", "/ap%69/orders", "/%61%70%69/orders"])
def test_percent_encoded_letters_cannot_dodge_a_protected_route(path: str):
    """`/%61pi/x` is `/api/x` to the upstream (it decodes unreserved characters, RFC 3986
    §6.2.2.2); matched as the public catch-all, it would reach /api/ without a token."""
    router = Router([route("/api/"), route("/", auth="none")])
    assert route_or_refusal(router, path) in ("/api/", "bad_path")


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/%61pi/orders", "/api/orders"),
        ("/api/%7Euser", "/api/~user"),
        ("/api/%41%42-%5f", "/api/AB-_"),
        ("/api/%c3%a9t%c3%a9", "/api/%C3%A9t%C3%A9"),  # not unreserved: stays encoded
        ("/api/100%25", "/api/100%25"),  # an encoded '%' is never decoded (no double decoding)
    ],
)
def test_percent_encoded_unreserved_characters_are_decoded_others_kept(raw: str, normal: str):
    assert normalise(raw) == normal


def test_the_upstream_gets_the_decoded_path_it_was_matched_on():
    router = Router([route("/api/"), route("/", auth="none")])
    match = router.match("/api/%6Frders/%7E1")
    assert (match.label, match.upstream_path) == ("/api/", "/api/orders/~1")


# -- `;parameters`: what Tomcat, Jetty and Spring route on -----------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/api/a/..;/b", "/api/b"),
        ("/api/a/..;jsessionid=x/b", "/api/b"),
        ("/api/a/.;x/b", "/api/a/b"),
        ("/api/a/%2e%2e;/b", "/api/b"),
        ("/api/a/%2E.;x/b", "/api/b"),
        ("/api/a/..%3b/b", "/api/b"),  # an encoded `;` cuts parameters for decode-first servers
        ("/api/a/..%3Bx=1/b", "/api/b"),
        ("/api/a/b/..;", "/api/a/"),
        ("/api/a/.;", "/api/a/"),
        ("/api/a;jsessionid=1/b", "/api/a;jsessionid=1/b"),  # parameters elsewhere: verbatim
        ("/api/a;v=1;w=2/b;x", "/api/a;v=1;w=2/b;x"),
        ("/api/a/...;x/b", "/api/a/...;x/b"),  # three dots are a name, with or without params
        ("/api/a/;x/b", "/api/a/;x/b"),
    ],
)
def test_dot_segments_with_parameters_are_dot_segments(raw: str, normal: str):
    assert normalise(raw) == normal


@pytest.mark.parametrize("raw", ["/..;/x", "/api/..;/..;x/y", "/%2e%2e;/x", "/..%3b/x"])
def test_dot_segments_with_parameters_cannot_climb_above_the_root(raw: str):
    assert normalise_refused(raw) is Reason.BAD_PATH


@pytest.mark.parametrize("raw", ["/api/%", "/api/%2", "/api/%zz", "/api/%u002e%u002e/x", "/a%g0"])
def test_malformed_percent_escapes_are_refused(raw: str):
    assert normalise_refused(raw) is Reason.BAD_PATH


@pytest.mark.parametrize(
    "path",
    [
        "/public/..;/api/x",
        "/public/..;jsessionid=x/api/x",
        "/public/%2e%2e;/api/x",
        "/public/%2E.;/api/x",
        "/public/.%2E;x/api/x",
        "/public/..%3b/api/x",
        "/public/..%3Bx/api/x",
        "/public/x/..;/..;/api/x",
        "/public/.;x/../api/x",
        "/api/v2/..;/x",  # from the longer prefix to the shorter one
    ],
)
def test_dot_segments_with_parameters_that_change_the_route_are_refused(path: str):
    router = Router([route("/api/"), route("/api/v2/"), route("/public/", auth="none")])
    assert refused(router, path) is Reason.BAD_PATH


@pytest.mark.parametrize(
    "path",
    [
        "/api;x/orders",  # `/api/orders` to Tomcat: the catch-all would have let it through
        "/api;jsessionid=1/orders",
        "/api%3bx/orders",
        "/;x/api/orders",  # `//api/orders`, collapsed
        "/api;/orders",
    ],
)
def test_parameters_that_change_the_route_upstreams_see_are_refused(path: str):
    router = Router([route("/api/"), route("/", auth="none")])
    assert refused(router, path) is Reason.BAD_PATH


def test_parameters_on_a_prefix_segment_cannot_reach_the_longer_prefix():
    router = Router([route("/api/"), route("/api/admin/", scopes=["admin"])])
    assert refused(router, "/api/admin;x/users") is Reason.BAD_PATH


@pytest.mark.parametrize(
    ("path", "forwarded"),
    [
        ("/api/orders;jsessionid=1", "/api/orders;jsessionid=1"),
        ("/api/a;v=1/orders", "/api/a;v=1/orders"),
        ("/api/a/..;x/orders", "/api/orders"),
        ("/public/a/..;/b", "/public/b"),
    ],
)
def test_parameters_within_one_route_are_forwarded_on_the_normalised_path(
    path: str, forwarded: str
):
    router = Router([route("/api/"), route("/public/", auth="none"), route("/", auth="none")])
    assert router.match(path).upstream_path == forwarded


def test_without_parameters_is_the_path_a_servlet_container_routes():
    assert without_parameters("/api;x/orders;jsessionid=1") == "/api/orders"
    assert without_parameters("/;x/api/") == "/api/"
    assert without_parameters("/a%3Bb/c") == "/a/c"
    assert without_parameters("/") == "/"


def test_a_path_matched_before_is_answered_from_the_bounded_cache_and_refusals_are_not_kept():
    """The per-request fast path: the same raw path gets the same (frozen) Match without being
    normalised again; the cache stays bounded under many distinct paths, and a refused path is
    refused every time it is asked."""
    router = Router([route("/api/"), route("/public/")])
    first = router.match("/api/orders/1")
    assert router.match("/api/orders/1") is first
    assert first == Match(route=first.route, label="/api/", upstream_path="/api/orders/1")
    for i in range(5000):
        assert router.match(f"/api/orders/{i}").upstream_path == f"/api/orders/{i}"
    assert len(router._matches) <= 1024
    for _ in range(2):
        assert refused(router, "/public/../api/x") is Reason.BAD_PATH
        assert refused(router, "/nowhere") is Reason.NO_ROUTE
    assert "/public/../api/x" not in router._matches
    long_path = "/api/" + "a" * 300
    assert router.match(long_path).upstream_path == long_path
    assert long_path not in router._matches


@pytest.mark.parametrize(
    "path", ["/API/orders", "/Api/orders", "/%41pi/orders", "/API", "/api;x/../API/x"]
)
def test_letter_case_cannot_dodge_a_protected_route(path: str):
    """`/API/x` is `/api/x` to an upstream that matches case-insensitively (IIS, ASP.NET)."""
    router = Router([route("/api/"), route("/", auth="none")])
    assert refused(router, path) is Reason.BAD_PATH


@pytest.mark.parametrize(
    "path",
    [
        "/adm%C4%B1n/users",  # U+0131 (dotless i): `I` upper-cased, so `i` to equalsIgnoreCase
        "/de%C5%BFk/users",  # U+017F (long s): `S` upper-cased
        "/%E2%84%AAube/pods",  # U+212A (Kelvin sign): `k` lower-cased
        "/%C4%B0nfo/x",  # U+0130: `i` with a dot above, lower-cased
        "/%EF%BD%81dmin/users",  # U+FF41 (fullwidth a): `a` to NFKC and IIS's best fit
        "/desk;x/../de%C5%BFk/users",
    ],
)
def test_unicode_letters_taken_for_ascii_ones_cannot_dodge_a_protected_route(path: str):
    router = Router(
        [route("/admin/"), route("/desk/"), route("/kube/"), route("/info/"),
         route("/", auth="none")]
    )  # fmt: skip
    assert refused(router, path) is Reason.BAD_PATH


@pytest.mark.parametrize(
    "path", ["/products/k%C4%B1l%C4%B1f", "/caf%C3%A9/menu", "/%E4%B8%AD%E6%96%87", "/%C5%BF"]
)
def test_unicode_letters_that_keep_the_route_are_matched(path: str):
    # Turkish, French and Chinese paths under a catch-all: folded, they name no other route.
    router = Router([route("/admin/"), route("/", auth="none")])
    assert router.match(path).upstream_path == path


@pytest.mark.parametrize(
    "path",
    [
        "/public/%EF%BC%8E%EF%BC%8E/admin/users",  # U+FF0E fullwidth full stop, twice
        "/public/%E2%80%A5/admin/users",  # U+2025 two dot leader: `..`
        "/public/%E2%80%A4%E2%80%A4/admin",  # U+2024 one dot leader, twice
        "/public%EF%BC%8F..%EF%BC%8Fadmin/users",  # U+FF0F fullwidth solidus
        "/public/..%EF%BC%BCadmin",  # U+FF3C fullwidth reverse solidus
        "/public/x%EF%BC%85%32%66y",  # U+FF05 fullwidth percent: an escape after NFKC
        "/public/\uff0e\uff0e/admin",  # raw, as a forward-auth header may carry it
    ],
)
def test_characters_that_normalise_to_path_syntax_are_refused(path: str):
    router = Router([route("/admin/"), route("/public/", auth="none")])
    assert refused(router, path) is Reason.BAD_PATH


def test_a_fragment_in_the_target_is_refused():
    # `/api#x` is `/api` to an upstream that parses the target as a URL.
    router = Router([route("/api/"), route("/", auth="none")])
    for path in ("/api#x", "/api/admin#", "/#/api"):
        assert refused(router, path) is Reason.BAD_PATH


def test_a_route_prefix_in_capitals_is_guarded_from_lower_case_paths():
    router = Router([route("/Admin/", scopes=["admin"]), route("/", auth="none")])
    assert refused(router, "/admin/users") is Reason.BAD_PATH
    assert refused(router, "/ADMIN;x/users") is Reason.BAD_PATH
    assert router.match("/Admin/users").label == "/Admin/"


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/api/Orders/ABC", "/api/"),  # case inside a route is the upstream's business
        ("/Docs/Index.HTML", "/"),
        ("/apiary/X", "/"),  # not on the segment boundary, in either case
    ],
)
def test_letter_case_that_keeps_the_route_is_matched(path: str, label: str):
    router = Router([route("/api/"), route("/", auth="none")])
    match = router.match(path)
    assert (match.label, match.upstream_path) == (label, path)


def test_a_path_matching_no_route_in_its_own_case_is_no_route():
    # Nothing would be forwarded either way: the plain 404, not a path refusal.
    assert refused(Router([route("/api/")]), "/API/orders") is Reason.NO_ROUTE
