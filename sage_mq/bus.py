"""The one module that speaks Redis streams: publishing, consumer groups, retry, dead letters.

Delivery is at-least-once. A handler that returns has its entry acked, and its message id marked
done (so a re-sent id is carried out at most once), in one transaction with the messages it
returned for publishing: those are never lost nor doubled around a crash. A handler that raises
leaves the entry pending, to be re-claimed after ``claim_min_idle_ms`` by this or another
consumer. Entries that cannot be decoded, or were delivered ``max_deliveries`` times, go to the
dead-letter stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sage_mq.connection import Redis, raise_if_cancelled, redis_errors
from sage_mq.errors import ConfigError, ControlPlaneUnavailable, DecodeError
from sage_mq.keys import Keys
from sage_mq.messages import Envelope, Message, decode, encode, envelope
from sage_mq.settings import BusSettings

log = logging.getLogger(__name__)

Outgoing = Sequence[tuple[str, Message]]
"""(stream, message) pairs a handler returns: published in the same transaction as its ack."""
Handler = Callable[[Envelope], Awaitable[Outgoing | None]]
Entry = tuple[str, dict[str, str]]
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(frozen=True)
class Delivery:
    """One entry as handed to a consumer, with how often it has been delivered."""

    stream: str
    entry_id: str
    fields: dict[str, str]
    deliveries: int


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
        record = {
            "reason": reason,
            "stream": delivery.stream,
            "entry_id": delivery.entry_id,
            "group": group,
            "deliveries": str(delivery.deliveries),
            "fields": json.dumps(delivery.fields),
            "ts": f"{time.time():.6f}",
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.dead, record, maxlen=self.settings.dead_maxlen, approximate=True)
            pipe.xack(delivery.stream, group, delivery.entry_id)
            await pipe.execute()
        log.warning(
            "dead-lettered %s %s (group %s): %s", delivery.stream, delivery.entry_id, group, reason
        )

    def consumer(
        self,
        streams: Sequence[str],
        group: str,
        name: str,
        handler: Handler,
        *,
        takeover: bool = False,
    ) -> Consumer:
        """A consumer of ``streams`` in ``group``, calling ``handler`` for every message.

        With ``takeover`` it first claims every entry pending in the group, however fresh: for
        a consumer that knows the previous one is gone (a new leader after a failover).
        """
        return Consumer(self, list(streams), group, name, handler, takeover=takeover)


class Consumer:
    """One member of a consumer group: reads, hands entries to its handler, settles them."""

    def __init__(
        self,
        bus: Bus,
        streams: list[str],
        group: str,
        name: str,
        handler: Handler,
        *,
        takeover: bool = False,
    ) -> None:
        self.bus = bus
        self.streams = streams
        self.group = group
        self.name = name
        self.handler = handler
        self.handled = 0
        self._stopping = asyncio.Event()
        self._last_claim = 0.0
        self._takeover = takeover

    def stop(self) -> None:
        """Ask the loop to return after the entry in hand; safe to call twice."""
        self._stopping.set()

    async def __aenter__(self) -> Consumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    async def run(self, *, until_idle: bool = False) -> None:
        """Consume until :meth:`stop` (or, with ``until_idle``, until nothing is left to read)."""
        backoff = 0.1
        need_groups = True
        reread_own = True  # at start, and after an outage: what we were given and did not settle
        while not self._stopping.is_set():
            try:
                if need_groups:
                    await self._ensure_groups()
                    need_groups = False
                if reread_own:
                    await self._settle_all(await self._own_pending())
                    reread_own = False
                deliveries = await self._claim_stale() + await self._read_new(until_idle)
                if not deliveries and until_idle:
                    return
                # Unsettled entries stay pending and are re-claimed once Redis is back.
                await self._settle_all(deliveries)
            except (*_UNREACHABLE, ControlPlaneUnavailable) as exc:
                raise_if_cancelled()
                log.warning(
                    "%s/%s: Redis unreachable (%s); retrying in %.1fs",
                    self.group,
                    self.name,
                    exc,
                    backoff,
                )
                await self._sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                reread_own = True
                continue
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("%s: consumer group gone (Redis restarted?); recreating", self.group)
                need_groups = True
                continue
            backoff = 0.1

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _ensure_groups(self) -> None:
        for stream in self.streams:
            await self.bus.ensure_group(stream, self.group)

    async def _own_pending(self) -> list[Delivery]:
        """Entries this consumer was given before (e.g. before a crash) and never settled."""
        reply = await self.bus.redis.xreadgroup(
            self.group, self.name, {s: "0" for s in self.streams}, count=10_000
        )
        return await self._with_counts(reply or [])

    async def _read_new(self, until_idle: bool) -> list[Delivery]:
        reply = await self.bus.redis.xreadgroup(
            self.group,
            self.name,
            {s: ">" for s in self.streams},
            count=self.bus.settings.batch_size,
            block=None if until_idle else self.bus.settings.block_ms,
        )
        return [
            Delivery(str(stream), str(entry_id), dict(fields), 1)
            for stream, rows in reply or ()
            for entry_id, fields in rows
        ]

    async def _claim_stale(self) -> list[Delivery]:
        """Take over entries idle past the threshold (a dead consumer's, or our failed ones)."""
        settings = self.bus.settings
        now = time.monotonic()
        if now - self._last_claim < max(0.05, settings.claim_min_idle_ms / 4000):
            return []
        self._last_claim = now
        min_idle = 0 if self._takeover else settings.claim_min_idle_ms
        self._takeover = False
        claimed: list[Any] = []
        for stream in self.streams:
            _cursor, rows, deleted = await self.bus.redis.xautoclaim(
                stream,
                self.group,
                self.name,
                min_idle,
                "0-0",
                count=settings.batch_size,
            )
            for entry_id in deleted or ():
                await self.bus.redis.xack(stream, self.group, entry_id)  # trimmed away
            claimed.append((stream, [r for r in rows if r and r[1] is not None]))
        return await self._with_counts(claimed)

    async def _with_counts(self, reply: Any) -> list[Delivery]:
        out: list[Delivery] = []
        for stream, rows in reply:
            if not rows:
                continue
            pending = await self.bus.redis.xpending_range(
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
                    await self.bus.redis.xack(stream, self.group, entry_id)
                    continue
                out.append(
                    Delivery(str(stream), str(entry_id), dict(fields), counts.get(str(entry_id), 1))
                )
        return out

    async def _settle_all(self, deliveries: list[Delivery]) -> None:
        """Decode a batch, look up all its idempotency markers at once, then settle in order."""
        decoded: list[tuple[Delivery, Envelope | DecodeError]] = []
        for delivery in deliveries:
            try:
                decoded.append((delivery, decode(delivery.fields)))
            except DecodeError as exc:
                decoded.append((delivery, exc))
        ids = [env.id for _d, env in decoded if isinstance(env, Envelope)]
        done = await self._already_done(ids)
        for delivery, env in decoded:
            if self._stopping.is_set():
                return  # the rest stays pending and is read again on restart
            await self._settle(delivery, env, done)

    async def _already_done(self, message_ids: list[str]) -> set[str]:
        if not message_ids:
            return set()
        markers = [self.bus.keys.processed(self.group, i) for i in message_ids]
        found = await self.bus.redis.mget(markers)
        return {i for i, value in zip(message_ids, found, strict=True) if value is not None}

    async def _settle(
        self, delivery: Delivery, env: Envelope | DecodeError, done: set[str]
    ) -> None:
        """Ack, retry later, or dead-letter one entry: the one place where that is decided."""
        if isinstance(env, DecodeError):
            await self.bus.dead_letter(delivery, self.group, f"undecodable: {env}")
            return
        if env.id in done:
            await self.bus.redis.xack(delivery.stream, self.group, delivery.entry_id)
            log.debug("%s: %s %s already carried out; acked", self.group, env.type, env.id)
            return
        try:
            outgoing = await self.handler(env)
        except ControlPlaneUnavailable:
            raise  # Redis is away, not the handler at fault: no delivery is held against it
        except Exception as exc:
            await self._failed(delivery, env, exc)
            return
        async with self.bus.redis.pipeline(transaction=True) as pipe:
            for stream, message in outgoing or ():
                pipe.xadd(
                    stream,
                    encode(envelope(message)),
                    maxlen=self.bus._maxlen(stream),
                    approximate=True,
                )
            pipe.set(
                self.bus.keys.processed(self.group, env.id),
                "1",
                ex=self.bus.settings.idempotency_ttl_s,
            )
            pipe.xack(delivery.stream, self.group, delivery.entry_id)
            await pipe.execute()
        done.add(env.id)  # the same id twice in one batch: the second is a duplicate too
        self.handled += 1

    async def _failed(self, delivery: Delivery, env: Envelope, exc: Exception) -> None:
        limit = self.bus.settings.max_deliveries
        if delivery.deliveries >= limit:
            reason = f"handler failed on delivery {delivery.deliveries} of {limit}: {exc!r}"
            await self.bus.dead_letter(delivery, self.group, reason)
            return
        log.warning(
            "%s/%s: handling %s %s failed (delivery %d of %d), will retry: %r",
            self.group,
            self.name,
            env.type,
            delivery.entry_id,
            delivery.deliveries,
            limit,
            exc,
        )
