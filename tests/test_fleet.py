"""Whole fleet, real processes: redis-server, scheduler, node agent, fake engines, and the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers.engines import CONTRACT_FIELDS, engine_processes
from tests.helpers.fleetprocs import FleetProcs
from tests.helpers.servers import Processes, RedisServer, free_port

pytestmark = pytest.mark.fleet


@pytest.fixture
def fleet(processes: Processes, redis_server: RedisServer, tmp_path: Path) -> Iterator[FleetProcs]:
    fleet = FleetProcs(processes, redis_server, tmp_path / "state")
    fleet.start_scheduler()
    fleet.start_agent()
    fleet.wait_node()
    yield fleet
    for proc in engine_processes(fleet.state):
        os.killpg(proc.pid, signal.SIGKILL)


def test_start_call_list_watch_and_stop_an_engine_from_the_cli(fleet: FleetProcs) -> None:
    record = fleet.json("llm", "engine", "start", "demo", "--backend", "fake", "--wait")
    assert record["state"] == "RUNNING" and record["gpus"] == [0] and record["node"] == "n1"
    reply = httpx.post(
        f"{record['url']}/v1/chat/completions",
        json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert reply.json()["choices"][0]["message"]["content"] == "[demo] You said: hi"

    (listed,) = fleet.json("llm", "engine", "list")
    assert set(listed) >= CONTRACT_FIELDS
    (proc,) = engine_processes(fleet.state)
    assert proc.pid == listed["pid"] and proc.environ()["CUDA_VISIBLE_DEVICES"] == "0"

    events = fleet.cli("llm", "events").stdout
    for step in (
        "node.joined",
        "engine.placed",
        "engine.starting",
        "engine.ready",
    ):
        assert step in events
    assert "serving demo" in fleet.cli("llm", "engine", "logs", record["engine_id"]).stdout
    gpus = fleet.json("llm", "gpu")
    assert [g["engines"] for g in gpus] == [[record["engine_id"]], []]

    stopped = fleet.json("llm", "engine", "stop", record["engine_id"])
    assert stopped["state"] == "STOPPED" and stopped["port"] is None
    assert engine_processes(fleet.state) == []
    assert not psutil.pid_exists(proc.pid)
    assert fleet.json("llm", "gpu")[0]["engines"] == []


def test_an_embedding_engine_on_gpu_gets_cuda_and_a_missing_dependency_is_a_clear_failure(
    processes: Processes, redis_server: RedisServer, tmp_path: Path
) -> None:
    hidden = tmp_path / "without-sentence-transformers"  # as on a host without the extra
    hidden.mkdir()
    (hidden / "sentence_transformers.py").write_text(
        "raise ImportError(\"No module named 'sentence_transformers'\")\n"
    )
    fleet = FleetProcs(processes, redis_server, tmp_path / "state")
    fleet.env["PYTHONPATH"] = os.pathsep.join([str(hidden), fleet.env.get("PYTHONPATH", "")])
    fleet.start_scheduler()
    fleet.start_agent()
    fleet.wait_node()
    done = fleet.cli(
        "llm",
        "engine",
        "start",
        "BAAI/bge-m3",
        "--engine-kind",
        "embedding",
        "--use-gpu",
        "--wait",
        check=False,
    )
    assert done.returncode == 1
    assert "sentence-transformers is not installed" in done.stderr
    assert "Traceback" not in done.stderr
    (record,) = fleet.json("llm", "engine", "list")
    assert record["state"] == "FAILED" and "--device" in record["argv"]
    assert record["argv"][record["argv"].index("--device") + 1] == "cuda"
    assert record["use_gpu"] is True and "exited with code 2" in record["last_error"]


def test_a_killed_agent_comes_back_and_adopts_its_engine_without_a_duplicate(
    fleet: FleetProcs,
) -> None:
    record = fleet.json("llm", "engine", "start", "demo", "--backend", "fake", "--wait")
    assert fleet.agent is not None
    os.killpg(fleet.agent.pid, signal.SIGKILL)
    fleet.agent.wait(5)
    (proc,) = engine_processes(fleet.state)  # the engine outlives its agent
    assert httpx.get(f"{record['url']}/health").status_code == 200
    fleet.start_agent()
    for _ in range(200):
        if "engine.adopted" in fleet.cli("llm", "events").stdout:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(fleet.procs.log("agent-n1"))
    assert [p.pid for p in engine_processes(fleet.state)] == [proc.pid]
    assert fleet.json("llm", "engine", "list")[0]["state"] == "RUNNING"
    assert fleet.json("llm", "engine", "stop", record["engine_id"])["state"] == "STOPPED"
    assert engine_processes(fleet.state) == []


def test_two_tp2_engines_do_not_fit_two_gpus_and_the_reason_says_so(fleet: FleetProcs) -> None:
    start_big = ("llm", "engine", "start", "big", "--backend", "fake", "-tp", "2",
                 "--required-memory-gb", "40", "--wait")  # fmt: skip
    assert fleet.json(*start_big)["gpus"] == [0, 1]
    done = fleet.cli(*start_big, check=False)
    assert done.returncode == 1 and "no GPU fits" in done.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["llm", "engine", "start", "m", "--engine-kind", "chat"],
            "--engine-kind must be llm or embedding",
        ),
        (["llm", "engine", "start", "m", "--no-gpu", "-tp", "2"], "needs GPUs"),
        (["llm", "engine", "start", "m", "--backend", "tgi"], "backend"),
        (["llm", "engine", "start", "m", "--extra-args", "'unclosed"], "cannot split --extra-args"),
        (["llm", "engine", "stop", "ghost"], "no engine 'ghost'"),
        (["llm", "node", "run", "--node-id", "x", "--fake-gpus", "lots"], "fake GPU spec"),
    ],
)
def test_bad_input_exits_non_zero_with_one_clear_line(
    fleet: FleetProcs, args: list[str], says: str
) -> None:
    done = fleet.cli(*args, check=False, timeout=30)
    assert done.returncode != 0
    assert says in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_unreachable_redis_is_one_line_with_the_password_hidden(tmp_path: Path) -> None:
    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
    done = subprocess.run(
        [sys.executable, "-m", "sage_mq", "llm", "engine", "list", "--redis-url", url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1 and "Redis unreachable" in done.stderr
    assert "s3cret" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_password_protected_redis_works_and_the_password_is_never_printed(
    tmp_path: Path,
) -> None:
    server = RedisServer(free_port(), tmp_path, password="s3cret-pw")
    server.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sage_mq", "llm", "status", "--json", "--redis-url", server.url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["engines"]["total"] == 0
        wrong = server.url.replace("s3cret-pw", "wrong-pw")
        bad = subprocess.run(
            [sys.executable, "-m", "sage_mq", "llm", "status", "--redis-url", wrong],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
        assert "wrong-pw" not in bad.stderr + bad.stdout
    finally:
        server.kill()


def read_until(proc: subprocess.Popen[str], needle: str, timeout: float = 30) -> list[str]:
    """Lines from a following process until one contains ``needle``."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([proc.stdout], [], [], left)[0]:
            break
        lines.append(proc.stdout.readline())
        if needle in lines[-1]:
            return lines
    raise AssertionError(f"never saw {needle!r} in {lines}")


