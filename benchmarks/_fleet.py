"""Real processes for benchmarks: schedulers, an agent and the CLI on a private Redis."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from sage_mq.connection import connect_blocking
from sage_mq.settings import Settings
from sage_mq.wire import Envelope, decode

BENCH_MARK = "SAGE_BENCH_MARK"


class Fleet:
    """Scheduler(s), one agent and the CLI as real processes on a private Redis."""

    def __init__(self, url: str, workdir: Path) -> None:
        self.env = {
            **os.environ,
            "SAGE_MQ_REDIS_URL": url,
            "SAGE_MQ_STATE_DIR": str(workdir),
            "SAGE_MQ_NAMESPACE": "bench",
            BENCH_MARK: str(workdir),  # engines get no SAGE_MQ_* variable: this marks them
        }
        self.redis = connect_blocking(Settings(redis_url=url), decode_responses=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workdir = workdir

    def start_scheduler_and_node(self, *agent_args: str) -> int:
        """One scheduler and one agent (node n1), joined; returns the low end of its ports."""
        self.start("scheduler", "scheduler", "run")
        low = random.randrange(20000, 32000, 100)  # below the ephemeral range (32768+)
        ports = f"{low}-{low + 9}"
        self.start("agent", "node", "run", "--node-id", "n1", "--port-range", ports, *agent_args)
        self.wait("node.joined", 0)
        return low

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(
            [sys.executable, "-m", "sage_mq", "llm", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, timeout: float = 120) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "sage_mq", "llm", *args, "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=timeout,
        )
        return json.loads(done.stdout)

    def events(self) -> list[Envelope]:
        return [decode(f) for _id, f in self.redis.xrange("bench:events")]

    def wait(
        self, type_name: str, after: float, engine_id: str | None = None, timeout: float = 60
    ) -> Envelope:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for env in self.events():
                if (
                    env.type == type_name
                    and env.ts >= after
                    and engine_id in (None, getattr(env.payload, "engine_id", None))
                ):
                    return env
            time.sleep(0.01)
        raise TimeoutError(f"no {type_name} after {after}")

    def pid(self, engine_id: str) -> int:
        record = self.redis.hgetall(f"bench:engine:{engine_id}")
        return int(record["pid"])

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for proc in psutil.process_iter():  # engines outlive agents by design: find them
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if proc.environ().get(BENCH_MARK) == str(self.workdir):
                    if os.getpgid(proc.pid) == proc.pid:  # an engine: its group holds the rest
                        os.killpg(proc.pid, signal.SIGKILL)  # (vLLM's EngineCore renames
                    proc.kill()  # itself over its environment, so its mark is not read)
        self.redis.close()
