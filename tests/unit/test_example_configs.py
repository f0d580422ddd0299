"""The shipped example configs are the reference an operator copies from: every key of the
config model is shown in config/gateway.yaml (set, or commented out where setting it would
change behaviour), both files load, and config/redis.yaml is the same file with a Redis URL."""

from __future__ import annotations

import re
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from gateway.config import Config, load

REPO = Path(__file__).resolve().parents[2]
GATEWAY_YAML = REPO / "config" / "gateway.yaml"
REDIS_YAML = REPO / "config" / "redis.yaml"
_COMMENTED_KEY = re.compile(r"#\s*([a-z_]+):(?:\s|$)")


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds directly or as list items. An optional model (`X | None`,
    default None, e.g. forward_auth.listen) is shown as one key, its members in a comment."""
    if get_origin(annotation) is list:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def model_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        yield prefix + name
        nested = _nested_model(field.annotation)
        if nested is not None:
            yield from model_keys(nested, f"{prefix}{name}.")


def set_in(data: Any, path: list[str]) -> bool:
    """Whether the YAML data sets `path` (in any item, for a list)."""
    if not path:
        return True
    if isinstance(data, list):
        return any(set_in(item, path) for item in data)
    return isinstance(data, dict) and path[0] in data and set_in(data[path[0]], path[1:])


def section_text(text: str, section: str) -> str:
    """The lines of one top-level section: from `section:` to the next top-level key."""
    match = re.search(rf"^{section}:.*?(?=^\S|\Z)", text, flags=re.M | re.S)
    return match.group(0) if match else ""


def test_the_walk_sees_nested_and_list_models():
    keys = set(model_keys(Config))
    assert {"store.hash_key_env", "providers.jwks_uri", "routes.prefix", "policy.preset"} <= keys


def test_every_config_key_is_shown_in_the_example_config():
    text = GATEWAY_YAML.read_text()
    data = yaml.safe_load(text)
    missing = []
    for key in model_keys(Config):
        path = key.split(".")
        commented = _COMMENTED_KEY.findall(section_text(text, path[0]))
        if not set_in(data, path) and path[-1] not in commented:
            missing.append(key)
    assert missing == [], f"config/gateway.yaml does not show: {missing}"


@pytest.mark.parametrize("path", [GATEWAY_YAML, REDIS_YAML], ids=lambda p: p.name)
def test_the_example_configs_load(path: Path):
    config = load(path, environ={})
    assert config.providers[0].public_key_file == REPO / "config" / "dev-public.pem"


def test_redis_yaml_is_gateway_yaml_with_a_redis_store():
    """Two hand-kept copies drift (redis.yaml had lost a dozen keys): only the title line and
    store.url may differ."""
    ours, theirs = GATEWAY_YAML.read_text().splitlines(), REDIS_YAML.read_text().splitlines()
    assert len(ours) == len(theirs)
    differing = [(a, b) for a, b in zip(ours, theirs, strict=True) if a != b]
    assert [b.split("#")[0].strip() for _, b in differing] == [
        "",
        "url: redis://127.0.0.1:6379/0",
    ], differing
