"""The command line in process (`main([...])`): what check-config and token print, and every
error path as one `idlegate: ...` line on stderr with a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwks_server import SigningKey, ec_key, ed25519_key, rsa_key

from gateway import __version__
from gateway.cli import main

REPO = Path(__file__).resolve().parents[2]
GATEWAY_YAML = REPO / "config" / "gateway.yaml"
DEV_PRIVATE = REPO / "config" / "dev-private.pem"
DEV_PUBLIC = REPO / "config" / "dev-public.pem"


@pytest.fixture(autouse=True)
def no_idlegate_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's own IDLEGATE_* variables must not change what these tests see."""
    for name in list(os.environ):
        if name.startswith("IDLEGATE_"):
            monkeypatch.delenv(name)


def exit_code(argv: list[str]) -> int:
    """main()'s result, whether it returns or exits (argparse and config errors exit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert lines, "nothing on stderr"
    assert all(line.startswith("idlegate: ") for line in lines), lines
    return lines


# -- check-config ------------------------------------------------------------------------------


def test_check_config_prints_the_effective_config_and_exits_0(capsys: pytest.CaptureFixture[str]):
    assert main(["check-config", "-c", str(GATEWAY_YAML)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["policy"]["idle_timeout"] == 900
    assert printed["providers"][0]["public_key_file"] == str(DEV_PUBLIC)


def test_check_config_masks_the_store_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("IDLEGATE_STORE__URL", "redis://:s3cret@h:6379/0")
    assert main(["check-config", "-c", str(GATEWAY_YAML)]) == 0
    captured = capsys.readouterr()
    assert "s3cret" not in captured.out + captured.err
    assert "redis://:***@h:6379/0" in captured.out


def test_check_config_reads_idlegate_config_then_the_default_path(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    elsewhere = tmp_path / "elsewhere.yaml"
    data = yaml.safe_load(GATEWAY_YAML.read_text())
    data["providers"][0]["public_key_file"] = str(DEV_PUBLIC)
    data["listen"]["port"] = 8181
    elsewhere.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("IDLEGATE_CONFIG", str(elsewhere))
    assert main(["check-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["listen"]["port"] == 8181

    monkeypatch.delenv("IDLEGATE_CONFIG")
    monkeypatch.chdir(REPO)
    assert main(["check-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["listen"]["port"] == 8080


def test_check_config_on_a_missing_file_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    assert exit_code(["check-config", "-c", str(tmp_path / "missing.yaml")]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "missing.yaml" in lines[0]


def test_check_config_lists_every_problem_as_path_and_reason(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    path = tmp_path / "broken.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "policy": {"idle_timeout": "later", "preset": "strict"},
                "listen": {"port": -1},
                "providers": [{"name": "p", "issuer": "i", "audiences": ["a"]}],
                "routes": [{"prefix": "/api/", "upstream": "http://x", "stripprefix": True}],
            }
        )
    )
    assert exit_code(["check-config", "-c", str(path)]) == 2
    lines = error_lines(capsys)
    paths = [line.removeprefix("idlegate: ").split(": ")[0] for line in lines]
    assert sorted(paths) == [
        "listen.port",
        "policy.idle_timeout",
        "policy.preset",
        "providers.0",
        "routes.0.stripprefix",
    ]


def test_check_config_on_yaml_that_is_not_a_mapping(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert exit_code(["check-config", "-c", str(path)]) == 2
    assert len(error_lines(capsys)) == 1


def test_serve_with_a_bad_config_exits_2_before_starting(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    assert exit_code(["serve", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert len(error_lines(capsys)) == 1


@pytest.fixture
def serve_never_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Config-error tests of `serve`: had the config been accepted, serve returns 0 at once
    (the test fails) instead of running the gateway until killed."""
    import gateway.serve

    monkeypatch.setattr(gateway.serve, "run", lambda *_: 0)


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize("case", ["not utf-8", "deep file", "deep env", "bad timestamp"])
@pytest.mark.usefixtures("serve_never_starts")
def test_config_files_that_cannot_be_read_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    command: str,
    case: str,
):
    path = tmp_path / "gateway.yaml"
    named = str(path)
    if case == "not utf-8":
        path.write_bytes(b"\xff\xfe\x00bad")
    elif case == "deep file":
        path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    elif case == "bad timestamp":
        path.write_text("a: 2020-13-45\n")
    else:
        path.write_text(GATEWAY_YAML.read_text())
        monkeypatch.setenv("IDLEGATE_POLICY__IDLE_TIMEOUT", "[" * 3000)
        named = "IDLEGATE_POLICY__IDLE_TIMEOUT"
    assert exit_code([command, "-c", str(path)]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"idlegate: {named}: ")


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret@127.0.0.1:9/0?bogus_option=1",
        "redis://:s3cret@127.0.0.1:9/0?ssl_cert_reqs=required",
        "rediss://:s3cret@127.0.0.1:9/0?ssl_cert_reqs=bogus",
    ],
)
@pytest.mark.usefixtures("serve_never_starts")
def test_store_url_options_are_checked_offline_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str, url: str
):
    monkeypatch.setenv("IDLEGATE_STORE__URL", url)
    assert exit_code([command, "-c", str(GATEWAY_YAML)]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("idlegate: store.url: ")
    assert "s3cret" not in line and ":***@127.0.0.1:9" in line


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        ("IDLEGATE_STORE__TIMEOUT", "0", "store.timeout: must be positive"),
        ("IDLEGATE_STORE__REVOCATION_POLL", "0s", "store.revocation_poll: must be positive"),
        ("IDLEGATE_POLICY__MAX_SESSION_AGE", "0", "policy.max_session_age: must be positive"),
        ("IDLEGATE_POLICY__LEEWAY", "1.0e+300", "policy.leeway: a duration cannot be over"),
        ("IDLEGATE_POLICY__IDLE_TIMEOUT", "1.0e+300", "policy.idle_timeout: a duration cannot"),
        ("IDLEGATE_PROVIDERS__0__JWKS_MIN_REFRESH", "0", "providers.0.jwks_min_refresh: must be"),
        ("IDLEGATE_ROUTES__0__PREFIX", "/q?x", "routes.0.prefix: '/q?x' contains '?'"),
        ("IDLEGATE_ROUTES__0__PREFIX", "/a/../b/", "routes.0.prefix: '/a/../b/' is not in the"),
        ("IDLEGATE_ROUTES__0__PREFIX", "/c%2fd/", "routes.0.prefix: '/c%2fd/' can never match"),
        ("IDLEGATE_LISTEN__HOST", "not a host!", "listen.host: 'not a host!' is neither"),
        ("IDLEGATE_ADMIN__HOST", "[::1]", "admin.host: write an IPv6 address without brackets"),
    ],
)
@pytest.mark.usefixtures("serve_never_starts")
def test_values_that_cannot_work_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    variable: str,
    value: str,
    line: str,
):
    """Durations, route prefixes and hosts that cannot work."""
    monkeypatch.setenv(variable, value)
    assert exit_code([command, "-c", str(GATEWAY_YAML)]) == 2
    (found,) = error_lines(capsys)
    assert found.startswith(f"idlegate: {line}")


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            OSError(98, "error while attempting to bind on address ('127.0.0.1', 9090): in use"),
            "idlegate: cannot listen (admin 127.0.0.1:9090): in use",
        ),
        (
            socket.gaierror(-2, "Name or service not known"),
            "idlegate: cannot listen (listen nowhere.invalid:8080): Name or service not known",
        ),
    ],
)
def test_serve_failing_to_listen_names_the_listener_key(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    error: OSError,
    line: str,
):
    import gateway.serve

    def cannot_listen(*_: object) -> int:
        raise error

    monkeypatch.setattr(gateway.serve, "run", cannot_listen)
    monkeypatch.setenv("IDLEGATE_LISTEN__HOST", "nowhere.invalid")
    assert exit_code(["serve", "-c", str(GATEWAY_YAML)]) == 1
    assert error_lines(capsys) == [line]


