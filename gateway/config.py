"""The typed configuration: a YAML file, then `IDLEGATE_*` environment overrides, validated.

Defaults live here and nowhere else. Durations are seconds as floats; sizes are bytes.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, unquote

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)
from yarl import URL

from gateway.errors import StartupError

ENV_PREFIX = "IDLEGATE_"
DEFAULT_PATH = "config/gateway.yaml"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
}


# No duration means anything beyond this (100 years): what the store computes from them (idle
# timeout + lifetime + leeway + retention, as PX milliseconds) stays far inside what Redis takes.
MAX_DURATION = 100 * 365.25 * 86400.0


def parse_duration(value: object) -> float:
    """`900`, `90s`, `250ms`, `15m`, `1h30m` -> seconds. Negative or empty values, and values
    over `MAX_DURATION`, are refused."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 900, 90s, 15m or 1h30m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            pos, seconds = 0, 0.0
            for match in _DURATION_PART.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
                pos = match.end()
            if pos != len(text) or not text:
                raise ValueError(f"invalid duration {value!r}: use 900, 90s, 15m or 1h30m")
    else:
        raise ValueError("expected a duration such as 900, 90s, 15m or 1h30m")
    if not math.isfinite(seconds):  # .nan would disable every comparison it takes part in
        raise ValueError("a duration must be a finite number")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION:
        raise ValueError("a duration cannot be over 100 years")
    return seconds


def _must_be_positive(seconds: float | None) -> float | None:
    """For the durations where 0 has no meaning (an interval, a timeout, a limit): 0 would not
    be "off" but a gateway that refuses everything or polls without pause."""
    if seconds is not None and seconds <= 0:
        raise ValueError("must be positive")
    return seconds


def parse_size(value: object) -> int:
    """`1048576`, `512KiB`, `10MiB` -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    else:
        raise ValueError(f"invalid size {value!r}: use bytes or e.g. 512KiB, 10MiB")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def parse_network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """`10.0.0.0/8`, `::1/128` or a bare address (one host). Host bits set are refused: a typo
    there would trust a different range than the one written."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a CIDR such as 10.0.0.0/8 or an address")
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"not a CIDR: {exc}") from None


def _file_path(value: object) -> object:
    """A NUL cannot be in a file name: refused here, not as a ValueError when it is opened."""
    if isinstance(value, str | Path) and "\0" in str(value):
        raise ValueError("a file path cannot contain a NUL character")
    return value


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def parse_listen_host(value: object) -> object:
    """A host to bind: an IP address (IPv6 without brackets), a syntactically valid host name
    (RFC 1123 labels; `_` allowed, as container service names have it), or "" for every
    address. Anything else would only fail when serve binds, naming no key."""
    if not isinstance(value, str) or value == "":
        return value
    if value.startswith("[") and value.endswith("]"):
        raise ValueError(f"write an IPv6 address without brackets: {value[1:-1]!r}")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    name = value.removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{value!r} is neither an IP address nor a host name")
    if labels[-1].isdigit():  # 10.0.0.300: an address with a typo, not a name
        raise ValueError(f"{value!r} is not a valid IP address")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
ListenHost = Annotated[str, BeforeValidator(parse_listen_host)]
FilePath = Annotated[Path, BeforeValidator(_file_path)]
Size = Annotated[int, BeforeValidator(parse_size)]
Network = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    BeforeValidator(parse_network),
    PlainSerializer(str, return_type=str),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(_Model):
    host: ListenHost = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)


class Admin(_Model):
    host: ListenHost = "127.0.0.1"
    port: int = Field(default=9090, ge=0, le=65535)
    token_file: FilePath | None = None


class Server(_Model):
    """Process-level behaviour, and the limits that keep slow or idle clients from holding
    connections (docs/deployment.md, "Slow clients")."""

    shutdown_grace: Duration = 20.0
    # The whole request head (request line and headers) must arrive within this, counted from
    # the connection's start or the first byte of a keep-alive connection's next request.
    header_timeout: Duration = 10.0
    # A request body may go this long without a byte (as nginx's client_body_timeout); then
    # 408 request_timeout and the connection closed.
    body_timeout: Duration = 15.0
    # An idle client connection (no request in progress) is closed after this.
    keepalive_timeout: Duration = 75.0
    # Per process, over the proxy (and forward-auth) listeners: at the cap the gateway stops
    # accepting and further clients wait in the listen backlog until a connection closes.
    max_connections: int = Field(default=10000, ge=1)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True

    @field_validator("header_timeout", "body_timeout", "keepalive_timeout")
    @classmethod
    def _positive(cls, seconds: float) -> float:
        if seconds <= 0:  # 0 would not mean "no limit": that is the hole these keys close
            raise ValueError("must be positive")
        return seconds


