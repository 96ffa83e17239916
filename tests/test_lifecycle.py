"""EngineLifecycleManager with real fake-engine processes and real signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from sage_mq.agent import processes
from sage_mq.agent.lifecycle import EngineLifecycleManager, ManagedEngine
from sage_mq.errors import LaunchError
from tests.helpers.engines import engine_processes, fake_launch, marked_env

SQUATTER = """
import http.server, sys
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "2"); self.end_headers()
        self.wfile.write(b"{}")
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ok).serve_forever()
"""
"""A server of no engine's, answering 200 to any GET on the port it is given."""


class Exits:
    """Collects unrequested exits reported by the manager, with when they were seen."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int | None, float]] = []
        self.event = asyncio.Event()

    async def __call__(self, engine: ManagedEngine, returncode: int | None) -> None:
        self.seen.append((engine.engine_id, returncode, time.monotonic()))
        self.event.set()


@pytest.fixture
async def manager(tmp_path: Path):  # type: ignore[no-untyped-def]
    exits = Exits()
    mgr = EngineLifecycleManager(
        tmp_path, on_exit=exits, base_env=marked_env(tmp_path), stop_grace_s=2.0
    )
    mgr.exits = exits  # type: ignore[attr-defined]
    yield mgr
    for engine_id in list(mgr.engines):
        await mgr.stop(engine_id, grace_s=0.5)
    await mgr.close()


async def test_launch_becomes_healthy_and_the_env_pins_gpus(
    manager: EngineLifecycleManager,
) -> None:
    engine = await manager.launch(fake_launch(use_gpu=True, gpus=(1, 0)))
    assert await manager.wait_ready("e1", timeout_s=30)
    assert await manager.health_check("e1", timeout=5.0)
    assert await manager.health_check_all() == {"e1": True}
    env = psutil.Process(engine.pid).environ()
    assert env["CUDA_VISIBLE_DEVICES"] == "1,0"
    assert os.getpgid(engine.pid) == engine.pid  # its own process group
    assert "serving demo" in "\n".join(manager.tail_log("e1"))


async def test_kill_9_of_an_engine_is_reported_well_under_a_second(
    manager: EngineLifecycleManager,
) -> None:
    engine = await manager.launch(fake_launch())
    assert await manager.wait_ready("e1", timeout_s=30)
    killed_at = time.monotonic()
    os.kill(engine.pid, signal.SIGKILL)
    await asyncio.wait_for(manager.exits.event.wait(), 5)  # type: ignore[attr-defined]
    ((engine_id, returncode, seen_at),) = manager.exits.seen  # type: ignore[attr-defined]
    assert (engine_id, returncode) == ("e1", -signal.SIGKILL)
    assert seen_at - killed_at < 0.5
    assert "e1" not in manager.engines
    assert not (manager.state_dir / "e1.json").exists()


async def test_an_engine_is_its_whole_process_tree_when_it_dies_or_is_stopped(
    manager: EngineLifecycleManager, caplog: pytest.LogCaptureFixture
) -> None:
    # --child forks a worker into a session of its own, as vLLM's EngineCore outlives its
    # API server: the process group alone does not hold it.
    engine = await manager.launch(fake_launch(extra_args=("--child",)))
    assert await manager.wait_ready("e1", timeout_s=30)
    mark = engine.mark
    assert mark == f"{manager.node_id}/e1/1" and len(processes.marked(mark)) == 2
    os.kill(engine.pid, signal.SIGKILL)
    await asyncio.wait_for(manager.exits.event.wait(), 5)  # type: ignore[attr-defined]
    await manager.settle("e1")  # what a relaunch waits for
    assert processes.marked(mark) == []
    assert "killed what its main process left" in caplog.text
    again = await manager.launch(fake_launch(generation=2, extra_args=("--child",)))
    assert await manager.wait_ready("e1", timeout_s=30)
    assert len(processes.marked(again.mark)) == 2
    await manager.stop("e1", grace_s=0.5)
    assert processes.marked(again.mark) == []


async def test_an_engine_is_ready_only_when_its_own_process_answers(
    manager: EngineLifecycleManager, caplog: pytest.LogCaptureFixture
) -> None:
    launch = fake_launch(extra_args=("--startup-delay", "2"))
    await manager.launch(launch)  # loading: its port is not bound yet...
    squatter = await asyncio.create_subprocess_exec(  # ...and something else answers there
        sys.executable, "-c", SQUATTER, str(launch.port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            if await manager.health_check("e1", timeout=1.0):  # it answers 200 to anything
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the squatter never answered")
        assert not await manager.wait_ready("e1", timeout_s=5)  # not the engine: never ready
        assert "answers, but not from the engine's processes" in caplog.text
    finally:
        squatter.kill()
        await squatter.wait()


async def test_stop_terminates_the_whole_process_group_and_is_not_an_exit(
    manager: EngineLifecycleManager,
) -> None:
    # An engine that forks a worker into its group, as vLLM's tensor-parallel workers are.
    wrapper = (
        "import runpy, subprocess, sys; subprocess.Popen(['sleep', '300']); "
        "sys.argv = ['x', '--model', '{model}', '--host', '{host}', '--port', '{port}']; "
        "runpy.run_module('sage_mq.engines.fake_server', run_name='__main__')"
    )
    engine = await manager.launch(
        fake_launch(backend="command", extra_args=(sys.executable, "-c", wrapper))
    )
    assert await manager.wait_ready("e1", timeout_s=30)
    (worker,) = psutil.Process(engine.pid).children()
    assert os.getpgid(worker.pid) == engine.pid
    returncode = await manager.stop("e1")
    assert returncode is not None
    assert not processes.group_alive(engine.pid)
    assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
    assert manager.exits.seen == []  # type: ignore[attr-defined]
    assert await manager.stop("e1") is None  # already gone is success


async def test_a_hung_engine_is_killed_after_the_grace_period(
    manager: EngineLifecycleManager,
) -> None:
    engine = await manager.launch(fake_launch(extra_args=("--hang-after", "1.5")))
    assert await manager.wait_ready("e1", timeout_s=30)
    await asyncio.sleep(1.6)
    assert not await manager.health_check("e1", timeout=0.5)
    started = time.monotonic()
    returncode = await manager.stop("e1", grace_s=1.0)
    assert returncode == -signal.SIGKILL
    assert 0.9 < time.monotonic() - started < 5
    assert not processes.group_alive(engine.pid)


async def test_a_crashing_engine_reports_its_exit_code_and_last_lines(
    manager: EngineLifecycleManager,
) -> None:
    await manager.launch(fake_launch(extra_args=("--crash-after", "0.3", "--exit-code", "7")))
    await asyncio.wait_for(manager.exits.event.wait(), 30)  # type: ignore[attr-defined]
    assert manager.exits.seen[0][1] == 7  # type: ignore[attr-defined]
    assert any("crashing on purpose" in line for line in manager.tail_log("e1"))


async def test_an_unexecutable_command_is_a_launch_error(manager: EngineLifecycleManager) -> None:
    with pytest.raises(LaunchError, match="cannot execute"):
        await manager.launch(fake_launch(backend="command", extra_args=("/no/such/server",)))


async def test_a_new_manager_adopts_running_engines_and_forgets_dead_ones(tmp_path: Path) -> None:
    first = EngineLifecycleManager(tmp_path, base_env=marked_env(tmp_path))
    alive = await first.launch(fake_launch("alive"))
    doomed = await first.launch(fake_launch("doomed"))
    assert await first.wait_ready("alive", 30) and await first.wait_ready("doomed", 30)
    await first.close()  # the agent goes away; engines stay
    os.kill(doomed.pid, signal.SIGKILL)
    await asyncio.sleep(0.2)

    exits = Exits()
    second = EngineLifecycleManager(tmp_path, on_exit=exits, base_env=marked_env(tmp_path))
    adopted, gone = second.recover()
    try:
        assert [e.engine_id for e in adopted] == ["alive"] and adopted[0].pid == alive.pid
        assert [e.engine_id for e in gone] == ["doomed"]
        assert await second.health_check("alive")
        assert [p.pid for p in engine_processes(tmp_path)] == [alive.pid]  # none duplicated
        os.kill(alive.pid, signal.SIGKILL)  # an adopted engine's exit is still seen at once
        await asyncio.wait_for(exits.event.wait(), 5)
        assert exits.seen[0][:2] == ("alive", None)
    finally:
        await second.close()


async def test_a_reused_pid_is_never_mistaken_for_an_engine(tmp_path: Path) -> None:
    mgr = EngineLifecycleManager(tmp_path)
    mgr.state_dir.mkdir(parents=True)
    stranger = psutil.Process(os.getpid())  # alive, but started at another time than recorded
    state = {
        "engine_id": "e1",
        "generation": 1,
        "pid": stranger.pid,
        "create_time": stranger.create_time() - 1000,
        "argv": [],
        "kind": "llm",
        "backend": "fake",
        "host": "127.0.0.1",
        "port": 1,
        "log_path": "x",
        "started_at": 0,
    }
    (mgr.state_dir / "e1.json").write_text(json.dumps(state))
    (mgr.state_dir / "junk.json").write_text("{not json")
    adopted, gone = mgr.recover()
    assert adopted == [] and [e.engine_id for e in gone] == ["e1"]
    assert (mgr.state_dir / "junk.bad").exists()
    await mgr.close()


def test_a_process_that_fails_the_environ_read_is_passed_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Exiting:  # a process leaving as its environ is read (EBADF, seen in CI)
        def environ(self) -> dict[str, str]:
            raise OSError(9, "Bad file descriptor")

    class Ours:
        def environ(self) -> dict[str, str]:
            return {processes.ENGINE_MARK: "n1/e1/1"}

        def status(self) -> str:
            return psutil.STATUS_RUNNING

    ours = Ours()
    monkeypatch.setattr(processes.psutil, "process_iter", lambda: iter([Exiting(), ours]))
    assert processes.marked("n1/e1/1") == [ours]


async def test_an_exit_watch_cancelled_twice_closes_its_descriptor_once() -> None:
    """An engine that exited (the watch fired and cancelled itself) and was then stopped
    cancelled its watch again, closing the descriptor number a second time: by then another
    thread's listing of /proc had it, and `sage llm up` failed to stop (EBADF)."""
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    exited = asyncio.Event()
    cancel = processes.watch_exit(child.pid, exited.set)
    await asyncio.wait_for(exited.wait(), 10)  # fired: it cancelled itself
    await child.wait()
    reused = os.open(os.devnull, os.O_RDONLY)  # the lowest free number: the watch's old one
    try:
        cancel()  # the stop path cancels it again
        os.fstat(reused)  # still open
    finally:
        os.close(reused)