def test_serve_refuses_several_workers_with_the_memory_store(capsys: pytest.CaptureFixture[str]):
    assert exit_code(["serve", "-c", str(GATEWAY_YAML), "--workers", "3"]) == 2
    (line,) = error_lines(capsys)
    assert "memory" in line and "redis://" in line


# -- flags -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nonsense"],
        ["serve", "--workers", "0"],
        ["serve", "--workers", "-2"],
        ["serve", "--workers", "1.5"],
        ["token"],
        ["token", "--key", str(DEV_PRIVATE), "--ttl", "a while"],
        ["token", "--key", str(DEV_PRIVATE), "--ttl", "-5m"],
        ["check-config", "--unknown"],
        ["demo", "--idle-timeout", "soon"],
    ],
    ids=lambda argv: " ".join(argv) or "(nothing)",
)
def test_bad_flags_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], argv: list[str]):
    assert exit_code(argv) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1
    assert "--help" in lines[0]  # says where to look


def test_version_and_help(capsys: pytest.CaptureFixture[str]):
    assert exit_code(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    assert exit_code(["token", "--help"]) == 0
    assert "--key" in capsys.readouterr().out


# -- token -----------------------------------------------------------------------------------


def test_token_defaults_are_a_ten_minute_dev_token(capsys: pytest.CaptureFixture[str]):
    assert main(["token", "--key", str(DEV_PRIVATE)]) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(
        token,
        DEV_PUBLIC.read_bytes(),
        algorithms=["RS256"],
        audience="orders-api",
        issuer="https://issuer.example/",
    )
    assert claims["sub"] == "dev-user"
    assert claims["exp"] - claims["iat"] == 600
    assert "sid" not in claims and "scope" not in claims
    assert "kid" not in jwt.get_unverified_header(token)


def test_token_flags_become_claims(capsys: pytest.CaptureFixture[str]):
    argv = ["token", "--key", str(DEV_PRIVATE), "--sub", "alice", "--ttl", "5m"]
    argv += ["--aud", "A", "--iss", "I", "--sid", "S", "--scope", "a b", "--kid", "k1"]
    assert main(argv) == 0
    token = capsys.readouterr().out.strip()
    assert jwt.get_unverified_header(token)["kid"] == "k1"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert {k: claims[k] for k in ("sub", "aud", "iss", "sid", "scope")} == {
        "sub": "alice",
        "aud": "A",
        "iss": "I",
        "sid": "S",
        "scope": "a b",
    }
    assert claims["exp"] - claims["iat"] == 300


def test_two_tokens_have_different_jtis(capsys: pytest.CaptureFixture[str]):
    main(["token", "--key", str(DEV_PRIVATE)])
    main(["token", "--key", str(DEV_PRIVATE)])
    first, second = capsys.readouterr().out.split()
    assert (
        jwt.decode(first, options={"verify_signature": False})["jti"]
        != jwt.decode(second, options={"verify_signature": False})["jti"]
    )


@pytest.mark.parametrize(
    ("make_key", "alg"),
    [(lambda: ec_key(alg="ES256"), "ES256"), (lambda: ec_key(alg="ES384"), "ES384"),
     (ed25519_key, "EdDSA"), (rsa_key, "RS256")],
    ids=["ES256", "ES384", "EdDSA", "RS256"],
)  # fmt: skip
def test_token_signs_with_the_algorithm_of_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, make_key: Callable[[], SigningKey], alg: str
):
    key = make_key()
    path = tmp_path / "key.pem"
    path.write_bytes(key.private_pem())
    assert main(["token", "--key", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    assert jwt.get_unverified_header(token)["alg"] == alg
    jwt.decode(token, key.public_key, algorithms=[alg], audience="orders-api")


def test_token_with_a_missing_key_file_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    assert main(["token", "--key", str(tmp_path / "nope.pem")]) == 2
    (line,) = error_lines(capsys)
    assert "nope.pem" in line


@pytest.mark.parametrize(
    "content",
    [
        b"not a key",
        DEV_PUBLIC.read_bytes(),  # a public key cannot sign
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
    ids=["garbage", "public-key", "truncated"],
)
def test_token_with_an_unusable_key_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes
):
    path = tmp_path / "key.pem"
    path.write_bytes(content)
    assert main(["token", "--key", str(path)]) == 2
    (line,) = error_lines(capsys)
    assert "key.pem" in line


def test_token_with_an_encrypted_key_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "encrypted.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    assert main(["token", "--key", str(path)]) == 2
    (line,) = error_lines(capsys)
    assert "unencrypted" in line


def test_token_with_an_unsupported_curve_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    key = ec.generate_private_key(ec.SECP256K1())
    path = tmp_path / "k1.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert main(["token", "--key", str(path)]) == 2
    (line,) = error_lines(capsys)
    assert "unsupported" in line


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"policy": {"track_by": "jti", "token_id": []}},
            ["policy.token_id: is empty, so no token could be identified"],
        ),
        (
            {
                "providers": [
                    {
                        "name": "entra",
                        "issuer": ["https://login.microsoftonline.com/{tenantid}/v2.0"],
                        "audiences": ["a"],
                        "discovery": True,
                    }
                ],
                "routes": [{"prefix": "/api/", "upstream": "http://x", "roles": ["admin"]}],
            },
            [
                "providers.0.issuer: discovery needs each tenant's own issuer",
                "routes.0.roles: no provider sets roles_claim",
            ],
        ),
    ],
)
def test_check_config_explains_identity_settings_that_cannot_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data: dict[str, Any], expected: list[str]
):
    """Issue 14: an empty token_id with track_by jti, roles nobody provides, a tenant template
    with discovery: each one line that says why, exit 2."""
    base: dict[str, Any] = {
        "providers": [
            {"name": "p", "issuer": "https://i/", "audiences": ["a"], "jwks_uri": "https://i/k"}
        ],
        "routes": [{"prefix": "/api/", "upstream": "http://x"}],
    }
    path = tmp_path / "idp.yaml"
    path.write_text(yaml.safe_dump({**base, **data}))
    assert exit_code(["check-config", "-c", str(path)]) == 2
    lines = [line.removeprefix("idlegate: ") for line in error_lines(capsys)]
    for start in expected:
        assert any(line.startswith(start) for line in lines), lines


