"""One node agent per state directory: the node's engine records and logs are its alone.

Two agents on one directory (two ``sage llm up`` on one machine, say) would adopt each other's
engines and stop them on the way out. The lock is an ``flock`` the kernel drops when the agent's
process ends, however it ends: a crashed agent never leaves it behind. Its file says who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from sage_mq.errors import ConfigError

LOCK_NAME = "agent.lock"


class StateLock:
    """The lock on ``node_dir``, taken by :meth:`acquire`, dropped by :meth:`release`."""

    def __init__(self, node_dir: Path) -> None:
        self.path = node_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take it, or :class:`ConfigError` naming the process that holds it."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by engines
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"another node agent ({holder}) is using {self.path.parent}; stop it, or give "
                "this one a state directory of its own (--state-dir)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop it; safe to call twice."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
