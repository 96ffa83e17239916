"""Deployments as records: what a deployment may be, and how it sits in Redis (a hash per
deployment, readable in redis-cli, and the set of names), on a real Redis."""

from __future__ import annotations

import json

import pytest

from sage_mq.connection import Redis
from sage_mq.deployments import Autoscale, Deployment, default_name
from sage_mq.errors import InvalidRequest
from sage_mq.keys import Keys
from sage_mq.settings import Settings
from sage_mq.spec import EngineSpec
from sage_mq.store import Store

CHAT = EngineSpec(model="Qwen/Qwen2.5-1.5B-Instruct", served_model_name="qwen", env={"K": "v"})


def test_a_deployment_is_named_as_its_engines_ids_can_be() -> None:
    ranged = Autoscale(min_replicas=0, max_replicas=4, target_in_flight=8)
    deployment = Deployment.of("qwen", CHAT, ranged)
    assert deployment.autoscale == ranged and deployment.served_name == "qwen"
    assert deployment.replica_id(3) == "qwen-3"
    for bad in ("", "-x", "a/b", "a:b", "x" * 121, "héllo"):
        with pytest.raises(InvalidRequest, match="not a valid deployment name"):
            Deployment.of(bad, CHAT, ranged)


def test_the_default_name_is_the_served_name_or_the_models_last_part() -> None:
    assert default_name(CHAT) == "qwen"
    assert default_name(EngineSpec(model="BAAI/bge-m3")) == "bge-m3"
    assert default_name(EngineSpec(model="/models/gemma 3.gguf")) == "gemma-3.gguf"
    assert default_name(EngineSpec(model="///")) == "deployment"


def test_replicas_cannot_share_one_asked_for_port() -> None:
    pinned = EngineSpec(model="m", port=41000)
    assert Deployment.of("one", pinned, Autoscale.fixed(1)).spec.port == 41000
    with pytest.raises(InvalidRequest, match="cannot ask for a port"):
        Deployment.of("two", pinned, Autoscale.fixed(2))


@pytest.mark.parametrize(("replicas", "low", "high"), [(0, 0, 1), (1, 1, 1), (5, 5, 5)])
def test_a_fixed_count_is_a_range_of_one(replicas: int, low: int, high: int) -> None:
    fixed = Autoscale.fixed(replicas)
    assert (fixed.min_replicas, fixed.max_replicas) == (low, high)


async def test_deployments_are_hashes_readable_in_redis_cli(
    settings: Settings, aredis: Redis
) -> None:
    keys = Keys(settings.namespace)
    store = Store(aredis, keys)
    wide = Deployment.of("qwen", CHAT, Autoscale(min_replicas=1, max_replicas=4))
    await store.put_deployment(wide)
    await store.put_deployment(Deployment.of("embed", EngineSpec(model="m"), Autoscale()))
    raw = await aredis.hgetall(keys.deployment("qwen"))
    assert raw["name"] == "qwen" and raw["min_replicas"] == "1" and raw["max_replicas"] == "4"
    assert json.loads(raw["spec"])["served_model_name"] == "qwen"
    assert await store.get_deployment("qwen") == wide
    assert [d.name for d in await store.list_deployments()] == ["embed", "qwen"]
    narrow = wide.model_copy(update={"max_replicas": 2})
    await store.put_deployment(narrow)
    assert (await store.get_deployment("qwen")) == narrow
    assert await store.delete_deployment("qwen") is True
    assert await store.delete_deployment("qwen") is False
    assert await store.get_deployment("qwen") is None
    assert await aredis.smembers(keys.deployments) == {"embed"}
