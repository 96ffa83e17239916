"""All-in-one: `sage llm up` and create(embedded=True) start a whole fleet and leave nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import redis

from sage_mq import UnifiedInferenceClient
from sage_mq.embedded import EmbeddedControlPlane
from sage_mq.errors import ConfigError
from sage_mq.hashes import to_hash
from sage_mq.keys import Keys
from sage_mq.scheduler.core import Scheduler
from sage_mq.settings import Settings
from sage_mq.store import EngineRecord, EngineState
from tests.helpers.engines import engine_processes, marked_env, marked_pids, marked_processes
from tests.helpers.servers import free_port
from tests.helpers.up import running_up

pytestmark = pytest.mark.fleet
API_KEY, ADMIN_KEY = "up-api-key-7781", "up-admin-key-1266"


def batch_workers(marker: Path) -> list[psutil.Process]:
    """Live `sage llm worker run` processes started under this test's marker."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = proc.info["cmdline"] or []
            if "worker" in cmdline and proc.environ().get("SAGE_TEST_MARK") == str(marker):
                found.append(proc)
    return found


def test_sage_llm_up_serves_the_demo_and_ctrl_c_leaves_nothing(
    tmp_path: Path, sdk: Callable[..., openai.OpenAI]
) -> None:
    keys = {"SAGE_MQ_API_KEY": API_KEY, "SAGE_MQ_ADMIN_KEY": ADMIN_KEY}  # up honours them
    with running_up(tmp_path, **keys) as up:
        text = up.out.read_text()
        assert f"{up.base}/v1" in text and "demo-chat" in text
        assert "inference wants a key; management: admin key" in text
        with pytest.raises(openai.AuthenticationError):
            sdk(f"{up.base}/v1", "x").models.list()
        for key, status in ((None, 401), (API_KEY, 401), (ADMIN_KEY, 200)):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            got = httpx.get(f"{up.base}/v1/management/engines", headers=headers, timeout=10)
            assert got.status_code == status, (key, got.text)
        assert httpx.get(f"{up.base}/metrics", timeout=10).status_code == 401
        client = sdk(f"{up.base}/v1", API_KEY)
        answer = client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "hello"}]
        )
        assert answer.choices[0].message.content == "[demo-chat] You said: hello"
        assert len(engine_processes(tmp_path)) == 2
        assert len(batch_workers(tmp_path)) == 1
        redis_port = int(up.redis_url.rsplit(":", 1)[1].split("/")[0])
        up.ctrl_c()
    assert "nothing is left" in up.out.read_text()
    assert engine_processes(tmp_path) == [] and batch_workers(tmp_path) == []
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{up.base}/health", timeout=2)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", redis_port), timeout=2).close()


def test_an_embedded_client_runs_its_own_fleet_and_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGE_MQ_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("SAGE_TEST_MARK", str(tmp_path))  # our engines, found by marker
    with UnifiedInferenceClient.create(embedded=True, default_llm_model="demo-chat") as client:
        assert client.models() == ["demo-chat", "demo-embed"]
        assert client.chat("hi") == "[demo-chat] You said: hi"
        assert len(client.embed(["a", "b"], model="demo-embed")) == 2
        assert len(engine_processes(tmp_path)) == 2
        job = client.submit_chat("queued")  # the embedded fleet has a batch worker too
        assert job.result(timeout=60) == "[demo-chat] You said: queued"
    assert engine_processes(tmp_path) == [] and batch_workers(tmp_path) == []


@pytest.mark.timeout(240)
def test_up_with_10000_records_scrapes_fast_and_stops_within_seconds(tmp_path: Path) -> None:
    with running_up(tmp_path) as up:
        _seed(up.redis_url, 10_000)
        started = time.monotonic()
        scraped = httpx.get(f"{up.base}/metrics", timeout=30)
        took = time.monotonic() - started
        assert 'sage_engines{state="FAILED"} 5000.0' in scraped.text and took < 1.0, took
        stopped_in = up.ctrl_c()
        assert stopped_in < 10, f"Ctrl-C took {stopped_in:.1f} s"
    assert "nothing is left" in up.out.read_text() and engine_processes(tmp_path) == []


