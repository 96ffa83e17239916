"""The shell every long-running actor shares: started, run until stopped, then closed.

``async with actor: await actor.run()`` is the whole life of one: entering calls
:meth:`Actor.start`, :meth:`Actor.stop` (from a signal handler, another task, or the way out of
the ``with``) asks :meth:`Actor.run` to return, and :meth:`Actor.close` releases what it holds.
The node agent, the scheduler and the embedded control plane are actors; what each does while
it runs is its own. Each builds its broker and closes it: whoever made a connection closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

T = TypeVar("T")


def freeze_startup_heap() -> None:
    """Put what start-up made (modules, pydantic's and FastAPI's schemas: ~90,000 objects) out
    of the garbage collector's sight, so a full collection scans only what the work left behind.
    For a process that is only sage-mq (an actor, the gateway, ``up``). Unfrozen, a full
    collection stalled the gateway's requests in flight for 40-50 ms, and the scheduler at
    1,000 nodes for 28-45 ms, 10 ms frozen (seen with a ``gc.callbacks`` timer under load)."""
    gc.collect()
    gc.freeze()


class Actor:
    """Start (``async with``), run until stopped, stop, close."""

    def __init__(self) -> None:
        self._stopping = asyncio.Event()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        await self.close()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopping.is_set()

    async def start(self) -> None:
        """Get ready to run (nothing, unless the actor says otherwise)."""

    def stop(self) -> None:
        """Ask :meth:`run` to return; safe to call twice, and before :meth:`run`."""
        self._stopping.set()

    async def run(self) -> None:
        """Do the actor's work until :meth:`stop`."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the actor holds, after :meth:`run` returned; safe to call twice."""

    async def unless_stopped(self, work: Coroutine[Any, Any, T]) -> T | None:
        """``work``'s result; None, with ``work`` cancelled, if :meth:`stop` comes first."""
        job = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({job, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not job.done():
                job.cancel()
        (outcome,) = await asyncio.gather(job, return_exceptions=True)
        if isinstance(outcome, asyncio.CancelledError):
            return None
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if :meth:`stop` comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
