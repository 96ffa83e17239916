"""Healing in the scheduler (simulated agents): restarts keep identity, backoff, FAILED, probes."""

from __future__ import annotations

import time

from sage_mq.messages import (
    EngineExited,
    EngineLaunchFailed,
    EngineReady,
    HealthTick,
    NodeHealth,
    RelaunchEngine,
    StartEngine,
    StopEngine,
    TerminateEngine,
)
from sage_mq.scheduler.steady import SteadyEngines
from sage_mq.settings import Settings
from sage_mq.store import EngineState
from tests.helpers.lives import exits, fire, launches, running
from tests.helpers.simulated import Fleet


async def test_an_exited_engine_comes_back_as_itself(fleet: Fleet) -> None:
    await running(fleet, use_gpu=True)
    first = await fleet.record("e")
    await exits(fleet, 1)
    assert (await fleet.record("e")).state == EngineState.RESTARTING
    await fire(fleet, 0.5)
    assert len(await launches(fleet)) == 1  # not yet: the delay is 1 s
    await fire(fleet, 1.05)
    again = await fleet.record("e")
    original, relaunched = await launches(fleet)
    assert again.state == EngineState.STARTING and again.generation == 2 and again.restarts == 1
    assert (again.engine_id, again.node, again.port, again.gpus) == (
        first.engine_id,
        first.node,
        first.port,
        first.gpus,
    )
    # Same argv, args and GPUs (the record it carries has moved on: generation, state, times).
    assert relaunched.model_copy(update={"record": None}) == original.model_copy(
        update={"generation": 2, "record": None}
    )
    assert relaunched.record is not None and relaunched.record["generation"] == 2
    await fleet.event(EngineReady(engine_id="e", node="n1", generation=2, url="u"))
    assert (await fleet.record("e")).state == EngineState.RUNNING


async def test_a_crash_loop_backs_off_1_2_4_then_fails_and_frees_gpus_and_port(
    fleet: Fleet,
) -> None:
    await running(fleet, use_gpu=True, tensor_parallel_size=2, required_memory_gb=40)
    delays = []
    for generation in (1, 2, 3):
        await exits(fleet, generation)
        restarting = await fleet.events.wait("engine.restarting", "e", count=generation)
        delays.append(restarting.payload.model_dump()["delay_s"])
        ((due, timer),) = await fleet.scheduler.ctx.timers.pending()
        assert isinstance(timer, RelaunchEngine) and timer.generation == generation
        assert abs(due - (time.time() + delays[-1])) < 0.5
        await fire(fleet, delays[-1] + 0.05)
    assert delays == [1.0, 2.0, 4.0]
    await exits(fleet, 4)
    record = await fleet.record("e")
    assert record.state == EngineState.FAILED and record.restarts == 3
    assert "gave up after 3 restart attempt(s)" in (record.last_error or "")
    assert record.gpus == [] and record.port is None
    assert await fleet.store.reservations("n1") == {} and await fleet.store.ports_in_use("n1") == {}
    failed = await fleet.events.wait("engine.failed", "e")
    assert failed.payload.model_dump()["last_lines"] == ("boom",)
    await fleet.request(
        StartEngine(
            engine_id="again",
            model="big",
            backend="fake",
            tensor_parallel_size=2,
            required_memory_gb=40,
        )
    )
    assert (await fleet.record("again")).gpus == [0, 1]  # the freed GPUs take a TP 2 engine


async def test_a_launch_the_node_refuses_ends_failed_at_once_with_its_reason(
    fleet: Fleet,
) -> None:
    await fleet.node("n1", "2x24GiB")
    await fleet.request(StartEngine(engine_id="e", model="demo", backend="fake", use_gpu=True))
    refusal = "node n1: engine flag(s) --middleware are not allowed"
    await fleet.event(
        EngineLaunchFailed(engine_id="e", node="n1", generation=1, reason=refusal, refused=True)
    )
    record = await fleet.record("e")
    assert record.state == EngineState.FAILED and record.restarts == 0
    assert refusal in (record.last_error or "") and record.port is None and record.gpus == []
    assert await fleet.store.reservations("n1") == {} and await fleet.store.ports_in_use("n1") == {}
    failed = await fleet.events.wait("engine.failed", "e")
    assert refusal in failed.payload.model_dump()["reason"]
    assert await fleet.scheduler.ctx.timers.pending() == []  # no retry is waiting


