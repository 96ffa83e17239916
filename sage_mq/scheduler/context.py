"""What every part of the scheduler shares: settings, Redis, the bus, the store, and helpers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sage_mq.broker import Broker
from sage_mq.connection import redis_errors
from sage_mq.messages import Message, RequestRejected
from sage_mq.replication import durable_pipeline
from sage_mq.scheduler.fleet import FleetView
from sage_mq.scheduler.steady import SteadyEngines
from sage_mq.scheduler.timers import Timers
from sage_mq.settings import SchedulerSettings
from sage_mq.store import EngineRecord
from sage_mq.wire import Envelope

log = logging.getLogger(__name__)


class Context:
    """Shared by placing, tracking and healing; holds no state but what speeds the leader up
    (the fleet picture, the engines known steady), all of it read again from Redis in time."""

    def __init__(self, scheduler: SchedulerSettings, broker: Broker) -> None:
        self.settings = broker.settings
        self.scheduler = scheduler
        self.keys, self.bus, self.store = broker.keys, broker.bus, broker.store
        self.timers = Timers(broker.redis, self.keys)
        self.fleet = FleetView(self.store)
        self.steady = SteadyEngines()
        self.epoch = 0
        """The leadership epoch this scheduler holds (0 when it runs unfenced, in tests)."""

    async def emit(self, message: Message) -> None:
        """Publish an event."""
        await self.bus.publish(self.keys.events, message)

    async def command(
        self, node_id: str, *messages: Message, events: Sequence[Message] = ()
    ) -> None:
        """Send commands to one node agent, in order, fenced by our epoch, after ``events``:
        all in one round trip."""
        await self.bus.publish_each(self._commands(node_id, messages, events))

    def queue_command(
        self, pipe: Any, node_id: str, *messages: Message, events: Sequence[Message] = ()
    ) -> None:
        """:meth:`command` queued on a pipeline of :meth:`together`."""
        self.bus.queue_each(pipe, self._commands(node_id, messages, events))

    def _commands(
        self, node_id: str, messages: Sequence[Message], events: Sequence[Message]
    ) -> list[tuple[str, Message]]:
        stream = self.keys.node_commands(node_id)
        return [(self.keys.events, e) for e in events] + [(stream, self.fence(m)) for m in messages]

    @asynccontextmanager
    async def together(self, what: str) -> AsyncIterator[Any]:
        """A pipeline whose queued writes are sent when the block ends: in one round trip, all
        or none (MULTI), waiting for a replica once for them all under Sentinel."""
        async with durable_pipeline(self.store.redis, transaction=True) as pipe:
            yield pipe
            with redis_errors(what):
                await pipe.execute()

    def fence(self, message: Message) -> Message:
        """The command stamped with this leader's epoch."""
        if "epoch" in type(message).model_fields:
            return message.model_copy(update={"epoch": self.epoch})
        return message

    async def reject(self, env: Envelope, engine_id: str | None, reason: str) -> None:
        """Refuse a request, saying why."""
        log.warning("rejected %s %s: %s", env.type, engine_id or "", reason)
        await self.emit(
            RequestRejected(
                request_id=env.id, request_type=env.type, engine_id=engine_id, reason=reason
            )
        )

    async def current(self, engine_id: str, generation: int | None) -> EngineRecord | None:
        """The record an event is about, or None if the event is stale (older generation)."""
        record = await self.store.get_engine(engine_id)
        if record is None or (generation is not None and generation != record.generation):
            return None
        return record
