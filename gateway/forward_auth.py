"""Forward-auth: which request an edge proxy asks about, and whether it may ask.

An edge proxy (nginx `auth_request`, ingress-nginx `auth-url`, Traefik `ForwardAuth`, Caddy
`forward_auth`, Envoy `ext_authz` over HTTP) sends the client's headers to the auth endpoint and
says what the original request was: in `X-Original-URI`/`X-Original-URL` + `X-Original-Method`
(nginx), `X-Forwarded-Uri` + `X-Forwarded-Method` (Traefik, Caddy), or as the path after a
prefix (Envoy). The gateway then decides that request exactly as the proxy port would
(`Pipeline.decide`). Only trusted peers may say so: anyone else could have a protected request
decided as a public one.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from multidict import CIMultiDictProxy

from gateway.config import Forward, ForwardAuth
from gateway.reasons import Reason, Refusal

AUTH_PATH = "/.idlegate/auth"

# Header names that carry the original request's URI or method, in the order they are named
# in errors. Every one present must agree: a client may add any of them, and an edge proxy
# overwrites only the ones it sets (nginx sets X-Original-URI, Caddy X-Forwarded-Uri).
_URI_HEADERS = ("X-Original-URI", "X-Original-URL", "X-Forwarded-Uri")
_METHOD_HEADERS = ("X-Original-Method", "X-Forwarded-Method")
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]{0,31}")
_COMMON_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
# Methods the proxy port refuses before deciding anything (`Reason.METHOD_NOT_ALLOWED`).
NOT_FORWARDED_METHODS = frozenset(("TRACE", "TRACK", "CONNECT"))
_PEER_CACHE_SIZE = 4096


# Made per request: not frozen, whose __init__ costs more (as store.base.Touch).
@dataclass(slots=True)
class OriginalRequest:
    """The request the edge proxy is about to forward: method, raw path, raw query."""

    method: str
    path: str
    query: str


class TrustedPeers:
    """`forward_auth.trusted_proxies` (or `forward.trusted_proxies`) as networks; answers are
    cached per peer address (an edge proxy's few addresses ask again and again)."""

    def __init__(self, config: ForwardAuth | Forward) -> None:
        self._networks = (
            config.networks() if isinstance(config, ForwardAuth) else config.trusted_proxies
        )
        self._known: dict[str, bool] = {}

    def __contains__(self, peer: str | None) -> bool:
        if not peer:
            return False  # a Unix socket or an unknown peer: nothing to vouch for it
        known = self._known.get(peer)
        if known is None:
            known = self._check(peer)
            if len(self._known) >= _PEER_CACHE_SIZE:
                self._known.clear()
            self._known[peer] = known
        return known

    def _check(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer.partition("%")[0])  # drop an IPv6 zone
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener sees ::ffff:127.0.0.1
        return any(address in network for network in self._networks)


# A URL's authority as an edge writes it: a host (a name, or an IP literal in brackets) and
# an optional port; no userinfo, nothing that ends an authority in a URL parser's reading.
_AUTHORITY = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]+)(?::[0-9]*)?")


def _split(value: str, header: str) -> tuple[str, str]:
    """(raw path, raw query) of a request-target (`/a?b`) or an absolute URL (X-Original-URL)."""
    if value.startswith("/"):
        path, _, query = value.partition("?")
        return path, query.partition("#")[0]
    if value.startswith(("http://", "https://")):
        # ingress-nginx sends `$scheme://$http_host$request_uri`: the Host as the client sent
        # it, then the request-target the edge routes on. Read as a URL, a Host holding `#`
        # or `?` (`shop.example:#`) would make that target a fragment or a query, and the
        # path decided `/` while the edge forwards /api/secret: the authority must be a host
        # and port, and the target is what follows it, from its `/`.
        authority, slash, target = value.partition("://")[2].partition("/")
        if not slash or not _AUTHORITY.fullmatch(authority):
            raise Refusal(
                Reason.NO_ORIGINAL_REQUEST, f"{header} is not an http(s) URL with a host and path"
            )
        path, _, query = ("/" + target).partition("?")
        return path, query.partition("#")[0]
    raise Refusal(Reason.NO_ORIGINAL_REQUEST, f"{header} is neither a path nor an http(s) URL")


def _one(headers: CIMultiDictProxy[str], name: str) -> str:
    """The one value of a header known to be present."""
    values = headers.getall(name)
    if len(values) > 1:
        raise Refusal(Reason.NO_ORIGINAL_REQUEST, f"{name} was sent more than once")
    return values[0]


def original_request(
    method: str,
    raw_path: str,
    query: str,
    headers: CIMultiDictProxy[str],
    envoy_path_prefix: str | None,
) -> OriginalRequest:
    """The original request of a forward-auth request (method, path and query of the auth
    request itself, and its headers). Refused when no source says which request it is, or
    when two sources disagree."""
    target: tuple[str, str] | None = None
    first = ""
    if envoy_path_prefix is not None and (
        raw_path == envoy_path_prefix or raw_path.startswith(envoy_path_prefix + "/")
    ):
        target, first = (raw_path[len(envoy_path_prefix) :] or "/", query), "the path"
    for name in _URI_HEADERS:
        if name not in headers:  # the common case: one of the three is there
            continue
        other = _split(_one(headers, name), name)
        if target is None:
            target, first = other, name
        elif other != target:
            raise Refusal(Reason.NO_ORIGINAL_REQUEST, f"{first} and {name} name different requests")
    if target is None:
        raise Refusal(
            Reason.NO_ORIGINAL_REQUEST,
            "the forward-auth request says no original URI "
            "(X-Original-URI, X-Original-URL or X-Forwarded-Uri)",
        )
    original_method = method
    named = False
    for name in _METHOD_HEADERS:
        if name in headers:
            value = _one(headers, name).upper()
            if named and value != original_method:
                raise Refusal(Reason.NO_ORIGINAL_REQUEST, "the original method headers disagree")
            original_method, named = value, True
    if original_method not in _COMMON_METHODS:
        if original_method in NOT_FORWARDED_METHODS:
            raise Refusal(Reason.METHOD_NOT_ALLOWED)
        if not _METHOD.fullmatch(original_method):
            raise Refusal(Reason.NO_ORIGINAL_REQUEST, "the original method is not an HTTP method")
    return OriginalRequest(method=original_method, path=target[0], query=target[1])


def named_method(headers: CIMultiDictProxy[str], fallback: str) -> str:
    """The original method for the access log of a refusal `original_request` raised: the one
    the edge named, if every X-Original-Method / X-Forwarded-Method value agrees and is a
    method token (so TRACE and TRACK attempts show as such, not as the auth request's GET);
    `-` if they disagree or none is a method; `fallback` (the auth request's) if none is sent."""
    named = {
        value.strip(" \t").upper() for name in _METHOD_HEADERS for value in headers.getall(name, ())
    }
    if not named:
        return fallback
    if len(named) == 1:
        (method,) = named
        if _METHOD.fullmatch(method):
            return method
    return "-"
