"""Fixtures: real redis-server processes on free ports, settings per test, real child processes."""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import openai
import pytest

from sage_mq.connection import Redis, connect
from sage_mq.settings import BusSettings, Settings
from tests.helpers.engines import engine_processes
from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.gateway import models, run_gateway, start, wait_for
from tests.helpers.servers import Processes, RedisServer, free_port
from tests.helpers.simulated import Fleet


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; tests keep apart by namespace."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for one test, to kill or restart."""
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.kill()


FAST_BUS = BusSettings(block_ms=100, claim_min_idle_ms=300, max_deliveries=3)


@pytest.fixture
def settings(redis_server: RedisServer) -> Settings:
    """Settings on the session Redis with a namespace of this test's own, and quick retries."""
    return Settings(redis_url=redis_server.url, namespace=f"t{uuid.uuid4().hex[:10]}", bus=FAST_BUS)


@pytest.fixture
async def aredis(settings: Settings) -> AsyncIterator[Redis]:
    """An asyncio client for the test's Redis."""
    client = connect(settings)
    yield client
    await client.aclose()


@pytest.fixture(autouse=True)
def no_leaked_engines(tmp_path: Path) -> Iterator[None]:
    """Whatever happens in a test, the engine processes it started do not outlive it."""
    yield
    for proc in engine_processes(tmp_path):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Start real processes; every one is SIGKILLed (with its group) at the end."""
    procs = Processes(tmp_path)
    yield procs
    procs.kill_all()


@pytest.fixture
async def fleet(aredis: Redis, settings: Settings) -> Fleet:
    """A scheduler over simulated nodes (see tests/helpers/simulated.py)."""
    return Fleet(aredis, settings)


@pytest.fixture
def sdk() -> Iterator[Callable[..., openai.OpenAI]]:
    """OpenAI clients (``sdk(base_url, api_key="none")``, no retries), closed after the test:
    a client left to the garbage collector leaves its pooled sockets unclosed."""
    made: list[openai.OpenAI] = []

    def client(base_url: str, api_key: str = "none") -> openai.OpenAI:
        made.append(openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0))
        return made[-1]

    yield client
    for each in made:
        each.close()


@pytest.fixture
def batch_fleet(
    processes: Processes,
    redis_server: RedisServer,
    tmp_path: Path,
    sdk: Callable[..., openai.OpenAI],
) -> tuple[FleetProcs, openai.OpenAI]:
    """A gateway over a fleet serving ``demo`` (a fake engine), and an OpenAI client on it."""
    fleet, url = run_gateway(processes, redis_server, tmp_path)
    start(fleet, "demo", "--extra-args", "--latency-ms 5")
    wait_for(lambda: models(url) == ["demo"])
    return fleet, sdk(f"{url}/v1")
