"""The lean upstream client's response-head rules (RFC 9112), without sockets."""

from __future__ import annotations

import pytest

from gateway.forward.http1 import _content_length, _parse_head
from gateway.forward.transport import UpstreamBroken


def test_a_plain_head_is_parsed():
    minor, status, reason, fields = _parse_head(
        "HTTP/1.1 201 Created Here\r\nContent-Type: text/plain\r\nX-A:  spaced \t\r\nX-A: 2"
    )
    assert (minor, status, reason) == (1, 201, "Created Here")
    assert fields == [("Content-Type", "text/plain"), ("X-A", "spaced"), ("X-A", "2")]


@pytest.mark.parametrize(
    ("line", "reason"), [("HTTP/1.0 404", ""), ("HTTP/1.1 200 ", ""), ("HTTP/1.1 299 x y", "x y")]
)
def test_a_reason_phrase_may_be_missing_or_empty(line: str, reason: str):
    assert _parse_head(line)[2] == reason


def test_header_values_keep_utf8_bytes_as_received():
    head = b"HTTP/1.1 200 OK\r\nX-Name: caf\xc3\xa9 \xff".decode("utf-8", "surrogateescape")
    _, _, _, fields = _parse_head(head)
    assert fields[0][1].encode("utf-8", "surrogateescape") == b"caf\xc3\xa9 \xff"


@pytest.mark.parametrize(
    "head",
    [
        "HELLO",
        "HTTP/1.1 abc OK",
        "HTTP/1.1 20 OK",
        "HTTP/1.1 2000 OK",
        "HTTP/2 200 OK",
        "HTTP/1.1  200 OK",
        "http/1.1 200 OK",
        "HTTP/1.1 200 OK\r\nno colon here",
        "HTTP/1.1 200 OK\r\nX-A: 1\r\n folded: continuation",  # obs-fold
        "HTTP/1.1 200 OK\r\nX-A : 1",  # whitespace before the colon (§5.1)
        "HTTP/1.1 200 OK\r\n: no name",
        "HTTP/1.1 200 OK\r\nX(A): 1",
        "HTTP/1.1 200 OK\r\nX-A: one\ntwo",  # bare LF
        "HTTP/1.1 200 OK\r\nX-A: one\rtwo",  # bare CR
        "HTTP/1.1 200 OK\r\nX-A: nul\x00",
        "HTTP/1.1 200 OK\r\nX-A: bell\x07",
        "HTTP/1.1 200 O\x01K",
        "HTTP/1.1 200 OK\r\n" + "X-A: 1\r\n" * 200 + "X-B: 2",  # too many header lines
    ],
)
def test_malformed_heads_are_refused(head: str):
    with pytest.raises(UpstreamBroken):
        _parse_head(head)


@pytest.mark.parametrize(
    ("values", "length"), [(["0"], 0), (["42"], 42), (["42", "42"], 42), (["42, 42"], 42)]
)
def test_content_length_repeats_of_one_value_are_that_value(values: list[str], length: int):
    assert _content_length(values) == length


@pytest.mark.parametrize(
    "values", [["12abc"], ["-1"], ["+5"], [""], ["1", "2"], ["3, 4"], ["0x10"], ["9" * 19]]
)
def test_invalid_or_conflicting_content_lengths_are_refused(values: list[str]):
    with pytest.raises(UpstreamBroken):
        _content_length(values)
