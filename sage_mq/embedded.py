"""All-in-one: Redis, a scheduler, a local node agent and the gateway in one process, and a
batch worker beside it (an rq worker is a process of its own).

What ``sage llm up`` and ``UnifiedInferenceClient.create(embedded=True)`` run. Redis is a private
``redis-server`` child unless a URL is given (then it joins that fleet). Stopping stops every
engine it started (all engines, when the Redis was its own) and every process, leaving nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from sage_mq.agent.node import NodeAgent
from sage_mq.control import ControlPlaneManager
from sage_mq.errors import ConfigError, SageMQError
from sage_mq.gateway import create_app
from sage_mq.gpu import GPUResourceManager
from sage_mq.local_redis import LocalRedis
from sage_mq.presets import load_preset
from sage_mq.scheduler.core import Scheduler
from sage_mq.settings import (
    ENV_NAMESPACE,
    ENV_REDIS_URL,
    AgentSettings,
    Settings,
    default_state_dir,
    engine_base_env,
    fake_gpus_from_env,
)
from sage_mq.store import EngineRecord

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn, leaving signals to the program that embeds it (it stops when told)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class EmbeddedControlPlane:
    """Every actor of a one-machine fleet, started and stopped together."""

    def __init__(
        self,
        *,
        redis_url: str | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        fake_gpus: str | None = None,
        state_dir: Path | None = None,
        namespace: str | None = None,
        node_id: str | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.host, self.port = host, port
        self.fake_gpus = fake_gpus
        self.state_dir = state_dir
        self.namespace = namespace
        self.node_id = node_id or socket.gethostname()
        self.local: LocalRedis | None = None
        self.started: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._parts: tuple[Scheduler, NodeAgent, uvicorn.Server, ControlPlaneManager] | None = None
        self._worker: subprocess.Popen[bytes] | None = None

    @property
    def gateway_url(self) -> str:
        """The OpenAI base URL of the gateway."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def control(self) -> ControlPlaneManager:
        assert self._parts is not None, "start() first"
        return self._parts[3]

    async def __aenter__(self) -> EmbeddedControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, ready_timeout_s: float = 30.0) -> None:
        """Start Redis (unless given), the scheduler, the agent and the gateway; wait for them."""
        url = self.redis_url
        if url is None:
            self.local = LocalRedis()
            url = await asyncio.to_thread(self.local.start)
        settings = Settings.from_env(redis_url=url)
        if self.namespace:
            settings = Settings(redis_url=url, namespace=self.namespace, bus=settings.bus)
        try:
            await self._start_actors(settings, ready_timeout_s)
        except BaseException:
            await self.stop()
            raise

    async def _start_actors(self, settings: Settings, ready_timeout_s: float) -> None:
        scheduler = Scheduler(settings, name=f"{self.node_id}-embedded")
        agent = NodeAgent(
            settings,
            AgentSettings(node_id=self.node_id, state_dir=self.state_dir or default_state_dir()),
            gpus=GPUResourceManager.detect(self.fake_gpus or fake_gpus_from_env()),
            base_env=engine_base_env(),
        )
        config = uvicorn.Config(
            create_app(settings), host=self.host, port=self.port, log_level="warning"
        )
        server = _EmbeddedServer(config)
        self._parts = (scheduler, agent, server, ControlPlaneManager(settings))
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(scheduler.run(), name="scheduler"),
            loop.create_task(agent.run(), name="agent"),
            loop.create_task(server.serve(), name="gateway"),
        ]
        deadline = loop.time() + ready_timeout_s
        while not (server.started and await self._node_alive()):
            for task in self._tasks:
                if task.done():
                    task.result()  # it failed: say why
                    raise ConfigError(f"the {task.get_name()} stopped while starting")
            if loop.time() > deadline:
                raise ConfigError(f"the all-in-one fleet did not start in {ready_timeout_s:.0f}s")
            await asyncio.sleep(0.05)
        self._worker = _start_worker(settings)

    async def _node_alive(self) -> bool:
        return any(alive for _n, alive in await self.control.list_nodes())

    async def apply(self, preset: str) -> list[EngineRecord]:
        """Apply a preset (a built-in's name or a file) and wait until its engines are RUNNING."""
        records = await self.control.apply_preset(load_preset(preset), wait=True)
        self.started += [r.engine_id for r in records if r.engine_id not in self.started]
        return records

    async def stop(self) -> None:
        """Stop the engines (see the module doc), the actors, and Redis; safe to call twice."""
        if self._worker is not None:
            await asyncio.to_thread(_stop_worker, self._worker)
            self._worker = None
        if self._parts is not None:
            scheduler, agent, server, control = self._parts
            with contextlib.suppress(SageMQError):
                await self._stop_engines(control)
            with contextlib.suppress(SageMQError):
                await agent.stop_all_engines()  # whatever the scheduler could not stop
            server.should_exit = True
            agent.stop()
            scheduler.stop()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await agent.close()
            await scheduler.close()
            await control.close()
            self._parts, self._tasks = None, []
        if self.local is not None:
            await asyncio.to_thread(self.local.stop)
            self.local = None

    async def _stop_engines(self, control: ControlPlaneManager) -> None:
        if self.local is not None:  # our own Redis: every engine in it is ours
            ids = [r.engine_id for r in await control.list_engines() if not r.state.terminal]
        else:
            ids = list(self.started)
        await asyncio.gather(
            *(control.stop_engine(engine_id, wait=True, timeout=30) for engine_id in ids),
            return_exceptions=True,
        )


def _start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    """``sage llm worker run`` for this fleet, in its own session (Ctrl-C is ours to pass on)."""
    env = {**os.environ, ENV_REDIS_URL: settings.redis_url, ENV_NAMESPACE: settings.namespace}
    argv = [sys.executable, "-m", "sage_mq", "llm", "worker", "run", "--log-level", "WARNING"]
    return subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL)


def _stop_worker(worker: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM (the job in progress ends first), then SIGKILL after the grace."""
    with contextlib.suppress(ProcessLookupError):
        worker.terminate()
        try:
            worker.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
