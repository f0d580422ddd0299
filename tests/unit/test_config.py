"""Config parsing as an operator writes it: durations and sizes, environment overrides, every
problem reported with its path, presets, cross-field rules, secrets masked, paths relative to
the config file. No sockets, no files beyond tmp_path."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import (
    PRESETS,
    Config,
    ConfigError,
    env_warnings,
    from_data,
    load,
    mask_url,
    parse_duration,
    parse_size,
)

MINIMAL: dict[str, Any] = {
    "providers": [
        {
            "name": "main",
            "issuer": "https://issuer.test/",
            "audiences": ["orders-api"],
            "public_key_file": "/keys/public.pem",
        }
    ],
    "routes": [{"prefix": "/api/", "upstream": "http://orders:8000"}],
}


def config(environ: dict[str, str] | None = None, **sections: Any) -> Config:
    """MINIMAL with whole sections replaced, validated with `environ` (default: none)."""
    data = copy.deepcopy(MINIMAL)
    data.update(copy.deepcopy(sections))
    return from_data(data, environ={} if environ is None else environ)


def problems(environ: dict[str, str] | None = None, **sections: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config(environ, **sections)
    return caught.value.problems


def provider(**fields: Any) -> dict[str, Any]:
    """A provider with no key source unless `fields` gives one."""
    return {"name": "main", "issuer": "https://issuer.test/", "audiences": ["a"], **fields}


# -- durations and sizes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (900, 900.0),
        ("900", 900.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("2d", 172800.0),
        (0, 0.0),
        (2.5, 2.5),
        (" 15m ", 900.0),
    ],
)
def test_durations_accept_seconds_and_unit_strings(text: object, seconds: float):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "abc", "15x", "m15", "15m30", "-5", "-5s", -1, "1h 30q", "1..5s", True, None, []],
)
def test_bad_durations_are_refused(text: object):
    with pytest.raises(ValueError, match=r"duration"):
        parse_duration(text)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_durations_are_refused(value: float):
    # `idle_timeout: .nan` would disable the idle check (now - last > nan is never true),
    # `leeway: .nan` would make tokens never expire.
    with pytest.raises(ValueError, match=r"duration"):
        parse_duration(value)


def test_a_nan_duration_from_yaml_or_the_environment_is_a_config_problem():
    found = problems({"IDLEGATE_POLICY__LEEWAY": ".nan"})
    assert [p.split(":")[0] for p in found] == ["policy.leeway"]
    found = problems(policy={"idle_timeout": yaml.safe_load(".nan")})
    assert [p.split(":")[0] for p in found] == ["policy.idle_timeout"]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("10MiB", 10 * 1024 * 1024),
        ("512KiB", 512 * 1024),
        ("1GiB", 1024**3),
        ("10MB", 10_000_000),
        ("1048576", 1048576),
        (1048576, 1048576),
        ("10 MiB", 10 * 1024 * 1024),
        ("0", 0),
    ],
)
def test_sizes_accept_bytes_and_binary_units(text: object, size: int):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["10XB", "ten", "1.5MiB", "-1", -1, 1.5, True, "", "MiB"])
def test_bad_sizes_are_refused(text: object):
    with pytest.raises(ValueError, match=r"size"):
        parse_size(text)


def test_durations_and_sizes_in_a_config_are_seconds_and_bytes():
    loaded = config(
        policy={"idle_timeout": "10m", "leeway": "250ms", "session_retention": "1h30m"},
        forward={"max_body": "512KiB", "read_timeout": 90},
    )
    assert loaded.policy.idle_timeout == 600.0
    assert loaded.policy.leeway == 0.25
    assert loaded.policy.session_retention == 5400.0
    assert loaded.forward.max_body == 512 * 1024
    assert loaded.forward.read_timeout == 90.0


def test_a_bad_duration_is_reported_with_its_path():
    found = problems(policy={"idle_timeout": "soon"}, store={"timeout": "fast"})
    assert {p.split(":")[0] for p in found} == {"policy.idle_timeout", "store.timeout"}
    assert all("duration" in p for p in found)


# -- environment overrides ---------------------------------------------------------------------


def test_environment_overrides_nested_keys_with_yaml_typed_values():
    loaded = config(
        {
            "IDLEGATE_STORE__URL": "redis://redis:6379/0",
            "IDLEGATE_POLICY__IDLE_TIMEOUT": "10m",
            "IDLEGATE_LISTEN__PORT": "8081",
            "IDLEGATE_FORWARD__STRIP_AUTHORIZATION": "true",
            "IDLEGATE_POLICY__REQUIRED_CLAIMS": "[exp, iat, jti, sub]",
        }
    )
    assert loaded.store.url == "redis://redis:6379/0"
    assert loaded.policy.idle_timeout == 600.0
    assert loaded.listen.port == 8081
    assert loaded.forward.strip_authorization is True
    assert loaded.policy.required_claims == ["exp", "iat", "jti", "sub"]


def test_environment_overrides_list_items_by_index():
    loaded = config(
        {
            "IDLEGATE_ROUTES__0__UPSTREAM": "http://orders-v2:8000",
            "IDLEGATE_ROUTES__0__IDLE_TIMEOUT": "5m",
            "IDLEGATE_PROVIDERS__0__AUDIENCES": "[orders-api, billing-api]",
        }
    )
    assert loaded.routes[0].upstream == "http://orders-v2:8000"
    assert loaded.routes[0].idle_timeout == 300.0
    assert loaded.routes[0].prefix == "/api/"  # the rest of the item is kept
    assert loaded.providers[0].audiences == ["orders-api", "billing-api"]


def test_environment_override_of_a_missing_list_item_is_refused():
    found = problems({"IDLEGATE_ROUTES__3__UPSTREAM": "http://x"})
    assert len(found) == 1
    assert found[0].startswith("IDLEGATE_ROUTES__3__UPSTREAM: ")


def test_environment_override_creates_sections_the_file_left_out():
    loaded = config({"IDLEGATE_ADMIN__PORT": "9191", "IDLEGATE_SERVER__ACCESS_LOG": "false"})
    assert loaded.admin.port == 9191
    assert loaded.server.access_log is False


def test_environment_override_of_an_unknown_key_is_refused_with_its_path():
    assert problems({"IDLEGATE_POLICY__IDLE_TIMOUT": "5m"}) == [
        "policy.idle_timout: Extra inputs are not permitted"
    ]


def test_environment_overrides_apply_to_the_loaded_file(tmp_path: Path):
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    loaded = load(path, environ={"IDLEGATE_POLICY__IDLE_TIMEOUT": "1h"})
    assert loaded.policy.idle_timeout == 3600.0


def test_idlegate_config_names_the_file_and_is_not_an_override(tmp_path: Path):
    path = tmp_path / "elsewhere.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    loaded = load(environ={"IDLEGATE_CONFIG": str(path)})
    assert loaded.routes[0].prefix == "/api/"


# -- every problem, with its path ---------------------------------------------------------------


def test_unknown_keys_are_refused_with_their_path():
    found = problems(
        policy={"idle_timout": "5m"},
        store={"url": "memory://", "colour": "blue"},
        routes=[{"prefix": "/api/", "upstream": "http://x", "strip": True}],
    )
    assert sorted(found) == [
        "policy.idle_timout: Extra inputs are not permitted",
        "routes.0.strip: Extra inputs are not permitted",
        "store.colour: Extra inputs are not permitted",
    ]


def test_a_top_level_unknown_key_is_refused():
    assert problems(proxy={"port": 1}) == ["proxy: Extra inputs are not permitted"]


def test_every_problem_is_reported_at_once():
    found = problems(
        listen={"port": 70000},
        store={"url": "memcached://x"},
        providers=[provider(public_key_file="/k", audiences=[])],
        routes=[{"prefix": "api", "upstream": "ftp://x"}],
    )
    paths = {p.split(":")[0] for p in found}
    assert paths >= {
        "listen.port",
        "store.url",
        "providers.0.audiences",
        "routes.0.prefix",
        "routes.0.upstream",
    }


def from_data_problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        from_data(data, environ={})
    return caught.value.problems


def test_providers_and_routes_are_required():
    found = from_data_problems({})
    assert {p.split(":")[0] for p in found} == {"providers", "routes"}


def test_a_config_that_is_not_a_mapping_is_one_problem():
    assert from_data_problems(["a", "list"]) == ["(root): the config must be a mapping of keys"]


def test_a_missing_file_is_one_problem(tmp_path: Path):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path / "nope.yaml", environ={})
    assert len(caught.value.problems) == 1
    assert "nope.yaml" in caught.value.problems[0]


def test_invalid_yaml_is_one_problem_with_its_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("listen:\n  port: 1\nroutes: [\n")
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    assert len(caught.value.problems) == 1
    assert "bad.yaml" in caught.value.problems[0] and "line" in caught.value.problems[0]


@pytest.mark.parametrize(
    "text",
    [
        "policy:\n  idle_timeout: 5m\npolicy:\n  idle_timeout: 8h\n",  # a leftover block
        "policy:\n  idle_timeout: 5m\n  idle_timeout: 8h\n",
        "routes:\n  - prefix: /api/\n    auth: required\n    auth: none\n",
    ],
)
def test_a_key_given_twice_is_a_problem_not_the_last_one_winning(tmp_path: Path, text: str):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    (problem,) = caught.value.problems
    assert "appears twice" in problem and "line" in problem


def test_yaml_merge_keys_may_still_override():
    from gateway.config import _yaml

    text = "a: &base {x: 1, y: 2}\nb:\n  <<: *base\n  y: 3\n"
    assert _yaml(text) == {"a": {"x": 1, "y": 2}, "b": {"x": 1, "y": 3}}


# -- presets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_fill_the_policy_defaults(preset: str):
    loaded = config(policy={"preset": preset})
    for key, value in PRESETS[preset].items():
        assert getattr(loaded.policy, key) == value


def test_nist_aal2_preset_allows_30_minutes_idle_and_12_hours_overall():
    policy = config(policy={"preset": "nist-aal2"}).policy
    assert policy.idle_timeout == 1800.0
    assert policy.max_session_age == 43200.0


def test_explicit_policy_keys_win_over_the_preset():
    policy = config(policy={"preset": "nist-aal2", "idle_timeout": "10m"}).policy
    assert policy.idle_timeout == 600.0
    assert policy.max_session_age == 43200.0  # the preset still fills what was left out


def test_environment_override_wins_over_the_preset():
    policy = config({"IDLEGATE_POLICY__IDLE_TIMEOUT": "5m"}, policy={"preset": "pci-dss"}).policy
    assert policy.idle_timeout == 300.0


def test_an_unknown_preset_is_refused():
    assert [p.split(":")[0] for p in problems(policy={"preset": "hipaa"})] == ["policy.preset"]


# -- cross-field rules --------------------------------------------------------------------------


def test_route_idle_timeout_longer_than_the_policy_is_refused():
    found = problems(
        policy={"idle_timeout": "10m"},
        routes=[{"prefix": "/api/", "upstream": "http://x", "idle_timeout": "15m"}],
    )
    assert len(found) == 1
    assert "/api/" in found[0] and "idle_timeout" in found[0]


def test_a_cross_field_problem_names_the_field_at_fault():
    """`field.path: reason`, as for every other problem: not `(root): routes: ...`."""
    found = problems(
        policy={"idle_timeout": "10m"},
        routes=[
            {"prefix": "/a/", "upstream": "http://x"},
            {"prefix": "/api/", "upstream": "http://x", "idle_timeout": "15m"},
        ],
    )
    assert [p.split(": ")[0] for p in found] == ["routes.1.idle_timeout"]


def test_route_idle_timeout_shorter_or_equal_is_accepted():
    loaded = config(
        policy={"idle_timeout": "10m"},
        routes=[
            {"prefix": "/api/", "upstream": "http://x", "idle_timeout": "2m"},
            {"prefix": "/b/", "upstream": "http://x", "idle_timeout": "10m"},
        ],
    )
    assert [r.idle_timeout for r in loaded.routes] == [120.0, 600.0]


def test_a_zero_idle_timeout_is_refused():
    assert problems(policy={"idle_timeout": 0})


@pytest.mark.parametrize("key", ["connect_timeout", "read_timeout", "keepalive_timeout"])
def test_zero_upstream_timeouts_are_refused(key: str):
    assert any(p.startswith(f"forward.{key}:") for p in problems(forward={key: 0}))


@pytest.mark.parametrize("missing", ["exp", "iat"])
def test_required_claims_must_keep_exp_and_iat(missing: str):
    claims = [c for c in ("exp", "iat", "jti") if c != missing]
    assert any(missing in p for p in problems(policy={"required_claims": claims}))


def test_tracking_by_sid_requires_the_session_claim():
    found = problems(policy={"track_by": "sid"})
    assert any("sid" in p for p in found)
    loaded = config(policy={"track_by": "sid", "required_claims": ["exp", "iat", "sid"]})
    assert loaded.policy.track_by == "sid"


def test_duplicate_route_prefixes_and_provider_issuers_are_refused():
    assert problems(
        routes=[
            {"prefix": "/api/", "upstream": "http://a"},
            {"prefix": "/api/", "upstream": "http://b"},
        ]
    )
    assert problems(
        providers=[
            provider(name="a", public_key_file="/k"),
            provider(name="b", public_key_file="/k"),
        ]
    )


# -- providers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        {"jwks_uri": "https://issuer.test/jwks"},
        {"discovery": True},
        {"jwks_file": "/keys/jwks.json"},
        {"public_key_file": "/keys/public.pem"},
        {"hmac_secret_env": "HMAC_SECRET", "algorithms": ["HS256"]},
    ],
    ids=lambda source: next(iter(source)),
)
def test_each_single_key_source_is_accepted(source: dict[str, Any]):
    assert config(providers=[provider(**source)]).providers[0].name == "main"


@pytest.mark.parametrize(
    "sources",
    [
        {},
        {"jwks_uri": "https://issuer.test/jwks", "public_key_file": "/k.pem"},
        {"discovery": True, "jwks_file": "/jwks.json"},
    ],
    ids=["none", "jwks_uri+public_key_file", "discovery+jwks_file"],
)
def test_a_provider_needs_exactly_one_key_source(sources: dict[str, Any]):
    found = problems(providers=[provider(**sources)])
    assert len(found) == 1
    assert found[0].startswith("providers.0: ") and "exactly one key source" in found[0]


def test_hmac_algorithms_only_with_hmac_secret_env():
    found = problems(providers=[provider(public_key_file="/k.pem", algorithms=["RS256", "HS256"])])
    assert len(found) == 1 and "HS256" in found[0]
    found = problems(providers=[provider(jwks_uri="https://i/jwks", algorithms=["HS512"])])
    assert len(found) == 1 and "HS512" in found[0]


def test_an_hmac_provider_allows_only_hmac_algorithms():
    found = problems(providers=[provider(hmac_secret_env="S", algorithms=["HS256", "RS256"])])
    assert len(found) == 1 and "HS256" in found[0]


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(alg: str):
    found = problems(providers=[provider(public_key_file="/k.pem", algorithms=["RS256", alg])])
    assert found == ["providers.0.algorithms: 'none' is never accepted"]


def test_unknown_algorithms_and_non_http_jwks_uris_are_refused():
    found = problems(providers=[provider(jwks_uri="file:///etc/jwks", algorithms=["RS1"])])
    assert {p.split(":")[0] for p in found} == {
        "providers.0.algorithms",
        "providers.0.jwks_uri",
    }


# -- secrets are masked ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://app:s3cret@redis:6379/0", "redis://app:***@redis:6379/0"),
        ("rediss://app:s3cret@redis:6380/1", "rediss://app:***@redis:6380/1"),
        (
            "redis+sentinel://:s3cret@s1:26379,s2:26379/mymaster",
            "redis+sentinel://:***@s1:26379,s2:26379/mymaster",
        ),
        ("redis+cluster://:s3cret@n1:7000,n2:7000", "redis+cluster://:***@n1:7000,n2:7000"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("memory://", "memory://"),
    ],
)
def test_mask_url_hides_the_password(url: str, masked: str):
    assert mask_url(url) == masked


def test_masked_config_hides_the_redis_password_from_the_environment():
    loaded = config({"IDLEGATE_STORE__URL": "redis://:s3cret@h:6379/0"})
    assert loaded.store.url == "redis://:s3cret@h:6379/0"  # the real one is still used
    shown = loaded.masked()
    assert shown["store"]["url"] == "redis://:***@h:6379/0"
    assert "s3cret" not in yaml.safe_dump(shown)


@pytest.mark.parametrize(
    "url",
    [
        # The store factory reads the sentinels' own password from the query.
        "redis+sentinel://:pw@s1:26379/mymaster?sentinel_password=s3cret",
        # redis-py takes the password from the query as well.
        "redis://redis:6379/0?password=s3cret",
        # Not percent-encoded, yet accepted: the userinfo ends at the last '@'.
        "redis://:pa@s3cret@redis:6379/0",
    ],
)
def test_masked_config_hides_every_form_of_store_password(url: str):
    shown = yaml.safe_dump(config(store={"url": url}).masked())
    assert "s3cret" not in shown


# -- file paths relative to the config file --------------------------------------------------


def test_relative_key_and_token_paths_are_relative_to_the_config_file(tmp_path: Path):
    directory = tmp_path / "etc" / "idlegate"
    directory.mkdir(parents=True)
    data = copy.deepcopy(MINIMAL)
    data["providers"] = [
        provider(name="a", issuer="https://a/", public_key_file="keys/public.pem"),
        provider(name="b", issuer="https://b/", jwks_file="../jwks.json"),
        provider(name="c", issuer="https://c/", public_key_file="/abs/public.pem"),
    ]
    data["admin"] = {"token_file": "admin.token"}
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    loaded = load(path, environ={})
    assert loaded.providers[0].public_key_file == directory / "keys" / "public.pem"
    assert loaded.providers[1].jwks_file == directory / ".." / "jwks.json"
    assert loaded.providers[2].public_key_file == Path("/abs/public.pem")
    assert loaded.admin.token_file == directory / "admin.token"


def test_the_shipped_example_configs_are_valid():
    repo = Path(__file__).resolve().parents[2]
    for name in ("gateway.yaml", "redis.yaml"):
        loaded = load(repo / "config" / name, environ={})
        assert loaded.providers[0].public_key_file == repo / "config" / "dev-public.pem"
        assert loaded.providers[0].public_key_file.is_file()


@pytest.mark.parametrize("name", ["gateway.yaml", "redis.yaml"])
def test_a_preset_chosen_in_the_shipped_example_takes_effect(name: str):
    """The example says presets "fill the defaults below": an operator who sets
    `preset: nist-aal2` there must get its 30 min idle timeout and 12 h session cap, not the
    example's spelled-out defaults (explicit keys win, so the example must leave them unset)."""
    repo = Path(__file__).resolve().parents[2]
    loaded = load(repo / "config" / name, environ={"IDLEGATE_POLICY__PRESET": "nist-aal2"})
    assert loaded.policy.idle_timeout == PRESETS["nist-aal2"]["idle_timeout"]
    assert loaded.policy.max_session_age == PRESETS["nist-aal2"]["max_session_age"]


