"""Router views beyond the servlet, case-folding and NFKC ones (tests/unit/test_routing.py):
percent-escapes that spell no UTF-8 (overlong `.` and `/`, what lenient decoders read as ASCII),
Windows' trailing dots and spaces (`admin.` is `admin`), NTFS streams (`admin::$DATA`) and 8.3
short names (`ADMINI~1`), and suffix pattern matching
(`/api/admin.json` is `/api/admin` to Spring). A path another view puts on a different route is
refused; a view that stays on the matched route changes nothing."""

from __future__ import annotations

from typing import Any

import pytest
from test_routing import normalise_refused
from test_routing import refused as refusal

from gateway.config import Route
from gateway.reasons import Reason
from gateway.routing import Router, windows_view


def route(prefix: str, **fields: Any) -> Route:
    return Route(prefix=prefix, upstream="http://app:8000", **fields)


# A protected sub-route beside its parent, a prefix without a trailing slash, a public
# catch-all: the layout in which each of these views would reach the more protected route.
ROUTER = Router(
    [
        route("/api/admin/", scopes=["admin"]),
        route("/api/"),
        route("/secure"),
        route("/static/", auth="none"),
        route("/.well-known/", auth="none"),
        route("/", auth="none"),
    ]
)


# -- percent-escapes must spell UTF-8 --------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/pub/%C0%AE%C0%AE/api/x",  # overlong `.` twice (Tomcat, CVE-2008-2938)
        "/api/admin%C0%AF/x",  # overlong `/` (IIS, CVE-2000-0884)
        "/api/admin%c0%af/x",
        "/pub/%E0%80%AE%E0%80%AE/api/x",  # three-byte overlong `.`
        "/pub/%F0%80%80%AE/x",  # four-byte overlong `.`
        "/pub/..%C1%9Capi",  # overlong `\`
        "/pub/%C0%80/x",  # overlong NUL (Java's modified UTF-8)
        "/pub/%C0%2E%C0%2E/api",  # a lead byte without its continuation: `.` to lenient masks
        "/pub/%80/x",  # a continuation byte alone
        "/pub/%C3",  # a sequence cut short
        "/pub/%E2%80/x",
        "/pub/%ED%A0%80/x",  # an encoded surrogate
        "/pub/%F4%90%80%80",  # beyond U+10FFFF
        "/pub/%FF/x",
        "/caf%E9",  # Latin-1: refused too, the stricter rule (docs/forwarding.md)
        "/%AAdmin/x",  # Latin-1 `ª`: `a` to NFKC or IIS's best fit after a Latin-1 fallback
        "/pub/\udcc0\udcae/x",  # raw bytes as aiohttp decodes a header (surrogateescape)
    ],
)
def test_percent_escapes_that_are_not_utf8_are_refused(path: str):
    assert normalise_refused(path) is Reason.BAD_PATH
    assert refusal(ROUTER, path) is Reason.BAD_PATH


@pytest.mark.parametrize(
    "path",
    [
        "/caf%C3%A9/menu",
        "/%E4%B8%AD%E6%96%87",
        "/emoji/%F0%9F%98%80",  # four bytes
        "/x/%C2%80",  # U+0080, the first two-byte character
        "/x/%EF%BF%BF",  # a noncharacter, but UTF-8
        "/x/%E2%82%AC100",
        "/api/100%25",
    ],
)
def test_percent_escapes_that_spell_utf8_are_forwarded_as_sent(path: str):
    match = ROUTER.match(path)
    assert match.upstream_path == path


# -- Windows: trailing dots and spaces --------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "view"),
    [
        ("/api/admin./x", "/api/admin/x"),
        ("/api/admin.../x", "/api/admin/x"),
        ("/api/admin%20/x", "/api/admin/x"),
        ("/api/admin.%20./x", "/api/admin/x"),
        ("/secure.", "/secure"),
        ("/a/.../b", "/a/b"),  # emptied: dropped, never `..` (three dots are a name to NT)
        ("/a/..%20/b", "/a/b"),
        ("/a/b%20c/d.e", "/a/b%20c/d.e"),  # only a trailing run
        ("/", "/"),
    ],
)
def test_the_windows_view_cuts_trailing_dots_and_spaces_off_every_segment(path: str, view: str):
    assert windows_view(path) == view


@pytest.mark.parametrize(
    "path",
    [
        "/secure./x",  # `/secure/x` to IIS: the public catch-all would have decided it
        "/secure.",
        "/secure..",
        "/secure%2e/x",
        "/secure%2E%2E/x",
        "/secure%20",
        "/secure%20/x",
        "/secure.%20/x",
        "/SECURE./x",  # and case-blind
        "/.../secure/x",  # an emptied segment dropped
        "/api/admin./x",
        "/api/admin%2e/x",
        "/api/admin%20/x",
        "/api/ADMIN./x",
        "/api/adm%C4%B1n./x",  # U+0131 folded to `i`
        "/api/admin.;x/users",  # `admin.` once a servlet container cut the parameters
        "/api/admin.;jsessionid=1",
    ],
)
def test_trailing_dots_or_spaces_that_change_the_route_are_refused(path: str):
    assert refusal(ROUTER, path) is Reason.BAD_PATH


# -- Windows: NTFS streams and 8.3 short names ----------------------------------------------


