"""Self-healing, real processes and signals: restarts, backoff, FAILED, hangs, slow starts."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sage_mq.agent.processes import marked as processes_marked
from tests.helpers.engines import engine_processes
from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.servers import Processes, RedisServer

pytestmark = pytest.mark.fleet
FAST = ("--health-interval", "0.3", "--probe-timeout", "0.5", "--backoff-base", "0.2")


def make_fleet(processes: Processes, redis: RedisServer, tmp_path: Path, *args: str) -> FleetProcs:
    fleet = FleetProcs(processes, redis, tmp_path / "state")
    fleet.start_scheduler(*args)
    fleet.start_agent()
    fleet.wait_node()
    return fleet


@pytest.fixture
def fast_fleet(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> Iterator[FleetProcs]:
    yield make_fleet(processes, redis_server, tmp_path, *FAST)


@pytest.fixture
def default_fleet(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> Iterator[FleetProcs]:
    yield make_fleet(processes, redis_server, tmp_path)


def test_kill_9_of_an_engine_brings_it_back_as_itself(default_fleet: FleetProcs) -> None:
    fleet = default_fleet
    before = fleet.json("llm", "engine", "start", "demo", "--backend", "fake", "--wait")
    os.killpg(before["pid"], signal.SIGKILL)
    exited = fleet.wait_event("engine.exited", before["engine_id"])
    ready = fleet.wait_event("engine.ready", before["engine_id"], count=2)
    after = fleet.wait_state("RUNNING")
    assert after["restarts"] == 1
    for field in ("engine_id", "node", "port", "url", "gpus", "argv", "extra_args", "use_gpu"):
        assert after[field] == before[field], field
    assert after["pid"] != before["pid"] and after["generation"] == 2
    assert [p.pid for p in engine_processes(fleet.state)] == [after["pid"]]
    assert ready.ts - exited.ts >= 1.0  # the 1 s backoff of attempt 1


def test_a_crash_loop_waits_1_2_4_s_then_fails_and_frees_its_gpus(
    default_fleet: FleetProcs,
) -> None:
    fleet = default_fleet
    record = fleet.json(
        "llm",
        "engine",
        "start",
        "crashy",
        "--backend",
        "fake",
        "-tp",
        "2",
        "--required-memory-gb",
        "40",
        "--extra-args",
        "--crash-after 0.5",
        "--wait",
    )
    failed = fleet.wait_event("engine.failed", record["engine_id"], timeout=40)
    events = fleet.events(record["engine_id"])
    delays = [e.payload.model_dump()["delay_s"] for e in events if e.type == "engine.restarting"]
    assert delays == [1.0, 2.0, 4.0]
    exits = [e.ts for e in events if e.type == "engine.exited"]
    starts = [e.ts for e in events if e.type == "engine.starting"]
    waited = [round(start - exit_, 1) for exit_, start in zip(exits, starts[1:], strict=False)]
    assert all(abs(w - d) <= 0.3 for w, d in zip(waited, delays, strict=True)), waited
    assert "gave up after 3 restart attempt(s)" in failed.payload.model_dump()["reason"]
    (final,) = fleet.json("llm", "engine", "list")
    assert final["state"] == "FAILED" and final["restarts"] == 3 and final["gpus"] == []
    assert engine_processes(fleet.state) == []
    again = fleet.json(
        "llm",
        "engine",
        "start",
        "big",
        "--backend",
        "fake",
        "-tp",
        "2",
        "--required-memory-gb",
        "40",
        "--wait",
    )
    assert again["gpus"] == [0, 1]


def test_a_hung_engine_is_found_by_probes_and_replaced(fast_fleet: FleetProcs) -> None:
    fleet = fast_fleet
    record = fleet.json(
        "llm",
        "engine",
        "start",
        "demo",
        "--backend",
        "fake",
        "--wait",
        "--extra-args",
        "--hang-after 1.5",
    )
    unhealthy = fleet.wait_event("engine.unhealthy", record["engine_id"])
    assert "3 consecutive health probes" in unhealthy.payload.model_dump()["reason"]
    # Three failed probes: about threshold x interval (0.3 s) plus one timeout (0.5 s); the bound
    # allows threshold x timeout, plus a timeout and 1 s of slack for a loaded machine.
    hung_at = fleet.wait_event("engine.ready", record["engine_id"]).ts + 1.5
    assert unhealthy.ts - hung_at < 3 * 0.5 + 0.5 + 1.0
    fleet.wait_event("engine.starting", record["engine_id"], count=2)
    (proc,) = engine_processes(fleet.state)  # the hung one was killed before the relaunch
    assert proc.pid != record["pid"]


def test_a_slow_starter_is_not_restarted(fast_fleet: FleetProcs) -> None:
    fleet = fast_fleet
    record = fleet.json(
        "llm",
        "engine",
        "start",
        "demo",
        "--backend",
        "fake",
        "--wait",
        "--extra-args",
        "--startup-delay 3",
    )
    assert record["state"] == "RUNNING" and record["restarts"] == 0
    types = [e.type for e in fleet.events(record["engine_id"])]
    assert types.count("engine.starting") == 1 and "engine.restarting" not in types
    assert len(engine_processes(fleet.state)) == 1


def test_killing_the_leader_mid_backoff_leaves_the_restart_to_the_standby(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> None:
    fleet = FleetProcs(processes, redis_server, tmp_path / "state")
    leader = fleet.start_scheduler(
        "--lease-ttl", "1", "--backoff-base", "3", "--name", "s1", name="s1"
    )
    fleet.start_agent()
    fleet.wait_node()
    record = fleet.json("llm", "engine", "start", "demo", "--backend", "fake", "--wait")
    fleet.start_scheduler("--lease-ttl", "1", "--backoff-base", "3", "--name", "s2", name="s2")
    os.killpg(record["pid"], signal.SIGKILL)
    fleet.wait_event("engine.restarting", record["engine_id"])  # s1 decided: relaunch in 3 s
    os.killpg(leader.pid, signal.SIGKILL)
    ready = fleet.wait_event("engine.ready", record["engine_id"], count=2, timeout=20)
    elected = [e for e in fleet.events() if e.type == "scheduler.elected"]
    assert [e.payload.model_dump()["name"] for e in elected] == ["s1", "s2"]
    after = fleet.wait_state("RUNNING")
    assert after["port"] == record["port"]
    assert len(engine_processes(fleet.state)) == 1
    assert ready.ts > elected[1].ts


def test_pending_restarts_survive_every_scheduler_dying(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> None:
    fleet = FleetProcs(processes, redis_server, tmp_path / "state")
    scheduler = fleet.start_scheduler("--lease-ttl", "1", "--backoff-base", "2", name="s1")
    fleet.start_agent()
    fleet.wait_node()
    record = fleet.json("llm", "engine", "start", "demo", "--backend", "fake", "--wait")
    os.killpg(record["pid"], signal.SIGKILL)
    fleet.wait_event("engine.restarting", record["engine_id"])
    os.killpg(scheduler.pid, signal.SIGKILL)  # no scheduler at all now
    assert fleet.json("llm", "engine", "list")[0]["state"] == "RESTARTING"
    fleet.start_scheduler("--lease-ttl", "1", name="s-later")
    fleet.wait_event("engine.ready", record["engine_id"], count=2, timeout=20)
    assert fleet.json("llm", "engine", "list")[0]["restarts"] == 1


def test_a_lost_node_moves_its_engines_and_a_returning_one_keeps_no_duplicate(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> None:
    fleet = FleetProcs(processes, redis_server, tmp_path / "state")
    fleet.start_scheduler(*FAST, "--node-lost-grace", "0")  # move at once (default: 60 s)
    fleet.start_agent("n1", "--liveness-ttl", "1")
    fleet.wait_node()
    fleet.start_agent("n2", "--liveness-ttl", "1", "--advertise-address", "127.0.0.2")
    fleet.wait_node(2)
    record = fleet.json("llm", "engine", "start", "demo", "--backend", "fake", "--no-gpu", "--wait")
    assert record["node"] == "n1"  # CPU engines go where fewest run; ties by node id
    assert fleet.agent is not None
    os.killpg(fleet.agent.pid, signal.SIGKILL)  # the host is cut off; its engine keeps running
    lost = fleet.wait_event("engine.ready", record["engine_id"], count=2, timeout=20)
    moved = fleet.wait_state("RUNNING")
    assert moved["node"] == "n2" and moved["generation"] == 2
    assert moved["url"].startswith("http://127.0.0.2:") and lost.ts > 0
    assert "node.lost" in [e.type for e in fleet.events()]
    assert len(engine_processes(fleet.state)) == 2  # the cut-off copy still runs on n1
    fleet.start_agent("n1", "--liveness-ttl", "1")  # the host comes back
    deadline = time.monotonic() + 20
    while len(engine_processes(fleet.state)) != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    (survivor,) = engine_processes(fleet.state)
    assert survivor.pid == moved["pid"]
    assert fleet.json("llm", "engine", "list")[0]["node"] == "n2"


def test_an_agent_away_three_times_its_ttl_takes_no_engine_down(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> None:
    fleet = FleetProcs(processes, redis_server, tmp_path / "state")
    fleet.start_scheduler(*FAST)  # the default grace: a lost node's engines stay 60 s
    fleet.start_agent("n1", "--liveness-ttl", "1")
    fleet.wait_node()
    record = fleet.json("llm", "engine", "start", "demo", "--backend", "fake", "--no-gpu", "--wait")
    assert fleet.agent is not None
    os.killpg(fleet.agent.pid, signal.SIGKILL)  # restarted, upgraded, or crashed: away 3 s
    deadline = time.monotonic() + 10
    while "node.lost" not in [e.type for e in fleet.events()]:
        assert time.monotonic() < deadline, "the node was never declared lost"
        time.sleep(0.1)
    time.sleep(2)
    fleet.start_agent("n1", "--liveness-ttl", "1")
    fleet.wait_event("engine.adopted", record["engine_id"], timeout=20)
    kept = fleet.wait_state("RUNNING")
    assert (kept["pid"], kept["generation"], kept["node"]) == (record["pid"], 1, "n1")
    assert [p.pid for p in engine_processes(fleet.state)] == [record["pid"]]
    assert [e.type for e in fleet.events(record["engine_id"])].count("engine.starting") == 1


def test_an_engine_that_died_with_its_agent_away_leaves_no_process(
    default_fleet: FleetProcs,
) -> None:
    fleet = default_fleet
    record = fleet.json("llm", "engine", "start", "demo", "--backend", "fake", "--wait",
                        "--extra-args", "--child")  # fmt: skip
    mark = f"n1/{record['engine_id']}/1"
    assert len(processes_marked(mark)) == 2  # the engine and the worker it forked
    assert fleet.agent is not None
    os.killpg(fleet.agent.pid, signal.SIGKILL)
    os.kill(record["pid"], signal.SIGKILL)  # its worker, in a session of its own, lives on
    deadline = time.monotonic() + 5
    while len(processes_marked(mark)) != 1:  # a signal is delivered, not at once
        assert time.monotonic() < deadline, processes_marked(mark)
        time.sleep(0.05)
    fleet.start_agent()
    fleet.wait_event("engine.exited", record["engine_id"], timeout=20)
    deadline = time.monotonic() + 10
    while processes_marked(mark):
        assert time.monotonic() < deadline, "the dead engine's worker was left running"
        time.sleep(0.1)


def test_a_stop_sent_while_the_agent_is_dead_is_carried_out_when_it_returns(
    default_fleet: FleetProcs,
) -> None:
    fleet = default_fleet
    record = fleet.json("llm", "engine", "start", "demo", "--backend", "fake", "--wait")
    assert fleet.agent is not None
    os.killpg(fleet.agent.pid, signal.SIGKILL)
    assert [p.pid for p in engine_processes(fleet.state)] == [record["pid"]]  # untouched
    fleet.cli("llm", "engine", "stop", record["engine_id"], "--no-wait")
    fleet.start_agent()
    fleet.wait_event("engine.stopped", record["engine_id"], timeout=20)
    assert fleet.json("llm", "engine", "list")[0]["state"] == "STOPPED"
    assert engine_processes(fleet.state) == []


def test_a_port_held_by_a_stranger_moves_the_engine_to_the_next_free_one(
    fast_fleet: FleetProcs,
) -> None:
    first = int(fast_fleet.port_range.split("-")[0])
    with socket.socket() as stranger:
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past an old TIME_WAIT
        stranger.bind(("127.0.0.1", first))
        stranger.listen()
        record = fast_fleet.json("llm", "engine", "start", "demo", "--backend", "fake", "--wait")
        failed = fast_fleet.wait_event("engine.launch_failed", record["engine_id"])
    assert failed.payload.model_dump()["port_in_use"] is True
    assert record["state"] == "RUNNING" and record["port"] == first + 1
    assert record["restarts"] == 0 and record["url"].endswith(f":{first + 1}")  # moved, at once
    assert fast_fleet.wait_event("engine.port_changed", record["engine_id"])
    assert len(engine_processes(fast_fleet.state)) == 1


def test_engine_restart_from_the_cli_replaces_the_process_and_revives_a_stopped_engine(
    fast_fleet: FleetProcs,
) -> None:
    record = fast_fleet.json("llm", "engine", "start", "demo", "--backend", "fake", "--wait")
    engine_id = record["engine_id"]
    restarted = fast_fleet.json("llm", "engine", "restart", engine_id)
    assert restarted["state"] == "RUNNING" and restarted["pid"] != record["pid"]
    assert (restarted["port"], restarted["gpus"]) == (record["port"], record["gpus"])
    assert restarted["generation"] == 2 and restarted["restarts"] == 1
    assert [p.pid for p in engine_processes(fast_fleet.state)] == [restarted["pid"]]
    fast_fleet.json("llm", "engine", "stop", engine_id)
    revived = fast_fleet.json("llm", "engine", "restart", engine_id)
    assert revived["state"] == "RUNNING" and revived["generation"] == 3
    assert httpx.get(f"{revived['url']}/health", timeout=5).status_code == 200
    missing = fast_fleet.cli("llm", "engine", "restart", "nope", check=False)
    assert missing.returncode != 0 and "no engine 'nope'" in missing.stderr
