"""What the rest of the gateway may rely on about a verified token: a plain record.

Apart from `verify.py` (which builds it), so that the pure decisions (`tokens/policy.py`), the
revocation list and the deadlines can name it without importing the verifier's key rings
(aiohttp) or the store's clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only types here; keys.py imports aiohttp for its key rings
    from gateway.store.base import RevocationKind
    from gateway.tokens.keys import VerificationKey


class Identity(dict[str, str]):
    """A token's identity headers (header -> text), and the same as header lines: rendered once,
    when the token is verified, so that a request that repeats the token copies one string
    upstream (`forward.headers.RequestHeaders.for_request`). Its values hold no control
    character (`verify.identity_headers` leaves such a claim out) and its names are the
    config's: the lines need no check of their own. Never changed once built: it is shared by
    every request that presents the token."""

    __slots__ = ("lines",)

    def __init__(self, fields: Mapping[str, str] | None = None) -> None:
        super().__init__(fields or {})
        self.lines = "".join([f"{name}: {value}\r\n" for name, value in self.items()])

    def _unchanged(self, *_args: object, **_kwargs: object) -> Any:
        raise TypeError("an Identity is shared by every request of its token: never changed")

    __setitem__ = __delitem__ = update = pop = popitem = setdefault = clear = _unchanged
    __ior__ = _unchanged

    def __reduce__(self) -> tuple[type[Identity], tuple[dict[str, str]]]:
        return Identity, (dict(self),)  # copies and pickles are built whole, never filled in


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """What the rest of the gateway may rely on about a token whose signature checked out."""

    provider: str
    issuer: str  # the token's iss, exactly: with the ids below it identifies the token
    # The token's id as `policy.token_id` found it: the jti or uti value, or `digest:<hash>`
    # (a keyed hash of the signature) for a token with neither. What the access log shows.
    jti: str | None
    token_id_claim: str | None  # which of policy.token_id gave `jti` (None: none did)
    sub: str | None
    sid: str | None
    iat: float
    exp: float
    nbf: float | None
    auth_time: float | None
    scopes: frozenset[str]
    roles: frozenset[str]  # from the provider's roles_claim (empty without one)
    kid: str | None
    key: VerificationKey
    # Keyed hashes of (issuer, id): what the store and the revocation list are keyed by.
    track_key: str
    jti_key: str | None
    sid_key: str | None
    sub_key: str | None
    # The identity headers for the upstream, computed once per token (forward.identity_headers).
    identity: Identity
    # The revocation list's keys that name this token, (kind, keyed hash) for each id it has:
    # derived from the three above, so that a check of a non-empty list is one C call.
    revocation_index: tuple[tuple[RevocationKind, str], ...] = field(init=False)

    def __post_init__(self) -> None:
        ids: tuple[tuple[RevocationKind, str | None], ...] = (
            ("jti", self.jti_key),
            ("sid", self.sid_key),
            ("sub", self.sub_key),
        )
        index = tuple((kind, key) for kind, key in ids if key is not None)
        object.__setattr__(self, "revocation_index", index)  # frozen: set once, here
