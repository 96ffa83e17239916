"""How a batch ends: completed when its last chunk is done, cancelled, or expired when its
completion window runs out, with whatever finished kept in its output and error files.

Expiry is checked by the workers' sweeper and by every read of the batch (so a batch expires
on time even when no worker is running, which is the usual reason it did not finish). An
expiring batch is ``finalizing`` with ``ending=expired``: running chunks stop between requests,
chunks nobody is running are dropped, and once none is left every request without an outcome
gets an error line with code ``batch_expired``, as OpenAI's Batch API writes them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from sage_mq.batch.records import FINAL, Records

STUCK_FINALIZING_S = 60
"""A batch still finalizing this long after it began was left half-done by a process that
died; the sweeper finishes it."""


async def finish_chunk(records: Records, batch_id: str, number: int) -> None:
    """Mark a chunk done; the last one to finish finalizes the batch."""
    keys = records.keys
    await records.redis.srem(keys.batch_pending(batch_id), number)
    if await records.redis.scard(keys.batch_pending(batch_id)) == 0:
        await finalize(records, batch_id)


async def finalize(records: Records, batch_id: str, *, again: bool = False) -> None:
    """Write the output and error files and end the batch: once, whoever calls, unless
    ``again`` (the sweeper finishing what a dead process began; every step can be repeated)."""
    keys = records.keys
    now = int(time.time())
    claimed = await records.redis.hsetnx(keys.batch(batch_id), "finalized", str(now))
    if not (claimed or again):
        return
    batch = await records.raw_batch(batch_id)
    if batch.get("status") in FINAL:
        return
    cancelled = batch.get("status") in ("cancelling", "cancelled")
    ended = "cancelled" if cancelled else batch.get("ending") or "completed"
    if not cancelled and batch.get("status") != "finalizing":
        await records.update_batch(batch_id, status="finalizing", finalizing_at=now)
    if ended == "expired":
        await _expire_the_rest(records, batch_id)
    files: dict[str, Any] = {}
    for kind, field in (("output", "output_file_id"), ("error", "error_file_id")):
        file_id = await records.create_result_file(batch_id, kind, now)
        if file_id is not None:
            files[field] = file_id
    await records.update_batch(batch_id, status=ended, **{f"{ended}_at": now}, **files)
    await records.redis.srem(keys.batches_active, batch_id)


async def expire_if_due(records: Records, batch_id: str, now: float | None = None) -> bool:
    """Begin expiring an in-progress batch whose window has run out; True if this call did."""
    due = await records.begin_expiry(batch_id, int(now or time.time()))
    if due:
        await release_idle_chunks(records, batch_id)
    return bool(due)


async def release_idle_chunks(records: Records, batch_id: str) -> None:
    """For a batch that is ending: drop the chunks nobody is running (a queued job for one will
    send nothing), and finalize once none is left."""
    keys = records.keys
    for member in await records.redis.smembers(keys.batch_pending(batch_id)):
        if not await records.redis.exists(keys.batch_lease(batch_id, int(member))):
            await records.redis.srem(keys.batch_pending(batch_id), member)
    if await records.redis.scard(keys.batch_pending(batch_id)) == 0:
        await finalize(records, batch_id)


def stuck_finalizing(batch: dict[str, Any], now: float) -> bool:
    """Whether a batch's finalization began long ago and never ended."""
    began = batch.get("finalized")
    if not began or batch.get("status") in FINAL:
        return False
    return now - int(began) > STUCK_FINALIZING_S


async def _expire_the_rest(records: Records, batch_id: str) -> None:
    rows = await records.all_requests(batch_id)
    message = "the batch expired (its completion window ran out) before this request ran"
    await fail_unsettled(records, batch_id, rows, "batch_expired", message)


async def fail_unsettled(
    records: Records, batch_id: str, rows: list[dict[str, Any]], code: str, message: str
) -> None:
    """An error line (``code``, ``message``) for each of these requests without an outcome."""
    settled = await records.settled(batch_id, [row["custom_id"] for row in rows])
    todo = [row["custom_id"] for row in rows if row["custom_id"] not in settled]
    for start in range(0, len(todo), 1000):
        part = {cid: error_line(cid, code, message) for cid in todo[start : start + 1000]}
        await records.record_many(batch_id, part, ok=False)


def error_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    """An error file line in OpenAI's shape."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
