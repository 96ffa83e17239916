"""Redis under Sentinel on loopback, as production runs it: a primary, a replica and three
sentinels (``redis-server --sentinel``), real processes that a test kills with real signals."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis

from sage_mq.local_redis import redis_executable
from tests.helpers.servers import RedisServer, free_port

SERVICE = "fleet-primary"
DOWN_AFTER_MS = 2000
"""How long the sentinels wait before they call a silent primary down (production: 5-30 s).

Not less: with 1 s, on this 2-core machine under the chaos load, a sentinel called the primary
it had just promoted down a second after the promotion and failed over again (redis/redis#8607),
to a replica that had not caught up, losing what the fleet wrote meanwhile without waiting for
a replica (there was none yet). The failover benchmark, which fails over once, uses 1 s."""
QUICK_SYNC = ["--repl-diskless-sync-delay", "0"]
"""A replica's first sync at once, not 5 s later (either server may be the primary)."""


class SentinelGroup:
    """Two servers, the first the primary and the second its replica at the start, watched by
    three sentinels (a quorum of two). Roles change with failovers: :meth:`primary_server`
    says which is the primary now."""

    def __init__(
        self, workdir: Path, extra: Sequence[str] = (), *, down_after_ms: int = DOWN_AFTER_MS
    ) -> None:
        self.workdir = workdir
        self.down_after_ms = down_after_ms
        self.extra = [*extra, *QUICK_SYNC]
        self.primary = RedisServer(free_port(), _dir(workdir / "a"), extra=list(self.extra))
        self.replica = RedisServer(free_port(), _dir(workdir / "b"), extra=self._replica_args())
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    @property
    def servers(self) -> tuple[RedisServer, RedisServer]:
        return self.primary, self.replica

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        for port in self.sentinel_ports:
            self.sentinels.append(
                start_sentinel(
                    self.workdir, port, self.primary.port, down_after_ms=self.down_after_ms
                )
            )
        self.wait_replicated()

    def primary_port(self) -> int | None:
        """The port the sentinels name as the primary now (the first that answers)."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError), _client(port) as sentinel:
                found = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                if found:
                    return int(found[1])
        return None

    def primary_server(self) -> RedisServer:
        port = self.primary_port()
        return next(s for s in self.servers if s.port == port)

    def kill_primary(self, timeout: float = 30) -> float:
        """kill -9 the primary; seconds until the sentinels name the other server in its place
        and it takes writes."""
        started = time.monotonic()
        old = self.primary_server()
        new = next(s for s in self.servers if s is not old)
        old.kill()
        _wait(lambda: self.primary_port() == new.port, "a failover", timeout)
        _wait(lambda: _role(new.port) == b"master", "the promoted replica to take writes", timeout)
        return time.monotonic() - started

    def restart(
        self, server: RedisServer, *, keep_data: bool, replica_of: RedisServer | None = None
    ) -> None:
        """kill -9 ``server`` and start it again (on its append-only file, or with nothing), as
        a primary or as the replica of ``replica_of``, as an operator's unit file would."""
        server.kill()
        if not keep_data:
            shutil.rmtree(server.workdir / "appendonlydir", ignore_errors=True)
            (server.workdir / "dump.rdb").unlink(missing_ok=True)
        server.extra = list(self.extra)
        if replica_of is not None:
            server.extra += ["--replicaof", "127.0.0.1", str(replica_of.port)]
        server.start()

    def wait_replicated(self, timeout: float = 30) -> None:
        """Until the replica has synced and every sentinel sees it and the other two."""
        _wait(self._watching, "the sentinels to see a synced replica and each other", timeout)

    def replica_has(self, stream: str, entries: int) -> bool:
        with _client(self.replica.port) as replica:
            return int(replica.xlen(stream)) == entries

    def kill(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        self.primary.kill()
        self.replica.kill()

    def _replica_args(self) -> list[str]:
        return [*self.extra, "--replicaof", "127.0.0.1", str(self.primary.port)]

    def _watching(self) -> bool:
        primary = self.primary_port()
        others = [s for s in self.servers if s.port != primary]
        for server in others:
            with _client(server.port) as replica:
                role = replica.execute_command("ROLE")
                if role[0] != b"slave" or role[3] != b"connected":  # its sync done
                    return False
        for port in self.sentinel_ports:
            with _client(port) as sentinel:
                state = sentinel.sentinel_master(SERVICE)
                if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
                    return False
        return True


def start_sentinel(
    workdir: Path,
    port: int,
    primary_port: int,
    *,
    quorum: int = 2,
    down_after_ms: int = DOWN_AFTER_MS,
) -> subprocess.Popen[bytes]:
    """A sentinel on ``port`` watching the primary on ``primary_port`` as :data:`SERVICE`."""
    conf = _dir(workdir / f"sentinel-{port}") / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {conf.parent}\nlogfile {conf.parent / 'sentinel.log'}\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} {quorum}\n"
        f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n"
        f"sentinel failover-timeout {SERVICE} 10000\n"
        f"sentinel parallel-syncs {SERVICE} 1\n"
    )
    argv = [redis_executable(), str(conf), "--sentinel"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _role(port: int) -> bytes:
    with _client(port) as server:
        return bytes(server.execute_command("ROLE")[0])


def _wait(done: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.RedisError):
            if done():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.1)


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
