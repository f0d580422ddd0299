"""What a message loses of its headers is planned once per set of names and kept, bounded."""

from __future__ import annotations

from multidict import CIMultiDict

from gateway.forward import headers as module
from gateway.forward.headers import HOP_BY_HOP, _DropPlans


def test_a_plan_follows_connection_and_twins_and_is_kept_per_set_of_names():
    plans = _DropPlans(HOP_BY_HOP | {"host"}, frozenset({"x-auth-subject"}))
    message = CIMultiDict(
        [("Host", "a"), ("Connection", "close, X-Secret"), ("X-Secret", "1"), ("Accept", "*/*")]
    )
    message.add("X_Auth_Subject", "forged")
    assert set(plans.of(message)) == {"host", "connection", "x-secret", "x_auth_subject"}
    assert len(plans._kept) == 1
    same_names = CIMultiDict(message)
    same_names["X-Secret"] = "2"  # other values, the same names: the same plan, no new entry
    assert set(plans.of(same_names)) == set(plans.of(message))
    assert len(plans._kept) == 1
    other = CIMultiDict([("Host", "a"), ("Connection", "keep-alive")])
    assert set(plans.of(other)) == {"host", "connection"}
    assert len(plans._kept) == 2


def test_huge_sets_of_names_are_planned_but_not_kept_and_the_store_is_bounded(monkeypatch):
    plans = _DropPlans(HOP_BY_HOP)
    huge = CIMultiDict([(f"X-{'n' * 200}-{i}", "v") for i in range(20)] + [("TE", "trailers")])
    assert plans.of(huge) == ("te",)
    assert plans._kept == {}  # over _PLANNED_NAMES characters: answered, not kept
    monkeypatch.setattr(module, "_KEPT_PLANS", 3)
    for i in range(7):
        assert plans.of(CIMultiDict([(f"X-{i}", "v"), ("Upgrade", "h2c")])) == ("upgrade",)
        assert len(plans._kept) <= 3


def test_the_last_plan_is_reused_only_for_the_same_names_and_connection_values():
    """The plan found last is answered again without a lookup: only for exactly the same names
    (case included) and the same Connection values, whatever came in between."""
    plans = _DropPlans(HOP_BY_HOP)
    plain = CIMultiDict([("Host", "a"), ("Accept", "*/*")])
    named = CIMultiDict([("Host", "a"), ("Accept", "*/*"), ("Connection", "X-Secret")])
    named.add("X-Secret", "1")
    other_value = CIMultiDict([("Host", "a"), ("Accept", "*/*"), ("Connection", "X-Other")])
    other_value.add("X-Secret", "1")
    for _ in range(2):  # alternating, then each twice in a row
        assert plans.of(plain) == ()
        assert set(plans.of(named)) == {"connection", "x-secret"}
        assert set(plans.of(named)) == {"connection", "x-secret"}
        assert plans.of(other_value) == ("connection",)  # X-Secret stays: not named here
        assert plans.of(plain) == ()
    huge = CIMultiDict([(f"X-{'n' * 300}-{i}", "v") for i in range(10)] + [("TE", "x")])
    assert plans.of(huge) == ("te",)
    assert plans.of(plain) == ()  # a key too large to keep did not become the last one
    assert plans._last_key is not None and plans._last_key[0] == ("Host", "Accept")
