"""Pure decisions about a verified token: no I/O, no clock of their own.

The store applies `is_idle` atomically (its Lua script mirrors it); everything else here is
called by the request pipeline (`gateway/pipeline.py`) with the values it already holds.
Importing this module loads neither redis-py nor aiohttp (tests/unit/test_policy.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Literal

from gateway.config import Policy, Route
from gateway.reasons import Reason, Refusal
from gateway.store.base import RevocationKind, Touch
from gateway.tokens.claims import VerifiedToken


def is_idle(last_activity: float, now: float, idle_timeout: float) -> bool:
    """Idle iff strictly more than `idle_timeout` passed: exactly the timeout is still accepted."""
    return now - last_activity > idle_timeout


def idle_remaining(last_activity: float, now: float, idle_timeout: float) -> float:
    """Seconds until a token last active at `last_activity` is idle; below 0 once it is (what
    the session route and `GET /admin/tokens/{jti}` report; the admin API clamps at 0)."""
    return idle_timeout - (now - last_activity)


def revocation_horizon(kind: RevocationKind, now: float, policy: Policy) -> float:
    """How long a revocation made now must last. No token it covers can outlive this: exp <=
    iat + max_token_lifetime, iat <= now + leeway, and exp itself is honoured with leeway. A
    revoked session stays refused at least as long as an idled one (session_retention)."""
    horizon = now + policy.max_token_lifetime + 2 * policy.leeway
    if kind == "sid":
        horizon = max(horizon, now + policy.session_retention)
    return horizon


def idle_timeout_for(policy: Policy, route: Route) -> float:
    return route.idle_timeout if route.idle_timeout is not None else policy.idle_timeout


def touch_for(
    token: VerifiedToken, policy: Policy, idle_timeout: float, now: float, *, extend: bool
) -> Touch:
    """The store operation for this request: what counts as activity and how long to remember."""
    by_session = policy.track_by == "sid"
    return Touch(
        key=token.track_key,
        initial=token.iat,
        now=now,
        idle_timeout=idle_timeout,
        extend=extend,
        expires_at=token.exp,
        linger=policy.leeway + (policy.session_retention if by_session else 0.0),
        remember_idle=by_session,
    )


def idle_reason(policy: Policy) -> Reason:
    return Reason.SESSION_IDLE if policy.track_by == "sid" else Reason.IDLE_TIMEOUT


def check_session_age(token: VerifiedToken, policy: Policy, now: float) -> None:
    if policy.max_session_age is None:
        return
    if token.auth_time is None:
        raise Refusal(Reason.MISSING_CLAIM, "the token lacks auth_time, needed for max_session_age")
    if token.auth_time > token.iat + policy.leeway:
        # An authentication after the token was issued cannot be: read as the age it says, a
        # future auth_time would exempt the token from max_session_age.
        raise Refusal(Reason.ISSUED_IN_FUTURE, "the token's auth_time is after its iat")
    if now - token.auth_time > policy.max_session_age + policy.leeway:
        raise Refusal(Reason.SESSION_TOO_OLD)


def check_scopes(required: Iterable[str], granted: frozenset[str]) -> None:
    missing = [scope for scope in required if scope not in granted]
    if missing:
        raise Refusal(
            Reason.INSUFFICIENT_SCOPE,
            f"this route requires the scope(s): {' '.join(missing)}",
            scope=" ".join(required),
        )


def check_roles(required: Iterable[str], granted: frozenset[str]) -> None:
    """Every role the route lists must be in the token's roles (the provider's roles_claim).
    403 `insufficient_role`, whose OAuth error is RFC 6750's insufficient_scope."""
    missing = [role for role in required if role not in granted]
    if missing:
        raise Refusal(
            Reason.INSUFFICIENT_ROLE, f"this route requires the role(s): {' '.join(missing)}"
        )


class RecentActivity:
    """This instance's own memory of accepted requests, for `on_error: grace` (bounded LRU)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._capacity = capacity

    def record(self, key: str, now: float) -> None:
        self._seen[key] = now
        self._seen.move_to_end(key)
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)

    def last(self, key: str) -> float | None:
        return self._seen.get(key)


def on_store_failure(
    mode: Literal["deny", "allow", "grace"], seen: float | None, now: float, idle_timeout: float
) -> float:
    """The store did not answer (`store.on_error`): the last activity to go on with, or a
    refusal. `allow`: as if active now. `grace`: `seen`, this instance's own last record of
    the token, if that is not idle. Otherwise (and always for `deny`) 503 store_unavailable,
    with Retry-After: 1."""
    if mode == "allow":
        return now
    if mode == "grace" and seen is not None and not is_idle(seen, now, idle_timeout):
        return seen
    raise Refusal(Reason.STORE_UNAVAILABLE, retry_after=1)
