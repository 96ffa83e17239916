"""Choosing a replica of a model for one request: pure policy, shared by the gateway and client.

A :class:`Router` keeps, per engine at its address, the requests in flight and a moving average
of latency (in memory, no I/O), and picks among the RUNNING replicas it is given. An engine
moved to another host (a new URL) is a new process on a new machine: it is measured afresh.

- ``adaptive`` (default): power of two choices. Two replicas at random; the one whose
  ``(in flight + 1) * average latency`` is lower wins. Nearly as good as asking every replica,
  without herding every request onto the one that looked best a moment ago.
- ``least_loaded``: fewest requests in flight (then lower latency, then id).
- ``round_robin``: each replica in turn, per model.
- ``random``: uniformly.

A replica that failed before the first byte is passed in ``exclude`` for the retry.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from sage_mq.store import EngineRecord, EngineState

Policy = Literal["adaptive", "round_robin", "least_loaded", "random"]
POLICIES: tuple[str, ...] = get_args(Policy)
_EWMA_WEIGHT = 0.2
"""How much the newest latency counts in the moving average."""
_UNMEASURED_S = 0.0
"""The latency assumed for a replica not yet measured: the best, so that it gets tried."""


@dataclass(frozen=True)
class Replica:
    """One RUNNING engine that serves a model."""

    engine_id: str
    model: str
    url: str
    kind: str = "llm"


@dataclass
class _Load:
    in_flight: int = 0
    latency_s: float | None = None


def running_replica(record: EngineRecord) -> Replica | None:
    """The replica an engine record stands for, if the engine is RUNNING at a known URL."""
    if record.state == EngineState.RUNNING and record.url:
        return Replica(record.engine_id, record.served_name, record.url, record.kind)
    return None


class NoReplica(LookupError):
    """No replica is left to try (none RUNNING, or all excluded)."""


class Router:
    """Picks replicas by a policy and learns their load and latency from the outcomes."""

    def __init__(self, policy: str = "adaptive", *, rng: random.Random | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy {policy!r} is not one of {', '.join(POLICIES)}")
        self.policy = policy
        self.rng = rng or random.Random()
        self._load: dict[tuple[str, str], _Load] = {}
        self._turn: dict[str, int] = {}

    def choose(self, replicas: Sequence[Replica], exclude: Collection[str] = ()) -> Replica:
        """The replica for the next request; :class:`NoReplica` if none is left."""
        candidates = sorted(
            (r for r in replicas if r.engine_id not in exclude), key=lambda r: r.engine_id
        )
        if not candidates:
            raise NoReplica("no replica left to try")
        if len(candidates) == 1:
            return candidates[0]
        if self.policy == "random":
            return self.rng.choice(candidates)
        if self.policy == "round_robin":
            model = candidates[0].model
            turn = self._turn.get(model, 0)
            self._turn[model] = turn + 1
            return candidates[turn % len(candidates)]
        if self.policy == "least_loaded":
            return min(candidates, key=lambda r: (self._in_flight(r), self._latency(r)))
        first, second = self.rng.sample(candidates, 2)
        return first if self._cost(first) <= self._cost(second) else second

    def started(self, replica: Replica) -> None:
        """A request went to ``replica``."""
        self._load.setdefault(_key(replica), _Load()).in_flight += 1

    def finished(self, replica: Replica, latency_s: float | None) -> None:
        """The request ended; ``latency_s`` None if it failed (not counted in the average)."""
        load = self._load.setdefault(_key(replica), _Load())
        load.in_flight = max(0, load.in_flight - 1)
        if latency_s is not None:
            old = load.latency_s
            new = latency_s if old is None else old + _EWMA_WEIGHT * (latency_s - old)
            load.latency_s = new

    def forget(self, engine_id: str) -> None:
        """An engine left rotation (stopped, failed): drop what was learned about it."""
        for key in [k for k in self._load if k[0] == engine_id]:
            del self._load[key]

    def in_flight(self, engine_id: str) -> int:
        """Requests in flight to an engine through this router."""
        return sum(load.in_flight for key, load in self._load.items() if key[0] == engine_id)

    def _in_flight(self, replica: Replica) -> int:
        load = self._load.get(_key(replica))
        return load.in_flight if load else 0

    def _latency(self, replica: Replica) -> float:
        load = self._load.get(_key(replica))
        return _UNMEASURED_S if load is None or load.latency_s is None else load.latency_s

    def _cost(self, replica: Replica) -> float:
        return (self._in_flight(replica) + 1) * self._latency(replica)


def _key(replica: Replica) -> tuple[str, str]:
    return replica.engine_id, replica.url
