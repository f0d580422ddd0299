"""Values a client or a token chose, logged through `quoted` / `printable`: one line, no raw
control characters, and the value still readable (and, quoted, recoverable with json.loads).
Finding F10: a `sub` with a newline forged an `idlegate.audit` line in the text log."""

from __future__ import annotations

import io
import json
import logging

import pytest

from gateway.logs import printable, quoted

FORGED = 'bob)\n2026-12-03 13:00:00,000 INFO idlegate.audit admin: revoked jti="all"\r\x1b[2K'
NASTY = [
    FORGED,
    "tab\there",
    "nul\x00del\x7fc1\x85",
    "line\u2028para\u2029",
    "bidi\u202eoverride\u2066",
    "tag\U000e0041",
    "lone\udcffsurrogate",
    'quote"back\\slash',
]


def logged(message: str, *args: object) -> str:
    """What a text log handler writes for one record."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger = logging.getLogger("idlegate.test.injection")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning(message, *args)
    finally:
        logger.removeHandler(handler)
    return out.getvalue()


def test_a_claim_with_newline_cr_and_escape_is_logged_on_one_line():
    text = logged("websocket closed: %s (jti=%s sub=%s)", "expired", quoted("j-1"), quoted(FORGED))
    assert text.count("\n") == 1 and text.endswith("\n")
    assert "\r" not in text and "\x1b" not in text
    assert '(jti="j-1" sub="bob)\\n2026-12-03 13:00:00,000 INFO idlegate.audit' in text
    assert text.rstrip("\n").endswith('revoked jti=\\"all\\"\\r\\u001b[2K")')


@pytest.mark.parametrize("value", NASTY)
def test_quoted_is_one_printable_json_string_that_gives_the_value_back(value: str):
    rendered = quoted(value)
    assert rendered.isprintable()
    assert json.loads(rendered) == value
    # One value: its own quotes are the only unescaped ones.
    assert rendered.startswith('"') and rendered.endswith('"')
    assert '"' not in rendered[1:-1].replace("\\\\", "").replace('\\"', "")


@pytest.mark.parametrize("value", NASTY)
def test_printable_text_has_no_control_or_format_character(value: str):
    rendered = printable(value)
    assert rendered.isprintable()
    assert json.loads('"' + rendered.replace('"', '\\"') + '"') == value


def test_ordinary_values_read_as_they_are():
    assert quoted("user-1@example.com") == '"user-1@example.com"'
    assert quoted("José Ñúñez") == '"José Ñúñez"'  # printable non-ASCII stays readable
    assert quoted(None) == "null"
    assert printable("ConnectionError: Error 111 connecting to 127.0.0.1:6379.") == (
        "ConnectionError: Error 111 connecting to 127.0.0.1:6379."
    )
