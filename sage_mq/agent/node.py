"""NodeAgent: one per host. Registers the node, carries out its commands, reports events.

It never decides policy: an engine that dies is reported, not restarted. When Redis or the
scheduler is away, its engines keep running and its events wait in an outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any

from sage_mq.actor import Actor
from sage_mq.agent import logs, runtimes
from sage_mq.agent.fencing import LeaderFence
from sage_mq.agent.lifecycle import EngineLifecycleManager, ManagedEngine
from sage_mq.agent.logship import LogShipper
from sage_mq.agent.outbox import Outbox
from sage_mq.agent.preflight import check_launch, node_allowances
from sage_mq.agent.presence import Presence
from sage_mq.agent.processes import describe_returncode
from sage_mq.agent.statelock import StateLock
from sage_mq.broker import Broker
from sage_mq.connection import Redis
from sage_mq.dispatch import Handlers
from sage_mq.engines.backends import startup_timeout_s
from sage_mq.errors import (
    ControlPlaneUnavailable,
    InvalidRequest,
    LaunchError,
    LaunchRefused,
    PortInUse,
)
from sage_mq.gpu import GPUResourceManager
from sage_mq.messages import (
    EngineAdopted,
    EngineExited,
    EngineLaunchFailed,
    EngineReady,
    EngineStarting,
    EngineStopped,
    EngineUnhealthy,
    HealthTick,
    LaunchEngine,
    NodeHealth,
    ReportEngines,
    TerminateEngine,
)
from sage_mq.settings import AgentSettings, Settings
from sage_mq.wire import Envelope

log = logging.getLogger(__name__)
AGENT_GROUP = "agent"
_MAX_PROBE_ROUNDS = 2


class NodeAgent(Actor):
    """The actor that runs engine processes on one host."""

    def __init__(
        self,
        settings: Settings,
        agent: AgentSettings,
        *,
        gpus: GPUResourceManager | None = None,
        redis: Redis | None = None,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.agent = agent
        self.node_id = agent.node_id
        super().__init__()
        self.broker = Broker(settings, redis=redis)
        self.redis, self.keys = self.broker.redis, self.broker.keys
        self.bus, self.store = self.broker.bus, self.broker.store
        self.gpus = gpus or GPUResourceManager()
        self.runtimes = runtimes.detect(agent.runtimes)
        self.executables, self.allowances = node_allowances(agent, self.runtimes)
        self.lifecycle = EngineLifecycleManager(
            agent.node_dir,
            on_exit=self._on_engine_exit,
            base_env=base_env,
            stop_grace_s=agent.stop_grace_s,
            log_backups=agent.log_backups,
        )
        self.outbox = Outbox(self.bus, self.keys.events)
        self.logship = LogShipper(self.bus, agent.log_stream_maxlen)
        self.presence = Presence(
            self.store, self.outbox, agent, self.gpus, self.allowances, self.runtimes
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._probing: set[asyncio.Task[None]] = set()
        self.fence = LeaderFence(self.store, self.node_id)
        self.state_lock = StateLock(agent.node_dir)
        self.handlers = (
            Handlers()
            .on(LaunchEngine, self._launch)
            .on(TerminateEngine, self._terminate)
            .on(HealthTick, self._tick)
            .on(ReportEngines, self._report_again)
        )
        self._consumer = self.bus.consumer(
            [self.keys.node_commands(self.node_id)],
            AGENT_GROUP,
            self.node_id,
            self.handle,
            trim=True,
        )

    # -- actor shape ---------------------------------------------------------------------
    def stop(self) -> None:
        """Ask :meth:`run` to return; engines keep running. Safe to call twice."""
        super().stop()
        self._consumer.stop()

    async def start(self) -> None:
        """Take the node's state directory (one agent per directory), and refuse a Redis too
        old for the fleet, each in one line, before anything else."""
        self.state_lock.acquire()
        await self.broker.refuse_old_server()

    async def run(self, *, until_idle: bool = False) -> None:
        """Register, re-adopt engines, then carry out commands until stopped."""
        await self.presence.register(self._stopping)
        if self.stopping:
            return
        await self._recover()
        heartbeat = asyncio.create_task(
            self.presence.keep_alive(self._back_in_touch, self._truncate_logs),
            name=f"heartbeat-{self.node_id}",
        )
        try:
            await self._consumer.run(until_idle=until_idle)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def close(self) -> None:
        """Release connections and tasks (not engines), after :meth:`run` returned."""
        tasks = [*self._tasks, *self._probing]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.logship.close()
        await self.lifecycle.close()
        with contextlib.suppress(ControlPlaneUnavailable):
            await self.outbox.flush()
        await self.broker.aclose()
        self.state_lock.release()

    async def stop_all_engines(self, only: list[str] | None = None) -> int:
        """Stop this node's engines (or ``only`` these) at once, for up's Ctrl-C: how many."""
        ids = [i for i in self.lifecycle.engines if only is None or i in only]
        await asyncio.gather(*(self._terminate(TerminateEngine(engine_id=i)) for i in ids))
        return len(ids)

    # -- registration, liveness, recovery ------------------------------------------------
    def _back_in_touch(self, why: str) -> None:
        self._spawn(self._report_engines(why))  # beside the beat: probes must not delay it

    def _truncate_logs(self) -> None:
        for engine_id in list(self.lifecycle.engines):
            logs.truncate_if_large(
                self.lifecycle.log_dir / f"{engine_id}.log",
                self.agent.log_max_bytes,
                self.agent.log_backups,
            )

    async def _report_engines(self, why: str) -> None:
        """Back in touch (after a network partition, or with a Redis that came back empty):
        say which engines this node still runs, with the records they were launched with.

        The scheduler rebuilds a record Redis lost, and answers a copy it has moved elsewhere
        meanwhile with a terminate (the one it queued when moving it may be gone with a
        trimmed or lost stream). Readiness follows, as after an agent restart."""
        running = [e for e in self.lifecycle.engines.values() if e.alive]
        log.warning(
            "node %s reached Redis again (%s); reporting its %d engine(s)",
            self.node_id,
            why,
            len(running),
        )
        await self._send_adopted(running)
        for engine in running:
            self._spawn(self._await_ready(engine))

    async def _send_adopted(self, engines: list[ManagedEngine]) -> None:
        """``engine.adopted`` for each, saying which answered a probe (all probed at once)."""
        probes = (self.lifecycle.health_check(e.engine_id, timeout=2.0) for e in engines)
        answered = await asyncio.gather(*probes)
        for engine, ready in zip(engines, answered, strict=True):
            adopted = EngineAdopted(
                engine_id=engine.engine_id,
                node=self.node_id,
                generation=engine.generation,
                pid=engine.pid,
                record=engine.record or None,
                ready=ready,
            )
            await self.outbox.send(adopted)

    async def _recover(self) -> None:
        adopted, gone = self.lifecycle.recover()
        await self._send_adopted(adopted)
        for engine in adopted:
            log.info("adopted %s (pid %d) from a previous agent run", engine.engine_id, engine.pid)
            self._resume_log(engine)
            self._spawn(self._await_ready(engine))
        for engine in gone:  # ship what it wrote while we were away, then report it
            self._resume_log(engine)
            self.logship.stop(engine.engine_id)
            await self.outbox.send(
                EngineExited(
                    engine_id=engine.engine_id,
                    node=self.node_id,
                    generation=engine.generation,
                    returncode=None,
                    reason="process ended while the agent was down",
                    last_lines=tuple(logs.tail(Path(engine.log_path))),
                )
            )

    def _resume_log(self, engine: ManagedEngine) -> None:
        """Ship a found engine's log from where shipping got to before this agent started."""
        self.logship.start(engine.engine_id, Path(engine.log_path), engine.generation, resume=True)

    # -- commands ------------------------------------------------------------------------
    async def handle(self, env: Envelope) -> None:
        """Carry out one command from this node's stream (not a stale leader's)."""
        if not await self.fence.admits(getattr(env.payload, "epoch", 0), env.type):
            return
        if not await self.handlers.dispatch(env):
            log.warning("node %s ignores %s (not a node command)", self.node_id, env.type)

    async def _report_again(self, _cmd: ReportEngines, _env: Envelope) -> None:
        self._spawn(self._report_engines("the scheduler had lost this node"))

    async def _tick(self, tick: HealthTick, env: Envelope) -> None:
        """Probe in the background, so a hung engine's timeout never holds up commands.

        Rounds may overlap (each ends within its timeout), so a hung engine is counted failed
        once per tick, not once per timeout; more than two rounds out at once are not started.
        """
        if time.time() - env.ts > max(10.0, 3 * tick.timeout_s):
            return  # a tick left over from while this agent was down
        self._probing = {t for t in self._probing if not t.done()}
        if len(self._probing) >= _MAX_PROBE_ROUNDS:
            return
        self._probing.add(asyncio.get_running_loop().create_task(self._probe(tick.timeout_s)))

    async def _probe(self, timeout_s: float) -> None:
        results = await self.lifecycle.health_check_all(timeout_s)
        await self.outbox.send(NodeHealth(node_id=self.node_id, results=results))

    async def _launch(self, cmd: LaunchEngine, _env: Envelope | None = None) -> None:
        current = self.lifecycle.engines.get(cmd.engine_id)
        if current is not None and current.generation > cmd.generation:
            log.warning(
                "refusing launch of %s generation %d: generation %d runs",
                cmd.engine_id,
                cmd.generation,
                current.generation,
            )
            return
        if current is not None and current.generation == cmd.generation:
            # A redelivered command, already carried out: report again, readiness included.
            await self._report_starting(current)
            self._spawn(self._await_ready(current, cmd.startup_timeout_s))
            return
        if current is not None:
            log.info(
                "stopping %s generation %d before launching generation %d",
                cmd.engine_id,
                current.generation,
                cmd.generation,
            )
            await self.lifecycle.stop(cmd.engine_id)
        await self.lifecycle.settle(cmd.engine_id)  # what an exited generation left: gone
        try:
            check_launch(cmd, self.gpus.gpus(), self.agent, self.allowances)
            python = self.runtimes[cmd.backend].python if cmd.backend in self.runtimes else None
            engine = await self.lifecycle.launch(cmd, self.executables, python=python)
        except (LaunchError, InvalidRequest) as exc:
            await self._launch_failed(cmd, exc)
            return
        except Exception as exc:  # never leave an engine STARTING for want of an answer
            log.exception("launching %s failed unexpectedly", cmd.engine_id)
            await self._launch_failed(cmd, LaunchRefused(f"the agent could not launch it: {exc}"))
            return
        await self._report_starting(engine)
        self.logship.start(engine.engine_id, Path(engine.log_path), engine.generation)
        self._spawn(self._await_ready(engine, cmd.startup_timeout_s))

    async def _launch_failed(self, cmd: LaunchEngine, exc: Exception) -> None:
        log.error("cannot launch %s: %s", cmd.engine_id, exc)
        await self.outbox.send(
            EngineLaunchFailed(
                engine_id=cmd.engine_id,
                node=self.node_id,
                generation=cmd.generation,
                reason=str(exc),
                port_in_use=isinstance(exc, PortInUse),
                refused=isinstance(exc, LaunchRefused | InvalidRequest),
            )
        )

    async def _report_starting(self, engine: ManagedEngine) -> None:
        await self.outbox.send(
            EngineStarting(
                engine_id=engine.engine_id,
                node=self.node_id,
                generation=engine.generation,
                pid=engine.pid,
                argv=tuple(engine.argv),
            )
        )

    async def _await_ready(self, engine: ManagedEngine, timeout_s: float | None = None) -> None:
        timeout = timeout_s or startup_timeout_s(engine.backend)
        started = time.monotonic()
        ok = await self.lifecycle.wait_ready(engine.engine_id, timeout, self.agent.readiness_poll_s)
        if ok:
            took = time.monotonic() - started
            log.info("%s ready at %s after %.2fs", engine.engine_id, engine.url, took)
            await self.outbox.send(
                EngineReady(
                    engine_id=engine.engine_id,
                    node=self.node_id,
                    generation=engine.generation,
                    url=engine.url,
                )
            )
        elif engine.alive and not engine.stopping:
            await self.outbox.send(
                EngineUnhealthy(
                    engine_id=engine.engine_id,
                    node=self.node_id,
                    reason=f"not ready after {timeout:.0f}s (startup timeout)",
                    generation=engine.generation,
                )
            )

    async def _terminate(self, cmd: TerminateEngine, _env: Envelope | None = None) -> None:
        current = self.lifecycle.engines.get(cmd.engine_id)
        if current is not None and cmd.generation not in (None, current.generation):
            log.info(
                "not stopping %s generation %d: the command is for generation %s",
                cmd.engine_id,
                current.generation,
                cmd.generation,
            )
            return
        returncode = await self.lifecycle.stop(cmd.engine_id, cmd.grace_s)
        self.logship.stop(cmd.engine_id)
        await self.outbox.send(
            EngineStopped(engine_id=cmd.engine_id, node=self.node_id, returncode=returncode)
        )

    async def _on_engine_exit(self, engine: ManagedEngine, returncode: int | None) -> None:
        self.logship.stop(engine.engine_id)
        await self.outbox.send(
            EngineExited(
                engine_id=engine.engine_id,
                node=self.node_id,
                generation=engine.generation,
                returncode=returncode,
                reason=describe_returncode(returncode),
                last_lines=tuple(self.lifecycle.tail_log(engine.engine_id, 20)),
            )
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
