"""Files and batches in Redis, in the shapes OpenAI's Batch API shows them.

Everything lives in Redis, so any gateway and any worker on any host sees the same files and
batches, and ``redis-cli HGETALL sage:batch:<id>`` shows one. An uploaded file is a list of its
lines (bounded by :data:`MAX_FILE_BYTES`); a batch keeps its checked requests in a list, and
each request's outcome in one of two hashes keyed by ``custom_id``, written at most once
(``HSETNX``), so a chunk that runs twice records each request once. Output and error files are
rendered from those hashes, in input order, when downloaded.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from sage_mq.batch.upload import InMemory, Readable, push_slices, store_file
from sage_mq.batch.validate import BatchRequest
from sage_mq.connection import Redis, redis_errors
from sage_mq.keys import Keys
from sage_mq.replication import durable_pipeline

FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
WINDOW_S = {"24h": 24 * 3600}
_TIMES = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)

# Record one request's outcome once (in either hash), count it, and note the order of outcomes.
_RECORD = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
  redis.call('RPUSH', KEYS[4], ARGV[1])
  return 1
end
return 0
"""

# in_progress -> finalizing (ending expired), only from in_progress and only once due.
_EXPIRE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
local expires = tonumber(redis.call('HGET', KEYS[1], 'expires_at') or '')
if not expires or expires > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'status', 'finalizing', 'finalizing_at', ARGV[1], 'ending', 'expired')
return 1
"""


def new_id(prefix: str) -> str:
    """``file-…`` / ``batch_…`` ids, as OpenAI spells them."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


