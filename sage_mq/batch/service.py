"""Creating, reading and cancelling batches: what the gateway's Batch API and the client call."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rq import Queue
from starlette.concurrency import run_in_threadpool

from sage_mq.batch.ending import expire_if_due, release_idle_chunks
from sage_mq.batch.records import FINAL, WINDOW_S, Records
from sage_mq.batch.validate import MAX_LINES, LineError, check_lines
from sage_mq.batch.worker import batch_queue
from sage_mq.connection import Redis, redis_errors
from sage_mq.errors import InvalidRequest
from sage_mq.keys import Keys
from sage_mq.settings import Settings

CHUNK_SIZE = 200
"""Requests per rq job: enough to amortise rq's own cost per job, few enough to spread."""
JOB_TIMEOUT_S = 3600


class BatchNotFound(InvalidRequest):
    """No batch or file with that id."""


class BatchNotCancellable(InvalidRequest):
    """The batch ended before the cancel came (completed, failed or expired)."""


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
        if int(file.get("lines") or 0) > MAX_LINES:  # kept from before uploads were bounded
            errors = [LineError("too_many_requests", f"the file has over {MAX_LINES} lines")]
        else:  # read in slices, checked off the event loop: other requests go on meanwhile
            lines = await self.records.file_lines(input_file_id)
            requests, errors = await asyncio.to_thread(check_lines, lines, endpoint)
        if errors:
            data = [e.as_dict() for e in errors]
            return await self.records.failed_batch(input_file_id, endpoint, completion_window, data)
        batch, chunks = await self.records.create_batch(
            input_file_id, endpoint, completion_window, metadata, requests, CHUNK_SIZE
        )
        with redis_errors("queueing a batch's chunks"):
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
        """The batch now; one whose window has run out begins to expire on this read (so it
        does even when no worker is running)."""
        batch = await self.records.get_batch(batch_id)
        if batch is None:
            raise BatchNotFound(f"no batch {batch_id!r}")
        return await self._expired_if_due(batch)

    async def _expired_if_due(self, batch: dict[str, Any]) -> dict[str, Any]:
        if batch["status"] == "in_progress" and batch["expires_at"] <= _now():
            await expire_if_due(self.records, batch["id"])
            return await self.get(batch["id"])
        return batch

    async def finished(self, batch_id: str, after: int, limit: int) -> dict[str, Any]:
        """Output and error lines from the ``after``-th on, in the order they were recorded,
        with the batch's status read before them: a status that is final means no line
        is missing from what ``after`` + these lines cover."""
        batch = await self.get(batch_id)
        lines = await self.records.finished(batch_id, after, limit)
        return {
            "object": "list",
            "data": lines,
            "next": after + len(lines),
            "batch_status": batch["status"],
        }

    async def list(self, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        """Batches, newest first, in OpenAI's list shape (``after``: the last id seen)."""
        ids, more = await self.records.newest("batches", after, limit)
        data = [await self._expired_if_due(b) for b in await self.records.get_batches(ids)]
        return _page(data, more)

    async def delete_file(self, file_id: str) -> dict[str, Any]:
        """Delete a file (its record and lines); batches made from it keep their own copy of
        its requests."""
        if not await self.records.delete_file(file_id):
            raise BatchNotFound(f"no file {file_id!r}")
        return {"id": file_id, "object": "file", "deleted": True}

    async def list_files(
        self, after: str | None = None, limit: int = 10000, purpose: str | None = None
    ) -> dict[str, Any]:
        """Files, newest first, in OpenAI's list shape; ``purpose`` keeps one kind."""
        data: list[dict[str, Any]] = []
        more = True
        while more and len(data) < limit:
            ids, more = await self.records.newest("files", after, limit)
            files = await self.records.get_files(ids)
            data += [file for file in files if purpose in (None, file["purpose"])]
            after = ids[-1] if ids else None
        return _page(data[:limit], more or len(data) > limit)

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        """Stop a batch: queued chunks will not run, running ones stop between requests, and
        what finished stays in its output file. One that has ended otherwise cannot be (409,
        as OpenAI answers); cancelling twice answers the same."""
        batch = await self.get(batch_id)
        if batch["status"] in ("cancelling", "cancelled"):
            return batch  # asked twice: the same answer
        if batch["status"] in FINAL:
            raise BatchNotCancellable(
                f"cannot cancel batch {batch_id}: its status is {batch['status']!r}"
            )
        await self.records.update_batch(batch_id, status="cancelling", cancelling_at=_now())
        await release_idle_chunks(self.records, batch_id)  # ends it now if nothing is running
        return await self.get(batch_id)


def _page(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


def _now() -> int:
    return int(time.time())
