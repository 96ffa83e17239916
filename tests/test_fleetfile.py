"""The fleet `sage llm up` writes down: found while that up lives, passed over after."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sage_mq.cli.common import fleet_for
from sage_mq.fleetfile import UpFleet, fleet_path, read_up_fleet


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SAGE_MQ_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("SAGE_MQ_REDIS_URL", raising=False)
    return tmp_path


def test_a_live_ups_fleet_is_found_and_removed_only_by_it() -> None:
    fleet = UpFleet.of_this_process("redis://127.0.0.1:7001/0", "sage", "http://h:1/v1")
    fleet.write()
    assert read_up_fleet() == fleet
    settings, source = fleet_for(None)
    assert settings.redis_url == "redis://127.0.0.1:7001/0" and f"pid {os.getpid()}" in source
    given, source = fleet_for("redis://elsewhere:6379/0")  # what the user gives comes first
    assert given.redis_url == "redis://elsewhere:6379/0" and source == "given"
    newer = UpFleet.of_this_process("redis://127.0.0.1:7002/0", "sage", "http://h:2/v1")
    newer.write()
    fleet.remove()  # not its file any more
    assert read_up_fleet() == newer
    newer.remove()
    assert not fleet_path().exists()
    assert fleet_for(None)[0].redis_url == "redis://localhost:6379/0"


def test_the_fleet_of_an_up_that_was_killed_is_passed_over() -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    pid = int(gone.stdout)
    UpFleet("redis://127.0.0.1:7003/0", "sage", "http://h:3/v1", pid, 1.0).write()
    assert read_up_fleet() is None
    mine = UpFleet.of_this_process("redis://127.0.0.1:7004/0", "sage", "http://h:4/v1")
    UpFleet(mine.redis_url, "sage", mine.gateway_url, mine.pid, mine.started + 1).write()
    assert read_up_fleet() is None  # the same pid, another process
    fleet_path().write_text("{not json")
    assert read_up_fleet() is None
