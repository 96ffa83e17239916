"""The store on fakeredis (fast): contract fields, readable hashes, ports, reservations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest

from sage_mq.errors import DecodeError
from sage_mq.gpu import FakeGpus
from sage_mq.hashes import from_hash
from sage_mq.keys import Keys
from sage_mq.store import EngineRecord, EngineState, NodeRecord, Reservation, Store
from tests.helpers.engines import CONTRACT_FIELDS


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    redis: Any = fakeredis.FakeAsyncRedis(decode_responses=True)
    yield Store(redis, Keys("sage"))
    await redis.aclose()


async def test_an_engine_record_is_a_readable_hash_with_every_contract_field(store: Store) -> None:
    record = EngineRecord(
        engine_id="e1",
        model="Qwen/Qwen2.5-1.5B-Instruct",
        backend="vllm",
        state=EngineState.RUNNING,
        node="n1",
        host="10.0.0.1",
        port=40001,
        url="http://10.0.0.1:40001",
        gpus=[0, 1],
        argv=["python", "-m", "vllm"],
    )
    await store.put_engine(record)
    raw = await store.redis.hgetall("sage:engine:e1")
    assert set(raw) >= CONTRACT_FIELDS
    assert raw["state"] == "RUNNING" and raw["model"] == "Qwen/Qwen2.5-1.5B-Instruct"
    assert raw["gpus"] == "[0, 1]" and raw["port"] == "40001" and raw["use_gpu"] == "null"
    assert raw["last_error"] == "" and raw["pid"] == "null"
    assert await store.redis.smembers("sage:engines") == {"e1"}
    assert await store.get_engine("e1") == record
    assert set(record.public()) >= CONTRACT_FIELDS


async def test_update_changes_only_the_named_fields_and_the_time(store: Store) -> None:
    await store.put_engine(EngineRecord(engine_id="e1", model="m", updated_at=1.0))
    updated = await store.update_engine("e1", state=EngineState.FAILED, last_error="boom")
    assert updated is not None and updated.updated_at > 1.0
    again = await store.get_engine("e1")
    assert again is not None and again.state == EngineState.FAILED and again.last_error == "boom"
    assert await store.update_engine("nope", state=EngineState.FAILED) is None
    with pytest.raises(ValueError):
        await store.update_engine("e1", state="EXPLODED")


async def test_engines_list_oldest_first(store: Store) -> None:
    for i, created in enumerate((3.0, 1.0, 2.0)):
        await store.put_engine(EngineRecord(engine_id=f"e{i}", model="m", created_at=created))
    assert [r.engine_id for r in await store.list_engines()] == ["e1", "e2", "e0"]


async def test_nodes_are_listed_with_liveness(store: Store) -> None:
    await store.put_node(
        NodeRecord(node_id="n1", address="a", gpus=FakeGpus("1x8GiB").snapshot()), 30
    )
    await store.put_node(NodeRecord(node_id="n2", address="b"), 30)
    await store.redis.delete("sage:node:n2:alive")
    listed = {n.node_id: (alive, len(n.gpus)) for n, alive in await store.list_nodes()}
    assert listed == {"n1": (True, 1), "n2": (False, 0)}
    assert await store.next_epoch("n1") == 1


async def test_a_port_belongs_to_one_engine_and_only_it_gives_it_back(store: Store) -> None:
    assert await store.assign_port("n1", 40000, "a")
    assert await store.assign_port("n1", 40000, "a")  # idempotent for its owner
    assert not await store.assign_port("n1", 40000, "b")
    await store.release_port("n1", 40000, "b")
    assert await store.ports_in_use("n1") == {40000: "a"}
    await store.release_port("n1", 40000, "a")
    assert await store.ports_in_use("n1") == {}


async def test_gpu_reservations_per_engine(store: Store) -> None:
    await store.reserve_gpus("n1", "a", Reservation(gpus=[0, 1], memory_gb=20))
    await store.reserve_gpus("n1", "b", Reservation(gpus=[1], memory_gb=2))
    assert (await store.reservations("n1"))["b"].gpus == [1]
    await store.release_gpus("n1", "a")
    assert set(await store.reservations("n1")) == {"b"}


def test_a_hash_that_is_not_ours_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="not JSON"):
        from_hash(EngineRecord, {"engine_id": "e", "model": "m", "port": "forty"})
    with pytest.raises(DecodeError, match="bad EngineRecord"):
        from_hash(EngineRecord, {"engine_id": "e", "model": "m", "state": "EXPLODED"})
