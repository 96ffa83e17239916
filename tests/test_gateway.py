"""The gateway with real processes and the real OpenAI SDK: routing, streaming, failures."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.servers import Processes, RedisServer, free_port

pytestmark = pytest.mark.fleet


def run_gateway(
    processes: Processes, redis_server: RedisServer, tmp_path: Path, *args: str
) -> tuple[FleetProcs, str]:
    fleet = FleetProcs(processes, redis_server, tmp_path / "state")
    fleet.start_scheduler("--backoff-base", "0.2", "--health-interval", "0.5")
    fleet.start_agent()
    fleet.wait_node()
    port = free_port()
    processes.sage("gateway", ["llm", "gateway", "run", "--port", str(port), *args], fleet.env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    return fleet, url


@pytest.fixture
def gateway(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[FleetProcs, str]]:
    yield run_gateway(processes, redis_server, tmp_path)


def start(fleet: FleetProcs, model: str, *args: str) -> dict[str, object]:
    record: dict[str, object] = fleet.json(
        "llm", "engine", "start", model, "--backend", "fake", "--no-gpu", "--wait", *args
    )
    return record


def models(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=5).json()["data"]]


def wait_for(check: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition never held")


def test_the_openai_sdk_works_unchanged_and_requests_spread_over_replicas(
    gateway: tuple[FleetProcs, str],
) -> None:
    fleet, url = gateway
    replicas = {start(fleet, "demo", "--extra-args", "--latency-ms 30")["engine_id"] for _ in "ab"}
    start(fleet, "mini-embed", "--engine-kind", "embedding")
    wait_for(lambda: set(models(url)) == {"demo", "mini-embed"})
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    answer = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hello"}]
    )
    assert answer.choices[0].message.content == "[demo] You said: hello"
    chunks = list(
        client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hello"}], stream=True
        )
    )
    assert len(chunks) > 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "[demo] You said: hello"
    vectors = client.embeddings.create(model="mini-embed", input=["a", "b"])
    assert [len(v.embedding) for v in vectors.data] == [384, 384]

    def served_by(_: int) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=[{"role": "user", "content": "x"}]
        )
        return str(raw.headers["x-sage-engine"])

    with ThreadPoolExecutor(8) as pool:  # concurrent requests spread by requests in flight
        served = Counter(pool.map(served_by, range(40)))
    assert set(served) == replicas and min(served.values()) >= 8
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
    assert "models being served: demo, mini-embed" in str(err.value)


def test_a_dead_replica_costs_no_request_and_a_stopped_one_leaves_rotation(
    gateway: tuple[FleetProcs, str],
) -> None:
    fleet, url = gateway
    first, second = start(fleet, "demo"), start(fleet, "demo")
    wait_for(lambda: models(url) == ["demo"])
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    os.killpg(int(str(first["pid"])), signal.SIGKILL)  # still in rotation for a moment
    for _ in range(10):  # each request that meets the dead one goes on to the other
        answer = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "still here?"}]
        )
        assert answer.choices[0].message.content == "[demo] You said: still here?"
    fleet.cli("llm", "engine", "stop", str(second["engine_id"]))
    fleet.wait_event("engine.ready", str(first["engine_id"]), count=2)  # restarted by then
    wait_for(lambda: models(url) == ["demo"])
    for _ in range(5):
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=[{"role": "user", "content": "x"}]
        )
        assert raw.headers["x-sage-engine"] == first["engine_id"]
    fleet.cli("llm", "engine", "stop", str(first["engine_id"]))
    wait_for(lambda: models(url) == [])
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 503 and "no replica of 'demo' is RUNNING" in str(err.value)
