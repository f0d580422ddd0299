"""Signature and claim verification (RFC 7519, RFC 8725, RFC 9068), with a bounded cache.

The issuer picks the provider; the provider's allow-list and the key's own type bound the
algorithm; `kid` is looked up only among that provider's keys. `jku`, `x5u` and `jwk` headers
are never used. Time-dependent checks run on every request, cache hit or not.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import Algorithm, get_default_algorithms
from multidict import istr

from gateway.bounded import BoundedCache
from gateway.clock import Clock
from gateway.config import Config, Provider, mask_url
from gateway.logs import RateLimitedLog, quoted
from gateway.reasons import Reason, Refusal
from gateway.store.base import KeyHasher
from gateway.tokens.claims import Identity, VerifiedToken
from gateway.tokens.extract import canonical
from gateway.tokens.keys import KeyRing, VerificationKey

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
# C0 and C1 controls (NEL, U+0085, among them) and the Unicode line and paragraph separators:
# an upstream that decodes a header value as Latin-1 or splits it with `str.splitlines()`
# would break a line at any of them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ALGORITHMS: dict[str, Algorithm] = get_default_algorithms()
log = logging.getLogger("idlegate.tokens")
# How often (per process) a refusal for an untrusted issuer or a foreign audience may log the
# values it saw: anyone can send such tokens, a misconfiguration sends nothing else.
DIAGNOSTIC_INTERVAL = 10.0
# Characters of the keys (tokens, Authorization values) the verification cache may hold:
# with the entry count, what bounds its memory (32 Mi: some 64 MiB with what they map to).
CACHED_CHARS = 32 * 1024 * 1024


_B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# The bits an unpadded segment's last character holds past its data, by the length mod 4:
# zero in the one encoding of those bytes (RFC 4648 §3.5). Decoders ignore them, so with any
# set the text is another spelling of the same bytes: another token, to whatever keys by text.
_SPARE_BITS = {2: 0b1111, 3: 0b11}


def _b64decode(part: str) -> bytes:
    """base64url without padding, in its canonical spelling only."""
    spare = _SPARE_BITS.get(len(part) % 4)
    if not _B64URL.fullmatch(part) or (
        spare is not None and _B64URL_ALPHABET.index(part[-1]) & spare
    ):
        raise Refusal(Reason.MALFORMED_TOKEN, "the token is not canonical base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise Refusal(Reason.MALFORMED_TOKEN, "the token is not base64url") from None


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# The group order n of each JWS ECDSA curve (RFC 7518 §3.4; RFC 8812 for ES256K): with
# (r, s) valid, so is (r, n - s), the same signature to every verifier but another text.
_P256 = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_P384 = int(
    "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
    16,
)
_P521 = int(
    "01" + "F" * 65 + "A51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409", 16
)
_SECP256K1 = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_EC_ORDERS = {"ES256": _P256, "ES384": _P384, "ES512": _P521, "ES521": _P521, "ES256K": _SECP256K1}


def signature_id_text(alg: object, text: str, signature: bytes) -> str:
    """The signature's text as the `digest` id hashes it: one text per signature value. An
    ECDSA signature counts as its low-s form (s <= n/2), so that (r, s) and its twin (r, n - s)
    are one token: a revocation of either is one of both. Every other JWS algorithm has one
    valid encoding per value (RSA and EdDSA verifiers refuse s >= n, HMAC is a function; a
    signature's length is checked against its key first, `signature_length`)."""
    order = _EC_ORDERS.get(alg) if isinstance(alg, str) else None
    if order is None or len(signature) % 2:
        return text
    half = len(signature) // 2
    s = int.from_bytes(signature[half:], "big")
    if s <= order // 2 or s >= order:
        return text
    return _b64encode(signature[:half] + (order - s).to_bytes(half, "big"))


def signature_length(key: object) -> int | None:
    """The one length a signature by `key` may have, where the key fixes it: RSA (RS*, PS*)
    the modulus's (RFC 8017 §8.1.2 and §8.2.2 step 1: a signature of another length is
    invalid); ECDSA twice the curve's. OpenSSL's RSA-PSS check accepts a signature with its
    leading zero bytes left out, so without this one PS* token would have several texts, each
    its own `digest` id: its own revocation and activity. None: nothing to check here."""
    if isinstance(key, rsa.RSAPublicKey):
        return (key.key_size + 7) // 8
    if isinstance(key, ec.EllipticCurvePublicKey):
        return 2 * ((key.curve.key_size + 7) // 8)
    return None


def no_duplicate_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads's object_pairs_hook for what the gateway decides on (token segments, admin
    bodies): `{"jti": "a", "jti": "b"}` is refused, not read as whichever member came last
    (what reviewed or logged the text saw one value, we would act on another)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member")
    return result


def no_constant(name: str) -> Any:
    """json.loads's parse_constant: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise ValueError("a number out of range is not JSON")
    return value


# A `\uD800`-`\uDFFF` escape: paired, json makes one character of two; alone, a string no
# UTF-8 can carry (aiohttp's header writer drops it: `"\ud800admin"` would go up as `admin`).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def strict_json(data: bytes) -> Any:
    """RFC 8259 JSON, and only text that is Unicode: Python's json would accept NaN, Infinity
    and -Infinity (and turn 1e400 into inf), and every comparison with NaN is false (a
    lifetime cap, an idle check, a revocation by sub would each let such a token through); a
    duplicate member would be read as whichever came last; a lone surrogate escape would give
    a string that cannot be sent on. ValueError otherwise, also for nesting too deep for the
    parser (a JSON bomb is a bad request, not a 500)."""
    try:
        value = json.loads(
            data,
            object_pairs_hook=no_duplicate_members,
            parse_constant=no_constant,
            parse_float=_finite_float,
        )
        if b"\\" in data and _SURROGATE_ESCAPE.search(data):  # rare: then each string
            json.dumps(value, ensure_ascii=False).encode("utf-8")  # surrogates raise here
    except (ValueError, RecursionError):  # UnicodeDecodeError and -EncodeError are ValueErrors
        raise ValueError("not JSON") from None
    return value


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = strict_json(data)
    except ValueError:
        raise Refusal(Reason.MALFORMED_TOKEN, f"the token's {what} is not JSON") from None
    if not isinstance(value, dict):
        raise Refusal(Reason.MALFORMED_TOKEN, f"the token's {what} is not a JSON object")
    return value


# The latest NumericDate accepted: 9999-12-31T23:59:59Z. Anything later (or before 1970) is
# no date an issuer means, and a bound keeps every sum and comparison on it exact.
MAX_NUMERIC_DATE = 253_402_300_799


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim (RFC 7519 §2) as seconds, or None when absent. Refused as
    `malformed_token` unless a finite JSON number in [0, MAX_NUMERIC_DATE]."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Refusal(Reason.MALFORMED_TOKEN, f"the {name} claim is not a number")
    # Compared before float(): a 400-digit int would raise OverflowError there.
    if not 0 <= value <= MAX_NUMERIC_DATE:  # also False for NaN, should one get this far
        raise Refusal(
            Reason.MALFORMED_TOKEN, f"the {name} claim is not a date between 1970 and 9999"
        )
    return float(value)


def _string(claims: Mapping[str, Any], name: str) -> str | None:
    """An id claim (jti, sub, sid, ...): a string, without control characters (it is logged,
    revoked by and matched on; a line break in one would forge a log line)."""
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Refusal(Reason.MALFORMED_TOKEN, f"the {name} claim is not a string")
    if _CONTROL.search(value):
        raise Refusal(Reason.MALFORMED_TOKEN, f"the {name} claim holds a control character")
    return value


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The claim named `path`, or else the value at its dotted path (`realm_access.roles`).
    The exact name wins: Auth0's namespaced claims (`https://example.com/roles`) hold dots."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _words(value: object) -> set[str]:
    """A space-separated string or a list of strings as a set; anything else is empty.
    Separated by the space only (RFC 6749 §3.3): `str.split()` would also split at U+3000,
    NBSP or a tab, and make `"group:x\u3000admin"` grant `admin`."""
    if isinstance(value, str):
        return {word for word in value.split(" ") if word}
    if isinstance(value, list):
        return {item for item in value if isinstance(item, str)}
    return set()


# Where IdPs put granted scopes: scope (RFC 8693 §4.2, RFC 9068; Auth0, Keycloak, Okta as a
# string), scp (Entra ID as a string, Okta as a list), permissions (Auth0 RBAC, a list).
_SCOPE_CLAIMS = ("scope", "scp", "permissions")


def granted_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    found: set[str] = set()
    for name in _SCOPE_CLAIMS:
        found |= _words(claims.get(name))
    return frozenset(found)


# What separates the items of a list claim in its header (a space; anything `str.split`
# splits on), or to upstreams that split lists the HTTP way (a comma); and `%`, which
# percent-encodes them there.
_SEPARATOR = re.compile(r"[\s,%]")


def _escaped(match: re.Match[str]) -> str:
    return quote(match.group(), safe="")


def _list_text(items: list[Any]) -> str | None:
    """A list claim as header text, its items space-separated, each with its separators
    percent-encoded (`["viewer", "team admin"]` is `viewer team%20admin`: joined as it is,
    it would read as the role `admin`); None when an item has no text (an object, a list)."""
    texts: list[str] = []
    for item in items:
        if isinstance(item, dict | list):
            return None
        text = ("true" if item else "false") if isinstance(item, bool) else str(item)
        texts.append(_SEPARATOR.sub(_escaped, text))
    return " ".join(texts)


def identity_headers(
    claims: Mapping[str, Any],
    wanted: Mapping[str, str],
    token_id: str | None = None,
    words: frozenset[str] = frozenset(_SCOPE_CLAIMS),
) -> Identity:
    """Header -> claim value (a name or dotted path) as text; lists space-joined. A claim
    holding a control character, starting or ending with a space, or empty, is left out: a
    claim can never smuggle a header line, nor reach the upstream as another value (`sub: ""`
    is no subject, as it is none to log, revoke or track by).
    `jti` is the id the token is tracked by, `token_id` (policy.token_id: the `jti`, else
    `uti`, `digest:…`), and nothing without one: what the upstream is told is the id the
    access log shows and the admin API revokes, also for IdPs that mint no `jti` or an empty
    one (which `token_id` skips). A string claim
    in `words` (scopes, the roles claim: read as space-separated words) goes as those words,
    each escaped as a list item is: the upstream reads the words the gateway decided on."""
    headers: dict[str, str] = {}
    for header, claim in wanted.items():
        value = claim_at(claims, claim)
        if claim == "scope" and value is None:
            value = claims.get("scp")
        elif claim == "jti":
            value = token_id
        if value is None or isinstance(value, dict):
            continue
        if isinstance(value, list):
            joined = _list_text(value)
            if joined is None:
                continue
            text = joined
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str) and claim in words:
            text = _list_text([word for word in value.split(" ") if word]) or ""
        else:
            text = str(value)
        # A control character could smuggle a header line; a leading or trailing space is
        # taken off by the upstream's parser (RFC 9110 §5.5), so " admin " would be read as
        # the identity "admin" that the gateway did not decide on (nor revoke).
        if text and not _CONTROL.search(text) and text == text.strip(" "):
            headers[header] = text
    return Identity(headers)


def digest_id(hasher: KeyHasher, signature: str) -> str:
    """The `digest` token id: a keyed hash of the token's signature (its base64url text), which
    no other token shares. Keyed, so the id neither reveals nor lets anyone rebuild the token."""
    return "digest:" + hasher("digest", signature)


def token_id(
    claims: Mapping[str, Any], signature: str, names: list[str], hasher: KeyHasher
) -> tuple[str | None, str | None]:
    """(claim name, id) for the first of `names` the token carries (policy.token_id)."""
    for name in names:
        if name == "digest":
            return name, digest_id(hasher, signature)
        value = _string(claims, name)
        if value:
            return name, value
    return None, None


def unverified_id(token: str, names: list[str], hasher: KeyHasher) -> tuple[str, str]:
    """(iss, token id) of a token as the verifier would find them, without checking its
    signature: for the admin API's revocation by the token itself (an authorised operator
    revoking can only refuse more). Raises Refusal when the token cannot be read."""
    parts = token.split(".")
    if len(parts) != 3:
        raise Refusal(Reason.MALFORMED_TOKEN, "the token is not a JWS compact JWT")
    header = _json_object(_b64decode(parts[0]), "header")
    claims = _json_object(_b64decode(parts[1]), "payload")
    issuer = claims.get("iss")
    signature = signature_id_text(header.get("alg"), parts[2], _b64decode(parts[2]))
    _, found = token_id(claims, signature, names, hasher)
    if not isinstance(issuer, str) or found is None:
        raise Refusal(Reason.MISSING_CLAIM, "the token lacks iss or an id claim")
    return issuer, found


# A payload `typ` claim naming a token that is no access token: Keycloak's ID, refresh,
# offline (refresh) and logout tokens; its access tokens say `Bearer`.
_NOT_ACCESS_TYPS = frozenset({"id", "refresh", "offline", "logout"})
# Claims only an OpenID Connect ID token carries (OIDC Core §3.1.3.6, §3.3.2.11; FAPI 1.0's
# s_hash): the hashes binding it to the access token, code or state it came with. Not `nonce`:
# some IdPs copy it into access tokens too.
_ID_TOKEN_CLAIMS = ("at_hash", "c_hash", "s_hash")


def check_bearer_access_token(claims: Mapping[str, Any]) -> None:
    """Refuses (`wrong_type`) what is no bearer access token: a token bound to a key or a
    certificate (RFC 7800 `cnf`: DPoP's `jkt`, RFC 9449; mTLS's `x5t#S256`, RFC 8705; any
    other method), whose proof of possession idlegate does not check, so that a stolen one
    would work here; and an ID, refresh or logout token recognisable by its claims."""
    if "cnf" in claims:
        raise Refusal(
            Reason.WRONG_TYPE,
            "the token is bound to a key or certificate (cnf): not a bearer token",
        )
    typ = claims.get("typ")
    if isinstance(typ, str) and typ.lower() in _NOT_ACCESS_TYPS:
        raise Refusal(
            Reason.WRONG_TYPE,
            "the token's typ claim names an ID, refresh or logout token, not an access token",
        )
    for name in _ID_TOKEN_CLAIMS:
        if name in claims:
            raise Refusal(
                Reason.WRONG_TYPE, f"the token carries {name}: an ID token, not an access token"
            )


# What a diagnostic line shows of a value a token chose: at most this many characters (and
# list items), each through `logs.quoted` (one line, nothing a terminal acts on).
_SHOWN_CHARS = 100
_SHOWN_ITEMS = 5


def _shown(value: str) -> str:
    """A token's (or a configured) issuer or audience as a log line may show it: any password
    or credential option masked, cut to `_SHOWN_CHARS`, quoted."""
    masked = mask_url(value[: 4 * _SHOWN_CHARS])
    cut = len(value) > 4 * _SHOWN_CHARS or len(masked) > _SHOWN_CHARS
    return quoted(masked[:_SHOWN_CHARS]) + ("..." if cut else "")


def _near(seen: str, configured: str) -> str | None:
    """How `seen` differs from `configured` when it nearly is it (the usual issuer and audience
    misconfigurations), else None."""
    if seen == configured:
        return None
    if seen.rstrip("/") == configured.rstrip("/"):
        return "by a trailing slash"
    if seen.lower() == configured.lower():
        return "in case"
    if seen.rstrip("/").lower() == configured.rstrip("/").lower():
        return "in case and by a trailing slash"
    return None


def _nearest(seen: str, candidates: list[str]) -> str:
    """What a log line adds when `seen` nearly is one of `candidates` (the first such)."""
    for candidate in candidates:
        how = _near(seen, candidate)
        if how is not None:
            return f"; {_shown(seen)} differs only {how} from the configured {_shown(candidate)}"
    return ""


def _typ_matches(typ: object, required: str) -> bool:
    """RFC 9068 §2.1: `at+jwt`, with or without `application/`, compared case-insensitively."""
    if not isinstance(typ, str):
        return False
    typ = typ.lower().removeprefix("application/")
    return typ == required.lower().removeprefix("application/")


class Verifier:
    """Turns a token string (as `extract.bearer_token` gives it: at most 16 KiB) into a
    VerifiedToken or a Refusal with the precise reason."""

    def __init__(
        self,
        config: Config,
        rings: Mapping[str, KeyRing],
        hasher: KeyHasher,
        clock: Clock,
        *,
        # ~1.5 KiB an entry: bounded to a few tens of MiB whatever the traffic.
        cache_size: int = 20_000,
        cache_chars: int = CACHED_CHARS,
        diagnostic_interval: float = DIAGNOSTIC_INTERVAL,
    ) -> None:
        self._providers = {issuer: p for p in config.providers for issuer in p.issuers}
        self._issuers = list(self._providers)
        # The refusals an operator cannot tell from the response alone (what the token said is
        # never echoed to the client): one line per interval each, on the server side only.
        self._issuer_log = RateLimitedLog(log, interval=diagnostic_interval)
        self._audience_log = RateLimitedLog(log, interval=diagnostic_interval)
        self._rings = rings
        self._policy = config.policy
        # istr names: the forwarded headers take their case-folded identity from them.
        self._identity_claims: dict[str, str] = {
            istr(h): c for h, c in config.forward.identity_headers.items()
        }
        self._hasher = hasher
        self._clock = clock
        # The claims read as space-separated words, by provider: scopes, and its roles claim.
        self._word_claims = {
            p.name: frozenset(_SCOPE_CLAIMS) | ({p.roles_claim} if p.roles_claim else set())
            for p in config.providers
        }
        self._cache: BoundedCache[str, VerifiedToken] = BoundedCache(
            entries=cache_size, chars=cache_chars
        )

    def ring_of(self, token: VerifiedToken) -> KeyRing:
        """The key ring a token verified with: while `ring.lookup(token.kid) is token.key`,
        that verification stands."""
        return self._rings[token.provider]

    def cached(self, presented: str, now: float) -> VerifiedToken | None:
        """The fast path, without a coroutine: a token verified before (under the token, or
        the `credential` it came in) whose key still stands, time claims checked at `now`
        (may raise Refusal). None: call `verify`. One identity check is the whole key check,
        also with several issuers: a key one issuer withdraws while another still publishes it
        is held as a new object from then on (`KeyRing._succeeded`), so `is` fails for the
        tokens verified with the old one and `verify` decides again, with their own issuer's
        keys (`KeyRing.issuers_key`)."""
        cached = self._cache.get(presented)
        if cached is None or self._rings[cached.provider].lookup(cached.kid) is not cached.key:
            return None
        try:
            self._check_time(cached, now)
        except Refusal as refusal:
            if refusal.reason is Reason.EXPIRED:
                self._cache.discard(presented)  # never valid again: forgotten
            raise
        return cached

    async def verify(self, token: str, *, credential: str | None = None) -> VerifiedToken:
        """`token` verified; remembered under `credential` (the Authorization value it came
        in, `extract.credential`) when given in its canonical spelling, so that the next
        request finds it without parsing the header again, else under the token itself."""
        key = credential if credential is not None and canonical(credential) else token
        now = self._clock.now()
        cached = self.cached(key, now)
        if cached is not None:
            return cached
        verified = await self._verify_uncached(token)
        self._check_time(verified, self._clock.now())  # now: after the key fetch, if any
        self._remember(key, verified)
        return verified

    def _remember(self, token: str, verified: VerifiedToken) -> None:
        """Insertion order is age: when full, the oldest entry goes (O(1), whatever the load).
        An expired entry is dropped when next presented (`_check_time` refuses it first)."""
        self._cache.put(token, verified, len(token))

    async def _verify_uncached(self, token: str) -> VerifiedToken:
        parts = token.split(".")
        if len(parts) != 3:
            raise Refusal(Reason.MALFORMED_TOKEN, "the token is not a JWS compact JWT")
        header = _json_object(_b64decode(parts[0]), "header")
        claims = _json_object(_b64decode(parts[1]), "payload")
        signature = _b64decode(parts[2])

        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise Refusal(Reason.DISALLOWED_ALG, "unsigned tokens are never accepted")
        if "crit" in header:
            raise Refusal(Reason.MALFORMED_TOKEN, "critical header extensions are not supported")
        iss = claims.get("iss")
        if iss is None:
            raise Refusal(Reason.MISSING_CLAIM, "the token lacks the iss claim")
        provider = self._providers.get(iss) if isinstance(iss, str) else None
        if provider is None:
            self._log_wrong_issuer(iss)
            raise Refusal(Reason.WRONG_ISSUER)
        if alg not in provider.algorithms:
            raise Refusal(Reason.DISALLOWED_ALG, "the token's alg is not allowed for this issuer")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Refusal(Reason.MALFORMED_TOKEN, "the kid header is not a string")

        ring = self._rings[provider.name]
        key = ring.lookup(kid) or await ring.lookup_or_refresh(kid)
        if key is not None:
            key = ring.issuers_key(key, iss, kid)
        if key is None:
            raise Refusal(Reason.UNKNOWN_KEY)
        if alg not in key.algorithms:
            # e.g. HS256 presented with an RSA public key: key confusion (RFC 8725 §2.1).
            raise Refusal(Reason.DISALLOWED_ALG, "the token's alg cannot be used with its key")
        expected = signature_length(key.key)
        if expected is not None and len(signature) != expected:
            raise Refusal(Reason.BAD_SIGNATURE, "the signature's length does not match its key")
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        try:
            valid = _ALGORITHMS[alg].verify(signing_input, key.key, signature)
        except Exception:  # malformed signatures make some backends raise
            valid = False
        if not valid:
            raise Refusal(Reason.BAD_SIGNATURE)
        signature_text = signature_id_text(alg, parts[2], signature)
        return self._check_claims(provider, iss, header, claims, signature_text, kid, key)

    def _check_claims(
        self,
        provider: Provider,
        issuer: str,
        header: Mapping[str, Any],
        claims: Mapping[str, Any],
        signature: str,
        kid: str | None,
        key: VerificationKey,
    ) -> VerifiedToken:
        if provider.require_typ is not None and not _typ_matches(
            header.get("typ"), provider.require_typ
        ):
            raise Refusal(Reason.WRONG_TYPE, f"the token's typ must be {provider.require_typ}")
        check_bearer_access_token(claims)
        policy = self._policy
        for name in policy.required_claims:
            if claims.get(name) in (None, ""):
                raise Refusal(Reason.MISSING_CLAIM, f"the token lacks the {name} claim")
        audiences: list[object] = []
        for name in provider.audience_claims:  # azp too, where the provider allows it
            value = claims.get(name)
            audiences += (
                [value] if isinstance(value, str) else value if isinstance(value, list) else []
            )
        if not any(a in provider.audiences for a in audiences if isinstance(a, str)):
            self._log_wrong_audience(provider, audiences)
            raise Refusal(Reason.WRONG_AUDIENCE)
        iat, exp = _numeric_date(claims, "iat"), _numeric_date(claims, "exp")
        if iat is None or exp is None:  # required_claims always holds both; keep mypy honest
            raise Refusal(Reason.MISSING_CLAIM, "the token lacks exp or iat")
        if exp - iat > policy.max_token_lifetime:
            raise Refusal(
                Reason.LIFETIME_TOO_LONG,
                f"the token was issued for {exp - iat:.0f}s; at most "
                f"{policy.max_token_lifetime:.0f}s is allowed",
            )
        id_claim, jti = token_id(claims, signature, policy.token_id, self._hasher)
        # Empty is absent, as `token_id` has it: no subject or session to log, revoke or track.
        sub = _string(claims, "sub") or None
        sid = _string(claims, policy.session_claim) or None
        hashed = self._hasher.of_token
        jti_key = hashed("jti", issuer, jti) if jti else None
        sid_key = hashed("sid", issuer, sid) if sid else None
        track_key = sid_key if policy.track_by == "sid" else jti_key
        if track_key is None:
            wanted = (
                policy.session_claim if policy.track_by == "sid" else " or ".join(policy.token_id)
            )
            raise Refusal(Reason.MISSING_CLAIM, f"the token lacks an id claim ({wanted})")
        roles = (
            frozenset(_words(claim_at(claims, provider.roles_claim)))
            if provider.roles_claim is not None
            else frozenset()
        )
        return VerifiedToken(
            provider=provider.name,
            issuer=issuer,
            jti=jti,
            token_id_claim=id_claim,
            sub=sub,
            sid=sid,
            iat=iat,
            exp=exp,
            nbf=_numeric_date(claims, "nbf"),
            auth_time=_numeric_date(claims, "auth_time"),
            scopes=granted_scopes(claims),
            roles=roles,
            kid=kid,
            key=key,
            track_key=track_key,
            jti_key=jti_key,
            sid_key=sid_key,
            sub_key=hashed("sub", issuer, sub) if sub else None,
            identity=identity_headers(
                claims, self._identity_claims, jti, self._word_claims[provider.name]
            ),
        )

    def _log_wrong_issuer(self, iss: object) -> None:
        """The `iss` of a token refused `wrong_issuer` (its signature unchecked: anyone's),
        shown sanitised, and the configured issuer it nearly is, if one is."""
        if not isinstance(iss, str):
            self._issuer_log.warning("refused a token whose iss is not a string (wrong_issuer)")
            return
        self._issuer_log.warning(
            "refused a token of the untrusted issuer %s (wrong_issuer; signature not checked)%s",
            _shown(iss),
            _nearest(iss, self._issuers),
        )

    def _log_wrong_audience(self, provider: Provider, audiences: list[object]) -> None:
        """The audience values of a verified token no `audiences` entry matched, sanitised."""
        named = [a for a in audiences if isinstance(a, str)]
        shown = ", ".join(_shown(a) for a in named[:_SHOWN_ITEMS])
        if len(named) > _SHOWN_ITEMS:
            shown += f" and {len(named) - _SHOWN_ITEMS} more"
        shown_near = (_nearest(a, provider.audiences) for a in named[:_SHOWN_ITEMS])
        near = next((hint for hint in shown_near if hint), "")
        self._audience_log.warning(
            "provider %s: refused a token whose %s (%s) matches none of audiences [%s] "
            "(wrong_audience)%s",
            provider.name,
            "/".join(provider.audience_claims),
            shown or "none",
            ", ".join(_shown(a) for a in provider.audiences[:_SHOWN_ITEMS]),
            near,
        )

    def _check_time(self, token: VerifiedToken, now: float) -> None:
        leeway = self._policy.leeway
        if now >= token.exp + leeway:
            raise Refusal(Reason.EXPIRED)
        if token.nbf is not None and token.nbf > now + leeway:
            raise Refusal(Reason.NOT_YET_VALID)
        if token.iat > now + leeway:
            raise Refusal(Reason.ISSUED_IN_FUTURE)
