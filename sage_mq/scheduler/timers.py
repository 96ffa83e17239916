"""Durable timers in a Redis sorted set: a scheduler that dies mid-backoff loses no restart.

A timer is a message with a fixed id, due at a time. When due, it is published to the requests
stream under that id, then removed; firing twice (a crash in between, two schedulers) is
harmless because the consumer carries out a message id once.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sage_mq.bus import Bus
from sage_mq.connection import Redis, redis_errors
from sage_mq.keys import Keys
from sage_mq.messages import Message
from sage_mq.wire import decode, encode, envelope


class Timers:
    """Schedule messages for later; fire the due ones."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis: Any = redis
        self.keys = keys

    async def schedule(self, timer_id: str, due: float, message: Message) -> None:
        """Publish ``message`` to the requests stream at ``due`` (epoch seconds)."""
        member = json.dumps(encode(envelope(message, message_id=timer_id)), sort_keys=True)
        with redis_errors("scheduling a timer"):
            await self.redis.zadd(self.keys.timers, {member: due})

    async def next_due(self) -> float | None:
        """When the earliest timer is due, if any."""
        with redis_errors("reading timers"):
            rows = await self.redis.zrange(self.keys.timers, 0, 0, withscores=True)
        return float(rows[0][1]) if rows else None

    async def fire_due(self, bus: Bus, now: float | None = None) -> int:
        """Publish every timer due by ``now``; how many fired."""
        when = time.time() if now is None else now
        with redis_errors("reading timers"):
            due = await self.redis.zrangebyscore(self.keys.timers, "-inf", when, start=0, num=100)
        for member in due:
            await bus.publish(self.keys.requests, decode(json.loads(member)))
            with redis_errors("removing a fired timer"):
                await self.redis.zrem(self.keys.timers, member)
        return len(due)

    async def pending(self) -> list[tuple[float, Message]]:
        """Every timer not yet fired, with when it is due."""
        with redis_errors("reading timers"):
            rows = await self.redis.zrange(self.keys.timers, 0, -1, withscores=True)
        return [(float(due), decode(json.loads(member)).payload) for member, due in rows]