class Store(_Model):
    url: str = "memory://"
    key_prefix: str = Field(default="idlegate", pattern=r"^[A-Za-z0-9:_.-]{1,64}$")
    timeout: Duration = 0.25
    on_error: Literal["deny", "allow", "grace"] = "deny"
    # Name of an environment variable holding the secret used to hash jti/sid into store keys.
    # Every replica must share it; without one a fixed, public key is used (still no raw claims).
    hash_key_env: str | None = None
    # How often each instance re-reads the shared revocation list (propagation delay bound).
    revocation_poll: Duration = 0.25
    # 0: exact, one store round trip per request. D > 0: a token this instance accepted through
    # the store less than D ago is decided locally and its activity written in batches (every
    # D/2); other instances see it up to D late, so a token may be refused up to D early, never
    # accepted late (docs/store.md, "Coalesced activity"). Must be below every idle timeout.
    coalesce: Duration = 0.0

    @field_validator("timeout")
    @classmethod
    def _usable_timeout(cls, seconds: float) -> float:
        _must_be_positive(seconds)
        if seconds < 0.001:  # no store answers within it: every request would be a 503
            raise ValueError("must be at least 1ms")
        return seconds

    @field_validator("revocation_poll")
    @classmethod
    def _usable_poll(cls, seconds: float) -> float:
        _must_be_positive(seconds)
        if seconds < 0.01:  # each poll is a store call, from every instance
            raise ValueError("must be at least 10ms")
        return seconds

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        schemes = (
            "memory://",
            "redis://",
            "rediss://",
            "redis+sentinel://",
            "rediss+sentinel://",
            "redis+cluster://",
            "rediss+cluster://",
        )
        if not url.startswith(schemes):
            raise ValueError("must start with one of " + ", ".join(schemes))
        return url

    @property
    def is_memory(self) -> bool:
        return self.url.startswith("memory://")


PRESETS: dict[str, dict[str, float]] = {
    # PCI DSS 8.2.8: re-authenticate after 15 minutes idle.
    "pci-dss": {"idle_timeout": 900, "max_token_lifetime": 900, "max_session_age": 43200},
    # NIST SP 800-63B AAL2: 30 min inactivity, 12 h overall.
    "nist-aal2": {"idle_timeout": 1800, "max_token_lifetime": 900, "max_session_age": 43200},
    # NIST SP 800-63B AAL3: 15 min inactivity, 12 h overall.
    "nist-aal3": {"idle_timeout": 900, "max_token_lifetime": 600, "max_session_age": 43200},
}


# Clock skew between an IdP and the gateway is seconds, at worst minutes; a larger leeway only
# extends every token's exp.
MAX_LEEWAY = 86400.0


class Policy(_Model):
    preset: Literal["pci-dss", "nist-aal2", "nist-aal3"] | None = None
    idle_timeout: Duration = 900.0
    max_token_lifetime: Duration = 900.0
    leeway: Duration = 30.0
    required_claims: list[str] = Field(default_factory=lambda: ["exp", "iat"])
    # The claims that identify a token, tried in order; `digest` (always present) is a keyed
    # hash of the token's signature, for IdPs that mint no jti (Auth0, authentik).
    token_id: list[str] = Field(default_factory=lambda: ["jti", "uti", "digest"])
    track_by: Literal["jti", "sid"] = "jti"
    session_claim: str = "sid"
    session_retention: Duration = 86400.0
    max_session_age: Duration | None = None

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """A preset fills the keys the file leaves unset; explicit keys still win."""
        if isinstance(data, Mapping) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        problems = []
        if self.idle_timeout <= 0:
            problems.append("idle_timeout: must be positive")
        if self.max_token_lifetime <= 0:
            problems.append("max_token_lifetime: must be positive")
        if self.session_retention <= 0:  # an idled-out session would be let in again at once
            problems.append("session_retention: must be positive")
        if self.max_session_age is not None and self.max_session_age <= 0:
            problems.append("max_session_age: must be positive (leave it unset for no limit)")
        if self.leeway > MAX_LEEWAY:
            problems.append("leeway: must be at most 1d (it allows for clock skew, not lifetime)")
        for claim in ("exp", "iat"):
            if claim not in self.required_claims:
                problems.append(f"required_claims: must include {claim} (the lifetime cap)")
        if self.track_by == "sid" and self.session_claim not in self.required_claims:
            problems.append(
                f"required_claims: must include {self.session_claim} (track_by sid: activity "
                "is per session, a token without one could not be tracked)"
            )
        if self.track_by == "jti" and not self.token_id:
            problems.append(
                "token_id: is empty, so no token could be identified with track_by jti; "
                "list claims such as [jti, uti, digest]"
            )
        for i, name in enumerate(self.token_id):
            if name in self.token_id[:i]:
                problems.append(f"token_id: {name!r} is listed twice")
        if "digest" in self.token_id and self.token_id[-1] != "digest":
            problems.append("token_id: digest is always present, so it must come last")
        if problems:
            raise ValueError("\n".join(problems))
        return self


