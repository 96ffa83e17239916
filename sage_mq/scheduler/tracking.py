"""Engine records follow what agents report: starting, ready, adopted, stopped; and the end."""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import ValidationError

from sage_mq.messages import (
    EngineAdopted,
    EngineReady,
    EngineRestored,
    EngineStarting,
    EngineStopped,
    Message,
    TerminateEngine,
)
from sage_mq.scheduler.context import Context
from sage_mq.store import EngineRecord, EngineState, Reservation
from sage_mq.wire import Envelope

log = logging.getLogger(__name__)
S = EngineState
LIVE = (S.STARTING, S.RUNNING, S.UNHEALTHY)


class Tracking:
    """Keeps records in step with agent events, and gives resources back at the end."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def on_starting(self, ev: EngineStarting, env: Envelope) -> None:
        """The process exists: record its pid and argv."""
        record = await self.ctx.current(ev.engine_id, ev.generation)
        if record is not None and record.state == S.STARTING:
            await self.ctx.store.update_engine(
                ev.engine_id, current=record, pid=ev.pid, argv=list(ev.argv)
            )

    async def on_adopted(self, ev: EngineAdopted, env: Envelope) -> None:
        """An agent runs the process (it restarted, or reached Redis again): keep it, rebuild
        its record if Redis lost it, or stop it if it is a stale copy."""
        record = await self.ctx.store.get_engine(ev.engine_id)
        if record is None or ev.generation > record.generation:
            # No record, or one older than what runs: Redis lost it (it came back empty) and
            # it may have been rebuilt from an older copy. What runs is the engine.
            rebuilt = launched_record(ev)
            if rebuilt is not None:
                await self._rebuild(rebuilt, record)
                return
        current = (
            record is not None and record.node == ev.node and record.generation == ev.generation
        )
        if record is not None and current and record.state in LIVE:
            await self.ctx.store.update_engine(ev.engine_id, pid=ev.pid)
        elif record is not None and _moved_and_not_yet_served(record, ev):
            await self._take_back(record, ev)
        elif not current or (record is not None and record.state.terminal):
            log.warning(
                "%s generation %d on %s is a stale copy: stopping it",
                ev.engine_id,
                ev.generation,
                ev.node,
            )
            await self.ctx.command(
                ev.node, TerminateEngine(engine_id=ev.engine_id, generation=ev.generation)
            )

    async def _take_back(self, record: EngineRecord, ev: EngineAdopted) -> None:
        """A lost node is back and still runs the engine, whose replacement does not serve
        yet: the original is kept as it is (same process, port and GPUs), the replacement is
        withdrawn. Moving a model that loads for minutes costs more than it saves."""
        original = launched_record(ev)
        if original is None:
            await self.ctx.command(
                ev.node, TerminateEngine(engine_id=ev.engine_id, generation=ev.generation)
            )
            return
        if record.node is not None:  # the replacement was placed: its port, GPUs and process go
            replacement = TerminateEngine(engine_id=record.engine_id, generation=record.generation)
            await self.release(record, replacement)
        kept = original.model_copy(
            update={
                "spent_generation": max(record.spent_generation, record.generation),
                "restarts": record.restarts,
                "lost_node": None,
                "last_error": f"taken back on {ev.node}: it ran there all along",
            }
        )
        log.warning(
            "%s: node %s is back with generation %d still running; it is kept, and the "
            "replacement (%s on %s) withdrawn",
            ev.engine_id,
            ev.node,
            ev.generation,
            record.state.value,
            record.node or "nowhere yet",
        )
        await self._rebuild(kept, None)

    async def _rebuild(self, rebuilt: EngineRecord, older: EngineRecord | None) -> None:
        """Make ``rebuilt`` the record again, with its port and GPUs reserved; an older copy
        that a previous report rebuilt is stopped."""
        if older is not None and older.node is not None:
            log.warning(
                "%s generation %d on %s is older than generation %d on %s: stopping it",
                older.engine_id,
                older.generation,
                older.node,
                rebuilt.generation,
                rebuilt.node,
            )
            stale = TerminateEngine(engine_id=older.engine_id, generation=older.generation)
            await self.release(older, stale)
        node, port = rebuilt.node, rebuilt.port
        assert node is not None and port is not None
        if not await self.ctx.fleet.assign_port(node, port, rebuilt.engine_id):
            log.error(
                "%s runs on port %d of %s, which is assigned to another engine meanwhile; "
                "that one's launch will find the port taken and move",
                rebuilt.engine_id,
                port,
                node,
            )
        if rebuilt.gpus:
            per_gpu = rebuilt.memory_gb / len(rebuilt.gpus)
            reservation = Reservation(gpus=list(rebuilt.gpus), memory_gb=per_gpu)
            await self.ctx.fleet.reserve_gpus(node, rebuilt.engine_id, reservation)
        await self.ctx.store.put_engine(rebuilt)
        await self.ctx.emit(
            EngineRestored(
                engine_id=rebuilt.engine_id,
                node=node,
                generation=rebuilt.generation,
                state=rebuilt.state.value,
            )
        )
        if rebuilt.state == S.RUNNING:
            self.ctx.steady.remember(node, rebuilt.engine_id, time.monotonic())
        log.warning(
            "%s had no record (Redis lost it): rebuilt from what %s reports, generation %d "
            "pid %s; it is adopted, not restarted",
            rebuilt.engine_id,
            node,
            rebuilt.generation,
            rebuilt.pid,
        )

    async def on_ready(self, ev: EngineReady, env: Envelope) -> None:
        """Healthy: RUNNING, and the stability window starts."""
        record = await self.ctx.current(ev.engine_id, ev.generation)
        if record is None or record.state not in LIVE:
            return
        changes: dict[str, Any] = {"state": S.RUNNING, "url": ev.url, "probe_failures": 0}
        if record.state != S.RUNNING:
            changes["running_since"] = time.time()
        if record.lost_node is not None:  # a replacement serves: the original is stale now
            changes["lost_node"] = None
        await self.ctx.store.update_engine(ev.engine_id, current=record, **changes)
        self.ctx.steady.remember(ev.node, ev.engine_id, time.monotonic())
        log.info("%s RUNNING at %s (generation %d)", ev.engine_id, ev.url, ev.generation)

    async def on_stopped(self, ev: EngineStopped, env: Envelope) -> None:
        """A requested stop is done."""
        record = await self.ctx.store.get_engine(ev.engine_id)
        if record is not None and record.state == S.STOPPING:
            await self.finish(record, S.STOPPED, None)
            log.info("%s STOPPED", ev.engine_id)

    async def finish(self, record: EngineRecord, state: EngineState, error: str | None) -> None:
        """Enter a terminal state: give back the port and GPUs, clear where it ran."""
        await self.release(record)
        changes: dict[str, Any] = {
            "state": state,
            "pid": None,
            "port": None,
            "url": None,
            "gpus": [],
            "running_since": None,
        }
        if error is not None:
            changes["last_error"] = error
        await self.ctx.store.update_engine(record.engine_id, **changes)

    async def release(self, record: EngineRecord, *then: Message) -> None:
        """Give back the port and GPUs the record holds where it ran, and send that node
        ``then`` in the same round trip."""
        if record.node is None:
            return
        await self.ctx.fleet.release(record.node, record.engine_id, record.port)
        if then:
            await self.ctx.command(record.node, *then)


def _moved_and_not_yet_served(record: EngineRecord, ev: EngineAdopted) -> bool:
    """Whether the reported copy is the one moved away from its lost node, and no other copy
    serves in its place yet (the replacement waits, starts, or backs off)."""
    waiting = (S.PENDING, S.STARTING, S.RESTARTING)
    return record.lost_node == ev.node and record.state in waiting and ev.record is not None


def launched_record(ev: EngineAdopted) -> EngineRecord | None:
    """The record an adopted engine was launched with, made current: on the reporting node with
    its pid, RUNNING if it answered its agent's probe (else STARTING: its readiness report
    follows); None if the report carries none."""
    if ev.record is None:
        return None
    try:
        launched = EngineRecord.model_validate(ev.record)
    except ValidationError as exc:
        log.error("%s: the record its agent reports is unreadable: %s", ev.engine_id, exc)
        return None
    if launched.engine_id != ev.engine_id or launched.port is None:
        log.error("%s: its agent reports a record of %r", ev.engine_id, launched.engine_id)
        return None
    return launched.model_copy(
        update={
            "state": S.RUNNING if ev.ready else S.STARTING,
            "node": ev.node,
            "pid": ev.pid,
            "generation": ev.generation,
            "running_since": time.time() if ev.ready else None,
            "probe_failures": 0,
            "updated_at": time.time(),
        }
    )
