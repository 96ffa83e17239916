"""Leader lease on a real Redis, and agents ignoring a stale leader's commands."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sage_mq.agent.node import NodeAgent
from sage_mq.connection import Redis
from sage_mq.gpu import FakeGpus, GPUResourceManager
from sage_mq.keys import Keys
from sage_mq.messages import TerminateEngine
from sage_mq.scheduler import Scheduler
from sage_mq.scheduler.lease import Lease
from sage_mq.settings import AgentSettings, SchedulerSettings, Settings
from sage_mq.wire import envelope
from tests.helpers.engines import marked_env
from tests.helpers.events import Events


async def test_one_lease_holder_at_a_time_and_each_term_a_larger_epoch(
    aredis: Redis, settings: Settings
) -> None:
    keys = Keys(settings.namespace)
    a, b = Lease(aredis, keys, "a", 0.3), Lease(aredis, keys, "b", 0.3)
    assert await a.acquire() == 1
    assert await b.acquire() is None and await a.renew()
    assert await a.holder() == "a:1"
    await asyncio.sleep(0.4)  # a stops renewing (crashed): the lease lapses
    assert not await a.renew()
    assert await b.acquire() == 2  # the next term, a larger epoch
    await a.release()  # not a's any more: nothing happens
    assert await b.holder() == "b:2"
    await b.release()
    assert await b.holder() is None


async def test_a_leader_knows_its_lease_may_have_lapsed_before_a_standby_can_take_it(
    aredis: Redis, settings: Settings
) -> None:
    keys = Keys(settings.namespace)
    a, b = Lease(aredis, keys, "a", 0.5), Lease(aredis, keys, "b", 0.5)
    assert not a.holds()
    assert await a.acquire() == 1 and a.holds()
    await asyncio.sleep(0.3)
    assert await a.renew() and a.holds()  # renewed: sure again for most of the TTL
    while a.holds():  # cut off from Redis from here on: no renewal, no I/O to ask
        await asyncio.sleep(0.01)
        assert await b.acquire() is None, "a standby took the lease while a still held it"
    await asyncio.sleep(0.1)  # Redis expires the key by its own clock, a little later
    assert await b.acquire() == 2 and not a.holds()


async def test_a_leader_unsure_of_its_lease_goes_on_in_the_same_epoch_if_it_still_holds_it(
    aredis: Redis, settings: Settings
) -> None:
    keys = Keys(settings.namespace)
    late = Lease(aredis, keys, "late", 2.0)
    assert await late.acquire() == 1
    for _ in range(300):  # its renewal is late (a stalled event loop): it stops acting
        if not late.holds():
            break
        await asyncio.sleep(0.01)
    assert await late.acquire() == 1 and late.holds()  # nobody took it meanwhile
    assert await late.holder() == "late:1"


async def test_a_standby_scheduler_takes_over_when_the_leader_stops(
    aredis: Redis, settings: Settings
) -> None:
    fast = SchedulerSettings(lease_ttl_s=1.0, health_interval_s=0.2)
    first = Scheduler(settings, redis=aredis, name="first", scheduler=fast)
    second = Scheduler(settings, redis=aredis, name="second", scheduler=fast)
    events = Events(aredis, settings.namespace)
    tasks = [asyncio.create_task(first.run())]
    elected = await events.wait("scheduler.elected", timeout=5)
    tasks.append(asyncio.create_task(second.run()))
    await asyncio.sleep(0.5)
    assert elected.payload.model_dump() == {"name": "first", "epoch": 1}
    first.stop()  # a graceful stop releases the lease: the standby leads at once
    await tasks[0]
    takeover = await events.wait("scheduler.elected", count=2, timeout=5)
    second.stop()
    await tasks[1]
    assert takeover.payload.model_dump()["name"] == "second"
    assert takeover.payload.model_dump()["epoch"] > 1
    assert takeover.ts - elected.ts < 5


async def test_an_agent_ignores_commands_of_a_stale_leader(
    aredis: Redis, settings: Settings, tmp_path: Path
) -> None:
    agent = NodeAgent(
        settings,
        AgentSettings(node_id="n1", state_dir=tmp_path),
        gpus=GPUResourceManager(FakeGpus("1x8GiB")),
        base_env=marked_env(tmp_path),
    )
    await agent.handle(envelope(TerminateEngine(engine_id="x", epoch=5)))
    await agent.handle(envelope(TerminateEngine(engine_id="y", epoch=4)))  # stale: ignored
    await agent.handle(envelope(TerminateEngine(engine_id="z")))  # unfenced: carried out
    await agent.outbox.flush()
    stopped = [
        e.payload.model_dump()["engine_id"]
        for e in await Events(aredis, settings.namespace).all()
        if e.type == "engine.stopped"
    ]
    assert stopped == ["x", "z"] and agent.fence.seen == 5
    await agent.close()
