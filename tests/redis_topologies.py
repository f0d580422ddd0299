"""Redis Sentinel and Redis Cluster of the tests' own, on free loopback ports, the way
conftest's RedisServer is one redis-server: a master, a replica and three sentinels; three
masters and three replicas joined by `redis-cli --cluster create`. No persistence anywhere.

Sentinels run as `redis-server <conf> --sentinel` (the same binary the redis-sentinel package
links to); the cluster needs `redis-cli` (redis-tools), which scripts/test installs."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hiredis
import pytest
from conftest import RedisServer, free_port

SERVICE = "mymaster"


def _wait(condition: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _answers(server: RedisServer, *args: str) -> bytes:
    try:
        return server.command(*args)
    except OSError:
        return b""


@dataclass
class SentinelServer(RedisServer):
    """One sentinel watching `master_port` under SERVICE (quorum 2, down after 1 s)."""

    master_port: int = 0

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (scripts/test installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / f"sentinel-{self.port}.conf"
        if not conf.exists():  # a restart keeps what the sentinel learnt (it rewrites it)
            conf.write_text(
                f"port {self.port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.workdir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
        self.process = subprocess.Popen(
            [binary, str(conf), "--sentinel", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(lambda: _answers(self, "PING").startswith(b"+PONG"), "a sentinel to start")


@dataclass
class SentinelSet:
    master: RedisServer
    replica: RedisServer
    sentinels: list[SentinelServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def master_port(self) -> int:
        """The master as a live sentinel names it now."""
        for sentinel in self.sentinels:
            if sentinel.process is None:
                continue
            reply = _answers(sentinel, "SENTINEL", "get-master-addr-by-name", SERVICE)
            parts = reply.split(b"\r\n")
            if len(parts) >= 5:
                return int(parts[4])
        raise RuntimeError("no live sentinel names a master")

    def node(self, port: int) -> RedisServer:
        return self.master if self.master.port == port else self.replica

    def kill_master(self) -> RedisServer:
        """SIGKILL the current master; returns the server that was killed."""
        victim = self.node(self.master_port())
        assert victim.process is not None
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(timeout=10)
        victim.process = None
        return victim

    def wait_failover(self, old_port: int, timeout: float = 20.0) -> None:
        _wait(lambda: self.master_port() != old_port, "the sentinels to fail over", timeout)

    def stop(self) -> None:
        for server in (*self.sentinels, self.replica, self.master):
            server.stop()


def _start_sentinel_set(workdir: Path) -> SentinelSet:
    master = RedisServer(port=free_port(), workdir=workdir / "master")
    master.workdir.mkdir(parents=True)
    master.start()
    master.command("CONFIG", "SET", "repl-diskless-sync-delay", "0")
    replica = RedisServer(
        port=free_port(),
        workdir=workdir / "replica",
        extra_args=("--replicaof", "127.0.0.1", str(master.port)),
    )
    replica.workdir.mkdir(parents=True)
    replica.start()
    replica.command("CONFIG", "SET", "repl-diskless-sync-delay", "0")  # for after a failover
    topology = SentinelSet(master=master, replica=replica)
    try:
        _wait(
            lambda: b"master_link_status:up" in _answers(replica, "INFO", "replication"),
            "the replica to sync",
        )
        for i in range(3):
            sentinel = SentinelServer(
                port=free_port(), workdir=workdir / f"sentinel-{i}", master_port=master.port
            )
            sentinel.start()
            topology.sentinels.append(sentinel)

        def all_know_each_other() -> bool:
            for sentinel in topology.sentinels:
                reply = _answers(sentinel, "SENTINEL", "master", SERVICE)
                fields = reply.split(b"\r\n")[2::2]
                info = dict(zip(fields[0::2], fields[1::2], strict=False))
                if info.get(b"num-other-sentinels") != b"2" or info.get(b"num-slaves") != b"1":
                    return False
            return True

        _wait(all_know_each_other, "the sentinels to find each other and the replica")
    except BaseException:
        topology.stop()
        raise
    return topology


@pytest.fixture
def redis_sentinel(tmp_path: Path) -> Iterator[SentinelSet]:
    """A master, its replica and three sentinels, new for each test (failovers change it)."""
    topology = _start_sentinel_set(tmp_path / "sentinel")
    yield topology
    topology.stop()


@pytest.fixture(scope="session")
def shared_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    topology = _start_sentinel_set(tmp_path_factory.mktemp("sentinel"))
    yield topology
    topology.stop()


@pytest.fixture
def stable_sentinel(shared_sentinel: SentinelSet) -> SentinelSet:
    """A Sentinel set shared by the tests that break nothing in it (flushed before each)."""
    shared_sentinel.master.command("FLUSHALL")
    return shared_sentinel


@dataclass
class ClusterSet:
    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])
        return f"redis+cluster://{hosts}"

    def command(self, *args: str) -> bytes:
        """A command on the node that owns its key (args[1]): each live node is asked until
        one answers other than -MOVED (enough for tests: no ASK during a test)."""
        reply = b""
        for node in self.nodes:
            if node.process is None:
                continue
            reply = _answers(node, *args)
            if not reply.startswith(b"-MOVED"):
                return reply
        return reply

    def masters(self) -> list[RedisServer]:
        return [n for n in self.nodes if b"role:master" in _answers(n, "INFO", "replication")]

    def flush(self) -> None:
        for node in self.masters():
            node.command("FLUSHALL")

    def live(self) -> RedisServer:
        return next(n for n in self.nodes if n.process is not None)

    def cluster_nodes(self) -> list[list[str]]:
        """CLUSTER NODES of a live node, split: `<id> <ip:port@bus> <flags> <master> <ping>
        <pong> <epoch> <link> <slot ranges...>` per node."""
        text = self.live().command("CLUSTER", "NODES").decode()
        return [line.split() for line in text.splitlines() if len(line.split()) >= 8]

    def owner_of(self, slot: int) -> RedisServer:
        """The master serving `slot` now, as a live node says."""
        for fields in self.cluster_nodes():
            if "master" not in fields[2]:
                continue
            for item in fields[8:]:
                start, _, end = item.partition("-")
                if start.isdigit() and int(start) <= slot <= int(end or start):
                    port = int(fields[1].split("@")[0].rpartition(":")[2])
                    return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no master serves slot {slot}")

    def node_id(self, node: RedisServer) -> str:
        return node.command("CLUSTER", "MYID").decode().split("\r\n")[1]

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        master_id = self.node_id(master)
        ports = []
        for fields in self.cluster_nodes():
            if fields[3] == master_id:
                ports.append(int(fields[1].split("@")[0].rpartition(":")[2]))
        return [n for n in self.nodes if n.port in ports]

    def lose_shard(self, master: RedisServer) -> None:
        """SIGKILL `master` and its replicas (the replicas first: no failover can save the
        shard), and wait until the other nodes call it failed."""
        victims = [*self.replicas_of(master), master]
        for node in victims:
            assert node.process is not None
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(timeout=10)
            node.process = None
        where = f":{master.port}@"
        _wait(
            lambda: any(
                where in fields[1] and "fail" in fields[2].split(",")
                for fields in self.cluster_nodes()
            ),
            "the others to mark the lost master failed",
        )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _distinct_free_ports(count: int) -> list[int]:
    """`count` different free ports, all held until every one is chosen: free_port() called
    in turn may give the same port twice (nothing holds it until its server starts), e.g. a
    node's port equal to another node's bus port, and that node never starts."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
    return ports


