"""Stores of last activity and revocations.

Re-exports the store's types only: building a store (`gateway.store.factory`) imports redis-py,
and the pure decisions (`tokens/policy.py`) that name `Touch` must not.
"""

from __future__ import annotations

from gateway.store.base import (
    KeyHasher,
    Revocation,
    Store,
    StoreUnavailable,
    Touch,
    TouchResult,
)

__all__ = [
    "KeyHasher",
    "Revocation",
    "Store",
    "StoreUnavailable",
    "Touch",
    "TouchResult",
]
