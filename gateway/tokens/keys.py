"""Verification keys per provider: JWKS (direct or OIDC discovery), JWKS file, PEM, HMAC secret.

Each key carries the exact set of algorithms it may verify (key type, intersected with the
provider's allow-list, narrowed by the JWK's `alg`). `verify.py` refuses a token whose header
`alg` is not in that set, which is what stops key confusion (an RSA public key used as an HMAC
secret, `none`, an EC key asked for RS256). Nothing here takes a URL from a token: `jku`,
`x5u` and `jwk` headers are never looked at; keys come only from the provider's configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError

from gateway import __version__
from gateway.clock import Clock, SystemClock
from gateway.config import Provider, mask_url, mask_urls
from gateway.errors import StartupError
from gateway.metrics import JWKS_KEYS, JWKS_REFRESH

log = logging.getLogger("idlegate.keys")

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 §3.2: key >= hash size
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
MIN_RSA_BITS = 2048

# Refresh timing when the JWKS response says nothing usable about its freshness.
DEFAULT_REFRESH = 300.0
# JWK members that only a private (or symmetric) key has (RFC 7518 §6.2.2, §6.3.2, §6.4; RFC 8037).
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?=,|$)", re.IGNORECASE)
_MAX_FRESHNESS = 1e9  # seconds (30 years): more is as good as forever, and stays finite
_NO_CACHE = re.compile(r"(?:^|,)\s*(?:no-cache|no-store)\s*(?=,|=|$)", re.IGNORECASE)


class KeySourceError(StartupError):
    """A provider's configured key file or secret is missing or unusable (a startup problem).

    `field` is the provider key at fault (`jwks_file`, `public_key_file`, `hmac_secret_env`),
    `detail` what is wrong with it: check-config reports `providers.N.<field>: <detail>`."""

    def __init__(self, provider: str, field: str, detail: str) -> None:
        super().__init__(f"provider {provider}: {field}: {detail}")
        self.provider = provider
        self.field = field
        self.detail = detail


class UnusableKeyError(ValueError):
    """One key cannot be used for verification; the message says why (no key material in it)."""


class PrivateKeyMaterialError(UnusableKeyError):
    """A published key carries its private half: anyone could sign with it, so it is refused."""


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key (or HMAC secret bytes) and the algorithms a token signed with it may use."""

    kid: str | None
    key: Any
    algorithms: frozenset[str]

    def __repr__(self) -> str:
        # Never print the key itself (an HMAC secret is key material).
        return (
            f"VerificationKey(kid={self.kid!r}, type={type(self.key).__name__}, "
            f"algorithms={sorted(self.algorithms)})"
        )


