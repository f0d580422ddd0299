"""The access log's lines: valid JSON whatever a token's claims hold, the same fields with and
without extra ones, one write per event-loop turn, and nothing lost at close."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest

from gateway import accesslog
from gateway.accesslog import AccessLog

FIELDS = {
    "request_id": "0123456789abcdef00000001",
    "method": "GET",
    "route": "/api/",
    "status": 200,
    "decision": "allowed",
    "reason": "ok",
    "jti": "j-1",
    "sub": "alice",
    "upstream_ms": 1.23456,
    "total_ms": 2.5,
    "mode": "proxy",
}


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def logged(**fields: Any) -> list[dict[str, Any]]:
    stream = io.StringIO()
    log = AccessLog(stream)
    log.write(**{**FIELDS, **fields})  # no loop running: written at once
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize(
    "text",
    [
        'quote" and \\backslash',
        "new\nline\r\ttab\x00nul\x1fend",
        "unicode é ü 你好 \u2028 \U0001f600",
        "</script>",
        "",
    ],
)
def test_claims_and_labels_of_any_text_are_valid_json_and_read_back(text: str) -> None:
    (line,) = logged(jti=text, sub=text, route=text, request_id=text)
    assert (line["jti"], line["sub"], line["route"], line["request_id"]) == (text,) * 4


def test_the_common_line_and_a_line_with_extra_fields_agree() -> None:
    (plain,) = logged()
    (extended,) = logged(extra={"close_reason": "token_expired", "messages_in": 3})
    assert list(plain) == [
        "time",
        "request_id",
        "method",
        "route",
        "status",
        "decision",
        "reason",
        "jti",
        "sub",
        "upstream_ms",
        "total_ms",
        "mode",
    ]
    assert {k: v for k, v in extended.items() if k in plain and k != "time"} == {
        k: v for k, v in plain.items() if k != "time"
    }
    assert (extended["close_reason"], extended["messages_in"]) == ("token_expired", 3)
    assert plain["upstream_ms"] == 1.235 and plain["total_ms"] == 2.5
    assert plain["time"].endswith("Z") and len(plain["time"]) == 20


def test_missing_token_fields_are_null() -> None:
    (line,) = logged(jti=None, sub=None, upstream_ms=None)
    assert (line["jti"], line["sub"], line["upstream_ms"]) == (None, None, None)


async def test_lines_of_one_loop_turn_go_out_in_one_write_and_close_flushes_the_rest() -> None:
    stream = CountingStream()
    log = AccessLog(stream)
    for i in range(15):  # under PIPE_BUF together (more: one write per PIPE_BUF)
        log.write(**{**FIELDS, "request_id": f"r{i}"})
    assert stream.writes == 0  # collected, not yet written
    await asyncio.sleep(0)
    assert stream.writes == 1
    assert [json.loads(x)["request_id"] for x in stream.getvalue().splitlines()] == [
        f"r{i}" for i in range(15)
    ]
    log.write(**{**FIELDS, "request_id": "last"})
    log.flush()  # what Gateway.close does last
    assert stream.getvalue().splitlines()[-1].startswith('{"time":')
    assert json.loads(stream.getvalue().splitlines()[-1])["request_id"] == "last"
    await asyncio.sleep(0)  # the turn's own flush finds nothing left
    assert stream.writes == 2


def test_a_disabled_log_writes_nothing() -> None:
    stream = io.StringIO()
    AccessLog(stream, enabled=False).write(**FIELDS)
    assert stream.getvalue() == ""


def test_kept_parts_of_lines_stay_bounded_and_every_line_stays_its_own(monkeypatch) -> None:
    """Methods and statuses come from clients and upstreams, ids from tokens: what the log
    keeps of them is bounded, and a line made from kept parts reads back exactly as one made
    from scratch."""
    monkeypatch.setattr(accesslog, "_KEPT", 8)
    stream = io.StringIO()
    log = AccessLog(stream)
    sent = []
    for i in range(40):
        fields = {**FIELDS, "method": f"M{i % 13}", "status": 200 + i % 11, "jti": f"j{i % 17}"}
        fields["sub"] = None if i % 5 == 0 else f"s{i % 3}"
        log.write(**fields)
        sent.append(fields)
        assert len(log._outcomes) <= 8 and len(log._ids) <= 8
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [{k: v for k, v in line.items() if k != "time"} for line in lines] == [
        {**fields, "upstream_ms": 1.235} for fields in sent
    ]
