"""The scheduler's in-memory fleet picture against a real Redis: it follows what changes."""

from __future__ import annotations

import asyncio
import time

from sage_mq.connection import Redis
from sage_mq.gpu import FakeGpus
from sage_mq.keys import Keys
from sage_mq.scheduler.fleet import FOREIGN_TTL_S, FleetView
from sage_mq.settings import Settings
from sage_mq.store import NodeRecord, Reservation, Store


async def register(store: Store, node_id: str, gpus: str = "2x24GiB", epoch: int = 1) -> None:
    inventory = FakeGpus(gpus).snapshot()
    record = NodeRecord(node_id=node_id, address="127.0.0.1", gpus=inventory, epoch=epoch)
    await store.put_node(record, 60)


async def one_node_looked_at(aredis: Redis, settings: Settings) -> tuple[Store, FleetView]:
    """A store, and a fleet picture that has seen its one node ``a``."""
    store = Store(aredis, Keys(settings.namespace))
    view = FleetView(store)
    await register(store, "a")
    await view.look()
    return store, view


async def test_each_look_notices_joins_deaths_and_restarted_agents(
    aredis: Redis, settings: Settings
) -> None:
    store = Store(aredis, Keys(settings.namespace))
    view = FleetView(store)
    await register(store, "a")
    assert [r.node_id for r, alive in await view.look() if alive] == ["a"]
    await register(store, "b")
    assert [r.node_id for r, alive in await view.look() if alive] == ["a", "b"]
    await aredis.delete(Keys(settings.namespace).node_alive("a"))
    assert [(r.node_id, alive) for r, alive in await view.look()] == [("a", False), ("b", True)]
    assert [n.node_id for n in await view.live()] == ["b"]
    await register(store, "b", gpus="4x24GiB", epoch=2)  # the agent restarted with more GPUs
    await view.look()
    assert [len(n.gpus) for n in await view.live()] == [4]


async def test_usage_written_behind_its_back_is_seen_within_thirty_looks(
    aredis: Redis, settings: Settings
) -> None:
    store = Store(aredis, Keys(settings.namespace))
    view = FleetView(store)
    for i in range(60):
        await register(store, f"n{i:02d}")
    await view.look()
    await store.reserve_gpus("n42", "elsewhere", Reservation(gpus=[0], memory_gb=20))
    for _ in range(30):
        await view.look()
    (n42,) = [n for n in await view.live() if n.node_id == "n42"]
    assert n42.gpus[0].reserved_gb == 20 and n42.engines == 1


async def test_its_own_writes_show_at_once_and_a_lost_port_race_reads_the_node_again(
    aredis: Redis, settings: Settings
) -> None:
    store, view = await one_node_looked_at(aredis, settings)
    await view.reserve_gpus("a", "e1", Reservation(gpus=[1], memory_gb=10))
    assert await view.assign_port("a", 40000, "e1")
    (node,) = await view.live()
    assert node.gpus[1].reserved_gb == 10 and node.ports_in_use == {40000}
    await store.assign_port("a", 40001, "someone-else")
    assert not await view.assign_port("a", 40001, "e2")
    (node,) = await view.live()
    assert node.ports_in_use == {40000, 40001}
    await view.release("a", "e1", 40000)
    (node,) = await view.live()
    assert node.gpus[1].reserved_gb == 0 and node.ports_in_use == {40001}
    assert await store.ports_in_use("a") == {40001: "someone-else"}


async def test_a_port_held_by_another_process_is_free_again_when_its_time_is_up(
    aredis: Redis, settings: Settings
) -> None:
    _store, view = await one_node_looked_at(aredis, settings)
    view.mark_foreign("a", 40000, now=time.monotonic() - FOREIGN_TTL_S + 0.2)
    (node,) = await view.live()
    assert 40000 in node.ports_in_use
    assert 40000 in (await view.live())[0].ports_in_use  # asked again: the same picture
    await asyncio.sleep(0.3)
    (node,) = await view.live()
    assert 40000 not in node.ports_in_use


async def test_a_placement_makes_only_its_node_s_view_again_in_the_same_order(
    aredis: Redis, settings: Settings
) -> None:
    store = Store(aredis, Keys(settings.namespace))
    view = FleetView(store)
    for node_id in ("a", "b", "c"):
        await register(store, node_id)
    await view.look()
    before = await view.live()
    await view.reserve_gpus("b", "e1", Reservation(gpus=[0], memory_gb=10))
    after = await view.live()
    assert [n.node_id for n in after] == ["a", "b", "c"]
    assert after[0] is before[0] and after[2] is before[2]  # untouched: not made again
    assert after[1].gpus[0].reserved_gb == 10
    await aredis.delete(Keys(settings.namespace).node_alive("a"))
    await view.look()
    await view.reserve_gpus("c", "e2", Reservation(gpus=[1], memory_gb=5))
    assert [(n.node_id, n.gpus[1].reserved_gb) for n in await view.live()] == [("b", 0), ("c", 5)]
