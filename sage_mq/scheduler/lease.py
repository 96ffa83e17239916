"""The leader lease: one scheduler leads at a time; its epoch fences what it commands."""

from __future__ import annotations

import logging
import time
from typing import Any

from sage_mq.connection import Redis, redis_errors
from sage_mq.keys import Keys

log = logging.getLogger(__name__)

# Renew or release only a lease that is still ours (compare-and-set on the value).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


SAFETY = 0.1
"""The part of the TTL a leader gives up, for clocks that run at slightly different rates."""


class Lease:
    """``SET key value NX PX ttl``: held while renewed; another takes it once it lapses.

    Redis expires the key TTL after it applied the last renewal, which is no earlier than when
    the leader sent it. So :meth:`holds` counts from the send: a leader cut off from Redis (a
    failover, a partition) knows its lease may have lapsed before a standby can take it, even
    while its renewal is still on its way, and stops acting then (two leaders at once, each
    reading a record and writing it back, undid each other's changes).
    """

    def __init__(self, redis: Redis, keys: Keys, name: str, ttl_s: float) -> None:
        self.redis: Any = redis
        self.keys = keys
        self.name = name
        self.ttl_ms = int(ttl_s * 1000)
        self.value: str | None = None
        self.epoch = 0
        self._sure_until = 0.0

    def holds(self) -> bool:
        """Whether the lease is surely still ours (by this process' clock; no I/O)."""
        return self.value is not None and time.monotonic() < self._sure_until

    def _held_from(self, sent: float) -> None:
        self._sure_until = sent + self.ttl_ms / 1000 * (1 - SAFETY)

    async def acquire(self) -> int | None:
        """Take the lease if nobody holds it; the new epoch, or None. A leader that stopped
        acting because it was not sure (its renewal was late) and still holds it goes on in
        the same epoch."""
        if self.value is not None and await self.renew():
            return self.epoch
        with redis_errors("reading the leader lease"):
            if await self.redis.exists(self.keys.scheduler_leader):
                return None
            epoch = int(await self.redis.incr(self.keys.scheduler_epoch))
            value = f"{self.name}:{epoch}"
            sent = time.monotonic()
            taken = await self.redis.set(self.keys.scheduler_leader, value, nx=True, px=self.ttl_ms)
        if not taken:
            return None
        self.value, self.epoch = value, epoch
        self._held_from(sent)
        return epoch

    async def renew(self) -> bool:
        """Extend the lease; False if it is no longer ours."""
        if self.value is None:
            return False
        sent = time.monotonic()
        with redis_errors("renewing the leader lease"):
            ok = await self.redis.eval(
                _RENEW, 1, self.keys.scheduler_leader, self.value, self.ttl_ms
            )
        if ok:
            self._held_from(sent)
        else:
            self.value = None
        return bool(ok)

    async def release(self) -> None:
        """Give the lease up (a standby takes over at once), if it is still ours."""
        if self.value is None:
            return
        with redis_errors("releasing the leader lease"):
            await self.redis.eval(_RELEASE, 1, self.keys.scheduler_leader, self.value)
        self.value = None

    async def holder(self) -> str | None:
        """``<name>:<epoch>`` of the current leader, if any."""
        with redis_errors("reading the leader lease"):
            value = await self.redis.get(self.keys.scheduler_leader)
        return str(value) if value else None
