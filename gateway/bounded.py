"""A dict bounded in entries and in characters: for what is kept by strings a client chose
(an Authorization value, a token), which a count alone does not bound (a 16 KiB value costs
what a thousand short ones do)."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(dict[K, V]):
    """Read as a dict (`get`, `in`: C calls, as fast); written with `put`, which weighs the
    entry (`size`: the characters it holds) and lets the oldest go first while either bound
    would be passed. An entry heavier than the whole budget is not kept."""

    def __init__(self, *, entries: int, chars: int) -> None:
        super().__init__()
        self._max_entries, self._max_chars = entries, chars
        self._sizes: dict[K, int] = {}
        self.chars = 0

    def put(self, key: K, value: V, size: int) -> None:
        self.discard(key)
        if size > self._max_chars:
            return
        while self and (len(self) >= self._max_entries or self.chars + size > self._max_chars):
            self.discard(next(iter(self)))  # insertion order is age: O(1) whatever the load
        self[key] = value
        self._sizes[key] = size
        self.chars += size

    def discard(self, key: K) -> None:
        if key in self:
            del self[key]
            self.chars -= self._sizes.pop(key)
