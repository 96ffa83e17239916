"""Scheduler: turns requests and events into placements, commands and engine record states.

It holds no state that is not in Redis. Requests and events are read by one consumer, in one
task, so every record change is made by one writer in order.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from sage_mq.bus import Bus
from sage_mq.connection import Redis, connect
from sage_mq.engines.backends import default_backend, gpu_memory_utilization
from sage_mq.errors import InvalidRequest, PlacementError
from sage_mq.keys import Keys
from sage_mq.memory import estimate_memory_gb
from sage_mq.messages import (
    AllocateGpus,
    EngineExited,
    EngineFailed,
    EngineLaunchFailed,
    EnginePlaced,
    EngineReady,
    EngineStarting,
    EngineStopped,
    EngineUnhealthy,
    Envelope,
    LaunchEngine,
    Message,
    ReleaseGpus,
    RequestRejected,
    StartEngine,
    StopEngine,
    TerminateEngine,
)
from sage_mq.scheduler.fleet import live_nodes
from sage_mq.scheduler.placement import Demand, Placement, check_request, choose_port, place
from sage_mq.scheduler.placement import wants_gpu as resolve_use_gpu
from sage_mq.settings import Settings
from sage_mq.store import EngineRecord, EngineState, Reservation, Store

log = logging.getLogger(__name__)
SCHEDULER_GROUP = "scheduler"
S = EngineState
_LIVE = (S.STARTING, S.RUNNING, S.UNHEALTHY)


class Scheduler:
    """The actor that places engines and keeps their records in step with events."""

    def __init__(
        self, settings: Settings, *, redis: Redis | None = None, name: str | None = None
    ) -> None:
        self.settings = settings
        self.redis = redis or connect(settings)
        self._owns_redis = redis is None
        self.keys = Keys(settings.namespace)
        self.bus = Bus(self.redis, self.keys, settings.bus)
        self.store = Store(self.redis, self.keys)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self._consumer = self.bus.consumer(
            [self.keys.requests, self.keys.events], SCHEDULER_GROUP, self.name, self.handle
        )

    async def __aenter__(self) -> Scheduler:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        await self.close()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the message in hand; safe to call twice."""
        self._consumer.stop()

    async def run(self, *, until_idle: bool = False) -> None:
        """Consume requests and events until stopped (or idle)."""
        log.info("scheduler %s running", self.name)
        await self._consumer.run(until_idle=until_idle)

    async def close(self) -> None:
        """Release the Redis connection if this scheduler made it."""
        if self._owns_redis:
            await self.redis.aclose()

    async def handle(self, env: Envelope) -> None:
        """Settle one request or event."""
        handler = self._handlers().get(type(env.payload))
        if handler is not None:
            await handler(env)

    def _handlers(self) -> dict[type[Message], Any]:
        return {
            StartEngine: self._on_start,
            StopEngine: self._on_stop,
            EngineStarting: self._on_starting,
            EngineReady: self._on_ready,
            EngineExited: self._on_exited,
            EngineLaunchFailed: self._on_launch_failed,
            EngineStopped: self._on_stopped,
            EngineUnhealthy: self._on_unhealthy,
        }

    async def _emit(self, message: Message) -> None:
        await self.bus.publish(self.keys.events, message)

    async def _reject(self, env: Envelope, engine_id: str | None, reason: str) -> None:
        log.warning("rejected %s %s: %s", env.type, engine_id or "", reason)
        await self._emit(
            RequestRejected(
                request_id=env.id, request_type=env.type, engine_id=engine_id, reason=reason
            )
        )

    # -- requests ------------------------------------------------------------------------
    async def _on_start(self, env: Envelope) -> None:
        req = env.payload
        assert isinstance(req, StartEngine)
        existing = await self.store.get_engine(req.engine_id)
        if existing is not None and existing.state != S.PENDING:
            if existing.state.terminal:
                await self._reject(env, req.engine_id, f"engine id {req.engine_id!r} exists")
            return  # otherwise: this request redelivered after it was carried out
        try:
            check_request(req)
        except InvalidRequest as exc:
            await self._reject(env, req.engine_id, str(exc))
            return
        record = existing or _new_record(req)  # PENDING: a half-done start is resumed
        if existing is None:
            await self.store.put_engine(record)
        try:
            placement, port = await self._place(record)
        except PlacementError as exc:
            await self.store.update_engine(record.engine_id, state=S.FAILED, last_error=str(exc))
            await self._reject(env, record.engine_id, str(exc))
            await self._emit(EngineFailed(engine_id=record.engine_id, reason=str(exc)))
            return
        await self._launch(record, placement, port)

    async def _place(self, record: EngineRecord) -> tuple[Placement, int]:
        nodes = await live_nodes(self.store)
        gpu_count = (
            record.tensor_parallel_size * record.pipeline_parallel_size
            if resolve_use_gpu(record.kind, record.use_gpu)
            else 0
        )
        total_gb = estimate_memory_gb(
            record.model,
            kind=record.kind,
            backend=record.backend,
            required_memory_gb=record.required_memory_gb,
        )
        demand = Demand(gpu_count, total_gb / max(gpu_count, 1), record.requested_node)
        placement = place(demand, nodes)
        node = next(n for n in nodes if n.node_id == placement.node_id)
        for _attempt in range(3):
            port = choose_port(node, record.requested_port)
            if await self.store.assign_port(node.node_id, port, record.engine_id):
                return placement, port
            node = next(n for n in await live_nodes(self.store) if n.node_id == node.node_id)
        raise PlacementError(f"could not assign a port on {node.node_id}: ports keep changing")

    async def _launch(self, record: EngineRecord, placement: Placement, port: int) -> None:
        node_id = placement.node_id
        use_gpu = bool(placement.gpus)
        if use_gpu:
            reservation = Reservation(
                gpus=list(placement.gpus), memory_gb=placement.memory_gb_per_gpu
            )
            await self.store.reserve_gpus(node_id, record.engine_id, reservation)
        generation = record.generation + 1
        url = f"http://{placement.address}:{port}"
        await self.store.update_engine(
            record.engine_id,
            state=S.STARTING,
            node=node_id,
            host=placement.address,
            port=port,
            url=url,
            gpus=list(placement.gpus),
            generation=generation,
            memory_gb=placement.memory_gb_per_gpu * max(len(placement.gpus), 1),
        )
        await self._emit(
            EnginePlaced(
                engine_id=record.engine_id,
                node=node_id,
                port=port,
                gpus=placement.gpus,
                memory_gb=placement.memory_gb_per_gpu,
            )
        )
        launch = LaunchEngine(
            engine_id=record.engine_id,
            generation=generation,
            model=record.model,
            kind=record.kind,
            backend=record.backend,
            host=placement.address,
            port=port,
            gpus=placement.gpus,
            use_gpu=use_gpu,
            tensor_parallel_size=record.tensor_parallel_size,
            pipeline_parallel_size=record.pipeline_parallel_size,
            extra_args=tuple(record.extra_args),
            gpu_memory_utilization=_vllm_fraction(record, placement),
        )
        commands: list[Message] = []
        if use_gpu:
            commands.append(
                AllocateGpus(
                    engine_id=record.engine_id,
                    gpus=placement.gpus,
                    memory_gb=placement.memory_gb_per_gpu,
                )
            )
        commands.append(launch)
        await self.bus.publish_many(self.keys.node_commands(node_id), commands)
        log.info(
            "placed %s on %s port %d GPUs %s",
            record.engine_id,
            node_id,
            port,
            list(placement.gpus) or "none (CPU)",
        )

    async def _on_stop(self, env: Envelope) -> None:
        req = env.payload
        assert isinstance(req, StopEngine)
        record = await self.store.get_engine(req.engine_id)
        if record is None:
            await self._reject(env, req.engine_id, f"no engine {req.engine_id!r}")
            return
        if record.node is None or record.state.terminal or record.state == S.PENDING:
            await self._finish(record, S.STOPPED, None)
            await self._emit(EngineStopped(engine_id=record.engine_id, node=record.node))
            return
        await self.store.update_engine(record.engine_id, state=S.STOPPING)
        await self.bus.publish(
            self.keys.node_commands(record.node), TerminateEngine(engine_id=record.engine_id)
        )

    # -- events --------------------------------------------------------------------------
    async def _current(self, engine_id: str, generation: int | None) -> EngineRecord | None:
        """The record an event is about, or None if the event is stale or unknown."""
        record = await self.store.get_engine(engine_id)
        if record is None or (generation is not None and generation != record.generation):
            return None
        return record

    async def _on_starting(self, env: Envelope) -> None:
        ev = env.payload
        assert isinstance(ev, EngineStarting)
        record = await self._current(ev.engine_id, ev.generation)
        if record is not None and record.state == S.STARTING:
            await self.store.update_engine(ev.engine_id, pid=ev.pid, argv=list(ev.argv))

    async def _on_ready(self, env: Envelope) -> None:
        ev = env.payload
        assert isinstance(ev, EngineReady)
        record = await self._current(ev.engine_id, ev.generation)
        if record is not None and record.state in _LIVE:
            await self.store.update_engine(
                ev.engine_id, state=S.RUNNING, url=ev.url, last_error=None
            )
            log.info("%s RUNNING at %s", ev.engine_id, ev.url)

    async def _on_unhealthy(self, env: Envelope) -> None:
        ev = env.payload
        assert isinstance(ev, EngineUnhealthy)
        record = await self._current(ev.engine_id, None)
        if record is not None and record.state in _LIVE:
            await self.store.update_engine(ev.engine_id, state=S.UNHEALTHY, last_error=ev.reason)

    async def _on_exited(self, env: Envelope) -> None:
        ev = env.payload
        assert isinstance(ev, EngineExited)
        record = await self._current(ev.engine_id, ev.generation)
        if record is None or record.state not in _LIVE:
            return
        reason = f"engine {ev.reason}" + (f": {ev.last_lines[-1]}" if ev.last_lines else "")
        await self._finish(record, S.FAILED, reason)
        await self._emit(
            EngineFailed(engine_id=ev.engine_id, reason=reason, last_lines=ev.last_lines)
        )
        log.error("%s FAILED: %s", ev.engine_id, reason)

    async def _on_launch_failed(self, env: Envelope) -> None:
        ev = env.payload
        assert isinstance(ev, EngineLaunchFailed)
        record = await self._current(ev.engine_id, ev.generation)
        if record is None or record.state.terminal:
            return
        reason = f"launch failed on {ev.node}: {ev.reason}"
        await self._finish(record, S.FAILED, reason)
        await self._emit(EngineFailed(engine_id=ev.engine_id, reason=reason))

    async def _on_stopped(self, env: Envelope) -> None:
        ev = env.payload
        assert isinstance(ev, EngineStopped)
        record = await self.store.get_engine(ev.engine_id)
        if record is not None and record.state == S.STOPPING:
            await self._finish(record, S.STOPPED, None)
            log.info("%s STOPPED", ev.engine_id)

    async def _finish(self, record: EngineRecord, state: EngineState, error: str | None) -> None:
        """Enter a terminal state: give back the port and GPUs, clear where it ran."""
        if record.node is not None:
            if record.port is not None:
                await self.store.release_port(record.node, record.port, record.engine_id)
            await self.store.release_gpus(record.node, record.engine_id)
            if record.gpus:
                release = ReleaseGpus(engine_id=record.engine_id)
                await self.bus.publish(self.keys.node_commands(record.node), release)
        changes: dict[str, Any] = {
            "state": state,
            "pid": None,
            "port": None,
            "url": None,
            "gpus": [],
        }
        if error is not None:
            changes["last_error"] = error
        await self.store.update_engine(record.engine_id, **changes)


def _new_record(req: StartEngine) -> EngineRecord:
    return EngineRecord(
        engine_id=req.engine_id,
        model=req.model,
        kind=req.kind,
        backend=req.backend or default_backend(req.kind),
        state=S.PENDING,
        use_gpu=req.use_gpu,
        tensor_parallel_size=req.tensor_parallel_size,
        pipeline_parallel_size=req.pipeline_parallel_size,
        extra_args=list(req.extra_args),
        required_memory_gb=req.required_memory_gb,
        engine_label=req.engine_label,
        max_concurrent_requests=req.max_concurrent_requests,
        metadata=req.metadata,
        requested_port=req.port,
        requested_node=req.node,
    )


def _vllm_fraction(record: EngineRecord, placement: Placement) -> float | None:
    """vLLM takes 90 % of a GPU unless told; tell it to take what was reserved."""
    if record.backend != "vllm" or not placement.gpus:
        return None
    return gpu_memory_utilization(placement.memory_gb_per_gpu, placement.smallest_gpu_gb)
