"""Durations where 0 (or a sliver of a second) has no meaning are refused as `<key>: must be
positive`, bounds that contradict each other are refused, and nothing beyond what Redis takes
as an expiry (or a real operator would write) is accepted."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from gateway.config import MAX_DURATION, ConfigError, from_data, parse_duration

MINIMAL: dict[str, Any] = {
    "providers": [
        {
            "name": "main",
            "issuer": "https://issuer.test/",
            "audiences": ["orders-api"],
            "jwks_uri": "https://issuer.test/jwks",
        }
    ],
    "routes": [{"prefix": "/api/", "upstream": "http://orders:8000"}],
}


def problems_with(section: str, **fields: Any) -> list[str]:
    data = copy.deepcopy(MINIMAL)
    if section in ("providers", "routes"):
        data[section][0].update(fields)
    else:
        data[section] = fields
    with pytest.raises(ConfigError) as caught:
        from_data(data, environ={})
    return caught.value.problems


def accepted(section: str, **fields: Any) -> Any:
    data = copy.deepcopy(MINIMAL)
    if section in ("providers", "routes"):
        data[section][0].update(fields)
    else:
        data[section] = fields
    return from_data(data, environ={})


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("store", "timeout"),
        ("store", "revocation_poll"),
        ("policy", "idle_timeout"),
        ("policy", "max_token_lifetime"),
        ("policy", "session_retention"),
        ("policy", "max_session_age"),
        ("providers", "jwks_min_refresh"),
        ("providers", "jwks_max_refresh"),
        ("routes", "idle_timeout"),
        ("server", "header_timeout"),
        ("forward", "connect_timeout"),
    ],
)
@pytest.mark.parametrize("zero", [0, "0s", "0ms"])
def test_zero_where_it_means_nothing_is_refused_as_must_be_positive(
    section: str, key: str, zero: object
):
    where = f"{section}.0.{key}" if section in ("providers", "routes") else f"{section}.{key}"
    found = problems_with(section, **{key: zero})
    assert any(p.startswith(f"{where}: must be positive") for p in found), found


@pytest.mark.parametrize(
    ("section", "key"),
    [("store", "coalesce"), ("policy", "leeway"), ("server", "shutdown_grace")],
)
def test_zero_where_it_has_a_meaning_is_accepted(section: str, key: str):
    assert getattr(getattr(accepted(section, **{key: 0}), section), key) == 0


@pytest.mark.parametrize(
    ("key", "sliver", "problem"),
    [
        ("timeout", "0.5ms", "must be at least 1ms"),
        ("revocation_poll", "1ms", "must be at least 10ms"),
    ],
)
def test_store_intervals_too_short_to_work_are_refused(key: str, sliver: str, problem: str):
    assert f"store.{key}: {problem}" in problems_with("store", **{key: sliver})


def test_jwks_min_refresh_above_jwks_max_refresh_is_refused():
    found = problems_with("providers", jwks_min_refresh="2h", jwks_max_refresh="1h")
    assert found == [
        "providers.0.jwks_min_refresh: 7200s is above jwks_max_refresh (3600s); "
        "must be at most that"
    ]
    provider = accepted("providers", jwks_min_refresh="1h", jwks_max_refresh="1h").providers[0]
    assert provider.jwks_min_refresh == provider.jwks_max_refresh == 3600


@pytest.mark.parametrize("huge", [1.0e300, "36600d", MAX_DURATION + 1])
@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("policy", "idle_timeout"),
        ("policy", "max_token_lifetime"),
        ("policy", "session_retention"),
        ("policy", "max_session_age"),
        ("store", "timeout"),
        ("providers", "jwks_max_refresh"),
    ],
)
def test_durations_over_100_years_are_refused(section: str, key: str, huge: object):
    where = f"{section}.0.{key}" if section == "providers" else f"{section}.{key}"
    assert f"{where}: a duration cannot be over 100 years" in problems_with(section, **{key: huge})


def test_100_years_is_still_accepted_and_stays_within_redis_expiry_limits():
    config = accepted(
        "policy",
        idle_timeout=MAX_DURATION,
        max_token_lifetime=MAX_DURATION,
        session_retention=MAX_DURATION,
        leeway="1d",
    )
    # The longest PX the store computes: exp (<= lifetime ahead) + idle + leeway + retention, in
    # ms: exact as a Lua double and far below Redis's limit (LLONG_MAX ms from now).
    policy = config.policy
    longest_ms = (
        policy.max_token_lifetime + policy.idle_timeout + policy.leeway + policy.session_retention
    ) * 1000
    assert longest_ms < 2**53
    assert parse_duration("36500d") == 36500 * 86400


def test_leeway_over_a_day_is_refused():
    assert "policy.leeway: must be at most 1d (it allows for clock skew, not lifetime)" in (
        problems_with("policy", leeway="25h")
    )
    assert accepted("policy", leeway="1d").policy.leeway == 86400