def _seed(url: str, count: int) -> None:
    """``count`` engine records nobody runs: half FAILED, a quarter STOPPED, a quarter PENDING
    (as a fleet that has lived a while has)."""
    states = [EngineState.FAILED, EngineState.FAILED, EngineState.STOPPED, EngineState.PENDING]
    client = redis.Redis.from_url(url, decode_responses=True)
    keys = Keys("sage")
    with client.pipeline(transaction=False) as pipe:
        for i in range(count):
            record = EngineRecord(engine_id=f"old-{i}", model="m", state=states[i % 4])
            pipe.hset(keys.engine(record.engine_id), mapping=to_hash(record))
            pipe.sadd(keys.engines, record.engine_id)
        pipe.execute()
    client.close()


async def test_the_fleet_says_which_part_ended_unasked_and_stops_the_rest(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def breaks(self: Scheduler) -> None:
        await asyncio.sleep(0.5)
        raise RuntimeError("the scheduler broke")

    monkeypatch.setattr(Scheduler, "run", breaks)
    monkeypatch.setenv("SAGE_TEST_MARK", str(tmp_path))
    port = free_port()
    plane = EmbeddedControlPlane(
        redis_url=settings.redis_url,
        namespace=settings.namespace,
        port=port,
        state_dir=tmp_path,
        node_id="embedded-1",
    )
    with pytest.raises(ConfigError, match="the scheduler stopped unasked: the scheduler broke"):
        async with plane:  # it may end while starting, or after: the same one line
            await asyncio.wait_for(plane.run(), 30)
    assert batch_workers(tmp_path) == []
    async with httpx.AsyncClient(timeout=2) as http:
        with pytest.raises(httpx.TransportError):
            await http.get(f"http://127.0.0.1:{port}/health")


def test_up_starts_another_batch_worker_when_its_worker_dies(tmp_path: Path) -> None:
    with running_up(tmp_path) as up:
        (first,) = batch_workers(tmp_path)
        first.kill()
        deadline = time.monotonic() + 30
        while [w.pid for w in batch_workers(tmp_path)] in ([], [first.pid]):
            assert time.monotonic() < deadline, up.out.read_text()
            time.sleep(0.2)
        assert "the batch worker exited (code -9); starting another" in up.out.read_text()
        up.ctrl_c()
    assert batch_workers(tmp_path) == []


def test_up_on_a_machine_without_redis_runs_the_bundled_server(
    tmp_path: Path, sdk: Callable[..., openai.OpenAI]
) -> None:
    venv_only = str(Path(sys.executable).parent)  # no redis-server here
    with running_up(tmp_path, PATH=venv_only) as up:
        assert re.fullmatch(r"redis://\S+ \(its own: /\S+/valkey-server\)", up.redis_line)
        client = sdk(f"{up.base}/v1", "x")
        answer = client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "hello"}]
        )
        assert answer.choices[0].message.content == "[demo-chat] You said: hello"
        redis_port = int(up.redis_url.rsplit(":", 1)[1].split("/")[0])
        up.ctrl_c()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", redis_port), timeout=2).close()


def test_a_second_up_on_the_same_state_dir_is_refused_and_harms_nothing(tmp_path: Path) -> None:
    with running_up(tmp_path) as up:
        env = marked_env(tmp_path, SAGE_MQ_STATE_DIR=str(tmp_path))
        argv = [sys.executable, "-m", "sage_mq", "llm", "up", "--port", str(free_port())]
        second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        said = (second.stdout + second.stderr).strip()
        assert second.returncode == 1 and "Traceback" not in said, said
        assert f"another node agent (pid {up.proc.pid}) is using {tmp_path}" in said, said
        assert "--state-dir" in said.splitlines()[-1], said
        assert len(engine_processes(tmp_path)) == 2  # the first one's engines, untouched
        assert httpx.get(f"{up.base}/health", timeout=10).json()["models"] == [
            "demo-chat",
            "demo-embed",
        ]
        up.ctrl_c()
    assert "stopped 2 engine(s)" in up.out.read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_up_stopped_while_its_engines_start_leaves_nothing(
    signum: signal.Signals, tmp_path: Path
) -> None:
    preset = tmp_path / "slow.yaml"
    preset.write_text(
        "name: slow\nengines:\n  - name: chat\n    model: slow-chat\n    backend: fake\n"
        "    use_gpu: false\n    extra_args: [--startup-delay, '120']\n"
    )
    env = marked_env(tmp_path, SAGE_MQ_STATE_DIR=str(tmp_path))
    env.pop("SAGE_MQ_REDIS_URL", None)
    argv = [sys.executable, "-m", "sage_mq", "llm", "up", "--preset", str(preset)]
    argv += ["--port", str(free_port())]
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as up:
        try:  # killed, and its pipe closed, if it does not stop: nothing left for later tests
            deadline = time.monotonic() + 60
            while not engine_processes(tmp_path):  # started, waiting for the engine to be ready
                assert up.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
            started = time.monotonic()
            up.send_signal(signum)
            said = up.communicate(timeout=60)[0].decode()
        finally:
            if up.poll() is None:
                up.kill()
            for leftover in marked_pids(tmp_path):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leftover, signal.SIGKILL)
    assert up.returncode == 0 and time.monotonic() - started < 30, said
    assert "sage-mq is up" not in said and "stopped 1 engine(s)" in said, said
    assert marked_processes(tmp_path) == []  # the engine, the worker, the private Redis


