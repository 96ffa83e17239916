"""Pure autoscaling policy for deployments (docs/contract.md): how many replicas a deployment wants
now, from its load, its replicas and the time. No I/O; tested with tables of cases.

Up at once, toward ``ceil(load / target_in_flight)`` within the bounds, counting the replicas
still starting (they are capacity on its way: a burst during a cold start asks for one replica,
not one per request). Down only once the load has stayed below what the replicas serve for
``scale_down_after_s``, one replica at a time: the next step waits until the replica being
drained is gone. Batch work asks for replicas too, after interactive load (it yields).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sage_mq.deployments import Autoscale


@dataclass(frozen=True)
class Load:
    """A model's load, summed over every gateway and batch queue that reports it."""

    in_flight: int = 0
    waiting: int = 0
    """Requests held for a replica (scale to zero) or queued at a gateway."""
    batch_queued: int = 0


@dataclass(frozen=True)
class Replicas:
    """A deployment's engines by what they can do now."""

    running: int = 0
    starting: int = 0
    """Asked for and not serving yet (PENDING, STARTING): capacity on its way."""
    draining: int = 0
    """Leaving: out of the gateways' rotation, finishing what they serve."""

    @property
    def counted(self) -> int:
        return self.running + self.starting


@dataclass(frozen=True)
class Decision:
    """How many replicas (running and starting, not draining) the deployment wants, why, and
    since when its load has been low (the clock of the next scale down; None: not low)."""

    desired: int
    reason: str
    low_since: float | None = None


def decide(
    policy: Autoscale, load: Load, replicas: Replicas, now: float, low_since: float | None
) -> Decision:
    """The replicas wanted now; ``low_since`` is what the previous decision returned."""
    wanted = needed(policy, load)
    have = replicas.counted
    if wanted > have:
        return Decision(wanted, _why_up(policy, load, wanted, have))
    if wanted == have:
        return Decision(have, f"steady at {have}: {_load(load)}")
    since = now if low_since is None else low_since
    if replicas.draining:
        return Decision(have, "one replica is draining: the next step waits for it", since)
    if now - since < policy.scale_down_after_s:
        left = policy.scale_down_after_s - (now - since)
        return Decision(have, f"{_load(load)}: {wanted} would do; down in {left:.0f} s", since)
    return Decision(
        have - 1,
        f"{_load(load)} for {now - since:.0f} s: {wanted} would do; one replica down",
        since if have - 1 > wanted else None,  # further steps as each drain ends
    )


def needed(policy: Autoscale, load: Load) -> int:
    """Replicas for this load within the bounds: interactive load first, then batch work in
    what the bounds leave."""
    interactive = math.ceil((load.in_flight + load.waiting) / policy.target_in_flight)
    batch = math.ceil(load.batch_queued / policy.target_in_flight)
    return max(policy.min_replicas, min(policy.max_replicas, interactive + batch))


def _why_up(policy: Autoscale, load: Load, wanted: int, have: int) -> str:
    if wanted == policy.min_replicas and wanted > _unbounded(policy, load):
        return f"below min_replicas ({have} < {policy.min_replicas})"
    capped = " (max_replicas)" if wanted == policy.max_replicas else ""
    return f"{_load(load)} at {policy.target_in_flight:g} per replica: {have} -> {wanted}{capped}"


def _unbounded(policy: Autoscale, load: Load) -> int:
    return math.ceil((load.in_flight + load.waiting + load.batch_queued) / policy.target_in_flight)


def _load(load: Load) -> str:
    parts = [f"{load.in_flight} in flight", f"{load.waiting} waiting"]
    if load.batch_queued:
        parts.append(f"{load.batch_queued} batch queued")
    return ", ".join(parts)
