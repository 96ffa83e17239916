"""The broker: a process's one way to its fleet's Redis.

It owns the connection, the namespace's keys, the bus and the store, built once and shared by
every part of the process (as dramatiq's broker and arq's pool are); whoever built it closes it.
An actor given a client (``redis=``, as tests and the embedded fleet do) leaves it open.
"""

from __future__ import annotations

import contextlib

from sage_mq.bus import Bus
from sage_mq.connection import Redis, check_server, connect
from sage_mq.errors import ControlPlaneUnavailable
from sage_mq.keys import Keys
from sage_mq.settings import Settings
from sage_mq.store import Store


class Broker:
    """The connection, keys, bus and store of one fleet (``settings``' URL and namespace)."""

    def __init__(self, settings: Settings, *, redis: Redis | None = None) -> None:
        self.settings = settings
        self.redis = redis or connect(settings)
        self._owns_redis = redis is None
        self.keys = Keys(settings.namespace)
        self.bus = Bus(self.redis, self.keys, settings.bus)
        self.store = Store(self.redis, self.keys)

    async def refuse_old_server(self) -> None:
        """:class:`~sage_mq.errors.ConfigError` for a server too old for the fleet; one that
        cannot be reached now is the caller's to wait for (the consumers check again when it
        answers)."""
        with contextlib.suppress(ControlPlaneUnavailable):
            await check_server(self.redis)

    async def aclose(self) -> None:
        """Close the connection if this broker made it."""
        if self._owns_redis:
            await self.redis.aclose()
