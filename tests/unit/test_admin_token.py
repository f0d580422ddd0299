"""admin.token_file: what makes it usable, checked offline (serve and check-config share it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.admin import AdminToken, AdminTokenError, load_admin_token


def test_the_token_is_the_file_without_surrounding_whitespace(tmp_path: Path):
    path = tmp_path / "token"
    path.write_bytes(b"  s3cret\r\n")
    assert load_admin_token(path) == b"s3cret"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read"),
        (b"", "is empty"),
        (b" \n\t\n", "is empty"),
        (b"two words", "spaces or control characters"),
        (b"tab\tinside", "spaces or control characters"),
    ],
)
def test_an_unusable_token_file_is_an_error_naming_the_field(
    tmp_path: Path, content: bytes | None, problem: str
):
    path = tmp_path / "token"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AdminTokenError) as raised:
        load_admin_token(path)
    assert str(raised.value).startswith("admin.token_file: ")
    assert problem in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_directory_is_not_a_token_file(tmp_path: Path):
    with pytest.raises(AdminTokenError, match="cannot read"):
        AdminToken(tmp_path)


def test_matches_compares_the_bytes_sent(tmp_path: Path):
    path = tmp_path / "token"
    path.write_bytes(b"abc\xff")
    token = AdminToken(path)
    assert token.matches(b"abc\xff")
    assert not token.matches(b"abc")
    assert not token.matches(b"abc\xff\xff")
    assert not token.matches(b"")