async def test_an_exit_its_backend_calls_permanent_spends_no_attempt(fleet: Fleet) -> None:
    await running(fleet)
    await fleet.event(
        EngineExited(
            engine_id="e",
            node="n1",
            generation=1,
            returncode=2,
            reason="exited with code 2",
            last_lines=("usage: sage-mq-fake-engine ...",),
        )
    )
    record = await fleet.record("e")
    assert record.state == EngineState.FAILED and record.restarts == 0
    assert "not restarted: its arguments were refused" in (record.last_error or "")
    assert await fleet.scheduler.ctx.timers.pending() == []


async def test_running_through_the_stability_window_resets_the_attempts(fleet: Fleet) -> None:
    await running(fleet)
    for generation in (1, 2):
        await exits(fleet, generation)
        await fire(fleet, 10)
        await fleet.event(EngineReady(engine_id="e", node="n1", generation=generation + 1, url="u"))
    assert (await fleet.record("e")).restart_attempt == 2
    await fleet.store.update_engine("e", running_since=time.time() - 61)
    await exits(fleet, 3)
    restarting = await fleet.events.wait("engine.restarting", "e", count=3)
    assert restarting.payload.model_dump()["attempt"] == 1


async def test_three_failed_probes_terminate_and_restart_a_hung_engine(fleet: Fleet) -> None:
    await running(fleet)
    for _ in range(3):  # healthy reports: after the first, judged without reading the record
        await fleet.event(NodeHealth(node_id="n1", results={"e": True}))
    for expected in (EngineState.UNHEALTHY, EngineState.UNHEALTHY):
        ticks = len([c for c in await fleet.commands("n1") if isinstance(c, HealthTick)])
        await fleet.event(NodeHealth(node_id="n1", results={"e": False}))
        assert (await fleet.record("e")).state == expected
        rechecks = [c for c in await fleet.commands("n1") if isinstance(c, HealthTick)]
        assert len(rechecks) == ticks + 1  # a failed probe: the node is probed again at once
    await fleet.event(NodeHealth(node_id="n1", results={"e": True}))  # recovered: count resets
    assert (await fleet.record("e")).state == EngineState.RUNNING
    for _ in range(3):
        await fleet.event(NodeHealth(node_id="n1", results={"e": False}))
    record = await fleet.record("e")
    assert record.state == EngineState.RESTARTING and "3 consecutive health probes" in (
        record.last_error or ""
    )
    hung = (await fleet.commands("n1"))[-1]  # sent with the decision, during the backoff
    assert isinstance(hung, TerminateEngine) and hung.grace_s == 1.0 and hung.generation == 1
    assert "engine.unhealthy" in await fleet.events.types("e")
    await fire(fleet, 1.05)
    assert (await launches(fleet))[-1].generation == 2


async def test_a_starting_engine_is_not_counted_unhealthy(fleet: Fleet) -> None:
    await fleet.node("n1")
    await fleet.request(StartEngine(engine_id="slow", model="demo", backend="fake", use_gpu=False))
    for _ in range(10):
        await fleet.event(NodeHealth(node_id="n1", results={"slow": False}))
    record = await fleet.record("slow")
    assert record.state == EngineState.STARTING and record.restarts == 0


async def test_a_timer_for_an_engine_that_moved_on_does_nothing(fleet: Fleet) -> None:
    await running(fleet)
    await exits(fleet, 1)
    await fleet.request(RelaunchEngine(engine_id="e", generation=0, attempt=1))  # stale
    assert len(await launches(fleet)) == 1
    await fleet.request(StopEngine(engine_id="e"))  # stopped while waiting out the backoff
    await fire(fleet, 2)
    assert len(await launches(fleet)) == 1


async def test_backoff_timers_survive_the_scheduler(fleet: Fleet, settings: Settings) -> None:
    await running(fleet)
    await exits(fleet, 1)
    successor = Fleet(fleet.redis, settings)  # a new scheduler: nothing in memory carries over
    await successor.scheduler.fire_timers(now=time.time() + 1.05)
    await successor.scheduler.run(until_idle=True)
    assert [c.generation for c in await launches(successor)] == [1, 2]


def test_steady_engines_are_remembered_for_a_while_and_forgotten_on_failure() -> None:
    steady = SteadyEngines(ttl_s=30)
    steady.remember("n1", "e", now=100.0)
    assert steady.known("n1", "e", 129.0) and not steady.known("n2", "e", 129.0)
    assert not steady.known("n1", "e", 130.5)  # read again after the time limit
    steady.forget("n1", "e")
    assert not steady.known("n1", "e", 101.0)
