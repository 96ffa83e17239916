"""``/metrics`` in Prometheus' format: requests and latency by route and model, and the fleet
(engines by state, restarts, stream backlogs) read from Redis at most every two seconds."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sage_mq.batch.service import BatchService
from sage_mq.connection import redis_errors
from sage_mq.control import ControlPlaneManager
from sage_mq.store import EngineState

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]
FLEET_EVERY_S = 2.0
"""How stale the fleet's figures on ``/metrics`` may be (Prometheus scrapes every 15 s)."""


class GatewayMetrics:
    """The gateway's own metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sage_gateway_requests",
            "Inference requests answered, by route, model and HTTP status",
            ["route", "model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sage_gateway_request_seconds",
            "Time to answer an inference request (to the end of a stream)",
            ["route", "model"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.engines = Gauge("sage_engines", "Engines by state", ["state"], registry=self.registry)
        self.restarts = Gauge(
            "sage_engine_restarts", "Restarts of each engine", ["engine_id"], registry=self.registry
        )
        self.streams = Gauge(
            "sage_stream_length", "Entries in a stream", ["stream"], registry=self.registry
        )
        self.batch_queue = Gauge(
            "sage_batch_queue_depth", "Batch chunks waiting in the rq queue", registry=self.registry
        )
        self.batches_active = Gauge(
            "sage_batches_active", "Batches not yet ended", registry=self.registry
        )
        self._fleet_read: asyncio.Future[None] | None = None
        self._fleet_at = 0.0

    async def render(self, cp: ControlPlaneManager, batches: BatchService) -> bytes:
        """The metrics text, with the fleet's figures as read at most ``FLEET_EVERY_S`` ago:
        however often it is scraped, and by how many at once, the fleet is read once a period,
        in a few short round trips (a second's work at 10,000 engines was one per scrape)."""
        now = time.monotonic()
        if self._fleet_read is None or now - self._fleet_at > FLEET_EVERY_S:
            self._fleet_at = now
            self._fleet_read = asyncio.ensure_future(self._read_fleet(cp, batches))
        reading = self._fleet_read
        try:
            await asyncio.shield(reading)
        except Exception:
            self._fleet_read = None  # (Redis away): read again at the next scrape
            raise
        return generate_latest(self.registry)

    async def _read_fleet(self, cp: ControlPlaneManager, batches: BatchService) -> None:
        states = await cp.store.engine_states()
        for state in EngineState:
            self.engines.labels(state.value).set(sum(s == state for _e, s, _r in states))
        self.restarts.clear()
        for engine_id, _state, restarts in states:
            self.restarts.labels(engine_id).set(restarts)
        names = {"requests": cp.keys.requests, "events": cp.keys.events, "dead": cp.keys.dead}
        for name, length in zip(names, await cp.bus.lengths(list(names.values())), strict=True):
            self.streams.labels(name).set(length)
        redis = batches.records.redis
        async with redis.pipeline(transaction=False) as pipe:
            pipe.llen(batches.queue.key)
            pipe.scard(batches.records.keys.batches_active)
            with redis_errors("reading the fleet's batch figures"):
                queued, active = await pipe.execute()
        self.batch_queue.set(queued)
        self.batches_active.set(active)