# -- forward.trusted_proxies -----------------------------------------------------------------


def test_trusted_proxies_default_to_none_and_parse_as_networks():
    assert config().forward.trusted_proxies == []
    parsed = config(forward={"trusted_proxies": ["10.0.0.0/8", "::1/128", "192.0.2.7"]})
    assert [str(n) for n in parsed.forward.trusted_proxies] == [
        "10.0.0.0/8",
        "::1/128",
        "192.0.2.7/32",
    ]
    assert parsed.masked()["forward"]["trusted_proxies"] == [
        "10.0.0.0/8",
        "::1/128",
        "192.0.2.7/32",
    ]


def test_trusted_proxies_from_the_environment():
    parsed = config({"IDLEGATE_FORWARD__TRUSTED_PROXIES": "[10.1.0.0/16, 'fd00::/8']"})
    assert [str(n) for n in parsed.forward.trusted_proxies] == ["10.1.0.0/16", "fd00::/8"]


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("10.0.0.1/8", "has host bits set"),
        ("garbage", "does not appear to be an IPv4 or IPv6 network"),
        ("10.0.0.0/33", "does not appear to be an IPv4 or IPv6 network"),
        (8, "expected a CIDR"),
    ],
)
def test_a_bad_trusted_proxy_is_a_problem_at_its_index(entry: object, why: str):
    found = problems(forward={"trusted_proxies": ["127.0.0.0/8", entry]})
    assert len(found) == 1
    assert found[0].startswith("forward.trusted_proxies.1: ") and why in found[0], found


