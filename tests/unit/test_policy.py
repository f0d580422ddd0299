"""The pure decisions about a verified token: the idle boundary, what a request asks the store to
check and record (per token or per session), scopes and session age. No I/O, no clock."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from gateway.config import Policy, Route
from gateway.reasons import Reason, Refusal
from gateway.store.base import Touch
from gateway.tokens import policy
from gateway.tokens.claims import VerifiedToken
from gateway.tokens.keys import VerificationKey

IAT = 1_800_000_000.0
IDLE = 900.0


def token(
    *,
    jti: str | None = "jti-1",
    sid: str | None = "sid-1",
    track_by: str = "jti",
    iat: float = IAT,
    exp: float = IAT + 600,
    auth_time: float | None = None,
    scopes: frozenset[str] = frozenset(),
) -> VerifiedToken:
    jti_key = f"h-jti-{jti}" if jti else None
    sid_key = f"h-sid-{sid}" if sid else None
    track_key = sid_key if track_by == "sid" else jti_key
    assert track_key is not None
    return VerifiedToken(
        provider="main",
        issuer="https://issuer.test/",
        jti=jti,
        token_id_claim="jti",
        sub="alice",
        sid=sid,
        iat=iat,
        exp=exp,
        nbf=None,
        auth_time=auth_time,
        scopes=scopes,
        roles=frozenset(),
        kid="k1",
        key=VerificationKey(kid="k1", key=object(), algorithms=frozenset({"RS256"})),
        track_key=track_key,
        jti_key=jti_key,
        sid_key=sid_key,
        sub_key="h-sub-alice",
        identity={},
    )


def make_policy(**fields: Any) -> Policy:
    return Policy(**fields)


def refusal_of(check: Any, *args: Any) -> Refusal:
    with pytest.raises(Refusal) as caught:
        check(*args)
    return caught.value


# -- is_idle ---------------------------------------------------------------------------------


def test_exactly_the_idle_timeout_is_still_accepted():
    assert policy.is_idle(last_activity=IAT, now=IAT + IDLE, idle_timeout=IDLE) is False


def test_the_smallest_step_past_the_idle_timeout_is_idle():
    assert policy.is_idle(last_activity=IAT, now=IAT + IDLE + 0.001, idle_timeout=IDLE) is True


@pytest.mark.parametrize(("gap", "idle"), [(0, False), (1, False), (899.999, False), (901, True)])
def test_is_idle_compares_the_gap_with_the_timeout(gap: float, idle: bool):
    assert policy.is_idle(IAT, IAT + gap, IDLE) is idle


def test_a_last_activity_in_the_future_is_not_idle():
    # Another instance with a clock ahead recorded it: never idle because of skew.
    assert policy.is_idle(last_activity=IAT + 5, now=IAT, idle_timeout=IDLE) is False


# -- idle timeout per route, reason per tracking mode ----------------------------------------


def test_a_route_override_replaces_the_policy_idle_timeout():
    base = make_policy(idle_timeout=IDLE)
    assert policy.idle_timeout_for(base, Route(prefix="/a/", upstream="http://x")) == IDLE
    shorter = Route(prefix="/a/", upstream="http://x", idle_timeout=60)
    assert policy.idle_timeout_for(base, shorter) == 60.0


def test_the_idle_reason_names_what_is_tracked():
    assert policy.idle_reason(make_policy()) is Reason.IDLE_TIMEOUT
    by_sid = make_policy(track_by="sid", required_claims=["exp", "iat", "sid"])
    assert policy.idle_reason(by_sid) is Reason.SESSION_IDLE


# -- touch_for -------------------------------------------------------------------------------


def test_touch_for_jti_tracking_is_per_token_and_forgets_after_exp_plus_leeway():
    now = IAT + 100
    touch = policy.touch_for(
        token(), make_policy(leeway=30), idle_timeout=IDLE, now=now, extend=True
    )
    assert touch == Touch(
        key="h-jti-jti-1",
        initial=IAT,  # never used: last activity is iat
        now=now,
        idle_timeout=IDLE,
        extend=True,
        expires_at=IAT + 600,
        linger=30.0,
        remember_idle=False,
    )


def test_touch_for_sid_tracking_is_per_session_and_remembers_idled_sessions():
    sid_policy = make_policy(
        track_by="sid",
        required_claims=["exp", "iat", "sid"],
        leeway=30,
        session_retention="24h",
    )
    now = IAT + 10
    touch = policy.touch_for(
        token(track_by="sid"), sid_policy, idle_timeout=300, now=now, extend=True
    )
    assert touch.key == "h-sid-sid-1"
    assert touch.remember_idle is True
    assert touch.linger == 30.0 + 86400.0
    assert (touch.initial, touch.now, touch.idle_timeout, touch.expires_at) == (
        IAT,
        now,
        300,
        IAT + 600,
    )


def test_two_tokens_of_one_session_share_the_sid_key_but_not_the_jti_key():
    sid_policy = make_policy(track_by="sid", required_claims=["exp", "iat", "sid"])
    first = token(jti="a", track_by="sid")
    second = token(jti="b", track_by="sid")
    keys = {policy.touch_for(t, sid_policy, IDLE, IAT, extend=True).key for t in (first, second)}
    assert keys == {"h-sid-sid-1"}
    by_jti = {
        policy.touch_for(t, make_policy(), IDLE, IAT, extend=True).key
        for t in (token(jti="a"), token(jti="b"))
    }
    assert by_jti == {"h-jti-a", "h-jti-b"}


def test_passive_requests_only_check():
    touch = policy.touch_for(token(), make_policy(), IDLE, IAT, extend=False)
    assert touch.extend is False


# -- check_scopes ----------------------------------------------------------------------------


def test_no_required_scopes_always_pass():
    policy.check_scopes([], frozenset())


def test_every_required_scope_must_be_granted():
    policy.check_scopes(["orders:read"], frozenset({"orders:read", "orders:write"}))
    policy.check_scopes(["a", "b"], frozenset({"a", "b", "c"}))


def test_a_missing_scope_is_insufficient_scope_naming_what_is_required():
    refusal = refusal_of(policy.check_scopes, ["orders:read", "orders:write"], frozenset({"x"}))
    assert refusal.reason is Reason.INSUFFICIENT_SCOPE
    assert refusal.reason.status == 403
    assert refusal.scope == "orders:read orders:write"
    assert "orders:read" in refusal.detail and "orders:write" in refusal.detail


def test_one_of_two_scopes_is_not_enough():
    refusal = refusal_of(policy.check_scopes, ["a", "b"], frozenset({"a"}))
    assert refusal.reason is Reason.INSUFFICIENT_SCOPE
    assert "b" in refusal.detail.split(":")[-1].split()


def test_scopes_are_exact_strings():
    for granted in ({"orders"}, {"ORDERS:READ"}, {"orders:read:all"}):
        refusal = refusal_of(policy.check_scopes, ["orders:read"], frozenset(granted))
        assert refusal.reason is Reason.INSUFFICIENT_SCOPE


# -- check_session_age -----------------------------------------------------------------------


def test_without_max_session_age_any_session_age_passes():
    policy.check_session_age(token(auth_time=None), make_policy(), IAT + 10**9)


def test_max_session_age_needs_auth_time():
    refusal = refusal_of(
        policy.check_session_age, token(auth_time=None), make_policy(max_session_age="12h"), IAT
    )
    assert refusal.reason is Reason.MISSING_CLAIM
    assert "auth_time" in refusal.detail


def test_a_session_up_to_max_age_plus_leeway_passes():
    rules = make_policy(max_session_age="12h", leeway=30)
    policy.check_session_age(token(auth_time=IAT), rules, IAT + 43200 + 30)


def test_a_session_older_than_max_age_plus_leeway_is_too_old():
    rules = make_policy(max_session_age="12h", leeway=30)
    refusal = refusal_of(policy.check_session_age, token(auth_time=IAT), rules, IAT + 43230.001)
    assert refusal.reason is Reason.SESSION_TOO_OLD


def test_session_age_counts_from_auth_time_not_iat():
    rules = make_policy(max_session_age="1h", leeway=0)
    fresh_token_old_login = token(iat=IAT + 7200, exp=IAT + 7800, auth_time=IAT)
    refusal = refusal_of(policy.check_session_age, fresh_token_old_login, rules, IAT + 7201)
    assert refusal.reason is Reason.SESSION_TOO_OLD


def test_an_auth_time_after_iat_is_refused_not_read_as_a_young_session():
    """An authentication after the token was issued cannot be: read as an age, a future
    auth_time would exempt the token from max_session_age. Up to leeway after iat passes."""
    rules = make_policy(max_session_age="1h", leeway=30)
    policy.check_session_age(token(auth_time=IAT + 30), rules, IAT + 10)
    for later in (IAT + 30.001, IAT + 10 * 365 * 86400):
        refusal = refusal_of(policy.check_session_age, token(auth_time=later), rules, IAT + 10)
        assert refusal.reason is Reason.ISSUED_IN_FUTURE


def test_importing_the_pure_policy_loads_no_network_client():
    """The policy module calls itself pure: importing it (as a unit test or a tool would) must not
    load redis-py or aiohttp, whose imports cost hundreds of milliseconds and bring I/O along.
    In a fresh interpreter: this test process has loaded both already."""
    probe = (
        "import sys, gateway.tokens.policy\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('redis', 'hiredis', 'aiohttp'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=30
    )
    assert done.stdout.strip() == ""


# -- the store-failure decision (store.on_error) and this instance's memory of activity ---------


def test_on_store_failure_allow_goes_on_as_if_active_now():
    assert policy.on_store_failure("allow", None, IAT + 50, IDLE) == IAT + 50


def test_on_store_failure_grace_goes_on_with_local_activity_within_the_window():
    assert policy.on_store_failure("grace", IAT, IAT + IDLE, IDLE) == IAT


@pytest.mark.parametrize(
    ("mode", "seen"),
    [("deny", IAT), ("grace", None), ("grace", IAT - 1)],  # grace: unseen here, or idle
)
def test_on_store_failure_refuses_store_unavailable_with_retry_after(mode: Any, seen: float | None):
    with pytest.raises(Refusal) as refused:
        policy.on_store_failure(mode, seen, IAT + IDLE, IDLE)
    assert refused.value.reason is Reason.STORE_UNAVAILABLE
    assert refused.value.retry_after == 1


def test_recent_activity_keeps_the_latest_and_forgets_the_least_recent_past_capacity():
    recent = policy.RecentActivity(capacity=2)
    recent.record("a", 1.0)
    recent.record("b", 2.0)
    recent.record("a", 3.0)  # a is now the most recent
    recent.record("c", 4.0)
    assert (recent.last("a"), recent.last("b"), recent.last("c")) == (3.0, None, 4.0)


def test_idle_remaining_counts_down_to_the_idle_boundary_and_below():
    assert policy.idle_remaining(IAT, IAT + 100, IDLE) == IDLE - 100
    assert policy.idle_remaining(IAT, IAT + IDLE, IDLE) == 0  # still accepted (is_idle: False)
    assert policy.idle_remaining(IAT, IAT + IDLE + 1, IDLE) == -1


def test_a_revocation_outlasts_every_token_it_covers_and_a_session_its_retention():
    rules = make_policy(max_token_lifetime=900, leeway=30, session_retention=86_400)
    # A token issued now + leeway, living max_token_lifetime, honoured leeway past exp.
    assert policy.revocation_horizon("jti", IAT, rules) == IAT + 900 + 60
    assert policy.revocation_horizon("sub", IAT, rules) == IAT + 900 + 60
    assert policy.revocation_horizon("sid", IAT, rules) == IAT + 86_400
