"""Config input that cannot be read at all (not UTF-8, nested too deep, values PyYAML cannot
build, a NUL in a file path): one `ConfigError` naming the file, variable or key, never
another exception."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml

from gateway.config import ConfigError, load

MINIMAL = """\
providers:
  - {name: main, issuer: "https://issuer.test/", audiences: [a], public_key_file: /k.pem}
routes:
  - {prefix: /api/, upstream: "http://orders:8000"}
"""


def problems_loading(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(path, environ={} if environ is None else environ)
    return caught.value.problems


def test_a_file_that_is_not_utf8_is_one_problem_naming_it(tmp_path: Path):
    path = tmp_path / "utf16.yaml"
    path.write_bytes("listen: {port: 1}\n".encode("utf-16"))
    (problem,) = problems_loading(path)
    assert problem.startswith(f"{path}: not UTF-8 text")


@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 5000,
        "a: " + "{a: " * 5000,
        "\n".join(" " * depth + "a:" for depth in range(3000)),  # block style
    ],
)
def test_yaml_nested_too_deep_in_the_file_is_one_problem_naming_it(tmp_path: Path, text: str):
    path = tmp_path / "deep.yaml"
    path.write_text(text + "\n")
    (problem,) = problems_loading(path)
    assert problem == f"{path}: nested too deeply to read (no config needs more than a few levels)"


def test_yaml_nested_too_deep_in_an_environment_value_names_the_variable(tmp_path: Path):
    path = tmp_path / "gateway.yaml"
    path.write_text(MINIMAL)
    (problem,) = problems_loading(path, {"IDLEGATE_POLICY__IDLE_TIMEOUT": "[" * 3000})
    assert problem.startswith("IDLEGATE_POLICY__IDLE_TIMEOUT: nested too deeply")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: 2020-13-45", "line 1: not a valid timestamp value"),
        ("a: 1\nb: !!int s3cret", "line 2: not a valid int value"),
        ("a: !!float s3cret", "line 1: not a valid float value"),
        ("a: " + "1" * 5000, "line 1: not a valid int value"),
        ("? !!set {a}\n: 1", "line 1: found unhashable key"),
        ("a: \x01", "character 4: special characters are not allowed"),
    ],
)
def test_values_pyyaml_cannot_build_are_a_yaml_problem_at_their_line(
    tmp_path: Path, text: str, problem: str
):
    path = tmp_path / "gateway.yaml"
    path.write_text(text + "\n")
    (found,) = problems_loading(path)
    assert found == f"{path}: {problem}"
    assert "s3cret" not in found


def test_an_environment_value_yaml_cannot_build_is_taken_as_a_string(tmp_path: Path):
    path = tmp_path / "gateway.yaml"
    path.write_text(MINIMAL)
    config = load(path, environ={"IDLEGATE_STORE__KEY_PREFIX": "2020-13-45"})
    assert config.store.key_prefix == "2020-13-45"


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ('admin: {token_file: "a\\0b"}\n', "admin.token_file"),
        (MINIMAL.replace("/k.pem", '"/k\\0.pem"'), "providers.0.public_key_file"),
    ],
)
def test_a_nul_in_a_file_path_is_refused_at_load(tmp_path: Path, where: str, field: str):
    path = tmp_path / "gateway.yaml"
    text = where if where.startswith("providers") else MINIMAL + where
    path.write_text(text)
    assert f"{field}: a file path cannot contain a NUL character" in problems_loading(path)


def test_every_problem_of_a_fuzzed_file_is_a_config_error(tmp_path: Path):
    """Truncations of a real config at every point: each loads or is a ConfigError."""
    text = (Path(__file__).resolve().parents[2] / "config" / "gateway.yaml").read_text()
    path = tmp_path / "cut.yaml"
    for end in range(0, len(text), 7):
        path.write_text(text[:end])
        with contextlib.suppress(ConfigError):
            load(path, environ={})
    assert yaml.safe_load(text)  # the whole file is still YAML