# -- real identity providers' shapes (issue 14) --------------------------------------------


def test_token_ids_default_to_jti_uti_digest_and_jti_is_not_required():
    loaded = config()
    assert loaded.policy.token_id == ["jti", "uti", "digest"]
    assert loaded.policy.required_claims == ["exp", "iat"]
    assert loaded.providers[0].audience_claims == ["aud"]
    assert loaded.providers[0].roles_claim is None
    assert loaded.routes[0].roles == []


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({"token_id": []}, "policy.token_id: is empty, so no token could be identified"),
        ({"token_id": ["digest", "jti"]}, "policy.token_id: digest is always present"),
        ({"token_id": ["jti", "jti"]}, "policy.token_id: 'jti' is listed twice"),
        ({"track_by": "sid"}, "policy.required_claims: must include sid"),
    ],
)
def test_token_id_settings_that_cannot_work_are_explained(policy: dict[str, Any], expected: str):
    assert any(p.startswith(expected) for p in problems(policy=policy)), problems(policy=policy)


def test_tracking_by_sid_needs_no_token_id():
    assert config(
        policy={"track_by": "sid", "token_id": [], "required_claims": ["exp", "iat", "sid"]}
    )


def test_roles_on_a_route_need_a_provider_with_roles_claim():
    routes = [{"prefix": "/api/", "upstream": "http://a", "roles": ["admin"]}]
    found = problems(routes=routes)
    assert any(p.startswith("routes.0.roles: no provider sets roles_claim") for p in found)
    with_claim = [provider(public_key_file="/k", roles_claim="realm_access.roles")]
    assert config(routes=routes, providers=with_claim).routes[0].roles == ["admin"]


