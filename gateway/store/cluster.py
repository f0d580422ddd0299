"""The request path's pipelined connections to a Redis Cluster: one per node, each call sent to
the master owning its key's slot.

The slot map (which master serves which of the 16384 slots) is read with `CLUSTER SLOTS` from
any node that answers (all known nodes are asked at once; the first valid answer wins, so a
dead or black-holed node costs nothing). It is read again when a node redirects a call
(`MOVED`: the slot moved for good) and when a connection to a node is lost or refused (a
failover: the replica promoted in its place is found there). `ASK` (a slot being migrated) is
followed for that one call, with `ASKING` first on the target. In steady state every call is
still one command on one node's pipelined connection: one round trip.

A node that does not answer fails only the calls for its own slots: the other shards go on
(Redis's `cluster-require-full-coverage no`). Nothing here uses redis-py's cluster client,
which re-initialises after an error by running `COMMAND` on one node, possibly the dead one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from redis.crc import key_slot

from gateway.store.pipeline import ConnectionLost, PipelinedConnection, ReplyError

SLOTS = 16384
Address = tuple[str, int]
# A lost or refused node triggers a new read of the slot map at most this often (a dead
# master fails every call for its slots until the cluster promotes its replica).
REFRESH_INTERVAL = 0.1
# Redirections and retries one call may follow (MOVED, ASK, NOSCRIPT, a lost connection).
MAX_HOPS = 4


class SlotUncovered(ConnectionLost):
    """No node serves the key's slot (the slot map is unknown, or the slot is unassigned)."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_slots(reply: Any, asked: Address) -> tuple[list[Address | None], set[Address]]:
    """CLUSTER SLOTS -> (owner by slot, every node named). An empty host means the node we
    asked (a node that does not know its own address announces none)."""
    owners: list[Address | None] = [None] * SLOTS
    nodes: set[Address] = set()
    if not isinstance(reply, list):
        raise ReplyError(f"CLUSTER SLOTS answered {type(reply).__name__}")
    for entry in reply:
        start, end, *servers = entry
        addresses = []
        for server in servers:
            host = _text(server[0]) or asked[0]
            if host == "?":
                continue
            addresses.append((host, int(server[1])))
        if not addresses:
            continue
        nodes.update(addresses)
        for slot in range(int(start), int(end) + 1):
            owners[slot] = addresses[0]
    return owners, nodes


def _redirection(message: str) -> tuple[str, int, Address] | None:
    """`MOVED 3999 127.0.0.1:6381` -> ("MOVED", 3999, ("127.0.0.1", 6381)); None otherwise."""
    kind, _, rest = message.partition(" ")
    if kind not in ("MOVED", "ASK"):
        return None
    slot, _, target = rest.partition(" ")
    host, _, port = target.rpartition(":")
    if not (slot.isdigit() and port.isdigit() and 0 <= int(slot) < SLOTS):
        return None  # not a redirection we can follow: the error reply itself is the failure
    return kind, int(slot), (host.strip("[]"), int(port))


