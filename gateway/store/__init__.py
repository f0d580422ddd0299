"""Stores of last activity and revocations."""

from __future__ import annotations

from gateway.store.base import (
    KeyHasher,
    Revocation,
    Store,
    StoreUnavailable,
    Touch,
    TouchResult,
)
from gateway.store.factory import StoreConfigError, hasher_from_config, open_store

__all__ = [
    "KeyHasher",
    "Revocation",
    "Store",
    "StoreConfigError",
    "StoreUnavailable",
    "Touch",
    "TouchResult",
    "hasher_from_config",
    "open_store",
]
