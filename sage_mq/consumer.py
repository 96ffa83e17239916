"""A member of a consumer group: reads, hands entries to its handler, acks, retries, claims.

See :mod:`sage_mq.bus` for the delivery guarantees; :meth:`Bus.consumer` makes these.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sage_mq.connection import raise_if_cancelled
from sage_mq.errors import ControlPlaneUnavailable, DecodeError
from sage_mq.messages import Message
from sage_mq.wire import Envelope, decode, encode, envelope

if TYPE_CHECKING:
    from sage_mq.bus import Bus

log = logging.getLogger(__name__)

Outgoing = Sequence[tuple[str, Message]]
"""(stream, message) pairs a handler returns: published in the same transaction as its ack."""
Handler = Callable[[Envelope], Awaitable[Outgoing | None]]
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(frozen=True)
class Delivery:
    """One entry as handed to a consumer, with how often it has been delivered."""

    stream: str
    entry_id: str
    fields: dict[str, str]
    deliveries: int


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
        trim: bool = False,
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
        self._trim = trim

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
        """Decode a batch, look up all its idempotency markers at once, then settle in order.

        Entries whose handler returned nothing to publish are acked (and marked done) together
        at the end of the batch, in one round trip: a crash before that hands them out again,
        which at-least-once delivery allows anyway.
        """
        decoded: list[tuple[Delivery, Envelope | DecodeError]] = []
        for delivery in deliveries:
            try:
                decoded.append((delivery, decode(delivery.fields)))
            except DecodeError as exc:
                decoded.append((delivery, exc))
        ids = [env.id for _d, env in decoded if isinstance(env, Envelope) and _marked(env)]
        done = await self._already_done(ids)
        settled: list[tuple[Delivery, Envelope]] = []
        for i, (delivery, env) in enumerate(decoded):
            if self._stopping.is_set():
                await self._hand_back([d for d, _env in decoded[i:]])
                break
            await self._settle(delivery, env, done, settled)
        if settled:
            await self._ack(settled, ())
        if self._trim and deliveries:
            await self._trim_settled(deliveries)

    async def _hand_back(self, deliveries: list[Delivery]) -> None:
        """Stopped with entries read but not handled (a deposed leader whose read returned as
        it stopped): they stay pending, but marked idle for long, so whoever consumes the group
        next claims them at its next look instead of after ``claim_min_idle_ms``."""
        idle = 100 * self.bus.settings.claim_min_idle_ms
        for stream in {d.stream for d in deliveries}:
            ids = [d.entry_id for d in deliveries if d.stream == stream]
            await self.bus.redis.xclaim(
                stream, self.group, self.name, 0, ids, idle=idle, justid=True
            )

    async def _trim_settled(self, deliveries: list[Delivery]) -> None:
        """Delete every entry before the oldest still pending, or all that were delivered."""
        for stream in {d.stream for d in deliveries}:
            summary = await self.bus.redis.xpending(stream, self.group)
            if summary["pending"]:
                floor = summary["min"]
            else:
                groups = await self.bus.redis.xinfo_groups(stream)
                delivered = next(g["last-delivered-id"] for g in groups if g["name"] == self.group)
                ms, _, seq = str(delivered).partition("-")
                floor = f"{ms}-{int(seq or 0) + 1}"
            await self.bus.redis.xtrim(stream, minid=floor, approximate=False)

    async def _already_done(self, message_ids: list[str]) -> set[str]:
        if not message_ids:
            return set()
        markers = [self.bus.keys.processed(self.group, i) for i in message_ids]
        found = await self.bus.redis.mget(markers)
        return {i for i, value in zip(message_ids, found, strict=True) if value is not None}

    async def _settle(
        self,
        delivery: Delivery,
        env: Envelope | DecodeError,
        done: set[str],
        settled: list[tuple[Delivery, Envelope]],
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
        if outgoing:
            await self._ack([(delivery, env)], outgoing)
        else:
            settled.append((delivery, env))
        if _marked(env):
            done.add(env.id)  # the same id twice in one batch: the second is a duplicate too
        self.handled += 1

    async def _ack(self, settled: list[tuple[Delivery, Envelope]], outgoing: Outgoing) -> None:
        """Publish what handlers returned, mark their messages done and ack, in one MULTI."""
        async with self.bus.redis.pipeline(transaction=True) as pipe:
            for stream, message in outgoing:
                pipe.xadd(
                    stream,
                    encode(envelope(message)),
                    maxlen=self.bus._maxlen(stream),
                    approximate=True,
                )
            for delivery, env in settled:
                if _marked(env):
                    marker = self.bus.keys.processed(self.group, env.id)
                    pipe.set(marker, "1", ex=self.bus.settings.idempotency_ttl_s)
                pipe.xack(delivery.stream, self.group, delivery.entry_id)
            await pipe.execute()

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


def _marked(env: Envelope) -> bool:
    """Whether a message gets an idempotency marker (all but periodic ones)."""
    return not env.payload.PERIODIC