class Records:
    """Reads and writes file and batch records."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis: Any = redis  # str replies (decode_responses), which redis-py's types miss
        self.keys = keys
        self._record = redis.register_script(_RECORD)
        self._expire = redis.register_script(_EXPIRE)

    # -- files -----------------------------------------------------------------------------
    async def create_file(
        self, source: bytes | Readable, filename: str, purpose: str
    ) -> dict[str, Any]:
        """Store an upload, read a slice at a time (see :mod:`.upload`): refuses one that is
        too big, not UTF-8 text, or holds more requests or lines than a batch takes."""
        data = InMemory(source) if isinstance(source, bytes) else source
        return _file_object(await store_file(self.redis, self.keys, data, filename, purpose))

    async def get_file(self, file_id: str) -> dict[str, Any] | None:
        with redis_errors("reading a file"):
            raw = await self.redis.hgetall(self.keys.file(file_id))
        return _file_object(_unflat(raw)) if raw else None

    async def get_files(self, file_ids: list[str]) -> list[dict[str, Any]]:
        """These files (those that exist), in one round trip."""
        raws = await self._hgetall_many("reading files", [self.keys.file(f) for f in file_ids])
        return [_file_object(_unflat(raw)) for raw in raws if raw]

    async def _hgetall_many(self, what: str, keys: list[str]) -> list[dict[str, str]]:
        with redis_errors(what):
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                rows: list[dict[str, str]] = await pipe.execute()
        return rows

    async def delete_file(self, file_id: str) -> bool:
        """Remove a file's record, lines and listing; False if there was none."""
        with redis_errors("deleting a file"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.keys.file(file_id))
                pipe.delete(self.keys.file_lines(file_id))
                pipe.zrem(self.keys.files, file_id)
                deleted, _lines, _listed = await pipe.execute()
        return bool(deleted)

    async def file_lines(self, file_id: str, slice_size: int = 10_000) -> list[str]:
        """A file's lines, read a slice at a time (each a short turn of the event loop)."""
        lines: list[str] = []
        key = self.keys.file_lines(file_id)
        with redis_errors("reading a file"):
            while part := await self.redis.lrange(key, len(lines), len(lines) + slice_size - 1):
                lines += part
        return lines

    async def file_content(self, file_id: str) -> bytes | None:
        """An uploaded file as sent, or a batch's output or error file rendered now."""
        with redis_errors("reading a file"):
            raw = await self.redis.hgetall(self.keys.file(file_id))
        if not raw:
            return None
        record = _unflat(raw)
        if "batch_id" not in record:
            return "".join(f"{line}\n" for line in await self.file_lines(file_id)).encode()
        batch_id = str(record["batch_id"])
        outcome = (
            self.keys.batch_results(batch_id)
            if record.get("kind") == "output"
            else self.keys.batch_errors(batch_id)
        )
        with redis_errors("reading a batch's results"):
            ids = [json.loads(r)["custom_id"] for r in await self._requests(batch_id)]
            found = await self.redis.hmget(outcome, ids) if ids else []
        return "".join(f"{line}\n" for line in found if line).encode()

    async def create_result_file(self, batch_id: str, kind: str, now: int) -> str | None:
        """The record of a batch's ``output`` or ``error`` file (its lines are rendered from
        the outcome hash when downloaded); None when there is nothing to put in it."""
        outcome = self.keys.batch_results if kind == "output" else self.keys.batch_errors
        with redis_errors("writing a result file"):
            lines: list[str] = await self.redis.hvals(outcome(batch_id))
            if not lines:
                return None
            file_id = f"file-{batch_id.removeprefix('batch_')}-{kind}"
            record = {
                "id": file_id,
                "object": "file",
                "bytes": sum(len(line.encode()) + 1 for line in lines),  # each line + "\n"
                "created_at": now,
                "filename": f"{batch_id}_{kind}.jsonl",
                "purpose": "batch_output",
                "status": "processed",
                "batch_id": batch_id,
                "kind": kind,
            }
            await self.redis.hset(self.keys.file(file_id), mapping=_flat(record))
            await self.redis.zadd(self.keys.files, {file_id: now})
        return file_id

    # -- batches ---------------------------------------------------------------------------
    async def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        requests: list[BatchRequest],
        chunk_size: int,
    ) -> tuple[dict[str, Any], int]:
        """A batch of checked requests, in progress; returns it and its number of chunks."""
        now = int(time.time())
        batch_id = new_id("batch_")
        chunks = max(1, -(-len(requests) // chunk_size))
        record: dict[str, Any] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "status": "in_progress",
            "created_at": now,
            "in_progress_at": now,
            "expires_at": now + WINDOW_S[completion_window],
            "total": len(requests),
            "completed": 0,
            "failed": 0,
            "chunks": chunks,
            "chunk_size": chunk_size,
            "metadata": metadata,
        }
        rows = await asyncio.to_thread(_rows, requests)  # 50,000 bodies: off the event loop
        queued = self.keys.batch_requests(batch_id)
        await push_slices(self.redis, queued, rows)  # a slice at a time; expires if we die
        with redis_errors("creating a batch"):
            async with durable_pipeline(self.redis, transaction=True) as pipe:
                pipe.persist(queued)
                pipe.sadd(self.keys.batch_pending(batch_id), *range(chunks))
                pipe.hset(self.keys.batch(batch_id), mapping=_flat(record))
                pipe.zadd(self.keys.batches, {batch_id: now})
                pipe.sadd(self.keys.batches_active, batch_id)
                await pipe.execute()
        return batch_object(record), chunks

    async def failed_batch(
        self, input_file_id: str, endpoint: str, window: str, errors: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """A batch refused at validation: status ``failed`` with every problem found."""
        now = int(time.time())
        record: dict[str, Any] = {
            "id": new_id("batch_"),
            "object": "batch",
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": window,
            "status": "failed",
            "created_at": now,
            "failed_at": now,
            "errors": {"object": "list", "data": errors},
            "total": 0,
            "completed": 0,
            "failed": 0,
        }
        with redis_errors("recording a batch"):
            await self.redis.hset(self.keys.batch(record["id"]), mapping=_flat(record))
            await self.redis.zadd(self.keys.batches, {record["id"]: now})
        return batch_object(record)

    async def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        """The batch as OpenAI shows it, or None."""
        raw = await self.raw_batch(batch_id)
        return batch_object(raw) if raw else None

    async def get_batches(self, batch_ids: list[str]) -> list[dict[str, Any]]:
        """These batches (those that exist) as OpenAI shows them, in one round trip."""
        raws = await self._hgetall_many("reading batches", [self.keys.batch(b) for b in batch_ids])
        return [batch_object(_unflat(raw)) for raw in raws if raw]

    async def begin_expiry(self, batch_id: str, now: int) -> bool:
        """in_progress -> finalizing with ``ending=expired``, if its window ran out by ``now``."""
        with redis_errors("expiring a batch"):
            return bool(await self._expire(keys=[self.keys.batch(batch_id)], args=[now]))

    async def raw_batch(self, batch_id: str) -> dict[str, Any]:
        with redis_errors("reading a batch"):
            raw = await self.redis.hgetall(self.keys.batch(batch_id))
        return _unflat(raw)

    async def update_batch(self, batch_id: str, **fields: Any) -> None:
        with redis_errors("updating a batch"):
            await self.redis.hset(self.keys.batch(batch_id), mapping=_flat(fields))

    async def chunk(self, batch_id: str, number: int, size: int) -> list[dict[str, Any]]:
        """The requests of one chunk."""
        with redis_errors("reading a batch"):
            rows = await self.redis.lrange(
                self.keys.batch_requests(batch_id), number * size, (number + 1) * size - 1
            )
        return [json.loads(row) for row in rows]

    async def settled(self, batch_id: str, custom_ids: list[str]) -> set[str]:
        """Which of these requests already have an outcome."""
        if not custom_ids:
            return set()
        with redis_errors("reading a batch"):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hmget(self.keys.batch_results(batch_id), custom_ids)
                pipe.hmget(self.keys.batch_errors(batch_id), custom_ids)
                ok, bad = await pipe.execute()
        return {cid for cid, a, b in zip(custom_ids, ok, bad, strict=True) if a or b}

    async def record(self, batch_id: str, custom_id: str, line: dict[str, Any], ok: bool) -> bool:
        """Keep one request's outcome (the first one only); True if this was the first."""
        with redis_errors("recording a result"):
            keys, args = self._record_args(batch_id, custom_id, line, ok)
            async with durable_pipeline(self.redis, transaction=False) as pipe:
                await self._record(keys=keys, args=args, client=pipe)
                (first,) = await pipe.execute()
        return bool(first)

    async def record_many(self, batch_id: str, lines: dict[str, dict[str, Any]], ok: bool) -> int:
        """:meth:`record` for many requests (custom_id -> line) in one round trip; how many
        were first."""
        with redis_errors("recording results"):
            async with durable_pipeline(self.redis, transaction=False) as pipe:
                for custom_id, line in lines.items():
                    keys, args = self._record_args(batch_id, custom_id, line, ok)
                    await self._record(keys=keys, args=args, client=pipe)
                return sum(await pipe.execute())

    def _record_args(
        self, batch_id: str, custom_id: str, line: dict[str, Any], ok: bool
    ) -> tuple[list[str], list[str]]:
        mine, other = (self.keys.batch_results, self.keys.batch_errors)[:: 1 if ok else -1]
        keys = [
            mine(batch_id),
            other(batch_id),
            self.keys.batch(batch_id),
            self.keys.batch_done(batch_id),
        ]
        return keys, [custom_id, json.dumps(line), "completed" if ok else "failed"]

    async def finished(self, batch_id: str, start: int, limit: int) -> list[dict[str, Any]]:
        """Output and error lines in the order they were recorded, from the ``start``-th on."""
        keys = self.keys
        with redis_errors("reading a batch's results"):
            ids = await self.redis.lrange(keys.batch_done(batch_id), start, start + limit - 1)
            if not ids:
                return []
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hmget(keys.batch_results(batch_id), ids)
                pipe.hmget(keys.batch_errors(batch_id), ids)
                ok, bad = await pipe.execute()
        return [json.loads(a or b) for a, b in zip(ok, bad, strict=True) if a or b]

    async def newest(self, kind: str, after: str | None, limit: int) -> tuple[list[str], bool]:
        """Ids of ``files`` or ``batches``, newest first, after the id ``after``; and whether
        more follow."""
        index = self.keys.files if kind == "files" else self.keys.batches
        with redis_errors(f"listing {kind}"):
            start = 0
            if after:
                rank = await self.redis.zrevrank(index, after)
                start = 0 if rank is None else rank + 1
            ids: list[str] = await self.redis.zrevrange(index, start, start + limit)
        return ids[:limit], len(ids) > limit

    async def all_requests(self, batch_id: str) -> list[dict[str, Any]]:
        """Every request of a batch (line, custom_id, body), in file order."""
        with redis_errors("reading a batch"):
            return [json.loads(row) for row in await self._requests(batch_id)]

    async def _requests(self, batch_id: str) -> list[str]:
        rows: list[str] = await self.redis.lrange(self.keys.batch_requests(batch_id), 0, -1)
        return rows


def batch_object(record: dict[str, Any]) -> dict[str, Any]:
    """A stored batch record in OpenAI's shape."""
    batch = {
        "id": record["id"],
        "object": "batch",
        "endpoint": record.get("endpoint"),
        "errors": record.get("errors"),
        "input_file_id": record.get("input_file_id"),
        "completion_window": record.get("completion_window"),
        "status": record.get("status"),
        "output_file_id": record.get("output_file_id"),
        "error_file_id": record.get("error_file_id"),
        "request_counts": {
            "total": int(record.get("total") or 0),
            "completed": int(record.get("completed") or 0),
            "failed": int(record.get("failed") or 0),
        },
        "metadata": record.get("metadata"),
    }
    batch.update({name: record.get(name) for name in _TIMES})
    return batch


def _rows(requests: list[BatchRequest]) -> list[str]:
    return [
        json.dumps({"line": r.line, "custom_id": r.custom_id, "body": r.body}) for r in requests
    ]


def _file_object(record: dict[str, Any]) -> dict[str, Any]:
    fields = ("id", "object", "bytes", "created_at", "filename", "purpose", "status")
    return {name: record.get(name) for name in fields}


def _flat(record: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items()}


_JSON_FIELDS = frozenset(
    {
        "bytes",
        "lines",
        "requests",
        "total",
        "completed",
        "failed",
        "chunks",
        "chunk_size",
        "metadata",
    }
    | {"errors", *_TIMES}
)
"""Fields stored as JSON; every other field is a string as it is (a filename "123" stays one)."""


def _unflat(raw: dict[str, str]) -> dict[str, Any]:
    return {k: json.loads(v) if k in _JSON_FIELDS else v for k, v in raw.items()}
