"""Redis under Sentinel: what a primary failover costs the fleet, and what waiting for a replica
costs each write.

(a) The bus round trip (a command published, handled by an agent-side consumer whose reply is
    settled with its ack, the reply read back: ``bus_roundtrip.py``'s "ours") on a primary with
    one replica, with writes that wait for the replica (``WAIT 1``, the default under Sentinel)
    and without (``SAGE_MQ_REPLICA_ACKS=0``), interleaved in one run. The floor is "without".
(b) kill -9 of the primary of a running fleet (a scheduler and a node agent on a
    ``redis+sentinel://`` URL; the sentinels call a primary down after 1 s) → a start request sent
    at the kill (retried until acknowledged, as the CLI's caller would) → that engine RUNNING.
    Between trials the old primary comes back as the replica, so each trial promotes the other.

    python benchmarks/failover.py [--n 2000] [--trials 5] [--out benchmarks/results/failover.json]
"""

from __future__ import annotations

import asyncio
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._cli import finish, parser_for
from benchmarks._fleet import Fleet
from benchmarks._redis import percentile
from benchmarks.bus_roundtrip import Ours, interleaved_latencies, summary
from sage_mq.control import ControlPlaneManager
from sage_mq.errors import ControlPlaneUnavailable
from sage_mq.records import EngineState
from sage_mq.settings import Settings
from tests.helpers.sentinel import SentinelGroup

DOWN_AFTER_MS = 1000
"""Sentinels quicker than production's 5 s, to measure what the fleet adds; one failover per
trial, on a fresh group (a second soon after can be spurious at 1 s: tests/helpers/sentinel)."""


async def wait_cost(url: str, n: int) -> dict[str, Any]:
    without, waiting = Ours(url, 1, replica_acks=0, label="plain"), Ours(url, 1, label="waiting")
    plain_ms, wait_ms = await interleaved_latencies([without, waiting], n)
    for side in (without, waiting):
        await side.close()
    floor, ours = summary(plain_ms), summary(wait_ms)
    return {
        "without_wait": floor,
        "with_wait": ours,
        "ratio_p50": round(ours["p50_ms"] / floor["p50_ms"], 2),
        "ratio_p99": round(ours["p99_ms"] / floor["p99_ms"], 2),
    }


async def start_after_kill(group: SentinelGroup, trial: int) -> dict[str, float]:
    """kill -9 the primary, then ask for an engine at once; seconds to acknowledged, RUNNING."""
    manager = ControlPlaneManager(Settings(redis_url=group.url, namespace="bench"))
    old = group.primary_server()
    killed = time.monotonic()
    old.kill()
    try:
        while True:
            try:
                record = await manager.request_engine_startup(
                    "demo", backend="fake", use_gpu=False, engine_id=f"after-kill-{trial}"
                )
                break
            except ControlPlaneUnavailable:
                await asyncio.sleep(0.05)
        acknowledged = time.monotonic() - killed
        while record.state != EngineState.RUNNING:
            await asyncio.sleep(0.05)
            with_record = await manager.store.get_engine(record.engine_id)
            record = with_record or record
        running = time.monotonic() - killed
    finally:
        await manager.close()
    new = group.primary_server()
    group.restart(old, keep_data=True, replica_of=new)
    group.wait_replicated()
    return {"acknowledged_s": acknowledged, "running_s": running}


def main(n: int, trials: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        group = SentinelGroup(
            Path(workdir) / "redis", extra=["--appendonly", "yes"], down_after_ms=DOWN_AFTER_MS
        )
        fleet = None
        try:
            group.start()
            cost = asyncio.run(wait_cost(group.url, n))
            fleet = Fleet(group.url, Path(workdir))
            fleet.start_scheduler_and_node("--fake-gpus", "2x24GiB")
            runs = [asyncio.run(start_after_kill(group, i)) for i in range(trials)]
        finally:
            if fleet is not None:
                fleet.close()
            group.kill()
    acked, running = [r["acknowledged_s"] for r in runs], [r["running_s"] for r in runs]
    return {
        "benchmark": "failover",
        "n": n,
        "trials": trials,
        "machine": platform.node(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "down_after_ms": DOWN_AFTER_MS,
        "bus_wait": cost,
        "kill_to_acknowledged_s": _spread(acked),
        "kill_to_running_s": _spread(running),
    }


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0}
    return {"p50": round(percentile(values, 50), 2), "p99": round(percentile(values, 99), 2)}


def _print(r: dict[str, Any]) -> None:
    w = r["bus_wait"]
    print(f"failover (primary + replica + 3 sentinels, loopback), n={r['n']}, trials={r['trials']}")
    print(f"{'bus round trip':30}{'p50 ms':>10}{'p99 ms':>10}")
    for name, s in (
        ("writes not waiting", w["without_wait"]),
        ("writes wait (WAIT 1)", w["with_wait"]),
    ):
        print(f"{name:30}{s['p50_ms']:>10.3f}{s['p99_ms']:>10.3f}")
    print(f"ratio waiting/not: p50 {w['ratio_p50']}x, p99 {w['ratio_p99']}x")
    a, b = r["kill_to_acknowledged_s"], r["kill_to_running_s"]
    print(f"primary kill -9 → start acknowledged: p50 {a['p50']} s, p99 {a['p99']} s")
    print(f"primary kill -9 → that engine RUNNING: p50 {b['p50']} s, p99 {b['p99']} s")


if __name__ == "__main__":
    parser = parser_for(__doc__, "failover")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    finish(main(args.n, args.trials), args.out, _print)
