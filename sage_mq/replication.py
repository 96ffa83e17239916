"""Writes that must outlive a failover wait for a replica (``WAIT``).

Replication is asynchronous: a write the primary acknowledged but had not yet sent to a replica
is gone once Sentinel promotes that replica. The writes the fleet answers for (a request taken,
a command for a node, an engine record's transition, a handler's output settled with its ack, a
batch created or a result recorded) go through :func:`durable_pipeline` (or, one command,
:func:`durable_write`), which ends them with
``WAIT <replicas> <timeout>`` on the same connection: the caller hears "done" only once a
replica holds them too. (``WAIT`` counts what *this connection* wrote, so it cannot be sent
apart from the write.)

With no replica to answer in time (the only one is down), the fleet keeps working on the primary
alone rather than stop: the shortfall is logged, and writes stop waiting for
:data:`SHORTFALL_PAUSE_S`, except one a second that waits at most :data:`PROBE_MS`: once a
replica answers it, every write waits again (a replica back after a failover is waited for
within a second, not ten). An operator who would rather refuse writes then sets
``min-replicas-to-write`` on the server.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

log = logging.getLogger(__name__)

SHORTFALL_PAUSE_S = 10.0
PROBE_EVERY_S, PROBE_MS = 1.0, 100


class ReplicaAcks:
    """How many replicas a durable write waits for, how long at most, and whether it waits at
    all now (not for :data:`SHORTFALL_PAUSE_S` after a shortfall)."""

    def __init__(self, replicas: int, timeout_ms: int) -> None:
        if replicas < 1 or timeout_ms < 1:
            raise ValueError("replicas and timeout_ms must be at least 1 (0 would wait forever)")
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.shortfalls = 0
        self._paused_until = 0.0
        self._next_probe = 0.0

    def wait_ms(self) -> int | None:
        """How long the next durable write waits for its replicas; None: it does not wait."""
        now = time.monotonic()
        if now >= self._paused_until:
            return self.timeout_ms
        if now >= self._next_probe:  # paused: is a replica back?
            self._next_probe = now + PROBE_EVERY_S
            return min(PROBE_MS, self.timeout_ms)
        return None

    def judge(self, acknowledged: int) -> None:
        """Note how many replicas acknowledged; a shortfall is logged and pauses waiting, and
        enough of them again ends the pause."""
        if acknowledged >= self.replicas:
            self._paused_until = 0.0
            return
        if time.monotonic() < self._paused_until:
            return  # a probe while paused: said already
        self.shortfalls += 1
        self._next_probe = time.monotonic() + PROBE_EVERY_S
        self._paused_until = time.monotonic() + SHORTFALL_PAUSE_S
        log.warning(
            "a write reached %d of %d replicas within %d ms: it is on the primary only, and a "
            "failover now would lose it; writes go on without waiting until one answers again "
            "(asked each second; %.0f s at most)",
            acknowledged,
            self.replicas,
            self.timeout_ms,
            SHORTFALL_PAUSE_S,
        )


def replica_acks_of(redis: Any) -> ReplicaAcks | None:
    """The client's policy (clients from ``connect`` carry one), or None: do not wait."""
    acks = getattr(redis, "replica_acks", None)
    return acks if isinstance(acks, ReplicaAcks) else None


def durable_pipeline(redis: aioredis.Redis, *, transaction: bool) -> Any:
    """A pipeline whose writes wait for a replica when the client's policy says so (typed as
    loosely as the store's client: replies are RESP2 strings, see ``connection.connect``)."""
    return _pipeline(redis, transaction, _waiting(redis))


def _waiting(redis: aioredis.Redis) -> tuple[ReplicaAcks, int] | None:
    """The client's policy and how long this write waits; None: it does not wait."""
    acks = replica_acks_of(redis)
    wait_ms = None if acks is None else acks.wait_ms()
    return None if acks is None or wait_ms is None else (acks, wait_ms)


def _pipeline(
    redis: aioredis.Redis, transaction: bool, waiting: tuple[ReplicaAcks, int] | None
) -> Any:
    if waiting is None:
        return redis.pipeline(transaction=transaction)
    pool, callbacks = redis.connection_pool, redis.response_callbacks
    return AckedPipeline(pool, callbacks, transaction, None, *waiting)


async def durable_write(redis: aioredis.Redis, write: Callable[[Any], Any]) -> Any:
    """One write command, sent by ``write(client)``, that must outlive a failover; its reply.

    The single command it is when no replica is to be waited for; else queued in a pipeline
    that ends with ``WAIT`` on the same connection (``write`` may then return an awaitable,
    as a script queued on a pipeline does)."""
    waiting = _waiting(redis)
    if waiting is None:
        return await write(redis)
    async with _pipeline(redis, False, waiting) as pipe:
        queued = write(pipe)
        if inspect.isawaitable(queued):
            await queued
        (reply,) = await pipe.execute()
    return reply


class AckedPipeline(Pipeline):
    """A pipeline (or MULTI) followed by ``WAIT`` on the connection that sent it."""

    def __init__(
        self,
        pool: Any,
        callbacks: Any,
        transaction: bool,
        shard_hint: str | None,
        acks: ReplicaAcks,
        wait_ms: int,
    ) -> None:
        super().__init__(pool, callbacks, transaction, shard_hint)
        self.acks, self.wait_ms = acks, wait_ms

    async def _execute_transaction(  # type: ignore[no-untyped-def]
        self, connection, commands, raise_on_error
    ) -> list[Any]:
        # After EXEC, on the same connection: WAIT inside MULTI would not block.
        replies: list[Any] = await super()._execute_transaction(
            connection, commands, raise_on_error
        )
        await connection.send_command("WAIT", self.acks.replicas, self.wait_ms)
        self.acks.judge(int(await connection.read_response()))
        return replies

    async def _execute_pipeline(  # type: ignore[no-untyped-def]
        self, connection, commands, raise_on_error
    ) -> list[Any]:
        wait: Any = (("WAIT", self.acks.replicas, self.wait_ms), {})
        replies: list[Any] = await super()._execute_pipeline(
            connection, [*commands, wait], raise_on_error
        )
        self.acks.judge(int(replies[-1]))
        return replies[:-1]


def acks_for(replicas: int, timeout_ms: int) -> ReplicaAcks | None:
    """The policy for a setting: None when no replica is to be waited for."""
    return ReplicaAcks(replicas, timeout_ms) if replicas > 0 else None
