"""Mirrors engine log files into capped Redis streams, so logs can be read from any host."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from sage_mq.connection import Redis
from sage_mq.keys import Keys

log = logging.getLogger(__name__)
_CHUNK = 256 * 1024


class LogShipper:
    """One task per engine, tailing its log file into ``<ns>:engine:<id>:log``."""

    def __init__(self, redis: Redis, keys: Keys, maxlen: int, interval_s: float = 0.5) -> None:
        self.redis: Any = redis
        self.keys = keys
        self.maxlen = maxlen
        self.interval_s = interval_s
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, engine_id: str, path: Path, *, from_end: bool = False) -> None:
        """Begin shipping a log (from its end, for an adopted engine already shipped)."""
        self.stop(engine_id)
        offset = _size(path) if from_end else 0
        self._tasks[engine_id] = asyncio.get_running_loop().create_task(
            self._run(engine_id, path, offset), name=f"logship-{engine_id}"
        )

    def stop(self, engine_id: str) -> None:
        """Stop shipping a log (its task ships what is left first)."""
        task = self._tasks.pop(engine_id, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        """Stop every shipping task."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, engine_id: str, path: Path, offset: int) -> None:
        partial = b""
        try:
            while True:
                offset, partial = await self._ship_once(engine_id, path, offset, partial)
                await asyncio.sleep(self.interval_s)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self._ship_once(engine_id, path, offset, partial, final=True)
            raise

    async def _ship_once(
        self, engine_id: str, path: Path, offset: int, partial: bytes, final: bool = False
    ) -> tuple[int, bytes]:
        """Ship whole lines past ``offset``; returns the new offset and the unfinished line."""
        size = _size(path)
        if size < offset:  # copy-truncated, or replaced by rotation
            offset, partial = 0, b""
        chunk = _read_from(path, offset) if size > offset else b""
        lines = (partial + chunk).split(b"\n")
        rest = b"" if final else lines.pop()
        try:
            await self._append(engine_id, [ln.decode("utf-8", "replace") for ln in lines if ln])
        except (RedisError, OSError) as exc:
            log.debug("log shipping for %s paused: %s", engine_id, exc)
            return offset, partial  # nothing consumed: read the same bytes next round
        return offset + len(chunk), rest

    async def _append(self, engine_id: str, lines: list[str]) -> None:
        if not lines:
            return
        key = self.keys.engine_log(engine_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for line in lines:
                pipe.xadd(key, {"line": line}, maxlen=self.maxlen, approximate=True)
            await pipe.execute()


def _read_from(path: Path, offset: int) -> bytes:
    """Up to one chunk of a local log file (small and local: fine to read inline)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(_CHUNK)


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
