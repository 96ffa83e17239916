"""Waiting for events on a test's ``<ns>:events`` stream; noting what a bus consumer handled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sage_mq.connection import Redis
from sage_mq.keys import Keys
from sage_mq.messages import StopEngine
from sage_mq.wire import Envelope, decode


def recorder() -> tuple[list[str], Callable[[Envelope], Awaitable[None]]]:
    """A bus handler that notes the engine id of each StopEngine it is given, in order."""
    seen: list[str] = []

    async def handler(env: Envelope) -> None:
        assert isinstance(env.payload, StopEngine)
        seen.append(env.payload.engine_id)

    return seen, handler


class Events:
    """Reads a namespace's event stream from the start; waits for matching events."""

    def __init__(self, redis: Redis, namespace: str) -> None:
        self.redis: Any = redis
        self.stream = Keys(namespace).events

    async def all(self) -> list[Envelope]:
        """Every event so far."""
        return [decode(fields) for _id, fields in await self.redis.xrange(self.stream)]

    async def types(self, engine_id: str | None = None) -> list[str]:
        """Event types so far (for one engine, if given)."""
        return [e.type for e in await self.all() if engine_id in (None, _engine(e))]

    async def wait(
        self, type_name: str, engine_id: str | None = None, *, timeout: float = 30.0, count: int = 1
    ) -> Envelope:
        """The ``count``-th event of that type (for that engine), once it is there."""
        deadline = time.monotonic() + timeout
        while True:
            found = [
                e
                for e in await self.all()
                if e.type == type_name and engine_id in (None, _engine(e))
            ]
            if len(found) >= count:
                return found[count - 1]
            if time.monotonic() > deadline:
                seen = await self.types()
                raise AssertionError(f"no {type_name} for {engine_id} in {timeout}s; saw {seen}")
            await asyncio.sleep(0.02)


def _engine(env: Envelope) -> str | None:
    return getattr(env.payload, "engine_id", None)
