"""The faults: each hits one part of a running fleet the way production does, and says what."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass

from rq import SimpleWorker

from sage_mq.connection import connect_blocking
from sage_mq.settings import Settings
from tests.chaos.harness import LIVENESS_TTL_S, NODES, WORKERS, ChaosFleet


@dataclass(frozen=True)
class Fault:
    name: str
    inject: Callable[[ChaosFleet, random.Random], str]
    """Does it; returns what it hit."""
    forgets: bool = False
    """Redis loses its data: no batch runs across it, and records of stopped engines go."""
    recovery_includes_batch: bool = False
    """Recovered only once the round's batch has finished (the fault is in the batch path)."""
    restarts: int = 0
    """Engines it may leave with a new process (the one it hit); every other keeps its own."""
    down_s: float = 1.0
    """How long what it killed stays down before it is started again (systemd's RestartSec)."""


def _running_engine(fleet: ChaosFleet, rng: random.Random) -> dict[str, object]:
    running = [r for r in fleet.records() if r["state"] == "RUNNING" and r["pid"]]
    assert running, "no RUNNING engine to hit"
    return rng.choice(sorted(running, key=lambda r: str(r["engine_id"])))


def kill_engine(fleet: ChaosFleet, rng: random.Random) -> str:
    victim = _running_engine(fleet, rng)
    os.kill(int(str(victim["pid"])), signal.SIGKILL)
    return f"{victim['engine_id']} pid {victim['pid']}"


def hang_engine(fleet: ChaosFleet, rng: random.Random) -> str:
    victim = _running_engine(fleet, rng)
    os.kill(int(str(victim["pid"])), signal.SIGSTOP)  # alive, answering nothing
    return f"{victim['engine_id']} pid {victim['pid']}"


def kill_agent(fleet: ChaosFleet, rng: random.Random) -> str:
    node = rng.choice(NODES)
    fleet.kill(node)
    return node


def kill_leader(fleet: ChaosFleet, rng: random.Random) -> str:
    leader = fleet.leader()
    fleet.kill(leader)
    return leader


def kill_gateway(fleet: ChaosFleet, rng: random.Random) -> str:
    fleet.kill("gateway")
    return "gateway"


def kill_worker(fleet: ChaosFleet, rng: random.Random) -> str:
    """The worker running a chunk of the batch, if one is (else either)."""
    with connect_blocking(Settings(redis_url=fleet.redis.url)) as conn:  # bytes, as rq wants
        found = [SimpleWorker.find_by_key(f"rq:worker:{w}", connection=conn) for w in WORKERS]
        busy = [w.name for w in found if w is not None and w.execution is not None]
    worker = rng.choice(busy or list(WORKERS))
    fleet.kill(worker)
    return worker + ("" if busy else " (idle)")


def restart_redis_with_aof(fleet: ChaosFleet, rng: random.Random) -> str:
    fleet.restart_redis(keep_data=True)
    return "kill -9, started again on its append-only file"


def restart_redis_empty(fleet: ChaosFleet, rng: random.Random) -> str:
    fleet.restart_redis(keep_data=False)
    return "kill -9 primary and replica, started again with no data"


def fail_over_redis(fleet: ChaosFleet, rng: random.Random) -> str:
    old = fleet.redis.primary_server().port
    took = fleet.fail_over()
    return f"kill -9 primary :{old}, replica promoted in {took:.1f} s"


FAULTS = (
    Fault("kill -9 engine with a child", kill_engine, restarts=1),
    Fault("SIGSTOP engine (hang)", hang_engine, restarts=1),
    Fault("kill -9 agent", kill_agent),
    Fault("agent away 3x its TTL", kill_agent, down_s=3 * LIVENESS_TTL_S),
    Fault("kill -9 leader scheduler", kill_leader),
    Fault("kill -9 gateway", kill_gateway),
    Fault("kill -9 batch worker", kill_worker, recovery_includes_batch=True),
    Fault("Redis restart, AOF", restart_redis_with_aof),
    Fault("Redis restart, empty", restart_redis_empty, forgets=True),
    Fault("Redis primary failover", fail_over_redis),
)