def _start_cluster(workdir: Path, *, full_coverage: bool = True) -> ClusterSet:
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.fail("redis-cli is not installed (scripts/test installs redis-tools)")
    nodes = []
    ports = _distinct_free_ports(12)
    for i in range(6):
        port, bus = ports[2 * i], ports[2 * i + 1]
        node = RedisServer(
            port=port,
            workdir=workdir / f"node-{i}",
            extra_args=(
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "1000",
                "--cluster-port", str(bus),
                "--repl-diskless-sync-delay", "0",
                "--cluster-require-full-coverage", "yes" if full_coverage else "no",
            ),
        )  # fmt: skip
        node.workdir.mkdir(parents=True)
        nodes.append(node)
    topology = ClusterSet(nodes)
    try:
        for node in nodes:
            node.start()
        created = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed:\n{created.stdout}{created.stderr}"
            )
        _wait(
            lambda: all(
                b"cluster_state:ok" in _answers(n, "CLUSTER", "INFO") for n in topology.nodes
            ),
            "the cluster to be ok",
        )
        _wait(lambda: len(topology.masters()) == 3, "three masters")
    except BaseException:
        topology.stop()
        raise
    return topology


@pytest.fixture(scope="session")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSet]:
    topology = _start_cluster(tmp_path_factory.mktemp("cluster"))
    yield topology
    topology.stop()


