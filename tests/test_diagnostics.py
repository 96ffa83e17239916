"""``kill -USR1`` on an actor writes what each of its tasks waits in, and goes on running."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sage_mq.diagnostics import write_dump
from sage_mq.settings import Settings


async def _inner(ready: asyncio.Event) -> None:
    ready.set()
    await asyncio.sleep(60)


async def _outer(ready: asyncio.Event) -> None:
    await _inner(ready)


async def test_the_dump_names_each_task_and_the_coroutines_it_waits_in(tmp_path: Path) -> None:
    ready = asyncio.Event()
    task = asyncio.create_task(_outer(ready), name="the-waiter")
    await ready.wait()
    task.cancel()  # asked, not yet carried out: the dump says so
    with open(tmp_path / "dump", "w+") as out:  # noqa: ASYNC230 - a test, not a server
        write_dump(asyncio.get_running_loop(), out)
    said = (tmp_path / "dump").read_text()
    await asyncio.gather(task, return_exceptions=True)
    waiter = said[said.index("task 'the-waiter', cancelling (1 asked):") :]
    assert waiter.index("in _outer") < waiter.index("in _inner") < waiter.index("in sleep")
    assert "--- threads" in said and "Current thread" in said


def test_sigusr1_on_a_running_scheduler_dumps_and_it_carries_on(settings: Settings) -> None:
    env = {**os.environ, "SAGE_MQ_REDIS_URL": settings.redis_url}
    env["SAGE_MQ_NAMESPACE"] = settings.namespace
    argv = [sys.executable, "-m", "sage_mq", "llm", "scheduler", "run", "--log-level", "WARNING"]
    with subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stderr is not None
            assert proc.stderr.readline().startswith("scheduler ")  # running
            proc.send_signal(signal.SIGUSR1)
            lines = []
            while "--- threads" not in (line := proc.stderr.readline()):
                assert line, "the scheduler ended: " + "".join(lines)
                lines.append(line)
            said = "".join(lines)
            assert "sage_mq/scheduler/core.py" in said and "in Scheduler.run" in said, said
            time.sleep(0.5)
            assert proc.poll() is None  # and it goes on
        finally:
            proc.terminate()
            proc.wait(30)
    assert proc.returncode == 0