# -- check-config refuses what serve refuses ---------------------------------------------------


def shipped(**changes: Any) -> dict[str, Any]:
    """config/gateway.yaml's data, key file made absolute, with sections updated by `changes`."""
    data = yaml.safe_load(GATEWAY_YAML.read_text())
    data["providers"][0]["public_key_file"] = str(DEV_PUBLIC)
    for section, values in changes.items():
        if isinstance(values, dict):
            data[section] = {**data.get(section, {}), **values}
        else:
            data[section] = values
    return data


def provider(**source: Any) -> list[dict[str, Any]]:
    return [{"name": "p", "issuer": "https://p/", "audiences": ["a"], **source}]


def problems_of(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data: dict[str, Any], command: str
) -> list[str]:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    assert exit_code([command, "-c", str(path)]) == 2
    return [line.removeprefix("idlegate: ") for line in error_lines(capsys)]


GARBAGE_PEM = b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"


def refused_configs(tmp_path: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """case -> (config data, the start of the one problem line serve and check-config print)."""
    garbage = tmp_path / "garbage.pem"
    empty = tmp_path / "empty.token"
    if tmp_path.is_dir():  # not when only the case names are wanted
        garbage.write_bytes(GARBAGE_PEM)
        empty.write_text("\n")
    return {
        "missing public_key_file": (
            shipped(providers=provider(public_key_file=str(tmp_path / "no.pem"))),
            "providers.0.public_key_file: ",
        ),
        "garbage public_key_file": (
            shipped(providers=provider(public_key_file=str(garbage))),
            "providers.0.public_key_file: ",
        ),
        "private key as public_key_file": (
            shipped(providers=provider(public_key_file=str(DEV_PRIVATE))),
            "providers.0.public_key_file: ",
        ),
        "unset hmac_secret_env": (
            shipped(providers=provider(hmac_secret_env="NO_SUCH_SECRET", algorithms=["HS256"])),
            "providers.0.hmac_secret_env: environment variable NO_SUCH_SECRET is not set",
        ),
        "missing jwks_file": (
            shipped(providers=provider(jwks_file=str(tmp_path / "no.json"))),
            "providers.0.jwks_file: ",
        ),
        "redis url with a bad port": (
            shipped(store={"url": "redis://redis:port/0"}),
            "store.url: invalid port",
        ),
        "redis url with a named database": (
            shipped(store={"url": "redis://redis:6379/orders"}),
            "store.url: the path must be a database number",
        ),
        "sentinel url without a service": (
            shipped(store={"url": "redis+sentinel://s1:26379"}),
            "store.url: the master's service name is missing",
        ),
        "cluster url with a database": (
            shipped(store={"url": "redis+cluster://n1:7000/3"}),
            "store.url: Redis Cluster has only database 0",
        ),
        "memory url with a host": (shipped(store={"url": "memory://x"}), "store.url: "),
        "unset hash_key_env": (
            shipped(store={"hash_key_env": "NO_SUCH_HASH_KEY"}),
            "store.hash_key_env: environment variable NO_SUCH_HASH_KEY",
        ),
        "admin port is the listen port": (
            shipped(listen={"host": "127.0.0.1", "port": 8080}, admin={"port": 8080}),
            "admin.port: 8080 is also listen.port; each listener needs its own port",
        ),
        "admin port is the port of a wildcard listen": (
            shipped(listen={"host": "0.0.0.0", "port": 9090}),
            "admin.port: 9090 is also listen.port; each listener needs its own port",
        ),
        "missing admin token_file": (
            shipped(admin={"token_file": str(tmp_path / "no.token")}),
            "admin.token_file: ",
        ),
        "empty admin token_file": (
            shipped(admin={"token_file": str(empty)}),
            f"admin.token_file: {empty} is empty",
        ),
        "unreadable admin token_file": (
            shipped(admin={"token_file": str(tmp_path)}),  # a directory
            "admin.token_file: ",
        ),
    }


CASES = list(refused_configs(Path("/nonexistent")))


@pytest.mark.parametrize("case", CASES)
def test_what_serve_refuses_check_config_refuses_with_its_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str
):
    """Serve runs the same checks and prints the same lines (tests/e2e/test_cli_process.py
    runs both commands as processes on the same configs)."""
    data, expected = refused_configs(tmp_path)[case]
    (problem,) = problems_of(capsys, tmp_path, data, "check-config")
    assert problem.startswith(expected), problem
    assert "Traceback" not in problem


