"""Scheduler: turns requests and events into placements, commands, restarts and record states.

It holds no state that is not in Redis. Any number may run: one leads (it holds a lease in
Redis, and its epoch fences its commands), the others stand by and take over when the lease
lapses. The leader reads requests and events with one consumer in one task, so records change
in order; beside it run the health ticker, the durable-timer loop and the lease renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from sage_mq.actor import Actor
from sage_mq.broker import Broker
from sage_mq.bus import Consumer
from sage_mq.connection import Redis, raise_if_cancelled
from sage_mq.dispatch import Handlers
from sage_mq.errors import ControlPlaneUnavailable
from sage_mq.messages import (
    EngineAdopted,
    EngineExited,
    EngineLaunchFailed,
    EngineReady,
    EngineStarting,
    EngineStopped,
    EngineUnhealthy,
    EvacuateNode,
    HealthTick,
    NodeHealth,
    NodeJoined,
    RelaunchEngine,
    RestartEngine,
    SchedulerElected,
    SettleNode,
    StartEngine,
    StopEngine,
)
from sage_mq.scheduler.context import Context
from sage_mq.scheduler.healing import Healing
from sage_mq.scheduler.lease import Lease
from sage_mq.scheduler.nodes import NodeWatch
from sage_mq.scheduler.placing import Placing
from sage_mq.scheduler.tracking import Tracking
from sage_mq.settings import SchedulerSettings, Settings
from sage_mq.wire import Envelope

log = logging.getLogger(__name__)
SCHEDULER_GROUP = "scheduler"


class Scheduler(Actor):
    """The actor that places engines, heals them, and keeps their records in step."""

    def __init__(
        self,
        settings: Settings,
        *,
        redis: Redis | None = None,
        name: str | None = None,
        scheduler: SchedulerSettings | None = None,
    ) -> None:
        self.settings = settings
        super().__init__()
        self.broker = Broker(settings, redis=redis)
        self.redis = self.broker.redis
        self.ctx = Context(scheduler or SchedulerSettings(), self.broker)
        self.keys, self.store, self.bus = self.ctx.keys, self.ctx.store, self.ctx.bus
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        tracking = Tracking(self.ctx)
        placing = Placing(self.ctx, tracking)
        healing = Healing(self.ctx, placing, tracking)
        self.nodes = NodeWatch(self.ctx, placing, tracking)
        self.handlers = (
            Handlers()
            .on(StartEngine, placing.on_start)
            .on(StopEngine, placing.on_stop)
            .on(RelaunchEngine, healing.on_relaunch)
            .on(RestartEngine, healing.on_restart)
            .on(EngineStarting, tracking.on_starting)
            .on(EngineAdopted, tracking.on_adopted)
            .on(EngineReady, tracking.on_ready)
            .on(EngineStopped, tracking.on_stopped)
            .on(EngineExited, healing.on_exited)
            .on(EngineLaunchFailed, healing.on_launch_failed)
            .on(EngineUnhealthy, healing.on_unhealthy)
            .on(NodeHealth, healing.on_node_health)
            .on(EvacuateNode, self.nodes.on_evacuate)
            .on(SettleNode, self.nodes.on_settle)
            .on(NodeJoined, self.nodes.on_joined)
        )
        self._active: Consumer | None = None

    def stop(self) -> None:
        """Ask :meth:`run` to return after the message in hand; safe to call twice."""
        super().stop()
        if self._active is not None:
            self._active.stop()

    def _consumer(self, lease: Lease | None = None) -> Consumer:
        """The consumer of requests and events; a leader's (``lease``) claims everything
        pending (its predecessor's too) and handles nothing once its lease may have lapsed."""
        return self.bus.consumer(
            [self.keys.requests, self.keys.events],
            SCHEDULER_GROUP,
            self.name,
            self.handle,
            takeover=lease is not None,
            gate=None if lease is None else lease.holds,
            urgent=self.keys.requests,  # a start waits for no flood of health reports
        )

    async def start(self) -> None:
        """Refuse a Redis too old for the fleet, in one line, before anything else."""
        await self.broker.refuse_old_server()

    async def run(self, *, until_idle: bool = False) -> None:
        """Stand by for the leader lease; lead while holding it; return when stopped.

        With ``until_idle`` (tests), consume what is there without a lease, then return.
        """
        if until_idle:
            self.ctx.fleet.forget()  # tests change the fleet between runs
            await self._consumer().run(until_idle=True)
            return
        lease = Lease(self.redis, self.keys, self.name, self.ctx.scheduler.lease_ttl_s)
        poll = min(0.5, self.ctx.scheduler.lease_ttl_s / 5)
        log.info("scheduler %s standing by for the leader lease", self.name)
        try:
            while not self.stopping:
                try:
                    epoch = await lease.acquire()
                except ControlPlaneUnavailable as exc:
                    log.warning("scheduler %s: %s", self.name, exc)
                    epoch = None
                if epoch is None:
                    await self.pause(poll)
                    continue
                await self._lead(lease, epoch)
        finally:
            with contextlib.suppress(ControlPlaneUnavailable):
                await lease.release()  # a standby takes over at once

    async def close(self) -> None:
        """Close the connection, if this scheduler made it, after :meth:`run` returned."""
        await self.broker.aclose()

    async def _lead(self, lease: Lease, epoch: int) -> None:
        """Carry out requests and events, tick and fire timers, while the lease is ours."""
        self.ctx.epoch = epoch
        self.ctx.fleet.forget()
        log.info("scheduler %s leads (epoch %d)", self.name, epoch)
        with contextlib.suppress(ControlPlaneUnavailable):
            await self.ctx.emit(SchedulerElected(name=self.name, epoch=epoch))
        consumer = self._active = self._consumer(lease)
        if self.stopping:
            consumer.stop()
        interval, timer_poll = self.ctx.scheduler.health_interval_s, self.ctx.scheduler.timer_poll_s
        helpers = [
            asyncio.create_task(self._every(interval, self.tick, lease), name="ticks"),
            asyncio.create_task(self._every(timer_poll, self.fire_timers, lease), name="timers"),
            asyncio.create_task(self._keep(lease, consumer), name="lease"),
        ]
        try:
            await consumer.run()
        finally:
            self._active = None
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def _keep(self, lease: Lease, consumer: Consumer) -> None:
        """Renew the lease every TTL/3; stop leading the moment it may be someone else's."""
        ttl = self.ctx.scheduler.lease_ttl_s
        while True:
            raise_if_cancelled()  # see connection.raise_if_cancelled
            await asyncio.sleep(ttl / 3)
            try:
                if await lease.renew():
                    continue
                log.error("scheduler %s lost the leader lease (epoch %d)", self.name, lease.epoch)
            except ControlPlaneUnavailable as exc:
                if lease.holds():
                    continue
                log.error("scheduler %s cannot renew its lease for %.0fs: %s", self.name, ttl, exc)
            consumer.stop()
            return

    async def handle(self, env: Envelope) -> None:
        """Settle one request or event (types the scheduler does not act on are acked)."""
        await self.handlers.dispatch(env)

    async def tick(self) -> None:
        """Look at the fleet; notice lost and returning nodes; probe every live one."""
        listed = await self.ctx.fleet.look()
        await self.nodes.check(listed)
        await self.send_health_ticks([record.node_id for record, alive in listed if alive])

    async def send_health_ticks(self, nodes: list[str]) -> int:
        """One health tick to each of these nodes, in one round trip; how many nodes."""
        tick = HealthTick(timeout_s=self.ctx.scheduler.probe_timeout_s)
        await self.bus.broadcast([self.keys.node_commands(n) for n in nodes], self.ctx.fence(tick))
        return len(nodes)

    async def fire_timers(self, now: float | None = None) -> int:
        """Publish every durable timer that is due (restarts waiting out their backoff)."""
        return await self.ctx.timers.fire_due(self.bus, now)

    async def _every(
        self, seconds: float, work: Callable[[], Coroutine[Any, Any, Any]], lease: Lease
    ) -> None:
        while not self.stopping:
            raise_if_cancelled()  # see connection.raise_if_cancelled
            try:
                if lease.holds():
                    await work()
            except ControlPlaneUnavailable as exc:
                log.warning("scheduler %s: %s", self.name, exc)
            await self.pause(seconds)
