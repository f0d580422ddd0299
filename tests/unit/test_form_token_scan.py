"""`FormTokenScan` finds an access_token parameter in a body however the body is cut into
pieces, exactly where the query rule (`_has_query_token`) finds one in the same text."""

from __future__ import annotations

import random
import sys
import time

import pytest

from gateway.forward.proxy import _WHITESPACE, FormTokenScan, _ascii_transparent
from gateway.tokens.extract import _has_query_token

BODIES = [
    b"access_token=abc",
    b"amount=100&access_token=abc",
    b"amount=100;access_token=abc&x=1",
    b"ACCESS_TOKEN=abc",
    b"access%5Ftoken=abc",
    b"%61ccess_token=abc",
    b"access.token=abc",
    b"access+token=abc",
    b"access_token[]=abc",
    b"access_token%5Bx%5D=abc",
    b"access_token [x]=abc",
    b"++access_token++=abc",
    b"%C2%A0access_token\t=abc",  # a no-break space, a tab: str.strip() removes both
    b"\xc2\xa0access_token=abc",
    b"%E2%80%83access_token=abc",  # an em space
    b"\xa0access_token=abc",  # not UTF-8: no space
    b"%C2\xa0access_token=abc",
    b"access_token.=abc",
    b"x.access_token=abc",
    b"access_to%E2%84%AAen=abc",
    b"access_to\xe2\x84\xaaen=abc",  # a Kelvin sign, which lower() makes a `k`
    b"access[token=abc",  # PHP: an unclosed `[` is a `_`
    b"access%5Btoken=abc",
    b"access%5btoken",
    b"++access[token++=abc",
    b"access[tok.en=abc&access[tok+en=abc",  # PHP reads access_tok_en
    b"access[token]=abc&access[token[=abc&access[[token=abc",  # an index, access_token_, ...
    b"access_token%00x=abc",  # PHP: a NUL ends the name
    b"access_token%00=abc",
    b"access_token+%00x=abc",  # spaces stripped after the cut
    b"access_token\x00junk=abc",
    b"access%5Btoken%00]=abc",
    b"%00access_token=abc",
    b"x=1&access_token",  # a name alone, at the end
    b"access_token&x=1",
    b"amount=100&next_token=abc&token_type=bearer",
    b"a=access_token&b=x=access_token",  # in values only
    b"access_tokens=1&my_access_token=2",
    b"acc\xc3\xa9ss_token=1&\xff\xfe=2",  # not UTF-8 in part
    b"&&;;==",
    b"",
]


def _scan(pieces: list[bytes]) -> bool:
    scan = FormTokenScan()
    for index, piece in enumerate(pieces):
        if scan.feed(piece, final=index == len(pieces) - 1):
            return True
    return False


@pytest.mark.parametrize("body", BODIES)
def test_every_cut_of_a_body_is_judged_as_the_query_rule_judges_it_whole(body: bytes):
    expected = _has_query_token(body.decode("utf-8", "replace"))
    assert _scan([body]) is expected
    for cut in range(len(body) + 1):
        assert _scan([body[:cut], body[cut:]]) is expected, cut
    assert _scan([body[i : i + 1] for i in range(len(body))] + [b""]) is expected


