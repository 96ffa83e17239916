"""Finding chunks that lost their worker, and running them again; ending batches whose window
ran out, and finishing endings a dead process left half-done.

Every worker process runs a sweeper thread; one at a time sweeps (a lock with a TTL). A chunk
of an active batch needs another run when nothing is doing it: no lease (the worker running it
keeps one alive) and its rq job is not waiting in the queue: the job started long enough ago
and its worker is gone (killed), a worker took it and went away before starting it, it failed,
or it is missing. A chunk that needed this :data:`MAX_RUNS` times ends: its requests without an
outcome are failed with the reason.

What rq does is left to rq: the queue, the jobs and their registries, the workers' registration
and heartbeats, failed-job records (read here through rq's ``Job`` API). What stays ours, and
why: rq notices a job whose worker was killed only when the job's started-registry entry
expires (its timeout or the worker's heartbeat TTL: minutes), and then retries it only if it was
enqueued with a ``Retry``; a chunk's lease (:data:`~sage_mq.batch.runner.LEASE_TTL_S`, seconds)
notices at once, and a chunk rerun counts against :data:`MAX_RUNS` whatever ended the run
before it (a kill, a raise, a Redis that came back empty), which one count of rq's cannot say.
A rerun is safe because a chunk sends only what has no outcome yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from sage_mq.batch.ending import (
    expire_if_due,
    fail_unsettled,
    finalize,
    finish_chunk,
    release_idle_chunks,
    stuck_finalizing,
)
from sage_mq.batch.records import FINAL, Records
from sage_mq.batch.runner import LEASE_TTL_S
from sage_mq.batch.service import BatchService
from sage_mq.connection import connect
from sage_mq.errors import ControlPlaneUnavailable
from sage_mq.settings import Settings

log = logging.getLogger(__name__)
SWEEP_EVERY_S = 3.0
MAX_RUNS = 5
_WAITING = {JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED}


def start_sweeper(settings: Settings) -> threading.Thread:
    """Sweep in a daemon thread of this process until it exits."""
    thread = threading.Thread(
        target=lambda: asyncio.run(_sweep_forever(settings)), name="batch-sweeper", daemon=True
    )
    thread.start()
    return thread


async def _sweep_forever(settings: Settings) -> None:
    redis = connect(settings)
    service = BatchService(settings, redis)
    while True:
        await asyncio.sleep(SWEEP_EVERY_S)
        try:
            lock = service.records.keys.batch_sweeper
            if await redis.set(lock, "1", nx=True, px=int(SWEEP_EVERY_S * 900)):
                await sweep(service)
        except ControlPlaneUnavailable as exc:
            log.warning("batch sweeper: %s", exc)
        except Exception:  # a sweep must never end the thread
            log.exception("batch sweeper: a sweep failed; trying again")


async def sweep(service: BatchService) -> list[tuple[str, int]]:
    """One pass over the active batches: end what is due to end, and queue again the chunks
    nothing is running; returns the chunks queued again."""
    records = service.records
    keys = records.keys
    requeued: list[tuple[str, int]] = []
    for batch_id in await records.redis.smembers(keys.batches_active):
        batch = await records.raw_batch(batch_id)
        status = batch.get("status")
        if not batch or status in FINAL:
            await records.redis.srem(keys.batches_active, batch_id)
        elif stuck_finalizing(batch, time.time()):
            log.warning("batch %s: finishing a finalization left half-done", batch_id)
            await finalize(records, batch_id, again=True)
        elif status == "in_progress" and await expire_if_due(records, batch_id):
            log.warning("batch %s: its completion window ran out; it expires", batch_id)
        elif status != "in_progress":  # cancelling or expiring: nothing is run again
            await release_idle_chunks(records, batch_id)
        else:
            requeued += await _requeue_stranded(service, batch)
    return requeued


async def _requeue_stranded(service: BatchService, batch: dict[str, Any]) -> list[tuple[str, int]]:
    records = service.records
    keys = records.keys
    batch_id = str(batch["id"])
    requeued: list[tuple[str, int]] = []
    jobs: dict[str, str] = await records.redis.hgetall(keys.batch_jobs(batch_id))
    pending = await records.redis.smembers(keys.batch_pending(batch_id))
    if not pending:  # the last chunk's process died between finishing it and finalizing
        await finalize(records, batch_id)
    queued: set[str] | None = None  # the queue's job ids, read once, if needed
    for member in pending:
        number = int(member)
        if await records.redis.exists(keys.batch_lease(batch_id, number)):
            continue  # running
        if queued is None:
            queued = set(await asyncio.to_thread(service.queue.get_job_ids))
        why = await asyncio.to_thread(_why_stranded, service, jobs.get(str(number)), queued)
        if why is None:
            continue
        runs = await records.redis.hincrby(keys.batch_jobs(batch_id), f"{number}:runs", 1)
        if runs >= MAX_RUNS:
            await _give_up(records, batch, number, f"chunk {number} ran {runs} times: {why}")
            continue
        log.warning("batch %s chunk %d: %s; queueing it again", batch_id, number, why)
        await asyncio.to_thread(service.enqueue, batch_id, [number])
        requeued.append((batch_id, number))
    return requeued


def _why_stranded(service: BatchService, job_id: str | None, queued: set[str]) -> str | None:
    """Why nothing is doing a chunk without a lease, or None if its job is still coming
    (``queued``: the ids of the jobs in the queue)."""
    if job_id is None:
        return "it has no job"
    try:
        job = Job.fetch(
            job_id, connection=service.queue.connection, serializer=service.queue.serializer
        )
    except NoSuchJobError:
        return "its job is gone"
    status = job.get_status(refresh=False)
    if status == JobStatus.QUEUED and job_id not in queued and _taken_and_dropped(service, job_id):
        return "its worker took it from the queue and went away before running it"
    if status in _WAITING:
        return None
    if status == JobStatus.STARTED:
        started = job.started_at.timestamp() if job.started_at else 0.0
        if time.time() - started < LEASE_TTL_S:
            return None  # just taken: its lease comes in a moment
        return "its worker went away mid-run"
    return f"its job ended {status.value if status else 'unknown'} without finishing it"


def _taken_and_dropped(service: BatchService, job_id: str) -> bool:
    """Whether a QUEUED job not in the queue was taken from it by a worker that never started
    it.

    rq moves a job to an intermediate list as a worker takes it, and marks it started a moment
    later; a worker that dies in between (or whose Redis failed over in between, losing the
    mark) leaves it there, QUEUED, and rq notices only at a maintenance pass (every 10 minutes)
    a minute after first seeing it. Here: out of the queue for :data:`LEASE_TTL_S` (from when
    this or rq's sweep first saw it so, with rq's own marker), it is taken off that list and the
    chunk runs again.
    """
    waiting_room = service.queue.intermediate_queue
    if waiting_room.set_first_seen(job_id):
        return False  # a worker may be starting it right now: look again next sweep
    first_seen = waiting_room.get_first_seen(job_id)
    if first_seen is not None and time.time() - first_seen.timestamp() < LEASE_TTL_S:
        return False
    waiting_room.remove(job_id)
    return True


async def _give_up(records: Records, batch: dict[str, Any], number: int, why: str) -> None:
    batch_id = str(batch["id"])
    rows = await records.chunk(batch_id, number, int(batch["chunk_size"]))
    await fail_unsettled(records, batch_id, rows, "chunk_failed", why)
    with contextlib.suppress(ControlPlaneUnavailable):
        await finish_chunk(records, batch_id, number)
