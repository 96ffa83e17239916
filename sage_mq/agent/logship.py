"""Mirrors engine log files into capped Redis streams, so logs can be read from any host.

Each entry is ``{line, generation, offset}``: the line, the engine generation whose log file it
came from, and the file offset just past it. A restarted agent resumes from the last entry of its
engine's generation, so lines written while the agent was away are shipped too, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from sage_mq.bus import Bus
from sage_mq.connection import raise_if_cancelled
from sage_mq.errors import ControlPlaneUnavailable

log = logging.getLogger(__name__)
_CHUNK = 256 * 1024


class LogShipper:
    """One task per engine, tailing its log file into ``<ns>:engine:<id>:log``."""

    def __init__(self, bus: Bus, maxlen: int, interval_s: float = 0.5) -> None:
        self.bus = bus
        self.keys = bus.keys
        self.maxlen = maxlen
        self.interval_s = interval_s
        self._tasks: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = {}
        self._finishing: set[asyncio.Task[None]] = set()

    def start(self, engine_id: str, path: Path, generation: int, *, resume: bool = False) -> None:
        """Begin shipping a log: from its start for a new process; with ``resume`` (an engine
        a restarted agent found) from where shipping got to before."""
        self.stop(engine_id)
        done = asyncio.Event()
        task = asyncio.get_running_loop().create_task(
            self._run(engine_id, path, generation, resume, done), name=f"logship-{engine_id}"
        )
        self._tasks[engine_id] = (task, done)

    def stop(self, engine_id: str) -> None:
        """Ship what is left of a log (its last lines matter most), then stop."""
        entry = self._tasks.pop(engine_id, None)
        if entry is not None:
            entry[1].set()
            self._finishing.add(entry[0])
            entry[0].add_done_callback(self._finishing.discard)

    async def close(self) -> None:
        """Let finishing tasks ship their last lines (briefly), then stop every task."""
        if self._finishing:
            await asyncio.wait(self._finishing, timeout=2.0)
        tasks = [task for task, _done in self._tasks.values()] + list(self._finishing)
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(
        self, engine_id: str, path: Path, generation: int, resume: bool, done: asyncio.Event
    ) -> None:
        offset = await self._shipped_up_to(engine_id, generation) if resume else 0
        partial = b""
        while not done.is_set():
            raise_if_cancelled()  # see connection.raise_if_cancelled
            offset, partial = await self._ship_once(engine_id, path, generation, offset, partial)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.interval_s)
        await self._ship_once(engine_id, path, generation, offset, partial, final=True)

    async def _shipped_up_to(self, engine_id: str, generation: int) -> int:
        """Where this generation's shipping got to (0 if none of it was shipped)."""
        while True:
            raise_if_cancelled()
            try:
                newest = await self.bus.newest(self.keys.engine_log(engine_id))
                break
            except ControlPlaneUnavailable as exc:
                log.debug("log shipping for %s waits for Redis: %s", engine_id, exc)
                await asyncio.sleep(self.interval_s)
        if newest is None or newest[1].get("generation") != str(generation):
            return 0
        return int(newest[1].get("offset") or 0)

    async def _ship_once(
        self,
        engine_id: str,
        path: Path,
        generation: int,
        offset: int,
        partial: bytes,
        final: bool = False,
    ) -> tuple[int, bytes]:
        """Ship whole lines past ``offset``; returns the new offset and the unfinished line."""
        size = _size(path)
        if size < offset:  # copy-truncated, or replaced by rotation
            offset, partial = 0, b""
        chunk = _read_from(path, offset) if size > offset else b""
        lines = (partial + chunk).split(b"\n")
        rest = b"" if final else lines.pop()
        entries, end = [], offset - len(partial)
        for line in lines:
            end += len(line) + 1
            if line:
                text = line.decode("utf-8", "replace")
                entries.append({"line": text, "generation": str(generation), "offset": str(end)})
        try:
            await self.bus.append(self.keys.engine_log(engine_id), entries, self.maxlen)
        except ControlPlaneUnavailable as exc:
            log.debug("log shipping for %s paused: %s", engine_id, exc)
            return offset, partial  # nothing consumed: read the same bytes next round
        return offset + len(chunk), rest


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