def test_check_config_lists_every_start_up_problem_at_once(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    data = shipped(
        admin={"token_file": str(tmp_path / "no.token")},
        store={"url": "redis://:hunter2@redis:port/0", "hash_key_env": "NO_SUCH_HASH_KEY"},
        providers=[
            *provider(public_key_file=str(tmp_path / "no.pem")),
            {**provider(jwks_file=str(tmp_path / "no.json"))[0], "name": "q", "issuer": "Q"},
        ],
    )
    lines = problems_of(capsys, tmp_path, data, "check-config")
    assert sorted(line.split(":")[0] for line in lines) == [
        "admin.token_file",
        "providers.0.public_key_file",
        "providers.1.jwks_file",
        "store.hash_key_env",
        "store.url",
    ]
    assert not any("hunter2" in line for line in lines)


@pytest.mark.parametrize(
    ("listen", "admin"),
    [
        ({"host": "127.0.0.1", "port": 0}, {"host": "127.0.0.1", "port": 0}),  # both ephemeral
        ({"host": "127.0.0.1", "port": 9090}, {"host": "127.0.0.2", "port": 9090}),
        ({"host": "0.0.0.0", "port": 8080}, {"host": "127.0.0.1", "port": 9090}),
    ],
    ids=["port 0", "two loopback addresses", "different ports"],
)
def test_ports_that_do_not_clash_pass(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    listen: dict[str, Any],
    admin: dict[str, Any],
):
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(shipped(listen=listen, admin=admin)))
    assert main(["check-config", "-c", str(path)]) == 0


