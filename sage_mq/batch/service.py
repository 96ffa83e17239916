"""Creating, reading and cancelling batches: what the gateway's Batch API and the client call."""

from __future__ import annotations

import time
from typing import Any

from rq import Queue
from starlette.concurrency import run_in_threadpool

from sage_mq.batch.records import FINAL, WINDOW_S, Records
from sage_mq.batch.runner import finalize
from sage_mq.batch.validate import check_lines
from sage_mq.batch.worker import batch_queue
from sage_mq.connection import Redis
from sage_mq.errors import InvalidRequest
from sage_mq.keys import Keys
from sage_mq.settings import Settings

CHUNK_SIZE = 200
"""Requests per rq job: enough to amortise rq's own cost per job, few enough to spread."""
JOB_TIMEOUT_S = 3600


class BatchNotFound(InvalidRequest):
    """No batch or file with that id."""


class BatchService:
    """Batches over the fleet's Redis; chunks go to the rq queue ``<namespace>:batch``."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.records = Records(redis, Keys(settings.namespace))
        self.queue = batch_queue(settings)

    async def create(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Check the input file (every problem, with line numbers, before any GPU time) and
        queue its chunks; a file with problems gives a ``failed`` batch that says what they are."""
        file = await self.records.get_file(input_file_id)
        if file is None:
            raise BatchNotFound(f"no file {input_file_id!r}: upload it with POST /v1/files")
        if file["purpose"] != "batch":
            raise InvalidRequest(
                f"file {input_file_id!r} has purpose {file['purpose']!r}, not 'batch'"
            )
        if completion_window not in WINDOW_S:
            raise InvalidRequest(
                f"completion_window {completion_window!r} is not offered; "
                f"use one of {', '.join(WINDOW_S)}"
            )
        lines = await self.records.file_lines(input_file_id)
        requests, errors = check_lines(lines, endpoint)
        if errors:
            data = [e.as_dict() for e in errors]
            return await self.records.failed_batch(input_file_id, endpoint, completion_window, data)
        batch, chunks = await self.records.create_batch(
            input_file_id, endpoint, completion_window, metadata, requests, CHUNK_SIZE
        )
        await run_in_threadpool(self.enqueue, batch["id"], range(chunks))
        return batch

    def enqueue(self, batch_id: str, chunks: range | list[int]) -> None:
        """Queue chunk jobs (one round trip for all of them)."""
        jobs = [
            Queue.prepare_data(
                "sage_mq.batch.jobs.run_batch_chunk",
                args=(batch_id, number),
                timeout=JOB_TIMEOUT_S,
                result_ttl=3600,
                failure_ttl=7 * 24 * 3600,
                description=f"batch {batch_id} chunk {number}",
            )
            for number in chunks
        ]
        queued = self.queue.enqueue_many(jobs)
        keys = self.records.keys
        self.queue.connection.hset(
            keys.batch_jobs(batch_id),
            mapping={str(number): job.id for number, job in zip(chunks, queued, strict=True)},
        )

    async def get(self, batch_id: str) -> dict[str, Any]:
        batch = await self.records.get_batch(batch_id)
        if batch is None:
            raise BatchNotFound(f"no batch {batch_id!r}")
        return batch

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        """Stop a batch: queued chunks will not run, running ones stop between requests, and
        what finished stays in its output file."""
        batch = await self.get(batch_id)
        if batch["status"] in FINAL or batch["status"] == "cancelling":
            return batch
        await self.records.update_batch(batch_id, status="cancelling", cancelling_at=_now())
        if await self.records.redis.scard(self.records.keys.batch_pending(batch_id)) == 0:
            await finalize(self.records, batch_id)
        return await self.get(batch_id)


def _now() -> int:
    return int(time.time())
