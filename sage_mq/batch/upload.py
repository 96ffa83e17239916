"""Taking an uploaded file into Redis a slice at a time.

An upload of up to :data:`MAX_FILE_BYTES` is read from wherever the web server spooled it, a
slice at a time: each slice is decoded, split into lines and pushed to a list that becomes the
file's only when the whole file is in (a rename), so no one sees half a file and the event loop
the gateway shares with other work is never held for long. A file that cannot make a batch
(not UTF-8, more than :data:`MAX_REQUESTS` requests or :data:`MAX_LINES` lines) is refused as
soon as that is known, with what it holds so far.
"""

from __future__ import annotations

import codecs
import contextlib
import time
import uuid
from typing import Any, Protocol

from sage_mq.batch.validate import MAX_FILE_BYTES, MAX_LINES, MAX_REQUESTS
from sage_mq.connection import redis_errors
from sage_mq.errors import ControlPlaneUnavailable, InvalidRequest
from sage_mq.keys import Keys
from sage_mq.replication import durable_pipeline

SLICE_BYTES = 256 * 1024
"""Read and pushed at a time: a few milliseconds of work between two turns of the loop."""
PUSH_LINES = 2000
UNFINISHED_TTL_S = 3600
"""An upload its gateway never finished (it died) leaves nothing behind for longer."""


class Readable(Protocol):
    """What an upload is read from: starlette's ``UploadFile``, or :class:`InMemory`."""

    async def read(self, size: int = -1) -> bytes: ...


class InMemory:
    """Bytes already in hand, read like an upload."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    async def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self.at + size
        chunk, self.at = self.data[self.at : end], min(end, len(self.data))
        return chunk


class Counted:
    """The running totals of an upload, refused past the limits."""

    def __init__(self) -> None:
        self.bytes = self.lines = self.requests = 0

    def add(self, size: int, lines: list[str]) -> None:
        self.bytes += size
        self.lines += len(lines)
        self.requests += sum(1 for line in lines if line.strip())
        if self.bytes > MAX_FILE_BYTES:
            raise InvalidRequest(
                f"the file is over {MAX_FILE_BYTES} bytes: split it into several batches"
            )
        if self.requests > MAX_REQUESTS:
            raise InvalidRequest(
                f"the file holds more than {MAX_REQUESTS} requests; a batch takes at most "
                f"{MAX_REQUESTS}: split it into several files"
            )
        if self.lines > MAX_LINES:
            raise InvalidRequest(
                f"the file has more than {MAX_LINES} lines (blank ones included): "
                "a batch file is one request a line"
            )


async def store_file(
    redis: Any, keys: Keys, source: Readable, filename: str, purpose: str
) -> dict[str, Any]:
    """A new file of ``source``'s lines, whole or not at all; its record."""
    file_id = f"file-{uuid.uuid4().hex[:24]}"
    unfinished = keys.file_upload(file_id)
    try:
        counted = await push_lines(redis, unfinished, source)
        record = {
            "id": file_id,
            "object": "file",
            "bytes": counted.bytes,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "lines": counted.lines,
            "requests": counted.requests,
        }
        with redis_errors("storing a file"):
            async with durable_pipeline(redis, transaction=True) as pipe:
                if counted.lines:  # the list becomes the file's, and lasts
                    pipe.rename(unfinished, keys.file_lines(file_id))
                    pipe.persist(keys.file_lines(file_id))
                pipe.hset(keys.file(file_id), mapping={k: str(v) for k, v in record.items()})
                pipe.zadd(keys.files, {file_id: record["created_at"]})
                await pipe.execute()
    except BaseException:
        with contextlib.suppress(ControlPlaneUnavailable):
            await redis.delete(unfinished)
        raise
    return record


async def push_lines(redis: Any, key: str, source: Readable) -> Counted:
    """Read ``source`` to its end into the list ``key`` (which expires unless made a file's:
    see the module doc); what it held. Raises :class:`InvalidRequest` past a limit."""
    counted = Counted()
    decoder = codecs.getincrementaldecoder("utf-8")()
    partial = ""
    while True:
        chunk = await source.read(SLICE_BYTES)
        try:
            text = partial + decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"the file is not UTF-8 text: {exc}") from None
        lines = text.split("\n")
        partial = lines.pop() if chunk else ""
        if not chunk and lines and lines[-1] == "":
            lines.pop()  # the newline that ends the last line starts no new one
        counted.add(len(chunk), lines)
        await push_slices(redis, key, lines)
        if not chunk:
            return counted


async def push_slices(redis: Any, key: str, lines: list[str]) -> None:
    """RPUSH ``lines`` a slice at a time (the event loop turns in between); the list expires
    unless its owner makes it last (PERSIST) once it is whole."""
    with redis_errors("storing a file"):
        for start in range(0, len(lines), PUSH_LINES):
            async with redis.pipeline(transaction=False) as pipe:
                pipe.rpush(key, *lines[start : start + PUSH_LINES])
                pipe.expire(key, UNFINISHED_TTL_S)
                await pipe.execute()
