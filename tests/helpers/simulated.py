"""A scheduler over simulated nodes: tests play the agents' part by publishing their events."""

from __future__ import annotations

from typing import Any

from sage_mq.bus import Bus
from sage_mq.connection import Redis
from sage_mq.gpu import FakeGpus
from sage_mq.keys import Keys
from sage_mq.messages import LaunchEngine, Message
from sage_mq.scheduler import Scheduler
from sage_mq.settings import SchedulerSettings, Settings
from sage_mq.store import EngineRecord, NodeRecord, Store
from sage_mq.wire import decode
from tests.helpers.events import Events


class Fleet:
    """A scheduler over registered (simulated) nodes; we play the agents' part by hand."""

    def __init__(
        self, redis: Redis, settings: Settings, scheduler: SchedulerSettings | None = None
    ) -> None:
        self.redis: Any = redis
        self.keys = Keys(settings.namespace)
        self.bus = Bus(redis, self.keys, settings.bus)
        self.store = Store(redis, self.keys)
        self.scheduler = Scheduler(settings, redis=redis, name="s1", scheduler=scheduler)
        self.events = Events(redis, settings.namespace)

    async def node(
        self,
        node_id: str,
        gpus: str | None = None,
        address: str = "127.0.0.1",
        runtimes: dict[str, str] | None = None,
    ) -> None:
        inventory = FakeGpus(gpus).snapshot() if gpus else []
        record = NodeRecord(node_id=node_id, address=address, gpus=inventory, runtimes=runtimes)
        await self.store.put_node(record, 60)

    async def request(self, *messages: Message) -> None:
        await self.bus.publish_many(self.keys.requests, list(messages))
        await self.scheduler.run(until_idle=True)

    async def event(self, *messages: Message) -> None:
        await self.bus.publish_many(self.keys.events, list(messages))
        await self.scheduler.run(until_idle=True)

    async def commands(self, node_id: str) -> list[Message]:
        rows = await self.redis.xrange(self.keys.node_commands(node_id))
        return [decode(fields).payload for _id, fields in rows]

    async def launch_of(self, engine_id: str, node_id: str = "n1") -> LaunchEngine:
        for cmd in await self.commands(node_id):
            if isinstance(cmd, LaunchEngine) and cmd.engine_id == engine_id:
                return cmd
        raise AssertionError(f"no launch of {engine_id} on {node_id}")

    async def record(self, engine_id: str) -> EngineRecord:
        record = await self.store.get_engine(engine_id)
        assert record is not None
        return record
