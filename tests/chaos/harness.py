"""The chaos fleet: real processes a test can kill, and a supervisor that starts them again.

Redis under Sentinel (a primary and a replica, each with an append-only file, fsync always,
and three sentinels), two schedulers, two node agents (fake GPUs, ports of
their own), a gateway, two batch workers, and fake engines. Every actor is started the way
systemd would run it, and :meth:`ChaosFleet.revive` is what ``Restart=always`` does after a kill.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from sage_mq.connection import connect, connect_blocking
from sage_mq.keys import Keys
from sage_mq.settings import Settings
from sage_mq.store import Store
from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.gateway import wait_for
from tests.helpers.sentinel import SentinelGroup
from tests.helpers.servers import Processes, free_port

NODES = ("n1", "n2")
WORKERS_PER_ENGINE = 1
"""Every engine forks a worker that leaves its process group (``--child``), as vLLM's
EngineCore does: a killed engine must take it along."""
LIVENESS_TTL_S = 5.0
SCHEDULERS = ("s1", "s2")
WORKERS = ("w1", "w2")
SCHEDULER_ARGS = (
    "--health-interval", "0.5", "--probe-timeout", "0.5", "--failure-threshold", "2",
    "--lease-ttl", "3", "--backoff-base", "0.2", "--stability-window", "5",
)  # fmt: skip


@dataclass
class Actor:
    """One long-running process of the fleet, and how to start it again."""

    name: str
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    kills: int = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class ChaosFleet:
    """Every actor of a fleet as a real process, on a Redis of its own."""

    def __init__(self, processes: Processes, tmp: Path) -> None:
        self.processes = processes
        self.tmp = tmp
        aof = ["--appendonly", "yes", "--appendfsync", "always"]
        self.redis = SentinelGroup(tmp / "redis", extra=aof)
        self.procs = FleetProcs(processes, self.redis, tmp / "state")
        self.env = self.procs.env
        self.keys = Keys(self.env["SAGE_MQ_NAMESPACE"])
        self.gateway_port = free_port()
        self.url = f"http://127.0.0.1:{self.gateway_port}"
        self.actors: dict[str, Actor] = {}

    # -- starting and stopping ---------------------------------------------------------------
    def start(self) -> None:
        self.redis.start()
        for name in SCHEDULERS:
            self._actor(name, ["scheduler", "run", "--name", name, *SCHEDULER_ARGS])
        for i, node in enumerate(NODES):
            low = 24000 + 1000 * i
            args = ["node", "run", "--node-id", node, "--fake-gpus", "2x24GiB"]
            args += ["--liveness-ttl", str(LIVENESS_TTL_S), "--stop-grace", "2"]
            args += ["--port-range", f"{low}-{low + 99}"]
            self._actor(node, args, SAGE_MQ_STATE_DIR=str(self.tmp / "state" / node))
        self._actor("gateway", ["gateway", "run", "--port", str(self.gateway_port)])
        for name in WORKERS:
            self._actor(name, ["worker", "run", "--name", name, "--concurrency", "4"])
        wait_for(lambda: self.procs.json("llm", "status")["nodes"]["alive"] == 2, 60)
        wait_for(self.gateway_answers, 60)

    def _actor(self, name: str, args: list[str], **env: str) -> None:
        actor = Actor(name, ["llm", *args], self.env | env)
        self.actors[name] = actor
        self._spawn(actor)

    def _spawn(self, actor: Actor) -> None:
        actor.proc = self.processes.sage(actor.name, actor.args, actor.env)

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """``kill -9`` the actor's own process (engines it started live in their own groups)."""
        actor = self.actors[name]
        assert actor.proc is not None and actor.alive, f"{name} is not running"
        os.kill(actor.proc.pid, sig)
        actor.proc.wait(10)
        actor.kills += 1

    def revive(self) -> list[str]:
        """Start again every actor that is not running (as ``Restart=always`` would); their
        names."""
        dead = [a for a in self.actors.values() if not a.alive]
        for actor in dead:
            self._spawn(actor)
        return [a.name for a in dead]

    def died_unasked(self) -> list[str]:
        """Actors that exited although nobody killed them (counted by :meth:`kill`)."""
        return [a.name for a in self.actors.values() if not a.alive and a.kills == 0]

    def restart_redis(self, *, keep_data: bool) -> None:
        """``kill -9`` the primary and start it again on its append-only file; or (``keep_data``
        False) both servers, started again empty: every copy of the data gone."""
        primary = self.redis.primary_server()
        if keep_data:
            self.redis.restart(primary, keep_data=True)
        else:
            replica = next(s for s in self.redis.servers if s is not primary)
            replica.kill()  # first: nothing to fail over to, nothing kept
            self.redis.restart(primary, keep_data=False)
            self.redis.restart(replica, keep_data=False, replica_of=primary)
        self.redis.wait_replicated()

    def fail_over(self) -> float:
        """``kill -9`` the primary; once the sentinels have promoted the replica, the old
        primary is started again (on its file) and becomes the new one's replica. Seconds to
        the promotion."""
        old = self.redis.primary_server()
        took = self.redis.kill_primary()
        self.redis.restart(old, keep_data=True, replica_of=self.redis.primary_server())
        self.redis.wait_replicated()
        return took

    # -- reading the fleet -------------------------------------------------------------------
    def client(self) -> redis.Redis:
        """A client of the primary (found through the sentinels)."""
        settings = Settings(redis_url=self.redis.url)
        return connect_blocking(settings, decode_responses=True, socket_timeout=5)

    def leader(self) -> str:
        with self.client() as client:
            holder = client.get(self.keys.scheduler_leader)
        assert holder, "no leader"
        return str(holder).split(":")[0]

    def records(self) -> list[dict[str, Any]]:
        """Every engine record as ``engine list --json`` shows it (read with the store, not
        the CLI: polled often, and a CLI process each time would load the 2-core box)."""

        async def read() -> list[dict[str, Any]]:
            client = connect(Settings(redis_url=self.redis.url))
            try:
                return [r.public() for r in await Store(client, self.keys).list_engines()]
            finally:
                await client.aclose()

        return asyncio.run(read())

    def gateway_answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False
