"""A member of a consumer group: reads, hands entries to its handler, acks, retries, claims.

See :mod:`sage_mq.bus` for the delivery guarantees; :meth:`Bus.consumer` makes these. What
to do with an entry is decided here; :class:`~sage_mq.bus.group.Group` says it to Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sage_mq.bus.group import Delivery, Group, Outgoing
from sage_mq.connection import raise_if_cancelled
from sage_mq.errors import ControlPlaneUnavailable, DecodeError
from sage_mq.wire import Envelope, decode

log = logging.getLogger(__name__)

Handler = Callable[[Envelope], Awaitable[Outgoing | None]]
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
URGENT_LOOK_S = 0.002
"""How long a batch is handled before new entries of the urgent stream are looked for (and
then again as often): a request waits that long, not for a whole batch of events."""


class Consumer:
    """One member of a consumer group: reads, hands entries to its handler, settles them."""

    def __init__(
        self,
        group: Group,
        handler: Handler,
        *,
        takeover: bool = False,
        trim: bool = False,
        gate: Callable[[], bool] | None = None,
        urgent: str | None = None,
    ) -> None:
        self._group = group
        self._gate = gate
        self._urgent = urgent
        self._next_urgent_look = 0.0
        self.settings = group.settings
        self.group = group.group
        self.name = group.name
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
                    await self._group.ensure()
                    need_groups = False
                if reread_own:
                    await self._settle_all(await self._group.read_own())
                    reread_own = False
                deliveries = await self._claim_stale()
                deliveries += await self._group.read_new(block=not until_idle)
                if not deliveries and until_idle:
                    return
                self._next_urgent_look = time.monotonic() + URGENT_LOOK_S
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

    async def _claim_stale(self) -> list[Delivery]:
        """Take over entries idle past the threshold (a dead consumer's, or our failed ones)."""
        now = time.monotonic()
        if now - self._last_claim < max(0.05, self.settings.claim_min_idle_ms / 4000):
            return []
        self._last_claim = now
        min_idle = 0 if self._takeover else self.settings.claim_min_idle_ms
        self._takeover = False
        return await self._group.claim_idle(min_idle)

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
        done = await self._group.done_already(ids)
        settled: list[tuple[Delivery, Envelope]] = []
        for i, (delivery, env) in enumerate(decoded):
            if self._gate is not None and not self._gate():
                log.warning("%s/%s: may no longer handle messages; stopping", self.group, self.name)
                self.stop()
            if self._stopping.is_set():
                await self._hand_back([d for d, _env in decoded[i:]])
                break
            if self._urgent is not None and delivery.stream != self._urgent:
                await self._let_urgent_in()
            await self._settle(delivery, env, done, settled)
        if settled:
            await self._group.settle([(d, _marker(env)) for d, env in settled])
        if self._trim and deliveries:
            await self._group.trim_settled({d.stream for d in deliveries})

    async def _let_urgent_in(self) -> None:
        """Handle new entries of the urgent stream first, once the batch in hand has taken
        :data:`URGENT_LOOK_S` since it was read or since the last look."""
        now = time.monotonic()
        if now < self._next_urgent_look or self._urgent is None:
            return
        self._next_urgent_look = now + URGENT_LOOK_S
        ahead = await self._group.read_new(block=False, streams=[self._urgent])
        if ahead:
            await self._settle_all(ahead)

    async def _hand_back(self, deliveries: list[Delivery]) -> None:
        """Stopped with entries read but not handled (a deposed leader whose read returned as
        it stopped): they stay pending, but marked idle for long, so whoever consumes the group
        next claims them at its next look instead of after ``claim_min_idle_ms``."""
        await self._group.hand_back(deliveries, 100 * self.settings.claim_min_idle_ms)

    async def _settle(
        self,
        delivery: Delivery,
        env: Envelope | DecodeError,
        done: set[str],
        settled: list[tuple[Delivery, Envelope]],
    ) -> None:
        """Ack, retry later, or dead-letter one entry: the one place where that is decided."""
        if isinstance(env, DecodeError):
            await self._group.dead_letter(delivery, f"undecodable: {env}")
            return
        if env.id in done:
            await self._group.ack(delivery)
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
            await self._group.settle([(delivery, _marker(env))], outgoing)
        else:
            settled.append((delivery, env))
        if _marked(env):
            done.add(env.id)  # the same id twice in one batch: the second is a duplicate too
        self.handled += 1

    async def _failed(self, delivery: Delivery, env: Envelope, exc: Exception) -> None:
        limit = self.settings.max_deliveries
        if delivery.deliveries >= limit:
            reason = f"handler failed on delivery {delivery.deliveries} of {limit}: {exc!r}"
            await self._group.dead_letter(delivery, reason)
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


def _marker(env: Envelope) -> str | None:
    """The id its idempotency marker is kept under, if it gets one."""
    return env.id if _marked(env) else None