def algorithms_for(key: object) -> frozenset[str]:
    """Every JWS algorithm the key's type can verify; empty for anything else (private keys too)."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = EC_ALGORITHMS.get(key.curve.name)
        return frozenset({alg}) if alg else frozenset()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    if isinstance(key, bytes):
        return frozenset(alg for alg, size in HMAC_MIN_BYTES.items() if len(key) >= size)
    return frozenset()


def _usable(
    kid: str | None, key: object, allowed: Iterable[str], jwk_alg: str | None = None
) -> VerificationKey:
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise UnusableKeyError(f"RSA key of {key.key_size} bits (at least {MIN_RSA_BITS} needed)")
    allowed = sorted(allowed)
    by_type = algorithms_for(key)
    algorithms = by_type & frozenset(allowed)
    if jwk_alg is not None:
        algorithms &= {jwk_alg}
    if not algorithms:
        what = f"alg {jwk_alg}" if jwk_alg is not None else "key type"
        raise UnusableKeyError(
            f"{what} ({type(key).__name__}: {', '.join(sorted(by_type)) or 'nothing'}) "
            f"allows none of the configured algorithms {allowed}"
        )
    return VerificationKey(kid=kid, key=key, algorithms=algorithms)


def key_from_jwk(jwk: object, allowed: Iterable[str]) -> VerificationKey:
    """One signature-verification key from a JWK (RFC 7517); raises `UnusableKeyError`.

    Refused: `use` other than `sig`, `key_ops` without `verify`, symmetric (`oct`) keys, and any
    JWK carrying private members: a key whose private half was published can sign for anyone.
    """
    if not isinstance(jwk, Mapping):
        raise UnusableKeyError("not a JSON object")
    kty = jwk.get("kty")
    # Before the oct check: an oct JWK with its `k` is a published secret, a leak to report.
    if any(member in jwk for member in _PRIVATE_MEMBERS):
        raise PrivateKeyMaterialError(
            "the JWK contains private key material; publish only the public key"
        )
    if kty == "oct":
        raise UnusableKeyError(
            "symmetric (oct) keys are never taken from a JWKS (use hmac_secret_env)"
        )
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise UnusableKeyError("kid is not a string")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise UnusableKeyError(f"use is {use!r}, not 'sig'")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise UnusableKeyError("key_ops does not include 'verify'")
    alg = jwk.get("alg")
    if alg is not None and not isinstance(alg, str):
        raise UnusableKeyError("alg is not a string")
    public = dict(jwk)  # PyJWT's from_jwk wants a dict, not any Mapping
    try:
        if kty == "RSA":
            key: object = RSAAlgorithm.from_jwk(public)
        elif kty == "EC":
            key = ECAlgorithm.from_jwk(public)
        elif kty == "OKP":
            key = OKPAlgorithm.from_jwk(public)
        else:
            raise UnusableKeyError(f"unsupported kty {kty!r}")
    except (InvalidKeyError, ValueError, TypeError) as exc:
        if isinstance(exc, UnusableKeyError):
            raise
        raise UnusableKeyError(f"invalid {kty} key: {exc}") from None
    return _usable(kid, key, allowed, alg)


@dataclass(frozen=True, slots=True)
class CompromisedKey:
    """A JWK published with its private half: anyone may have signed with it since.

    `material` is its public key (SubjectPublicKeyInfo DER) when one could be read from the
    JWK, else None: then only its `kid` names it."""

    kid: str | None
    material: bytes | None


def _public_material(jwk: Mapping[str, Any]) -> bytes | None:
    """The public key of a JWK that also carries private members, or None if it has none."""
    public = {name: value for name, value in jwk.items() if name not in _PRIVATE_MEMBERS}
    try:
        if public.get("kty") == "RSA":
            key: Any = RSAAlgorithm.from_jwk(public)
        elif public.get("kty") == "EC":
            key = ECAlgorithm.from_jwk(public)
        elif public.get("kty") == "OKP":
            key = OKPAlgorithm.from_jwk(public)
        else:
            return None  # oct: its `k` is the secret; never a JWKS key here anyway
        material: bytes = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except Exception:  # any JWK the parser refuses names no public key
        return None
    return material


def keys_from_jwks(
    document: object,
    allowed: Iterable[str],
    *,
    provider: str = "?",
    compromised: list[CompromisedKey] | None = None,
) -> list[VerificationKey]:
    """The usable keys of a JWK Set; unusable members are dropped and logged (debug/warning).

    A member published with its private half is logged at ERROR (provider and kid, never the
    key) and, when `compromised` is given, added to it: the caller stops trusting that key."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise UnusableKeyError("not a JWK Set (a JSON object with a 'keys' list)")
    allowed = list(allowed)
    keys: list[VerificationKey] = []
    seen: set[str | None] = set()
    for index, jwk in enumerate(document["keys"]):
        try:
            key = key_from_jwk(jwk, allowed)
        except PrivateKeyMaterialError:
            assert isinstance(jwk, Mapping)
            kid = jwk.get("kid") if isinstance(jwk.get("kid"), str) else None
            log.error(
                "provider %s: key #%d kid=%r is published WITH its private key material: it "
                "is compromised and verifies no token from now on, whichever key set names "
                "it, until restart (rotate it out at the identity provider)",
                provider,
                index,
                kid,
            )
            if compromised is not None:
                compromised.append(CompromisedKey(kid, _public_material(jwk)))
            continue
        except UnusableKeyError as exc:
            kid = jwk.get("kid") if isinstance(jwk, Mapping) else None
            log.debug("provider %s: key #%d kid=%r dropped: %s", provider, index, kid, exc)
            continue
        if key.kid is not None and key.kid in seen:
            log.warning(
                "provider %s: duplicate kid %r in JWKS; the first one is kept", provider, key.kid
            )
            continue
        seen.add(key.kid)
        keys.append(key)
    return keys


def key_from_pem(data: bytes, allowed: Iterable[str]) -> VerificationKey:
    """A public key from a PEM `PUBLIC KEY` or `CERTIFICATE`; private keys are refused."""
    if b"PRIVATE KEY-----" in data:
        raise UnusableKeyError(
            "holds a private key; configure the public key or certificate instead "
            "(e.g. openssl pkey -in key.pem -pubout)"
        )
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise UnusableKeyError(f"not a PEM public key or certificate ({exc})") from None
    return _usable(None, key, allowed)


