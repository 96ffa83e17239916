"""``/metrics`` in Prometheus' format: requests and latency by route and model, and the fleet
(engines by state, restarts, stream backlogs) read from Redis when scraped."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sage_mq.batch.service import BatchService
from sage_mq.control import ControlPlaneManager
from sage_mq.store import EngineState

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]


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

    async def render(self, cp: ControlPlaneManager, batches: BatchService) -> bytes:
        """The metrics text, with the fleet's figures read now."""
        records = await cp.list_engines()
        for state in EngineState:
            self.engines.labels(state.value).set(sum(r.state == state for r in records))
        self.restarts.clear()
        for record in records:
            self.restarts.labels(record.engine_id).set(record.restarts)
        for name, length in (await cp.status())["streams"].items():
            self.streams.labels(name).set(length)
        redis = batches.records.redis
        self.batch_queue.set(await redis.llen(batches.queue.key))
        self.batches_active.set(await redis.scard(batches.records.keys.batches_active))
        return generate_latest(self.registry)
