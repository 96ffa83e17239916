"""An engine's life played as its agent would tell it, for scheduler tests on a simulated fleet."""

from __future__ import annotations

import time

from sage_mq.messages import EngineExited, EngineReady, EngineStarting, LaunchEngine, StartEngine
from tests.helpers.simulated import Fleet


async def running(fleet: Fleet, engine_id: str = "e", **start: object) -> None:
    """Start an engine and play the agent: starting, then ready."""
    await fleet.node("n1", "2x24GiB")
    await fleet.request(
        StartEngine(
            engine_id=engine_id,
            model="demo",
            backend="fake",
            extra_args=("--latency-ms", "5"),
            **start,
        )
    )  # type: ignore[arg-type]
    await fleet.event(
        EngineStarting(engine_id=engine_id, node="n1", generation=1, pid=10, argv=("a",))
    )
    await fleet.event(EngineReady(engine_id=engine_id, node="n1", generation=1, url="u"))


async def exits(fleet: Fleet, generation: int, engine_id: str = "e") -> None:
    await fleet.event(
        EngineExited(
            engine_id=engine_id,
            node="n1",
            generation=generation,
            returncode=1,
            reason="exited with code 1",
            last_lines=("boom",),
        )
    )


async def fire(fleet: Fleet, after_s: float) -> None:
    """Fire the timers as if ``after_s`` seconds had passed, and let the scheduler act."""
    await fleet.scheduler.fire_timers(now=time.time() + after_s)
    await fleet.scheduler.run(until_idle=True)


async def launches(fleet: Fleet) -> list[LaunchEngine]:
    return [c for c in await fleet.commands("n1") if isinstance(c, LaunchEngine)]
