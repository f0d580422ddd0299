"""The refusal renderer: whatever a detail holds, the challenge stays inside RFC 6750's charset."""

from __future__ import annotations

import json
import re

import pytest

from gateway.pipeline import render_refusal
from gateway.reasons import Reason, Refusal

RFC6750 = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")


@pytest.mark.parametrize(
    "detail",
    [
        "bad\r\nX-Injected: 1",
        'quote " and back\\slash',
        "caf\u00e9 \u202e\u2028",
        "nul\x00 del\x7f",
    ],
)
def test_a_foreign_detail_is_reduced_to_the_rfc6750_charset(detail: str):
    response = render_refusal(Refusal(Reason.DISALLOWED_ALG, detail, scope='a "b"\r\n'), "rid-1")
    challenge = response.headers["WWW-Authenticate"]
    description = re.search(r'error_description="([^"]*)"', challenge)
    scope = re.search(r'scope="([^"]*)"', challenge)
    assert description is not None and scope is not None
    assert RFC6750.fullmatch(description.group(1))
    assert RFC6750.fullmatch(scope.group(1))
    assert "\r" not in challenge and "\n" not in challenge
    assert response.body is not None
    body = json.loads(bytes(response.body))  # type: ignore[arg-type]
    assert body["message"] == description.group(1)
    assert (body["reason"], body["error"]) == ("disallowed_alg", "invalid_token")


def test_missing_token_challenge_has_no_error_attribute():
    response = render_refusal(Refusal(Reason.MISSING_TOKEN), "rid-2")
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="idlegate"'
    assert response.status == 401
