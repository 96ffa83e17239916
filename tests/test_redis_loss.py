"""Redis comes back empty (restarted without its append-only file): nothing restarts.

Whole fleet, real processes: the agent registers again, reports its engines with the records they
were launched with, the scheduler rebuilds their records, ports and GPU reservations, and the
engines that ran go on running with the same processes; a new leader's commands are obeyed.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from sage_mq.keys import Keys
from tests.helpers.engines import engine_processes
from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.servers import Processes, RedisServer

pytestmark = pytest.mark.fleet


@pytest.fixture
def fleet(processes: Processes, private_redis: RedisServer, tmp_path: Path) -> FleetProcs:
    """An agent (engines are killed by conftest's ``no_leaked_engines``); the test starts the
    schedulers."""
    fleet = FleetProcs(processes, private_redis, tmp_path / "state")
    fleet.start_agent()
    fleet.wait_node()
    return fleet


def records(fleet: FleetProcs) -> dict[str, dict[str, Any]]:
    return {r["engine_id"]: r for r in fleet.json("llm", "engine", "list")}


def wait_records(
    fleet: FleetProcs, ids: set[str], state: str, timeout: float = 30
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = records(fleet)
        if set(found) >= ids and all(found[i]["state"] == state for i in ids):
            return found
        assert time.monotonic() < deadline, f"never all {state}: {found}"
        time.sleep(0.2)


def test_engines_that_run_when_redis_comes_back_empty_are_adopted_not_restarted(
    fleet: FleetProcs, private_redis: RedisServer
) -> None:
    first = fleet.start_scheduler()
    start = ("llm", "engine", "start")
    llm = fleet.json(*start, "demo", "--backend", "fake", "--wait", "--required-memory-gb", "3")
    fleet.start_scheduler(name="standby")
    first.send_signal(signal.SIGTERM)  # the standby leads at epoch 2: above what comes after
    emb = fleet.json(*start, "mini", "--engine-kind", "embedding", "--backend", "fake", "--wait")
    before = records(fleet)
    pids = {p.pid for p in engine_processes(fleet.state)}
    assert {r["pid"] for r in before.values()} == pids and len(pids) == 2

    private_redis.kill()
    private_redis.start()  # empty: no records, streams, leases, ports or reservations

    after = wait_records(fleet, {llm["engine_id"], emb["engine_id"]}, "RUNNING")
    assert {p.pid for p in engine_processes(fleet.state)} == pids  # the same processes
    for engine_id, was in before.items():
        now = after[engine_id]
        for name in ("pid", "node", "port", "url", "gpus", "generation", "model", "kind"):
            assert now[name] == was[name], (name, now, was)
        for name in ("required_memory_gb", "memory_gb", "created_at", "restarts"):
            assert now[name] == was[name], (name, now, was)
    keys = Keys(fleet.env["SAGE_MQ_NAMESPACE"])
    client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        ports = client.hgetall(keys.node_ports("n1"))
        held = client.hgetall(keys.node_reservations("n1"))
    finally:
        client.close()
    assert ports == {str(r["port"]): r["engine_id"] for r in before.values()}
    assert set(held) == {llm["engine_id"]}  # the LLM holds GPU 0; the embedding engine none
    assert json.loads(held[llm["engine_id"]]) == {"gpus": [0], "memory_gb": 3.0}
    types = [e.type for e in fleet.events(llm["engine_id"])]
    assert "engine.starting" not in types  # nothing relaunched
    assert "engine.adopted" in types and "engine.restored" in types
    reply = httpx.post(
        f"{llm['url']}/v1/chat/completions",
        json={"model": "demo", "messages": [{"role": "user", "content": "still there?"}]},
    )
    assert reply.status_code == 200

    # A new leader (its epoch counted again from 1) is obeyed, and placement sees what is held.
    third = fleet.json("llm", "engine", "start", "demo", "--backend", "fake", "--wait")
    assert third["state"] == "RUNNING"
    assert third["port"] not in {r["port"] for r in before.values()}
    assert len(engine_processes(fleet.state)) == 3
    assert "Redis lost its history" in fleet.procs.log("agent-n1")
