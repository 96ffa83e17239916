"""Healing: exits, failed probes and launch failures become restarts with backoff, or FAILED."""

from __future__ import annotations

import logging
import time

from sage_mq.engines.backends import permanent_exit
from sage_mq.messages import (
    EngineExited,
    EngineFailed,
    EngineLaunchFailed,
    EnginePortChanged,
    EngineRestarting,
    EngineUnhealthy,
    HealthTick,
    NodeHealth,
    RelaunchEngine,
    RestartEngine,
    TerminateEngine,
)
from sage_mq.scheduler.context import Context
from sage_mq.scheduler.placing import Placing
from sage_mq.scheduler.policy import GiveUp, after_failure, after_probe
from sage_mq.scheduler.tracking import LIVE, Tracking
from sage_mq.store import EngineRecord, EngineState
from sage_mq.wire import Envelope

log = logging.getLogger(__name__)
S = EngineState


class Healing:
    """Decides, by the restart policy, what happens to an engine that failed."""

    def __init__(self, ctx: Context, placing: Placing, tracking: Tracking) -> None:
        self.ctx = ctx
        self.placing = placing
        self.tracking = tracking
        self.policy = ctx.scheduler.policy
        self.steady = ctx.steady

    async def on_exited(self, ev: EngineExited, env: Envelope) -> None:
        """The process died on its own: restart directly (after backoff)."""
        record = await self.ctx.current(ev.engine_id, ev.generation)
        if record is not None and record.state == S.PENDING and record.lost_node == ev.node:
            await self.placing.place_pending(record)  # it died while its node was away: move
            return
        if record is None or record.state not in LIVE:
            return
        reason = f"engine {ev.reason}" + (f": {ev.last_lines[-1]}" if ev.last_lines else "")
        permanent = permanent_exit(record.backend, ev.returncode)
        if permanent is not None:  # no attempt spent on what cannot mend itself
            await self.fail(record, f"{reason}; not restarted: {permanent}", ev.last_lines)
            return
        await self.fail_or_restart(record, reason, ev.last_lines, still_running=False)

    async def on_launch_failed(self, ev: EngineLaunchFailed, env: Envelope) -> None:
        """The agent could not spawn it: try again (a port may free up) or give up."""
        record = await self.ctx.current(ev.engine_id, ev.generation)
        if record is None or record.state not in LIVE:
            return
        reason = f"launch failed on {ev.node}: {ev.reason}"
        if ev.refused:  # not allowed there as written: another try would be refused again
            await self.fail(record, reason, ())
            return
        if ev.port_in_use:
            moved = await self.placing.change_port(record)
            if moved.port != record.port:  # a free port: launched there now, no attempt spent
                assert moved.port is not None and record.port is not None
                await self.ctx.emit(
                    EnginePortChanged(
                        engine_id=record.engine_id,
                        node=ev.node,
                        old_port=record.port,
                        new_port=moved.port,
                        reason=ev.reason,
                    )
                )
                await self.placing.relaunch(moved)
                return
        await self.fail_or_restart(record, reason, (), still_running=False)

    async def on_unhealthy(self, ev: EngineUnhealthy, env: Envelope) -> None:
        """The agent gave up waiting for readiness (startup timeout): restart it."""
        record = await self.ctx.current(ev.engine_id, ev.generation)
        if record is None or record.state not in LIVE:
            return
        await self.fail_or_restart(record, ev.reason, (), still_running=True)

    async def on_node_health(self, ev: NodeHealth, env: Envelope) -> None:
        """Probe results of one node: count consecutive failures of RUNNING engines.

        A failed probe gets the node probed again at once rather than at the next tick (as
        HAProxy's ``fastinter``): a hang is confirmed in about threshold times the probe timeout.
        """
        now = time.monotonic()
        to_judge = [
            engine_id
            for engine_id, healthy in ev.results.items()
            if not (healthy and self.steady.known(ev.node_id, engine_id, now))
        ]
        if not to_judge:
            return  # the common case, at no cost: healthy engines known to be RUNNING
        states = await self.ctx.store.probe_states(to_judge)  # one round trip
        suspects = 0
        for engine_id in to_judge:
            healthy = ev.results[engine_id]
            node, state, failures = states.get(engine_id, ("", "", 0))
            if node != ev.node_id or state not in (S.RUNNING, S.UNHEALTHY):
                continue  # not ours, or STARTING (its startup grace)
            if healthy and not failures:
                if state == S.RUNNING:
                    self.steady.remember(node, engine_id, now)
                continue
            self.steady.forget(node, engine_id)
            record = await self.ctx.store.get_engine(engine_id)
            if record is not None:
                suspects += await self._probed(record, healthy)
        if suspects:
            recheck = HealthTick(timeout_s=self.ctx.scheduler.probe_timeout_s)
            await self.ctx.command(ev.node_id, recheck)

    async def _probed(self, record: EngineRecord, healthy: bool) -> bool:
        """Count one probe result; whether the engine is now suspect (failed, not replaced)."""
        failures, restart = after_probe(self.policy, record.probe_failures, healthy)
        if restart:
            reason = f"failed {failures} consecutive health probes"
            await self.ctx.emit(
                EngineUnhealthy(
                    engine_id=record.engine_id,
                    node=record.node or "unknown",
                    reason=reason,
                    generation=record.generation,
                )
            )
            await self.fail_or_restart(record, reason, (), still_running=True)
            return False
        if failures != record.probe_failures:
            state = S.UNHEALTHY if failures else S.RUNNING
            await self.ctx.store.update_engine(
                record.engine_id, probe_failures=failures, state=state
            )
        return failures > 0

    async def fail_or_restart(
        self,
        record: EngineRecord,
        reason: str,
        last_lines: tuple[str, ...],
        *,
        still_running: bool,
    ) -> None:
        """Restart after backoff, keeping id, node, port, GPUs and args; or end FAILED."""
        if still_running and record.node is not None:  # hung: gone now, during the backoff
            hung = TerminateEngine(
                engine_id=record.engine_id,
                generation=record.generation,
                grace_s=self.ctx.scheduler.hung_grace_s,
            )
            await self.ctx.command(record.node, hung)
        decision = after_failure(
            self.policy,
            attempts=record.restart_attempt,
            running_since=record.running_since,
            now=time.time(),
        )
        if isinstance(decision, GiveUp):
            await self.fail(record, f"{reason}; {decision.reason}", last_lines)
            return
        await self.ctx.store.update_engine(
            record.engine_id,
            state=S.RESTARTING,
            restart_attempt=decision.attempt,
            restarts=record.restarts + 1,
            last_error=reason,
            pid=None,
            probe_failures=0,
            running_since=None,
        )
        relaunch = RelaunchEngine(
            engine_id=record.engine_id, generation=record.generation, attempt=decision.attempt
        )
        timer_id = f"relaunch-{record.engine_id}-{record.generation}"
        await self.ctx.timers.schedule(timer_id, time.time() + decision.delay_s, relaunch)
        await self.ctx.emit(
            EngineRestarting(
                engine_id=record.engine_id, attempt=decision.attempt, delay_s=decision.delay_s
            )
        )
        log.warning(
            "%s: %s; restart attempt %d in %.1fs",
            record.engine_id,
            reason,
            decision.attempt,
            decision.delay_s,
        )

    async def fail(self, record: EngineRecord, reason: str, last_lines: tuple[str, ...]) -> None:
        """End the engine FAILED: its port and GPUs back, ``engine.failed`` with the reason."""
        await self.tracking.finish(record, S.FAILED, reason)
        await self.ctx.emit(
            EngineFailed(engine_id=record.engine_id, reason=reason, last_lines=last_lines)
        )
        log.error("%s FAILED: %s", record.engine_id, reason)

    async def on_restart(self, req: RestartEngine, env: Envelope) -> None:
        """An operator asked: launch the next generation now, where the engine is (TERM, grace,
        KILL of the running one first, by the agent); a FAILED or STOPPED engine is placed again.
        Either way the attempt counter starts afresh."""
        record = await self.ctx.store.get_engine(req.engine_id)
        if record is None:
            await self.ctx.reject(env, req.engine_id, f"no engine {req.engine_id!r}")
            return
        if record.state == S.STOPPING:
            why = f"{req.engine_id} is stopping; start it again once it is STOPPED"
            await self.ctx.reject(env, req.engine_id, why)
            return
        if record.state == S.PENDING:  # waiting for capacity: try now, keep waiting if none
            if not await self.placing.place_pending(record):
                why = f"{req.engine_id} is still waiting for capacity: {record.last_error}"
                await self.ctx.reject(env, req.engine_id, why)
            return
        restarted = await self.ctx.store.update_engine(
            record.engine_id,
            current=record,
            restarts=record.restarts + 1,
            restart_attempt=0,
            probe_failures=0,
            running_since=None,
            pid=None,
            **({"state": S.PENDING} if record.state.terminal else {}),
        )
        assert restarted is not None
        if record.state.terminal:
            log.info("%s: restart asked for; placing it again", record.engine_id)
            await self.placing.start_pending(env, restarted)
            return
        assert record.node is not None
        self.steady.forget(record.node, record.engine_id)
        await self.ctx.emit(EngineRestarting(engine_id=record.engine_id, attempt=0, delay_s=0.0))
        log.info("%s: restart asked for (was %s)", record.engine_id, record.state.value)
        await self.placing.relaunch(restarted)

    async def on_relaunch(self, req: RelaunchEngine, env: Envelope) -> None:
        """A backoff timer fired: launch again, unless the engine moved on meanwhile."""
        record = await self.ctx.current(req.engine_id, req.generation)
        if record is not None and record.state == S.RESTARTING:
            await self.placing.relaunch(record)
