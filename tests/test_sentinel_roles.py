"""A sentinel that has not yet heard of a failover names the old primary, which may be back as
the new one's replica and serve its old data to reads: clients check ``ROLE`` on each new
connection, refuse a replica and ask the next sentinel (real servers, real sentinels)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from sage_mq.connection import connect, connect_blocking
from sage_mq.sentinel_clients import (
    BlockingPrimarySSLConnection,
    PrimarySSLConnection,
    role_problem,
)
from sage_mq.settings import Settings
from tests.helpers.sentinel import SERVICE, start_sentinel
from tests.helpers.servers import RedisServer, free_port

LONG_DOWN_AFTER_MS = 60_000
"""A sentinel calls a primary that reports itself a replica down only after its down-after time
and 20 s more: until then it names it, as a sentinel behind the others does in a failover."""


@dataclass
class Servers:
    new: RedisServer  # the primary
    old: RedisServer  # its replica, once a primary
    procs: list[subprocess.Popen[bytes]]

    def url(self, *ports: int) -> str:
        return f"redis+sentinel://{','.join(f'127.0.0.1:{p}' for p in ports)}/{SERVICE}"

    def sentinel(self, tmp_path: Path, watching: RedisServer) -> int:
        port = free_port()
        proc = start_sentinel(
            tmp_path, port, watching.port, quorum=1, down_after_ms=LONG_DOWN_AFTER_MS
        )
        self.procs.append(proc)
        _until_named(port, watching.port)
        return port


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    new = RedisServer(free_port(), _dir(tmp_path / "new"))
    old = RedisServer(free_port(), _dir(tmp_path / "old"))
    new.start()
    old.start()
    made = Servers(new, old, [])
    try:
        yield made
    finally:
        for proc in made.procs:
            proc.kill()
            proc.wait(5)
        new.kill()
        old.kill()


def test_a_replica_is_named_as_such_and_a_primary_passes() -> None:
    where = ("10.0.0.5", 6379)
    assert role_problem(["master", 10, []], where, "main") is None
    assert role_problem([b"master", 10, []], where, "main") is None
    problem = role_problem(["slave", "10.0.0.6", 6379, "connected", 10], where, "main")
    assert problem is not None and "10.0.0.5:6379" in problem and "replica" in problem


async def test_tls_under_sentinel_uses_the_checking_connections_with_tls() -> None:
    url = "rediss+sentinel://127.0.0.1:1/main?ssl_ca_certs=/etc/ssl/certs/ca-certificates.crt"
    client = connect(Settings(redis_url=url))
    try:
        made = client.connection_pool.make_connection()
        assert isinstance(made, PrimarySSLConnection)
        assert made.ssl_context.ca_certs == "/etc/ssl/certs/ca-certificates.crt"
    finally:
        await client.aclose()
    blocking = connect_blocking(Settings(redis_url=url))
    with blocking:
        made_blocking = blocking.connection_pool.make_connection()
        assert isinstance(made_blocking, BlockingPrimarySSLConnection)
        assert made_blocking.ca_certs == "/etc/ssl/certs/ca-certificates.crt"


async def test_a_connection_refuses_a_replica_that_a_lagging_sentinel_names(
    servers: Servers, tmp_path: Path
) -> None:
    behind = servers.sentinel(tmp_path, watching=servers.old)
    _demote(servers.old, to=servers.new)
    assert _named(behind) == servers.old.port  # the sentinel still names the replica
    client = connect(Settings(redis_url=servers.url(behind)))
    try:
        with pytest.raises(RedisConnectionError, match="is a replica"):
            await client.get("engine")
    finally:
        await client.aclose()
    blocking = connect_blocking(Settings(redis_url=servers.url(behind)), socket_timeout=5)
    with blocking, pytest.raises(RedisConnectionError, match="is a replica"):
        blocking.get("engine")


async def test_a_connection_asks_the_next_sentinel_and_reads_the_primary_s_data(
    servers: Servers, tmp_path: Path
) -> None:
    behind = servers.sentinel(tmp_path, watching=servers.old)
    _demote(servers.old, to=servers.new)
    current = servers.sentinel(tmp_path, watching=servers.new)
    with redis.Redis(port=servers.new.port) as new:
        new.set("engine", "STOPPING")
    client = connect(Settings(redis_url=servers.url(behind, current)))
    try:
        assert await client.get("engine") == "STOPPING"
        assert await client.set("engine", "STOPPED")
    finally:
        await client.aclose()
    blocking = connect_blocking(Settings(redis_url=servers.url(behind, current)), socket_timeout=5)
    with blocking:
        assert blocking.get("engine") == b"STOPPED"


def _demote(server: RedisServer, to: RedisServer) -> None:
    """Make ``server`` the replica of ``to`` behind the sentinels' backs, as a failover leaves
    the old primary once it is back."""
    with redis.Redis(port=server.port) as client:
        client.execute_command("REPLICAOF", "127.0.0.1", str(to.port))


def _named(sentinel_port: int) -> int | None:
    with redis.Redis(port=sentinel_port, socket_timeout=2) as sentinel:
        found = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(found[1]) if found else None


def _until_named(sentinel_port: int, primary_port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _named(sentinel_port) == primary_port:
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"the sentinel on :{sentinel_port} never named :{primary_port}")


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
