"""A fleet of real processes for whole-fleet tests: scheduler, node agent, and the CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sage_mq.connection import connect_blocking
from sage_mq.keys import Keys
from sage_mq.settings import Settings
from sage_mq.wire import Envelope, decode
from tests.helpers.sentinel import SentinelGroup
from tests.helpers.servers import Processes, RedisServer, free_port


class FleetProcs:
    """A scheduler and a node agent as real processes, and the CLI run as a user would."""

    def __init__(self, procs: Processes, redis: RedisServer | SentinelGroup, state: Path) -> None:
        self.procs = procs
        self.state = state
        self.env = {
            **os.environ,
            "SAGE_MQ_REDIS_URL": redis.url,
            "SAGE_MQ_NAMESPACE": f"f{free_port()}",
            "SAGE_MQ_STATE_DIR": str(state),
            "SAGE_TEST_MARK": str(state),
        }
        self.agent: subprocess.Popen[bytes] | None = None
        low = random.randrange(20000, 32000, 100)  # below the ephemeral range (32768+)
        self.port_range = f"{low}-{low + 99}"

    def start_scheduler(self, *args: str, name: str = "scheduler") -> subprocess.Popen[bytes]:
        return self.procs.sage(name, ["llm", "scheduler", "run", *args], self.env)

    def start_agent(self, node: str = "n1", *args: str) -> subprocess.Popen[bytes]:
        agent = self.procs.sage(
            f"agent-{node}",
            [
                "llm",
                "node",
                "run",
                "--node-id",
                node,
                "--fake-gpus",
                "2x24GiB",
                "--liveness-ttl",
                "5",  # the default: a loaded 2-core CI box once stalled an agent's beat for 3 s
                "--stop-grace",
                "3",
                "--port-range",
                self.port_range,
                *args,
            ],
            self.env,
        )
        if node == "n1":
            self.agent = agent
        return agent

    def cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "sage_mq", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"sage {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
            )
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def events(self, engine_id: str | None = None) -> list[Envelope]:
        """Every event so far (of one engine, if given), decoded."""
        settings = Settings(redis_url=self.env["SAGE_MQ_REDIS_URL"])
        client = connect_blocking(settings, decode_responses=True)
        try:
            rows = client.xrange(Keys(self.env["SAGE_MQ_NAMESPACE"]).events)
        finally:
            client.close()
        found = [decode(fields) for _id, fields in rows]
        return [e for e in found if engine_id in (None, getattr(e.payload, "engine_id", None))]

    def wait_event(
        self, type_name: str, engine_id: str, *, count: int = 1, timeout: float = 30
    ) -> Envelope:
        """The ``count``-th event of that type for the engine, once it happened."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events(engine_id) if e.type == type_name]
            if len(found) >= count:
                return found[count - 1]
            time.sleep(0.05)
        seen = [e.type for e in self.events(engine_id)]
        raise AssertionError(f"no {type_name} #{count} for {engine_id} in {timeout}s; saw {seen}")

    def wait_state(self, state: str, timeout: float = 10) -> dict[str, Any]:
        """The (only) engine's record once it is in ``state``: the record follows an event
        as soon as the scheduler has read it, not at the same instant."""
        deadline = time.monotonic() + timeout
        while (record := self.json("llm", "engine", "list")[0])["state"] != state:
            assert time.monotonic() < deadline, f"never {state}: {record}"
            time.sleep(0.05)
        return dict(record)

    def wait_node(self, count: int = 1) -> None:
        for _ in range(200):
            if self.json("llm", "status")["nodes"]["alive"] == count:
                return
            time.sleep(0.05)
        raise AssertionError(f"the node never joined:\n{self.procs.log('agent-n1')}")
