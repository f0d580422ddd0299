"""The lean upstream client's response rules (RFC 9112), without sockets: llhttp (httptools)
plus the gateway's own refusals in `ResponseReader`, fed whole and byte by byte."""

from __future__ import annotations

import pytest

from gateway.forward.http1 import MAX_HEAD, ResponseReader
from gateway.forward.transport import UpstreamBroken


def read(data: bytes, *, head_request: bool = False, drip: bool = False) -> ResponseReader:
    """A reader fed `data` in one piece, or one byte at a time (`drip`)."""
    reader = ResponseReader()
    reader.begin(head_request=head_request)
    pieces = [data[i : i + 1] for i in range(len(data))] if drip else [data]
    for piece in pieces:
        reader.feed(piece)
    return reader


def head(text: str) -> bytes:
    """A response head as the old tests wrote it (without the blank line), sized empty."""
    return text.encode("utf-8", "surrogateescape") + b"\r\n\r\n"


@pytest.fixture(params=[False, True], ids=["whole", "dripped"])
def drip(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_a_plain_head_is_parsed(drip: bool):
    reader = read(
        head("HTTP/1.1 201 Created Here\r\nContent-Type: text/plain\r\nX-A:  spaced \t\r\nX-A: 2"),
        drip=drip,
    )
    assert reader.error is None and reader.head_done
    assert (reader.status, reader.reason) == (201, "Created Here")
    assert reader.fields == [("Content-Type", "text/plain"), ("X-A", "spaced"), ("X-A", "2")]


@pytest.mark.parametrize(
    ("line", "reason"), [("HTTP/1.0 404", ""), ("HTTP/1.1 200 ", ""), ("HTTP/1.1 299 x y", "x y")]
)
def test_a_reason_phrase_may_be_missing_or_empty(line: str, reason: str, drip: bool):
    reader = read(head(line), drip=drip)
    assert reader.error is None and reader.reason == reason


def test_header_values_keep_utf8_bytes_as_received():
    reader = read(b"HTTP/1.1 200 OK\r\nX-Name: caf\xc3\xa9 \xe2\x84\xaa\r\n\r\n")
    assert reader.fields[0][1].encode() == b"caf\xc3\xa9 \xe2\x84\xaa"


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9\r\n\r\n", b"HTTP/1.1 200 \xe9\xff\r\n\r\n"],
    ids=["value", "reason"],
)
def test_bytes_that_are_not_utf8_in_a_header_or_the_reason_are_refused(head: bytes):
    # The relay's writer would drop them (a lone surrogate once decoded): refused, not altered.
    reader = read(head)
    assert isinstance(reader.error, UpstreamBroken) and not reader.reusable


@pytest.mark.parametrize(
    "text",
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
        "HTTP/1.1 200 OK\nX-A: 1",  # bare LF after the status line
        "HTTP/1.1 200 OK\r\nX-A: one\rtwo",  # bare CR
        "HTTP/1.1 200 OK\r\nX-A: nul\x00",
        "HTTP/1.1 200 OK\r\nX-A: bell\x07",
        # What llhttp accepts and the gateway refuses on top (ResponseReader):
        "HTTP/1.1 200 O\x01K",  # a control in the reason phrase
        "HTTP/1.1 099 Odd",  # status below 100
        "HTTP/1.1 000 Odd",
        "HTTP/0.9 200 OK",  # only HTTP/1.0 and HTTP/1.1
        "HTTP/1.1 200 OK\r\n" + "X-A: 1\r\n" * 200 + "X-B: 2",  # too many header lines
    ],
)
def test_malformed_heads_are_refused(text: str, drip: bool):
    reader = read(head(text), drip=drip)
    assert isinstance(reader.error, UpstreamBroken), reader.fields
    assert not reader.head_done and not reader.reusable


def test_a_head_over_64_kib_is_refused_in_one_field_or_many(drip: bool):
    one = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\nContent-Length: 0\r\n\r\n"
    many = (
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-Many-%d: %s\r\n" % (i, b"m" * 400) for i in range(170))
        + b"Content-Length: 0\r\n\r\n"
    )
    for data in (one, many):
        assert isinstance(read(data, drip=drip).error, UpstreamBroken)


