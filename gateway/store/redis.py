"""The store shared by every replica: Redis (standalone, Sentinel or Cluster) through redis-py.

Each operation is one round trip (a Lua script where a decision and a write must be atomic),
bounded by `store.timeout`, and fails as `StoreUnavailable`. The client reconnects by itself
after Redis restarts or fails over; a call cut short by the timeout drops its connection
(redis-py disconnects on cancellation), so a late reply can never be read by the next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import secrets
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from importlib import resources
from time import monotonic, perf_counter
from typing import Any, TypeVar
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from gateway.logs import printable
from gateway.metrics import STORE_DURATION, STORE_ERRORS, batched
from gateway.store.base import (
    Activity,
    OutageLog,
    Revocation,
    RevocationKind,
    StoreUnavailable,
    Touch,
    TouchResult,
)
from gateway.store.cluster import SLOTS, Address, ClusterConnections, SlotUncovered
from gateway.store.pipeline import (
    DEADLINE,
    EMPTY_BULK,
    ConnectionLost,
    PipelinedConnection,
    ReplyError,
    ServerTime,
    brief,
    pack_command,
    role_name,
)

log = logging.getLogger("idlegate.store")
RedisClient = Redis | RedisCluster
_TouchArgs = tuple[Any, ...]  # DEADLINE among them: resolved by the connection
# RedisClusterException is no RedisError (no reachable node, a slot not covered): a store
# fault all the same, never a 500.
_FAILURES = (RedisError, RedisClusterException, TimeoutError, OSError, ReplyError)
T = TypeVar("T")
# check_and_touch.lua's answer for a call it ran past its deadline (nothing written), which
# the caller was about to give up on: as much an outage as no answer.
_LATE = 2
_RAN_LATE = "Redis ran the call after its deadline"

# Calls in flight per process, and so connections (per node with Cluster): enough for the proxy's
# concurrency; beyond it a call waits for a slot, within its timeout, instead of failing on an
# exhausted pool (Sentinel's and Cluster's pools do not block).
MAX_CONNECTIONS = 64
# A connection idle this long is PINGed before reuse, so a half-dead one is replaced first.
HEALTH_CHECK_INTERVAL = 30.0
# How long a revocation waits for one replica's acknowledgement (admin path only, never the
# request path): long enough for a loaded replica's REPLCONF ACK, short enough for an operator.
REPLICA_WAIT = 1.0
_KINDS: tuple[RevocationKind, ...] = ("jti", "sid", "sub")
# Keys per record_activity.lua call: each call holds Redis for its duration (~1 µs per key).
FLUSH_CHUNK = 256
FLUSH_CONCURRENCY = 4  # script calls of one flush in flight at once
# Readiness writes one key (per Cluster master) that expires: rewritten every probe.
READY_PROBE_TTL_MS = 60_000
# Calls that only read: their success does not end an outage that a failing write started
# (an OOM Redis answers reads and refuses every write: the requests still fail).
_READS = frozenset(("last_activity", "revocations", "eviction_policy"))


def _script(name: str) -> str:
    return resources.files("gateway.store").joinpath(name).read_text(encoding="utf-8")


class RedisStore:
    """Last activity as `<prefix>:a:<hashed id>` strings with a TTL; revocations in one hash
    `<prefix>:{rev}` (hash tag: anything touching it stays in one Cluster slot)."""

    def __init__(
        self,
        client: RedisClient,
        *,
        key_prefix: str,
        timeout: float,
        closing: tuple[RedisClient, ...] = (),
        pipelined: PipelinedConnection | None = None,
        cluster: ClusterConnections | None = None,
    ) -> None:
        self._client = client
        # Idle decisions take `now` from Redis's clock (check_and_touch.lua), never from
        # Touch.now: one clock for every replica. Tests and simulations that drive time with
        # a ManualClock set this to decide with Touch.now instead; open_store never does.
        self.caller_time = False
        # Standalone and Sentinel: the request path's one call goes over a pipelined connection
        # (a fraction of redis-py's per-call CPU); everything else via redis-py.
        self._pipelined = pipelined
        # Cluster: every call over pipelined connections, one per node, routed by slot; a
        # lost shard fails its own keys' calls only (each node has its outage log).
        self._cluster = cluster
        self._node_outages: dict[Address, OutageLog] = {}
        self._closing = closing  # further clients to close with this one (Sentinel's)
        # Sentinel: the discovery readiness asks about (no sentinel answering is degraded).
        self._sentinel: tuple[ConcurrentSentinel, str] | None = None
        pool = client.connection_pool if isinstance(client, Redis) else None
        if isinstance(pool, SentinelConnectionPool) and isinstance(
            pool.sentinel_manager, ConcurrentSentinel
        ):
            self._sentinel = (pool.sentinel_manager, pool.service_name)
        self._prefix = key_prefix
        self._timeout = timeout
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self.outage = OutageLog(log, "store (redis)")
        self._revocation_key = f"{key_prefix}:{{rev}}"
        self._ready_key = f"{key_prefix}:ready"  # readiness's write probe (it expires)
        self._touch_source = _script("check_and_touch.lua")
        self._check_and_touch = client.register_script(self._touch_source)
        self._touch_duration = batched(STORE_DURATION.labels(op="check_and_touch"))
        self._revoke_source = _script("revoke.lua")
        self._revoke = client.register_script(self._revoke_source)
        self._revocations_source = _script("revocations.lua")
        self._revocations = client.register_script(self._revocations_source)
        self._record_source = _script("record_activity.lua")
        self._record_activity = client.register_script(self._record_source)
        self._eviction: str | None = None  # the last eviction problem found (logged once)
        self._eviction_checked = False
        self._policies: dict[str, str | None] = {}  # maxmemory-policy by node, as last read
        if pipelined is not None:
            pipelined.on_connect = self._check_new_connection
        if cluster is not None:
            cluster.on_connect = self._check_new_connection

    @property
    def client(self) -> RedisClient:
        return self._client

    def activity_key(self, key: str) -> str:
        return f"{self._prefix}:a:{key}"

    def _outage(self, node: Address | None) -> OutageLog:
        """The outage log of `node` (Cluster: one per node, so that a lost shard is one line
        however the healthy shards' calls interleave), else the store's."""
        if node is None:
            return self.outage
        outage = self._node_outages.get(node)
        if outage is None:
            name = f"store (redis cluster node {node[0]}:{node[1]})"
            outage = self._node_outages[node] = OutageLog(log, name)
        return outage

    def _unavailable(
        self, op: str, exc: BaseException, node: Address | None = None
    ) -> StoreUnavailable:
        STORE_ERRORS.labels(op=op).inc()
        if isinstance(exc, TimeoutError):
            reason = f"timed out after {self._timeout:g}s"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        self._outage(node).failure(f"{op}: {reason}", write=op not in _READS)
        return StoreUnavailable(f"redis {op}: {reason}")

    def _answered(self, node: Address | None, op: str = "") -> None:
        outage = self.outage if node is None else self._node_outages.get(node)
        if outage is not None and outage.since is not None:
            outage.success(write=op not in _READS)

    async def _call(
        self,
        op: str,
        call: Callable[[], Awaitable[T]],
        *,
        round_trips: int = 1,
        extra: float = 0.0,
        node: Address | None = None,
    ) -> T:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout * round_trips + extra), self._slots:
                result = await call()
        except _FAILURES as exc:
            raise self._unavailable(op, exc, node) from exc
        finally:
            STORE_DURATION.labels(op=op).observe(time.perf_counter() - started)
        self._answered(node, op)
        return result

    def _keyed(self, op: str, key: str, *args: str | bytes | int | float, script: str = "") -> Any:
        """Cluster: one command about `key` on the master of its slot (redirections followed),
        within store.timeout, as `_call` does it."""
        cluster = self._cluster
        assert cluster is not None

        def send() -> Awaitable[Any]:
            deadline = asyncio.get_running_loop().time() + self._timeout
            return cluster.call(key, *args, deadline=deadline, script=script or None)

        return self._call(op, send, node=cluster.owner(key))

    def _touch_command(self, touch: Touch) -> tuple[str, _TouchArgs]:
        key = self.activity_key(touch.key)
        caller_time = self.caller_time
        args = (
            touch.initial,
            touch.now if caller_time else "",
            touch.idle_timeout,
            int(touch.extend),
            touch.expires_at,
            touch.linger,
            int(touch.remember_idle),
            "" if caller_time else DEADLINE,  # a fake clock's now has no deadline on Redis's
        )
        return key, args

    def _packed_touch(self, touch: Touch) -> tuple[bytes, str, _TouchArgs]:
        """The EVALSHA of a Touch, RESP-encoded but for its deadline (the last argument,
        `PipelinedConnection.send_until` adds it). Redis's clock decides (`now` is not sent),
        so a Touch kept for a token and route sends the same bytes every time: they are kept
        on it (`Touch.encoded`, read by `check_and_touch`), and a request of a token seen
        before formats and packs nothing."""
        key, args = self._touch_command(touch)
        whole = pack_command("EVALSHA", self._check_and_touch.sha, 1, key, *args[:-1], "")
        packed = (whole[: -len(EMPTY_BULK)], key, args)
        touch.encoded = (self, packed)
        return packed

    async def check_and_touch(self, touch: Touch) -> TouchResult:
        cluster = self._cluster
        if cluster is not None:
            return await self._cluster_touch(cluster, *self._touch_command(touch))
        if self._pipelined is None:  # a unix socket: redis-py, and no deadline on its clock
            key, args = self._touch_command(touch)
            args = (*args[:-1], "")
            reply = await self._call(
                "check_and_touch", lambda: self._check_and_touch(keys=[key], args=args)
            )
            return TouchResult(float(reply[0]), bool(reply[1]))
        # The request path: as few coroutine levels as possible between the request and the
        # pipelined reply (each one is walked again when the reply wakes the request up).
        # Bounded by store.timeout, retry included: the connection's watchdog fails the call
        # at `deadline`.
        connection = self._pipelined
        encoded = touch.encoded
        if encoded is not None and encoded[0] is self and not self.caller_time:
            packed: tuple[bytes, str, _TouchArgs] = encoded[1]  # `_packed_touch` made it
        else:
            packed = self._packed_touch(touch)
        deadline = monotonic() + self._timeout  # the event loop's clock
        started = perf_counter()
        try:
            try:
                if self.caller_time:  # a fake clock's now: no deadline on Redis's
                    reply = await connection.send(packed[0] + EMPTY_BULK, deadline)
                else:
                    reply = await connection.send_until(packed[0], deadline)
            except (ReplyError, ConnectionLost) as exc:
                reply = await self._touch_again(packed[1], packed[2], deadline, exc)
            connection.clock.sample(float(reply[2]))  # late or not: the server's TIME
            idle = reply[1]
            if idle == _LATE:
                raise TimeoutError(_RAN_LATE)
        except _FAILURES as exc:
            raise self._unavailable("check_and_touch", exc) from exc
        finally:
            self._touch_duration.observe(perf_counter() - started)
        if self.outage.since is not None:
            self.outage.success()
        return TouchResult(float(reply[0]), bool(idle))

    async def _cluster_touch(
        self, cluster: ClusterConnections, key: str, args: tuple[float | int | str, ...]
    ) -> TouchResult:
        """check_and_touch on the master of the key's slot: one command on its pipelined
        connection; a redirection, NOSCRIPT or a lost node is followed by `cluster.call`."""
        connection = cluster.for_key(key)
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self._timeout
        sha = self._check_and_touch.sha
        try:
            try:
                if connection is None:  # the slot map is not known yet
                    raise SlotUncovered("no slot map yet")
                reply = await connection.call("EVALSHA", sha, 1, key, *args, deadline=deadline)
                connection.clock.sample(float(reply[2]))
            except (ReplyError, OSError, TimeoutError) as exc:
                failed = None if connection is None else (connection, exc)
                reply = await cluster.call(
                    key,
                    "EVALSHA",
                    sha,
                    1,
                    key,
                    *args,
                    deadline=deadline,
                    script=self._touch_source,
                    failed=failed,
                )
            if reply[1] == _LATE:
                raise TimeoutError(_RAN_LATE)
        except _FAILURES as exc:
            raise self._unavailable("check_and_touch", exc, cluster.owner(key)) from exc
        finally:
            self._touch_duration.observe(time.perf_counter() - started)
        if self._node_outages:
            self._answered(cluster.owner(key))
        return TouchResult(float(reply[0]), bool(reply[1]))

    async def _touch_again(
        self,
        key: str,
        args: tuple[float | int | str, ...],
        deadline: float,
        failure: ReplyError | ConnectionLost,
    ) -> Any:
        """After a failed EVALSHA. NOSCRIPT (a restarted or failed-over Redis forgot the
        script): EVAL caches it again. READONLY (a demoted master): the connection is dropped
        and the call retried once. A lost connection (e.g. a Redis restart): one immediate
        retry on a fresh connection; the script is safe to repeat (max() semantics)."""
        connection = self._pipelined
        assert connection is not None
        retried = False
        while True:
            if isinstance(failure, ReplyError) and str(failure).startswith("NOSCRIPT"):
                command: tuple[str, str] = ("EVAL", self._touch_source)
            elif (
                isinstance(failure, ReplyError) and not str(failure).startswith("READONLY")
            ) or retried:
                raise failure
            else:
                # READONLY: the node was demoted (a Sentinel failover while it stayed up):
                # drop the connection, so the retry asks the sentinels for the new master.
                if isinstance(failure, ReplyError):
                    connection.close()
                retried = True
                command = ("EVALSHA", self._check_and_touch.sha)
            try:
                return await connection.call(*command, 1, key, *args, deadline=deadline)
            except (ReplyError, ConnectionLost) as exc:
                failure = exc

    async def record_activity(self, batch: Sequence[Activity], now: float) -> list[Activity]:
        """One script call per FLUSH_CHUNK keys (per hash slot with Cluster: a script's keys
        must share one), FLUSH_CONCURRENCY at a time: on a standalone Redis a flush of 1000
        keys is four commands. A chunk that fails is returned for the next flush; the others
        are written."""
        client = self._client
        chunks: list[list[Activity]] = []
        if isinstance(client, RedisCluster):
            by_slot: dict[int, list[Activity]] = {}
            for activity in batch:
                slot = client.keyslot(self.activity_key(activity.key))
                by_slot.setdefault(slot, []).append(activity)
            groups: list[list[Activity]] = list(by_slot.values())
        else:
            groups = [list(batch)]
        for group in groups:
            chunks.extend(group[i : i + FLUSH_CHUNK] for i in range(0, len(group), FLUSH_CHUNK))
        now_arg: float | str = now if self.caller_time else ""
        # Ages count to this moment: sent as Redis's own time of it, the activity is stamped
        # when it happened however late Redis runs the call (record_activity.lua).
        flushed: ServerTime | bytes | str = "" if self.caller_time else ServerTime(monotonic())
        if self._pipelined is not None and isinstance(flushed, ServerTime):
            # redis-py makes the call (to the same server): the literal, from what the
            # pipelined connection learnt of that server's clock.
            flushed = self._pipelined.clock.literal(flushed.at)
        elif self._cluster is None:
            flushed = ""  # a unix socket: nothing knows the server's clock

        # A few calls at a time: a flush of many slots must not take the connections (and
        # the _slots) the request path's calls need meanwhile.
        concurrent = asyncio.Semaphore(FLUSH_CONCURRENCY)

        async def write(chunk: list[Activity]) -> None:
            keys = [self.activity_key(activity.key) for activity in chunk]
            args: list[Any] = [now_arg, flushed]
            for activity in chunk:
                args += (
                    activity.at,
                    activity.age,
                    activity.initial,
                    activity.idle_timeout,
                    activity.expires_at,
                    activity.linger,
                )
            async with concurrent:
                if self._cluster is not None:  # the chunk's keys share one slot
                    sha = self._record_activity.sha
                    await self._keyed(
                        "flush",
                        keys[0],
                        *("EVALSHA", sha, len(keys), *keys, *args),
                        script=self._record_source,
                    )
                    return
                await self._call("flush", lambda: self._record_activity(keys=keys, args=args))

        outcomes = await asyncio.gather(*map(write, chunks), return_exceptions=True)
        failed: list[Activity] = []
        for chunk, outcome in zip(chunks, outcomes, strict=True):
            if isinstance(outcome, StoreUnavailable):
                failed.extend(chunk)
            elif isinstance(outcome, BaseException):
                raise outcome
        return failed

    async def last_activity(self, key: str) -> float | None:
        if self._cluster is not None:
            found = await self._keyed(
                "last_activity", self.activity_key(key), "GET", self.activity_key(key)
            )
            return None if found is None else float(found)
        value: bytes | str | None = await self._call(
            "last_activity", lambda: self._client.get(self.activity_key(key))
        )
        return None if value is None else float(value)

    async def revoke(self, revocation: Revocation, now: float) -> int | None:
        issued_before = "" if revocation.issued_before is None else repr(revocation.issued_before)
        args = (
            f"{revocation.kind}:{revocation.key}",
            issued_before,
            revocation.until,
            now,
            secrets.randbits(48),
        )
        keys = [self._revocation_key]
        client = self._client
        if self._cluster is not None:
            # Cluster: no WAIT (it would hold the node's shared pipelined connection for up to
            # REPLICA_WAIT); the instances' write-back covers a lost write.
            key = self._revocation_key
            await self._keyed(
                "revoke",
                key,
                "EVALSHA",
                self._revoke.sha,
                1,
                key,
                *args,
                script=self._revoke_source,
            )
            return None
        if not isinstance(client, Redis):
            await self._call("revoke", lambda: self._revoke(keys=keys, args=args))
            return None

        async def write_and_wait() -> int | None:
            info = await client.info("replication")
            if int(info.get("connected_slaves", 0)) == 0:
                await self._revoke(keys=keys, args=args)
                return None
            # The write and WAIT on one connection (a pipeline): WAIT counts the replicas that
            # acknowledged this connection's writes.
            pipe = client.pipeline(transaction=False)
            await self._revoke(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", 1, int(REPLICA_WAIT * 1000))
            replies = await pipe.execute()
            return int(replies[-1])

        # INFO and the script within store.timeout each, then WAIT for up to REPLICA_WAIT.
        return await self._call("revoke", write_and_wait, round_trips=2, extra=REPLICA_WAIT)

    async def revocations(self, since: int) -> tuple[int, list[Revocation] | None]:
        """Entries whose `until` passed may still be listed until the next revoke prunes them;
        they cover no token that could still be valid."""
        keys = [self._revocation_key]
        if self._cluster is not None:
            key = self._revocation_key
            reply: list[bytes] = await self._keyed(
                "revocations",
                key,
                "EVALSHA",
                self._revocations.sha,
                1,
                key,
                since,
                script=self._revocations_source,
            )
        else:
            reply = await self._call(
                "revocations", lambda: self._revocations(keys=keys, args=(since,))
            )
        version = int(reply[0])
        if len(reply) == 1 and version == since:
            return version, None
        entries = []
        for field, value in zip(reply[1::2], reply[2::2], strict=True):
            kind, _, key = field.decode().partition(":")
            issued_before, _, until = value.decode().partition("|")
            if kind not in _KINDS:
                continue  # written by a newer version of the gateway
            entries.append(
                Revocation(
                    kind=kind,
                    key=key,
                    issued_before=float(issued_before) if issued_before else None,
                    until=float(until),
                )
            )
        return version, entries

    async def ping(self) -> str | None:
        """A write that expires (`SET <prefix>:ready 1 PX ...`), not a PING: a Redis that
        answers but refuses writes (OOM under noeviction, MISCONF, NOREPLICAS, a replica)
        fails every call the gateway makes. Cluster: on every master (a key of its own
        slots); the ones that fail are named (their keys' calls fail, the others' go on), and
        StoreUnavailable only when none takes it. Sentinel: the sentinels are asked too; none
        answering (the last verified master is used meanwhile) is degraded."""
        if self._cluster is None:
            await self._call("ping", self._write_probe)
            pipelined = self._pipelined
            if pipelined is not None:
                # The request path's own connection too (found through the sentinels, its
                # handshake and policy check made): opened here, at start and by readiness,
                # it is not the first request's to open within one store.timeout.
                deadline = monotonic() + self._timeout * 4
                try:
                    await pipelined.call(*self._probe_command(self._ready_key), deadline=deadline)
                except _FAILURES as exc:
                    raise self._unavailable("ping", exc) from exc
            if self._sentinel is not None:
                sentinel, service = self._sentinel
                return await sentinel.discovery_problem(service)
            return None
        cluster = self._cluster
        prefix = self._ready_key + ":"

        async def probe(node: PipelinedConnection) -> Any:
            key = cluster.key_served_by(node.address, prefix)
            if key is None:
                raise ConnectionLost("serves no slot")
            try:
                return await node.call(*self._probe_command(key))
            except ReplyError as exc:
                if _redirected(exc):  # the slot moved since the map was read: it answers
                    return None
                raise

        async def every_master() -> dict[Address, Any]:
            deadline = asyncio.get_running_loop().time() + self._timeout
            return await cluster.on_each_master(deadline, probe)

        # The slot map (if not known), then the writes.
        answers = await self._call("ping", every_master, round_trips=2)
        down = sorted(
            f"{host}:{port} ({brief(a)})"
            for (host, port), a in answers.items()
            if isinstance(a, BaseException)
        )
        if len(down) == len(answers):
            raise self._unavailable(
                "ping", ConnectionLost(f"no cluster master takes a write ({', '.join(down)})")
            )
        problems = []
        if down:
            problems.append(
                f"{len(down)} of {len(answers)} cluster masters fail ({', '.join(down)}):"
                " the tokens of their slots get store.on_error, the others are served"
            )
        unserved = cluster.slots_unserved()
        if unserved:
            problems.append(
                f"{unserved} of {SLOTS} slots have no master in the slot map: the tokens of "
                "those slots get store.on_error"
            )
        return "; ".join(problems) or None

    def _probe_command(self, key: str) -> tuple[str | int, ...]:
        return ("SET", key, "1", "PX", READY_PROBE_TTL_MS)

    async def _write_probe(self) -> Any:
        return await self._client.execute_command(*self._probe_command(self._ready_key))

    async def eviction_problem(self) -> str | None:
        """Checked at start (an evicting Redis is refused), by every readiness probe, and on
        every new pipelined connection (a restart or failover may bring another config)."""
        # Up to two round trips per node (CONFIG GET, then INFO where CONFIG is disabled), and
        # on Cluster the slot map first: a budget of a few store.timeouts, not one.
        policies = await self._call("eviction_policy", self._read_policies, round_trips=4)
        return self._note_policies(policies)

    async def _read_policies(self) -> dict[str, str | None]:
        """maxmemory-policy by node (every primary of a Cluster); None where unreadable. A
        Cluster master that does not answer is left out (ping names it: a lost shard is a
        degraded store, not an evicting one); StoreUnavailable when none answers."""
        client = self._client
        cluster = self._cluster
        if cluster is not None:
            deadline = asyncio.get_running_loop().time() + 3 * self._timeout
            found = await cluster.on_each_master(deadline, lambda node: _policy_of(node.call))
            policies = {
                f"{host}:{port}": policy
                for (host, port), policy in found.items()
                if not isinstance(policy, BaseException)
            }
            if not policies:
                raise ConnectionLost("no cluster master answers")
            return policies
        if isinstance(client, RedisCluster):
            await client.initialize()  # the slot map: which nodes are primaries (no-op once done)
            return {
                node.name: await _policy_of(
                    lambda *args, node=node: client.execute_command(*args, target_nodes=node)
                )
                for node in client.get_primaries()
            }
        return {"": await _policy_of(client.execute_command)}

    async def _check_new_connection(self, connection: PipelinedConnection) -> None:
        """Every node a new connection goes to (Cluster: by node, merged with the others)."""
        policy = await _policy_of(connection.call)
        if self._cluster is None:
            self._note_policies({"": policy})
            return
        host, port = connection.address
        self._note_policies({**self._policies, f"{host}:{port}": policy})

    def _note_policies(self, policies: dict[str, str | None]) -> str | None:
        problems = []
        for node, policy in sorted(policies.items()):
            where = f" on {node}" if node else ""
            if policy is None:
                problems.append(
                    f"cannot read the Redis maxmemory-policy{where} (CONFIG GET and INFO memory "
                    "both refused): idlegate needs noeviction and cannot verify it"
                )
            elif policy != "noeviction":
                problems.append(
                    f"the Redis maxmemory-policy{where} is {policy}: it may evict revocations and "
                    "activity records under memory pressure (revoked tokens would be accepted "
                    "again); set maxmemory-policy noeviction"
                )
        problem = "; ".join(problems) or None
        self._policies = dict(policies)
        # The first check's caller reports it (start refuses, readiness answers 503 with it);
        # a change found later, e.g. by a reconnect, is logged once.
        if self._eviction_checked and problem != self._eviction:
            if problem is not None:
                log.error("store: %s", printable(problem))  # holds what the Redis nodes said
            else:
                log.warning("store: the Redis maxmemory-policy is noeviction again")
        self._eviction, self._eviction_checked = problem, True
        return problem

    async def close(self) -> None:
        if self._pipelined is not None:
            self._pipelined.close()
        if self._cluster is not None:
            self._cluster.close()
        await self._client.aclose()
        for client in self._closing:
            await client.aclose()


async def _policy_of(call: Callable[..., Awaitable[Any]]) -> str | None:
    """maxmemory-policy through `call` (redis-py's execute_command or a pipelined call):
    CONFIG GET, or INFO memory where CONFIG is renamed or disabled (managed Redis services);
    None when neither answers it."""
    try:
        reply = await call("CONFIG", "GET", "maxmemory-policy")
    except (ResponseError, ReplyError):
        pass
    else:
        # [name, value] raw; {name: value} parsed by redis-py; a Cluster's keyed by node too.
        while isinstance(reply, dict) and len(reply) == 1:
            reply = next(iter(reply.values()))
        if isinstance(reply, list) and len(reply) == 2:
            reply = reply[1]
        if isinstance(reply, bytes | str):
            return reply.decode() if isinstance(reply, bytes) else reply
    try:
        info = await call("INFO", "memory")
    except (ResponseError, ReplyError):
        return None
    if isinstance(info, dict):  # parsed by redis-py (a Cluster's keyed by node)
        while "maxmemory_policy" not in info and len(info) == 1:
            info = next(iter(info.values()))
            if not isinstance(info, dict):
                return None
        found = info.get("maxmemory_policy")
        return None if found is None else str(found)
    text = info.decode() if isinstance(info, bytes) else str(info)
    match = re.search(r"^maxmemory_policy:(\S+)", text, re.MULTILINE)
    return match.group(1) if match else None


def _sentinel_query_timeout(timeout: float) -> float:
    """A sentinel's answer must leave room, within store.timeout, to reach the master."""
    return max(0.02, timeout / 3)


class ConcurrentSentinel(Sentinel):
    """Master discovery that no single sentinel can stall or mislead: every sentinel is asked
    at once, each bounded by `query_timeout`, and the addresses named are ranked by how many
    sentinels name them (asking stops once the leader cannot be caught up: a dead or
    black-holed sentinel costs nothing while the others agree). Every connection checks the
    address it gets with ROLE (`_MasterConnection`, `PipelinedConnection`) and tries the
    next one if it is no master, so one stale sentinel naming a dead node or a replica costs
    no call. While no sentinel answers at all, connections go to the master last verified
    (checked with ROLE again), and `discovery_problem` says so. redis-py asks the sentinels in
    URL order, each with its retries, and takes the first answer unchecked."""

    def __init__(
        self,
        sentinels: list[tuple[str, int]],
        *,
        query_timeout: float,
        sentinel_kwargs: dict[str, Any],
    ) -> None:
        super().__init__(sentinels, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call,unused-ignore]
        self._query_timeout = query_timeout
        # Named by host:port in every message (never redis-py's client reprs), in URL order,
        # as self.sentinels (redis-py keeps the order; ours never reorders it).
        self._names = [f"{host}:{port}" for host, port in sentinels]
        self._verified: dict[str, tuple[str, int]] = {}  # by service: the last ROLE master
        self._fallback: dict[str, str] = {}  # by service: why connections use it now

    def master_for(  # type: ignore[override,unused-ignore]
        self,
        service_name: str,
        redis_class: type[Redis] = Redis,
        connection_pool_class: type[SentinelConnectionPool] = SentinelConnectionPool,
        **kwargs: Any,
    ) -> Any:
        """redis-py's client to the master, its connections checked with ROLE."""
        tls = bool(kwargs.pop("ssl", False))
        kwargs["connection_class"] = _MasterSSLConnection if tls else _MasterConnection
        return super().master_for(service_name, redis_class, connection_pool_class, **kwargs)

    def verified(self, service_name: str, address: tuple[str, int]) -> None:
        """A connection found `address` to be the master (ROLE): the fallback from now on."""
        self._verified[service_name] = address

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        async with contextlib.aclosing(self.master_candidates(service_name)) as candidates:
            async for address in candidates:
                return address
        raise MasterNotFoundError(f"no master for {service_name!r}")  # not reached

    async def master_candidates(self, service_name: str) -> AsyncGenerator[tuple[str, int], None]:
        """The addresses the sentinels name as master, to be tried in turn (each checked with
        ROLE; iterate within `contextlib.aclosing`). First the one most named once the
        sentinels not heard yet cannot change that; asked for more, the others, most named
        first, once every sentinel answered or timed out. No sentinel answering at all (each
        unreachable or timing out): the master last verified, if any. Raises
        MasterNotFoundError, with one line naming the sentinels and the service, when there
        is nothing to try."""
        queries = [asyncio.ensure_future(self._ask(s, service_name)) for s in self.sentinels]
        names = dict(zip(queries, self._names, strict=True))
        counts: dict[tuple[str, int], int] = {}  # insertion order: the first answers first
        failures: dict[str, list[str]] = {}  # reason -> the sentinels that gave it
        pending = set(queries)
        answered = False

        async def hear(settled: bool) -> None:
            """Collect answers until all are in (or, with `settled`, until the sentinels not
            heard yet cannot change the most named address)."""
            nonlocal pending, answered
            while pending:
                tally = [*sorted(counts.values(), reverse=True), 0, 0]
                if settled and counts and tally[0] > tally[1] + len(pending):
                    return
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for query in done:
                    try:
                        address = query.result()
                    except _NoMaster as exc:
                        answered = True
                        failures.setdefault(str(exc), []).append(names[query])
                    except (RedisError, OSError, TimeoutError) as exc:
                        failures.setdefault(brief(exc), []).append(names[query])
                    else:
                        answered = True
                        counts[address] = counts.get(address, 0) + 1

        def ranked() -> list[tuple[str, int]]:
            return sorted(counts, key=lambda address: -counts[address])

        try:
            await hear(settled=True)
            if counts:
                self._fallback.pop(service_name, None)
                first = ranked()[0]
                yield first
                await hear(settled=False)
                for address in ranked():
                    if address != first:
                        yield address
                return
            problem = self._problem(service_name, failures, answered)
            last = self._verified.get(service_name)
            if answered or last is None:
                raise MasterNotFoundError(problem)
            self._fallback[service_name] = (
                f"{problem}: the master last verified, {last[0]}:{last[1]}, is used (checked "
                "with ROLE on every connect); a failover is not followed until a sentinel answers"
            )
            yield last
        finally:
            for query in queries:
                query.cancel()
            await asyncio.gather(*queries, return_exceptions=True)

    async def discovery_problem(self, service_name: str) -> str | None:
        """For readiness: why discovery does not work as meant now (no sentinel answers, or
        none names a usable master), as one line; None when a sentinel names one."""
        try:
            await self.discover_master(service_name)
        except MasterNotFoundError as exc:
            return str(exc)
        return self._fallback.get(service_name)

    async def _ask(self, sentinel: Redis, service_name: str) -> tuple[str, int]:
        async with asyncio.timeout(self._query_timeout):
            masters = await sentinel.sentinel_masters()
        state = masters.get(service_name) if isinstance(masters, dict) else None
        if not state:
            raise _NoMaster("knows no such master")
        if not self.check_master_state(state, service_name):
            raise _NoMaster(f"names {state.get('ip')}:{state.get('port')} down")
        return str(state["ip"]), int(state["port"])

    def _problem(self, service_name: str, failures: dict[str, list[str]], answered: bool) -> str:
        for where in failures.values():
            where.sort(key=self._names.index)  # URL order, not the order they failed in
        if list(failures) == ["knows no such master"]:
            asked = ", ".join(self._names)
            return f"no sentinel knows a master named {service_name!r} (asked {asked})"
        reasons = "; ".join(f"{', '.join(where)}: {why}" for why, where in failures.items())
        if not answered:
            return f"no sentinel answers for {service_name!r} ({reasons})"
        return f"no sentinel names a usable master {service_name!r} ({reasons})"


class _NoMaster(MasterNotFoundError):
    """A sentinel answered, but names no usable master for the service."""


def _redirected(exc: ReplyError) -> bool:
    """MOVED or ASK: a Cluster node that answers, for a slot it no longer serves alone."""
    return str(exc).startswith(("MOVED ", "ASK "))


class _MasterConnection(SentinelManagedConnection):
    """redis-py's connection to the master the sentinels name, checked with ROLE after it
    connects (Redis's Sentinel client guidelines): an address that is no master (a stale
    sentinel's answer: a dead node, a replica) is left for the next one named."""

    async def _connect_retry(self) -> None:
        pool = self.connection_pool
        manager = pool.sentinel_manager
        if self._reader or not pool.is_master or not isinstance(manager, ConcurrentSentinel):
            await super()._connect_retry()  # type: ignore[no-untyped-call,unused-ignore]
            return
        service = pool.service_name
        refused: list[str] = []
        async with contextlib.aclosing(manager.master_candidates(service)) as candidates:
            async for address in candidates:
                if await self._connect_to_master(address, refused):
                    manager.verified(service, address)
                    if pool.master_address != address:
                        pool.master_address = address
                        # As redis-py's get_master_address: idle connections elsewhere go.
                        await pool.disconnect(inuse_connections=False)
                    return
        raise MasterNotFoundError(
            f"no master at the address(es) the sentinels name for {service!r} "
            f"({'; '.join(refused)})"
        )

    async def _connect_to_master(self, address: tuple[str, int], refused: list[str]) -> bool:
        try:
            await self.connect_to(address)  # type: ignore[no-untyped-call,unused-ignore]
            await self.send_command("ROLE")
            role = role_name(await self.read_response())
        except ResponseError:  # ROLE refused (an ACL): cannot check; READONLY would tell
            role = "master"
        except (RedisError, OSError, TimeoutError) as exc:
            await self.disconnect()
            refused.append(f"{address[0]}:{address[1]}: {brief(exc)}")
            return False
        if role != "master":
            await self.disconnect()
            refused.append(f"{address[0]}:{address[1]} is a {role}, not the master")
            return False
        return True


class _MasterSSLConnection(_MasterConnection, SSLConnection):
    pass


def _connection_options(timeout: float) -> dict[str, Any]:
    return {
        "socket_connect_timeout": timeout,
        # No socket_timeout: every call is bounded by `_call`'s asyncio.timeout instead. With
        # one, redis-py sends through asyncio.wait_for, which on Python 3.11 swallows a
        # cancellation that arrives as the send completes: a cancelled background task
        # (the revocation poll at shutdown) then ran on, and the process never exited.
        "socket_timeout": None,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        # One immediate retry on a dropped connection (e.g. after a Redis restart): the scripts
        # are safe to repeat (max() semantics), and the whole call stays within `timeout`.
        "retry": Retry(NoBackoff(), 1),
    }


def _split_hosts(
    netloc: str, default_port: int
) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """`[user:password@]h1:p1,h2:p2` -> (username, password, [(host, port), ...])."""
    userinfo, _, hostlist = netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    hosts = []
    for item in hostlist.split(","):
        host, colon, port_text = item.strip().rpartition(":")
        if not colon:
            host, port_text = item.strip(), str(default_port)
        host = host.strip("[]")  # IPv6 literal
        if not host:
            raise ValueError("a host is missing (expected host:port)")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"invalid port {port_text!r}")
        hosts.append((host, int(port_text)))
    return username, password, hosts


def pipelined_for(
    client: RedisClient,
    *,
    timeout: float,
    on_connect: Callable[[PipelinedConnection], Awaitable[None]] | None = None,
) -> PipelinedConnection | None:
    """The request path's pipelined connection to the same standalone Redis as `client`, with
    the same host, port, database, credentials and TLS settings: redis-py parsed the URL once
    for both (a second parser of our own once sent activity to db 0 and revocations to db 3
    for `?db=3`). Sentinel: to the master the sentinels name, found again on each reconnect.
    None for Cluster (redis-py routes each call by slot) and unix sockets."""
    if not isinstance(client, Redis):
        return None
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        # The master the sentinels name, asked again on every reconnect (ConcurrentSentinel:
        # no one sentinel can stall it); the URL's credentials and database.
        kwargs = pool.connection_kwargs
        manager, service = pool.sentinel_manager, pool.service_name

        def master() -> AsyncGenerator[tuple[str, int], None]:
            if isinstance(manager, ConcurrentSentinel):
                return manager.master_candidates(service)
            return _one(manager.discover_master(service))

        def verified(address: tuple[str, int]) -> None:
            if isinstance(manager, ConcurrentSentinel):
                manager.verified(service, address)

        return PipelinedConnection(
            "",
            0,
            db=int(kwargs.get("db") or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            tls=_tls_context(kwargs) if issubclass(pool.connection_class, SSLConnection) else None,
            connect_timeout=timeout,
            call_timeout=timeout,
            on_connect=on_connect,
            resolve=master,
            on_master=verified,
        )
    if not isinstance(pool, BlockingConnectionPool):
        return None
    kwargs = pool.connection_kwargs
    tls: ssl.SSLContext | None = None
    if issubclass(pool.connection_class, SSLConnection):
        tls = _tls_context(kwargs, every_option=True)
    elif pool.connection_class is not Connection:
        return None  # a unix socket: redis-py alone
    return PipelinedConnection(
        kwargs.get("host", "localhost"),  # redis-py's own defaults for what a URL leaves out
        int(kwargs.get("port", 6379)),
        db=int(kwargs.get("db") or 0),
        username=kwargs.get("username"),
        password=kwargs.get("password"),
        tls=tls,
        connect_timeout=timeout,
        call_timeout=timeout,
        on_connect=on_connect,
    )


async def _one(address: Awaitable[tuple[Any, Any]]) -> AsyncGenerator[tuple[str, int], None]:
    host, port = await address
    yield str(host), int(port)


def cluster_for(client: RedisClient, *, timeout: float) -> ClusterConnections | None:
    """Cluster: the request path's pipelined connections, one per node, with the URL's
    credentials as redis-py parsed them; None for any other client."""
    if not isinstance(client, RedisCluster):
        return None
    kwargs = client.get_connection_kwargs()
    connection_class = kwargs.get("connection_class")
    tls = (
        _tls_context(kwargs)
        if isinstance(connection_class, type) and issubclass(connection_class, SSLConnection)
        else None
    )

    def connect(host: str, port: int) -> PipelinedConnection:
        return PipelinedConnection(
            host,
            port,
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            tls=tls,
            connect_timeout=timeout,
            call_timeout=timeout,
        )

    startup = [(node.host, int(node.port)) for node in client.startup_nodes]
    return ClusterConnections(startup, connect, timeout=timeout)


_TLS_OPTIONS = frozenset(("ssl_ca_certs", "ssl_cert_reqs", "ssl_check_hostname"))


def _tls_options(params: dict[str, str]) -> dict[str, Any]:
    """`rediss+sentinel://`, `rediss+cluster://`: TLS to every node, the certificates verified
    against the system's CAs or `ssl_ca_certs` (a PEM file), the options named and meant as
    redis-py's for `rediss://`. `ssl_cert_reqs=none` turns verification off (and with it the
    host name check, unless `ssl_check_hostname=true` asks for it)."""
    options: dict[str, Any] = {"ssl": True}
    if "ssl_ca_certs" in params:
        if not params["ssl_ca_certs"]:
            raise ValueError("ssl_ca_certs needs the path of a PEM file")
        options["ssl_ca_certs"] = params["ssl_ca_certs"]
    cert_reqs = params.get("ssl_cert_reqs", "required")
    if cert_reqs not in ("none", "optional", "required"):
        raise ValueError("ssl_cert_reqs must be none, optional or required")
    options["ssl_cert_reqs"] = cert_reqs
    check_hostname = params.get("ssl_check_hostname", "false" if cert_reqs == "none" else "true")
    if check_hostname.lower() not in ("true", "false"):
        raise ValueError("ssl_check_hostname must be true or false")
    options["ssl_check_hostname"] = check_hostname.lower() == "true"
    if options["ssl_check_hostname"] and cert_reqs == "none":
        raise ValueError("ssl_check_hostname=true needs the certificate verified (ssl_cert_reqs)")
    return options


# `redis://` and `rediss://`: the query options that reach both of the store's paths, redis-py's
# client and the pipelined request path (`pipelined_for`): the database and the credentials,
# and for `rediss://` every TLS option of redis-py's SSLConnection (the pipelined path builds
# its TLS context from all of them). Whatever else redis-py would take (socket_timeout,
# max_connections, protocol, client_name, ...) would reach one path only, or undo what
# `_connection_options` sets from store.timeout; anything else fails on the first connection.
_STANDALONE_OPTIONS = frozenset(("db", "username", "password"))
_SSL_CONNECTION_OPTIONS = frozenset(
    name for name in inspect.signature(SSLConnection.__init__).parameters if name.startswith("ssl_")
)


def _query_options(query: str) -> dict[str, str]:
    """`a=1&b=2` -> {"a": "1", "b": "2"}, values percent-decoded; an option given twice or
    without a value is refused (redis-py would take the first, or drop it, silently)."""
    options: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in options:
            raise ValueError(f"option {name!r} is given twice")
        if not value:
            raise ValueError(f"option {name!r} has no value")
        options[name] = value
    return options


def _check_standalone_options(scheme: str, params: dict[str, str], has_password: bool) -> None:
    """Refuse, before redis-py sees them, the `redis://`/`rediss://` options the store would not
    honour (see `_STANDALONE_OPTIONS`), and TLS values redis-py would read loosely."""
    tls = scheme == "rediss"
    for name in params:
        if name in _STANDALONE_OPTIONS or (tls and name in _SSL_CONNECTION_OPTIONS):
            continue
        if name in _SSL_CONNECTION_OPTIONS:
            raise ValueError(f"option {name!r} needs TLS: rediss://")
        if name in _connection_options(1.0) or name in ("timeout", "max_connections"):
            raise ValueError(
                f"option {name!r} is not supported: the gateway sets it (store.timeout)"
            )
        takes = "db, username, password" + (
            ", " + ", ".join(sorted(_SSL_CONNECTION_OPTIONS)) if tls else ""
        )
        raise ValueError(f"unknown option {name!r} ({scheme}:// takes {takes})")
    if has_password and "password" in params:
        raise ValueError("the URL gives two passwords (user:password@ and ?password=)")
    if tls and params.get("ssl_cert_reqs", "required") not in ("none", "optional", "required"):
        raise ValueError("ssl_cert_reqs must be none, optional or required")
    check_hostname = params.get("ssl_check_hostname", "").lower()
    if tls and check_hostname not in ("", "true", "false"):
        raise ValueError("ssl_check_hostname must be true or false")
    if tls and check_hostname == "true" and params.get("ssl_cert_reqs") == "none":
        raise ValueError("ssl_check_hostname=true needs the certificate verified (ssl_cert_reqs)")


def _tls_context(kwargs: dict[str, Any], *, every_option: bool = False) -> ssl.SSLContext:
    """The TLS context redis-py builds from a client's connection options (`rediss://`: all of
    them; else the `_TLS_OPTIONS`), for the request path's pipelined connections to the same
    nodes. A file it cannot load is a ValueError naming it, as a config problem."""
    options = kwargs if every_option else {k: v for k, v in kwargs.items() if k in _TLS_OPTIONS}
    try:
        return SSLConnection(**options).ssl_context.get()
    except (RedisError, TypeError, ValueError) as exc:  # a value redis-py or ssl refuses
        raise ValueError(f"the TLS settings cannot be used: {exc}") from None
    except (OSError, ssl.SSLError) as exc:
        files = [
            f"{name} {value!r}"
            for name, value in sorted(kwargs.items())
            if name in ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile") and value
        ]
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        named = f" ({', '.join(files)})" if files else ""
        raise ValueError(f"the TLS settings cannot be used{named}: {reason}") from None


def client_from_url(url: str, *, timeout: float) -> tuple[RedisClient, tuple[RedisClient, ...]]:
    """Build (without connecting) the client for a `redis://`, `rediss://`,
    `redis[s]+sentinel://[:password@]h:p[,h:p]/<service>[/<db>][?sentinel_password=…]` or
    `redis[s]+cluster://[:password@]h:p[,h:p]` URL (`rediss+`: TLS to every node, with the
    `ssl_*` options of `_tls_options`). Returns the client and any further clients to close
    with it. Raises ValueError with a message that never repeats the password."""
    options = _connection_options(timeout)
    scheme, _, rest = url.partition("://")
    if scheme in ("redis", "rediss"):
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            raise ValueError("invalid port") from None
        if not parts.hostname:
            raise ValueError(f"a host is missing, e.g. {scheme}://redis:6379/0")
        if port == 0:
            raise ValueError("invalid port 0")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"the path must be a database number, not {db!r}")
        query_options = _query_options(parts.query)
        _check_standalone_options(scheme, query_options, has_password=bool(parts.password))
        query_db = parse_qs(parts.query).get("db", [])
        if len(set(query_db + ([db] if db else []))) > 1:
            raise ValueError("the URL names two different databases (path and ?db=)")
        pool = BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=timeout, **options
        )
        try:  # a connection object, not a connection: its options are checked, nothing sent
            pool.make_connection()  # type: ignore[no-untyped-call,unused-ignore]
        except (RedisError, TypeError, ValueError) as exc:
            raise ValueError(f"the URL's options cannot be used: {exc}") from None
        return Redis.from_pool(pool), ()

    # The hosts end at the first `/` or `?` after the credentials (a password is taken whole).
    userinfo, at, located = rest.rpartition("@")
    located, _, query = located.partition("?")
    hosts, _, path = located.partition("/")
    netloc = userinfo + at + hosts
    params: dict[str, str] = {}
    for pair in filter(None, query.split("&")):
        name, _, value = pair.partition("=")
        if name in params:
            raise ValueError(f"option {name!r} is given twice")
        params[name] = unquote(value)
    if not netloc:
        raise ValueError(f"no host given, e.g. {scheme}://host:port")
    tls: dict[str, Any] = {}
    if scheme in ("rediss+sentinel", "rediss+cluster"):
        tls = _tls_options(params)
        scheme = scheme.replace("rediss+", "redis+")
    elif _TLS_OPTIONS & set(params):
        raise ValueError(f"ssl_* options need TLS: rediss+{scheme.removeprefix('redis+')}://")
    params = {name: value for name, value in params.items() if name not in _TLS_OPTIONS}

    if scheme == "redis+sentinel":
        username, password, sentinels = _split_hosts(netloc, default_port=26379)
        service, _, db_text = path.partition("/")
        if not service:
            raise ValueError(
                "the master's service name is missing: redis+sentinel://host:26379/<service>"
            )
        db_text = db_text.strip("/")
        if db_text and not db_text.isdigit():
            raise ValueError(f"the database must be a number, not {db_text!r}")
        unknown = set(params) - {"sentinel_password"}
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}")
        # No retries per sentinel (redis-py's default retried a dead one for seconds), and a
        # connect timeout well below store.timeout; ConcurrentSentinel bounds each query.
        query_timeout = _sentinel_query_timeout(timeout)
        sentinel_options: dict[str, Any] = {
            "socket_connect_timeout": query_timeout,
            "socket_timeout": None,  # see _connection_options; queries are bounded by asyncio
            "socket_keepalive": True,
            "retry": Retry(NoBackoff(), 0),
        }
        if "sentinel_password" in params:
            sentinel_options["password"] = params["sentinel_password"]
        sentinel_options.update(tls)  # the sentinels speak TLS like the master
        sentinel = ConcurrentSentinel(
            sentinels, query_timeout=query_timeout, sentinel_kwargs=sentinel_options
        )
        master = sentinel.master_for(
            unquote(service),
            username=username,
            password=password,
            db=int(db_text or 0),
            max_connections=MAX_CONNECTIONS,
            **options,
            **tls,
        )
        return master, tuple(sentinel.sentinels)

    if scheme == "redis+cluster":
        username, password, nodes = _split_hosts(netloc, default_port=6379)
        if path.strip("/") not in ("", "0"):
            raise ValueError("Redis Cluster has only database 0")
        if params:
            raise ValueError(f"unknown option(s) {', '.join(sorted(params))}")
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],
            username=username,
            password=password,
            max_connections=MAX_CONNECTIONS,
            **options,
            **tls,
        )
        return cluster, ()

    raise ValueError(f"unsupported scheme {scheme!r}")