def key_from_secret(secret: bytes, allowed: Iterable[str]) -> VerificationKey:
    """An HMAC key for the allowed HS* algorithms the secret is long enough for (RFC 7518 §3.2)."""
    wanted = sorted(alg for alg in allowed if alg in HMAC_MIN_BYTES)
    if not wanted:
        raise UnusableKeyError("no HS256/HS384/HS512 algorithm is allowed for this provider")
    strong = [alg for alg in wanted if len(secret) >= HMAC_MIN_BYTES[alg]]
    if not strong:
        need = min(HMAC_MIN_BYTES[alg] for alg in wanted)
        raise UnusableKeyError(
            f"the secret is {len(secret)} bytes; {', '.join(wanted)} needs at least {need} "
            "bytes (RFC 7518 §3.2)"
        )
    weak = sorted(set(wanted) - set(strong))
    if weak:
        log.warning(
            "hmac secret of %d bytes is too short for %s; only %s accepted",
            len(secret),
            ", ".join(weak),
            ", ".join(strong),
        )
    return VerificationKey(kid=None, key=secret, algorithms=frozenset(strong))


def static_keys(
    provider: Provider, environ: Mapping[str, str] | None = None
) -> tuple[list[VerificationKey], str]:
    """The keys of a provider whose source is a file or a secret (not jwks_uri/discovery), and
    where they came from. Raises `KeySourceError`. `KeyRing.start` and check-config both load
    keys through this, so check-config refuses exactly what serve would refuse."""

    def fail(field: str, detail: str) -> NoReturn:
        raise KeySourceError(provider.name, field, detail)

    def read(path: Path, field: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            fail(field, f"{path}: cannot read ({exc.strerror or exc})")

    if provider.jwks_file is not None:
        path = provider.jwks_file
        data = read(path, "jwks_file")
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            fail("jwks_file", f"{path}: not valid JSON ({exc})")
        try:
            keys = keys_from_jwks(document, provider.algorithms, provider=provider.name)
        except UnusableKeyError as exc:
            fail("jwks_file", f"{path}: {exc}")
        if not keys:
            fail(
                "jwks_file",
                f"{path}: no usable key for algorithms {provider.algorithms} "
                "(set the idlegate.keys logger to debug to see why)",
            )
        return keys, f"jwks_file {path}"
    if provider.public_key_file is not None:
        path = provider.public_key_file
        data = read(path, "public_key_file")
        try:
            return [key_from_pem(data, provider.algorithms)], f"public_key_file {path}"
        except UnusableKeyError as exc:
            fail("public_key_file", f"{path}: {exc}")
    if provider.hmac_secret_env is not None:
        name = provider.hmac_secret_env
        secret = (os.environ if environ is None else environ).get(name)
        if not secret:
            fail("hmac_secret_env", f"environment variable {name} is not set")
        try:
            return [
                key_from_secret(secret.encode(), provider.algorithms)
            ], f"hmac_secret_env {name}"
        except UnusableKeyError as exc:
            fail("hmac_secret_env", f"{name}: {exc}")
    raise ValueError(f"provider {provider.name}: its keys are remote (jwks_uri or discovery)")


def freshness(cache_control: str | None, age: str | None = None) -> float | None:
    """Seconds a response stays fresh per `Cache-Control` max-age minus `Age`; None if unstated."""
    if cache_control is None:
        return None
    if _NO_CACHE.search(cache_control):
        return 0.0
    match = _MAX_AGE.search(cache_control)
    if match is None:
        return None
    # Capped: 400 digits would be float("inf"), and inf - inf a NaN refresh time (never due).
    lifetime = min(float(match.group(1)), _MAX_FRESHNESS)
    if age is not None and age.strip().isdigit():
        lifetime -= min(float(age.strip()), _MAX_FRESHNESS)
    return max(lifetime, 0.0)


def _issuer_matches(named: object, issuer: str) -> bool:
    """A discovery document's issuer against the configured one: equal, or Entra's
    `{tenantid}` template with one path segment standing for it."""
    if not isinstance(named, str):
        return False
    if "{tenantid}" not in named:
        return named == issuer
    pattern = re.escape(named).replace(re.escape("{tenantid}"), "[^/{}]+")
    return re.fullmatch(pattern, issuer) is not None


def _utc(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def refresh_delay(fresh_for: float | None, minimum: float, maximum: float) -> float:
    """When to refetch: a little before the key set goes stale, within [minimum, maximum]."""
    lifetime = DEFAULT_REFRESH if fresh_for is None else fresh_for
    lifetime = min(max(lifetime, minimum), maximum)
    # 80-90 % of the lifetime: early enough to beat staleness, spread so replicas do not align.
    early = lifetime * random.uniform(0.8, 0.9)  # noqa: S311 - jitter, not a secret
    return max(early, minimum)


class _FetchError(Exception):
    pass


# A JWK Set's usable keys, how long its response said they stay fresh (None: unstated), and
# the members it published with their private half.
_KeySet = tuple[list[VerificationKey], float | None, list[CompromisedKey]]


def _retrieve(task: asyncio.Task[_KeySet]) -> None:
    """Mark a key set fetch's failure seen: every source that awaited it may have timed out."""
    if not task.cancelled():
        task.exception()


def _fingerprint(key: VerificationKey) -> tuple[str | None, frozenset[str], bytes]:
    """What makes two keys one: kid, algorithms and the public key's bytes."""
    if isinstance(key.key, bytes):
        return key.kid, key.algorithms, key.key
    material = key.key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key.kid, key.algorithms, material


def _material(key: VerificationKey) -> bytes:
    """The key itself, whatever its kid: what a leak of its private half compromises."""
    return _fingerprint(key)[2]


@dataclass(eq=False, slots=True)
class _KeySource:
    """One place a provider's keys come from: its configured jwks_uri, or one listed issuer's
    discovery. It keeps its last good keys, so its outage costs no other source its keys or its
    rotations."""

    issuer: str | None  # discovered from this issuer; None: the configured jwks_uri
    jwks_uri: str | None  # None until discovered (again)
    keys: list[VerificationKey] = field(default_factory=list)
    problem: str | None = None  # why its last attempt failed; None after a success
    failures: int = 0  # attempts failed in a row: the retry backoff's exponent
    fetched_at: float | None = None  # clock time of its last JWK Set answered (None: never)
    due: float = 0.0  # event-loop time of its next background refresh
    inflight: asyncio.Task[None] | None = None  # its fetch now: never more than one


class KeyRing:
    """The verification keys of one provider, kept fresh; `lookup` is the request fast path.

    A ring whose only key has no kid (public_key_file, hmac_secret_env, a kid-less single-key
    JWKS) returns that key for any token kid: there is no kid to compare with. Remote keys come
    from one source per listed issuer (discovery) or from the jwks_uri; each is fetched on its
    own, and the ring holds the union of every source's last good keys (a kid two sources
    publish is the first source's), the key sets answered replacing them whole (docs/keys.md).
    """

    def __init__(
        self,
        provider: Provider,
        http: aiohttp.ClientSession | None,
        environ: Mapping[str, str] | None = None,
        *,
        clock: Clock | None = None,
        miss_refetch_interval: float | None = None,  # None: the provider's jwks_miss_refetch
        backoff_base: float = 1.0,
        backoff_cap: float = 30.0,
        fetch_timeout: float = 5.0,
        max_document_bytes: int = 1024 * 1024,
    ) -> None:
        self.provider = provider
        self.miss_refetch_interval = (
            provider.jwks_miss_refetch if miss_refetch_interval is None else miss_refetch_interval
        )
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.fetch_timeout = fetch_timeout
        self.max_document_bytes = max_document_bytes
        self._http = http
        self._owns_http = False
        self._environ = environ
        self._clock: Clock = clock or SystemClock()
        self._keys: list[VerificationKey] = []
        self._by_kid: dict[str, VerificationKey] = {}
        self._single: VerificationKey | None = None
        self._count = 0
        # Bumped whenever the key set changes: what `lookup` answers changes only with it.
        self.generation = 0
        self._sources: list[_KeySource] = []
        if provider.jwks_uri is not None:
            self._sources = [_KeySource(issuer=None, jwks_uri=provider.jwks_uri)]
        elif provider.discovery:
            issuers = dict.fromkeys(provider.issuers)
            self._sources = [_KeySource(issuer=issuer, jwks_uri=None) for issuer in issuers]
        self._rescheduled = asyncio.Event()  # a source's fetch ended: its next one moved
        self._runner: asyncio.Task[None] | None = None
        self._last_miss_refetch: float | None = None
        self._closed = False
        # Keys seen published with their private half: never trusted again by this process,
        # even when a later key set publishes them without it (the leak cannot be undone).
        self._compromised: set[bytes] = set()
        self._compromised_kids: set[str] = set()  # leaked keys no public key could be read from
        self.last_success: float | None = None
        # Why keys are missing or stale, for /readyz and check-config: every URL in it is
        # through mask_url (that endpoint needs no token).
        self.last_error: str | None = None

    @property
    def remote(self) -> bool:
        return self.provider.jwks_uri is not None or self.provider.discovery

    @property
    def ready(self) -> bool:
        """True while the ring holds at least one usable key. A fetch that fails keeps the
        keys held; a JWK Set answered with no usable key (empty, only `enc` keys, only leaked
        ones, ...) withdraws them, and the ring is not ready until one is published.

        With several issuers that is while any of them has keys: the tenants that answer are
        served while `last_error` names each one that does not."""
        return self._count > 0

    @property
    def key_count(self) -> int:
        return self._count

    def lookup(self, kid: str | None) -> VerificationKey | None:
        """The key for a token's `kid` header, without I/O."""
        single = self._single
        if single is not None and (kid is None or single.kid is None or single.kid == kid):
            return single
        if kid is None:
            return None
        return self._by_kid.get(kid)

    def issuers_key(
        self, key: VerificationKey, issuer: str, kid: str | None
    ) -> VerificationKey | None:
        """`key` (what `lookup` found) if `issuer`'s own key set holds it, else the key of that
        kid in `issuer`'s key set, if any. With one issuer per provider, or a configured
        jwks_uri (every issuer of the provider trusts it), `key` itself. With discovery for
        several issuers each token is verified with its own issuer's keys only: a tenant's
        custom signing key (Entra lets an app have one) must not sign another tenant's tokens."""
        sources = self._sources
        if len(sources) < 2 or sources[0].issuer is None:
            return key
        for source in sources:
            if source.issuer == issuer:
                if any(held is key for held in source.keys):
                    return key
                return next((held for held in source.keys if kid is None or held.kid == kid), None)
        return None

    async def lookup_or_refresh(self, kid: str | None) -> VerificationKey | None:
        """`lookup`, and on a miss refetch every key source (rotation) at most once per
        `miss_refetch_interval`.

        Concurrent misses wait for one shared fetch; a source's fetch already running (first
        load, background refresh) is joined instead of starting another. A wait ends as soon
        as the kid is installed: a hanging source does not delay a key another one published.
        """
        found = self.lookup(kid)
        if found is not None or not self.remote or self._closed:
            return found
        fetches = [source.inflight for source in self._sources if source.inflight is not None]
        if len(fetches) < len(self._sources):
            now = self._clock.now()
            last = self._last_miss_refetch
            if last is None or not 0 <= now - last < self.miss_refetch_interval:
                self._last_miss_refetch = now
                fetches = self._fetch(self._sources)
        return await self._await_fetches(fetches, kid)

    async def start(self) -> None:
        """Load file/env keys (raising `KeySourceError`), or make the first remote fetch.

        A remote failure does not raise: the ring stays not ready and keeps retrying in the
        background. Returns after the first attempt (bounded by `fetch_timeout`).
        """
        provider = self.provider
        if not self.remote:
            try:
                keys, source = await asyncio.to_thread(static_keys, provider, self._environ)
            except KeySourceError as exc:
                JWKS_REFRESH.labels(provider=provider.name, result="error").inc()
                self.last_error = f"{exc.field}: {exc.detail}"
                raise
            JWKS_REFRESH.labels(provider=provider.name, result="ok").inc()
            self.last_success = self._clock.now()
            self._install(keys, source=source)
        else:
            if self._http is None:
                self._http = aiohttp.ClientSession()
                self._owns_http = True
            await asyncio.wait(self._fetch(self._sources))  # never cancelled with start
            self._runner = asyncio.get_running_loop().create_task(
                self._refresh_loop(), name=f"idlegate-keys-{provider.name}"
            )

    async def close(self) -> None:
        """Stop background refreshes; the keys held stay usable for `lookup`."""
        self._closed = True
        for task in (self._runner, *(source.inflight for source in self._sources)):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._runner = None
        if self._owns_http and self._http is not None:
            await self._http.close()
            self._http = None

    # -- remote source ------------------------------------------------------------------------

    def _install(self, keys: list[VerificationKey], *, source: str) -> None:
        """Replace the key set in one step (lookups see the old set or the new one, never a mix).
        `generation` moves only when the set does: a decision kept for a key still in place
        stays valid; one for a retired or changed key does not."""
        JWKS_KEYS.labels(provider=self.provider.name).set(len(keys))
        old = self._keys
        if len(keys) == len(old) and {id(key) for key in keys} == {id(key) for key in old}:
            log.debug(
                "provider %s: %d keys from %s, unchanged", self.provider.name, len(keys), source
            )
            return
        before = set(self._by_kid)
        had = self._count
        self._keys = keys
        self._by_kid = {key.kid: key for key in keys if key.kid is not None}
        self._single = keys[0] if len(keys) == 1 else None
        self._count = len(keys)
        self.generation += 1
        after = set(self._by_kid)
        level = logging.INFO if (after != before or had != len(keys)) else logging.DEBUG
        log.log(
            level,
            "provider %s: %d keys from %s (added kids %s, removed %s)",
            self.provider.name,
            len(keys),
            source,
            sorted(after - before),
            sorted(before - after),
        )

    async def _await_fetches(
        self, fetches: list[asyncio.Task[None]], kid: str | None
    ) -> VerificationKey | None:
        """`lookup(kid)` once the fetches are done, or as soon as one of them brought the kid."""
        while True:
            found = self.lookup(kid)
            pending = [task for task in fetches if not task.done()]
            if found is not None or not pending:
                return found
            # asyncio.wait never cancels the fetches, even if this request is cancelled.
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)

    def _fetch(self, sources: list[_KeySource]) -> list[asyncio.Task[None]]:
        """The fetch of each source: the one running, or a new one. The new ones run
        concurrently, each within `fetch_timeout`, each installed as it answers; a key set
        several of them name is fetched once."""
        loop = asyncio.get_running_loop()
        key_sets: dict[str, asyncio.Task[_KeySet]] = {}
        delays: dict[str, float] = {}  # one jitter per key set: sources sharing it stay aligned
        started = []
        for source in sources:
            if source.inflight is None:
                task = loop.create_task(self._refresh(source, key_sets, delays))
                task.add_done_callback(functools.partial(self._refreshed, source))
                source.inflight = task
                started.append(task)
        if started:

            def forget(_: object) -> None:
                # A key set every waiter gave up on (its deadline passed) is fetched no longer.
                for key_set in key_sets.values():
                    key_set.cancel()

            asyncio.gather(*started, return_exceptions=True).add_done_callback(forget)
        return [source.inflight for source in sources if source.inflight is not None]

    def _refreshed(self, source: _KeySource, task: asyncio.Task[None]) -> None:
        if source.inflight is task:
            source.inflight = None
        self._rescheduled.set()

    async def _refresh(
        self,
        source: _KeySource,
        key_sets: dict[str, asyncio.Task[_KeySet]],
        delays: dict[str, float],
    ) -> None:
        """(Discovery,) JWKS, parse, install, for one source. A failure keeps its keys."""
        try:
            async with asyncio.timeout(self.fetch_timeout):
                if source.jwks_uri is None:
                    assert source.issuer is not None
                    source.jwks_uri = await self._discover(source.issuer)
                jwks_uri = source.jwks_uri
                task = key_sets.get(jwks_uri)
                if task is None:
                    task = asyncio.get_running_loop().create_task(self._fetch_key_set(jwks_uri))
                    task.add_done_callback(_retrieve)
                    key_sets[jwks_uri] = task
                try:
                    # Shielded: this source's deadline must not cancel another's wait for it.
                    keys, fresh_for, compromised = await asyncio.shield(task)
                except (_FetchError, UnusableKeyError, aiohttp.ClientError, OSError):
                    if source.issuer is not None:
                        source.jwks_uri = None  # discover again next time: jwks_uri may move
                    raise
        except (_FetchError, UnusableKeyError) as exc:
            problem = str(exc)
        except TimeoutError:  # before OSError, its base class
            problem = f"no complete answer within {self.fetch_timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            # InvalidURL and ClientResponseError name the URL, credentials and all.
            problem = f"{type(exc).__name__}: {mask_urls(str(exc))}"
        except Exception as exc:  # a bug must not kill the ring; count it like any failure
            log.exception("provider %s: unexpected error fetching keys", self.provider.name)
            problem = f"unexpected {type(exc).__name__}"
        else:
            provider = self.provider
            if jwks_uri not in delays:
                minimum, maximum = provider.jwks_min_refresh, provider.jwks_max_refresh
                delays[jwks_uri] = refresh_delay(fresh_for, minimum, maximum)
            self._succeeded(source, keys, compromised, delays[jwks_uri])
            return
        self._failed(source, problem)

    def _distrust(self, compromised: list[CompromisedKey]) -> None:
        """Stop trusting leaked keys at once, in every source (another tenant may publish the
        same key without its private half), for as long as this process runs."""
        for leaked in compromised:
            if leaked.material is not None:
                self._compromised.add(leaked.material)
            elif leaked.kid is not None:
                self._compromised_kids.add(leaked.kid)
        for source in self._sources:
            source.keys = [key for key in source.keys if self._trusted(key)]

    def _trusted(self, key: VerificationKey) -> bool:
        if key.kid is not None and key.kid in self._compromised_kids:
            return False
        return not self._compromised or _material(key) not in self._compromised

    def _succeeded(
        self,
        source: _KeySource,
        keys: list[VerificationKey],
        compromised: list[CompromisedKey],
        delay: float,
    ) -> None:
        """A JWK Set answered: it is authoritative. What it no longer publishes as a usable
        key stops verifying now, even when that leaves the source with no key at all."""
        previous = source.keys
        if compromised:
            self._distrust(compromised)
        # The objects already held stand for the same keys: lookups, and so the decisions kept
        # for them, see no change when a refetch brings nothing new.
        held = {_fingerprint(key): key for other in self._sources for key in other.keys}
        fresh = [held.get(_fingerprint(key), key) for key in keys if self._trusted(key)]
        kept = {id(key) for key in fresh}
        dropped = {id(key) for key in previous if id(key) not in kept}
        source.keys = fresh
        if dropped:
            # A key this source withdrew but another still publishes is held there as a new
            # object: a decision kept for it (`lookup(kid) is token.key`) was this source's
            # tenant's, maybe, and must be made again, with that tenant's own keys.
            for other in self._sources:
                if other is not source and any(id(key) in dropped for key in other.keys):
                    other.keys = [
                        dataclasses.replace(key) if id(key) in dropped else key
                        for key in other.keys
                    ]
        source.fetched_at = self.last_success = self._clock.now()
        loop = asyncio.get_running_loop()
        provider = self.provider
        at = f"JWKS at {mask_url(str(source.jwks_uri))}"
        if fresh:
            source.problem = None
            source.failures = 0
            source.due = loop.time() + delay
            JWKS_REFRESH.labels(provider=provider.name, result="ok").inc()
        else:
            # Fail closed: withdrawn means withdrawn. Retried like a failure, so that keys
            # published again (a botched rotation fixed) are taken within seconds.
            source.problem = (
                f"{at} publishes no usable key for algorithms {provider.algorithms}"
                + (f" ({len(compromised)} published with its private half)" if compromised else "")
            )
            backoff = self.backoff_base * 2 ** min(source.failures, 32)
            source.due = loop.time() + min(self.backoff_cap, backoff, delay)
            source.failures += 1
            JWKS_REFRESH.labels(provider=provider.name, result="error").inc()
            whose = "" if source.issuer is None else f"issuer {mask_url(source.issuer)}: "
            log.log(
                logging.ERROR if dropped else logging.WARNING,
                "provider %s: %s%s: %d keys held from it withdrawn, none left",
                provider.name,
                whose,
                source.problem,
                len(dropped),
            )
        self._install(self._union(), source=mask_url(str(source.jwks_uri)))
        self._report()
        if not fresh and source.issuer is not None:
            source.jwks_uri = None  # discover again next time: jwks_uri may have moved

    def _failed(self, source: _KeySource, problem: str) -> None:
        source.problem = problem
        # The exponent is capped: 2**1024 is no float, and a long outage must not end the loop.
        backoff = self.backoff_base * 2 ** min(source.failures, 32)
        source.due = asyncio.get_running_loop().time() + min(self.backoff_cap, backoff)
        source.failures += 1
        JWKS_REFRESH.labels(provider=self.provider.name, result="error").inc()
        self._report()
        if len(self._sources) == 1:
            log.warning(
                "provider %s: key refresh failed: %s (holding %d keys)",
                self.provider.name,
                problem,
                self._count,
            )
        else:
            log.warning(
                "provider %s: key refresh failed: issuer %s: %s (holding %d of its keys, "
                "%d in all)",
                self.provider.name,
                mask_url(str(source.issuer)),
                problem,
                len(source.keys),
                self._count,
            )

    def _union(self) -> list[VerificationKey]:
        named: dict[str, VerificationKey] = {}
        unnamed: list[VerificationKey] = []
        for source in self._sources:
            for key in source.keys:
                if key.kid is not None:
                    named.setdefault(key.kid, key)
                elif all(key is not other for other in unnamed):  # one key set, two sources
                    unnamed.append(key)
        return [*named.values(), *unnamed]

    def _describe(self, source: _KeySource) -> str:
        """A source's problem, named by its issuer when the provider has several, and when the
        keys held through it were fetched (they are kept through failures with no age limit)."""
        since = ""
        if source.keys and source.fetched_at is not None:
            since = f", last fetched {_utc(source.fetched_at)}"
        if len(self._sources) == 1:
            if source.keys:
                return f"{source.problem} (holding {len(source.keys)} keys{since})"
            return str(source.problem)
        if source.keys:
            held = f"{len(source.keys)} of its keys kept{since}"
        else:
            held = "none of its keys yet" if source.fetched_at is None else "no key of it held"
        return f"issuer {mask_url(str(source.issuer))}: {source.problem} ({held})"

    def _report(self) -> None:
        failing = [source for source in self._sources if source.problem is not None]
        self.last_error = "; ".join(self._describe(source) for source in failing) or None

    async def _fetch_key_set(self, jwks_uri: str) -> _KeySet:
        """A key set's usable keys (maybe none: that is an answer, not a failure) and its
        leaked ones. A document that is no JWK Set raises `UnusableKeyError`."""
        document, fresh_for = await self._get_json(jwks_uri, "JWKS")
        compromised: list[CompromisedKey] = []
        found = keys_from_jwks(
            document, self.provider.algorithms, provider=self.provider.name, compromised=compromised
        )
        return found, fresh_for, compromised

    async def _discover(self, issuer: str) -> str:
        """OIDC Discovery 1.0 §4: the issuer's configuration names the JWKS; issuer must match.

        Entra ID's documents may name a tenant-templated issuer
        (`https://login.microsoftonline.com/{tenantid}/v2.0`): accepted when the configured
        issuer is that template with one tenant filled in."""
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        document, _ = await self._get_json(url, "discovery document")
        at = f"discovery document at {mask_url(url)}"
        if not isinstance(document, Mapping):
            raise _FetchError(f"{at} is not a JSON object")
        named = document.get("issuer")
        if not _issuer_matches(named, issuer):
            # §4.3: a mismatch means the document is not this issuer's (or is forged).
            shown = mask_url(named) if isinstance(named, str) else named
            raise _FetchError(f"{at} names issuer {shown!r}, not {mask_url(issuer)!r}")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise _FetchError(f"{at} has no http(s) jwks_uri")
        if issuer.startswith("https://") and not jwks_uri.startswith("https://"):
            raise _FetchError(f"{at}: jwks_uri is not https")
        if self.provider.refuses_key_url(jwks_uri):
            # As at load for a configured one: keys over plain http from another host are
            # anyone's on the way, whatever the (loopback) issuer.
            raise _FetchError(
                f"{at}: jwks_uri {mask_url(jwks_uri)} is plain http to a host that is not "
                "loopback (allow_insecure_http: true only for an IdP on a trusted network)"
            )
        return jwks_uri

    async def _get_json(self, url: str, what: str) -> tuple[Any, float | None]:
        assert self._http is not None
        headers = {"Accept": "application/json", "User-Agent": f"idlegate/{__version__}"}
        at = f"{what} at {mask_url(url)}"  # the messages' way of naming it; `url` is fetched
        too_large = f"{at} is larger than {self.max_document_bytes} bytes"
        # No redirects: the key set must come from the configured (or discovered) URL itself.
        try:
            async with self._http.get(url, headers=headers, allow_redirects=False) as response:
                if response.status != 200:
                    raise _FetchError(f"{at} answered HTTP {response.status}")
                length = response.content_length
                if length is not None and length > self.max_document_bytes:
                    raise _FetchError(too_large)
                body = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > self.max_document_bytes:
                        raise _FetchError(too_large)
                cache_control = ",".join(response.headers.getall("Cache-Control", [])) or None
                fresh_for = freshness(cache_control, response.headers.get("Age"))
        except UnicodeError:
            # The IDNA codec's, for a host no DNS name spells (`a..b`, a label over 63
            # characters): a discovery document may name one; aiohttp does not wrap it.
            raise _FetchError(f"{at}: its host is not a valid DNS name") from None
        try:
            return json.loads(bytes(body)), fresh_for
        except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
            raise _FetchError(f"{at} is not valid JSON") from None

    async def _refresh_loop(self) -> None:
        """Refetch each source a little before its keys go stale, a failed one with exponential
        backoff; an idle source sharing a due source's key set comes along (one fetch of it)."""
        loop = asyncio.get_running_loop()
        while True:
            self._rescheduled.clear()
            now = loop.time()
            idle = [source for source in self._sources if source.inflight is None]
            due = [source for source in idle if source.due <= now]
            if due:
                shared = {source.jwks_uri for source in due if source.jwks_uri is not None}
                due += [s for s in idle if s not in due and s.jwks_uri in shared]
                self._fetch(due)
                continue
            delay = min((source.due for source in idle), default=None)
            if delay is not None:
                delay -= now
                log.debug("provider %s: next key refresh in %.2fs", self.provider.name, delay)
            # Until the next source is due, or a fetch (an unknown kid's, too) ends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._rescheduled.wait()