_ALGORITHMS = {
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA", "HS256", "HS384", "HS512",
}  # fmt: skip


AudienceClaim = Literal["aud", "azp"]


def _aud_only() -> list[AudienceClaim]:
    return ["aud"]


# Said without the URL: it may hold a password.
_UNREADABLE_URL = (
    "not a URL aiohttp can fetch (percent-encode a `/`, `?` or `#` in a user or password, "
    "e.g. %2F for `/`)"
)


class Provider(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # Exact match on the token's iss; a list for IdPs with one issuer per tenant (Entra ID).
    issuer: str | list[str]
    audiences: list[str] = Field(min_length=1)
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"], min_length=1)
    jwks_uri: str | None = None
    discovery: bool = False
    jwks_file: FilePath | None = None
    public_key_file: FilePath | None = None
    hmac_secret_env: str | None = None
    require_typ: str | None = None  # the JOSE header's typ, never a claim named typ
    # Dotted path to the token's roles (a list, or a space-separated string), for routes[].roles:
    # e.g. roles (Entra), realm_access.roles or resource_access.<client>.roles (Keycloak).
    roles_claim: str | None = Field(default=None, pattern=r"^[^.\s]+(\.[^.\s]+)*$")
    # The claims whose values may match `audiences`: [aud, azp] for Keycloak clients without
    # an audience mapper (aud: account, the client in azp).
    audience_claims: list[AudienceClaim] = Field(default_factory=_aud_only, min_length=1)
    # Remote key refresh bounds; Cache-Control max-age is honoured between them.
    jwks_min_refresh: Duration = 60.0
    jwks_max_refresh: Duration = 3600.0
    # A token's unknown kid refetches the keys at once, at most once per this (per provider and
    # replica): any client can send a junk kid, so it is how long a key the IdP publishes just
    # after may be refused. Apart from the background refresh bounds above.
    jwks_miss_refetch: Duration = 5.0
    # Keys fetched over plain http from a host that is not loopback: anyone on the network path
    # could swap them and forge any token. Refused unless set, for an in-cluster IdP reached
    # over a trusted network only (loopback http is always allowed: tests, the demo).
    allow_insecure_http: bool = False

    @field_validator("algorithms")
    @classmethod
    def _allowed_algorithms(cls, algorithms: list[str]) -> list[str]:
        for alg in algorithms:
            if alg.lower() == "none":
                raise ValueError("'none' is never accepted")
            if alg not in _ALGORITHMS:
                raise ValueError(f"unknown algorithm {alg!r}")
        return algorithms

    @field_validator("issuer")
    @classmethod
    def _issuers_given(cls, issuer: str | list[str]) -> str | list[str]:
        for one in [issuer] if isinstance(issuer, str) else issuer or [""]:
            if not one:
                raise ValueError("must be a non-empty string or a non-empty list of them")
        return issuer

    @field_validator("jwks_min_refresh", "jwks_max_refresh")
    @classmethod
    def _refresh_positive(cls, interval: float) -> float:
        if interval <= 0:  # an IdP answering max-age=0 would be fetched without pause
            raise ValueError("must be positive")
        return interval

    @model_validator(mode="after")
    def _refresh_bounds_ordered(self) -> Provider:
        if self.jwks_min_refresh > self.jwks_max_refresh:
            raise ValueError(
                f"jwks_min_refresh: {self.jwks_min_refresh:g}s is above jwks_max_refresh "
                f"({self.jwks_max_refresh:g}s); must be at most that"
            )
        return self

    @field_validator("jwks_miss_refetch")
    @classmethod
    def _refetch_limited(cls, interval: float) -> float:
        if interval <= 0:
            raise ValueError("must be more than 0 (it limits how often an unknown kid refetches)")
        return interval

    @property
    def issuers(self) -> list[str]:
        """Every issuer string this provider's tokens may carry in iss."""
        return [self.issuer] if isinstance(self.issuer, str) else list(self.issuer)

    @field_validator("jwks_uri")
    @classmethod
    def _https_or_local(cls, uri: str | None) -> str | None:
        if uri is not None and not uri.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        if uri is not None and not _readable_http_url(uri):
            raise ValueError(_UNREADABLE_URL)
        return uri

    def refuses_key_url(self, url: str) -> bool:
        """Whether keys (or a discovery document) must not be fetched from `url`: plain http
        to a host other than loopback (127.0.0.0/8, ::1, localhost), `allow_insecure_http`
        unset. Also applied to a jwks_uri found by discovery."""
        if self.allow_insecure_http:
            return False
        try:
            parsed = URL(url)
            scheme, host = parsed.scheme, parsed.host
        except ValueError:  # unreadable: refused as such elsewhere
            return False
        if scheme != "http" or host is None:
            return False
        if host.lower().rstrip(".") == "localhost":
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:  # a name other than localhost: resolved by whoever answers DNS
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return not address.is_loopback

    @model_validator(mode="after")
    def _key_urls_secure(self) -> Provider:
        insecure = (
            "is plain http to a host that is not loopback: anyone on the network path could "
            "replace the keys and forge tokens; use https, or set allow_insecure_http: true "
            "(only for an IdP reached over a trusted network)"
        )
        problems = []
        if self.jwks_uri is not None and self.refuses_key_url(self.jwks_uri):
            problems.append(f"jwks_uri: {mask_url(self.jwks_uri)} {insecure}")
        if self.discovery:
            problems += [
                f"issuer: {mask_url(issuer)} {insecure} (discovery fetches below it)"
                for issuer in dict.fromkeys(self.issuers)
                if self.refuses_key_url(issuer)
            ]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="after")
    def _one_key_source(self) -> Provider:
        sources = [
            self.jwks_uri is not None,
            self.discovery,
            self.jwks_file is not None,
            self.public_key_file is not None,
            self.hmac_secret_env is not None,
        ]
        if sum(sources) != 1:
            raise ValueError(
                "exactly one key source is needed: jwks_uri, discovery, jwks_file, "
                "public_key_file or hmac_secret_env"
            )
        hmac = [alg for alg in self.algorithms if alg.startswith("HS")]
        if self.hmac_secret_env is None and hmac:
            raise ValueError(f"{', '.join(hmac)} only allowed with hmac_secret_env")
        if self.hmac_secret_env is not None and len(hmac) != len(self.algorithms):
            raise ValueError("an hmac_secret_env provider allows only HS256/HS384/HS512")
        return self


