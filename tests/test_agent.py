"""NodeAgent against a real Redis with real fake-engine processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sage_mq.agent import processes
from sage_mq.agent.node import NodeAgent
from sage_mq.bus import Bus
from sage_mq.connection import Redis
from sage_mq.gpu import FakeGpus, GPUResourceManager
from sage_mq.keys import Keys
from sage_mq.messages import (
    EngineExited,
    EngineLaunchFailed,
    EngineStarting,
    HealthTick,
    LaunchEngine,
    Message,
    NodeHealth,
    TerminateEngine,
)
from sage_mq.settings import AgentSettings, Settings
from sage_mq.store import Store
from sage_mq.wire import envelope
from tests.helpers.engines import engine_processes, fake_launch, marked_env
from tests.helpers.events import Events
from tests.helpers.runtimes import venv_with
from tests.helpers.servers import RedisServer, free_port

PYTHON3 = os.path.abspath(shutil.which("python3") or "python3")
"""What ``--allow-command python3`` resolves to here (the venv's, unresolved symlink)."""


class RunningAgent:
    def __init__(
        self, settings: Settings, state: Path, node_id: str = "n1", **options: Any
    ) -> None:
        self.agent = NodeAgent(
            settings,
            AgentSettings(
                node_id=node_id,
                state_dir=state,
                liveness_ttl_s=2.0,
                stop_grace_s=2.0,
                port_range=(1024, 65535),  # launches here come with any free port
                **options,
            ),
            gpus=GPUResourceManager(FakeGpus("2x24GiB")),
            base_env=marked_env(state),
        )
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> NodeAgent:
        self.task = asyncio.create_task(self.agent.run())
        return self.agent

    async def __aexit__(self, *exc: object) -> None:
        self.agent.stop()
        assert self.task is not None
        await self.task
        await self.agent.close()


@pytest.fixture
async def engines_cleanup(tmp_path: Path) -> AsyncIterator[Path]:
    yield tmp_path
    for proc in engine_processes(tmp_path):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


async def command(redis: Redis, settings: Settings, message: Message, node: str = "n1") -> None:
    bus = Bus(redis, Keys(settings.namespace), settings.bus)
    await bus.publish(Keys(settings.namespace).node_commands(node), message)


async def launch_until_ready(
    redis: Redis, settings: Settings, launch: LaunchEngine, count: int = 1
) -> int:
    """Send a launch command, wait for the engine to be ready; its pid."""
    events = Events(redis, settings.namespace)
    await command(redis, settings, launch)
    starting = await events.wait("engine.starting", launch.engine_id, count=count)
    await events.wait("engine.ready", launch.engine_id, count=count)
    assert isinstance(starting.payload, EngineStarting)
    return starting.payload.pid


async def test_the_agent_registers_its_node_with_gpus_and_liveness(
    aredis: Redis, settings: Settings, engines_cleanup: Path
) -> None:
    async with RunningAgent(settings, engines_cleanup):
        events = Events(aredis, settings.namespace)
        joined = await events.wait("node.joined")
        store = Store(aredis, Keys(settings.namespace))
        ((node, alive),) = await store.list_nodes()
    assert joined.payload.model_dump()["gpu_count"] == 2
    assert alive and node.address == "127.0.0.1" and len(node.gpus) == 2 and node.epoch == 1
    assert await aredis.ttl(Keys(settings.namespace).node_alive("n1")) <= 2


async def test_launch_reports_starting_then_ready_and_kill_9_reports_exited_at_once(
    aredis: Redis, settings: Settings, engines_cleanup: Path
) -> None:
    events = Events(aredis, settings.namespace)
    async with RunningAgent(settings, engines_cleanup):
        pid = await launch_until_ready(aredis, settings, fake_launch())
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        exited = await events.wait("engine.exited", "e1", timeout=5)
    assert isinstance(exited.payload, EngineExited)
    assert exited.payload.returncode == -9 and "SIGKILL" in exited.payload.reason
    assert exited.ts - killed_at < 0.5
    assert any("serving demo" in line for line in exited.payload.last_lines)


async def test_the_agent_runs_only_what_its_operator_allowed(
    aredis: Redis, settings: Settings, engines_cleanup: Path, tmp_path: Path
) -> None:
    events = Events(aredis, settings.namespace)
    marker = engines_cleanup / "pwned"
    vllm = venv_with(tmp_path, ("vllm", "0.32.0"))  # a vLLM runtime: its flags are judged
    refused = {
        "absent": fake_launch("absent", backend="llamacpp"),
        "sh": fake_launch("sh", backend="command", extra_args=("/bin/sh", "-c", f"touch {marker}")),
        "remote": fake_launch("remote", backend="vllm", extra_args=("--trust-remote-code",)),
        "flag": fake_launch("flag", model="--trust-remote-code"),
        "far": fake_launch("far", port=80),  # outside this node's range (1024-65535)
    }
    async with RunningAgent(settings, engines_cleanup, runtimes={"vllm": vllm}):
        for launch in refused.values():
            await command(aredis, settings, launch)
        reasons = {}
        for engine_id in refused:
            failed = (await events.wait("engine.launch_failed", engine_id)).payload
            assert isinstance(failed, EngineLaunchFailed) and failed.refused
            reasons[engine_id] = failed.reason
    assert "no llamacpp runtime" in reasons["absent"]
    assert "--allow-command /bin/sh" in reasons["sh"]
    assert "--allow-engine-flag --trust-remote-code" in reasons["remote"]
    assert "like a flag" in reasons["flag"]
    assert "port 80 is outside node n1's engine port range 1024-65535" in reasons["far"]
    assert not marker.exists() and engine_processes(engines_cleanup) == []


async def test_a_launch_whose_id_is_a_path_writes_nothing_and_is_dead_lettered(
    aredis: Redis, settings: Settings, engines_cleanup: Path
) -> None:
    keys = Keys(settings.namespace)
    forged = fake_launch().model_dump(mode="json") | {"engine_id": "../../../x/victim"}
    entry = {"type": "engine.launch", "id": "forged-1", "ts": "1", "v": "1"}
    async with RunningAgent(settings, engines_cleanup):
        await Events(aredis, settings.namespace).wait("node.joined")
        await aredis.xadd(keys.node_commands("n1"), entry | {"data": json.dumps(forged)})
        for _ in range(100):
            if await aredis.xlen(keys.dead):
                break
            await asyncio.sleep(0.05)
    ((_id, dead),) = await aredis.xrange(keys.dead)
    assert "engine_id" in dead["reason"] and dead["entry_id"]
    written = await asyncio.to_thread(lambda: [str(p) for p in engines_cleanup.rglob("*victim*")])
    assert written == [] and not await asyncio.to_thread((engines_cleanup / "x").exists)
    assert engine_processes(engines_cleanup) == []


async def test_an_allowed_command_runs_by_the_path_it_had_when_the_agent_started(
    aredis: Redis, settings: Settings, engines_cleanup: Path
) -> None:
    server = ("-m", "sage_mq.engines.fake_server", "--model", "{model}", "--port", "{port}")
    launch = fake_launch("own", backend="command", extra_args=("python3", *server))
    async with RunningAgent(settings, engines_cleanup, allowed_commands=("python3",)) as agent:
        await Events(aredis, settings.namespace).wait("node.joined")
        node = await Store(aredis, Keys(settings.namespace)).get_node("n1")
        assert node is not None and set(node.allowed_commands) == {"python3", PYTHON3}
        await launch_until_ready(aredis, settings, launch)
        assert agent.lifecycle.engines["own"].argv[0] == PYTHON3


async def test_terminate_leaves_no_process_of_the_group_and_reports_stopped(
    aredis: Redis, settings: Settings, engines_cleanup: Path
) -> None:
    events = Events(aredis, settings.namespace)
    async with RunningAgent(settings, engines_cleanup):
        pid = await launch_until_ready(aredis, settings, fake_launch())
        await command(aredis, settings, TerminateEngine(engine_id="e1"))
        await events.wait("engine.stopped", "e1")
        await command(aredis, settings, TerminateEngine(engine_id="e1"))  # already gone: success
        await events.wait("engine.stopped", "e1", count=2)
    assert not processes.group_alive(pid)
    assert "engine.exited" not in await events.types("e1")


async def test_a_redelivered_launch_never_starts_a_second_process(
    aredis: Redis, settings: Settings, engines_cleanup: Path
) -> None:
    events = Events(aredis, settings.namespace)
    launch = fake_launch()
    async with RunningAgent(settings, engines_cleanup) as agent:
        await command(aredis, settings, launch)
        await events.wait("engine.ready", "e1")
        await agent.handle(envelope(launch))  # as if the bus delivered it again
        await events.wait("engine.starting", "e1", count=2)
        assert len(engine_processes(engines_cleanup)) == 1
        # An older generation is refused outright; a newer one replaces the process.
        await agent.handle(envelope(launch.model_copy(update={"generation": 0})))
        await command(aredis, settings, launch.model_copy(update={"generation": 2}))
        newer = await events.wait("engine.starting", "e1", count=3)
        await events.wait("engine.ready", "e1", count=3)
        assert newer.payload.model_dump()["generation"] == 2
        assert [p.pid for p in engine_processes(engines_cleanup)] == [
            newer.payload.model_dump()["pid"]
        ]


async def test_launch_refuses_a_busy_port_and_a_gpu_the_node_lacks(
    aredis: Redis, settings: Settings, engines_cleanup: Path
) -> None:
    events = Events(aredis, settings.namespace)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        async with RunningAgent(settings, engines_cleanup):
            await command(aredis, settings, fake_launch("busy", port=busy))
            await command(aredis, settings, fake_launch("nogpu", use_gpu=True, gpus=(0, 7)))
            busy_event = await events.wait("engine.launch_failed", "busy")
            gpu_event = await events.wait("engine.launch_failed", "nogpu")
    busy_failure, gpu_failure = busy_event.payload.model_dump(), gpu_event.payload.model_dump()
    assert f"port {busy} on 127.0.0.1 is already in use" in busy_failure["reason"]
    assert busy_failure["port_in_use"] is True  # the scheduler may move it to another port
    assert "GPU(s) [7] do not exist" in gpu_failure["reason"]
    assert gpu_failure["port_in_use"] is False
    assert engine_processes(engines_cleanup) == []


async def test_health_tick_probes_every_engine(
    aredis: Redis, settings: Settings, engines_cleanup: Path
) -> None:
    events = Events(aredis, settings.namespace)
    async with RunningAgent(settings, engines_cleanup):
        await command(aredis, settings, fake_launch(use_gpu=True, gpus=(1,)))
        await events.wait("engine.ready", "e1")
        await command(aredis, settings, HealthTick(timeout_s=2))
        health = await events.wait("node.health")
    assert isinstance(health.payload, NodeHealth) and health.payload.results == {"e1": True}


async def test_a_restarted_agent_adopts_its_engines_and_duplicates_none(
    aredis: Redis, settings: Settings, engines_cleanup: Path
) -> None:
    events = Events(aredis, settings.namespace)
    launch = fake_launch()
    async with RunningAgent(settings, engines_cleanup):
        await command(aredis, settings, launch)
        first = await events.wait("engine.ready", "e1")
        pid = (await events.wait("engine.starting", "e1")).payload.model_dump()["pid"]
    # The agent is gone (its run() returned); the engine kept running.
    assert [p.pid for p in engine_processes(engines_cleanup)] == [pid]
    async with RunningAgent(settings, engines_cleanup) as agent:
        adopted = await events.wait("engine.adopted", "e1")
        await events.wait("engine.ready", "e1", count=2)
        await agent.handle(envelope(launch))  # the old launch, delivered once more
        assert [p.pid for p in engine_processes(engines_cleanup)] == [pid]
        assert await Store(aredis, Keys(settings.namespace)).get_node("n1") is not None
        node_epoch = (await events.wait("node.joined", count=2)).payload.model_dump()["epoch"]
    assert adopted.payload.model_dump()["pid"] == pid and first.type == "engine.ready"
    assert node_epoch == 2


async def test_an_engine_that_died_while_the_agent_was_down_is_reported_exited(
    aredis: Redis, settings: Settings, engines_cleanup: Path
) -> None:
    events = Events(aredis, settings.namespace)
    async with RunningAgent(settings, engines_cleanup):
        pid = await launch_until_ready(aredis, settings, fake_launch())
    os.killpg(pid, signal.SIGKILL)
    await asyncio.sleep(0.1)
    async with RunningAgent(settings, engines_cleanup):
        exited = await events.wait("engine.exited", "e1")
    assert exited.payload.model_dump()["reason"] == "process ended while the agent was down"


async def test_events_wait_in_the_outbox_while_redis_is_away(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    settings = Settings(redis_url=private_redis.url, namespace="o")
    runner = RunningAgent(settings, tmp_path)
    try:
        async with runner as agent:
            events = Events(agent.redis, "o")
            await command(agent.redis, settings, fake_launch())
            starting = await events.wait("engine.starting", "e1")
            await events.wait("engine.ready", "e1")
            private_redis.kill()
            os.kill(starting.payload.model_dump()["pid"], signal.SIGKILL)
            for _ in range(100):
                if agent.outbox.pending:
                    break
                await asyncio.sleep(0.05)
            assert [e.type for e in agent.outbox.pending] == ["engine.exited"]
            private_redis.start()  # empty: the agent must re-register and deliver what waited
            exited = await events.wait("engine.exited", "e1", timeout=15)
            await events.wait("node.joined", timeout=15)
        assert exited.payload.model_dump()["returncode"] == -9
    finally:
        for proc in engine_processes(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


async def test_an_agent_cut_off_from_redis_reports_its_engines_when_back(
    tmp_path: Path,
) -> None:
    private_redis = RedisServer(free_port(), tmp_path, extra=["--appendonly", "yes"])
    private_redis.start()
    settings = Settings(redis_url=private_redis.url, namespace="o")
    try:
        async with RunningAgent(settings, tmp_path) as agent:
            events = Events(agent.redis, "o")
            await command(agent.redis, settings, fake_launch())
            starting = await events.wait("engine.starting", "e1")
            await events.wait("engine.ready", "e1")
            private_redis.kill()  # cut off: heartbeats fail, the engine keeps running
            await asyncio.sleep(agent.agent.liveness_ttl_s)
            private_redis.start()  # back, with its data (append-only file)
            adopted = await events.wait("engine.adopted", "e1", timeout=15)
        assert adopted.payload.model_dump()["pid"] == starting.payload.model_dump()["pid"]
        assert adopted.payload.model_dump()["node"] == agent.node_id
    finally:
        private_redis.kill()
        for proc in engine_processes(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def test_launch_engine_helper_is_a_fake_engine() -> None:
    assert isinstance(fake_launch(), LaunchEngine) and fake_launch().backend == "fake"


async def test_an_advertise_address_not_on_this_host_is_named_as_the_reason(
    aredis: Redis, settings: Settings, engines_cleanup: Path
) -> None:
    events = Events(aredis, settings.namespace)
    async with RunningAgent(settings, engines_cleanup):
        # 192.0.2.1 is TEST-NET-1: never assigned to a host; only a local bind is tried.
        await command(aredis, settings, fake_launch("away", host="192.0.2.1"))
        failed = await events.wait("engine.launch_failed", "away")
    assert "192.0.2.1 is not on this host" in failed.payload.model_dump()["reason"]


async def shipped(redis: Redis, settings: Settings, engine_id: str = "e1") -> list[str]:
    rows = await redis.xrange(Keys(settings.namespace).engine_log(engine_id))
    return [fields["line"] for _id, fields in rows]


async def test_lines_an_engine_writes_while_its_agent_is_away_are_shipped_once(
    aredis: Redis, settings: Settings, engines_cleanup: Path
) -> None:
    events = Events(aredis, settings.namespace)
    hangs_later = fake_launch(extra_args=("--hang-after", "1.5"))
    async with RunningAgent(settings, engines_cleanup):
        await launch_until_ready(aredis, settings, hangs_later)
        await asyncio.sleep(0.7)  # one shipping round
    before = await shipped(aredis, settings)
    assert any("serving demo" in line for line in before)
    await asyncio.sleep(1.5)  # no agent now: the engine writes "hanging on purpose"
    async with RunningAgent(settings, engines_cleanup):
        await events.wait("engine.adopted", "e1")
        for _ in range(50):
            if any("hanging on purpose" in line for line in await shipped(aredis, settings)):
                break
            await asyncio.sleep(0.1)
    after = await shipped(aredis, settings)
    assert after[: len(before)] == before and len(after) == len(set(after))  # once each
    assert [line for line in after if "hanging on purpose" in line] == [
        "fake engine: hanging on purpose after 1.5s"
    ]


async def test_the_last_words_of_an_engine_that_died_while_its_agent_was_away_are_shipped(
    aredis: Redis, settings: Settings, engines_cleanup: Path
) -> None:
    events = Events(aredis, settings.namespace)
    async with RunningAgent(settings, engines_cleanup):
        await launch_until_ready(aredis, settings, fake_launch(extra_args=("--crash-after", "1")))
    await asyncio.sleep(1.5)
    async with RunningAgent(settings, engines_cleanup):
        exited = await events.wait("engine.exited", "e1")
        await asyncio.sleep(0.3)
    crash = "fake engine: crashing on purpose after 1.0s with exit code 1"
    assert crash in exited.payload.model_dump()["last_lines"]
    assert (await shipped(aredis, settings)).count(crash) == 1