@pytest.mark.parametrize(
    ("path", "view"),
    [
        ("/api/admin::$DATA/x", "/api/admin/x"),
        ("/api/admin:$I30:$INDEX_ALLOCATION/x", "/api/admin/x"),
        ("/api/admin%3A%3A$DATA/x", "/api/admin/x"),
        ("/api/admin.::$DATA", "/api/admin"),  # the stream, then the trailing dot
        ("/api/orders:cancel", "/api/orders"),
    ],
)
def test_the_windows_view_cuts_ntfs_streams(path: str, view: str):
    assert windows_view(path) == view


@pytest.mark.parametrize(
    "path",
    [
        "/api/admin::$DATA/x",  # the directory `admin` to Windows: the admin route's
        "/api/admin::$DATA",
        "/api/admin:$I30:$INDEX_ALLOCATION/x",
        "/api/admin%3a%3a$DATA/x",
        "/api/ADMIN::$data/x",
        "/api/admin:x/users",
        "/secure::$DATA",
        "/secure:stream/x",
    ],
)
def test_an_ntfs_stream_that_changes_the_route_is_refused(path: str):
    assert refusal(ROUTER, path) is Reason.BAD_PATH


# Prefixes whose segments are no 8.3 names: Windows gives each a short one as well.
SHORT = Router(
    [
        route("/api/administration/", scopes=["admin"]),
        route("/api/reports.json", scopes=["reports"]),
        route("/.well-known/", auth="none"),
        route("/api/"),
        route("/", auth="none"),
    ]
)


@pytest.mark.parametrize(
    "path",
    [
        "/api/ADMINI~1/users",  # `administration` once Windows expands its short name
        "/api/admini~1/users",
        "/api/ADMINI~2/users",
        "/api/ADMINI~1",
        "/api/AD3F9C~5/users",  # the hashed form, from the fifth name of a stem on
        "/api/REPORT~1.JSO",
        "/api/report~1",
        "/WELL-K~1/openid-configuration",  # a public route's, reached from the catch-all
    ],
)
def test_an_8dot3_short_name_that_changes_the_route_is_refused(path: str):
    assert refusal(SHORT, path) is Reason.BAD_PATH


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/api/orders:cancel", "/api/"),  # a custom method (AIP-136): the same route
        ("/api/orders/123:archive", "/api/"),
        ("/api/urn:isbn:123", "/api/"),
        ("/api/administration/users:batchGet", "/api/administration/"),
        ("/api/x~1", "/api/"),  # no prefix's short name
        ("/api/~user/files", "/api/"),
        ("/api/administration/ADMINI~1", "/api/administration/"),
    ],
)
def test_colons_and_tildes_that_keep_the_route_are_forwarded_as_sent(path: str, label: str):
    match = SHORT.match(path)
    assert (match.label, match.upstream_path) == (label, path)


# -- suffix pattern matching ---------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/admin.json",  # Spring (useSuffixPatternMatch) serves it from `/api/admin`
        "/api/admin.json/",  # Rails drops the trailing slash, then the format
        "/api/admin.tar.gz",
        "/api/admin%2ejson",
        "/api/ADMIN.json",
        "/api/adm%C4%B1n.json",
        "/api/admin.json;jsessionid=1",  # Spring cuts the parameters first
        "/secure.js",
        "/api.json",  # the catch-all's, unless `/api` is meant
    ],
)
def test_a_suffix_that_changes_the_route_is_refused(path: str):
    assert refusal(ROUTER, path) is Reason.BAD_PATH


def test_a_suffix_is_cut_at_every_dot_so_a_dotted_prefix_is_guarded_too():
    router = Router([route("/api/v1.2/", scopes=["v1"]), route("/api/")])
    assert refusal(router, "/api/v1.2.json") is Reason.BAD_PATH
    assert router.match("/api/v1.2/items").label == "/api/v1.2/"
    assert router.match("/api/v1.json").label == "/api/"


# -- what keeps working ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/api/v1.2/items", "/api/"),
        ("/api/orders.json", "/api/"),  # no `/api/orders` route: cut, still `/api/`
        ("/api/orders./x", "/api/"),  # `/api/orders/x` to Windows: the same route
        ("/api/orders%20/x", "/api/"),
        ("/api/admin.v2/x", "/api/"),  # a dot before the last segment: no suffix to cut
        ("/api/x.admin.json", "/api/"),  # cut, `x` and `x.admin` name no route
        ("/api/.../x", "/api/"),
        ("/api/files/a%20b.txt", "/api/"),
        ("/api/admin/report.json", "/api/admin/"),
        ("/api/admin/x./y", "/api/admin/"),
        ("/static/app.js", "/static/"),
        ("/static/app.min.js", "/static/"),
        ("/secured.js", "/"),
        ("/secure/x.json", "/secure"),
        ("/.well-known", "/.well-known/"),  # never cut to an empty name
        ("/.well-known/openid-configuration", "/.well-known/"),
        ("/docs/index.html", "/"),
        ("/index.", "/"),
    ],
)
def test_views_that_keep_the_route_are_forwarded_as_sent(path: str, label: str):
    match = ROUTER.match(path)
    assert (match.label, match.upstream_path) == (label, path)


def test_a_path_only_a_view_would_route_is_no_route():
    # Nothing would be forwarded either way: the plain 404, as for letter case.
    router = Router([route("/api/admin/", scopes=["admin"])])
    for path in ("/api/admin.json", "/api/admin./x", "/api/admin%20/x"):
        assert refusal(router, path) is Reason.NO_ROUTE
