"""``sage llm up`` as a user runs it: a process of its own, stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.engines import marked_env, marked_pids
from tests.helpers.servers import ROOT, free_port


@dataclass
class Up:
    """A running ``sage llm up``: its process, its output file and the gateway's port."""

    proc: subprocess.Popen[bytes]
    out: Path
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def redis_line(self) -> str:
        """The banner's Redis line, which must be one line however long its path."""
        found = re.search(r"^  Redis +(.+)$", self.out.read_text(), re.MULTILINE)
        assert found is not None, self.out.read_text()
        return found.group(1)

    @property
    def redis_url(self) -> str:
        return self.redis_line.split()[0]

    def ctrl_c(self, timeout: float = 60) -> float:
        """Send Ctrl-C; how long it took to end (it must end with status 0)."""
        started = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGINT)
        assert self.proc.wait(timeout) == 0, self.out.read_text()
        return time.monotonic() - started


@contextlib.contextmanager
def running_up(tmp_path: Path, *args: str, **env: str) -> Iterator[Up]:
    """``sage llm up`` with this test's state directory (and its engines marked), once it says
    it is up; killed at the end if the test did not stop it."""
    environ = marked_env(tmp_path, SAGE_MQ_STATE_DIR=str(tmp_path), **env)
    environ.pop("SAGE_MQ_REDIS_URL", None)
    port = free_port()
    out = tmp_path / "up.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sage_mq", "llm", "up", "--port", str(port), *args],
            env=environ,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C at a terminal reaches the whole group: so do we
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C stops everything" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        yield Up(proc, out, port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for leftover in marked_pids(tmp_path):  # a failed test: its worker and Redis too
            with contextlib.suppress(ProcessLookupError):
                os.kill(leftover, signal.SIGKILL)