class Route(_Model):
    prefix: str = Field(pattern=r"^/")
    # None: the route is only decided (forward-auth), never forwarded; the proxy port answers
    # it no_route. Allowed only with forward_auth.enabled.
    upstream: str | None = None
    strip_prefix: bool = False
    scopes: list[str] = Field(default_factory=list)
    roles: list[str] = Field(default_factory=list)  # all required in the provider's roles_claim
    idle_timeout: Duration | None = None
    auth: Literal["required", "none"] = "required"
    activity: Literal["extend", "passive"] = "extend"
    # True: `Upgrade: websocket` is relayed (docs/websockets.md); the socket is closed at the
    # token's deadlines. False: such an upgrade is refused 400 websocket_not_enabled.
    websocket: bool = False
    # True: long responses (SSE, long polls, downloads) are cut at the token's exp, its
    # max_session_age or its revocation.
    stream_deadline: bool = False

    @field_validator("idle_timeout")
    @classmethod
    def _idle_positive(cls, seconds: float | None) -> float | None:
        return _must_be_positive(seconds)  # 0: every token idle at once; unset: the policy's

    @field_validator("upstream")
    @classmethod
    def _http_upstream(cls, upstream: str | None) -> str | None:
        if upstream is None:
            return None
        if not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", upstream):
            raise ValueError("must be an http:// or https:// URL with a host")
        if not _readable_http_url(upstream):
            raise ValueError(_UNREADABLE_URL)
        return upstream.rstrip("/")


# Request headers the gateway sets or passes itself (forward/headers.py): no identity header.
_GATEWAY_SET = frozenset(
    {
        "x-forwarded-for",
        "x-real-ip",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "host",
        "authorization",
    }
)