class ClusterConnections:
    def __init__(
        self,
        startup: Iterable[Address],
        connect: Callable[[str, int], PipelinedConnection],
        *,
        timeout: float,
    ) -> None:
        self._startup = list(startup)
        self._connect = connect  # a PipelinedConnection to one node (the URL's credentials, TLS)
        self._timeout = timeout
        self._connections: dict[Address, PipelinedConnection] = {}
        self._owners: list[Address | None] = [None] * SLOTS
        self._nodes: set[Address] = set(self._startup)  # every node ever named, and the URL's
        self._masters: list[Address] = []
        self._probe_keys: dict[tuple[Address, str], str] = {}  # `key_served_by`'s finds
        self._loading: asyncio.Future[None] | None = None
        self._scheduled: asyncio.TimerHandle | None = None  # a background read, due
        self._loaded_at = -REFRESH_INTERVAL  # loop time
        self.refreshes = 0  # slot map reads that succeeded (tests, metrics)
        # Run on every new connection to a node (the store's eviction check), as
        # PipelinedConnection.on_connect.
        self.on_connect: Callable[[PipelinedConnection], Awaitable[None]] | None = None

    # -- routing ---------------------------------------------------------------------------

    def connection(self, address: Address) -> PipelinedConnection:
        connection = self._connections.get(address)
        if connection is None:
            connection = self._connections[address] = self._connect(*address)
            connection.on_connect = self.on_connect
        return connection

    def owner(self, key: str) -> Address | None:
        """The master serving `key`'s slot, as the slot map last read says."""
        return self._owners[key_slot(key.encode())]

    def for_key(self, key: str) -> PipelinedConnection | None:
        """The hot path: the connection to the master of `key`'s slot; None before the slot
        map is known (or for an unassigned slot): `call` reads it first."""
        owner = self._owners[key_slot(key.encode())]
        return None if owner is None else self.connection(owner)

    def key_served_by(self, address: Address, prefix: str) -> str | None:
        """A key `prefix{n}` whose slot the slot map gives to `address` (for a probe of that
        master); None if it serves none. A master of 1/k of the slots takes about k tries."""
        cached = self._probe_keys.get((address, prefix))
        if cached is not None and self._owners[key_slot(cached.encode())] == address:
            return cached
        if address not in self._masters:
            return None
        for tag in range(8 * SLOTS):
            key = f"{prefix}{{{tag}}}"
            if self._owners[key_slot(key.encode())] == address:
                self._probe_keys[address, prefix] = key
                return key
        return None

    def slots_unserved(self) -> int:
        """Slots the slot map gives no master (0 before it is read: unknown, not unserved)."""
        if not self._masters:
            return 0
        return self._owners.count(None)

    async def masters(self, deadline: float) -> list[Address]:
        """The masters serving slots (the slot map is read first if not known yet)."""
        if not self._masters:
            await self.refresh(deadline, force=True)
        return list(self._masters)

    # -- the slot map ----------------------------------------------------------------------

    async def refresh(self, deadline: float, *, force: bool = False) -> None:
        """Read the slot map again (one read at a time, at most every REFRESH_INTERVAL unless
        `force`), waiting for it until `deadline`. Raises ConnectionLost when no node gave one."""
        loop = asyncio.get_running_loop()
        if self._loading is None:
            if not force and loop.time() - self._loaded_at < REFRESH_INTERVAL:
                return
            self._loading = asyncio.ensure_future(self._load())
        loading = self._loading
        async with asyncio.timeout_at(deadline):
            await asyncio.shield(loading)

    def refresh_soon(self) -> None:
        """A read of the slot map in the background (after a redirection or a lost node):
        now, or as soon as REFRESH_INTERVAL has passed since the last one (never dropped: a
        MOVED right after a read must still bring the rest of the new map)."""
        if self._loading is not None or self._scheduled is not None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, REFRESH_INTERVAL - (loop.time() - self._loaded_at))
        self._scheduled = loop.call_later(delay, self._start_background_load)

    def _start_background_load(self) -> None:
        self._scheduled = None
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._load())
            # Its failure is seen by the next call that needs the map, not here.
            self._loading.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout

        async def ask(address: Address) -> tuple[list[Address | None], set[Address], Address]:
            reply = await self.connection(address).call("CLUSTER", "SLOTS", deadline=deadline)
            owners, nodes = _parse_slots(reply, address)
            if not nodes:
                raise ReplyError(f"{address[0]}:{address[1]} serves no slots")
            return owners, nodes, address

        # The current masters first in the list only for determinism: all are asked at once.
        candidates = list(dict.fromkeys([*self._masters, *sorted(self._nodes)]))
        queries = [asyncio.ensure_future(ask(address)) for address in candidates]
        errors: list[str] = []
        try:
            for answered in asyncio.as_completed(queries):
                try:
                    owners, nodes, _ = await answered
                except (ReplyError, OSError, TimeoutError, ValueError, TypeError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc))
                    continue
                self._owners = owners
                self._nodes |= nodes
                self._masters = sorted({owner for owner in owners if owner is not None})
                self._loaded_at = loop.time()
                self.refreshes += 1
                return
        finally:
            for query in queries:
                query.cancel()
            await asyncio.gather(*queries, return_exceptions=True)
            self._loading = None
        self._loaded_at = loop.time()  # failed too: not again before REFRESH_INTERVAL
        raise ConnectionLost(f"no cluster node answered CLUSTER SLOTS: {errors}")

    # -- calls -----------------------------------------------------------------------------

    async def call(
        self,
        key: str,
        *args: str | bytes | int | float,
        deadline: float,
        script: str | None = None,
        failed: tuple[PipelinedConnection, BaseException] | None = None,
    ) -> Any:
        """One command about `key`, on the master of its slot, redirections followed.
        `script`: the source to EVAL instead when EVALSHA answers NOSCRIPT (a node restarted
        or promoted without it). `failed`: a first attempt already made (the fast path's) and
        how it failed. Raises ReplyError, OSError (ConnectionLost) or TimeoutError."""
        command = args
        asking = False
        lost_once = False
        connection: PipelinedConnection | None = None
        failure: BaseException | None = None
        if failed is not None:
            connection, failure = failed
        for _ in range(MAX_HOPS + 1):
            if failure is not None:
                if isinstance(failure, ReplyError):
                    message = str(failure)
                    redirection = _redirection(message)
                    if redirection is not None:
                        kind, slot, target = redirection
                        if kind == "MOVED":
                            self._owners[slot] = target  # at once; the rest of the map after
                            self.refresh_soon()
                        connection, asking = self.connection(target), kind == "ASK"
                    elif message.startswith("NOSCRIPT") and script is not None:
                        command = ("EVAL", script, *command[2:])
                    else:
                        raise failure
                elif isinstance(failure, OSError) and not lost_once:
                    # Lost or refused (a restart, a failover): the slot map again, then one
                    # retry wherever it names (the same node, on a fresh connection, if
                    # nothing moved).
                    lost_once = True
                    with contextlib.suppress(ConnectionLost):
                        await self.refresh(deadline)
                    connection, asking = None, False
                else:
                    if isinstance(failure, TimeoutError):
                        self.refresh_soon()
                    raise failure
            if connection is None:
                connection = self.for_key(key)
                if connection is None:
                    await self.refresh(deadline, force=True)
                    connection = self.for_key(key)
                    if connection is None:
                        raise SlotUncovered(f"no cluster node serves the slot of {key[:8]}...")
            try:
                sent = connection.call_asking if asking else connection.call
                return await sent(*command, deadline=deadline)
            except (ReplyError, OSError, TimeoutError) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def on_each_master(
        self, deadline: float, call: Callable[[PipelinedConnection], Awaitable[Any]]
    ) -> dict[Address, Any]:
        """`call` on every master at once: {address: result or the exception it raised}.
        A master that fails prompts a new read of the slot map (it may have been replaced)."""
        masters = await self.masters(deadline)

        async def one(address: Address) -> Any:
            async with asyncio.timeout_at(deadline):
                return await call(self.connection(address))

        results = await asyncio.gather(*map(one, masters), return_exceptions=True)
        if any(isinstance(result, BaseException) for result in results):
            self.refresh_soon()
        return dict(zip(masters, results, strict=True))

    def close(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        if self._loading is not None:
            self._loading.cancel()
        for connection in self._connections.values():
            connection.close()
