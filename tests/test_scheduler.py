"""Scheduler against a real Redis: placement, use_gpu, ports, reservations, states from events."""

from __future__ import annotations

import pytest

from sage_mq.engines.backends import build_argv, build_env
from sage_mq.messages import (
    EngineExited,
    EngineLaunchFailed,
    EngineReady,
    EngineStarting,
    EngineStopped,
    LaunchEngine,
    StartEngine,
    StopEngine,
    TerminateEngine,
)
from sage_mq.store import EngineState
from tests.helpers.simulated import Fleet


@pytest.mark.parametrize(
    ("kind", "use_gpu", "on_gpu"),
    [
        ("llm", None, True),
        ("llm", True, True),
        ("llm", False, False),
        ("embedding", None, False),
        ("embedding", True, True),
        ("embedding", False, False),
    ],
)
async def test_use_gpu_decides_gpus_device_and_visible_devices(
    fleet: Fleet, kind: str, use_gpu: bool | None, on_gpu: bool
) -> None:
    await fleet.node("n1", "2x24GiB")
    await fleet.request(StartEngine(engine_id="e", model="m-1B", kind=kind, use_gpu=use_gpu))
    record = await fleet.record("e")
    launch = await fleet.launch_of("e")
    assert record.state == EngineState.STARTING and record.use_gpu is use_gpu
    assert [r.engine_id for r in await fleet.store.list_engines()] == ["e"]  # written whole
    assert bool(record.gpus) is on_gpu and launch.use_gpu is on_gpu
    assert record.backend == ("embedding" if kind == "embedding" else "vllm")
    visible = build_env(launch, {})["CUDA_VISIBLE_DEVICES"]
    assert visible == (",".join(map(str, record.gpus)) if on_gpu else "")
    if kind == "embedding":
        argv = build_argv(launch)
        assert argv[argv.index("--device") + 1] == ("cuda" if on_gpu else "cpu")


async def test_gpu_required_on_a_node_without_gpus_is_rejected_with_a_reason(
    fleet: Fleet,
) -> None:
    await fleet.node("cpu-only")
    await fleet.request(
        StartEngine(engine_id="e", model="BAAI/bge-m3", kind="embedding", use_gpu=True)
    )
    rejected = await fleet.events.wait("request.rejected", "e")
    reason = rejected.payload.model_dump()["reason"]
    assert "no GPU fits" in reason and "cpu-only: no GPUs" in reason
    record = await fleet.record("e")
    assert record.state == EngineState.FAILED and record.last_error == reason
    assert [r.engine_id for r in await fleet.store.list_engines()] == ["e"]
    assert "engine.failed" in await fleet.events.types("e")
    assert await fleet.commands("cpu-only") == []


async def test_tensor_parallel_2_reserves_two_gpus_until_the_engine_stops(fleet: Fleet) -> None:
    await fleet.node("n1", "2x24GiB")
    big = dict(model="big", tensor_parallel_size=2, required_memory_gb=40.0)
    await fleet.request(StartEngine(engine_id="a", **big))  # 20 GiB on each GPU
    record = await fleet.record("a")
    assert record.gpus == [0, 1] and record.memory_gb == 40.0
    launch = await fleet.launch_of("a")
    assert launch.tensor_parallel_size == 2 and launch.gpu_memory_utilization == 0.84
    await fleet.request(StartEngine(engine_id="b", **big))
    assert (
        "no GPU fits"
        in (await fleet.events.wait("request.rejected", "b")).payload.model_dump()["reason"]
    )
    # Stop a: the agent reports it stopped; its GPUs and port come back.
    await fleet.request(StopEngine(engine_id="a"))
    assert isinstance((await fleet.commands("n1"))[-1], TerminateEngine)
    assert (await fleet.record("a")).state == EngineState.STOPPING
    await fleet.event(EngineStopped(engine_id="a", node="n1", returncode=0))
    stopped = await fleet.record("a")
    assert stopped.state == EngineState.STOPPED and stopped.gpus == [] and stopped.port is None
    assert await fleet.store.reservations("n1") == {} and await fleet.store.ports_in_use("n1") == {}
    await fleet.request(StartEngine(engine_id="c", **big))
    assert (await fleet.record("c")).gpus == [0, 1]


