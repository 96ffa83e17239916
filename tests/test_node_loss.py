"""Node loss (simulated agents): engines move, wait PENDING, stale copies are fenced."""

from __future__ import annotations

import time

import pytest

from sage_mq.messages import (
    EngineAdopted,
    EngineExited,
    EngineReady,
    EngineStarting,
    LaunchEngine,
    NodeJoined,
    StartEngine,
    TerminateEngine,
)
from sage_mq.scheduler.nodes import SETTLE_S
from sage_mq.store import EngineRecord, EngineState
from tests.helpers.simulated import Fleet


async def lose(fleet: Fleet, node_id: str) -> None:
    """The node's liveness key expires; the leader's next tick notices; the grace passes."""
    await fleet.redis.delete(fleet.keys.node_alive(node_id))
    await fleet.scheduler.tick()
    grace = fleet.scheduler.ctx.scheduler.node_lost_grace_s
    await fleet.scheduler.fire_timers(now=time.time() + grace + 0.01)
    await fleet.scheduler.run(until_idle=True)


async def back(fleet: Fleet, node_id: str) -> None:
    """The node's agent registers again (node.joined)."""
    await fleet.node(node_id)
    await fleet.event(NodeJoined(node_id=node_id, address="127.0.0.1", gpu_count=0, epoch=2))


def reported(record: EngineRecord, pid: int = 1) -> EngineAdopted:
    """What n1's agent says when it is back: it runs the copy it was launched with."""
    launched = record.model_copy(update={"state": EngineState.STARTING})
    return EngineAdopted(
        engine_id=record.engine_id,
        node="n1",
        generation=record.generation,
        pid=pid,
        record=launched.public(),
        ready=True,
    )


async def running_on_n1(fleet: Fleet) -> None:
    await fleet.request(
        StartEngine(engine_id="e", model="demo", backend="fake", use_gpu=False, node=None)
    )
    assert (await fleet.record("e")).node == "n1"
    await fleet.event(EngineStarting(engine_id="e", node="n1", generation=1, pid=1, argv=("a",)))
    await fleet.event(EngineReady(engine_id="e", node="n1", generation=1, url="u"))


async def test_a_lost_nodes_engines_move_to_another_node_as_themselves(fleet: Fleet) -> None:
    await fleet.node("n1")
    await running_on_n1(fleet)
    await fleet.node("n2", address="127.0.0.2")
    await lose(fleet, "n1")
    assert "node.lost" in await fleet.events.types()
    ((node, alive),) = [(n, a) for n, a in await fleet.store.list_nodes() if n.node_id == "n1"]
    assert node.status == "lost" and not alive
    moved = await fleet.record("e")
    assert (moved.engine_id, moved.node, moved.state, moved.generation) == (
        "e",
        "n2",
        EngineState.STARTING,
        2,
    )
    assert moved.url == f"http://127.0.0.2:{moved.port}"
    assert await fleet.store.ports_in_use("n1") == {}
    assert not [c for c in await fleet.commands("n1") if isinstance(c, TerminateEngine)]
    assert isinstance((await fleet.commands("n2"))[-1], LaunchEngine)


async def test_with_no_capacity_they_wait_pending_then_take_a_new_node(fleet: Fleet) -> None:
    await fleet.node("n1")
    await running_on_n1(fleet)
    await lose(fleet, "n1")
    waiting = await fleet.record("e")
    assert waiting.state == EngineState.PENDING and waiting.node is None
    assert "node n1 lost; waiting for capacity: no live node" in (waiting.last_error or "")
    await fleet.node("n3")
    await fleet.event(NodeJoined(node_id="n3", address="127.0.0.1", gpu_count=0, epoch=1))
    placed = await fleet.record("e")
    assert placed.node == "n3" and placed.state == EngineState.STARTING


async def test_a_node_back_within_its_grace_keeps_its_engines(fleet: Fleet) -> None:
    await fleet.node("n1")
    await running_on_n1(fleet)
    await fleet.node("n2")
    await fleet.redis.delete(fleet.keys.node_alive("n1"))
    await fleet.scheduler.tick()  # lost: its engines would move when the grace ends
    await fleet.node("n1")  # ... but the agent came back first
    await fleet.scheduler.tick()
    await fleet.scheduler.fire_timers(now=time.time() + 0.01)
    await fleet.scheduler.run(until_idle=True)
    record = await fleet.record("e")
    assert record.node == "n1" and record.state == EngineState.RUNNING
    assert [n.status for n, _alive in await fleet.store.list_nodes() if n.node_id == "n1"] == ["up"]


