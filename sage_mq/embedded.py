"""All-in-one: Redis, a scheduler, a local node agent and the gateway in one process (the
gateway on a thread of its own), and a batch worker beside it (an rq worker is a process of its
own).

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
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from sage_mq.actor import Actor
from sage_mq.agent.node import NodeAgent
from sage_mq.broker import Broker
from sage_mq.connection import check_server
from sage_mq.control import ControlPlaneManager
from sage_mq.errors import ConfigError, SageMQError
from sage_mq.gateway import create_app
from sage_mq.gateway.auth import check_exposure
from sage_mq.gateway.serving import GatewayConfig, bind_socket
from sage_mq.gpu import GPUResourceManager
from sage_mq.ids import check_id
from sage_mq.local_redis import LocalRedis
from sage_mq.presets import Preset, load_preset
from sage_mq.redis_urls import url_secrets
from sage_mq.scheduler.core import Scheduler
from sage_mq.settings import (
    ENV_NAMESPACE,
    ENV_REDIS_URL,
    AgentSettings,
    GatewayOptions,
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


class GatewayThread:
    """The gateway on an event loop of its own, in a thread of its own.

    The node agent's heartbeat and the scheduler run on the caller's loop: gateway work (a
    large upload, a burst of requests, a slow client) must never delay them, or a healthy
    node would be declared lost. The port is bound here, before the thread starts, so a port
    already taken is one clear error, not a log line from a thread.
    """

    def __init__(self, app: Any, host: str, port: int) -> None:
        self.server = _EmbeddedServer(
            GatewayConfig(app, host=host, port=port, log_level="warning", access_log=False)
        )
        self.where = f"{host}:{port}"
        self._socket = bind_socket(host, port)
        self._thread = threading.Thread(target=self._serve, name="sage-gateway", daemon=True)
        self._failure: BaseException | None = None

    @property
    def started(self) -> bool:
        """Serving requests."""
        return bool(self.server.started)

    def start(self) -> None:
        self._thread.start()

    def check(self) -> None:
        """Raise if the gateway's thread ended (after :meth:`start`, before :meth:`stop`)."""
        if not self._thread.is_alive():
            when = "while starting" if not self.server.started else "unasked"
            why = f": {self._failure}" if self._failure is not None else ""
            raise ConfigError(f"the gateway on {self.where} stopped {when}{why}")

    def _serve(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self._socket]))
        except BaseException as exc:  # SystemExit from uvicorn included: reported by check()
            self._failure = exc
        finally:
            self._socket.close()

    async def stop(self, timeout_s: float = 15.0) -> None:
        """Finish the requests in flight and end the thread."""
        self.server.should_exit = True
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, timeout_s)
        else:
            self._socket.close()


@dataclass(frozen=True)
class NodeOptions:
    """What the embedded node runs beyond the defaults: its operator's allowances
    (``--allow-command``, ``--allow-engine-flag``) and runtimes (``--runtime``)."""

    allowed_commands: tuple[str, ...] = ()
    allowed_engine_flags: tuple[str, ...] = ()
    runtimes: Mapping[str, str] = field(default_factory=dict)