def test_check_config_accepts_a_good_token_file_and_hmac_secret(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    token = tmp_path / "admin.token"
    token.write_text("s3cret-admin-token\n")
    monkeypatch.setenv("TEST_HMAC", "k" * 32)
    data = shipped(
        admin={"token_file": str(token)},
        providers=[
            *shipped()["providers"],
            *provider(hmac_secret_env="TEST_HMAC", algorithms=["HS256"]),
        ],
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["check-config", "-c", str(path)]) == 0
    assert "k" * 32 not in capsys.readouterr().out


def test_a_too_short_hmac_secret_is_refused_without_showing_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TEST_HMAC", "short-secret")
    data = shipped(providers=provider(hmac_secret_env="TEST_HMAC", algorithms=["HS256"]))
    (problem,) = problems_of(capsys, tmp_path, data, "check-config")
    assert problem.startswith("providers.0.hmac_secret_env: TEST_HMAC: the secret is 12 bytes")
    assert "short-secret" not in problem


def test_check_config_warns_about_a_misspelled_env_section(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("IDLEGATE_POLICI__IDLE_TIMEOUT", "5m")
    monkeypatch.setenv("IDLEGATE_PORT_8080_TCP_ADDR", "10.0.0.1")  # a Kubernetes service link
    assert main(["check-config", "-c", str(GATEWAY_YAML)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "idlegate: warning: IDLEGATE_POLICI__IDLE_TIMEOUT: ignored, 'polici' is not a config "
        "section; did you mean IDLEGATE_POLICY__IDLE_TIMEOUT?"
    ]
    assert yaml.safe_load(captured.out)["policy"]["idle_timeout"] == 900


def test_every_start_up_error_is_one_startup_error_printing_its_problems():
    """The CLI and each worker catch StartupError alone: an error of a new start-up step that
    did not derive from it would end as a traceback instead of `idlegate: <field>: <reason>`."""
    from gateway.admin import AdminTokenError
    from gateway.config import ConfigError
    from gateway.errors import StartupError
    from gateway.store.factory import StoreConfigError
    from gateway.tokens.keys import KeySourceError

    for error in (AdminTokenError, ConfigError, KeySourceError, StoreConfigError):
        assert issubclass(error, StartupError), error
    assert ConfigError(["a: one", "b: two"]).lines() == ["a: one", "b: two"]
    assert StoreConfigError("store.url: bad").lines() == ["store.url: bad"]
