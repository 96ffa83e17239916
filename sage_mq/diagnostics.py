"""What a process that seems stuck is doing: ``kill -USR1 <pid>`` makes an actor write each
asyncio task of its loop, with the chain of coroutines it waits in, and each thread's stack, to
its log (stderr). It goes on running.

A hung ``sage llm up`` was found this way: the task waiting for an engine's RUNNING had been
cancelled, and still read the event stream (see :func:`sage_mq.connection.raise_if_cancelled`).
"""

from __future__ import annotations

import asyncio
import faulthandler
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any, TextIO


def dump_on_sigusr1(loop: asyncio.AbstractEventLoop) -> None:
    """On SIGUSR1, write what the loop's tasks and the threads are doing to stderr."""
    loop.add_signal_handler(signal.SIGUSR1, write_dump, loop, sys.stderr)


def write_dump(loop: asyncio.AbstractEventLoop, out: TextIO) -> None:
    tasks = sorted(asyncio.all_tasks(loop), key=lambda t: t.get_name())
    out.write(f"--- {len(tasks)} asyncio task(s), innermost call last\n")
    for task in tasks:
        state = f"cancelling ({task.cancelling()} asked)" if task.cancelling() else "waiting"
        out.write(f"task {task.get_name()!r}, {state}:\n")
        for frame in awaited_frames(task.get_coro()):
            code = frame.f_code
            out.write(f"  {code.co_filename}:{frame.f_lineno} in {code.co_qualname}\n")
    out.write("--- threads\n")
    out.flush()
    faulthandler.dump_traceback(file=out, all_threads=True)
    out.flush()


def awaited_frames(coro: Any) -> Iterator[FrameType]:
    """The frames of a coroutine and of each coroutine or generator it awaits, outermost
    first (down to the first that shows no frame, such as an async generator's step)."""
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        frame = frame or getattr(coro, "ag_frame", None)
        if frame is None:
            return
        yield frame
        coro = (
            getattr(coro, "cr_await", None)
            or getattr(coro, "gi_yieldfrom", None)
            or getattr(coro, "ag_await", None)
        )