async def test_an_adopted_copy_that_lives_elsewhere_now_is_stopped(fleet: Fleet) -> None:
    await fleet.node("n1")
    await running_on_n1(fleet)
    original = await fleet.record("e")
    await fleet.node("n2", address="127.0.0.2")
    await lose(fleet, "n1")
    moved = await fleet.record("e")
    await fleet.event(EngineReady(engine_id="e", node="n2", generation=2, url="http://n2"))
    await back(fleet, "n1")
    await fleet.event(reported(original))  # the replacement serves: the first copy serving wins
    assert (await fleet.commands("n1"))[-1] == TerminateEngine(engine_id="e", generation=1)
    kept = await fleet.record("e")
    assert (kept.node, kept.generation, kept.state) == ("n2", moved.generation, EngineState.RUNNING)


async def test_a_node_back_after_its_engines_moved_keeps_those_not_yet_serving_elsewhere(
    fleet: Fleet,
) -> None:
    await fleet.node("n1")
    await running_on_n1(fleet)
    original = await fleet.record("e")
    await fleet.node("n2", address="127.0.0.2")
    await lose(fleet, "n1")
    replacement = await fleet.record("e")
    assert (replacement.node, replacement.state) == ("n2", EngineState.STARTING)
    await back(fleet, "n1")
    assert not [
        c for c in await fleet.commands("n1") if isinstance(c, LaunchEngine | TerminateEngine)
    ][1:]
    await fleet.event(reported(original, pid=77))
    kept = await fleet.record("e")
    assert (kept.node, kept.generation, kept.pid, kept.port, kept.state) == (
        "n1",
        1,
        77,
        original.port,
        EngineState.RUNNING,
    )
    assert kept.spent_generation == 2 and kept.lost_node is None
    assert await fleet.store.ports_in_use("n1") == {original.port: "e"}
    assert await fleet.store.ports_in_use("n2") == {}  # the replacement's port, given back
    withdrawn = (await fleet.commands("n2"))[-1]
    assert withdrawn == TerminateEngine(engine_id="e", generation=2)
    assert "engine.restored" in await fleet.events.types("e")
    await fleet.event(EngineReady(engine_id="e", node="n2", generation=2, url="http://n2"))
    assert (await fleet.record("e")).node == "n1"  # the withdrawn copy's late news changes nothing


async def test_with_no_capacity_the_node_back_takes_its_engine_back_as_it_is(fleet: Fleet) -> None:
    await fleet.node("n1")
    await running_on_n1(fleet)
    original = await fleet.record("e")
    await lose(fleet, "n1")
    assert (await fleet.record("e")).state == EngineState.PENDING
    await back(fleet, "n1")
    assert not [c for c in await fleet.commands("n1") if isinstance(c, LaunchEngine)][1:]
    await fleet.event(reported(original))
    kept = await fleet.record("e")
    assert (kept.node, kept.generation, kept.state) == ("n1", 1, EngineState.RUNNING)
    await fleet.scheduler.fire_timers(now=time.time() + SETTLE_S + 1)
    await fleet.scheduler.run(until_idle=True)  # settling finds nothing left to place
    assert len([c for c in await fleet.commands("n1") if isinstance(c, LaunchEngine)]) == 1


async def test_what_the_node_back_does_not_report_is_placed_anew(fleet: Fleet) -> None:
    await fleet.node("n1")
    await running_on_n1(fleet)
    await fleet.node("n2", address="127.0.0.2")
    await fleet.request(StartEngine(engine_id="f", model="demo", backend="fake", use_gpu=False,
                                    node="n1"))  # fmt: skip
    await fleet.redis.delete(fleet.keys.node_alive("n2"))  # n2 gone for good: no room elsewhere
    await fleet.scheduler.tick()
    await lose(fleet, "n1")
    await back(fleet, "n1")
    assert {(await fleet.record(e)).state for e in "ef"} == {EngineState.PENDING}
    await fleet.event(  # e died while n1 was away: placed at once
        EngineExited(engine_id="e", node="n1", generation=1, returncode=None, reason="gone")
    )
    assert (await fleet.record("e")).state == EngineState.STARTING
    assert (await fleet.record("f")).state == EngineState.PENDING  # not reported yet: waits
    await fleet.scheduler.fire_timers(now=time.time() + SETTLE_S + 1)
    await fleet.scheduler.run(until_idle=True)
    assert (await fleet.record("f")).state == EngineState.STARTING


