"""Helpers for tests that run real fake-engine processes."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import psutil

from sage_mq.messages import LaunchEngine
from tests.helpers.servers import free_port

CONTRACT_FIELDS = frozenset(
    ("engine_id", "model", "kind", "backend", "state", "node", "host", "port", "url", "gpus",
     "use_gpu", "argv", "pid", "restarts", "last_error", "created_at", "updated_at")
)  # fmt: skip
"""Engine record fields of docs/contract.md §2 (the contract), spelled once for the tests."""


def fake_launch(engine_id: str = "e1", *, generation: int = 1, **overrides: Any) -> LaunchEngine:
    """A launch command for our fake engine on a free loopback port."""
    fields: dict[str, Any] = dict(
        engine_id=engine_id,
        generation=generation,
        model="demo",
        kind="llm",
        backend="fake",
        host="127.0.0.1",
        port=free_port(),
    )
    fields.update(overrides)
    return LaunchEngine(**fields)


def engine_processes(state_dir: Path) -> list[psutil.Process]:
    """Live engine processes of ours (fake or embedding server) a test started (marked with its
    directory in their env)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if not any(part.startswith("sage_mq.engines.") for part in cmdline):
            continue
        try:
            marked = proc.environ().get("SAGE_TEST_MARK", "")
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if marked.startswith(str(state_dir)):
            found.append(proc)
    return found


def marked_env(state_dir: Path, **extra: str) -> dict[str, str]:
    """The environment engines get in tests: marked so a test can find its own processes."""
    return {**os.environ, "SAGE_TEST_MARK": str(state_dir), **extra}


def marked_processes(state_dir: Path) -> list[str]:
    """Every live process a test started with ``state_dir`` as its marker (engines, workers,
    a private Redis: each inherits the environment), as command lines."""
    return [" ".join(proc.info["cmdline"] or []) for proc in _marked(state_dir)]


def marked_pids(state_dir: Path) -> list[int]:
    """The pids of :func:`marked_processes`."""
    return [proc.pid for proc in _marked(state_dir)]


def _marked(state_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get("SAGE_TEST_MARK") == str(state_dir):
                found.append(proc)
    return found
