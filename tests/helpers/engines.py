"""Helpers for tests that run real fake-engine processes."""

from __future__ import annotations

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
"""Engine record fields of DESIGN.md §2 (the contract), spelled once for the tests."""


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


def engine_processes(engine_id: str, state_dir: Path | None = None) -> list[psutil.Process]:
    """Live fake-engine processes started for ``engine_id`` (matched by its log path in env)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if (
            proc.info["status"] == psutil.STATUS_ZOMBIE
            or "sage_mq.engines.fake_server" not in cmdline
        ):
            continue
        try:
            env = proc.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if env.get("SAGE_MQ_TEST_ENGINE") == engine_id or (
            state_dir is not None and env.get("SAGE_MQ_TEST_STATE") == str(state_dir)
        ):
            found.append(proc)
    return found


def marked_env(state_dir: Path, **extra: str) -> dict[str, str]:
    """The environment engines get in tests: marked so a test can find its own processes."""
    return {**os.environ, "SAGE_MQ_TEST_STATE": str(state_dir), **extra}