class Forward(_Model):
    identity_headers: dict[str, str] = Field(
        default_factory=lambda: {
            "X-Auth-Subject": "sub",
            "X-Auth-Scope": "scope",
            "X-Auth-Token-Id": "jti",
        }
    )
    # Peers whose X-Forwarded-For is extended and whose X-Real-IP, Forwarded and
    # X-Forwarded-Proto/-Host pass; from any other peer they are replaced (docs/forwarding.md).
    trusted_proxies: list[Network] = Field(default_factory=list)
    strip_authorization: bool = False
    connect_timeout: Duration = 2.0
    read_timeout: Duration = 30.0
    # An idle upstream connection is closed after this (both upstream clients).
    keepalive_timeout: Duration = 30.0
    max_body: Size = 10 * 1024 * 1024
    # Upstream connections per process: at most this many to each upstream origin for
    # bodyless requests (the lean client), and this many in all for requests with a body.
    pool_size: int = Field(default=256, ge=1)
    # WebSocket routes: the largest message relayed either way (larger: close 1009).
    websocket_max_message: Size = 1024 * 1024
    # WebSocket client messages are written to the store as activity at most once per token
    # per this interval: the store's last_activity lags the last message by at most this much.
    websocket_activity_interval: Duration = 10.0

    @field_validator(
        "connect_timeout", "read_timeout", "keepalive_timeout", "websocket_activity_interval"
    )
    @classmethod
    def _positive(cls, seconds: float) -> float:
        # 0 never meant "no limit" to us: an upstream that never answers would hold the
        # request (and a pooled connection) for ever.
        if seconds <= 0:
            raise ValueError("must be positive")
        return seconds

    @field_validator("identity_headers")
    @classmethod
    def _header_names(cls, headers: dict[str, str]) -> dict[str, str]:
        for name in headers:
            if not re.fullmatch(r"[A-Za-z0-9-]+", name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in _GATEWAY_SET:
                raise ValueError(f"{name!r} is set by the gateway itself, not an identity header")
        return headers


class ForwardAuth(_Model):
    """The same decisions for an edge proxy that asks before it forwards (nginx auth_request,
    Traefik ForwardAuth, Caddy forward_auth, Envoy ext_authz over HTTP)."""

    enabled: bool = False
    # A dedicated port answering only forward-auth requests (any path); the endpoint is also
    # /.idlegate/auth on the proxy port.
    listen: Listen | None = None
    # Peers allowed to say which request to decide (X-Original-*, X-Forwarded-Uri/-Method, the
    # Envoy path): anyone else could have a protected request decided as a public one.
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # Envoy ext_authz (HTTP service) sends the original path after its path_prefix.
    envoy_path_prefix: str | None = Field(default=None, pattern=r"^/[^?#\s]*[^/?#\s]$")

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        bad = []
        for network in networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                bad.append(f"{network!r} is not an IP network (CIDR)")
        if bad:
            raise ValueError("\n".join(bad))
        return networks

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.trusted_proxies]


# Hosts that bind every address: a port there clashes with that port on any host.
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


