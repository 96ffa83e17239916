"""Loops that run until cancelled end when cancelled, even when redis-py loses the
cancellation: on Python 3.11 it sends each command under ``asyncio.wait_for``, which returns
the result and drops a cancellation that arrives as the send completes. ``sage llm up``
stopped while a preset's engine started hung on it (the wait for RUNNING read on for ever).

The client here drops every cancellation as that ``wait_for`` does (the task still counts the
request); without the check at each turn of the loop, each test's loop never ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from types import SimpleNamespace
from typing import Any

from sage_mq.batch.runner import _keep_lease, _watch_cancel
from sage_mq.bus import Bus
from sage_mq.keys import Keys


class DroppingRedis:
    """Answers every command after a moment, and drops a cancellation that comes meanwhile."""

    def __init__(self) -> None:
        self.connection_pool = SimpleNamespace(connection_kwargs={})
        self.called = asyncio.Event()
        self.dropping = True

    async def _answer(self, value: Any) -> Any:
        self.called.set()
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if not self.dropping:
                raise
            # what wait_for does when the send is done: the result, not the cancellation
        return value

    async def xread(self, *_args: Any, **_kwargs: Any) -> Any:
        return await self._answer([])

    async def set(self, *_args: Any, **_kwargs: Any) -> Any:
        return await self._answer(True)

    async def hget(self, *_args: Any, **_kwargs: Any) -> Any:
        return await self._answer("in_progress")


async def _ends_when_cancelled(redis: DroppingRedis, loop: Coroutine[Any, Any, Any]) -> None:
    task = asyncio.ensure_future(loop)
    await asyncio.wait_for(redis.called.wait(), 5)
    task.cancel()  # mid-command, as `up`'s stop was
    ended, _ = await asyncio.wait({task}, timeout=2)
    redis.dropping = False
    while not task.done():  # not for the next test to meet
        task.cancel()
        await asyncio.sleep(0.05)
    assert ended, "the loop carried on after it was cancelled"
    assert task.cancelled()


async def _tail(bus: Bus) -> None:
    async for _entry in bus.tail("s", "0-0"):
        pass


async def test_a_tail_ends_when_cancelled() -> None:
    redis = DroppingRedis()
    await _ends_when_cancelled(redis, _tail(Bus(redis, Keys())))  # type: ignore[arg-type]


async def test_a_batch_chunks_lease_keeper_ends_when_cancelled() -> None:
    redis = DroppingRedis()
    await _ends_when_cancelled(redis, _keep_lease(redis, "lease"))


async def test_a_batch_chunks_cancel_watcher_ends_when_cancelled() -> None:
    redis = DroppingRedis()
    records = SimpleNamespace(redis=redis, keys=Keys())
    watch = _watch_cancel(records, "batch_1", asyncio.Event())  # type: ignore[arg-type]
    await _ends_when_cancelled(redis, watch)
