"""The streams of one namespace: publishing, reading, tailing, and consumers of their groups.

See :mod:`sage_mq.bus` for the delivery guarantees.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from sage_mq.bus.consumer import Consumer, Handler
from sage_mq.bus.group import Group
from sage_mq.connection import Redis, raise_if_cancelled, redis_errors
from sage_mq.errors import ConfigError
from sage_mq.keys import Keys
from sage_mq.messages import Message
from sage_mq.replication import durable_pipeline, durable_write
from sage_mq.settings import BusSettings
from sage_mq.wire import Envelope, encode, envelope

log = logging.getLogger(__name__)

Entry = tuple[str, dict[str, str]]
_BROADCAST_CHUNK = 100
"""Streams per broadcast command: Redis runs each chunk's appends as one script, and serves
other clients between chunks (a 1,000-node health tick in one script held every other command,
a start request's included, for about 4 ms)."""
_BROADCAST = """
for _, stream in ipairs(KEYS) do
  redis.call('XADD', stream, 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 2))
end
"""
"""One entry appended to every stream in KEYS: a broadcast costs one command, not one each."""


class Bus:
    """Publishing to and reading from the streams of one namespace."""

    def __init__(self, redis: Redis, keys: Keys, settings: BusSettings | None = None) -> None:
        # Replies are pinned to RESP2 with str values (see connection.connect); redis-py types
        # them as a RESP2/RESP3 union, so the client is seen untyped inside this module.
        self.redis: Any = redis
        self.keys = keys
        self.settings = settings or BusSettings()
        socket_timeout = redis.connection_pool.connection_kwargs.get("socket_timeout")
        if socket_timeout and self.settings.block_ms >= float(socket_timeout) * 1000 - 250:
            raise ConfigError(
                f"bus block_ms={self.settings.block_ms} must stay below the Redis socket "
                f"timeout ({socket_timeout}s), or blocking reads turn into long hangs"
            )

    async def publish(self, stream: str, message: Message | Envelope) -> str:
        """Append one message to a stream (capped with ``MAXLEN ~``); returns the entry id."""
        env = message if isinstance(message, Envelope) else envelope(message)
        fields, maxlen = encode(env), self.maxlen(stream)
        with redis_errors(f"publishing {env.type} to {stream}"):
            entry_id: str = await durable_write(
                self.redis,
                lambda client: client.xadd(stream, fields, maxlen=maxlen, approximate=True),
            )
        return entry_id

    async def publish_many(self, stream: str, messages: Sequence[Message | Envelope]) -> list[str]:
        """Append several messages to one stream in one round trip, in order."""
        return await self.publish_each([(stream, m) for m in messages])

    async def publish_each(self, items: Sequence[tuple[str, Message | Envelope]]) -> list[str]:
        """Append each message to its stream, all in one round trip."""
        async with durable_pipeline(self.redis, transaction=False) as pipe:
            self.queue_each(pipe, items)
            with redis_errors(f"publishing {len(items)} messages"):
                ids: list[str] = await pipe.execute()
        return ids

    def queue_each(self, pipe: Any, items: Sequence[tuple[str, Message | Envelope]]) -> None:
        """:meth:`publish_each` queued on ``pipe``, to be sent with other writes."""
        for stream, message in items:
            env = message if isinstance(message, Envelope) else envelope(message)
            pipe.xadd(stream, encode(env), maxlen=self.maxlen(stream), approximate=True)

    async def broadcast(self, streams: Sequence[str], message: Message) -> None:
        """The same entry (one envelope, encoded once) appended to many streams, in one round
        trip: how a health tick reaches every node."""
        fields = [item for pair in encode(envelope(message)).items() for item in pair]
        for start in range(0, len(streams), _BROADCAST_CHUNK):
            keys = streams[start : start + _BROADCAST_CHUNK]
            with redis_errors(f"broadcasting {message.TYPE} to {len(streams)} streams"):
                await self.redis.eval(
                    _BROADCAST, len(keys), *keys, self.settings.stream_maxlen, *fields
                )

    def maxlen(self, stream: str) -> int:
        """How many entries ``stream`` keeps (``MAXLEN ~``): the dead letters their own."""
        if stream == self.keys.dead:
            return self.settings.dead_maxlen
        return self.settings.stream_maxlen

    async def append(self, stream: str, entries: Sequence[dict[str, str]], maxlen: int) -> None:
        """Append plain entries (not messages: an engine's log lines) in one round trip,
        keeping about ``maxlen``."""
        if not entries:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for fields in entries:
                pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)
            with redis_errors(f"appending to {stream}"):
                await pipe.execute()

    async def lengths(self, streams: Sequence[str]) -> list[int]:
        """How many entries each stream holds, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
            with redis_errors("reading stream lengths"):
                return [int(n) for n in await pipe.execute()]

    async def newest(self, stream: str) -> Entry | None:
        """The newest entry of a stream, or None when it is empty."""
        with redis_errors(f"reading {stream}"):
            rows = await self.redis.xrevrange(stream, count=1)
        return (str(rows[0][0]), dict(rows[0][1])) if rows else None

    async def last_id(self, stream: str) -> str:
        """The newest entry id of a stream (``0-0`` when empty): a cursor for :meth:`tail`."""
        newest = await self.newest(stream)
        return newest[0] if newest else "0-0"

    async def history(
        self, stream: str, count: int = 100, *, before: str | None = None
    ) -> list[Entry]:
        """The newest ``count`` entries (older than entry ``before``, if given), oldest first;
        none for a count of 0."""
        if count <= 0:
            return []
        newest = f"({before}" if before else "+"
        with redis_errors(f"reading {stream}"):
            rows = await self.redis.xrevrange(stream, max=newest, count=count)
        return [(str(i), dict(f)) for i, f in reversed(rows)]

    async def tail(
        self, stream: str, since: str = "$", *, block_ms: int | None = None
    ) -> AsyncIterator[Entry]:
        """Entries after ``since`` as they arrive (plain XREAD: reads never affect groups)."""
        cursor = await self.last_id(stream) if since == "$" else since
        block = block_ms or self.settings.block_ms
        while True:
            with redis_errors(f"reading {stream}"):
                reply = await self.redis.xread({stream: cursor}, count=256, block=block)
            raise_if_cancelled()  # see connection.raise_if_cancelled
            for _name, rows in reply or ():
                for entry_id, fields in rows:
                    cursor = entry_id
                    yield str(entry_id), dict(fields)
            if not reply:
                yield "", {}  # a heartbeat, so callers can check deadlines

    def consumer(
        self,
        streams: Sequence[str],
        group: str,
        name: str,
        handler: Handler,
        *,
        takeover: bool = False,
        trim: bool = False,
        gate: Callable[[], bool] | None = None,
        urgent: str | None = None,
    ) -> Consumer:
        """A consumer of ``streams`` in ``group``, calling ``handler`` for every message.

        With ``takeover`` it first claims every entry pending in the group, however fresh: for
        a consumer that knows the previous one is gone (a new leader after a failover). With
        ``trim`` it deletes what it has settled, for a stream it alone reads (a node's
        commands): the stream then holds exactly what is still to be carried out. A ``gate``
        is asked before each message: once it says False the consumer hands back what it
        read, unhandled, and stops (a leader whose lease may have lapsed). New entries of the
        ``urgent`` stream go ahead of a long batch of the others (requests ahead of a flood of
        events), looked for every few milliseconds while that batch is handled.
        """
        member = Group(self, streams, group, name)
        return Consumer(member, handler, takeover=takeover, trim=trim, gate=gate, urgent=urgent)
