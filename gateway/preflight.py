"""Everything a config can be refused for before the gateway listens, as `field.path: reason`.

`check-config` and `serve` both call `problems()`, so a config check-config passes is one serve
starts with, and serve refuses a bad one with the same lines (what the config alone decides,
such as two listeners on one port, is refused by loading it). The checks reuse the code that
serve itself runs (key loading, the store factory, the admin token loader), never a copy of
its rules. `connect=True` (`check-config --connect`) also does what needs the network: the
first fetch of every remote key set and a ping of the store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from gateway.admin import AdminTokenError, load_admin_token
from gateway.config import Config, mask_url
from gateway.store.base import Store, StoreUnavailable
from gateway.store.factory import StoreConfigError, hasher_from_config, open_store
from gateway.tokens.keys import KeyRing, KeySourceError, static_keys

log = logging.getLogger("idlegate.preflight")


async def problems(
    config: Config, *, connect: bool = False, environ: Mapping[str, str] | None = None
) -> list[str]:
    """Every problem found (empty: serve would start), each `field.path: reason`."""
    env = os.environ if environ is None else environ
    found = _admin_problems(config) + _key_problems(config, env)
    store_problems, store = _store(config, env)
    found += store_problems
    if store is not None:
        try:
            if connect:
                found += await _store_connect_problems(config, store)
        finally:
            await store.close()
    if connect:
        found += await _remote_key_problems(config, env)
    return found


def _admin_problems(config: Config) -> list[str]:
    if config.admin.token_file is None:
        return []
    try:
        load_admin_token(config.admin.token_file)  # what serve loads at start
    except AdminTokenError as exc:
        return [str(exc)]  # already `admin.token_file: ...`
    return []


def _key_problems(config: Config, environ: Mapping[str, str]) -> list[str]:
    found = []
    for index, provider in enumerate(config.providers):
        if provider.jwks_uri is not None or provider.discovery:
            continue  # remote: fetched with connect=True
        try:
            static_keys(provider, environ)
        except KeySourceError as exc:
            found.append(f"providers.{index}.{exc.field}: {exc.detail}")
    return found


def _store(config: Config, environ: Mapping[str, str]) -> tuple[list[str], Store | None]:
    """The store as serve builds it (nothing connects), or why it cannot be built."""
    found = []
    try:
        hasher_from_config(config.store, environ)
    except StoreConfigError as exc:
        found.append(str(exc))
    try:
        store = open_store(config.store)
    except StoreConfigError as exc:
        return [*found, str(exc)], None
    return found, store


async def _store_connect_problems(config: Config, store: Store) -> list[str]:
    """The store answers, and keeps what it holds (serve refuses an evicting Redis too)."""
    try:
        await store.ping()
        evicts = await store.eviction_problem()
    except StoreUnavailable as exc:
        return [f"store.url: {mask_url(config.store.url)} does not serve ({exc})"]
    return [] if evicts is None else [f"store.url: {evicts}"]


async def _remote_key_problems(config: Config, environ: Mapping[str, str]) -> list[str]:
    found = []
    for index, provider in enumerate(config.providers):
        if provider.jwks_uri is None and not provider.discovery:
            continue
        ring = KeyRing(provider, None, environ)
        try:
            await ring.start()  # the first fetch, as serve makes it; it never raises
        finally:
            await ring.close()
        field = "jwks_uri" if provider.jwks_uri is not None else "discovery"
        if not ring.ready:
            found.append(f"providers.{index}.{field}: no usable keys ({ring.last_error})")
        elif ring.last_error is not None:  # one issuer of several: served, but not as meant
            found.append(f"providers.{index}.{field}: {ring.last_error}")
    return found