class Config(_Model):
    listen: Listen = Field(default_factory=Listen)
    admin: Admin = Field(default_factory=Admin)
    server: Server = Field(default_factory=Server)
    store: Store = Field(default_factory=Store)
    policy: Policy = Field(default_factory=Policy)
    providers: list[Provider] = Field(min_length=1)
    routes: list[Route] = Field(min_length=1)
    forward: Forward = Field(default_factory=Forward)
    forward_auth: ForwardAuth = Field(default_factory=ForwardAuth)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        problems = []
        for field, values, what in (
            ("providers", [p.name for p in self.providers], "name"),
            ("routes", [r.prefix for r in self.routes], "prefix"),
        ):
            for i, value in enumerate(values):
                if value in values[:i]:
                    problems.append(f"{field}.{i}.{what}: {value!r} is used twice; must be unique")
        # An upstream that ignores letter case, or a trailing slash, cannot tell these apart
        # (and the router refuses every path whose route such an upstream would see otherwise).
        bases = [r.prefix.rstrip("/").lower() for r in self.routes]
        for i, route in enumerate(self.routes):
            same = [
                r.prefix
                for r, base in zip(self.routes[:i], bases, strict=False)
                if base == bases[i]
            ]
            if same and route.prefix not in same:
                problems.append(
                    f"routes.{i}.prefix: {route.prefix!r} is the same route as {same[0]!r} to an "
                    "upstream that ignores letter case or a trailing slash; must be unique"
                )
        seen_issuers: set[str] = set()
        for i, provider in enumerate(self.providers):
            for issuer in provider.issuers:
                if issuer in seen_issuers:
                    problems.append(
                        f"providers.{i}.issuer: {issuer!r} is used twice; must be unique"
                    )
                seen_issuers.add(issuer)
            if provider.discovery and any("{" in issuer for issuer in provider.issuers):
                problems.append(
                    f"providers.{i}.issuer: discovery needs each tenant's own issuer, not a "
                    "template such as {tenantid}: list the tenants you trust"
                )
        with_roles = [p.name for p in self.providers if p.roles_claim is not None]
        for i, route in enumerate(self.routes):
            if route.roles and not with_roles:
                problems.append(
                    f"routes.{i}.roles: no provider sets roles_claim, so every token would be "
                    f"refused on {route.prefix}"
                )
            if (route.roles or route.scopes) and route.auth == "none":
                problems.append(
                    f"routes.{i}: scopes/roles need auth: required (route {route.prefix} is public)"
                )
        for i, route in enumerate(self.routes):
            if route.upstream is None and not self.forward_auth.enabled:
                problems.append(
                    f"routes.{i}.upstream: required unless forward_auth.enabled (a route "
                    f"without an upstream is only decided for an edge proxy; route {route.prefix})"
                )
            if route.idle_timeout is not None and route.idle_timeout > self.policy.idle_timeout:
                problems.append(
                    f"routes.{i}.idle_timeout: may only be shorter than policy.idle_timeout "
                    f"(route {route.prefix})"
                )
            if route.stream_deadline and route.auth == "none":
                problems.append(
                    f"routes.{i}.stream_deadline: needs auth: required (a public route has no "
                    f"token whose deadlines could cut it; route {route.prefix})"
                )
        problems.extend(self._prefix_problems())
        problems.extend(self._listener_problems())
        problems.extend(self._coalesce_problems())
        problems.extend(self._activity_interval_problems())
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _prefix_problems(self) -> list[str]:
        """A prefix must be a path the router can match: in the normal form it matches request
        paths in (gateway/routing.py), and not one it refuses. Else the route is dead: every
        request for it is answered no_route or bad_path."""
        from gateway.reasons import Reason, Refusal  # routing imports this module
        from gateway.routing import Router, folded, normalise

        problems = []
        router = Router(self.routes)
        bases = [r.prefix.rstrip("/").lower() for r in self.routes]
        for i, route in enumerate(self.routes):
            prefix, name = route.prefix, f"routes.{i}.prefix"
            if bases[i] in bases[:i]:
                continue  # refused as the same route as an earlier one (_cross_checks)
            if "?" in prefix:
                problems.append(
                    f"{name}: {prefix!r} contains '?': a request path never does (the query "
                    "is not part of it), so no request could match"
                )
                continue
            if not prefix.isascii():
                encoded = quote(prefix, safe="/;:@!$&'()*+,=~%")
                problems.append(
                    f"{name}: {prefix!r} is not ASCII: request paths carry such characters "
                    f"percent-encoded; write {encoded!r}"
                )
                continue
            try:
                normal = normalise(prefix)
            except Refusal as refusal:
                problems.append(f"{name}: {prefix!r} can never match: {refusal}")
                continue
            if normal != prefix:
                problems.append(
                    f"{name}: {prefix!r} is not in the normal form request paths are matched "
                    f"in (dot-segments, doubled slashes, escapes resolved); write {normal!r}"
                )
                continue
            # A path below the prefix, in a segment no configured prefix starts with: what the
            # router refuses for it (`;parameters`, trailing dots), it refuses for every path.
            base, below = prefix.rstrip("/"), "x"
            while any(folded(r.prefix).startswith(folded(f"{base}/{below}")) for r in self.routes):
                below += "x"
            try:
                router.match(f"{base}/{below}")
            except Refusal as refusal:
                if refusal.reason is not Reason.NO_ROUTE:
                    problems.append(f"{name}: {prefix!r} can never match: {refusal}")
        return problems

    def _coalesce_problems(self) -> list[str]:
        """A local decision is safe only within the shortest idle timeout: the token was
        accepted through the store less than store.coalesce ago, so it cannot have idled out."""
        window = self.store.coalesce
        if window <= 0:
            return []
        timeouts = [("policy.idle_timeout", self.policy.idle_timeout, "")]
        timeouts += [
            (f"routes.{i}.idle_timeout", route.idle_timeout, f", route {route.prefix}")
            for i, route in enumerate(self.routes)
            if route.idle_timeout is not None
        ]
        return [
            f"store.coalesce: {window:g}s must be shorter than {name} ({timeout:g}s{where}): "
            "a token may be refused up to store.coalesce early"
            for name, timeout, where in timeouts
            if window >= timeout
        ]

    def _activity_interval_problems(self) -> list[str]:
        """An open WebSocket's client messages are written as activity at most once per
        forward.websocket_activity_interval: at or above a route's idle timeout, a socket in
        steady use would be closed idle_timeout."""
        interval = self.forward.websocket_activity_interval
        return [
            f"forward.websocket_activity_interval: {interval:g}s must be shorter than the idle "
            f"timeout of routes.{i} ({timeout:g}s, route {route.prefix}): a WebSocket in use "
            "would be closed idle_timeout"
            for i, route in enumerate(self.routes)
            if route.websocket
            and interval >= (timeout := route.idle_timeout or self.policy.idle_timeout)
        ]

    def _listener_problems(self) -> list[str]:
        """Two listeners clash on one port when they bind the same host or either binds every
        address (port 0 is fine: each listener gets its own free port). serve would fail to
        bind; the admin port must never be reachable as the proxy port either."""
        listeners: list[tuple[str, Listen | Admin]] = [
            ("listen", self.listen),
            ("admin", self.admin),
        ]
        if self.forward_auth.listen is not None:
            listeners.append(("forward_auth.listen", self.forward_auth.listen))
        problems = []
        for i, (name, own) in enumerate(listeners):
            for other_name, other in listeners[:i]:
                if own.port == other.port != 0 and (
                    own.host == other.host
                    or own.host in _WILDCARD_HOSTS
                    or other.host in _WILDCARD_HOSTS
                ):
                    problems.append(
                        f"{name}.port: {own.port} is also {other_name}.port; "
                        "each listener needs its own port"
                    )
        return problems

    def masked(self) -> dict[str, Any]:
        """The effective config as plain data with secrets replaced, for printing: every URL
        through `mask_url` (the store's, each provider's jwks_uri and issuer, each upstream)."""
        data = self.model_dump(mode="json")
        data["store"]["url"] = mask_url(self.store.url)
        for shown in data["providers"]:
            if shown["jwks_uri"] is not None:
                shown["jwks_uri"] = mask_url(shown["jwks_uri"])
            issuer = shown["issuer"]  # discovery fetches below it, credentials and all
            shown["issuer"] = (
                mask_url(issuer) if isinstance(issuer, str) else [mask_url(i) for i in issuer]
            )
        for shown in data["routes"]:
            if shown["upstream"] is not None:
                shown["upstream"] = mask_url(shown["upstream"])
        return data


