"""The request path's pipelined Redis connection: replies reach the right caller, forgotten
scripts are reloaded, credentials and database are honoured, stalls do not poison it."""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
import struct
import time

import pytest
from conftest import RedisServer

from gateway.config import Store as StoreConfig
from gateway.store import Revocation, StoreUnavailable, Touch
from gateway.store.factory import StoreConfigError, open_store
from gateway.store.pipeline import PipelinedConnection, ReplyError
from gateway.store.redis import client_from_url, pipelined_for


def touch(key: str, initial: float, now: float = 1000.0) -> Touch:
    return Touch(
        key=key,
        initial=initial,
        now=now,
        idle_timeout=900,
        extend=False,
        expires_at=now + 600,
        linger=30,
        remember_idle=False,
    )


async def test_concurrent_calls_each_get_their_own_reply(redis_server: RedisServer):
    store = open_store(StoreConfig(url=redis_server.url, timeout=2))
    try:
        results = await asyncio.gather(
            *(store.check_and_touch(touch(f"k{i}", initial=float(500 + i))) for i in range(2000))
        )
        assert [r.last_activity for r in results] == [float(500 + i) for i in range(2000)]
    finally:
        await store.close()


async def test_a_flushed_script_is_loaded_again(redis_server: RedisServer):
    store = open_store(StoreConfig(url=redis_server.url, timeout=2))
    try:
        await store.check_and_touch(touch("a", 900.0))
        redis_server.command("SCRIPT", "FLUSH")
        result = await store.check_and_touch(touch("a", 950.0))
        assert result.last_activity == 950.0
    finally:
        await store.close()


async def test_password_and_database_from_the_url(redis_server: RedisServer):
    redis_server.command("CONFIG", "SET", "requirepass", "pa:ss@word")
    url = f"redis://:pa%3Ass%40word@127.0.0.1:{redis_server.port}/3"
    store = open_store(StoreConfig(url=url, timeout=2))
    try:
        now = time.time()  # Redis decides on its own clock: this host's
        await store.check_and_touch(Touch("k", now - 10, now, 900, True, now + 600, 30, False))
        assert await store.last_activity("k") == pytest.approx(now, abs=1)
    finally:
        await store.close()
    wrong = open_store(StoreConfig(url=f"redis://:nope@127.0.0.1:{redis_server.port}/3"))
    try:
        with pytest.raises(StoreUnavailable):
            await wrong.check_and_touch(touch("k", 990.0))
    finally:
        await wrong.close()


def keys_by_db(server: RedisServer, password: str) -> dict[int, list[bytes]]:
    """Every key of every non-empty database, through one raw socket (AUTH first)."""
    found: dict[int, list[bytes]] = {}
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
        stream = sock.makefile("rwb")

        def command(*args: str) -> bytes:
            stream.write(f"*{len(args)}\r\n".encode())
            for arg in args:
                stream.write(f"${len(arg.encode())}\r\n{arg}\r\n".encode())
            stream.flush()
            line = stream.readline()
            if line.startswith(b"*"):  # an array of bulk strings (KEYS)
                items = []
                for _ in range(int(line[1:])):
                    size = int(stream.readline()[1:])
                    items.append(stream.read(size + 2)[:-2])
                return b"\n".join(items)
            return line

        command("AUTH", password)
        for db in range(16):
            command("SELECT", str(db))
            keys = command("KEYS", "*")
            if keys:
                found[db] = sorted(keys.split(b"\n"))
    return found


@pytest.mark.parametrize(
    "location",
    ["/3", "?db=3", "/?db=3", "/3?db=3"],
)
async def test_every_client_uses_the_database_of_the_url(redis_server: RedisServer, location: str):
    """Activity goes over the pipelined connection, revocations over redis-py: one parse of
    the URL for both, so both land in the URL's database, whichever way it names it."""
    redis_server.command("ACL", "SETUSER", "gw", "on", ">p@ss", "~*", "&*", "+@all")
    redis_server.command("CONFIG", "SET", "requirepass", "s3cr:t")
    url = f"redis://gw:p%40ss@127.0.0.1:{redis_server.port}{location}"
    store = open_store(StoreConfig(url=url, key_prefix="dbtest", timeout=2))
    try:
        now = time.time()
        await store.check_and_touch(Touch("k", now - 10, now, 900, True, now + 600, 30, False))
        revocation = Revocation(kind="jti", key="j", issued_before=None, until=now + 60)
        await store.revoke(revocation, now)
        assert await store.last_activity("k") == pytest.approx(now, abs=1)
    finally:
        await store.close()
    assert keys_by_db(redis_server, "s3cr:t") == {3: [b"dbtest:a:k", b"dbtest:{rev}"]}