def test_random_bodies_and_cuts_agree_with_the_query_rule():
    alphabet = [
        *(b"a", b"access", b"ACCESS", b"%61ccess", b"_", b"token", b"to", b"k", b"en"),
        *(b"\xe2\x84\xaa", b"%e2%84%aa", b"%4B", b"=", b"&", b";", b"%5F", b"%2e", b"."),
        *(b"+", b" ", b"%20", b"\t", b"%0A", b"%C2%A0", b"\xc2", b"\xa0", b"[", b"%5b", b"%"),
        *(b"]", b"%5D", b"%00", b"\x00", b"%5B"),
    ]
    rng = random.Random(6750)
    for _ in range(20000):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        cuts = sorted(rng.sample(range(len(body) + 1), k=min(3, len(body) + 1)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        expected = _has_query_token(body.decode("utf-8", "replace"))
        assert _scan(pieces) is expected, (body, pieces)


def test_a_token_after_a_long_value_is_found():
    scan = FormTokenScan()
    assert not scan.feed(b"note=")
    for _ in range(100):
        assert not scan.feed(b"x" * 65536)
    assert scan.feed(b"&access_token=abc", final=True)


def _spelled(char: str, rng: random.Random) -> bytes:
    """`char` as some encoder might write it: raw, percent-encoded in either hex case."""
    raw = char.encode()
    percent = "".join(f"%{byte:02x}" for byte in raw)
    return rng.choice([raw, percent.encode(), percent.upper().encode()])


def test_names_spelled_every_way_agree_with_the_query_rule():
    """Near misses and hits alike: the name's letters in any case and encoding, spaces
    (ASCII and Unicode) around it, a suffix that keeps or spoils it."""
    rng = random.Random(2_2)
    spaces = [" ", "\t", "\x0b", "\x1f", "\x85", "\xa0", "\u2003", "\u3000", "x", "."]
    letters = {"k": "kK\u212a", "_": "_ .[", "s": "sS\u017f"}  # a long s is no `s` to lower()
    found = 0
    for _ in range(5000):
        name = b"".join(
            _spelled(rng.choice(letters.get(char, char + char.upper())), rng)
            for char in "access_token"
        )
        if rng.random() < 0.2:
            name = name.replace(b"+", b"") + b"+"  # a raw `+` is a space
        before = b"".join(_spelled(rng.choice(spaces), rng) for _ in range(rng.randint(0, 2)))
        after = rng.choice(
            [b"", b"[]", b"%5B0%5D", b"x", b".", b"]", b"[", b"%00", b"\x00x", b"%00]"]
        ) + b"".join(_spelled(rng.choice(spaces), rng) for _ in range(rng.randint(0, 2)))
        body = rng.choice([b"", b"a=1&", b"a=1;"]) + before + name + after
        body += rng.choice([b"", b"=v", b"=v&b=2", b"&b=2"])
        expected = _has_query_token(body.decode("utf-8", "replace"))
        found += expected
        cut = rng.randint(0, len(body))
        assert _scan([body[:cut], body[cut:]]) is expected, body
    assert 500 < found < 4500  # both kinds were tried


def test_the_spaces_around_a_name_are_those_str_strip_removes():
    assert set(_WHITESPACE) == {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()}


@pytest.mark.parametrize(
    "parameter",
    [b"&%", b"a%41=&", b"x=access_token&", b"access_tokenx=1&", b"%20access_token%20x&"],
)
def test_a_body_of_many_parameters_is_judged_in_linear_time(parameter: bytes):
    """No Python step per parameter: 2 MiB of short ones in well under a second (~0.1 s),
    not the seconds a decode of each would hold the event loop for."""
    body = parameter * (2 * 1024 * 1024 // len(parameter))
    scan, started = FormTokenScan(), time.perf_counter()
    for at in range(0, len(body), 65536):
        assert not scan.feed(body[at : at + 65536])
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("charset", "transparent"),
    [
        *(("utf-8", True), ("us-ascii", True), ("iso-8859-1", True), ("windows-1252", True)),
        *(("shift_jis", True), ("euc-jp", True)),
        *(("utf-16", False), ("utf-16le", False), ("utf-32", False), ("utf-7", False)),
        *(("iso-2022-jp", False), ("hz", False), ("raw_unicode_escape", False)),
        *(("cp037", False), ("hex", False), ("no-such-charset", False)),
    ],
)
def test_a_charset_is_ascii_transparent_only_if_its_codec_reads_ascii_as_ascii(
    charset: str, transparent: bool
):
    """Decided by decoding, not by a list: ISO-2022's ESC shift (`acc\\x1b(Bess` is `access`)
    and `raw_unicode_escape`'s `\\u0065` would hide a name from the byte scan."""
    assert _ascii_transparent(charset) is transparent