_HTTP_SCHEMES = frozenset({"http", "https", "ws", "wss"})
_QUERY_OPTION = re.compile(r"([?&#])([^=&#]*)=([^&]*)")
# Query options whose value is a credential: redis-py's password, sentinel_password and
# ssl_password, api_key, access_token, client_secret, X-Amz-Signature, Azure SAS's sig, ...
_SECRET_OPTION = re.compile(
    r"(pass(word|wd)?|pwd|secret|token|key|sig(nature)?|credentials?|auth(orization)?)$",
    re.IGNORECASE,
)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")


def _readable_http_url(url: str) -> bool:
    """True if aiohttp can fetch the URL at all: yarl parses it and finds a host."""
    try:
        return bool(URL(url).host)
    except ValueError:  # a port that is no number: a `/`, `?` or `#` in a password, unencoded
        return False


def mask_url(url: str) -> str:
    """A configured URL as it may be printed, logged or answered: its userinfo's password
    (the user stays) and every query option named like a credential (`password`,
    `sentinel_password`, `api_key`, `access_token`, `sig`, ...) become `***`. Only for showing:
    what is fetched or connected to is the URL itself."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # Where the userinfo ends: in an http(s) URL, where aiohttp reads it (the authority's last
    # `@`); elsewhere, or if yarl cannot read the URL, at the last `@` of all (the redis
    # factory takes a password whole, `@` and `/` included).
    end = len(rest)
    if scheme.lower() in _HTTP_SCHEMES and _readable_http_url(url):
        end = len(re.split(r"[/?#]", rest, maxsplit=1)[0])  # RFC 3986 §3.2: the authority
    userinfo, at, hosts = rest[:end].rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}{':***' if colon else ''}@{hosts}{rest[end:]}"
    return f"{scheme}://{_QUERY_OPTION.sub(_mask_option, rest)}"


def _mask_option(option: re.Match[str]) -> str:
    sep, name, value = option.groups()
    secret = _SECRET_OPTION.search(unquote(name).strip())
    return f"{sep}{name}={'***' if secret and value else value}"


def mask_urls(text: str) -> str:
    """`text` (a library's error message, say) with every URL in it through `mask_url`."""
    return _URL_IN_TEXT.sub(lambda found: mask_url(found.group()), text)


class ConfigError(StartupError):
    """Every problem found, each as `field.path: reason`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems

    def lines(self) -> list[str]:
        return self.problems


# Kubernetes service links for a Service named idlegate-*: IDLEGATE_SERVICE_HOST,
# IDLEGATE_SERVICE_PORT[_<name>], IDLEGATE_PORT, IDLEGATE_PORT_8080_TCP[_ADDR|_PORT|_PROTO].
_SERVICE_LINK = re.compile(
    r".*_(SERVICE_HOST|SERVICE_PORT(_.*)?|PORT|PORT_\d+_(TCP|UDP|SCTP)(_.*)?)"
)


def env_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """`IDLEGATE_*` variables that configure nothing because their first part is not a config
    section (`IDLEGATE_POLICI__IDLE_TIMEOUT`, `IDLEGATE_STORE_URL`), each with the closest
    correct name. Kubernetes service links are not ours and are left alone."""
    env = os.environ if environ is None else environ
    sections = sorted(Config.model_fields, key=len, reverse=True)
    warnings = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name == "IDLEGATE_CONFIG":
            continue
        rest = name[len(ENV_PREFIX) :]
        first, sep, below = rest.partition("__")
        if first.lower() in Config.model_fields or _SERVICE_LINK.fullmatch(name):
            continue
        suggestion = None
        if not sep:  # one underscore where two were meant: IDLEGATE_STORE_URL
            prefixed = [s for s in sections if rest.lower().startswith(s + "_")]
            if prefixed:
                section = prefixed[0]
                suggestion = f"{ENV_PREFIX}{section.upper()}__{rest[len(section) + 1 :]}"
        if suggestion is None:
            close = difflib.get_close_matches(first.lower(), sections, n=1, cutoff=0.6)
            if close:
                suggestion = f"{ENV_PREFIX}{close[0].upper()}{sep}{below}"
        hint = (
            f"did you mean {suggestion}?"
            if suggestion
            else "sections are " + ", ".join(sorted(sections))
        )
        warnings.append(f"{name}: ignored, {first.lower()!r} is not a config section; {hint}")
    return warnings


_TOO_DEEP = "nested too deeply to read (no config needs more than a few levels)"


def _env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Apply `IDLEGATE_A__B=v` as data["a"]["b"] = yaml(v); list indexes are numbers."""
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == "IDLEGATE_CONFIG":
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if path[0] not in Config.model_fields:
            # Not ours (Kubernetes service links) or misspelled: env_warnings() says which.
            # Unknown keys below a known section are still refused.
            continue
        try:
            value = yaml.safe_load(raw) if raw else raw
        except (yaml.YAMLError, ValueError):  # not YAML (`[x`), or no value (`2020-13-45`)
            value = raw
        except RecursionError:
            raise ConfigError([f"{name}: {_TOO_DEEP}"]) from None
        # `yaml` turns "15m" into a string and "900" into an int, as a file would.
        node: Any = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError([f"{name}: no list item {part}"])
                key: Any = int(part)
            else:
                key = part
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and not isinstance(node.get(key), dict | list):
                    node[key] = {}
                node = node[key]
    return data


_NAMED_PROBLEM = re.compile(r"([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*): (.+)")


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(root)"


def from_data(data: Any, environ: Mapping[str, str] | None = None) -> Config:
    """Validate already-parsed data, environment overrides applied on top."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(root): the config must be a mapping of keys"])
    data = _env_overrides(data, os.environ if environ is None else environ)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            location = _location(error["loc"])
            for line in message.splitlines():
                # A model-level check names the field it is about: `field.path: reason`.
                named = _NAMED_PROBLEM.fullmatch(line)
                if named:
                    prefix = "" if location == "(root)" else location + "."
                    problems.append(f"{prefix}{named.group(1)}: {named.group(2)}")
                else:
                    problems.append(f"{location}: {line}")
        raise ConfigError(problems) from None


class _UniqueKeys(yaml.SafeLoader):
    """YAML as `safe_load` reads it, but a mapping with a key twice is an error: read as the
    last one wins, a leftover second `policy:` block would silently loosen every limit the
    first one set."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` overrides on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)  # `in` takes a set for a frozenset; `add` does not
            except TypeError:  # an unhashable key: construct_mapping says so below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """A scalar YAML resolves but Python cannot build (`2020-13-45`, `!!int x`, an int of
        more than 4300 digits) is a ValueError from deep in PyYAML: a YAML error at its line
        instead, without the value (it may be a secret)."""
        try:
            return super().construct_object(node, deep=deep)
        except ValueError:
            kind = node.tag.rpartition(":")[2] or node.tag
            raise yaml.constructor.ConstructorError(
                None, None, f"not a valid {kind} value", node.start_mark
            ) from None


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 (a SafeLoader: no Python objects)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, as PyYAML says it (never the offending text itself)."""
    if isinstance(exc, yaml.reader.ReaderError):
        return f" character {exc.position + 1}: {exc.reason}"
    mark = getattr(exc, "problem_mark", None)
    where = f" line {mark.line + 1}" if mark else ""
    return f"{where}: {getattr(exc, 'problem', None) or 'invalid YAML'}"


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (or `$IDLEGATE_CONFIG`, then config/gateway.yaml) and validate it."""
    env = os.environ if environ is None else environ
    chosen = Path(path or env.get("IDLEGATE_CONFIG") or DEFAULT_PATH)
    try:
        text = chosen.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{chosen}: cannot read config file ({exc.strerror})"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"{chosen}: not UTF-8 text (byte {exc.start + 1}); save the config file as UTF-8"]
        ) from None
    try:
        data = _yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{chosen}:{_yaml_problem(exc)}"]) from None
    except RecursionError:
        raise ConfigError([f"{chosen}: {_TOO_DEEP}"]) from None
    return from_data(_relative_to(data, chosen.parent), env)


def _relative_to(data: Any, base: Path) -> Any:
    """File paths in a config file are relative to that file, wherever the gateway starts."""
    if not isinstance(data, dict):
        return data

    def resolve(section: Any, key: str) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str):
            path = Path(section[key])
            if not path.is_absolute():
                section[key] = str(base / path)

    resolve(data.get("admin"), "token_file")
    providers = data.get("providers")
    for provider in providers if isinstance(providers, list) else []:
        resolve(provider, "jwks_file")
        resolve(provider, "public_key_file")
    return data
