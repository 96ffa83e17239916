"""The fleet ``sage llm up`` runs on this machine, written down for the CLI to find.

``up`` with a Redis of its own writes ``fleet.json`` in the state directory (the default one:
``SAGE_MQ_STATE_DIR``, else ``$XDG_STATE_HOME/sage-mq``) and removes it when it stops. Every
command given no ``--redis-url`` (nor ``SAGE_MQ_REDIS_URL``) reads that fleet, while the ``up``
that wrote it lives; a file left by an ``up`` that was killed is passed over. Nothing secret is
in it: a private Redis has no password, and ``up --redis-url`` writes no file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from sage_mq.settings import default_state_dir

FLEET_FILE = "fleet.json"


@dataclass(frozen=True)
class UpFleet:
    """Where a running ``up``'s fleet is, and who runs it."""

    redis_url: str
    namespace: str
    gateway_url: str
    pid: int
    started: float
    """The process's start time: a pid reused by another process after a kill is not it."""

    @classmethod
    def of_this_process(cls, redis_url: str, namespace: str, gateway_url: str) -> UpFleet:
        pid = os.getpid()
        return cls(redis_url, namespace, gateway_url, pid, psutil.Process(pid).create_time())

    def write(self, env: Mapping[str, str] | None = None) -> None:
        """Write it (whole or not at all: a reader never sees half a file)."""
        path = fleet_path(env)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(asdict(self)))
        partial.replace(path)

    def remove(self, env: Mapping[str, str] | None = None) -> None:
        """Remove it if it is still this one's (another ``up`` may have written since)."""
        if read_up_fleet(env) == self:
            with contextlib.suppress(FileNotFoundError):
                fleet_path(env).unlink()


def fleet_path(env: Mapping[str, str] | None = None) -> Path:
    return default_state_dir(env) / FLEET_FILE


def read_up_fleet(env: Mapping[str, str] | None = None) -> UpFleet | None:
    """The fleet of the ``up`` running here, or None (none wrote one, or it is gone)."""
    try:
        fleet = UpFleet(**json.loads(fleet_path(env).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    try:
        alive = psutil.Process(fleet.pid).create_time() == fleet.started
    except psutil.Error:
        alive = False
    return fleet if alive else None
