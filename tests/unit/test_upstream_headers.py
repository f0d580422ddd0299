"""Our fields upstream (identity, X-Forwarded-*, X-Real-IP, X-Request-ID) are kept rendered per
identity, peer, scheme and Host: each request still gets exactly its own, the lean transport's
head and the merged multidict say the same, and what is kept stays bounded."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.config import Forward
from gateway.forward import headers as module
from gateway.forward.headers import RequestHeaders, UpstreamHeaders
from gateway.forward.http1 import UpstreamPool
from gateway.reasons import Reason, Refusal
from gateway.tokens.claims import Identity
from gateway.tokens.verify import identity_headers


def request(host: str = "api.test", peer: str = "192.0.2.7", **extra: str) -> web.BaseRequest:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 40000) if name == "peername" else default
    )
    return make_mocked_request(
        "GET", "/api/x", headers={"Host": host, **extra}, transport=transport
    )


def head_fields(headers: UpstreamHeaders) -> list[tuple[str, str]]:
    pool = UpstreamPool("127.0.0.1", 80, "up.test", limit=1, connect_timeout=1, read_timeout=1)
    lines = pool._request_head("GET", "/x", headers).decode().split("\r\n")
    assert lines[0] == "GET /x HTTP/1.1" and lines[-2:] == ["", ""]
    assert lines[1] == "Host: up.test"  # the pool's own
    return [tuple(line.split(": ", 1)) for line in lines[2:-2]]  # type: ignore[misc]


def test_each_request_gets_its_own_identity_host_and_id_however_they_repeat() -> None:
    builder = RequestHeaders(Forward())
    alice, bob = {"X-Auth-Subject": "alice"}, {"X-Auth-Subject": "bob"}
    seen = []
    for identity, host, request_id in [
        (alice, "a.test", "id-1"), (bob, "a.test", "id-2"), (alice, "b.test", "id-3"),
        (alice, "a.test", "id-4"), (bob, "a.test", "id-5"),
    ]:  # fmt: skip
        forged = {"X-Auth-Subject": "mallory", "X-Forwarded-Host": "evil", "X-Request-ID": "x"}
        headers = builder.for_request(
            request(host, **forged), request_id, identity, strip_authorization=False
        )
        fields = head_fields(headers)
        assert fields == list(headers.merged().items())  # the two forms say the same
        found = dict(fields)
        seen.append((found["X-Auth-Subject"], found["X-Forwarded-Host"], found["X-Request-ID"]))
        assert [name for name, _ in fields].count("X-Auth-Subject") == 1
        assert fields[-1] == ("X-Request-ID", request_id)
    assert seen == [
        ("alice", "a.test", "id-1"), ("bob", "a.test", "id-2"), ("alice", "b.test", "id-3"),
        ("alice", "a.test", "id-4"), ("bob", "a.test", "id-5"),
    ]  # fmt: skip


def test_an_equal_identity_in_another_mapping_is_rendered_for_that_mapping() -> None:
    """Kept by the mapping's id, and the mapping is held: a new one (a new token) is never
    answered with what was kept for another."""
    builder = RequestHeaders(Forward())
    for subject in ["one", "two", "three"]:
        headers = builder.for_request(
            request(), "id", {"X-Auth-Subject": subject}, strip_authorization=False
        )
        assert dict(headers.merged())["X-Auth-Subject"] == subject


def test_what_is_kept_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "_KEPT_FORWARDED", 5)
    builder = RequestHeaders(Forward())
    for n in range(23):
        headers = builder.for_request(request(f"h{n}.test"), "id", {}, strip_authorization=False)
        assert dict(headers.merged())["X-Forwarded-Host"] == f"h{n}.test"
        assert len(builder._forwarded) <= 5


def test_behind_a_trusted_proxy_its_view_passes_and_the_chain_grows() -> None:
    builder = RequestHeaders(Forward(trusted_proxies=["10.0.0.0/8"]))
    peer_sent = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Host": "edge.test"}
    for peer, chain, host in [
        ("10.1.2.3", "203.0.113.9, 10.1.2.3", "edge.test"),  # trusted: its view passes
        ("192.0.2.7", "192.0.2.7", "api.test"),  # not: its claims go, ours replace them
    ]:
        headers = builder.for_request(
            request(peer=peer, **peer_sent), "id", {}, strip_authorization=False
        )
        fields = head_fields(headers)
        merged = headers.merged()
        assert fields == list(merged.items())
        assert merged.getall("X-Forwarded-For") == [chain]
        assert merged.getall("X-Forwarded-Host") == [host]
        assert merged.getall("X-Real-IP") == [peer]
        assert merged.getall("X-Forwarded-Proto") == ["http"]


def test_a_newline_in_one_of_our_values_is_refused_before_anything_is_sent() -> None:
    builder = RequestHeaders(Forward())
    with pytest.raises(Refusal) as refused:
        builder.for_request(request(), "id", {"X-Auth-Subject": "a\r\nX-Admin: 1"},
                            strip_authorization=False)  # fmt: skip
    assert refused.value.reason is Reason.MALFORMED_REQUEST


def test_the_lean_transport_still_takes_one_plain_multidict() -> None:
    plain = CIMultiDict([("Accept", "*/*"), ("X-Trace", "1")])
    pool = UpstreamPool("127.0.0.1", 80, "up.test", limit=1, connect_timeout=1, read_timeout=1)
    assert pool._request_head("GET", "/x", plain) == (
        b"GET /x HTTP/1.1\r\nHost: up.test\r\nAccept: */*\r\nX-Trace: 1\r\n\r\n"
    )


def test_a_verified_identity_goes_as_rendered_once_with_each_requests_own_fields() -> None:
    """claims.Identity (what the verifier builds) carries its lines: they are sent as they are,
    after the client's fields and before X-Forwarded-* and this request's id."""
    builder = RequestHeaders(Forward())
    alice = identity_headers({"sub": "alice", "scope": "a b"}, {"X-Auth-Subject": "sub",
                             "X-Auth-Scope": "scope"})  # fmt: skip
    assert isinstance(alice, Identity)
    assert alice.lines == "X-Auth-Subject: alice\r\nX-Auth-Scope: a b\r\n"
    for host, request_id in [("a.test", "id-1"), ("b.test", "id-2")]:
        headers = builder.for_request(
            request(host, **{"X-Auth-Subject": "mallory"}), request_id, alice,
            strip_authorization=False,
        )  # fmt: skip
        fields = head_fields(headers)
        assert fields == list(headers.merged().items())
        assert fields[-7:-1] == [
            ("X-Auth-Subject", "alice"), ("X-Auth-Scope", "a b"),
            ("X-Forwarded-For", "192.0.2.7"), ("X-Real-IP", "192.0.2.7"),
            ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", host),
        ]  # fmt: skip
        assert fields[-1] == ("X-Request-ID", request_id)
        assert [name for name, _ in fields].count("X-Auth-Subject") == 1


def test_an_identity_shared_by_a_tokens_requests_cannot_be_changed() -> None:
    """One Identity serves every request of its token: a change would be every later
    request's, and its lines would no longer say what it holds."""
    identity = Identity({"X-Auth-Subject": "alice"})
    for change in (
        lambda: identity.__setitem__("X-Auth-Subject", "mallory"),
        lambda: identity.update({"X-Admin": "1"}),
        lambda: identity.pop("X-Auth-Subject"),
        identity.clear,
    ):
        with pytest.raises(TypeError):
            change()
    copied = copy.copy(identity)
    assert copied == identity and type(copied) is Identity and copied.lines == identity.lines