async def test_concurrent_start_requests_get_distinct_ports(fleet: Fleet) -> None:
    await fleet.node("n1")
    await fleet.request(
        *(
            StartEngine(engine_id=f"e{i}", model="demo", backend="fake", use_gpu=False)
            for i in range(20)
        )
    )
    ports = [(await fleet.record(f"e{i}")).port for i in range(20)]
    assert len(set(ports)) == 20 and min(p for p in ports if p) == 40000
    assert len(await fleet.store.ports_in_use("n1")) == 20


async def test_a_requested_port_and_node_are_honoured_or_refused(fleet: Fleet) -> None:
    await fleet.node("n1")
    await fleet.node("n2", address="127.0.0.2")
    await fleet.request(StartEngine(engine_id="a", model="m", use_gpu=False, port=40123, node="n2"))
    record = await fleet.record("a")
    assert (record.node, record.port, record.url) == ("n2", 40123, "http://127.0.0.2:40123")
    await fleet.request(StartEngine(engine_id="b", model="m", use_gpu=False, port=40123, node="n2"))
    assert (
        "already assigned"
        in (await fleet.events.wait("request.rejected", "b")).payload.model_dump()["reason"]
    )
    await fleet.request(StartEngine(engine_id="c", model="m", use_gpu=False, port=22))
    refused = (await fleet.events.wait("request.rejected", "c")).payload.model_dump()["reason"]
    assert "port 22 is outside its engine port range 40000-40999" in refused
    assert (await fleet.record("c")).state == EngineState.FAILED


async def test_engine_states_follow_agent_events_and_stale_generations_are_ignored(
    fleet: Fleet,
) -> None:
    await fleet.node("n1")
    await fleet.request(StartEngine(engine_id="e", model="demo", backend="fake", use_gpu=False))
    await fleet.event(EngineStarting(engine_id="e", node="n1", generation=1, pid=42, argv=("x",)))
    assert (await fleet.record("e")).pid == 42
    await fleet.event(EngineReady(engine_id="e", node="n1", generation=0, url="http://old"))
    assert (await fleet.record("e")).state == EngineState.STARTING  # stale generation
    await fleet.event(
        EngineReady(engine_id="e", node="n1", generation=1, url="http://127.0.0.1:40000")
    )
    assert (await fleet.record("e")).state == EngineState.RUNNING
    await fleet.event(
        EngineExited(
            engine_id="e",
            node="n1",
            generation=1,
            returncode=-9,
            reason="killed by SIGKILL",
            last_lines=("bye",),
        )
    )
    record = await fleet.record("e")
    assert record.state == EngineState.RESTARTING and "SIGKILL: bye" in (record.last_error or "")
    assert record.port == 40000 and await fleet.store.ports_in_use("n1") == {40000: "e"}
    restarting = await fleet.events.wait("engine.restarting", "e")
    assert restarting.payload.model_dump() == {"engine_id": "e", "attempt": 1, "delay_s": 1.0}


async def test_a_launch_failure_is_retried_where_it_was_placed(fleet: Fleet) -> None:
    await fleet.node("n1", "1x24GiB")
    await fleet.request(StartEngine(engine_id="e", model="m-1B"))
    await fleet.event(EngineLaunchFailed(engine_id="e", node="n1", generation=1, reason="bad argv"))
    record = await fleet.record("e")
    assert record.state == EngineState.RESTARTING and "bad argv" in (record.last_error or "")
    assert set(await fleet.store.reservations("n1")) == {"e"}  # kept for the retry
    assert record.port == 40000 and await fleet.store.ports_in_use("n1") == {40000: "e"}


def port_taken(engine_id: str, port: int, generation: int = 1) -> EngineLaunchFailed:
    reason = f"port {port} on 127.0.0.1 is already in use (node n1)"
    return EngineLaunchFailed(
        engine_id=engine_id, node="n1", generation=generation, reason=reason, port_in_use=True
    )


