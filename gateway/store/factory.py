"""Build the configured store and the keyed hasher of ids from `config.Store`."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

from redis.exceptions import RedisClusterException, RedisError

from gateway.config import Store as StoreConfig
from gateway.config import mask_url
from gateway.errors import StartupError
from gateway.store.base import KeyHasher, Store
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore, client_from_url, cluster_for, pipelined_for


class StoreConfigError(StartupError, ValueError):
    """The store settings cannot be used; the message reads `store.<field>: <reason>`."""


def open_store(config: StoreConfig) -> Store:
    """A MemoryStore for `memory://`, else a RedisStore (nothing connects until the first call)."""
    if config.url.startswith("memory://"):
        if config.url != "memory://":
            raise StoreConfigError("store.url: memory:// takes no host, path or options")
        return MemoryStore()
    try:
        client, closing = client_from_url(config.url, timeout=config.timeout)
        # The request path's own connections: their TLS context loads the URL's files now.
        pipelined = pipelined_for(client, timeout=config.timeout)
        cluster = cluster_for(client, timeout=config.timeout)
    except (ValueError, RedisError, RedisClusterException) as exc:  # redis-py refusing options
        raise StoreConfigError(f"store.url: {exc} (in {mask_url(config.url)})") from None
    return RedisStore(
        client,
        key_prefix=config.key_prefix,
        timeout=config.timeout,
        closing=closing,
        pipelined=pipelined,
        cluster=cluster,
    )


def hasher_from_config(config: StoreConfig, environ: Mapping[str, str] | None = None) -> KeyHasher:
    """The hasher of jti/sid/sub into store keys. Its secret comes from the environment variable
    named by `hash_key_env` (every replica must share it); without one, a fixed secret derived
    from `key_prefix` is used: keys still hold no raw claim, but anyone can recompute them."""
    env = os.environ if environ is None else environ
    if config.hash_key_env is None:
        return KeyHasher(
            hashlib.sha256(b"idlegate-store-key\0" + config.key_prefix.encode()).digest()
        )
    secret = env.get(config.hash_key_env)
    if not secret:
        raise StoreConfigError(
            f"store.hash_key_env: environment variable {config.hash_key_env} is not set or empty"
        )
    return KeyHasher(secret.encode())