class EmbeddedControlPlane(Actor):
    """Every actor of a one-machine fleet, started, watched and stopped together.

    ``async with plane: await plane.run()``: entering starts Redis and the actors, :meth:`run`
    returns at :meth:`stop` (and raises, naming it, if one of them ends unasked), leaving stops
    the engines, the actors and Redis.
    """

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
        gateway: GatewayOptions | None = None,
        insecure: bool = False,
        node: NodeOptions | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.host, self.port = host, port
        self.fake_gpus = fake_gpus
        self.state_dir = state_dir
        self.namespace = namespace
        self.node_id = check_id("node id", node_id or socket.gethostname())
        self.options = gateway or GatewayOptions()
        self.insecure = insecure
        self.node = node or NodeOptions()
        super().__init__()
        self.local: LocalRedis | None = None
        self.started: list[str] = []
        self.engines_stopped = 0
        """How many engines :meth:`close` stopped on this host."""
        self._tasks: list[asyncio.Task[None]] = []
        self._parts: tuple[Scheduler, NodeAgent, GatewayThread, ControlPlaneManager] | None = None
        self._broker: Broker | None = None
        """This process's one way to Redis, shared by the scheduler, the agent and the manager
        (the gateway runs on a loop of its own, with its own)."""
        self._worker: subprocess.Popen[bytes] | None = None

    @property
    def gateway_url(self) -> str:
        """The OpenAI base URL of the gateway."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def settings(self) -> Settings:
        """The fleet's Redis URL and namespace (once started)."""
        assert self._broker is not None, "start() first"
        return self._broker.settings

    @property
    def control(self) -> ControlPlaneManager:
        assert self._parts is not None, "start() first"
        return self._parts[3]

    async def start(self, ready_timeout_s: float = 30.0) -> None:
        """Start Redis (unless given), the scheduler, the agent and the gateway; wait for them."""
        check_exposure(self.host, self.options.admin_key, insecure=self.insecure)
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
            await self.close()
            raise

    async def _start_actors(self, settings: Settings, ready_timeout_s: float) -> None:
        secrets = [*url_secrets(settings.redis_url), self.options.api_key, self.options.admin_key]
        broker = self._broker = Broker(settings)
        await check_server(broker.redis)  # and reachable: `up` joins a fleet that is there
        scheduler = Scheduler(settings, redis=broker.redis, name=f"{self.node_id}-embedded")
        agent = NodeAgent(
            settings,
            AgentSettings(
                node_id=self.node_id,
                state_dir=self.state_dir or default_state_dir(),
                allowed_commands=self.node.allowed_commands,
                allowed_engine_flags=self.node.allowed_engine_flags,
                runtimes=self.node.runtimes,
            ),
            gpus=GPUResourceManager.detect(self.fake_gpus or fake_gpus_from_env()),
            redis=broker.redis,
            base_env=engine_base_env(secrets=secrets),
        )
        await scheduler.start()
        app = create_app(settings, api_key=self.options.api_key, admin_key=self.options.admin_key)
        try:  # before the parts are ours to stop: if another agent holds this state directory,
            await agent.start()  # the engines in it are that agent's
            gateway = GatewayThread(app, self.host, self.port)
        except BaseException:
            await agent.close()
            raise
        self._parts = (scheduler, agent, gateway, ControlPlaneManager(broker=broker))
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(scheduler.run(), name="scheduler"),
            loop.create_task(agent.run(), name="agent"),
        ]
        gateway.start()
        deadline = loop.time() + ready_timeout_s
        while not (gateway.started and await self._node_alive()):
            if self.stopping:
                return  # stopped while starting: close() takes down what started
            self._check_parts()
            if loop.time() > deadline:
                raise ConfigError(f"the all-in-one fleet did not start in {ready_timeout_s:.0f}s")
            await asyncio.sleep(0.05)
        self._worker = _start_worker(settings)

    async def run(self) -> None:
        """Serve until :meth:`stop`; raise, naming it, if a part of the fleet ends first."""
        while not self.stopping:
            self._check_parts()
            self._keep_worker()
            await self.pause(0.5)

    def _check_parts(self) -> None:
        """Raise if the scheduler, the agent, the gateway or the batch worker has ended."""
        for task in self._tasks:
            if task.done():
                failure = None if task.cancelled() else task.exception()
                why = f": {failure}" if failure is not None else ""
                raise ConfigError(f"the {task.get_name()} stopped unasked{why}") from failure
        if self._parts is not None:
            self._parts[2].check()

    def _keep_worker(self) -> None:
        """Start the batch worker again if it ended (its job is retried by rq): batches stall
        without it, and the engines need not stop for it."""
        if self._worker is None or self._worker.poll() is None or self._broker is None:
            return
        log.warning("the batch worker exited (code %s); starting another", self._worker.returncode)
        self._worker = _start_worker(self._broker.settings)

    async def _node_alive(self) -> bool:
        return any(alive for _n, alive in await self.control.list_nodes())

    async def apply(self, preset: str | Preset) -> list[EngineRecord]:
        """Apply a preset (a built-in's name, a file, or one loaded) and wait until its engines
        are RUNNING; [] if :meth:`stop` comes first.

        Its engines count as started from the moment they are asked for: a stop while they come
        up stops them too."""
        plan = load_preset(preset) if isinstance(preset, str) else preset
        ids = [plan.engine_id(engine) for engine in plan.engines]
        self.started += [engine_id for engine_id in ids if engine_id not in self.started]
        return await self.unless_stopped(self.control.apply_preset(plan, wait=True)) or []

    async def close(self) -> None:
        """Stop the engines (see the module doc), the actors, and Redis; safe to call twice."""
        if self._worker is not None:
            await asyncio.to_thread(_stop_worker, self._worker)
            self._worker = None
        if self._parts is not None:
            scheduler, agent, gateway, control = self._parts
            if self.local is None:  # a shared fleet: what we started, through its scheduler
                with contextlib.suppress(SageMQError):
                    await self._stop_started(control)
            # Our own Redis is gone next with every record: no one need keep them right. The
            # actors end first, so that no launch is still under way when the engines are
            # stopped (one that was would be left running).
            agent.stop()
            scheduler.stop()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(SageMQError):  # what still runs here, all at once
                self.engines_stopped = await agent.stop_all_engines(
                    None if self.local else self.started
                )
            await gateway.stop()
            await agent.close()
            await scheduler.close()
            await control.close()
            self._parts, self._tasks = None, []
        if self._broker is not None:
            await self._broker.aclose()
            self._broker = None
        if self.local is not None:
            await asyncio.to_thread(self.local.stop)
            self.local = None

    async def _stop_started(self, control: ControlPlaneManager) -> None:
        await asyncio.gather(
            *(control.stop_engine(engine_id, wait=True, timeout=30) for engine_id in self.started),
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
