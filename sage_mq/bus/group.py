"""One consumer's view of a consumer group: every group command a consumer needs, and no other.

:class:`~sage_mq.bus.consumer.Consumer` decides what happens to an entry; this says it to Redis
(read, claim, ack, mark done, hand back, trim, dead-letter).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from sage_mq.connection import check_server, redis_errors
from sage_mq.messages import Message
from sage_mq.replication import durable_pipeline
from sage_mq.wire import encode, envelope

if TYPE_CHECKING:
    from sage_mq.bus.streams import Bus

log = logging.getLogger(__name__)

DEAD_EXCERPT_CHARS = 8192
"""How much of a dead entry (and of its reason) the dead-letter stream keeps: enough to see
what it was, never a copy of whatever size someone wrote to a stream."""
Outgoing = Sequence[tuple[str, Message]]
"""(stream, message) pairs a handler returns: published in the same transaction as its ack."""


@dataclass(frozen=True)
class Delivery:
    """One entry as handed to a consumer, with how often it has been delivered."""

    stream: str
    entry_id: str
    fields: dict[str, str]
    deliveries: int


class Group:
    """Consumer ``name`` of ``group`` on ``streams``."""

    def __init__(self, bus: Bus, streams: Sequence[str], group: str, name: str) -> None:
        self.redis: Any = bus.redis  # untyped, as in Bus
        self.keys = bus.keys
        self.settings = bus.settings
        self._maxlen = bus.maxlen
        self.streams = list(streams)
        self.group = group
        self.name = name

    async def ensure(self) -> None:
        """Check the server (at start, and after Redis came back: it may be another), then
        create the group on every stream (and the streams) if missing."""
        await check_server(self.redis)
        for stream in self.streams:
            try:
                with redis_errors(f"creating group {self.group} on {stream}"):
                    await self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read_own(self) -> list[Delivery]:
        """Entries this consumer was given before (e.g. before a crash) and never settled."""
        reply = await self.redis.xreadgroup(
            self.group, self.name, {s: "0" for s in self.streams}, count=10_000
        )
        return await self._with_counts(reply or [])

    async def read_new(
        self, *, block: bool, streams: Sequence[str] | None = None
    ) -> list[Delivery]:
        """Entries no consumer of the group was given yet (waiting up to ``block_ms``), of all
        its streams or of these."""
        reply = await self.redis.xreadgroup(
            self.group,
            self.name,
            {s: ">" for s in streams or self.streams},
            count=self.settings.batch_size,
            block=self.settings.block_ms if block else None,
        )
        return [
            Delivery(str(stream), str(entry_id), dict(fields), 1)
            for stream, rows in reply or ()
            for entry_id, fields in rows
        ]

    async def claim_idle(self, min_idle_ms: int) -> list[Delivery]:
        """Take over entries pending in the group for at least ``min_idle_ms``."""
        claimed: list[Any] = []
        for stream in self.streams:
            _cursor, rows, deleted = await self.redis.xautoclaim(
                stream, self.group, self.name, min_idle_ms, "0-0", count=self.settings.batch_size
            )
            for entry_id in deleted or ():
                await self.redis.xack(stream, self.group, entry_id)  # trimmed away
            claimed.append((stream, [r for r in rows if r and r[1] is not None]))
        return await self._with_counts(claimed)

    async def _with_counts(self, reply: Any) -> list[Delivery]:
        out: list[Delivery] = []
        for stream, rows in reply:
            if not rows:
                continue
            pending = await self.redis.xpending_range(
                stream,
                self.group,
                min=rows[0][0],
                max=rows[-1][0],
                count=len(rows) + 16,
                consumername=self.name,
            )
            counts = {str(p["message_id"]): int(p["times_delivered"]) for p in pending}
            for entry_id, fields in rows:
                if fields is None:  # an entry trimmed while pending
                    await self.redis.xack(stream, self.group, entry_id)
                    continue
                out.append(
                    Delivery(str(stream), str(entry_id), dict(fields), counts.get(str(entry_id), 1))
                )
        return out

    async def done_already(self, message_ids: list[str]) -> set[str]:
        """Those of ``message_ids`` this group has carried out (their markers exist)."""
        if not message_ids:
            return set()
        markers = [self.keys.processed(self.group, i) for i in message_ids]
        found = await self.redis.mget(markers)
        return {i for i, value in zip(message_ids, found, strict=True) if value is not None}

    async def ack(self, delivery: Delivery) -> None:
        """Settle one entry with nothing else to say."""
        await self.redis.xack(delivery.stream, self.group, delivery.entry_id)

    async def settle(
        self, settled: Sequence[tuple[Delivery, str | None]], outgoing: Outgoing = ()
    ) -> None:
        """Publish ``outgoing``, mark each message id done (None: no marker) and ack its
        entry, all in one MULTI (which a replica holds too, when the client waits for one)."""
        async with durable_pipeline(self.redis, transaction=True) as pipe:
            for stream, message in outgoing:
                pipe.xadd(
                    stream,
                    encode(envelope(message)),
                    maxlen=self._maxlen(stream),
                    approximate=True,
                )
            for delivery, message_id in settled:
                if message_id is not None:
                    marker = self.keys.processed(self.group, message_id)
                    pipe.set(marker, "1", ex=self.settings.idempotency_ttl_s)
                pipe.xack(delivery.stream, self.group, delivery.entry_id)
            await pipe.execute()

    async def hand_back(self, deliveries: Sequence[Delivery], idle_ms: int) -> None:
        """Leave entries pending but idle for ``idle_ms``, so the next look claims them."""
        for stream in {d.stream for d in deliveries}:
            ids = [d.entry_id for d in deliveries if d.stream == stream]
            await self.redis.xclaim(
                stream, self.group, self.name, 0, ids, idle=idle_ms, justid=True
            )

    async def trim_settled(self, streams: set[str]) -> None:
        """Delete every entry before the oldest still pending, or all that were delivered."""
        for stream in streams:
            summary = await self.redis.xpending(stream, self.group)
            if summary["pending"]:
                floor = summary["min"]
            else:
                groups = await self.redis.xinfo_groups(stream)
                delivered = next(g["last-delivered-id"] for g in groups if g["name"] == self.group)
                ms, _, seq = str(delivered).partition("-")
                floor = f"{ms}-{int(seq or 0) + 1}"
            await self.redis.xtrim(stream, minid=floor, approximate=False)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move an entry to the dead-letter stream with its reason, and ack the original."""
        fields = json.dumps(delivery.fields)
        record = {
            "reason": reason[:DEAD_EXCERPT_CHARS],
            "stream": delivery.stream,
            "entry_id": delivery.entry_id,
            "group": self.group,
            "deliveries": str(delivery.deliveries),
            "fields": fields[:DEAD_EXCERPT_CHARS],
            "fields_chars": str(len(fields)),
            "ts": f"{time.time():.6f}",
        }
        async with durable_pipeline(self.redis, transaction=True) as pipe:
            pipe.xadd(self.keys.dead, record, maxlen=self.settings.dead_maxlen, approximate=True)
            pipe.xack(delivery.stream, self.group, delivery.entry_id)
            await pipe.execute()
        log.warning(
            "dead-lettered %s %s (group %s): %s",
            delivery.stream,
            delivery.entry_id,
            self.group,
            record["reason"],
        )
