"""The shell every long-running actor shares: built on a broker, run until stopped, then closed.

``async with actor: await actor.run()`` is the whole life of one: :meth:`Actor.stop` (from a
signal handler, another task, or the way out of the ``with``) asks :meth:`Actor.run` to return,
and :meth:`Actor.close` releases what it holds, the broker's connection last. The node agent
and the scheduler are actors; what each does while it runs is its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self

from sage_mq.broker import Broker


class Actor:
    """Start (``async with``), run until stopped, stop, close."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._stopping = asyncio.Event()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        await self.close()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopping.is_set()

    def stop(self) -> None:
        """Ask :meth:`run` to return; safe to call twice, and before :meth:`run`."""
        self._stopping.set()

    async def run(self, *, until_idle: bool = False) -> None:
        """Do the actor's work until :meth:`stop` (with ``until_idle``, until none is left)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the actor holds, after :meth:`run` returned: the broker, if it made
        the connection."""
        await self.broker.aclose()

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if :meth:`stop` comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
