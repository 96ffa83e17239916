"""The one module that speaks Redis streams: publishing, consumer groups, retry, dead letters.

Delivery is at-least-once. A handler that returns has its entry acked, and its message id marked
done (so a re-sent id is carried out at most once; periodic messages such as health reports get
no marker). Entries settle together at the end of their batch, in one round trip; a handler that
returned messages to publish has its entry settled at once, in one transaction with them: those
are never lost nor doubled around a crash. A handler that raises leaves the entry pending, to be
re-claimed after ``claim_min_idle_ms`` by this or another consumer. Entries that cannot be
decoded, or were delivered ``max_deliveries`` times, go to the dead-letter stream.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from redis.exceptions import ResponseError

from sage_mq.connection import Redis, redis_errors
from sage_mq.consumer import Consumer, Delivery, Handler
from sage_mq.errors import ConfigError
from sage_mq.keys import Keys
from sage_mq.messages import Message
from sage_mq.settings import BusSettings
from sage_mq.wire import Envelope, encode, envelope

log = logging.getLogger(__name__)

Entry = tuple[str, dict[str, str]]
_BROADCAST_CHUNK = 1000
_BROADCAST = """
for _, stream in ipairs(KEYS) do
  redis.call('XADD', stream, 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 2))
end
"""
"""One entry appended to every stream in KEYS: a broadcast costs one command, not one each."""


DEAD_EXCERPT_CHARS = 8192
"""How much of a dead entry (and of its reason) the dead-letter stream keeps: enough to see
what it was, never a copy of whatever size someone wrote to a stream."""


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
        with redis_errors(f"publishing {env.type} to {stream}"):
            entry_id: str = await self.redis.xadd(
                stream, encode(env), maxlen=self._maxlen(stream), approximate=True
            )
        return entry_id

    async def publish_many(self, stream: str, messages: Sequence[Message | Envelope]) -> list[str]:
        """Append several messages to one stream in one round trip, in order."""
        return await self.publish_each([(stream, m) for m in messages])

    async def publish_each(self, items: Sequence[tuple[str, Message | Envelope]]) -> list[str]:
        """Append each message to its stream, all in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, message in items:
                env = message if isinstance(message, Envelope) else envelope(message)
                pipe.xadd(stream, encode(env), maxlen=self._maxlen(stream), approximate=True)
            with redis_errors(f"publishing {len(items)} messages"):
                ids: list[str] = await pipe.execute()
        return ids

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

    def _maxlen(self, stream: str) -> int:
        if stream == self.keys.dead:
            return self.settings.dead_maxlen
        return self.settings.stream_maxlen

    async def ensure_group(self, stream: str, group: str, start_id: str = "0") -> None:
        """Create a consumer group (and its stream) if missing; an existing group is success."""
        try:
            with redis_errors(f"creating group {group} on {stream}"):
                await self.redis.xgroup_create(stream, group, id=start_id, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def last_id(self, stream: str) -> str:
        """The newest entry id of a stream (``0-0`` when empty): a cursor for :meth:`tail`."""
        with redis_errors(f"reading {stream}"):
            newest = await self.redis.xrevrange(stream, count=1)
        return str(newest[0][0]) if newest else "0-0"

    async def history(self, stream: str, count: int = 100) -> list[Entry]:
        """The newest ``count`` entries, oldest first (none for a count of 0)."""
        if count <= 0:
            return []
        with redis_errors(f"reading {stream}"):
            rows = await self.redis.xrevrange(stream, count=count)
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
            for _name, rows in reply or ():
                for entry_id, fields in rows:
                    cursor = entry_id
                    yield str(entry_id), dict(fields)
            if not reply:
                yield "", {}  # a heartbeat, so callers can check deadlines

    async def dead_letter(self, delivery: Delivery, group: str, reason: str) -> None:
        """Move an entry to the dead-letter stream with its reason, and ack the original."""
        fields = json.dumps(delivery.fields)
        record = {
            "reason": reason[:DEAD_EXCERPT_CHARS],
            "stream": delivery.stream,
            "entry_id": delivery.entry_id,
            "group": group,
            "deliveries": str(delivery.deliveries),
            "fields": fields[:DEAD_EXCERPT_CHARS],
            "fields_chars": str(len(fields)),
            "ts": f"{time.time():.6f}",
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.dead, record, maxlen=self.settings.dead_maxlen, approximate=True)
            pipe.xack(delivery.stream, group, delivery.entry_id)
            await pipe.execute()
        log.warning(
            "dead-lettered %s %s (group %s): %s",
            delivery.stream,
            delivery.entry_id,
            group,
            record["reason"],
        )

    def consumer(
        self,
        streams: Sequence[str],
        group: str,
        name: str,
        handler: Handler,
        *,
        takeover: bool = False,
        trim: bool = False,
    ) -> Consumer:
        """A consumer of ``streams`` in ``group``, calling ``handler`` for every message.

        With ``takeover`` it first claims every entry pending in the group, however fresh: for
        a consumer that knows the previous one is gone (a new leader after a failover). With
        ``trim`` it deletes what it has settled, for a stream it alone reads (a node's
        commands): the stream then holds exactly what is still to be carried out.
        """
        return Consumer(self, list(streams), group, name, handler, takeover=takeover, trim=trim)
