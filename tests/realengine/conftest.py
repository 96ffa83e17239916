"""The real-engine tier: vLLM's CPU build and llama.cpp's server with real small models, run by
a fleet of real sage-mq processes, driven through the CLI and the real ``openai`` SDK.

``python scripts/prepare_engines.py`` makes the engines' venvs and the models (cached on disk);
the README's test command runs it first. Without its manifest these tests are skipped, saying so.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.servers import Processes, RedisServer, free_port

ENGINE_START_S = 600.0
"""How long a test waits for a real engine to serve (vLLM on 2 CPU cores: about a minute)."""


def engine_cache() -> Path:
    given = os.environ.get("SAGE_MQ_ENGINE_CACHE")
    return Path(given) if given else Path.home() / ".cache" / "sage-mq" / "engines"


@pytest.fixture(scope="session")
def manifest() -> dict[str, Any]:
    """What ``scripts/prepare_engines.py`` made: runtimes, versions and model paths."""
    path = engine_cache() / "manifest.json"
    if not path.is_file():
        pytest.skip(f"no real engines prepared ({path}): run python scripts/prepare_engines.py")
    found: dict[str, Any] = json.loads(path.read_text())
    return found


@dataclass
class RealFleet:
    """Scheduler, node agent (with the real runtimes) and gateway, as real processes."""

    procs: FleetProcs
    url: str
    manifest: dict[str, Any]

    @functools.cached_property
    def client(self) -> openai.OpenAI:
        """One client for the module's tests, closed with the fleet."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=120)

    def start(self, model: str, *args: str) -> dict[str, Any]:
        """``sage llm engine start MODEL ARGS --wait --json``, as an operator types it."""
        argv = ("llm", "engine", "start", model, *args, "--no-gpu", "--wait", "--json")
        done = self.procs.cli(*argv, "--timeout", str(ENGINE_START_S), timeout=ENGINE_START_S + 60)
        record: dict[str, Any] = json.loads(done.stdout)
        assert record["state"] == "RUNNING", record
        return record

    def record(self, engine_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self.procs.json("llm", "engine", "list")
        return next(r for r in found if r["engine_id"] == engine_id)  # type: ignore[call-overload]

    def served(self) -> list[str]:
        answer = httpx.get(f"{self.url}/v1/models", timeout=10)
        return sorted(m["id"] for m in answer.json()["data"])


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and everything it started (vLLM: its EngineCore and workers). Found by
    parentage: vLLM's EngineCore writes its title over its environment, so its mark
    (``SAGE_ENGINE``) cannot be read back."""
    main = psutil.Process(pid)
    return [main, *main.children(recursive=True)]


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (the same processes: psutil checks their start times)."""
    found = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def marked_processes(state: Path) -> list[psutil.Process]:
    """Every live process a fleet of this tier started for engines (by the test's mark)."""
    found = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.environ().get(
                "SAGE_TEST_MARK", ""
            ).startswith(str(state)):
                found.append(proc)
    return found


@pytest.fixture(scope="module")
def real_fleet(
    manifest: dict[str, Any], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RealFleet]:
    root = tmp_path_factory.mktemp("realfleet")
    processes = Processes(root)
    fleet = FleetProcs(processes, redis_server, root / "state")
    runtimes = manifest["runtimes"]
    try:
        fleet.start_scheduler("--backoff-base", "0.5", "--health-interval", "1")
        fleet.start_agent(
            "n1",
            "--runtime",
            f"vllm={runtimes['vllm']}",
            "--runtime",
            f"llamacpp={runtimes['llamacpp']}",
        )
        fleet.wait_node()
        port = free_port()
        processes.sage("gateway", ["llm", "gateway", "run", "--port", str(port)], fleet.env)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, processes.log("gateway")
            time.sleep(0.1)
        real = RealFleet(fleet, url, manifest)
        yield real
        real.client.close()
    finally:
        with contextlib.suppress(subprocess.SubprocessError, AssertionError):
            for record in fleet.json("llm", "engine", "list"):
                fleet.cli("llm", "engine", "stop", record["engine_id"], check=False, timeout=60)
        processes.kill_all()
        for proc in marked_processes(root):  # whatever a failure left: never outlives the tier
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(proc.pid) == proc.pid:  # an engine: its group holds the rest
                    os.killpg(proc.pid, signal.SIGKILL)
                os.kill(proc.pid, signal.SIGKILL)
