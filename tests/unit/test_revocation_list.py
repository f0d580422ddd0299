"""Which tokens the in-memory revocation list refuses: by jti, sid or sub (a sub's only up to its
cut-off), never a token no entry names, and no entry past its `until`."""

from __future__ import annotations

from test_policy import IAT, token

from gateway.clock import ManualClock
from gateway.revocation import RevocationList
from gateway.store.base import Revocation, RevocationKind
from gateway.store.memory import MemoryStore


async def holding(
    clock: ManualClock, *entries: tuple[RevocationKind, str, float | None]
) -> RevocationList:
    revocations = RevocationList(MemoryStore(), clock, poll_interval=1.0)
    for kind, key, issued_before in entries:
        await revocations.revoke(Revocation(kind, key, issued_before, until=IAT + 3600))
    return revocations


async def test_a_list_of_other_tokens_refuses_none_of_these() -> None:
    clock = ManualClock(IAT)
    others = [("jti", f"h-jti-other-{n}", None) for n in range(50)]
    revocations = await holding(clock, *others, ("sid", "h-sid-other", None))  # type: ignore[arg-type]
    assert not revocations.is_revoked(token())
    assert not revocations.is_revoked(token(sid=None))
    assert not (await holding(clock)).is_revoked(token())  # and an empty list, none at all


async def test_each_id_of_a_token_revokes_it() -> None:
    clock = ManualClock(IAT)
    assert (await holding(clock, ("jti", "h-jti-jti-1", None))).is_revoked(token())
    by_sid = await holding(clock, ("sid", "h-sid-sid-1", None))
    assert by_sid.is_revoked(token(jti="another"))
    assert not by_sid.is_revoked(token(sid=None))  # a token without a sid is none of its session
    assert (await holding(clock, ("sub", "h-sub-alice", None))).is_revoked(token())


async def test_a_sub_revocation_covers_tokens_issued_up_to_its_cut_off() -> None:
    clock = ManualClock(IAT)
    revocations = await holding(clock, ("sub", "h-sub-alice", IAT))
    assert revocations.is_revoked(token(iat=IAT))
    assert not revocations.is_revoked(token(iat=IAT + 1))


async def test_an_entry_past_its_until_refuses_no_more() -> None:
    clock = ManualClock(IAT)
    revocations = await holding(clock, ("jti", "h-jti-jti-1", None))
    clock.set(IAT + 3600)
    assert revocations.is_revoked(token())
    clock.set(IAT + 3600.001)
    assert not revocations.is_revoked(token())