def test_scopes_or_roles_on_a_public_route_are_refused():
    routes = [{"prefix": "/p/", "upstream": "http://a", "auth": "none", "scopes": ["x"]}]
    assert any(
        p.startswith("routes.0: scopes/roles need auth: required") for p in problems(routes=routes)
    )


@pytest.mark.parametrize("second", ["/API/", "/Api", "/api"])
def test_route_prefixes_differing_only_in_case_or_a_trailing_slash_are_refused(second: str):
    routes = [
        {"prefix": "/api/", "upstream": "http://orders:8000"},
        {"prefix": second, "upstream": "http://other:8000", "auth": "none"},
    ]
    assert problems(routes=routes) == [
        f"routes.1.prefix: {second!r} is the same route as '/api/' to an upstream that ignores "
        "letter case or a trailing slash; must be unique"
    ]


def test_issuer_may_be_a_list_each_unique_across_providers():
    tenants = [
        "https://login.microsoftonline.com/t1/v2.0",
        "https://login.microsoftonline.com/t2/v2.0",
    ]
    loaded = config(providers=[provider(issuer=tenants, public_key_file="/k")])
    assert loaded.providers[0].issuers == tenants
    clash = [
        provider(name="a", issuer=tenants, public_key_file="/k"),
        provider(name="b", issuer=tenants[1], public_key_file="/k"),
    ]
    assert any(
        p.startswith("providers.1.issuer: ") and "twice" in p for p in problems(providers=clash)
    )
    assert problems(providers=[provider(issuer=[], public_key_file="/k")])
    template = "https://login.microsoftonline.com/{tenantid}/v2.0"
    found = problems(providers=[provider(issuer=[template], discovery=True)])
    assert any(p.startswith("providers.0.issuer: discovery needs each tenant") for p in found)


