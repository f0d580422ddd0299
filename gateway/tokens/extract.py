"""Bearer token extraction (RFC 6750 §2.1): exactly one credential, in the header only."""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

from multidict import CIMultiDictProxy, istr

from gateway.reasons import Reason, Refusal

MAX_TOKEN_BYTES = 16 * 1024
# token68 (RFC 9110 §11.2); a JWS compact JWT is a subset of it.
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_QUERY_SEPARATORS = re.compile(r"[&;]")
_PHP_NAME = re.compile(r"[ .]")  # PHP reads both as `_` in a parameter name


def _has_query_token(query_string: str) -> bool:
    """Whether any upstream could read an `access_token` parameter in the query: its name
    also percent-encoded (`access%5Ftoken`), in another case (ASP.NET's query is case-blind),
    after a `;` (servlet-era parsers split on it too), or as PHP spells `access.token`."""
    lowered = query_string.lower()
    if "token" not in lowered and "%" not in lowered:  # the common case, without parsing
        return False
    for part in _QUERY_SEPARATORS.split(query_string):
        # PHP ends a name at a NUL byte, and reads an unclosed `[` as `_`.
        name = unquote_plus(part.partition("=")[0]).partition("\x00")[0].strip().lower()
        bracket = name.find("[")
        if bracket >= 0 and "]" not in name[bracket:]:
            name = name[:bracket] + "_" + name[bracket + 1 :]
        if _PHP_NAME.sub("_", name).partition("[")[0] == "access_token":
            return True
    return False


def bearer_token(headers: CIMultiDictProxy[str], query_string: str) -> str:
    """The bearer token of a request, or a Refusal saying why there is none usable."""
    return check_token68(presented_token(headers, query_string))


AUTHORIZATION = istr("Authorization")  # its case-folded identity made once, not per request


def credential(headers: CIMultiDictProxy[str], query_string: str) -> str | None:
    """The request's one Authorization value, as sent, when that value alone decides what
    `presented_token` finds (one such header, no token in the query): a key under which a
    verification may be found again (kept under it only if `canonical`). None: only
    `presented_token` can tell."""
    values = headers.getall(AUTHORIZATION, ())
    if len(values) != 1 or (query_string and _has_query_token(query_string)):
        return None
    return values[0]


# The spellings of the scheme a kept credential may start with: one space, then the token.
_CANONICAL_SCHEMES = ("Bearer ", "bearer ")
_MAX_CREDENTIAL = len("Bearer ") + MAX_TOKEN_BYTES


def canonical(credential: str) -> bool:
    """Whether a `credential` is spelled the one way clients spell it (`Bearer <token>`), so
    that a verification may be kept under it. Other spellings of the same token (more spaces,
    another case of the scheme) are kept under the token: each would be an entry of its own,
    up to the header's size, for one token."""
    return (
        len(credential) <= _MAX_CREDENTIAL
        and credential.count(" ") == 1
        and credential.startswith(_CANONICAL_SCHEMES)
    )


def presented_token(headers: CIMultiDictProxy[str], query_string: str) -> str:
    """`bearer_token` but for the token68 syntax check (`check_token68`), which costs ~1.5 µs
    on a typical token: a caller may skip it for a string it verified before, since every
    verified token (three non-empty base64url parts, `tokens.verify`) is token68."""
    values = headers.getall(AUTHORIZATION, ())
    in_query = bool(query_string) and _has_query_token(query_string)
    if len(values) > 1:
        raise Refusal(Reason.MALFORMED_REQUEST, "more than one Authorization header")
    if in_query:
        # Tokens in URLs end up in logs and caches; never accepted (RFC 6750 §5.3).
        detail = "a token in the query and the header" if values else "tokens in the URL"
        raise Refusal(Reason.MALFORMED_REQUEST, f"{detail} are not accepted")
    if not values:
        raise Refusal(Reason.MISSING_TOKEN)
    value = values[0]
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        if scheme.lower() == "dpop":
            # RFC 9449: idlegate checks no DPoP proof, so it has no token to offer here; as
            # for any scheme it does not support, a challenge without an error (RFC 6750 §3.1).
            raise Refusal(
                Reason.MISSING_TOKEN,
                "DPoP is not supported: a bearer token (not bound to a key) is required",
            )
        raise Refusal(Reason.MISSING_TOKEN, "a bearer token is required")
    token = token.strip(" ")
    if len(token) > MAX_TOKEN_BYTES:
        raise Refusal(Reason.MALFORMED_TOKEN, "the token is larger than 16 KiB")
    return token


def check_token68(token: str) -> str:
    """The token itself, if it is RFC 6750's `token68`; else a Refusal."""
    if not _TOKEN68.fullmatch(token):
        raise Refusal(Reason.MALFORMED_REQUEST, "the Authorization header is not 'Bearer <token>'")
    return token
