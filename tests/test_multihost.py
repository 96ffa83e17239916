"""Multi-host for real: two hosts as network namespaces with veth pairs, an agent in each
advertising its own address, engines bound to those addresses, Redis, the scheduler and the
gateway in the root namespace routing across hosts. A host's link is cut and healed."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.gateway import models, wait_for
from tests.helpers.netns import Host, hosts, listening, why_no_namespaces
from tests.helpers.servers import Processes, RedisServer, free_port

pytestmark = pytest.mark.fleet
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def can_make_hosts() -> None:
    reason = why_no_namespaces()
    if reason is not None:
        pytest.skip(f"network namespaces cannot be made here: {reason}")


@pytest.fixture
def two_hosts(can_make_hosts: None) -> Iterator[list[Host]]:
    with hosts(2) as made:
        yield made


def test_the_gateway_routes_across_hosts_and_a_cut_host_is_replaced_then_fenced(
    two_hosts: list[Host], processes: Processes, tmp_path: Path
) -> None:
    a, b = two_hosts
    server = RedisServer(free_port(), tmp_path, extra=_bind_also(a, b))
    server.start()
    try:
        _run(two_hosts, server, processes, tmp_path)
    finally:
        server.kill()


def _run(two_hosts: list[Host], server: RedisServer, processes: Processes, tmp: Path) -> None:
    a, b = two_hosts
    fleet = FleetProcs(processes, server, tmp / "root")
    fleet.start_scheduler("--health-interval", "0.5", "--node-lost-grace", "2")
    for i, host in enumerate(two_hosts):
        env = fleet.env | {
            "SAGE_MQ_REDIS_URL": f"redis://{host.gateway}:{server.port}/0",
            "SAGE_MQ_STATE_DIR": str(tmp / host.netns),
        }
        argv = [sys.executable, "-m", "sage_mq", "llm", "node", "run", "--node-id", host.netns]
        argv += ["--advertise-address", host.address, "--fake-gpus", "2x24GiB"]
        argv += ["--liveness-ttl", "3", "--port-range", f"{28000 + 100 * i}-{28099 + 100 * i}"]
        processes.start(f"agent-{host.netns}", host.argv(*argv), env)
    wait_for(lambda: fleet.json("llm", "status")["nodes"]["alive"] == 2, 30)
    port = free_port()
    processes.sage("gateway", ["llm", "gateway", "run", "--port", str(port)], fleet.env)
    url = f"http://127.0.0.1:{port}"
    started = sorted((_start(fleet) for _ in two_hosts), key=lambda r: str(r["node"]))
    assert [r["node"] for r in started] == [a.netns, b.netns]  # replicas spread over hosts
    on_a, on_b = started
    assert str(on_a["url"]).startswith(f"http://{a.address}:")
    assert str(on_b["url"]).startswith(f"http://{b.address}:")
    # each engine listens on its host's address, inside its host
    assert listening(int(on_a["pid"])) == [a.address]
    wait_for(lambda: models(url) == ["demo"], 15)
    wait_for(lambda: len(_served_by(url, 20)) == 2, 15)  # routed across both hosts

    a.cut()
    lost = time.monotonic()
    wait_for(lambda: _record(fleet, on_a)["node"] == b.netns, 30)
    moved = _wait_running(fleet, on_a)
    took = time.monotonic() - lost
    assert str(moved["url"]).startswith(f"http://{b.address}:")
    assert any(e.type == "node.lost" for e in fleet.events()), "no node.lost"
    assert took < 20, f"re-placed only after {took:.1f} s"
    # every request answered; the moved replica is in rotation at its new address (the
    # adaptive policy tries it first: it has not been measured there)
    assert on_a["engine_id"] in _served_by(url, 20)
    stale = int(on_a["pid"])
    assert psutil.pid_exists(stale)  # the old copy still runs, out of reach

    a.heal()
    # Back in touch, host a's agent reports what it still runs; a copy serves on host b by
    # then, so the first copy serving wins and the stale one is stopped.
    wait_for(lambda: not _alive(stale), 30)
    assert _record(fleet, on_a)["node"] == b.netns
    wait_for(lambda: fleet.json("llm", "status")["nodes"]["alive"] == 2, 30)
    assert [p for p in a.pids() if _is_engine(p)] == []  # no duplicate engine left on host a


def _bind_also(*hosts_: Host) -> list[str]:
    """Redis also on the root side of each host's link (the hosts reach it there)."""
    return ["--bind", "127.0.0.1", *(h.gateway for h in hosts_), "--protected-mode", "no"]


def _start(fleet: FleetProcs) -> dict[str, Any]:
    args = ["llm", "engine", "start", "demo", "--backend", "fake", "--no-gpu", "--wait"]
    record: dict[str, Any] = fleet.json(*args)
    return record


def _record(fleet: FleetProcs, engine: dict[str, Any]) -> dict[str, Any]:
    listed = fleet.json("llm", "engine", "list")
    return next(dict(r) for r in listed if r["engine_id"] == engine["engine_id"])


def _wait_running(fleet: FleetProcs, engine: dict[str, Any]) -> dict[str, Any]:
    wait_for(lambda: _record(fleet, engine)["state"] == "RUNNING", 30)
    return _record(fleet, engine)


def _served_by(url: str, n: int) -> Counter[str]:
    """Which engines answered ``n`` chat requests through the gateway (all must succeed)."""
    served: Counter[str] = Counter()
    with httpx.Client(timeout=10) as client:
        for _ in range(n):
            reply = client.post(f"{url}/v1/chat/completions", json=CHAT)
            assert reply.status_code == 200, reply.text
            served[reply.headers["x-sage-engine"]] += 1
    return served


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _is_engine(pid: int) -> bool:
    try:
        return "sage_mq.engines" in " ".join(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:
        return False
