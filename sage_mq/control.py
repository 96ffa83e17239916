"""ControlPlaneManager: the management facade over Redis (used by the CLI, gateway and client).

It publishes requests to the scheduler and can wait for their outcome on ``sage:events``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ValidationError

from sage_mq.broker import Broker
from sage_mq.connection import Redis
from sage_mq.errors import (
    DecodeError,
    EngineFailedError,
    EngineNotFound,
    InvalidRequest,
    RequestRejectedError,
    WaitTimeout,
)
from sage_mq.gpu import GIB
from sage_mq.messages import RestartEngine, StartEngine, StopEngine
from sage_mq.presets import Preset, apply
from sage_mq.scheduler.placement import check_request
from sage_mq.settings import Settings
from sage_mq.spec import EngineSpec
from sage_mq.store import EngineRecord, EngineState, NodeRecord
from sage_mq.wire import Envelope, decode, envelope

log = logging.getLogger(__name__)
EventCallback = Callable[[Envelope], None]
_FAILURE_EVENTS = ("engine.failed", "request.rejected")
_REACHED_BY = {"engine.ready": EngineState.RUNNING, "engine.stopped": EngineState.STOPPED}


class ControlPlaneManager:
    """Start, stop, list and inspect engines across the fleet."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        redis: Redis | None = None,
        broker: Broker | None = None,
    ) -> None:
        self.settings = settings or (broker.settings if broker else Settings())
        self.broker = broker or Broker(self.settings, redis=redis)
        self._owns_broker = broker is None
        self.redis, self.keys = self.broker.redis, self.broker.keys
        self.bus, self.store = self.broker.bus, self.broker.store

    async def __aenter__(self) -> ControlPlaneManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Release the Redis connection if this manager made it."""
        if self._owns_broker:
            await self.broker.aclose()

    # -- engines -------------------------------------------------------------------------
    async def request_engine_startup(
        self,
        model_id: str,
        *,
        engine_kind: str = "llm",
        engine_id: str | None = None,
        wait: bool = False,
        timeout: float = 1800.0,
        on_event: EventCallback | None = None,
        **spec: Any,
    ) -> EngineRecord:
        """Ask the scheduler to start an engine of ``model_id``; ``spec`` holds the other
        fields of :class:`~sage_mq.spec.EngineSpec` (``use_gpu``, ``tensor_parallel_size``,
        ``port``, ``node``, ``backend``, ``extra_args``, ``required_memory_gb``, ...). See
        :meth:`start_engine`. ``metadata`` and ``env`` may be None (none)."""
        given = {k: v for k, v in spec.items() if v is not None or k not in ("metadata", "env")}
        try:
            checked = EngineSpec.model_validate({"model": model_id, "kind": engine_kind, **given})
        except ValidationError as exc:
            raise InvalidRequest(_explain(exc)) from None
        return await self.start_engine(
            checked, engine_id=engine_id, wait=wait, timeout=timeout, on_event=on_event
        )

    async def start_engine(
        self,
        spec: EngineSpec,
        *,
        engine_id: str | None = None,
        wait: bool = False,
        timeout: float = 1800.0,
        on_event: EventCallback | None = None,
    ) -> EngineRecord:
        """Ask the scheduler to start an engine of ``spec``, as ``engine_id`` (default: one made
        from its label or model); with ``wait``, return once it is RUNNING.

        Raises :class:`InvalidRequest` for a request that can never succeed, and (when waiting)
        :class:`RequestRejectedError`, :class:`EngineFailedError` or :class:`WaitTimeout`.
        """
        engine_id = engine_id or new_engine_id(spec.engine_label or spec.model)
        try:
            request = StartEngine(engine_id=engine_id, **spec.model_dump())
        except ValidationError as exc:
            raise InvalidRequest(_explain(exc)) from None
        check_request(request)
        cursor = await self.bus.last_id(self.keys.events)
        record = EngineRecord.pending(request.engine_id, request.spec)
        await self.store.add_engine(record)  # PENDING at once: accepted, not yet placed
        await self.bus.publish(self.keys.requests, envelope(request))
        log.info("requested start of %s (%s)", request.engine_id, spec.model)
        if not wait:
            return record
        return await self.wait_for_engine(
            request.engine_id,
            until=(EngineState.RUNNING,),
            since=cursor,
            timeout=timeout,
            on_event=on_event,
        )

    async def stop_engine(
        self,
        engine_id: str,
        *,
        wait: bool = False,
        timeout: float = 60.0,
        on_event: EventCallback | None = None,
    ) -> EngineRecord:
        """Ask the scheduler to stop an engine; with ``wait``, return once it is STOPPED."""
        record = await self.get_engine(engine_id)
        cursor = await self.bus.last_id(self.keys.events)
        await self.bus.publish(self.keys.requests, StopEngine(engine_id=engine_id))
        if not wait:
            return record
        return await self.wait_for_engine(
            engine_id,
            until=(EngineState.STOPPED,),
            since=cursor,
            timeout=timeout,
            on_event=on_event,
        )

    async def restart_engine(
        self,
        engine_id: str,
        *,
        wait: bool = False,
        timeout: float = 600.0,
        on_event: EventCallback | None = None,
    ) -> EngineRecord:
        """Restart an engine as itself, now: same id, node, port, GPUs and arguments, a new
        process (a FAILED or STOPPED one is placed again). With ``wait``, return once the new
        process is RUNNING."""
        record = await self.get_engine(engine_id)
        cursor = await self.bus.last_id(self.keys.events)
        await self.bus.publish(self.keys.requests, RestartEngine(engine_id=engine_id))
        log.info("requested restart of %s (generation %d)", engine_id, record.generation)
        if not wait:
            return record
        return await self.wait_for_engine(
            engine_id,
            until=(EngineState.RUNNING,),
            since=cursor,
            timeout=timeout,
            on_event=on_event,
            newer_than=record.generation,
        )

    async def apply_preset(
        self,
        preset: Preset,
        *,
        wait: bool = True,
        rollback: bool = True,
        timeout: float = 1800.0,
        on_event: EventCallback | None = None,
    ) -> list[EngineRecord]:
        """Start every engine of a preset (see :func:`sage_mq.presets.apply`)."""
        return await apply(
            self, preset, wait=wait, rollback=rollback, timeout=timeout, on_event=on_event
        )

    async def get_engine(self, engine_id: str) -> EngineRecord:
        """The engine record; :class:`EngineNotFound` if there is none."""
        record = await self.store.get_engine(engine_id)
        if record is None:
            raise EngineNotFound(f"no engine {engine_id!r} (see `sage llm engine list`)")
        return record

    async def list_engines(self) -> list[EngineRecord]:
        """Every engine record, oldest first."""
        return await self.store.list_engines()

    async def list_nodes(self) -> list[tuple[NodeRecord, bool]]:
        """Every node with whether its agent is alive."""
        return await self.store.list_nodes()

    async def gpus(self) -> list[dict[str, Any]]:
        """Every GPU of every node, with what the scheduler has reserved on it and for whom."""
        rows = []
        for node, alive in await self.list_nodes():
            reservations = await self.store.reservations(node.node_id)
            for g in node.gpus:
                holders = {e: r.memory_gb for e, r in reservations.items() if g.index in r.gpus}
                rows.append(
                    {
                        "node": node.node_id,
                        "alive": alive,
                        "index": g.index,
                        "name": g.name,
                        "memory_total_gib": round(g.memory_total / GIB, 1),
                        "memory_used_gib": round(g.memory_used / GIB, 1),
                        "reserved_gib": round(sum(holders.values()), 1),
                        "engines": sorted(holders),
                        "fake": g.fake,
                    }
                )
        return rows

    async def status(self) -> dict[str, Any]:
        """A summary of the fleet: engines by state, nodes, GPUs, stream backlogs."""
        engines = await self.list_engines()
        nodes = await self.list_nodes()
        by_state: dict[str, int] = {}
        for record in engines:
            by_state[record.state.value] = by_state.get(record.state.value, 0) + 1
        names = {"requests": self.keys.requests, "events": self.keys.events, "dead": self.keys.dead}
        streams = dict(zip(names, await self.bus.lengths(list(names.values())), strict=True))
        gpus = [g for record, alive in nodes if alive for g in record.gpus]
        return {
            "namespace": self.keys.namespace,
            "engines": {"total": len(engines), "by_state": by_state},
            "nodes": {"total": len(nodes), "alive": sum(1 for _, alive in nodes if alive)},
            "gpus": {
                "total": len(gpus),
                "memory_total_gib": round(sum(g.memory_total for g in gpus) / GIB, 1),
            },
            "streams": streams,
        }

    # -- waiting for outcomes ------------------------------------------------------------
    async def wait_for_engine(
        self,
        engine_id: str,
        *,
        until: Iterable[EngineState],
        since: str = "$",
        timeout: float = 600.0,
        on_event: EventCallback | None = None,
        pickup_timeout: float = 15.0,
        newer_than: int | None = None,
    ) -> EngineRecord:
        """Follow ``sage:events`` until the engine reaches one of ``until`` (or fails).

        With ``newer_than``, only a generation after that one counts (a restart). With no
        record after ``pickup_timeout`` seconds, no scheduler is running: say so.
        """

        def new(generation: int | None) -> bool:
            return newer_than is None or (generation or 0) > newer_than

        goal = set(until)
        started, since_wall = time.monotonic(), time.time()
        deadline = started + timeout
        async for entry_id, fields in self.bus.tail(self.keys.events, since):
            env = _decode_quietly(fields) if entry_id else None
            ours = env is not None and getattr(env.payload, "engine_id", None) == engine_id
            if env is not None and ours:
                if on_event is not None:
                    on_event(env)
                if env.type in _FAILURE_EVENTS and EngineState.FAILED not in goal:
                    raise _failure(env)
            if entry_id and not ours:
                continue  # someone else's event: no need to look at the record
            reached = env is not None and ours and _REACHED_BY.get(env.type) in goal
            if reached and env is not None and new(getattr(env.payload, "generation", None)):
                return await self._settled(engine_id, goal)
            record = await self.store.get_engine(engine_id)
            untouched = record is None or (
                record.state == EngineState.PENDING and record.updated_at < since_wall
            )  # (a start request writes its PENDING record; the scheduler changes it)
            if untouched and time.monotonic() - started > pickup_timeout:
                raise WaitTimeout(
                    f"no scheduler took the request for {engine_id} within {pickup_timeout:.0f}s; "
                    f"it stays queued in {self.keys.requests} until one runs "
                    "(`sage llm scheduler run`)"
                )
            if record is not None and record.state in goal and new(record.generation):
                return record
            if record is not None and record.state.terminal and new(record.generation):
                raise EngineFailedError(f"{engine_id} is {record.state}: {record.last_error}")
            if time.monotonic() > deadline:
                state = record.state if record else "unknown"
                raise WaitTimeout(
                    f"{engine_id} still {state} after {timeout:.0f}s; "
                    "follow it with `sage llm events --follow`"
                )
        raise WaitTimeout(f"event stream ended while waiting for {engine_id}")  # pragma: no cover

    async def _settled(self, engine_id: str, goal: set[EngineState]) -> EngineRecord:
        """The record once the scheduler has applied the event that reached the goal.

        The event itself is the proof (an engine may be RUNNING only briefly, e.g. if it hangs
        soon after); the record normally follows within milliseconds.
        """
        record = await self.get_engine(engine_id)
        for _ in range(100):
            if record.state in goal:
                break
            await asyncio.sleep(0.01)
            record = await self.get_engine(engine_id)
        return record


def new_engine_id(name: str) -> str:
    """A readable, unique engine id: the model's last path part, slugged, plus 6 hex digits."""
    base = name.rstrip("/").rsplit("/", 1)[-1].lower()
    slug = re.sub(r"[^a-z0-9._-]+", "-", base).strip("-.")[:40] or "engine"
    return f"{slug}-{uuid.uuid4().hex[:6]}"


def _decode_quietly(fields: dict[str, str]) -> Envelope | None:
    try:
        return decode(fields)
    except DecodeError:
        return None


def _failure(env: Envelope) -> Exception:
    reason = str(getattr(env.payload, "reason", "unknown reason"))
    if env.type == "request.rejected":
        return RequestRejectedError(reason)
    lines = tuple(getattr(env.payload, "last_lines", ()))
    tail = ("\n  " + "\n  ".join(lines[-5:])) if lines else ""
    return EngineFailedError(f"{reason}{tail}")


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')}")
    return "invalid engine request: " + "; ".join(parts)