def test_a_url_naming_two_databases_is_refused():
    with pytest.raises(StoreConfigError, match="database"):
        open_store(StoreConfig(url="redis://127.0.0.1:6390/3?db=4"))


async def test_a_late_reply_is_dropped_not_handed_to_the_next_caller(redis_server: RedisServer):
    connection = PipelinedConnection("127.0.0.1", redis_server.port)
    try:
        await connection.call("SET", "x", "first")
        redis_server.command("CLIENT", "PAUSE", "400", "ALL")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await connection.call("GET", "x")
        await asyncio.sleep(0.5)
        assert await connection.call("ECHO", "second") == b"second"
        with pytest.raises(ReplyError):
            await connection.call("NOSUCHCOMMAND")
    finally:
        connection.close()


class _FakeRedis:
    """A RESP server on a real socket: its first connection never reads (a stalled peer, with a
    tiny receive buffer so the client's writes back up) until told to reset it; later
    connections answer every command with `+OK`, each reply held until `answer` is set."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.connections: list[tuple[socket.socket, asyncio.StreamWriter]] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited on accept
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        self._server = await asyncio.start_server(self._serve, sock=listener)
        return int(listener.getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.append((writer.get_extra_info("socket"), writer))
        if len(self.connections) == 1:
            writer.transport.pause_reading()
            return
        while data := await reader.read(65536):
            await self.answer.wait()
            writer.write(b"+OK\r\n" * data.count(b"*"))  # one reply per command sent

    def reset_first(self) -> None:
        """RST the stalled connection (SO_LINGER 0, then close): the client's socket errors."""
        sock, writer = self.connections[0]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    def peer_closed(self, index: int) -> bool:
        poller = select.poll()
        poller.register(self.connections[index][0], select.POLLRDHUP | select.POLLHUP)
        return any(
            events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            for _, events in poller.poll(0)
        )

    async def stop(self) -> None:
        for _, writer in self.connections:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_a_stalled_connection_closed_by_the_watchdog_cannot_fail_its_successor():
    """The watchdog drops a connection whose peer stalled with bytes still unsent: its socket is
    released at once (not when the buffer drains, which a stalled peer never lets happen), and
    its late `connection_lost` touches only its own calls, never the successor connection's."""
    fake = _FakeRedis()
    port = await fake.start()
    connection = PipelinedConnection("127.0.0.1", port, call_timeout=0.2)
    try:
        stalled = asyncio.ensure_future(connection.call("SET", "big", b"x" * (16 << 20)))
        with pytest.raises((TimeoutError, ConnectionError)):
            await stalled
        # The watchdog's close: the peer sees the socket go, though it never read a byte.
        await asyncio.sleep(0.4)
        assert fake.peer_closed(0), "the stalled connection's socket was kept open"

        later = asyncio.get_running_loop().time() + 2
        successor = asyncio.ensure_future(connection.call("PING", deadline=later))
        while len(fake.connections) < 2:
            await asyncio.sleep(0.01)
        fake.reset_first()  # the old connection now fails, late, while the successor waits
        await asyncio.sleep(0.2)
        fake.answer.set()
        assert await successor == b"OK"
    finally:
        connection.close()
        await fake.stop()


@pytest.mark.parametrize(
    ("query", "verify_mode"), [("", ssl.CERT_REQUIRED), ("?ssl_cert_reqs=none", ssl.CERT_NONE)]
)
def test_the_pipelined_connection_takes_the_tls_settings_of_the_url(
    query: str, verify_mode: ssl.VerifyMode
):
    client, _ = client_from_url(f"rediss://redis.example:6380/2{query}", timeout=1)
    connection = pipelined_for(client, timeout=1)
    assert connection is not None
    assert connection._tls is not None
    assert connection._tls.verify_mode == verify_mode
    assert (connection._host, connection._port, connection._db) == ("redis.example", 6380, 2)


def test_the_pipelined_connection_works_under_uvloop(redis_server: RedisServer):
    """`serve` runs on uvloop, whose transports are not asyncio.Transport subclasses."""
    import uvloop

    async def calls() -> list[object]:
        connection = PipelinedConnection("127.0.0.1", redis_server.port, db=2)
        try:
            return [await connection.call("SET", "u", "1"), await connection.call("GET", "u")]
        finally:
            connection.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(calls()) == [b"OK", b"1"]
