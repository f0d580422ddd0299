"""The Cluster slot map and redirections as Redis sends them (parsing only; the routing
itself runs against a real cluster in tests/integration/test_store_cluster.py)."""

from __future__ import annotations

import pytest

from gateway.store.cluster import SLOTS, _parse_slots, _redirection
from gateway.store.pipeline import ReplyError


def test_moved_and_ask_name_the_slot_and_the_node() -> None:
    assert _redirection("MOVED 3999 127.0.0.1:6381") == ("MOVED", 3999, ("127.0.0.1", 6381))
    assert _redirection("ASK 12 10.0.0.5:7000") == ("ASK", 12, ("10.0.0.5", 7000))
    assert _redirection("MOVED 7 [::1]:7001") == ("MOVED", 7, ("::1", 7001))


@pytest.mark.parametrize(
    "message",
    ["NOSCRIPT No matching script", "MOVED", "MOVED x 1.2.3.4:5", "ASK 99999 h:1", "MOVED 1 h:"],
)
def test_anything_else_is_no_redirection(message: str) -> None:
    """Not followed: the error reply itself is the call's failure (a store fault, not a 500)."""
    assert _redirection(message) is None


def test_the_slot_map_names_each_slot_s_master_and_every_node() -> None:
    reply = [
        [0, 5460, [b"127.0.0.1", 7000, b"id0"], [b"127.0.0.1", 7003, b"id3"]],
        [5461, 16383, [b"", 7001, b"id1"]],  # no announced host: the node that was asked
    ]
    owners, nodes = _parse_slots(reply, ("10.0.0.9", 7001))
    assert len(owners) == SLOTS
    assert owners[0] == owners[5460] == ("127.0.0.1", 7000)
    assert owners[5461] == owners[16383] == ("10.0.0.9", 7001)
    assert nodes == {("127.0.0.1", 7000), ("127.0.0.1", 7003), ("10.0.0.9", 7001)}


def test_a_partial_map_leaves_unassigned_slots_without_owner() -> None:
    owners, _ = _parse_slots([[100, 200, [b"h", 1, b"i"]]], ("h", 1))
    assert owners[99] is None and owners[100] == ("h", 1) and owners[201] is None


def test_a_reply_that_is_no_slot_map_is_a_reply_error() -> None:
    with pytest.raises(ReplyError):
        _parse_slots(b"ERR nope", ("h", 1))
