"""Events an agent could not publish yet (Redis away): kept in order and sent when it returns."""

from __future__ import annotations

import asyncio
import collections
import logging

from sage_mq.bus import Bus
from sage_mq.errors import ControlPlaneUnavailable
from sage_mq.messages import Message
from sage_mq.wire import Envelope, envelope

log = logging.getLogger(__name__)


class Outbox:
    """Publishes to one stream, queueing (bounded, oldest dropped) while Redis is unreachable."""

    def __init__(self, bus: Bus, stream: str, limit: int = 10_000) -> None:
        self.bus = bus
        self.stream = stream
        self.pending: collections.deque[Envelope] = collections.deque(maxlen=limit)
        self._flushing = asyncio.Lock()
        """One flush at a time: two (the heartbeat's and a send's) would both publish the first
        event, then both pop, the second popping one never sent, or nothing (IndexError)."""

    async def send(self, message: Message) -> None:
        """Publish now, or queue behind what is already waiting."""
        self.pending.append(envelope(message))
        await self.flush()

    async def flush(self) -> bool:
        """Publish what is waiting, in order; False if Redis is still away."""
        async with self._flushing:
            while self.pending:
                env = self.pending[0]
                try:
                    await self.bus.publish(self.stream, env)
                except ControlPlaneUnavailable as exc:
                    if len(self.pending) == 1 or len(self.pending) % 100 == 0:
                        log.warning(
                            "cannot publish %s yet (%d waiting): %s",
                            env.type,
                            len(self.pending),
                            exc,
                        )
                    return False
                if self.pending and self.pending[0] is env:  # (a full queue drops its oldest)
                    self.pending.popleft()
        return True
