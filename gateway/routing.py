"""Path normalisation and longest-prefix route matching.

A path is matched and forwarded in one normalised form. Encoded separators (`%2f`, `%5c`),
backslashes, NUL and malformed percent-escapes are refused outright; dot-segments (also as
`%2e`) and doubled slashes are resolved, and refused when resolving them changes which route
matches (`/public/../api/x`).

Servlet containers (Tomcat, Jetty, Spring) cut `;parameters` off every segment before they
resolve dot-segments, so `..;x` (or `..%3bx`, `%2e%2e;`) is `..` to them: it is a dot-segment
here too, resolved with its parameters. Parameters on other segments are forwarded verbatim
(`jsessionid`, matrix variables), but the route must be the same with them cut off
(`/api;x/orders` is `/api/orders` upstream), else the path is refused.

Upstreams that match paths case-insensitively (IIS, ASP.NET, Spring with a case-insensitive
matcher) route `/ADMIN/x` as `/admin/x`: a path whose route changes when its letters are
folded to one case is refused too, whatever the upstream does with it; Unicode letters that
such an upstream takes for ASCII ones (`/adm%C4%B1n`: U+0131, a dotless i) are folded to those.

Percent-escapes must spell UTF-8: `%C0%AE` (an overlong `.`) or a Latin-1 `%E9` is refused, since
lenient decoders (old Tomcat and IIS, Latin-1 fallbacks) read such bytes as ASCII syntax or letters.
Windows (IIS, ASP.NET, a Windows file server) cuts trailing dots and spaces off segments
(`/admin./x` is `/admin/x`), reads `admin::$DATA` (an NTFS stream) as `admin` and `ADMINI~1` (an
8.3 short name) as `administration`; Spring's suffix pattern match serves `/admin.json` as
`/admin`: a path whose route changes so is refused as well.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote

from gateway.config import Route
from gateway.reasons import Reason, Refusal

# A `%` not followed by two hex digits is no escape at all; upstreams that decode `%u002e`
# (IIS) or pass it through disagree about it, so it is refused like an encoded separator.
# A `#` starts a fragment, which no request-target has (RFC 9112 §3.2): upstreams that parse
# the target as a URL (yarl, urlsplit, WHATWG URL) route `/api#x` as `/api`. Control bytes are
# refused escaped too (`%09`, `%0D%0A`, `%7F`): parsers that strip tabs and newlines (WHATWG
# URL) would route `/ad%09min` as `/admin`, and a decoded CR LF is a header line to an upstream
# that echoes the path into a redirect.
_FORBIDDEN = re.compile(
    r"%2[fF]|%5[cC]|%[01][0-9A-Fa-f]|%7[fF]|%(?![0-9A-Fa-f]{2})|\\|#|[\x00-\x20\x7f]"
)
_ENCODED = re.compile(r"%([0-9A-Fa-f]{2})")
# Where a segment's parameters start: `;`, or `%3B` (decoded to `;` by upstreams that decode
# before they cut parameters). `normalise` has upper-cased every escape it kept.
_PARAMETERS = re.compile(r";|%3B")
# `Router.match` is a pure function of the raw path: the last answers are kept (paths up to
# this long, this many at most, forgotten all at once when full), since normalising and the
# agreement checks cost 3-5 µs per request against ~0.05 µs for a dict lookup.
_MATCH_CACHE = 1024
_CACHED_PATH_CHARS = 256
# Decoded with surrogateescape, each byte of a percent-escape that is no UTF-8 (`%C0%AE`, the
# overlong `.`; a lone `%E9`; an encoded surrogate) is a lone surrogate; so is such a raw byte in
# a forward-auth header, which aiohttp decodes the same way.
_NOT_UTF8 = re.compile("[\ud800-\udfff]")
# A segment's trailing run of dots and spaces (`%20`), which Windows path canonicalisation drops.
_TRAILING_DOTS_OR_SPACES = re.compile(r"(?:\.|%20)+(?=/|$)")
# A segment's NTFS stream (`admin::$DATA`, `admin:$I30:$INDEX_ALLOCATION`, `admin:name`): the
# file or directory `admin` itself to Windows. `:` may come escaped (IIS decodes first).
_NTFS_STREAM = re.compile(r"(?::|%3A)[^/]*")
# What an 8.3 short name cannot hold (each becomes `_`), and what it leaves out (dots, spaces).
_NOT_8DOT3 = re.compile(r"[^A-Z0-9!#$%&\'()@^_`{}~-]")
_DOUBLED_SLASHES = re.compile(r"//+")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _decode_unreserved(match: re.Match[str]) -> str:
    """RFC 3986 §6.2.2.2: `%61` *is* `a` to every upstream, so it must be `a` to the router."""
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else match.group(0).upper()


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    label: str  # the configured prefix: the bounded `route` metric label
    upstream_path: str  # the normalised path, prefix stripped if configured; starts with "/"


def _segment_name(segment: str) -> str:
    """A segment without its `;parameters`: what a servlet container routes on."""
    return _PARAMETERS.split(segment, 1)[0]


def without_parameters(path: str) -> str:
    """A normalised path as a Tomcat/Jetty/Spring upstream routes it: every segment's
    `;parameters` cut off and the emptied segments collapsed like doubled slashes."""
    parts = path.split("/")
    names = [_segment_name(part) for part in parts[1:-1]]
    return "/" + "/".join([name for name in names if name] + [_segment_name(parts[-1])])


# What a path's syntax is made of: a character that normalises to one of these (NFKC, as
# IIS's "best fit" and normalising frameworks do) would be a separator, a dot-segment or an
# escape to such an upstream, and none to the router.
_SYNTAX = frozenset("./\\%?#;")


@functools.lru_cache(maxsize=4096)
def _becomes_syntax(char: str) -> bool:
    return not _SYNTAX.isdisjoint(unicodedata.normalize("NFKC", char))


def _syntax_in_disguise(decoded: str) -> bool:
    """Whether the (percent-decoded) path holds a non-ASCII character that NFKC makes path
    syntax: `/public/%EF%BC%8E%EF%BC%8E/admin` (two fullwidth full stops) is
    `/public/../admin`, so `/admin`, to an upstream that normalises before it resolves."""
    return any(not char.isascii() and _becomes_syntax(char) for char in decoded)


def windows_view(path: str) -> str:
    """A normalised path as Windows path canonicalisation (IIS, ASP.NET, a Windows file server)
    reads it: each segment's NTFS stream (`admin::$DATA`) and then its trailing run of dots and
    spaces cut off (`admin.` and `admin%20` are `admin`), a segment so emptied dropped like a
    doubled slash. (8.3 short names need the routes: `Router`.)"""
    if ":" in path or "%3A" in path:
        path = _NTFS_STREAM.sub("", path)
    return _DOUBLED_SLASHES.sub("/", _TRAILING_DOTS_OR_SPACES.sub("", path))


def _short_name_pattern(segment: str) -> re.Pattern[str] | None:
    """The 8.3 short names Windows may give a file or directory named `segment` (`ADMINI~1`,
    `ADMINI~2.JSO`, and from the fifth on `AD1F2C~5`), or None when the name is one already
    (a name of at most 8 characters, an extension of at most 3, nothing to replace)."""
    name = unquote(segment).upper()
    raw_stem, dot, raw_extension = name.rpartition(".")
    if not dot:
        raw_stem, raw_extension = name, ""
    stem = _NOT_8DOT3.sub("_", raw_stem.replace(".", "").replace(" ", ""))
    extension = _NOT_8DOT3.sub("_", raw_extension.replace(" ", ""))
    if (stem, extension) == (raw_stem, raw_extension) and len(stem) <= 8 and len(extension) <= 3:
        return None  # an 8.3 name already: Windows gives it no other
    if not stem:  # `.well-known`: WELL-K~1
        stem, extension = extension, ""
    suffix = f"(?:\\.{re.escape(extension[:3])})?" if extension else ""
    return re.compile(
        f"(?:{re.escape(stem[:6])}|{re.escape(stem[:2])}[0-9A-F]{{4}})~[0-9]{{1,6}}{suffix}",
        re.IGNORECASE,
    )


def normalise(raw_path: str) -> str:
    """Resolve dot-segments (`..;x` included) and doubled slashes; refuse what cannot be made
    unambiguous."""
    if not raw_path.startswith("/") or _FORBIDDEN.search(raw_path):
        raise Refusal(
            Reason.BAD_PATH, "the path contains encoded separators, a fragment or control bytes"
        )
    if "%" in raw_path or not raw_path.isascii():
        decoded = unquote(raw_path, errors="surrogateescape")
        if _NOT_UTF8.search(decoded):
            raise Refusal(Reason.BAD_PATH, "the path's bytes or percent-escapes are not UTF-8")
        if _syntax_in_disguise(decoded):
            raise Refusal(Reason.BAD_PATH, "the path holds characters that normalise to separators")
    if "." not in raw_path and "//" not in raw_path and "%" not in raw_path:
        return raw_path  # the common case: nothing to resolve
    path = _ENCODED.sub(_decode_unreserved, raw_path) if "%" in raw_path else raw_path
    segments: list[str] = []
    parts = path.split("/")
    last = len(parts) - 1
    for i, part in enumerate(parts[1:], start=1):
        name = _segment_name(part) if "." in part else part
        if name == ".":
            if i == last and segments:
                segments.append("")  # `/a/b/.` is `/a/b/` (RFC 3986 §5.2.4)
            continue
        if name == "..":
            if not segments:
                raise Refusal(Reason.BAD_PATH, "the path climbs above the root")
            segments.pop()
            if i == last and segments:
                segments.append("")
            continue
        if part == "" and i != last:
            continue  # doubled slash
        segments.append(part)
    return "/" + "/".join(segments)


@functools.lru_cache(maxsize=4096)
def _folded_char(char: str) -> str:
    """A non-ASCII character as ASCII letters, where an upstream's case-blind comparison
    takes it for them: Java's `equalsIgnoreCase` and .NET's `OrdinalIgnoreCase` compare each
    character's upper and lower case (U+0131, a dotless i, is `I` upper-cased; U+212A, the
    Kelvin sign, is `k` lower-cased; U+0130 is `i`), Unicode case folding makes U+FB00 `ff`,
    and NFKC (IIS's "best fit", normalising frameworks) makes U+FF41 (a fullwidth a) `a`.
    Otherwise the character itself, lower-cased."""
    lower = char.lower()
    nfkc = unicodedata.normalize("NFKC", char)
    for candidate in (lower, char.upper(), char.casefold(), nfkc, nfkc.lower()):
        letters = "".join(c for c in candidate if not unicodedata.combining(c))
        if letters and letters.isascii():
            return letters.lower()
    return lower


def folded(path: str) -> str:
    """A path as an upstream that ignores letter case reads it, all in one (ASCII) case: its
    escapes decoded (the upstream decodes before it compares), and the non-ASCII characters
    that such comparisons take for ASCII letters as those (`_folded_char`)."""
    if "%" not in path and path.isascii():
        return path.lower()
    decoded = unquote(path, errors="surrogateescape")
    return "".join(c.lower() if c.isascii() else _folded_char(c) for c in decoded)


class Router:
    """Longest configured prefix wins; prefixes match on segment boundaries."""

    def __init__(self, routes: list[Route]) -> None:
        # Longest first, so the first hit is the longest match.
        self._routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
        self._bases = [r.prefix.rstrip("/") for r in self._routes]
        self._folded_bases = [folded(base) for base in self._bases]
        # Each prefix's last segment, folded: what a path's last segment must be, cut at a dot,
        # for a suffix-matching upstream to route it elsewhere.
        self._last_names = frozenset(folded(base.rpartition("/")[2]) for base in self._bases)
        # The 8.3 short names of the prefixes' segments, each with the segment it names.
        short_names = {
            segment: _short_name_pattern(segment)
            for base in self._bases
            for segment in base.split("/")
            if segment
        }
        self._short_names = [(pattern, name) for name, pattern in short_names.items() if pattern]
        self._matches: dict[str, Match] = {}  # raw path -> its match (refusals not kept)

    def find(self, path: str) -> tuple[Route, str] | None:
        return self._find(path, self._bases)

    def _find(self, path: str, bases: list[str]) -> tuple[Route, str] | None:
        for route, base, own in zip(self._routes, bases, self._bases, strict=True):
            if base == "" or path == base or path.startswith(base + "/"):
                return route, own
        return None

    def _folded_route(self, path: str) -> Route | None:
        """The route of `path` to an upstream that ignores letter case."""
        found = self._find(folded(path), self._folded_bases)
        return None if found is None else found[0]

    def _agrees(self, view: str, route: Route) -> bool:
        """Whether `view`, in its own case and in one case, falls on `route`."""
        found = self.find(view)
        return found is not None and found[0] is route and self._folded_route(view) is route

    def _suffix_views(self, path: str) -> list[str]:
        """`path` with its last segment (before one trailing slash) cut at a dot, where the cut
        names some prefix's last segment: Spring's suffix pattern match (the default before
        Spring 5.3) serves `/api/admin.json` from `/api/admin`, Rails' `(.:format)` likewise."""
        rest = path[:-1] if path[-1] == "/" else path
        head, _, last = rest.rpartition("/")
        views: list[str] = []
        if "." not in last:
            return views
        start = cut = len(head) + 1
        for piece in last.split(".")[:-1]:
            cut += len(piece)
            if cut > start and folded(rest[start:cut]) in self._last_names:
                views.append(rest[:cut])
            cut += 1  # the dot
        return views

    def _windows_view(self, path: str) -> str:
        """`windows_view`, and each segment that is an 8.3 short name of a prefix's segment
        read as that segment (`/api/ADMINI~1/x` is `/api/administration/x`)."""
        view = windows_view(path)
        if "~" not in view or not self._short_names:
            return view
        segments = view.split("/")
        for i, segment in enumerate(segments):
            if "~" in segment:
                for pattern, name in self._short_names:
                    if pattern.fullmatch(segment):
                        segments[i] = name
                        break
        return "/".join(segments)

    def _dotted_views_agree(self, paths: tuple[str, ...], route: Route) -> None:
        """Refuse when Windows' view of a path (trailing dots and spaces cut off its segments,
        NTFS streams, 8.3 short names) or a suffix-matching upstream's (`.json` cut off its
        last one) falls on another route."""
        for path in paths:
            trailing = "./" in path or path.endswith(".") or "%20" in path
            dotted = trailing and _TRAILING_DOTS_OR_SPACES.search(path) is not None
            if (dotted or _windows_only(path)) and not self._agrees(
                self._windows_view(path), route
            ):
                raise Refusal(
                    Reason.BAD_PATH,
                    "the path's trailing dots or spaces change its route"
                    if dotted
                    else "the path's NTFS stream or 8.3 short name changes its route",
                )
            for view in self._suffix_views(path):
                if not self._agrees(view, route):
                    raise Refusal(Reason.BAD_PATH, "the path's .suffix changes its route")

    def match(self, raw_path: str) -> Match:
        """The route for a raw path (no query), or a Refusal: 400 bad path, 404 no route."""
        known = self._matches.get(raw_path)
        if known is not None:
            return known
        match = self._match(raw_path)
        if len(raw_path) <= _CACHED_PATH_CHARS:
            if len(self._matches) >= _MATCH_CACHE:
                self._matches.clear()
            self._matches[raw_path] = match
        return match

    def _match(self, raw_path: str) -> Match:
        path = normalise(raw_path)
        found = self.find(path)
        if path != raw_path:
            # What a naive matcher (or the upstream) would have seen must agree with us.
            literal = self.find(raw_path)
            if (found and found[0]) is not (literal and literal[0]):
                raise Refusal(
                    Reason.BAD_PATH, "the path's dot-segments or slashes change its route"
                )
        route = None if found is None else found[0]
        servlet_path = None
        if ";" in path or "%3B" in path:
            # And so must a servlet upstream, which routes the path without its parameters.
            servlet_path = without_parameters(path)
            servlet = self.find(servlet_path)
            if route is not (servlet and servlet[0]) or route is not self._folded_route(
                servlet_path
            ):
                raise Refusal(Reason.BAD_PATH, "the path's ;parameters change its route")
        # And so must an upstream that ignores letter case (`/ADMIN/x` is `/admin/x` to IIS).
        if route is not None and route is not self._folded_route(path):
            raise Refusal(Reason.BAD_PATH, "the path's letter case changes its route")
        # And Windows (`/admin./x` is `/admin/x`) and a suffix matcher (`/admin.json`).
        if route is not None and ("." in path or "%20" in path or _windows_only(path)):
            self._dotted_views_agree(
                (path,) if servlet_path is None else (path, servlet_path), route
            )
        if found is None:
            raise Refusal(Reason.NO_ROUTE)
        route, base = found
        upstream_path = path
        if route.strip_prefix and base:
            upstream_path = path[len(base) :] or "/"
            if not upstream_path.startswith("/"):
                upstream_path = "/" + upstream_path
        return Match(route=route, label=route.prefix, upstream_path=upstream_path)


def _windows_only(path: str) -> bool:
    """Whether `path` holds what only Windows reads as another name: an NTFS stream's `:` or an
    8.3 short name's `~`."""
    return ":" in path or "%3A" in path or "~" in path
