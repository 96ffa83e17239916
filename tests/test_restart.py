"""An operator's restart, against a real Redis with simulated agents: every state it may meet."""

from __future__ import annotations

from sage_mq.messages import EngineStopped, LaunchEngine, RestartEngine, StartEngine, StopEngine
from sage_mq.store import EngineState
from tests.helpers.lives import exits, fire, launches, running
from tests.helpers.simulated import Fleet


async def test_a_running_engine_gets_a_new_process_where_it_is(fleet: Fleet) -> None:
    await running(fleet, use_gpu=True)
    before = await fleet.record("e")
    await fleet.request(RestartEngine(engine_id="e"))
    after = await fleet.record("e")
    assert after.state == EngineState.STARTING and after.generation == 2
    assert (after.restarts, after.restart_attempt) == (1, 0)
    assert (after.node, after.port, after.gpus) == (before.node, before.port, before.gpus)
    relaunch: LaunchEngine = (await launches(fleet))[-1]
    assert (relaunch.generation, relaunch.port, relaunch.gpus) == (2, before.port, (0,))
    assert relaunch.extra_args == ("--latency-ms", "5")  # the agent stops generation 1 first
    restarting = await fleet.events.wait("engine.restarting", "e")
    assert restarting.payload.model_dump() == {"engine_id": "e", "attempt": 0, "delay_s": 0.0}


async def test_a_restart_during_backoff_launches_now_and_the_timer_does_nothing(
    fleet: Fleet,
) -> None:
    await running(fleet)
    await exits(fleet, 1)
    await fleet.request(RestartEngine(engine_id="e"))
    assert [c.generation for c in await launches(fleet)] == [1, 2]
    await fire(fleet, 5)  # the backoff timer of generation 1 is stale now
    assert [c.generation for c in await launches(fleet)] == [1, 2]
    assert (await fleet.record("e")).restart_attempt == 0


async def test_a_failed_engine_is_placed_again_with_a_fresh_attempt_counter(fleet: Fleet) -> None:
    await running(fleet, use_gpu=True)
    for generation in (1, 2, 3):
        await exits(fleet, generation)
        await fire(fleet, 5)
    await exits(fleet, 4)
    assert (await fleet.record("e")).state == EngineState.FAILED
    await fleet.request(RestartEngine(engine_id="e"))
    record = await fleet.record("e")
    assert record.state == EngineState.STARTING and record.gpus == [0] and record.port == 40000
    assert (record.restart_attempt, record.generation, record.restarts) == (0, 5, 4)
    assert set(await fleet.store.reservations("n1")) == {"e"}


async def test_a_stopped_engine_starts_again(fleet: Fleet) -> None:
    await running(fleet)
    await fleet.request(StopEngine(engine_id="e"))
    await fleet.request(RestartEngine(engine_id="e"))  # still STOPPING: refused, with why
    rejected = await fleet.events.wait("request.rejected", "e")
    assert "is stopping" in rejected.payload.model_dump()["reason"]
    await fleet.event(EngineStopped(engine_id="e", node="n1"))
    assert (await fleet.record("e")).state == EngineState.STOPPED
    await fleet.request(RestartEngine(engine_id="e"))
    assert (await fleet.record("e")).state == EngineState.STARTING


async def test_unknown_engines_and_no_capacity_are_refused_with_a_reason(fleet: Fleet) -> None:
    await fleet.request(RestartEngine(engine_id="ghost"))
    rejected = await fleet.events.wait("request.rejected", "ghost")
    assert "no engine 'ghost'" in rejected.payload.model_dump()["reason"]
    await running(fleet, use_gpu=True, tensor_parallel_size=2, required_memory_gb=40)
    await fleet.request(StopEngine(engine_id="e"))
    await fleet.event(EngineStopped(engine_id="e", node="n1"))
    await fleet.request(
        StartEngine(engine_id="hog", model="m", tensor_parallel_size=2, required_memory_gb=40)
    )
    await fleet.request(RestartEngine(engine_id="e"))  # its GPUs went to "hog" meanwhile
    record = await fleet.record("e")
    assert record.state == EngineState.FAILED and "no GPU fits" in (record.last_error or "")
    rejected = await fleet.events.wait("request.rejected", "e")
    assert "no GPU fits" in rejected.payload.model_dump()["reason"]
