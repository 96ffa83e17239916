"""Running one chunk of a batch: its requests sent concurrently to RUNNING replicas, each
outcome recorded once, transient failures waited out, cancellation and expiry honoured between
requests.

A chunk is idempotent: requests that already have an outcome are skipped, so a chunk run again
(its worker was killed) sends only what is missing. While it runs, the worker keeps a lease on
the chunk alive in Redis; a lease that lapses tells the sweeper the chunk needs another run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

from sage_mq.batch.ending import error_line, finish_chunk
from sage_mq.batch.records import Records
from sage_mq.broker import Broker
from sage_mq.connection import raise_if_cancelled, redis_errors
from sage_mq.errors import ControlPlaneUnavailable
from sage_mq.failover import Failover, worth_another
from sage_mq.registry import Registry
from sage_mq.routing import NoReplica, Replica, Router
from sage_mq.settings import Settings
from sage_mq.upstream import Upstream, UpstreamError

log = logging.getLogger(__name__)
LEASE_TTL_S = 6
WAIT_FOR_ENGINE_S = 600.0
"""How long a request waits for a replica of its model to be RUNNING again before it fails."""
_SERVER_ERROR_TRIES = 3


async def run_chunk(
    settings: Settings, batch_id: str, number: int, *, concurrency: int = 32
) -> dict[str, Any]:
    """Run chunk ``number`` of a batch; returns what it did."""
    broker = Broker(settings)
    redis, keys = broker.redis, broker.keys
    records = Records(redis, keys)
    upstream = Upstream()
    registry = Registry(broker.store, broker.bus)
    lease = asyncio.create_task(_keep_lease(redis, keys.batch_lease(batch_id, number)))
    follow: asyncio.Task[None] | None = None
    try:
        batch = await records.raw_batch(batch_id)
        if not batch:
            return {"skipped": "no such batch"}
        sent = 0
        if batch["status"] == "in_progress":
            rows = await records.chunk(batch_id, number, int(batch["chunk_size"]))
            settled = await records.settled(batch_id, [r["custom_id"] for r in rows])
            todo = [row for row in rows if row["custom_id"] not in settled]
            if todo:
                with contextlib.suppress(ControlPlaneUnavailable):
                    await registry.load()  # else none is known yet: each says so
                follow = asyncio.create_task(registry.follow(), name="registry")
            sender = _Sender(registry, upstream, str(batch["endpoint"]))
            sent = await _send_all(records, sender, batch_id, todo, concurrency)
        await finish_chunk(records, batch_id, number)
        return {"batch": batch_id, "chunk": number, "sent": sent}
    finally:
        helpers = [lease] if follow is None else [lease, follow]
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        with contextlib.suppress(Exception):
            await redis.delete(keys.batch_lease(batch_id, number))
        await upstream.aclose()
        await broker.aclose()


async def _send_all(
    records: Records, sender: _Sender, batch_id: str, rows: list[dict[str, Any]], concurrency: int
) -> int:
    cancelled = asyncio.Event()
    watch = asyncio.create_task(_watch_cancel(records, batch_id, cancelled))
    gate = asyncio.Semaphore(concurrency)
    sent = 0

    async def one(row: dict[str, Any]) -> None:
        nonlocal sent
        async with gate:
            if cancelled.is_set():
                return
            ok, line = await sender.send(row["custom_id"], row["body"])
            await records.record(batch_id, row["custom_id"], line, ok)
            sent += 1

    try:
        await asyncio.gather(*(one(row) for row in rows))
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
    return sent


class _Sender:
    """Sends one request to a RUNNING replica of its model (from the registry, which follows
    the events as the gateway's does), another replica when one fails, and waits out restarts."""

    def __init__(self, registry: Registry, upstream: Upstream, endpoint: str) -> None:
        self.registry = registry
        self.upstream = upstream
        self.endpoint = endpoint
        self.router = Router("adaptive")

    async def send(self, custom_id: str, body: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        model = str(body["model"])
        payload = json.dumps(body).encode()
        deadline = time.monotonic() + WAIT_FOR_ENGINE_S
        delay, server_errors = 0.5, 0
        walk = Failover(self.router, model)
        while time.monotonic() < deadline:
            replicas = self.registry.replicas(model)
            if not replicas and not self.registry.coming(model):
                return False, error_line(
                    custom_id, "model_not_found", f"no engine serves {model!r}"
                )
            try:
                replica = walk.choose(replicas)
            except NoReplica:  # none RUNNING, or each failed once: wait, then walk again
                why = walk.last if replicas else f"no replica of {model!r} is RUNNING"
                walk = Failover(self.router, model, last=why)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            outcome = await self._try(replica, payload, custom_id)
            if isinstance(outcome, str):
                walk.failed(replica, outcome)
                continue
            status, line = outcome
            if status < 500 or server_errors + 1 >= _SERVER_ERROR_TRIES:
                return 200 <= status < 300, line
            server_errors += 1
            walk.failed(replica, f"HTTP {status}")
        return False, error_line(
            custom_id,
            "engine_unavailable",
            f"gave up after {WAIT_FOR_ENGINE_S:.0f} s: {walk.last}",
        )

    async def _try(
        self, replica: Replica, payload: bytes, custom_id: str
    ) -> tuple[int, dict[str, Any]] | str:
        """(status, output line), or why the replica gave no usable answer (worth a retry)."""
        self.router.started(replica)
        started = time.monotonic()
        try:
            response = await self.upstream.post(f"{replica.url}{self.endpoint}", payload)
            if worth_another(response.status):
                response.close()
                self.router.finished(replica, None)
                return f"HTTP {response.status}"
            raw = await response.read()
        except UpstreamError as exc:
            self.router.finished(replica, None)
            return str(exc)
        self.router.finished(replica, time.monotonic() - started)
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {"error": {"message": raw[:300].decode("utf-8", "replace")}}
        return response.status, _response_line(custom_id, response.status, answer)


async def _keep_lease(redis: Any, key: str) -> None:
    while True:
        with contextlib.suppress(Exception):
            await redis.set(key, "1", ex=LEASE_TTL_S)
        raise_if_cancelled()  # see connection.raise_if_cancelled
        await asyncio.sleep(LEASE_TTL_S / 3)


async def _watch_cancel(records: Records, batch_id: str, cancelled: asyncio.Event) -> None:
    """Sets ``cancelled`` once the batch is no longer in progress (cancelled or expiring)."""
    while True:
        raise_if_cancelled()  # see connection.raise_if_cancelled
        await asyncio.sleep(0.5)
        with contextlib.suppress(ControlPlaneUnavailable):
            with redis_errors("reading a batch"):
                status = await records.redis.hget(records.keys.batch(batch_id), "status")
            if status != "in_progress":
                cancelled.set()
                return


def _response_line(custom_id: str, status: int, body: Any) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body},
        "error": None,
    }
