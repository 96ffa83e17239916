"""A gateway over a fleet of real processes, and what gateway tests ask of it."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.servers import Processes, RedisServer, free_port


def run_gateway(
    processes: Processes,
    redis_server: RedisServer,
    tmp_path: Path,
    *args: str,
    agent_args: tuple[str, ...] = (),
) -> tuple[FleetProcs, str]:
    fleet = FleetProcs(processes, redis_server, tmp_path / "state")
    fleet.start_scheduler("--backoff-base", "0.2", "--health-interval", "0.5")
    fleet.start_agent("n1", *agent_args)
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