async def test_a_port_held_by_another_process_moves_the_engine_to_a_free_one(
    fleet: Fleet,
) -> None:
    await fleet.node("n1", "2x24GiB")
    await fleet.request(StartEngine(engine_id="e", model="m-1B"))
    await fleet.event(port_taken("e", 40000))
    record = await fleet.record("e")  # launched again at once on a free port: no attempt spent
    assert record.state == EngineState.STARTING and record.port == 40001
    assert record.url == "http://127.0.0.1:40001" and record.gpus == [0]
    assert (record.restarts, record.restart_attempt) == (0, 0)
    assert await fleet.store.ports_in_use("n1") == {40001: "e"}
    relaunch = [c for c in await fleet.commands("n1") if isinstance(c, LaunchEngine)][-1]
    assert (relaunch.generation, relaunch.port, relaunch.gpus) == (2, 40001, (0,))
    moved = (await fleet.events.wait("engine.port_changed", "e")).payload.model_dump()
    assert (moved["old_port"], moved["new_port"]) == (40000, 40001)
    assert "already in use" in moved["reason"]
    await fleet.request(StartEngine(engine_id="next", model="m-1B"))  # 40000 is someone else's
    assert (await fleet.record("next")).port == 40002


async def test_a_port_the_user_asked_for_is_not_changed(fleet: Fleet) -> None:
    await fleet.node("n1", "1x24GiB")
    await fleet.request(StartEngine(engine_id="e", model="m-1B", port=40005))
    await fleet.event(port_taken("e", 40005))
    record = await fleet.record("e")
    assert record.state == EngineState.RESTARTING and record.port == 40005


async def test_stop_of_an_unknown_or_unplaced_engine(fleet: Fleet) -> None:
    await fleet.request(StopEngine(engine_id="ghost"))
    assert (
        "no engine 'ghost'"
        in (await fleet.events.wait("request.rejected", "ghost")).payload.model_dump()["reason"]
    )
    await fleet.request(StartEngine(engine_id="e", model="m", use_gpu=False))  # no node: FAILED
    await fleet.request(StopEngine(engine_id="e"))
    assert (await fleet.record("e")).state == EngineState.STOPPED
    await fleet.events.wait("engine.stopped", "e")


async def test_a_redelivered_start_does_not_place_twice_and_a_reused_id_is_refused(
    fleet: Fleet,
) -> None:
    await fleet.node("n1")
    start = StartEngine(engine_id="e", model="m", use_gpu=False)
    from sage_mq.wire import envelope

    env = envelope(start)
    await fleet.scheduler.handle(env)
    await fleet.scheduler.handle(env)  # delivered again
    launches = [c for c in await fleet.commands("n1") if isinstance(c, LaunchEngine)]
    assert len(launches) == 1
    await fleet.request(StopEngine(engine_id="e"))
    await fleet.event(EngineStopped(engine_id="e", node="n1"))
    await fleet.request(start)
    assert (
        "exists"
        in (await fleet.events.wait("request.rejected", "e")).payload.model_dump()["reason"]
    )


async def test_an_engine_goes_only_to_a_node_with_its_backends_runtime(fleet: Fleet) -> None:
    await fleet.node("plain", "2x24GiB", runtimes={"fake": "0.1", "embedding": "0.1"})
    await fleet.request(StartEngine(engine_id="e", model="m-1B", use_gpu=False))
    rejected = await fleet.events.wait("request.rejected", "e")
    reason = rejected.payload.model_dump()["reason"]
    assert (
        "none of 1 live node(s) will take it: it has no vllm runtime" in reason
        and "--runtime vllm=PYTHON" in reason
    )
    await fleet.node("served", runtimes={"vllm": "0.32.0", "llamacpp": "0.3.36"})
    await fleet.request(
        StartEngine(engine_id="g", model="/m/g.gguf", backend="llamacpp", use_gpu=False)
    )
    assert (await fleet.record("g")).node == "served"
    assert (await fleet.launch_of("g", "served")).backend == "llamacpp"