async def two_copies_reported_after_redis_lost_the_record(fleet: Fleet, newest_first: bool) -> None:
    """``e`` ran on n1 (generation 1), moved to n2 (generation 2) while n1 was cut off; then
    Redis lost everything, and both agents report what they run."""
    await fleet.node("n1", "1x24GiB")
    await fleet.node("n2", "1x24GiB", address="127.0.0.2")
    await fleet.request(StartEngine(engine_id="e", model="demo", backend="fake", use_gpu=True))
    launched = await fleet.record("e")
    assert launched.node in ("n1", "n2")
    url = f"http://127.0.0.2:{launched.port}"
    old = launched.model_copy(update={"node": "n1", "host": "127.0.0.1", "generation": 1})
    new = launched.model_copy(
        update={"node": "n2", "host": "127.0.0.2", "url": url, "generation": 2}
    )
    await fleet.redis.delete(fleet.keys.engine("e"), *await fleet.redis.keys("*:ports"))
    await fleet.redis.delete(*await fleet.redis.keys("*:reservations"))
    reports = [
        EngineAdopted(engine_id="e", node="n1", generation=1, pid=11, record=old.public()),
        EngineAdopted(engine_id="e", node="n2", generation=2, pid=22, record=new.public()),
    ]
    for report in reversed(reports) if newest_first else reports:
        await fleet.event(report)


async def test_after_redis_lost_a_record_the_newest_reported_copy_is_kept_either_order(
    fleet: Fleet,
) -> None:
    for newest_first in (False, True):
        await fleet.redis.flushdb()
        await two_copies_reported_after_redis_lost_the_record(fleet, newest_first)
        kept = await fleet.record("e")
        assert (kept.node, kept.generation, kept.pid, kept.state) == (
            "n2",
            2,
            22,
            EngineState.STARTING,
        )
        assert kept.gpus == [0] and kept.url == f"http://127.0.0.2:{kept.port}"
        assert await fleet.store.ports_in_use("n2") == {kept.port: "e"}
        assert await fleet.store.ports_in_use("n1") == {}
        assert list(await fleet.store.reservations("n2")) == ["e"]
        assert await fleet.store.reservations("n1") == {}
        stale = (await fleet.commands("n1"))[-1]
        assert stale == TerminateEngine(engine_id="e", generation=1, epoch=0)
        await fleet.event(EngineReady(engine_id="e", node="n2", generation=2, url=kept.url))
        assert (await fleet.record("e")).state == EngineState.RUNNING


async def test_a_storm_of_joins_looks_for_waiting_engines_once(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every agent registering again (Redis came back empty) sends node.joined at once: the
    engines waiting for capacity are found by one scan of every record, not one per node, and
    still placed when a node with room joins; one left waiting after the scan is seen too."""
    store = fleet.scheduler.ctx.store
    scans = 0
    scan = store.engine_placements

    async def counted() -> dict[str, tuple[str, str | None]]:
        nonlocal scans
        scans += 1
        return await scan()

    monkeypatch.setattr(store, "engine_placements", counted)
    await fleet.node("n1", "1x24GiB")
    big = dict(model="big", use_gpu=True, required_memory_gb=20.0)
    await fleet.request(StartEngine(engine_id="big", **big))
    assert (await fleet.record("big")).node == "n1"
    await lose(fleet, "n1")  # no other GPU: it waits
    assert (await fleet.record("big")).state == EngineState.PENDING
    scans = 0
    storm = [f"cpu{i}" for i in range(30)]
    for node_id in storm:
        await fleet.node(node_id)
    joined = [NodeJoined(node_id=n, address="127.0.0.1", gpu_count=0, epoch=1) for n in storm]
    await fleet.event(*joined)
    assert scans == 1 and (await fleet.record("big")).state == EngineState.PENDING
    await fleet.node("n3", "1x24GiB")
    await fleet.request(StartEngine(engine_id="big2", **big))
    await lose(fleet, "n3")  # a second one waits, after the scan: the next join looks again
    await fleet.node("g1", "2x24GiB", address="127.0.0.9")
    scans = 0
    await fleet.event(NodeJoined(node_id="g1", address="127.0.0.9", gpu_count=2, epoch=1))
    assert [(await fleet.record(e)).node for e in ("big", "big2")] == ["g1", "g1"]
    assert scans == 1
