"""UnifiedInferenceClient through a gateway and straight from Redis, with real processes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from sage_mq import UnifiedInferenceClient
from sage_mq.errors import ConfigError, InvalidRequest, ModelNotFound
from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.gateway import run_gateway, start, wait_for
from tests.helpers.servers import Processes, RedisServer

pytestmark = pytest.mark.fleet


def test_create_is_the_only_way_in() -> None:
    with pytest.raises(TypeError, match=r"create\("):
        UnifiedInferenceClient()
    for gone in ("create_auto", "create_with_control_plane"):
        assert not hasattr(UnifiedInferenceClient, gone)
    with pytest.raises(ConfigError, match="round_robin"):
        UnifiedInferenceClient.create(scheduling_policy="fastest")
    with pytest.raises(ConfigError, match="neither"):
        UnifiedInferenceClient.create(control_plane_url="ftp://x")


@pytest.fixture
def fleet_with_gateway(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[FleetProcs, str, list[dict[str, object]]]]:
    fleet, url = run_gateway(processes, redis_server, tmp_path)
    demos = [start(fleet, "demo"), start(fleet, "demo")]
    start(fleet, "mini-embed", "--engine-kind", "embedding")
    yield fleet, url, demos


@pytest.mark.parametrize("through", ["gateway", "redis"])
def test_chat_stream_generate_embed_and_models(
    fleet_with_gateway: tuple[FleetProcs, str, list[dict[str, object]]], through: str
) -> None:
    fleet, url, _demos = fleet_with_gateway
    target = f"{url}/v1" if through == "gateway" else fleet.env["SAGE_MQ_REDIS_URL"]
    namespace = fleet.env["SAGE_MQ_NAMESPACE"]
    with UnifiedInferenceClient.create(control_plane_url=target, namespace=namespace) as client:
        wait_for(lambda: client.models() == ["demo", "mini-embed"])
        assert client.chat("hello", model="demo") == "[demo] You said: hello"
        pieces = list(client.chat_stream([{"role": "user", "content": "hi there"}], model="demo"))
        assert len(pieces) > 1 and "".join(pieces) == "[demo] You said: hi there"
        assert client.generate("once upon", model="demo")
        vectors = client.embed(["a", "b", "c"], model="mini-embed")
        assert [len(v) for v in vectors] == [384] * 3 and vectors[0] != vectors[1]
        with pytest.raises(ModelNotFound, match="models being served: demo, mini-embed"):
            client.chat("x", model="gpt-5")
        with pytest.raises(InvalidRequest, match="say which model"):
            client.chat("x")


def test_straight_from_redis_a_dead_replica_costs_no_request(
    fleet_with_gateway: tuple[FleetProcs, str, list[dict[str, object]]],
) -> None:
    fleet, _url, demos = fleet_with_gateway
    client = UnifiedInferenceClient.create(
        control_plane_url=fleet.env["SAGE_MQ_REDIS_URL"],
        namespace=fleet.env["SAGE_MQ_NAMESPACE"],
        default_llm_model="demo",
        scheduling_policy="round_robin",
    )
    try:
        wait_for(lambda: "demo" in client.models())
        os.killpg(int(str(demos[0]["pid"])), signal.SIGKILL)
        for i in range(6):  # each call that meets the dead one moves on to the other
            assert client.chat(f"n{i}") == f"[demo] You said: n{i}"
    finally:
        client.close()
    client.close()  # twice is fine