@contextlib.contextmanager
def following(fleet: FleetProcs, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A ``sage llm … --follow`` process, killed and its pipe closed afterwards."""
    with subprocess.Popen(
        [sys.executable, "-m", "sage_mq", "llm", *args],
        env=fleet.env,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            yield proc
        finally:
            proc.kill()


def test_events_and_logs_follow_new_lines_as_they_come(fleet: FleetProcs) -> None:
    with following(fleet, "events", "--follow") as events:
        record = fleet.json(
            "llm",
            "engine",
            "start",
            "demo",
            "--backend",
            "fake",
            "--wait",
            "--extra-args",
            "--crash-after 3",
        )
        with following(fleet, "engine", "logs", record["engine_id"], "--follow") as logs:
            read_until(logs, "crashing on purpose after 3.0s with exit code 1")
        seen = read_until(events, "engine.failed", timeout=90)  # 4 runs of 3 s, backoff 1+2+4 s
    assert any("engine.ready" in line for line in seen)
    assert any("engine.exited" in line for line in seen)


def test_concurrent_starts_from_the_cli_all_run_on_distinct_ports(fleet: FleetProcs) -> None:
    starts = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sage_mq",
                "llm",
                "engine",
                "start",
                "demo",
                "--backend",
                "fake",
                "--no-gpu",
                "--wait",
                "--json",
            ],
            env=fleet.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    records = [json.loads(p.communicate(timeout=60)[0]) for p in starts]
    assert all(p.returncode == 0 for p in starts)
    assert {r["state"] for r in records} == {"RUNNING"}
    assert len({r["port"] for r in records}) == 4
    assert len(engine_processes(fleet.state)) == 4


def test_a_second_agent_for_a_live_node_id_is_refused(fleet: FleetProcs, tmp_path: Path) -> None:
    elsewhere = ["--state-dir", str(tmp_path / "elsewhere")]  # another host, as Redis sees it
    done = fleet.cli("llm", "node", "run", "--node-id", "n1", *elsewhere, check=False, timeout=30)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("error: node 'n1' already has a live agent")
    assert "Traceback" not in done.stderr
    here = fleet.cli("llm", "node", "run", "--node-id", "n1", check=False, timeout=30)
    last = here.stderr.strip().splitlines()[-1]  # on its host, its state directory says first
    assert here.returncode == 1 and last.startswith("error: another node agent (pid "), last


def test_waiting_with_no_scheduler_says_so_instead_of_hanging(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    from sage_mq.control import ControlPlaneManager
    from sage_mq.errors import WaitTimeout
    from sage_mq.settings import Settings

    async def main() -> str:
        settings = Settings(redis_url=redis_server.url, namespace=f"lonely{free_port()}")
        async with ControlPlaneManager(settings) as cp:
            record = await cp.request_engine_startup("demo", backend="fake")
            try:
                await cp.wait_for_engine(
                    record.engine_id, until=[], since="0-0", pickup_timeout=1.0
                )
            except WaitTimeout as exc:
                return str(exc)
        return "no error"

    import asyncio

    message = asyncio.run(main())
    assert "no scheduler took the request" in message and "sage llm scheduler run" in message


def test_following_only_new_events_starts_from_now(fleet: FleetProcs) -> None:
    with following(fleet, "events", "--follow", "-n", "0") as events:
        read_until(events, "node.health")  # the follower reads: what comes now, it sees
        record = fleet.json("llm", "engine", "start", "demo", "--backend", "fake", "--wait")
        seen = read_until(events, "engine.ready")
    assert not any("node.joined" in line for line in seen)  # older than the follow
    assert any(record["engine_id"] in line for line in seen)
    done = fleet.cli("llm", "events", "-n", "-1", check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
