"""Engine processes at the OS level: spawn in a new group, identify, watch, signal, reap."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from sage_mq.errors import LaunchError, LaunchRefused


def spawn(argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> int:
    """Start ``argv`` (never through a shell) in its own session and process group; its pid.

    stdout and stderr go straight to the log file, so the engine does not depend on the agent
    staying alive to drain a pipe, and outlives the agent by design (no Popen object to leak).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        return os.posix_spawnp(
            argv[0],
            list(argv),
            dict(env),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
        )
    except OSError as exc:
        raise LaunchError(f"cannot execute {argv[0]!r}: {exc.strerror or exc}") from None
    except ValueError as exc:  # an empty program, a NUL byte: no process can take it
        raise LaunchRefused(f"cannot execute {argv[:1]!r}: {exc}") from None
    finally:
        os.close(log_fd)


def reap(pid: int) -> int | None:
    """The exit code of an ended child (negative: killed by that signal); None if not ours."""
    try:
        _pid, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status)


def create_time(pid: int) -> float | None:
    """A process's start time (to tell it from a later process that reused its pid)."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def same_process(pid: int, started: float) -> bool:
    """True if ``pid`` is still the (living, not zombie) process that started at ``started``."""
    now = create_time(pid)
    return now is not None and abs(now - started) < 0.05 and not _is_zombie(pid)


def signal_group(pgid: int, sig: int) -> bool:
    """Send a signal to a process group; False if no member is left ("already gone")."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still exists (zombies included)."""
    return signal_group(pgid, 0)  # signal 0: existence check only


async def reap_group(pgid: int, timeout_s: float = 3.0) -> bool:
    """SIGKILL what is left of a group and wait until it is gone; True if it is."""
    deadline = time.monotonic() + timeout_s
    while group_alive(pgid):
        signal_group(pgid, signal.SIGKILL)
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


ENGINE_MARK = "SAGE_ENGINE"
"""The variable every engine process gets (``<node>/<engine id>/<generation>``): processes
inherit it, so it finds what an engine left behind even after they left its process group
(vLLM's EngineCore, workers that called setsid)."""


def marked(mark: str) -> list[psutil.Process]:
    """The living processes whose environment carries ``mark``."""
    found = []
    for proc in psutil.process_iter():
        # psutil.Error: gone, or not ours to read. OSError: a process exiting as its environ is
        # read can fail the read itself (EBADF, seen in CI), which psutil passes on as it is.
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get(ENGINE_MARK) == mark and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def listening(mark: str, port: int) -> bool:
    """Whether a process carrying ``mark`` listens on TCP ``port`` (any address)."""
    for proc in marked(mark):
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                    return True
    return False


async def kill_remains(pgid: int | None, mark: str, timeout_s: float = 5.0) -> list[str]:
    """SIGKILL what is left of an engine: its process group (``pgid``; None when its leader
    is long gone and the id may be someone else's) and every process carrying its ``mark``;
    wait until none is left. What had to be killed, as ``pid (name)``."""
    killed: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        if pgid is not None:
            signal_group(pgid, signal.SIGKILL)
        left = await asyncio.to_thread(marked, mark)
        for proc in left:
            with contextlib.suppress(psutil.Error):
                killed.setdefault(proc.pid, f"{proc.pid} ({proc.name()})")
                proc.kill()
        if not left and (pgid is None or not group_alive(pgid)):
            return sorted(killed.values())
        if time.monotonic() > deadline:
            raise LaunchError(f"what is left of {mark} survived SIGKILL: {sorted(killed)}")
        await asyncio.sleep(0.02)


def watch_exit(pid: int, on_exit: Callable[[], None]) -> Callable[[], None]:
    """Call ``on_exit`` in the loop the moment ``pid`` ends; returns a cancel function.

    Uses a pidfd (Linux ≥ 5.3), which also works for processes that are not our children
    (engines adopted after an agent restart); falls back to polling.
    """
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        loop.call_soon(on_exit)
        return lambda: None
    except (AttributeError, OSError):
        return _poll_exit(pid, on_exit)

    def fire() -> None:
        cancel()
        on_exit()

    closed = False

    def cancel() -> None:  # once only: a second close would close whatever reused the number
        nonlocal closed
        if closed:
            return
        closed = True
        with contextlib.suppress(ValueError, OSError, RuntimeError):  # RuntimeError: loop closed
            loop.remove_reader(fd)
        os.close(fd)

    loop.add_reader(fd, fire)
    return cancel


def _poll_exit(pid: int, on_exit: Callable[[], None]) -> Callable[[], None]:
    async def poll() -> None:
        # Kernels without pidfd give us nothing to wait on for a non-child: poll.
        while psutil.pid_exists(pid) and not _is_zombie(pid):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        on_exit()

    task = asyncio.get_running_loop().create_task(poll())

    def cancel() -> None:
        task.cancel()

    return cancel


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def describe_returncode(returncode: int | None) -> str:
    """``exited with code 1`` / ``killed by SIGKILL`` / ``exited (code unknown)``."""
    if returncode is None:
        return "exited (code unknown: not a child of this agent)"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"