@pytest.mark.parametrize(
    "fields", [{"audience_claims": ["sub"]}, {"audience_claims": []}, {"roles_claim": "a..b"}]
)
def test_bad_audience_claims_or_roles_claim_are_refused(fields: dict[str, Any]):
    assert problems(providers=[provider(public_key_file="/k", **fields)])


def test_slow_client_limits_default_to_the_contract_values():
    server = config().server
    assert (server.header_timeout, server.keepalive_timeout, server.max_connections) == (
        10.0,
        75.0,
        10000,
    )


def test_slow_client_limits_must_be_positive():
    found = problems(server={"header_timeout": 0, "keepalive_timeout": "0s", "max_connections": 0})
    assert {p.split(":")[0] for p in found} == {
        "server.header_timeout",
        "server.keepalive_timeout",
        "server.max_connections",
    }


# -- misspelled environment variables ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("IDLEGATE_POLICI__IDLE_TIMEOUT", "IDLEGATE_POLICY__IDLE_TIMEOUT"),
        ("IDLEGATE_STOR__URL", "IDLEGATE_STORE__URL"),
        ("IDLEGATE_STORE_URL", "IDLEGATE_STORE__URL"),  # one underscore where two were meant
        ("IDLEGATE_PROVIDER__0__ISSUER", "IDLEGATE_PROVIDERS__0__ISSUER"),
        ("IDLEGATE_POLICY_IDLE_TIMEOUT", "IDLEGATE_POLICY__IDLE_TIMEOUT"),
    ],
)
def test_an_env_variable_for_no_config_section_is_warned_about_with_the_closest_name(
    name: str, suggestion: str
):
    (warning,) = env_warnings({name: "5m"})
    assert warning.startswith(f"{name}: ignored")
    assert warning.endswith(f"did you mean {suggestion}?")
    # ... and it still changes nothing (nor fails the load).
    assert config({name: "5m"}).policy.idle_timeout == 900


