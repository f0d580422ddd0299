"""Header hygiene, both ways, in one place: hop-by-hop and Connection-named fields, the
gateway's own fields (identity, X-Request-ID) and their `_` twins, and what a client may
claim about itself (X-Forwarded-*, X-Real-IP, ...) depending on whether its peer is a
trusted proxy."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping, istr

from gateway.config import Forward
from gateway.forward_auth import TrustedPeers
from gateway.reasons import Reason, Refusal
from gateway.tokens.claims import Identity

# Names looked up or set on every request are `istr`s: a multidict takes their case-folded
# identity from them instead of folding (and hashing) a new copy each time.
X_REQUEST_ID = istr("X-Request-ID")
X_REAL_IP = istr("X-Real-IP")

# RFC 9110 §7.6.1 plus the legacy ones proxies still meet.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        # RFC 9113 §3.2.1 (the h2c upgrade's settings): connection-specific, even unnamed.
        "http2-settings",
    }
)
# Set by the gateway itself, never taken from the client.
_REQUEST_OWN = frozenset({"host", "x-request-id", "expect"})
# What a proxy in front says about the client and its request: taken from `trusted_proxies`
# only, and from anyone else dropped (the first five are then set by us). Frameworks act on
# them: Spring and Werkzeug rebuild URLs from X-Forwarded-Prefix/-Port, Symfony and IIS route
# on X-Original-URL / X-Rewrite-URL, apps log and rate-limit on the client-IP ones.
_CLIENT_CLAIMS = frozenset(
    {
        "x-forwarded-for",
        "x-real-ip",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-ssl",
        "x-forwarded-scheme",
        "x-forwarded-server",
        "x-original-forwarded-for",
        "x-client-ip",
        "true-client-ip",
        "x-cluster-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-original-url",
        "x-original-uri",
        "x-rewrite-url",
        # Forward-auth's and other proxies' names for the original request and the client
        # (Traefik, Caddy; Akamai, Azure, F5 ...).
        "x-forwarded-uri",
        "x-forwarded-method",
        "x-original-method",
        "x-forwarded",
        "x-host",
        "x-originating-ip",
        "x-remote-ip",
        "x-remote-addr",
        "x-proxyuser-ip",
    }
)
# Method overrides (Rails, Express, Symfony, ...): the upstream runs the method they name.
METHOD_OVERRIDES = frozenset(
    {istr("X-HTTP-Method-Override"), istr("X-HTTP-Method"), istr("X-Method-Override")}
)
OVERRIDE_NAMES = frozenset(name.lower() for name in METHOD_OVERRIDES)


def _planned_drops(
    names: tuple[str, ...],
    connection: tuple[str, ...],
    remove: frozenset[str],
    twins: frozenset[str],
) -> tuple[str, ...]:
    """The (lower-case) names to take out of a copy of a message's headers: those in `remove`,
    those its Connection headers name, and those that are in `twins` once `_` is read as `-`
    (what nginx, WSGI and CGI upstreams do)."""
    remove = remove.union(t.strip(" \t").lower() for value in connection for t in value.split(","))
    lowered = {name.lower() for name in names}
    return tuple(
        istr(n) for n in lowered if n in remove or ("_" in n and n.replace("_", "-") in twins)
    )


_PLANNED_NAMES = 2048  # characters of header names and Connection values in one kept key
_KEPT_PLANS = 1024


class _DropPlans:
    """`_planned_drops` for one `remove` and `twins`, kept by header names and Connection
    values: clients and upstreams send the same few sets over and over (bounded: sets of
    modest size, at most _KEPT_PLANS of them, all forgotten when full)."""

    __slots__ = ("_kept", "_last", "_last_key", "_remove", "_twins")

    def __init__(self, remove: frozenset[str], twins: frozenset[str] = frozenset()) -> None:
        self._remove, self._twins = remove, twins
        self._kept: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[str, ...]] = {}
        # The plan found last, and its key: the same set again (one client, one upstream, a
        # load balancer's health checks) is then a comparison of names (the strings a parser
        # made for this message are new ones: looking them up would hash every one).
        self._last_key: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._last: tuple[str, ...] = ()

    def of(self, headers: MultiMapping[str]) -> tuple[str, ...]:
        key = (tuple(headers.keys()), tuple(headers.getall(hdrs.CONNECTION, ())))
        if key == self._last_key:
            return self._last
        found = self._kept.get(key)
        if found is None:
            found = _planned_drops(*key, self._remove, self._twins)
            if sum(map(len, key[0])) + sum(map(len, key[1])) > _PLANNED_NAMES:
                return found  # neither kept nor the last: a key that size is not compared
            if len(self._kept) >= _KEPT_PLANS:
                self._kept.clear()
            self._kept[key] = found
        self._last_key, self._last = key, found
        return found


# From upstream responses: hop-by-hop fields, and the upstream's X-Request-ID (ours replaces it);
# with the body relayed whole, its Content-Length too (aiohttp writes the one it sends).
_RESPONSE_DROPS = _DropPlans(HOP_BY_HOP | {"x-request-id"})
_WHOLE_RESPONSE_DROPS = _DropPlans(HOP_BY_HOP | {"x-request-id", "content-length"})


# Rendered sets of X-Forwarded-For, X-Real-IP, X-Forwarded-Proto/-Host (by peer, scheme and
# Host) kept at most: forgotten when full (Host is the client's to choose).
_KEPT_FORWARDED = 4096


class UpstreamHeaders:
    """What goes upstream, in two parts: `client`, the client's fields that pass (a copy of
    its own), and ours after them: `identity`, then `forwarded` (X-Forwarded-For, X-Real-IP,
    X-Forwarded-Proto/-Host), then X-Request-ID. Ours are also header lines (`lines`): the
    lean transport writes those as they are; anything else takes `merged()`. Nothing in
    either part holds a CR or LF: the client's are llhttp's (and the lean transport checks
    them again), ours are checked where rendered, and the request id is one of ours
    (`Pipeline._request_id`)."""

    __slots__ = ("client", "forwarded", "identity", "lines", "request_id")

    def __init__(
        self,
        client: CIMultiDict[str],
        identity: Mapping[str, str],
        forwarded: tuple[tuple[str, str], ...],
        lines: str,
        request_id: str,
    ) -> None:
        self.client, self.identity, self.forwarded = client, identity, forwarded
        self.lines, self.request_id = lines, request_id  # lines: X-Request-ID's included

    @property
    def ours(self) -> tuple[tuple[str, str], ...]:
        """Our fields in the order they are sent, X-Request-ID apart."""
        return (*self.identity.items(), *self.forwarded)

    def merged(self) -> CIMultiDict[str]:
        """Both parts as one multidict: the client part itself, extended (so: once)."""
        headers = self.client
        headers.extend(self.identity)
        headers.extend(self.forwarded)
        headers.add(X_REQUEST_ID, self.request_id)
        return headers


def _rendered(ours: tuple[tuple[str, str], ...]) -> str:
    """Our fields as header lines. Identity values hold no control character
    (tokens.verify.identity_headers), the peer is an address, a Host value is llhttp's:
    checked here all the same, once per rendering."""
    for field in ours:
        for text in field:
            if "\r" in text or "\n" in text:
                raise Refusal(Reason.MALFORMED_REQUEST, "a newline in a header field")
    return "".join([f"{name}: {value}\r\n" for name, value in ours])


class RequestHeaders:
    """Builds what goes upstream from a client's request (see `for_request`)."""

    def __init__(self, config: Forward) -> None:
        # Identity header names are dropped from every incoming request (client-sent copies).
        drop = HOP_BY_HOP | _REQUEST_OWN | {n.lower() for n in config.identity_headers}
        with_auth = drop | {"authorization"}
        # By (the peer is in trusted_proxies, `strip_authorization`).
        # nginx, WSGI and CGI upstreams read `X_Auth_Subject` as `X-Auth-Subject`: an incoming
        # name that is one of ours once `_` is `-` is dropped like the name itself.
        # So are the `_` spellings of the method overrides: those whose value the head checks
        # read (`pipeline._check_overrides`) pass, these would pass unread.
        twins = with_auth | _CLIENT_CLAIMS | OVERRIDE_NAMES
        self._drops = {
            (True, False): _DropPlans(drop, twins),
            (True, True): _DropPlans(with_auth, twins),
            (False, False): _DropPlans(drop | _CLIENT_CLAIMS, twins),
            (False, True): _DropPlans(with_auth | _CLIENT_CLAIMS, twins),
        }
        self._any_trusted = bool(config.trusted_proxies)
        self._trusted = TrustedPeers(config)
        # (peer, scheme, Host) -> (X-Forwarded-For, X-Real-IP, X-Forwarded-Proto/-Host: as
        # fields, and as lines). Per peer and Host, not per token: a few entries, kept hot in
        # the CPU's caches, where one per token was a cache miss or several a request.
        self._forwarded: dict[tuple[str, str, str], tuple[tuple[tuple[str, str], ...], str]] = {}

    def for_request(
        self,
        request: web.BaseRequest,
        request_id: str,
        identity: Mapping[str, str],
        *,
        strip_authorization: bool,
    ) -> UpstreamHeaders:
        """What goes upstream: the client's headers without hop-by-hop ones, identity copies
        (and their `_` twins), or, unless the peer is a trusted proxy, its claims about the
        client; then the identity headers and X-Forwarded-*, X-Real-IP, X-Request-ID."""
        peer = request.remote or ""
        trusted = self._any_trusted and peer in self._trusted
        incoming = request.headers
        drops = self._drops[trusted, strip_authorization].of(incoming)
        client = CIMultiDict(incoming)  # one copy in C, then only what must go is taken out
        for name in drops:
            client.popall(name)
        # Ours come after hop-by-hop removal, so `Connection: X-Auth-Subject` cannot strip
        # them; their names are none of ours below (config.Forward), and client copies went.
        host = request.host
        # A verified token's identity comes rendered (claims.Identity); any other mapping is
        # rendered, and checked, here.
        identity_lines = (
            identity.lines if type(identity) is Identity else _rendered(tuple(identity.items()))
        )
        if trusted:
            theirs = self._trusted_ours(client, incoming, peer, request.scheme, host)
            lines = f"{identity_lines}{_rendered(theirs)}X-Request-ID: {request_id}\r\n"
            return UpstreamHeaders(client, identity, theirs, lines, request_id)
        # The client's claims about itself went above, so these are only a function of:
        key = (peer, request.scheme, host)
        kept = self._forwarded.get(key)
        if kept is None:
            forwarded: tuple[tuple[str, str], ...] = ((hdrs.X_FORWARDED_FOR, peer),)
            if peer:
                forwarded += ((X_REAL_IP, peer),)
            forwarded += ((hdrs.X_FORWARDED_PROTO, request.scheme),)
            if host:
                forwarded += ((hdrs.X_FORWARDED_HOST, host),)
            kept = (forwarded, _rendered(forwarded))
            if len(self._forwarded) >= _KEPT_FORWARDED:
                self._forwarded.clear()
            self._forwarded[key] = kept
        lines = f"{identity_lines}{kept[1]}X-Request-ID: {request_id}\r\n"
        return UpstreamHeaders(client, identity, kept[0], lines, request_id)

    @staticmethod
    def _trusted_ours(
        client: CIMultiDict[str],
        incoming: CIMultiDictProxy[str],
        peer: str,
        scheme: str,
        host: str,
    ) -> tuple[tuple[str, str], ...]:
        """Our X-Forwarded-* behind a trusted proxy: its view of the client passes, and we add
        its hop to the X-Forwarded-For chain (which leaves the client part for ours)."""
        chain = ", ".join(incoming.getall(hdrs.X_FORWARDED_FOR, ()))
        client.popall(hdrs.X_FORWARDED_FOR, None)
        ours: tuple[tuple[str, str], ...] = (
            (hdrs.X_FORWARDED_FOR, f"{chain}, {peer}" if chain else peer),
        )
        if peer and X_REAL_IP not in client:
            ours += ((X_REAL_IP, peer),)
        if hdrs.X_FORWARDED_PROTO not in client:
            ours += ((hdrs.X_FORWARDED_PROTO, scheme),)
        if host and hdrs.X_FORWARDED_HOST not in client:
            ours += ((hdrs.X_FORWARDED_HOST, host),)
        return ours


def response_headers(
    headers: CIMultiDict[str], request_id: str, *, whole_body: bool
) -> CIMultiDict[str]:
    """What goes to the client from an upstream response's headers, made of them in place
    (a transport's response owns its headers: `transport.UpstreamResponse`): without
    hop-by-hop ones (and those named in Connection), with our X-Request-ID instead of any the
    upstream sent; with `whole_body` (relayed in one piece) without its Content-Length."""
    for name in (_WHOLE_RESPONSE_DROPS if whole_body else _RESPONSE_DROPS).of(headers):
        headers.popall(name)
    headers[X_REQUEST_ID] = request_id
    return headers