@pytest.fixture
def redis_cluster(shared_cluster: ClusterSet) -> ClusterSet:
    """Three masters and three replicas, shared by the tests that do not break it (flushed
    before each); see `own_cluster` for failovers."""
    shared_cluster.flush()
    return shared_cluster


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[ClusterSet]:
    topology = _start_cluster(tmp_path / "cluster")
    yield topology
    topology.stop()


@pytest.fixture
def partial_cluster(tmp_path: Path) -> Iterator[ClusterSet]:
    """A cluster of its own with `cluster-require-full-coverage no`: a lost shard leaves the
    others serving their slots (the setting for partial availability)."""
    topology = _start_cluster(tmp_path / "cluster", full_coverage=False)
    yield topology
    topology.stop()


class FakeSentinel:
    """A sentinel of the test's own, in process: a RESP server that answers `SENTINEL
    MASTERS` (and get-master-addr-by-name) for SERVICE with whatever address it is given,
    as a stale sentinel would (a dead node, a replica), PING with PONG, and anything else
    with +OK. `stop` closes it and every connection to it (a sentinel gone)."""

    def __init__(self, host: str, port: int) -> None:
        self.master = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @staticmethod
    def _bulk(text: str) -> bytes:
        data = text.encode()
        return b"$%d\r\n%s\r\n" % (len(data), data)

    def _reply(self, command: list[bytes]) -> bytes:
        words = [part.decode(errors="replace").upper() for part in command[:2]]
        host, port = self.master
        if words[:2] == ["SENTINEL", "MASTERS"]:
            fields = [
                "name", SERVICE, "ip", host, "port", str(port), "flags", "master",
                "num-other-sentinels", "2", "quorum", "2", "num-slaves", "1",
            ]  # fmt: skip
            entry = b"*%d\r\n" % len(fields) + b"".join(map(self._bulk, fields))
            return b"*1\r\n" + entry
        if words[:2] == ["SENTINEL", "GET-MASTER-ADDR-BY-NAME"]:
            return b"*2\r\n" + self._bulk(host) + self._bulk(str(port))
        if words[:1] == ["SENTINEL"]:
            return b"*0\r\n"
        if words[:1] == ["PING"]:
            return b"+PONG\r\n"
        if words[:1] == ["HELLO"]:  # RESP2 only: redis-py falls back to it
            return b"-ERR unknown command 'HELLO'\r\n"
        return b"+OK\r\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        self._writers.add(writer)
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    writer.write(self._reply(command))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None


def kill_clients(server: RedisServer) -> int:
    """CLIENT KILL of every normal client of `server` but the sentinels' (the gateways' own
    connections: each reconnects, asking the sentinels again); how many were killed."""
    listing = server.command("CLIENT", "LIST").decode(errors="replace")
    killed = 0
    for line in listing.splitlines():
        fields = dict(item.partition("=")[::2] for item in line.split())
        if "id" not in fields or fields.get("name", "").startswith("sentinel-"):
            continue
        if fields.get("flags", "").strip("N") or "cmd=client|list" in line:
            continue  # a replica, a pub/sub or monitor link, or this very connection
        if server.command("CLIENT", "KILL", "ID", fields["id"]).startswith(b":1"):
            killed += 1
    return killed