def test_a_field_that_never_ends_is_refused_once_past_64_kib():
    reader = ResponseReader()
    reader.begin(head_request=False)
    reader.feed(b"HTTP/1.1 200 OK\r\nX-Endless: ")
    for _ in range(MAX_HEAD // 1024 + 1):
        reader.feed(b"x" * 1024)
    assert isinstance(reader.error, UpstreamBroken)


@pytest.mark.parametrize("value", ["0", "42", "9" * 18])
def test_a_content_length_is_the_body_length(value: str):
    reader = read(b"HTTP/1.1 200 OK\r\nContent-Length: %s\r\n\r\n" % value.encode())
    assert reader.error is None and reader.framing == "length"
    assert reader.length == int(value)


@pytest.mark.parametrize(
    "values",
    [
        ["12abc"],
        ["-1"],
        ["+5"],
        [""],
        ["1", "2"],
        ["3, 4"],
        ["0x10"],
        ["9" * 19],  # llhttp takes up to 2^64; the gateway at most 18 digits
        # Repeats of one value were accepted by the hand-written parser; llhttp refuses any
        # repeat, as aiohttp's parser does: stricter, and no legitimate server sends one.
        ["42", "42"],
        ["42, 42"],
    ],
)
def test_invalid_or_repeated_content_lengths_are_refused(values: list[str]):
    fields = b"".join(b"Content-Length: %s\r\n" % v.encode() for v in values)
    reader = read(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n" + b"x" * 50)
    assert isinstance(reader.error, UpstreamBroken)


CHUNKED_OK = b"2\r\nok\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    ("fields", "accepted"),
    [
        (b"Transfer-Encoding: chunked\r\n", True),
        (b"Transfer-Encoding: Chunked\r\n", True),
        (b"Transfer-Encoding: gzip\r\n", False),  # llhttp would read it to EOF
        (b"Transfer-Encoding: gzip, chunked\r\n", False),  # llhttp would de-chunk it
        (b"Transfer-Encoding: chunked, gzip\r\n", False),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", False),
        (b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n", False),
        (b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", False),
    ],
)
def test_only_the_chunked_transfer_coding_is_accepted(fields: bytes, accepted: bool, drip: bool):
    reader = read(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n" + CHUNKED_OK, drip=drip)
    if accepted:
        assert reader.error is None and reader.done
        assert reader.take_body() == b"ok" and reader.reusable
    else:
        assert isinstance(reader.error, UpstreamBroken)


def test_transfer_encoding_in_an_http_1_0_response_is_refused():
    reader = read(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_OK)
    assert isinstance(reader.error, UpstreamBroken)


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nleak\r\n0\r\n\r\n",  # not hex
        b"2\r\nokk\r\n0\r\n\r\n",  # longer than its size
        b"2\nok\r\n0\r\n\r\n",  # bare LF after the size
        b"fffffffffffffffff\r\nok\r\n0\r\n\r\n",  # overflow
    ],
)
def test_broken_chunked_framing_is_refused(body: bytes, drip: bool):
    reader = read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body, drip=drip)
    assert isinstance(reader.error, UpstreamBroken)
    assert b"leak" not in reader.take_body()


def test_chunk_extensions_are_ignored_and_trailers_not_kept(drip: bool):
    reader = read(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;foo=bar\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n",
        drip=drip,
    )
    assert reader.error is None and reader.done and reader.take_body() == b"hello"
    assert [name for name, _ in reader.fields] == ["Transfer-Encoding"]


def test_a_trailer_section_over_64_kib_is_refused():
    trailers = b"".join(b"X-T-%d: %s\r\n" % (i, b"t" * 1000) for i in range(70))
    reader = read(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
        + trailers
        + b"\r\n"
    )
    assert isinstance(reader.error, UpstreamBroken)


@pytest.mark.parametrize(("interim", "accepted"), [(1, True), (8, True), (9, False)])
def test_interim_responses_are_dropped_up_to_a_bound(interim: int, accepted: bool, drip: bool):
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" * interim
    reader = read(hints + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", drip=drip)
    if accepted:
        assert reader.error is None and reader.done and reader.status == 200
        assert reader.fields == [("Content-Length", "2")]  # the interim fields are not kept
        assert reader.take_body() == b"ok"
    else:
        assert isinstance(reader.error, UpstreamBroken)


def test_switching_protocols_unasked_is_refused():
    reader = read(b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
    assert isinstance(reader.error, UpstreamBroken)


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses_end_with_their_head(status: int):
    reader = read(b"HTTP/1.1 %d X\r\nX-A: 1\r\n\r\n" % status)
    assert reader.error is None and reader.done and reader.framing == "none"
    assert reader.reusable


@pytest.mark.parametrize("status", [204, 304])
@pytest.mark.parametrize("announced", [b"Content-Length: 5", b"Transfer-Encoding: chunked"])
def test_bodiless_statuses_that_announce_a_body_end_with_their_head_on_a_spent_connection(
    status: int, announced: bytes
):
    # The body might still come, in a later read, and be read as the next request's answer.
    reader = read(b"HTTP/1.1 %d X\r\n%s\r\n\r\n" % (status, announced))
    assert reader.error is None and reader.done and reader.framing == "none"
    assert not reader.reusable


def test_the_answer_to_head_ends_with_its_head_and_keeps_the_connection(drip: bool):
    reader = read(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        head_request=True,
        drip=drip,
    )
    assert reader.error is None and reader.done and reader.framing == "none"
    assert reader.reusable
    reader.begin(head_request=False)  # the next response on the same connection
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert reader.done and reader.take_body() == b"ok"


def test_the_answer_to_head_that_announces_a_body_ends_with_its_head_on_a_spent_connection(
    drip: bool,
):
    # As usual (the GET's Content-Length), but the body might still come in a later read.
    reader = read(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", head_request=True, drip=drip)
    assert reader.error is None and reader.done and reader.framing == "none"
    assert not reader.reusable


def test_bytes_after_a_complete_response_rule_out_reuse():
    for head_request in (False, True):
        body = b"" if head_request else b"ok"
        reader = read(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + body + b"HTTP/1.1 200 OK\r\n",
            head_request=head_request,
        )
        assert reader.error is None and reader.done
        assert not reader.reusable


@pytest.mark.parametrize(
    "fields",
    [b"Connection: close\r\n", b"Connection: keep-alive, Close\r\n"],
    ids=["close", "list"],
)
def test_connection_close_or_http_1_0_rules_out_reuse(fields: bytes):
    reader = read(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok")
    assert reader.done and not reader.reusable
    reader = read(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert reader.done and not reader.reusable


def test_the_end_of_stream_ends_a_close_delimited_body_and_breaks_any_other():
    reader = read(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
    assert not reader.done
    reader.end_of_stream()
    assert reader.error is None and reader.done and reader.take_body() == b"until the end"
    for partial in (
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nleak",
        b"HTTP/1.1 200 OK\r\n",
        b"",
    ):
        reader = read(partial)
        reader.end_of_stream()
        assert isinstance(reader.error, UpstreamBroken) and not reader.done


@pytest.mark.parametrize(
    "opening", [b"0\r\nX-Endless: ", b"2;ext="], ids=["trailer-field", "chunk-extension"]
)
def test_chunk_framing_that_never_ends_is_refused_once_past_64_kib(opening: bytes):
    # httptools collects a field whole before handing it over: without a bound, an endless
    # trailer field would grow in memory for as long as the upstream keeps sending.
    reader = read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n" + opening)
    for _ in range(MAX_HEAD // 1024 + 1):
        reader.feed(b"x" * 1024)
    assert isinstance(reader.error, UpstreamBroken)


def test_many_small_chunks_are_no_framing_excess():
    chunks = b"1\r\nx\r\n" * 100_000  # 500 KB of framing for 100 KB of body
    reader = read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
    assert reader.error is None and reader.done and reader.take_body() == b"x" * 100_000
