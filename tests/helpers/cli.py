"""The CLI as a user runs it: ``sage llm …`` in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

COMMANDS_ON_REDIS = {
    "status": ["status"],
    "engine list": ["engine", "list"],
    "scheduler": ["scheduler", "run"],
    "node agent": ["node", "run", "--node-id", "n1"],
    "gateway": ["gateway", "run", "--port", "0"],
    "batch worker": ["worker", "run"],
    "up": ["up", "--port", "0"],
}
"""Commands that talk to the fleet's Redis, by what they are."""
ACTORS = {name: argv for name, argv in COMMANDS_ON_REDIS.items() if "run" in argv or "up" in argv}
"""Those that run until stopped."""


def sage(*args: str, state_dir: Path | None = None, timeout: float = 60) -> tuple[int, str]:
    """Run ``sage llm ARGS``; its exit status and everything it printed. With ``state_dir``,
    the command's state goes there and its processes carry it as their marker."""
    argv = [sys.executable, "-m", "sage_mq", "llm", *args]
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("SAGE_MQ_REDIS_URL", None)
    if state_dir is not None:
        env |= {"SAGE_MQ_STATE_DIR": str(state_dir), "SAGE_TEST_MARK": str(state_dir)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, (done.stdout + done.stderr).strip()
