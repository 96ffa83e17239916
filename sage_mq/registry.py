"""Which engines serve which model right now, kept current from ``sage:events``.

Read in full at start (and every ``RELOAD_S`` as a safety net); after that events keep it
current: ``engine.ready`` puts an engine in rotation, and an exit, a failed probe, a restart, a
failure or a stop takes it out as soon as the event is published (the record may follow later);
other events about an engine make the gateway read its record again.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sage_mq.bus import Bus
from sage_mq.connection import raise_if_cancelled
from sage_mq.errors import ControlPlaneUnavailable, DecodeError
from sage_mq.messages import MESSAGE_TYPES, EngineReady
from sage_mq.routing import Replica, running_replica
from sage_mq.store import EngineRecord, Store
from sage_mq.wire import decode

log = logging.getLogger(__name__)
RELOAD_S = 30.0
_LEAVING = {
    "engine.exited",
    "engine.unhealthy",
    "engine.restarting",
    "engine.failed",
    "engine.stopped",
    "engine.launch_failed",
}
"""Events after which an engine must not get requests, before any record is read."""
_REPORTED = {"engine.adopted", "engine.ready"}
"""Agent reports that may come before the scheduler rebuilt a record Redis lost: without the
record, they change nothing (``engine.restored`` follows the rebuild, or ``engine.stopped``)."""


class Registry:
    """RUNNING replicas by model name.

    Written on one event loop; read from anywhere (the client's calling threads too): readers
    see an immutable snapshot, replaced whole after each change.
    """

    def __init__(self, store: Store, bus: Bus) -> None:
        self.store = store
        self.bus = bus
        self._replicas: dict[str, Replica] = {}
        self._models: dict[str, str] = {}
        """Engine id -> model, for every engine known (RUNNING or not)."""
        self._by_model: dict[str, tuple[Replica, ...]] = {}
        self._known: frozenset[str] = frozenset()
        self._ended: set[str] = set()
        """Engines STOPPED or FAILED: nothing brings them back by itself."""
        self._coming: frozenset[str] = frozenset()

    def replicas(self, model: str) -> tuple[Replica, ...]:
        """RUNNING replicas of ``model``."""
        return self._by_model.get(model, ())

    def models(self) -> list[str]:
        """Models with at least one RUNNING replica."""
        return sorted(self._by_model)

    def known(self, model: str) -> bool:
        """Whether any engine (in any state) is for ``model``."""
        return model in self._known

    def coming(self, model: str) -> bool:
        """Whether an engine for ``model`` that is not RUNNING will be (starting, restarting,
        waiting for capacity): not all of them are STOPPED or FAILED."""
        return model in self._coming

    async def load(self) -> None:
        """Read every engine record."""
        records = await self.store.list_engines()
        self._replicas, self._models, self._ended = {}, {}, set()
        for record in records:
            self._apply(record)
        self._publish()

    def _publish(self) -> None:
        by_model: dict[str, list[Replica]] = {}
        for replica in self._replicas.values():
            by_model.setdefault(replica.model, []).append(replica)
        self._by_model = {model: tuple(found) for model, found in by_model.items()}
        self._known = frozenset(self._models.values())
        self._coming = frozenset(m for e, m in self._models.items() if e not in self._ended)

    def _apply(self, record: EngineRecord) -> None:
        self._models[record.engine_id] = record.served_name
        if record.state.terminal:
            self._ended.add(record.engine_id)
        else:
            self._ended.discard(record.engine_id)
        replica = running_replica(record)
        if replica is not None:
            self._replicas[record.engine_id] = replica
        else:
            self._replicas.pop(record.engine_id, None)

    async def follow(self) -> None:
        """Keep the registry current until cancelled (outlives Redis outages)."""
        cursor = "$"
        reloaded = 0.0
        while True:
            raise_if_cancelled()  # see connection.raise_if_cancelled
            try:
                if time.monotonic() - reloaded > RELOAD_S:
                    cursor = await self.bus.last_id(self.bus.keys.events)
                    await self.load()
                    reloaded = time.monotonic()
                async for entry_id, fields in self.bus.tail(self.bus.keys.events, cursor):
                    if entry_id:
                        cursor = entry_id
                        await self._on_event(fields)
                    if time.monotonic() - reloaded > RELOAD_S:
                        break
            except ControlPlaneUnavailable as exc:
                log.warning("gateway registry: %s; retrying", exc)
                await asyncio.sleep(1.0)

    async def _on_event(self, fields: dict[str, str]) -> None:
        await self._take(fields)
        self._publish()

    async def _take(self, fields: dict[str, str]) -> None:
        kind = fields.get("type", "")
        known = MESSAGE_TYPES.get(kind)
        if known is None or known.PERIODIC:
            return  # health reports, or a newer version's events: none changes a record
        try:
            event = decode(fields).payload
        except DecodeError:
            return  # the scheduler dead-letters it; nothing here to act on
        engine_id = getattr(event, "engine_id", None)
        if not isinstance(engine_id, str):
            return  # not about an engine (node events)
        if kind in _LEAVING:  # out of rotation at once, whatever the record says yet
            self._replicas.pop(engine_id, None)
            if kind in ("engine.stopped", "engine.failed"):
                self._ended.add(engine_id)
            return
        record = await self.store.get_engine(engine_id)
        if record is None and kind in _REPORTED:
            return  # Redis lost the record; it is being rebuilt (engine.restored follows)
        if record is None:
            self._replicas.pop(engine_id, None)
            self._models.pop(engine_id, None)
            self._ended.discard(engine_id)
        elif isinstance(event, EngineReady):
            # The agent saw it healthy; the scheduler's record may not say RUNNING yet.
            self._models[engine_id] = record.served_name
            self._ended.discard(engine_id)
            self._replicas[engine_id] = Replica(
                engine_id, record.served_name, event.url, record.kind
            )
        else:
            self._apply(record)