def test_the_cli_finds_the_fleet_up_runs_and_the_readme_quick_start_works_on_it(
    tmp_path: Path,
) -> None:
    with running_up(tmp_path) as up:
        env = marked_env(tmp_path, SAGE_MQ_STATE_DIR=str(tmp_path), COLUMNS="200")
        env.pop("SAGE_MQ_REDIS_URL", None)

        def sage(*args: str, code: int = 0, columns: int = 200) -> str:
            argv = [sys.executable, "-m", "sage_mq", "llm", *args]
            run_env = env | {"COLUMNS": str(columns)}
            done = subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=120)
            assert done.returncode == code, done.stdout + done.stderr
            return done.stdout + done.stderr

        status = sage("status")
        assert f"redis       {up.redis_url} (the fleet of `sage llm up` (pid {up.proc.pid}))" in (
            status
        )
        assert "engines     2: RUNNING 2" in status, status
        started = sage("engine", "start", "demo", "--backend", "fake", "--no-gpu", "--wait")
        (engine_id,) = re.findall(r"^(demo-\w+) RUNNING at", started, re.MULTILINE)
        narrow = sage("engine", "list", columns=80)
        assert engine_id in narrow and "…" not in narrow and "left out at this width" in narrow
        assert max(len(line) for line in narrow.splitlines()) <= 80
        assert sage("chat", "demo-chat", "hello there") == "[demo-chat] You said: hello there\n"
        said = sage("chat", "nope", "hi", code=1)
        assert said.startswith("error: ") and "nope" in said and "Traceback" not in said
        events = sage("events", "--type", "engine.ready", "--engine", engine_id)
        assert len(events.splitlines()) == 1 and "engine.ready" in events, events
        assert "node.health" not in sage("events", "-t", "engine.", "-n", "500")
        up.ctrl_c()  # with the quick start's engine still running: it is stopped too
    assert "stopped 3 engine(s)" in up.out.read_text() and engine_processes(tmp_path) == []
    assert not (tmp_path / "fleet.json").exists()


def test_a_dry_run_plans_the_preset_on_the_live_fleet(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "name: demo\nengines:\n"
        "  - {name: chat, model: demo-chat, backend: fake, use_gpu: false}\n"  # up's own
        "  - {name: extra, model: extra, backend: fake, use_gpu: false, port: 40777}\n"
        "  - {name: big, model: big, backend: fake, use_gpu: true}\n"  # no GPU on this node
    )
    with running_up(tmp_path) as up:
        env = marked_env(tmp_path, SAGE_MQ_STATE_DIR=str(tmp_path), COLUMNS="200")
        env.pop("SAGE_MQ_REDIS_URL", None)
        argv = [sys.executable, "-m", "sage_mq", "llm", "preset", "apply", str(plan), "--dry-run"]
        done = subprocess.run([*argv, "--json"], env=env, capture_output=True, text=True)
        steps = {s["engine_id"]: s for s in json.loads(done.stdout)["engines"]}
        assert done.returncode == 1 and steps["demo-chat"]["action"] == "keep"
        assert (steps["demo-extra"]["action"], steps["demo-extra"]["port"]) == ("start", 40777)
        assert steps["demo-big"]["action"] == "refused" and "GPU" in steps["demo-big"]["reason"]
        said = subprocess.run(argv, env=env, capture_output=True, text=True)
        last = said.stderr.strip().splitlines()[-1]
        assert last.startswith("error: preset demo would not start as the fleet is now: demo-big")
        assert "demo-extra" not in httpx.get(f"{up.base}/v1/models", timeout=10).text
        up.ctrl_c()
