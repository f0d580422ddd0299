"""Sentinel and Cluster over TLS (`rediss+sentinel://`, `rediss+cluster://`), real: every
node, sentinel and cluster bus speaks TLS with certificates of the test's own CA. Each node
also keeps a plain port, for the test's own look at it; the gateway is given only TLS ports.
Two gateways share activity and revocations on the pipelined fast path, and a certificate
the gateway was not told to trust is a store fault (503 store_unavailable), never a pass."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import GatewayFactory, RedisServer, free_port
from redis_topologies import SERVICE, SentinelServer, _answers, _distinct_free_ports, _wait
from test_store_topologies import ready, revoke
from tls import CertificateAuthority

from gateway.store.redis import RedisStore


@dataclass
class TlsServer(RedisServer):
    """A redis-server with a TLS port beside its plain one (the plain one for the test)."""

    tls_port: int = 0


@dataclass
class TlsSet:
    ca: CertificateAuthority
    servers: list[RedisServer] = field(default_factory=list)
    url: str = ""

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _tls_args(ca: CertificateAuthority, tls_port: int) -> tuple[str, ...]:
    # Nodes present it as clients too: on the cluster bus, to a master they replicate.
    cert, key = ca.server_files("127.0.0.1", client_too=True)
    return (
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(cert),
        "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(ca.ca_file),
        "--tls-auth-clients", "no",
    )  # fmt: skip


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[TlsSet]:
    """Three masters, TLS to clients and on the cluster bus, created over TLS."""
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.fail("redis-cli is not installed (scripts/test installs redis-tools)")
    topology = TlsSet(CertificateAuthority(tmp_path / "ca"))
    ports = _distinct_free_ports(9)
    try:
        for i in range(3):
            port, tls_port, bus = ports[3 * i : 3 * i + 3]
            node = TlsServer(
                port=port,
                workdir=tmp_path / f"node-{i}",
                tls_port=tls_port,
                extra_args=(
                    *_tls_args(topology.ca, tls_port),
                    "--tls-cluster", "yes",
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-node-timeout", "1000",
                    "--cluster-port", str(bus),
                ),
            )  # fmt: skip
            node.workdir.mkdir(parents=True)
            node.start()
            topology.servers.append(node)
        tls_ports = [n.tls_port for n in topology.servers]  # type: ignore[attr-defined]
        created = subprocess.run(
            [cli, "--tls", "--cacert", str(topology.ca.ca_file), "--cluster", "create",
             *(f"127.0.0.1:{p}" for p in tls_ports), "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if created.returncode != 0:
            raise RuntimeError(f"cluster create failed:\n{created.stdout}{created.stderr}")
        _wait(
            lambda: all(
                b"cluster_state:ok" in _answers(n, "CLUSTER", "INFO") for n in topology.servers
            ),
            "the TLS cluster to be ok",
        )
        hosts = ",".join(f"127.0.0.1:{p}" for p in tls_ports[:2])
        topology.url = f"rediss+cluster://{hosts}?ssl_ca_certs={topology.ca.ca_file}"
    except BaseException:
        topology.stop()
        raise
    yield topology
    topology.stop()


@pytest.fixture
def tls_sentinel(tmp_path: Path) -> Iterator[TlsSet]:
    """A master and one sentinel (quorum 1) that watches it over TLS and answers only on TLS."""
    topology = TlsSet(CertificateAuthority(tmp_path / "ca"))
    try:
        master_tls = free_port()
        master = TlsServer(
            port=free_port(),
            workdir=tmp_path / "master",
            tls_port=master_tls,
            extra_args=(*_tls_args(topology.ca, master_tls), "--tls-replication", "yes"),
        )
        master.workdir.mkdir(parents=True)
        master.start()
        topology.servers.append(master)
        sentinel_tls = free_port()
        # The plain port only for the test's own look (SentinelServer.start pings it).
        sentinel = SentinelServer(
            port=free_port(), workdir=tmp_path / "sentinel", master_port=master_tls
        )
        sentinel.workdir.mkdir(parents=True)
        cert, key = topology.ca.server_files("127.0.0.1", client_too=True)
        (sentinel.workdir / f"sentinel-{sentinel.port}.conf").write_text(
            f"port {sentinel.port}\n"
            "bind 127.0.0.1\n"
            f"dir {sentinel.workdir}\n"
            f"tls-port {sentinel_tls}\n"
            f"tls-cert-file {cert}\n"
            f"tls-key-file {key}\n"
            f"tls-ca-cert-file {topology.ca.ca_file}\n"
            "tls-auth-clients no\n"
            "tls-replication yes\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {master_tls} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
        )
        sentinel.start()
        topology.servers.append(sentinel)

        def watching() -> bool:
            reply = _answers(sentinel, "SENTINEL", "master", SERVICE)
            return b"\r\nflags\r\n$6\r\nmaster\r\n" in reply

        _wait(watching, "the sentinel to see the master over TLS")
        topology.url = (
            f"rediss+sentinel://127.0.0.1:{sentinel_tls}/{SERVICE}/0"
            f"?ssl_ca_certs={topology.ca.ca_file}"
        )
    except BaseException:
        topology.stop()
        raise
    yield topology
    topology.stop()


@pytest.fixture
def admin_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin.token"
    path.write_text("adm1n\n")
    return path


@pytest.mark.parametrize("topology", ["tls_sentinel", "tls_cluster"])
async def test_two_gateways_share_activity_and_revocations_over_tls(
    gateways: GatewayFactory, request: pytest.FixtureRequest, admin_file: Path, topology: str
) -> None:
    store: TlsSet = request.getfixturevalue(topology)
    admin = {"token_file": str(admin_file)}
    policy = {"max_token_lifetime": "1h"}
    one = await gateways(store_url=store.url, admin=admin, policy=policy)
    two = await gateways(store_url=store.url, admin=admin, policy=policy)
    assert await ready(one) == 200
    token = one.token(ttl=3600, jti="j-tls")
    one.clock.advance(800)  # type: ignore[attr-defined]
    assert (await one.get("/api/x", token)).status == 200
    one.clock.advance(800)  # type: ignore[attr-defined]  # idle at `two` had it not seen it
    assert (await two.get("/api/x", token)).status == 200
    # The request path's own connections (not only redis-py's) went over TLS.
    gateway_store = one.gateway.store
    assert isinstance(gateway_store, RedisStore)
    if topology == "tls_sentinel":
        assert gateway_store._pipelined is not None and gateway_store._pipelined._tls is not None
        master = store.servers[0]
        assert gateway_store._pipelined.address == ("127.0.0.1", master.tls_port)  # type: ignore[attr-defined]
    else:
        assert gateway_store._cluster is not None
        ports = {n.tls_port for n in store.servers}  # type: ignore[attr-defined]
        opened = gateway_store._cluster._connections  # address -> PipelinedConnection
        assert opened and {port for _, port in opened} <= ports
        assert all(connection._tls is not None for connection in opened.values())
    assert await revoke(one, jti="j-tls") == 204
    await _settle()
    assert [(await gw.get("/api/x", token)).status for gw in (one, two)] == [401, 401]


@pytest.mark.parametrize("topology", ["tls_sentinel", "tls_cluster"])
async def test_a_certificate_not_trusted_is_store_unavailable(
    gateways: GatewayFactory, request: pytest.FixtureRequest, topology: str
) -> None:
    """Without `ssl_ca_certs` the test CA is not trusted: nothing is decided on that store."""
    store: TlsSet = request.getfixturevalue(topology)
    untrusted = store.url.partition("?")[0]
    gw = await gateways(store_url=untrusted)
    response = await gw.get("/api/x", gw.token())
    assert response.status == 503
    assert (await response.json())["reason"] == "store_unavailable"
    assert await ready(gw) == 503


async def _settle() -> None:
    import asyncio

    await asyncio.sleep(0.3)  # the revocation poll (250 ms) at the other instance


async def test_the_master_a_sentinel_names_must_hold_a_certificate_for_that_address(
    tmp_path: Path,
) -> None:
    """The pipelined connection checks the certificate against the address the sentinels gave
    (it once checked no name at all after a resolve: any certificate of the CA passed)."""
    import ssl

    from gateway.store.pipeline import PipelinedConnection

    ca = CertificateAuthority(tmp_path / "ca")
    tls_port = free_port()
    cert, key = ca.server_files("redis.other.example")
    server = RedisServer(
        port=free_port(),
        workdir=tmp_path,
        extra_args=(
            "--tls-port", str(tls_port), "--tls-cert-file", str(cert),
            "--tls-key-file", str(key), "--tls-auth-clients", "no",
        ),
    )  # fmt: skip
    server.start()

    async def sentinels_say() -> tuple[str, int]:
        return "127.0.0.1", tls_port

    try:
        for check_hostname in (True, False):
            context = ssl.create_default_context(cafile=str(ca.ca_file))
            context.check_hostname = check_hostname
            connection = PipelinedConnection("", 0, tls=context, resolve=sentinels_say)
            try:
                if check_hostname:
                    with pytest.raises(ssl.SSLCertVerificationError, match=r"127\.0\.0\.1"):
                        await connection.call("PING")
                else:
                    assert await connection.call("PING") == b"PONG"
            finally:
                connection.close()
    finally:
        server.stop()
