"""Engine records follow what agents report: starting, ready, adopted, stopped; and the end."""

from __future__ import annotations

import logging
import time
from typing import Any

from sage_mq.messages import (
    EngineAdopted,
    EngineReady,
    EngineStarting,
    EngineStopped,
    Envelope,
    ReleaseGpus,
    TerminateEngine,
)
from sage_mq.scheduler.context import Context
from sage_mq.store import EngineRecord, EngineState

log = logging.getLogger(__name__)
S = EngineState
LIVE = (S.STARTING, S.RUNNING, S.UNHEALTHY)


class Tracking:
    """Keeps records in step with agent events, and gives resources back at the end."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def on_starting(self, env: Envelope) -> None:
        """The process exists: record its pid and argv."""
        ev = env.payload
        assert isinstance(ev, EngineStarting)
        record = await self.ctx.current(ev.engine_id, ev.generation)
        if record is not None and record.state == S.STARTING:
            await self.ctx.store.update_engine(
                ev.engine_id, current=record, pid=ev.pid, argv=list(ev.argv)
            )

    async def on_adopted(self, env: Envelope) -> None:
        """A restarted agent still runs the process: keep it, or stop it if it is stale."""
        ev = env.payload
        assert isinstance(ev, EngineAdopted)
        record = await self.ctx.store.get_engine(ev.engine_id)
        current = (
            record is not None and record.node == ev.node and record.generation == ev.generation
        )
        if record is not None and current and record.state in LIVE:
            await self.ctx.store.update_engine(ev.engine_id, pid=ev.pid)
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

    async def on_ready(self, env: Envelope) -> None:
        """Healthy: RUNNING, and the stability window starts."""
        ev = env.payload
        assert isinstance(ev, EngineReady)
        record = await self.ctx.current(ev.engine_id, ev.generation)
        if record is None or record.state not in LIVE:
            return
        changes: dict[str, Any] = {"state": S.RUNNING, "url": ev.url, "probe_failures": 0}
        if record.state != S.RUNNING:
            changes["running_since"] = time.time()
        await self.ctx.store.update_engine(ev.engine_id, current=record, **changes)
        self.ctx.steady.remember(ev.node, ev.engine_id, time.monotonic())
        log.info("%s RUNNING at %s (generation %d)", ev.engine_id, ev.url, ev.generation)

    async def on_stopped(self, env: Envelope) -> None:
        """A requested stop is done."""
        ev = env.payload
        assert isinstance(ev, EngineStopped)
        record = await self.ctx.store.get_engine(ev.engine_id)
        if record is not None and record.state == S.STOPPING:
            await self.finish(record, S.STOPPED, None)
            log.info("%s STOPPED", ev.engine_id)

    async def finish(self, record: EngineRecord, state: EngineState, error: str | None) -> None:
        """Enter a terminal state: give back the port and GPUs, clear where it ran."""
        if record.node is not None:
            await self.ctx.fleet.release(record.node, record.engine_id, record.port)
            if record.gpus:
                await self.ctx.command(record.node, ReleaseGpus(engine_id=record.engine_id))
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