def test_an_env_variable_like_no_section_lists_the_sections():
    (warning,) = env_warnings({"IDLEGATE_XYZZY__A": "1"})
    assert "sections are admin, " in warning and "store" in warning


@pytest.mark.parametrize(
    "name",
    [
        "IDLEGATE_SERVICE_HOST",
        "IDLEGATE_SERVICE_PORT",
        "IDLEGATE_SERVICE_PORT_HTTP",
        "IDLEGATE_PORT",
        "IDLEGATE_PORT_8080_TCP",
        "IDLEGATE_PORT_8080_TCP_ADDR",
        "IDLEGATE_PORT_8080_TCP_PROTO",
        "IDLEGATE_METRICS_SERVICE_HOST",
        "IDLEGATE_REDIS_PORT_6379_TCP_PORT",
        "IDLEGATE_CONFIG",
        "IDLEGATE_STORE__URL",  # a real setting
        "IDLEGATE_POLICY__IDLE_TIMEOUT",
    ],
)
def test_kubernetes_service_links_and_real_settings_are_not_warned_about(name: str):
    assert env_warnings({name: "tcp://10.0.0.1:8080"}) == []


@pytest.mark.parametrize(
    "name",
    ["X-Forwarded-For", "x-real-ip", "X-Forwarded-Host", "X-Request-ID", "Host", "Authorization"],
)
def test_an_identity_header_cannot_be_one_the_gateway_sets(name: str):
    found = problems(forward={"identity_headers": {name: "sub"}})
    assert len(found) == 1
    assert found[0].startswith("forward.identity_headers")
    assert "set by the gateway itself" in found[0]
    assert config(forward={"identity_headers": {"X-Forwarded-User": "sub"}})


def test_a_websocket_activity_interval_at_or_over_a_websocket_routes_idle_timeout_is_refused():
    """Client messages are written as activity once per interval: at or above the idle
    timeout a socket in steady use would be closed idle_timeout (non-WebSocket routes and a
    shorter interval are fine)."""
    routes = [
        {
            "prefix": "/ws/",
            "upstream": "http://127.0.0.1:1",
            "websocket": True,
            "idle_timeout": "5s",
        },
        {"prefix": "/api/", "upstream": "http://127.0.0.1:1", "idle_timeout": "3s"},
    ]
    with pytest.raises(ConfigError, match=r"websocket_activity_interval: 10s .*routes\.0 \(5s"):
        config(routes=routes)
    config(routes=routes, forward={"websocket_activity_interval": "4s"})
