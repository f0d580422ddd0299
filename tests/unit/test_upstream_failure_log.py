"""The upstream failure log: one line per route, upstream and reason per window, with the count
of those suppressed, and error text that can never carry the request's URL or headers."""

from __future__ import annotations

import logging
from unittest import mock

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.forward.transport import (
    UpstreamBroken,
    UpstreamFailureLog,
    UpstreamTimeout,
    describe_failure,
)
from gateway.reasons import Reason


class Ticks:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "idlegate.upstream"]


def test_a_burst_is_one_line_then_one_more_with_the_suppressed_count(
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.WARNING, logger="idlegate.upstream")
    ticks = Ticks()
    failures = UpstreamFailureLog(every=10.0, now=ticks)
    for _ in range(100):
        failures.failed("/api/", "http://orders:8000", Reason.UPSTREAM_UNAVAILABLE, "E: refused")
        ticks.now += 0.05  # 100 failures in 5 s
    assert lines(caplog) == [
        "upstream failed: route=/api/ upstream=http://orders:8000 "
        "reason=upstream_unavailable error=E: refused"
    ]
    ticks.now = 110.0  # the window since the first line is over
    failures.failed("/api/", "http://orders:8000", Reason.UPSTREAM_UNAVAILABLE, "E: refused")
    assert len(lines(caplog)) == 2
    assert lines(caplog)[1].endswith("(and 99 more like it since the last line)")
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_each_route_upstream_and_reason_has_its_own_line(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="idlegate.upstream")
    failures = UpstreamFailureLog(every=10.0, now=Ticks())
    for route, origin, reason in [
        ("/api/", "http://a:1", Reason.UPSTREAM_UNAVAILABLE),
        ("/api/", "http://a:1", Reason.UPSTREAM_TIMEOUT),
        ("/api/", "http://b:1", Reason.UPSTREAM_UNAVAILABLE),
        ("/other/", "http://a:1", Reason.UPSTREAM_UNAVAILABLE),
        ("/api/", "http://a:1", Reason.UPSTREAM_UNAVAILABLE),  # a repeat: suppressed
    ]:
        failures.failed(route, origin, reason, "E")
    assert len(lines(caplog)) == 4


def test_error_text_is_kept_only_where_it_cannot_hold_the_request():
    assert describe_failure(ConnectionRefusedError(111, "Connection refused")) == (
        "ConnectionRefusedError: [Errno 111] Connection refused"
    )
    assert describe_failure(UpstreamBroken("malformed\r\nresponse head")) == (
        "UpstreamBroken: malformed  response head"
    )
    assert describe_failure(UpstreamTimeout()) == "UpstreamTimeout"
    assert describe_failure(TimeoutError()) == "TimeoutError"
    url = URL("http://orders:8000/api/x?access_token=eyJsecret")
    info = aiohttp.RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)
    response_error = aiohttp.ClientResponseError(info, (), status=400, message="bad")
    assert "eyJsecret" in str(response_error)  # aiohttp's own text names the URL ...
    assert describe_failure(response_error) == "ClientResponseError"  # ... ours never does
    assert len(describe_failure(OSError("x" * 1000))) < 250


def test_a_client_os_error_naming_the_request_url_is_logged_without_it():
    """aiohttp raises ClientOSError("Can not write request body for <URL>") when the client
    aborts its body: an OSError whose text is the request's URL, query and all."""
    from gateway.config import Forward
    from gateway.forward.aiohttp_transport import _upstream_error

    secret = "http://orders:8000/api/orders/4711?reset_code=SECRET-123"
    aborted = aiohttp.ClientOSError(None, f"Can not write request body for {secret}")
    error = _upstream_error(aborted, Forward(), answered=False)
    assert "SECRET" not in str(error) and "/api/orders" not in str(error)
    assert str(error) == "ClientOSError"
    refused = aiohttp.ClientConnectorError(
        mock.Mock(host="orders", port=8000, ssl="default"),
        ConnectionRefusedError(111, "Connection refused"),
    )
    assert "Connection refused" in str(_upstream_error(refused, Forward(), answered=False))
    # And whatever text an error holds, a URL in it is never logged.
    assert (
        describe_failure(OSError(f"failed for {secret} today")) == "OSError: failed for <url> today"
    )
    assert "SECRET" not in describe_failure(UpstreamBroken(f"at {secret}"))
